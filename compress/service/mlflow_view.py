"""How a run looks in the MLflow UI: the experiment's kind (so the UI opens on the runs table), run
and child-run names, searchable tags, headline metrics rounded to the precision they mean, and the
registered version's description. Pure functions of the recipe and report.json."""

from __future__ import annotations

import math
from typing import Any

# MLflow 3's experiment-kind tag (its UI reads it to choose between the GenAI and the model views)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# metric -> (how to round, digits): "decimals" rounds to decimal places, "significant" to
# significant digits, "int" to an integer. Metrics not listed are logged as they are.
PRECISION: dict[str, tuple[str, int]] = {
    "perplexity": ("significant", 5), "dense_perplexity": ("significant", 5), "kl_to_dense": ("significant", 4),
    "top1_agreement": ("decimals", 4), "embedding_cosine": ("decimals", 4), "sparsity": ("decimals", 4),
    "bits_per_param": ("decimals", 3), "size_bytes": ("int", 0), "packed_bytes": ("int", 0), "params": ("int", 0),
    "target_params": ("int", 0), "seconds": ("decimals", 1), "onnx_max_abs_diff": ("significant", 3), "onnx_ok": ("int", 0),
    "audit_ok": ("int", 0), "layer_error_max": ("significant", 4), "layer_error_mean": ("significant", 4),
    "stage_error_max": ("significant", 4), "stage_error_mean": ("significant", 4), "stage_sparsity": ("decimals", 4),
    "stage_seconds": ("decimals", 1),
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
