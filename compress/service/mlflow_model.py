"""The exported model as an MLflow pyfunc model: what the registry holds, loadable with
`mlflow.pyfunc.load_model("models:/NAME/VERSION")`. Its artifact is the deployable part of the output
folder (packed/ and report.json) and it carries the compress package as code, so it loads on the
kernel-backed modules wherever MLflow loads it; `predict` takes texts and returns, for a causal LM, the
mean next-token loss of each text, and for an encoder its mean-pooled embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc

OUTPUT_ARTIFACT = "output"


class CompressedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from compress.deploy.load import load_packed
        from compress.deploy.packed_model import PACKED_DIR

        folder = Path(context.artifacts[OUTPUT_ARTIFACT]) / PACKED_DIR
        config = AutoConfig.from_pretrained(folder)
        self.causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        self.model = load_packed(folder, kind="causal" if self.causal else "encoder")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    def predict(self, context, model_input: list[str], params=None):  # MLflow reads the hint as the input schema
        import torch

        texts = list(model_input)
        out = []
        with torch.no_grad():
            for text in texts:
                ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
                if self.causal:
                    out.append(float(self.model(input_ids=ids, labels=ids).loss))
                else:
                    out.append(self.model(input_ids=ids).last_hidden_state.mean(dim=1)[0].tolist())
        return out


def save_pyfunc_model(output_dir: Path, path: Path, mlflow_model: Any = None) -> None:
    """Save the model to `path`; `mlflow_model`: the MLmodel metadata to fill (a LoggedModel's id and
    artifact location), else a new one."""
    import shutil
    import tempfile

    import torch
    import transformers

    import compress
    from compress.deploy.packed_model import PACKED_DIR

    with tempfile.TemporaryDirectory(prefix="compress-mlflow-") as staging:
        deployable = Path(staging) / "output"
        shutil.copytree(output_dir / PACKED_DIR, deployable / PACKED_DIR)
        shutil.copy2(output_dir / "report.json", deployable / "report.json")
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(Path(__file__).with_name("mlflow_model_code.py")),  # from code, not a pickle
            artifacts={OUTPUT_ARTIFACT: str(deployable)},
            code_paths=[str(Path(compress.__file__).parent)],  # the packed modules and the loader travel with the model
            # stated, not inferred: inference would import and scan the environment (slow, and it guesses)
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"],
            mlflow_model=mlflow_model,
        )
