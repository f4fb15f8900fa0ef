"""A run's report for people: `report.md` (rendered by the MLflow UI), and the per-target table
(one row per target) that replaces per-target scalar metrics. Pure functions of report.json."""

from __future__ import annotations

from typing import Any

HEADLINE = (  # (metric, label, digits): what every run shows first, whatever its methods
    ("perplexity", "perplexity", 2), ("dense_perplexity", "dense perplexity", 2), ("kl_to_dense", "KL to dense (nats/token)", 4),
    ("top1_agreement", "top-1 agreement with dense", 4), ("embedding_cosine", "embedding cosine to dense", 4),
    ("sparsity", "sparsity", 4), ("bits_per_param", "bits/param (stored)", 3), ("packed_bytes", "packed bytes", 0),
    ("size_bytes", "checkpoint bytes", 0), ("seconds", "seconds", 1),
)


def target_table(report: dict[str, Any]) -> dict[str, list[Any]]:
    """Columns of the per-target table: target, block, kind, sparsity, bits, error (the largest
    relative output error any stage caused), seconds (all stages), fallback."""
    columns: dict[str, list[Any]] = {key: [] for key in ("target", "block", "kind", "sparsity", "bits", "error", "seconds", "fallback")}
    for name, target in report["targets"].items():
        quantized = target.get("quantized") or {}
        errors = list((target.get("layer_error") or {}).values())
        columns["target"].append(name)
        columns["block"].append(_block_of(name))
        columns["kind"].append(_kind_of(name, target))
        columns["sparsity"].append(round(target["sparsity"], 4))
        columns["bits"].append(quantized.get("bits", 16))
        columns["error"].append(round(max(errors), 6) if errors else None)
        columns["seconds"].append(round(sum((target.get("seconds") or {}).values()), 4))
        columns["fallback"].append("; ".join((target.get("fallback") or {}).values()) or "")
    return columns


def _block_of(name: str) -> int | None:
    digits = [part for part in name.split(".") if part.isdigit()]
    return int(digits[0]) if digits else None


def _kind_of(name: str, target: dict[str, Any]) -> str:
    parts = name.split(".")
    leaf = parts[-1]
    return f"expert {leaf}" if target.get("fused_expert") else leaf


def report_markdown(report: dict[str, Any]) -> str:
    """A short human summary: model, recipe, headline numbers vs dense, left out, fallbacks, targets."""
    model, metrics, evaluation = report["model"], report["metrics"], report["evaluation"]
    recipe = report["recipe"]
    lines = [f"# {recipe['name']} · {model['source']}", "",
             f"{model['architecture']} ({model['kind']}), {model['params']:,} parameters, stored in {model['storage_dtype']}; "
             f"evaluated on {evaluation['text']} ({evaluation['windows']} {evaluation['windowing']} windows of {evaluation['seqlen']} tokens).",
             "", "## Stages", ""]
    for index, stage in enumerate(report["stages"]):
        params = ", ".join(f"{k}={v}" for k, v in stage["params"].items() if k != "targets")
        lines.append(f"{index}. **{stage['method']}** ({params}): {stage['targets']} targets, sparsity {stage['sparsity']:.4f}, "
                     f"{stage['seconds']:.1f} s")
    lines += ["", "## Headline numbers", "", "| metric | value |", "|---|---|"]
    for key, label, digits in HEADLINE:
        if key in metrics:
            value = metrics[key]
            lines.append(f"| {label} | {value:,.{digits}f} |" if isinstance(value, float) else f"| {label} | {value:,} |")
    fallbacks = {name: reason for stage in report["stages"] for name, reason in (stage.get("fallbacks") or {}).items()}
    no_tokens = [name for stage in report["stages"] for name in stage.get("no_calibration_tokens") or []]
    if fallbacks or no_tokens:
        lines += ["", "## Fallbacks", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in fallbacks.items()]
        lines += [f"- `{name}`: no calibration token reached it (compressed without activation statistics)" for name in no_tokens]
    lines += ["", "## Left out", ""] + [f"- {name}: {why}" for name, why in report.get("left_out", {}).items()]
    table = target_table(report)
    lines += ["", "## Targets", "", "| target | block | sparsity | bits | error | seconds |", "|---|---|---|---|---|---|"]
    for row in zip(table["target"], table["block"], table["sparsity"], table["bits"], table["error"], table["seconds"]):
        name, block, sparsity, bits, error, seconds = row
        lines.append(f"| `{name}` | {block} | {sparsity:.4f} | {bits} | {'' if error is None else f'{error:.2e}'} | {seconds:.3f} |")
    audit = report.get("audit")
    if audit is not None:
        verdict = "every target is what the report says" if audit["ok"] else f"{len(audit['problems'])} targets are not what the report says"
        lines += ["", f"Audit: {verdict}."]
    return "\n".join(lines) + "\n"
