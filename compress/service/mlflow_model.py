"""The exported model as an MLflow pyfunc model: what the registry holds, loadable with
`mlflow.pyfunc.load_model("models:/NAME/VERSION")`. Its artifact is the whole output folder (HF
checkpoint, packed weights, ONNX file, report); `predict` takes texts and returns, for a causal LM,
the mean next-token loss of each text, and for an encoder its mean-pooled embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc

OUTPUT_ARTIFACT = "output"


class CompressedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        folder = Path(context.artifacts[OUTPUT_ARTIFACT]) / "model"
        config = AutoConfig.from_pretrained(folder)
        self.causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        loader = AutoModelForCausalLM if self.causal else AutoModel
        self.model = loader.from_pretrained(folder).eval()
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


def save_pyfunc_model(output_dir: Path, path: Path) -> None:
    import torch
    import transformers

    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(Path(__file__).with_name("mlflow_model_code.py")),  # from code, not a pickle
        artifacts={OUTPUT_ARTIFACT: str(output_dir)},
        # stated, not inferred: inference would import and scan the environment (slow, and it guesses)
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"],
    )
