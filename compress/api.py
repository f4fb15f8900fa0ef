"""The Python API: compress a model in memory, run a recipe file to file, load an export.

Nothing heavy is imported until a function is called, so `import compress` stays fast; Prefect and
MLflow are imported only by a tracked `run`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress.pipeline.plan import Plan
    from compress.recipe import Recipe

RecipeLike = Union["Recipe", dict, str, os.PathLike]
TextLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def embedded_model() -> Path:
    """The folder of the small LLaMA-style model that ships with compress (the default model).

    >>> (embedded_model() / "config.json").is_file()
    True
    """
    from compress.model.load import embedded_model_path

    return embedded_model_path()


def _as_recipe(recipe: RecipeLike, overrides: Sequence[str] = ()) -> Recipe:
    """A validated Recipe from a Recipe, a dict (as a recipe file holds), or a recipe file's path."""
    from compress.recipe import Recipe, apply_override, load_recipe, validate_recipe

    if isinstance(recipe, Recipe):
        data, name = recipe.to_data(), recipe.name
    elif isinstance(recipe, dict):
        data, name = json.loads(json.dumps(recipe)), str(recipe.get("name") or "recipe")
    else:
        return load_recipe(Path(recipe), list(overrides))
    for assignment in overrides:
        apply_override(data, assignment)
    return validate_recipe(data, name=name)


def run(
    recipe: RecipeLike, model: str | os.PathLike | None = None, out: str | os.PathLike | None = None, *,
    overrides: Sequence[str] = (), track: bool = True, overwrite: bool = False,
) -> dict[str, Any]:
    """Do what `compress run` does: compress `model` (a local folder or hub id; default: the recipe's
    model, else the embedded one) with `recipe` (a file, a dict or a Recipe), evaluate, export to
    `out` (default: the recipe's output.dir, else runs/<recipe>-<model>-<hash>), and return the
    report (also in OUT/report.json). An existing output of another recipe or model is replaced only
    with `overwrite`; a folder compress did not write, never. `overrides` are `key.path=value` strings as `--set` takes. With `track` the run
    goes through the Prefect flow and is recorded in MLflow, and the report gains a `tracking` entry
    (MLflow run id, registered model version).

    >>> import compress, tempfile
    >>> out = tempfile.mkdtemp()
    >>> report = compress.run({"name": "wanda-demo", "stages": [{"method": "wanda", "sparsity": 0.5}],
    ...                        "calibration": {"nsamples": 8, "seqlen": 64}, "evaluate": {"max_windows": 4},
    ...                        "output": {"onnx": False}}, out=out + "/wanda", track=False)
    >>> round(report["metrics"]["sparsity"], 3)
    0.5
    """
    overrides = list(overrides)
    if model is not None:
        overrides.insert(0, f"model.source={json.dumps(os.fspath(model))}")
    parsed = _as_recipe(recipe, overrides)
    out_dir, _ = prepare(parsed, out, overwrite=overwrite, track=track)
    return execute(parsed, out_dir, track=track, overwrite=overwrite)


def prepare(recipe: Recipe, out: str | os.PathLike | None, *, overwrite: bool = False, track: bool = True) -> tuple[Path, Plan]:
    """Everything checked before any work, each fault one CompressError line: the output folder
    (ours to replace, inputs outside it), the plan (every stage against the model), room on disk,
    the tracking store. Leftovers of killed runs (temporary folders, orphaned servers) go first."""
    import torch

    from compress.leftovers import remove_dead_partials, stop_orphans
    from compress.pipeline.output import check_space, resolve_output_dir
    from compress.pipeline.plan import build_plan
    from compress.pipeline.store import StepStore

    out_dir = resolve_output_dir(recipe, out, overwrite)
    store = StepStore.default().root
    stop_orphans()
    remove_dead_partials(out_dir.parent)
    remove_dead_partials(store)
    plan = build_plan(recipe)
    check_space(out_dir, store, plan.params, torch.finfo(getattr(torch, plan.storage_dtype)).bits, len(recipe.stages), recipe.output.onnx,
                recipe.output.hf)
    if track:
        from compress.service.store_check import check_tracking_store
        from compress.service.tracking import tracking_uri

        check_tracking_store(tracking_uri())
    return out_dir, plan


def execute(recipe: Recipe, out_dir: Path, *, track: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Run a prepared recipe (see `prepare`): the plain step chain, or the tracked Prefect flow."""
    if not track:
        from compress.pipeline.engine import run as run_steps

        return run_steps(recipe, out_dir, overwrite=overwrite)
    from flows.compress_flow import compress_recipe

    result = compress_recipe(recipe=recipe.to_data(), out=str(out_dir), overwrite=overwrite)
    return {**result["report"], "tracking": {"mlflow_run_id": result["mlflow_run_id"], "model_version": result["model_version"]}}


def apply(
    model: nn.Module, recipe: RecipeLike, calibration: TextLike | None = None, *, tokenizer: Any = None,
    overrides: Sequence[str] = (), out: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Compress a `transformers` model already in memory with `recipe`, in place, and return the
    report (the same numbers `compress run` gives for the same weights and recipe).

    `calibration`: the calibration text (a string), or text files (a path or a list of paths);
    default: the recipe's. `tokenizer`: default, the one saved with the model (`model.name_or_path`).
    `out`: also keep the export there (default: nothing is kept but the report). The model is written
    once to a temporary checkpoint so the same steps run as for a file (streamed block by block,
    stored, resumable); its weights are then replaced by the compressed ones.

    >>> import compress
    >>> from transformers import AutoModelForCausalLM
    >>> model = AutoModelForCausalLM.from_pretrained(compress.embedded_model())
    >>> report = compress.apply(model, {"stages": [{"method": "wanda", "pattern": "2:4"}],
    ...                                 "calibration": {"nsamples": 8, "seqlen": 64},
    ...                                 "evaluate": {"max_windows": 4}, "output": {"onnx": False}},
    ...                         calibration="To be, or not to be, that is the question. " * 50)
    >>> float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean())
    0.5
    """
    from compress.pipeline.engine import run as run_steps

    parsed = _as_recipe(recipe, overrides)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    with tempfile.TemporaryDirectory(prefix="compress-apply-") as scratch:
        source = Path(scratch) / "model"
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
        data = parsed.to_data()
        data["model"]["source"] = str(source)
        data["output"]["hf"] = True  # the dense weights are copied back into `model` from OUT/model
        if calibration is not None:
            data["calibration"].update(text=_text_files(calibration, Path(scratch)), dataset=None)
        parsed = _as_recipe({**data, "name": parsed.name})
        report = run_steps(parsed, Path(out) if out is not None else Path(scratch) / "out")
        _load_weights(model, Path(out if out is not None else Path(scratch) / "out") / "model")
    report["model"]["source"] = getattr(model, "name_or_path", "") or "<in memory>"
    return report


def _text_files(calibration: TextLike, scratch: Path) -> list[str]:
    if isinstance(calibration, (list, tuple)):
        return [os.fspath(path) for path in calibration]
    if isinstance(calibration, os.PathLike) or _is_file(calibration):
        return [os.fspath(calibration)]
    path = scratch / "calibration.txt"
    path.write_text(str(calibration), encoding="utf-8")
    return [str(path)]


def _is_file(text: str) -> bool:
    """Whether a string names an existing file (a calibration text is rarely a valid path)."""
    try:
        return "\n" not in text and len(text) < 4096 and Path(text).is_file()
    except OSError:  # too long for a file name, or not one
        return False


def _load_weights(model: nn.Module, folder: Path) -> None:
    """Copy a checkpoint folder's tensors into `model`'s, in place and in their dtypes."""
    import torch

    from compress.model.checkpoint import CheckpointFiles

    files = CheckpointFiles(folder)
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in files.read([name for name in files.where if name in own]).items():
            own[name].copy_(tensor)


def load(out: str | os.PathLike, device: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The compressed model of an output folder (`compress run --out OUT`), ready for inference: built
    from OUT/packed, every packed target a kernel-backed module holding only its packed tensors (no
    dense weight is ever made for it); `generate` works for a causal LM. Its tokenizer is
    `AutoTokenizer.from_pretrained(OUT + "/packed")`. Transformers loads the same folder itself after
    `import compress`: `AutoModelForCausalLM.from_pretrained(OUT + "/packed")`.

    >>> import compress, tempfile
    >>> out = tempfile.mkdtemp() + "/rtn"
    >>> _ = compress.run({"stages": [{"method": "rtn", "bits": 4}], "evaluate": {"max_windows": 4, "layer_error": False}},
    ...                  out=out, track=False)
    >>> model = compress.load(out)
    >>> type(model.model.layers[0].mlp.up_proj).__name__
    'GroupQuantLinear'
    >>> model.generate(**{"input_ids": __import__("torch").tensor([[1, 5, 9]])}, max_new_tokens=4).shape
    torch.Size([1, 7])
    """
    from compress.deploy.load import load_packed
    from compress.deploy.packed_model import PACKED_DIR

    folder = Path(out)
    if not (folder / PACKED_DIR).is_dir() and (folder / "model" / "config.json").is_file():  # written before packed/ existed
        from transformers import AutoModel, AutoModelForCausalLM

        report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").is_file() else {}
        auto = AutoModelForCausalLM if report.get("model", {}).get("kind", "causal") == "causal" else AutoModel
        model = auto.from_pretrained(folder / "model", **({"dtype": dtype} if dtype is not None else {}))
        return (model.to(device) if device is not None else model).eval()
    return load_packed(out, device=device, dtype=dtype)
