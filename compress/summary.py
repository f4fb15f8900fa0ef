"""What the command line says about a run: one header line before the work (which model, which
texts calibrate and evaluate it) and a summary after (the numbers each of its methods changes:
sparsity for pruning, bits/param for quantization, both when both)."""

from __future__ import annotations

from typing import Any

from compress.pipeline.plan import Plan
from compress.recipe import Recipe


def run_header(recipe: Recipe, plan: Plan) -> str:
    from compress.methods import get_method
    from compress.pipeline.calibrate import needs_calibration

    model = f"{plan.source} ({plan.architecture}, {plan.params:,} parameters, {plan.device})"
    spec = recipe.calibration
    text = f"dataset {spec.dataset}" if spec.dataset else ", ".join(spec.text) if spec.text else "the embedded Shakespeare train.txt"
    trains = any(get_method(stage.method).trains for stage in recipe.stages)
    if not needs_calibration(recipe):
        calibration = f"trains on {text} (all of it)" if trains else "no calibration (its stages need no data)"
    else:
        calibration = f"calibrates on {text} ({spec.nsamples} x {spec.seqlen} tokens, seed {spec.seed})"
        calibration += "; trains on all of it" if trains else ""
    evaluation = recipe.evaluate.text or "the embedded Shakespeare eval.txt"
    return f"{recipe.name}: {model}; {calibration}; evaluates on {evaluation} (windows of {recipe.evaluate.seqlen})"


def _changes(report: dict[str, Any]) -> tuple[bool, bool]:
    """(prunes, quantizes): whether a stage prunes (it has a sparsity or a pattern) and whether a
    target ended up quantized."""
    prunes = any({"sparsity", "pattern"} & set(stage["params"]) for stage in report["stages"])
    quantizes = any(target.get("quantized") for target in report["targets"].values())
    return prunes, quantizes


def run_summary(report: dict[str, Any], out: str) -> str:
    metrics = report["metrics"]
    prunes, quantizes = _changes(report)
    headline = ["perplexity", "dense_perplexity", "kl_to_dense", "embedding_cosine"]
    if prunes or not quantizes:
        headline.append("sparsity")
    if quantizes or not prunes:
        headline.append("bits_per_param")
    lines = [f"wrote {out}"]
    for key in (*headline, "size_bytes", "seconds"):
        if key in metrics:
            value = metrics[key]
            lines.append(f"  {key:<18} {value:.4f}" if isinstance(value, float) else f"  {key:<18} {value}")
    for stage in report["stages"]:
        trained = f", trained on {stage['training']['tokens']:,} tokens" if stage.get("training") else ""
        lines.append(f"  stage {stage['method']:<12} {stage['targets']} targets, {stage['seconds']:.2f} s{trained}")
        for target, reason in (stage.get("fallbacks") or {}).items():
            lines.append(f"    fallback: {target}: {reason}")
    if "tracking" in report:
        tracking = report["tracking"]
        version = f", model version {tracking['model_version']}" if tracking["model_version"] else ""
        lines.append(f"  mlflow run {tracking['mlflow_run_id']}{version}")
    return "\n".join(lines)
