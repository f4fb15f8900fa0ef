"""The figures a run and a comparison of runs log: the per-target plot (sparsity, bits, each stage's
layer error, in block order) and `compress compare --figure` (headline metrics side by side, per-block
layer error of every run). matplotlib (Agg) is imported only when a figure is drawn."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any


def plot_targets(report: dict[str, Any], path: Path) -> bool:
    """Per target, in block order and coloured by target type: sparsity, code bits where quantized,
    and each stage's relative output error (log scale), so the one bad layer stands out.
    False if there is nothing to plot."""
    targets = report.get("targets") or {}
    if not targets:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(targets)
    kinds = sorted({name.rsplit(".", 1)[-1] for name in names})
    colours = {kind: plt.cm.tab10(i % 10) for i, kind in enumerate(kinds)}
    colour = [colours[n.rsplit(".", 1)[-1]] for n in names]
    stages = sorted({s for t in targets.values() for s in (t.get("layer_error") or {})}, key=int)
    quantized = any(t.get("quantized") for t in targets.values())
    panels = 1 + quantized + len(stages)
    figure, axes = plt.subplots(panels, 1, figsize=(max(7, len(names) * 0.12), 2.2 * panels + 0.6), squeeze=False)
    axes = [row[0] for row in axes]
    axes[0].bar(range(len(names)), [targets[n]["sparsity"] for n in names], color=colour)
    axes[0].set_ylabel("sparsity")
    axes[0].set_title(f"{report['recipe']['name']}: per target, in block order")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in kinds]
    axes[0].legend(handles, kinds, fontsize=6, ncol=min(len(kinds), 7), loc="upper right")
    panel = 1
    if quantized:
        axes[panel].bar(range(len(names)), [(targets[n].get("quantized") or {}).get("bits", 0) for n in names], color=colour)
        axes[panel].set_ylabel("code bits")
        panel += 1
    for stage in stages:
        errors = [(targets[n].get("layer_error") or {}).get(stage, float("nan")) for n in names]
        axes[panel].bar(range(len(names)), errors, color=colour)
        axes[panel].set_yscale("log")
        method = report["stages"][int(stage)]["method"]
        axes[panel].set_ylabel(f"stage {stage} ({method})\nrel. output error", fontsize=7)
        panel += 1
    for axis in axes:
        axis.set_xticks([])
    axes[-1].set_xlabel("targets (blocks left to right)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


COMPARE_HEADLINE = (("perplexity", "perplexity"), ("bits_per_param", "bits/param (stored)"), ("sparsity", "sparsity"),
                    ("packed_bytes", "packed size (MB)"))


def run_target_table(mlflow_client, run_id: str) -> dict[str, list[Any]] | None:
    """A run's per-target table (targets.json) as columns, or None if it has none."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = mlflow_client.download_artifacts(run_id, "targets.json", scratch)
        except Exception:  # an older run, or one that failed before its end
            return None
        table = json.loads(Path(local).read_text())
    return {name: [row[i] for row in table["data"]] for i, name in enumerate(table["columns"])}


def compare_figure(runs: list[dict[str, Any]], path: Path) -> Path:
    """One figure for `compress compare`: the headline metrics side by side (a bar per run), and
    below, each run's per-layer error by block (the largest relative output error of a block's
    targets, log scale). `runs`: dicts with `label`, `metrics` and `targets` (a target table or None)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(12, 7.5))
    grid = figure.add_gridspec(2, len(COMPARE_HEADLINE), height_ratios=[1, 1.3])
    colours = [plt.cm.tab10(i % 10) for i in range(len(runs))]
    for column, (key, label) in enumerate(COMPARE_HEADLINE):
        axis = figure.add_subplot(grid[0, column])
        values = [r["metrics"].get(key, r["metrics"].get("size_bytes") if key == "packed_bytes" else None) for r in runs]
        values = [float("nan") if v is None else v / 1e6 if key == "packed_bytes" else v for v in values]
        bars = axis.bar(range(len(runs)), values, color=colours)
        axis.bar_label(bars, fmt="%.4g", fontsize=7)
        dense = runs[0]["metrics"].get("dense_perplexity") if key == "perplexity" else None
        if dense:
            axis.axhline(dense, color="grey", linestyle="--", linewidth=1, label="dense")
            axis.legend(fontsize=7, loc="lower right")
        axis.set_title(label, fontsize=9)
        axis.set_xticks(range(len(runs)), [str(i + 1) for i in range(len(runs))], fontsize=8)
        axis.margins(y=0.15)
    errors = figure.add_subplot(grid[1, :])
    plotted = False
    for index, run in enumerate(runs):
        table = run["targets"]
        if not table or "block" not in table or "error" not in table:
            continue
        by_block: dict[int, float] = {}
        for block, error in zip(table["block"], table["error"]):
            if block is not None and error is not None:
                by_block[block] = max(by_block.get(block, 0.0), error)
        if by_block:
            blocks = sorted(by_block)
            errors.plot(blocks, [by_block[b] for b in blocks], marker="o", color=colours[index], label=f"{index + 1}: {run['label']}")
            plotted = True
    if plotted:
        errors.set_yscale("log")
        errors.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        errors.text(0.5, 0.5, "no per-target table in these runs", ha="center", va="center", transform=errors.transAxes)
    errors.set_xlabel("block")
    errors.set_ylabel("per-layer error (largest relative\noutput error of the block's targets)", fontsize=8)
    errors.grid(True, which="both", alpha=0.3)
    figure.suptitle("compress compare: " + "   ".join(f"{i + 1}: {r['label']}" for i, r in enumerate(runs)), fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
