"""How a run looks in the MLflow UI: the experiment's kind (so the UI opens on the runs table), run
and child-run names, searchable tags, headline metrics rounded to the precision they mean, and the
registered version's description, the dataset inputs. Functions of the recipe and report.json (the
dataset inputs also read the texts, for their digest)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

# MLflow 3's experiment-kind tag (its UI reads it to choose between the GenAI and the model views)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The MLflow 3 UI shows no metric column until one is picked, and keeps what was picked per browser.
# A "shared view" is an experiment tag the UI reads when its URL names it (`viewStateShareKey`): ours
# selects the headline columns. `compress ui` opens that URL, in the model-training (not GenAI) view.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
VIEW_KEY = "compress-headline"
TABLE_METRICS = ("perplexity", "kl_to_dense", "bits_per_param", "sparsity", "packed_bytes")  # the UI sorts them by name


def view_state() -> str:
    """The shared view's state (JSON): the runs table with the headline metric columns, newest first."""
    # The Dataset column (filled: calibration and evaluation texts) is wide and comes before the
    # metrics, which would then start off screen: it stays one click away (Columns), as Source does.
    columns = ["attributes.`Models`", *(f"metrics.`{m}`" for m in TABLE_METRICS)]
    return json.dumps({"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False,
                       "runsHiddenMode": "SHOW_ALL", "columnOrder": [], "columnWidths": {}})


def runs_page(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table with the headline columns: what `compress ui` opens."""
    return f"{base_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"

# metric -> (how to round, digits): "decimals" rounds to decimal places, "significant" to
# significant digits, "int" to an integer. Metrics not listed are logged as they are.
PRECISION: dict[str, tuple[str, int]] = {
    "perplexity": ("significant", 5), "dense_perplexity": ("significant", 5), "kl_to_dense": ("significant", 4),
    "top1_agreement": ("decimals", 4), "embedding_cosine": ("decimals", 4), "sparsity": ("decimals", 4),
    "bits_per_param": ("decimals", 3), "size_bytes": ("int", 0), "packed_bytes": ("int", 0), "params": ("int", 0),
    "target_params": ("int", 0), "seconds": ("decimals", 1), "onnx_max_abs_diff": ("significant", 3), "onnx_ok": ("int", 0),
    "audit_ok": ("int", 0), "layer_error_max": ("significant", 4), "layer_error_mean": ("significant", 4),
    "stage_error_max": ("significant", 4), "stage_error_mean": ("significant", 4), "stage_sparsity": ("decimals", 4),
    "stage_seconds": ("decimals", 1), "verify_ok": ("int", 0), "verify_max_abs_diff": ("significant", 3),
    "verify_perplexity": ("significant", 5), "output_bytes": ("int", 0),
}
# what a registered version carries as tags, besides its base model
VERSION_TAG_METRICS = ("perplexity", "dense_perplexity", "kl_to_dense", "embedding_cosine", "sparsity", "bits_per_param", "size_bytes")


def rounded(name: str, value: float) -> float:
    """`value` to the precision metric `name` means (perplexity 5 significant digits, KL 4,
    bits/param 3 decimals, sparsity 4, seconds 1, bytes integers)."""
    how, digits = PRECISION.get(name, ("", 0))
    if not math.isfinite(value) or not how:
        return value
    if how == "int":
        return float(round(value))
    if how == "significant":
        return float(f"{value:.{digits}g}") if value else 0.0
    return round(value, digits)


def headline_metrics(report_metrics: dict[str, Any]) -> dict[str, float]:
    """The parent run's metrics: the report's numbers, under the report's names, rounded."""
    return {k: rounded(k, float(v)) for k, v in report_metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def step_run_name(index: int, step: str) -> str:
    """`1 load`, `2 calibrate`, `3 stage 0 (wanda)`, ...: sorts and reads in the order the steps ran."""
    return f"{index} {step}"


def run_name(recipe_data: dict[str, Any], model: str) -> str:
    return f"{recipe_data.get('name') or 'compress'} · {model}"


def recipe_tags(recipe_data: dict[str, Any], model: str) -> dict[str, str]:
    """Tags to filter and group runs by: model, methods, code bits, sparsity pattern."""
    stages = recipe_data.get("stages") or []
    methods = [str(stage.get("method")) for stage in stages]
    bits = sorted({int(stage["bits"]) for stage in stages if stage.get("bits") is not None})
    patterns = [str(stage.get("pattern") or "unstructured") for stage in stages if stage.get("sparsity") is not None or stage.get("pattern")]
    tags = {"compress.model": model, "compress.methods": "+".join(methods) or "none", "compress.bits": ",".join(map(str, bits)) or "16"}
    tags["compress.sparsity_pattern"] = "+".join(dict.fromkeys(patterns)) or "dense"
    return tags


def version_description(report: dict[str, Any]) -> str:
    """A registered version's description: model, recipe, stages and headline numbers (markdown)."""
    from compress.service.report_md import HEADLINE

    model, metrics, recipe = report["model"], report["metrics"], report["recipe"]
    stages = " → ".join(stage["method"] for stage in report["stages"]) or "no stages"
    lines = [f"**{recipe['name']}** ({stages}) on `{model['source']}` ({model['architecture']}, {model['params']:,} parameters).", ""]
    for key, label, digits in HEADLINE:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"- {label}: {value:,.{digits}f}")
    return "\n".join(lines)


def version_tags(report: dict[str, Any], recipe_hash: str) -> dict[str, str]:
    metrics = report["metrics"]
    tags = {"compress.recipe_hash": recipe_hash, "compress.base_model": str(report["model"]["source"]),
            "compress.recipe": str(report["recipe"]["name"])}
    tags.update({key: f"{rounded(key, float(metrics[key])):g}" for key in VERSION_TAG_METRICS if key in metrics})
    return tags


def model_name(report: dict[str, Any]) -> str:
    """The logged model's name (the runs table's Models column): `<recipe>-<model>`."""
    source = str(report["model"]["source"])
    label = "embedded" if source.startswith("<") else Path(source.rstrip("/")).name or source
    return f"{report['recipe']['name']}-{label}"


def _text_path(name: str) -> Path | None:
    """A report's text name (a path, or `<embedded train.txt>`) as a file, if it is one."""
    if name.startswith("<embedded ") and name.endswith(">"):
        from compress.calibration.data import embedded_text

        return embedded_text(name[len("<embedded "):-1])
    path = Path(name)
    return path if path.is_file() else None


def _text_dataset(names: list[str], profile: dict[str, Any]):
    """An MLflow dataset entity for text files: named after them, digest of their content, a local source."""
    from mlflow.entities import Dataset

    paths = [_text_path(name) for name in names]
    content = hashlib.sha256()
    for name, path in zip(names, paths):
        content.update(path.read_bytes() if path is not None else name.encode())
    label = ", ".join(n.strip("<>").removeprefix("embedded ") if n.startswith("<") else Path(n).name for n in names)
    source = {"uri": paths[0].resolve().as_uri() if paths[0] is not None else names[0]}
    if len(names) > 1:
        source["uris"] = [p.resolve().as_uri() if p is not None else n for n, p in zip(names, paths)]
    return Dataset(name=label, digest=content.hexdigest()[:8], source_type="local", source=json.dumps(source),
                   profile=json.dumps(profile))


def datasets(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """(context, MLflow dataset entity) of the texts a run read: "calibration" (when a stage gathered
    statistics) and "evaluation". A Hugging Face calibration dataset is named by its id and split."""
    from mlflow.entities import Dataset

    out = []
    calibration = report.get("calibration") or {}
    if calibration.get("used") and calibration.get("source"):
        profile = {k: calibration[k] for k in ("tokens", "nsamples", "seqlen", "seed") if k in calibration}
        source = str(calibration["source"])
        if source.startswith("dataset:"):
            _, name, split = source.split(":", 2)
            out.append(("calibration", Dataset(name=name, digest=hashlib.sha256(source.encode()).hexdigest()[:8], source_type="hugging_face",
                                               source=json.dumps({"path": name, "split": split}), profile=json.dumps(profile))))
        else:
            out.append(("calibration", _text_dataset(source.split(","), profile)))
    evaluation = report.get("evaluation") or {}
    if evaluation.get("text"):
        profile = {k: evaluation[k] for k in ("tokens", "windows", "seqlen", "windowing") if k in evaluation}
        out.append(("evaluation", _text_dataset([str(evaluation["text"])], profile)))
    return out
