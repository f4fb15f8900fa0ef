"""The run: load, check every stage against the model, calibrate, compress, evaluate, write.

Everything the user can get wrong is checked before the first calibration pass; the output folder is
written under a temporary name and moved into place only when complete, so a failed run leaves
nothing behind in `--out`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from compress import __version__
from compress.data import batches, calibration_tokens, embedded_text, read_text_file, tokenize
from compress.engine import Stage, run_layerwise
from compress.errors import CompressError
from compress.evaluate import (
    directory_bytes,
    embedding_cosine,
    eval_windows,
    mean_pooled_embeddings,
    perplexity,
    stored_bits_per_param,
    target_sparsity,
)
from compress.methods.sparsity import PruningParams
from compress.modeling import LoadedModel, load_model, model_info, round_to_storage
from compress.recipe import Recipe
from compress.registry import get_method
from compress.packing import PACKED_FILE, QuantizedWeight
from compress.state import CompressionState
from compress.targets import ModelLayout, Target, discover, select

log = logging.getLogger("compress")

REPORT_FILE = "report.json"
MODEL_DIR = "model"


def plan_stages(recipe: Recipe, layout: ModelLayout) -> list[Stage]:
    """Resolve each stage's targets and check the method can handle every one of them; a stage that
    refines a mask (DSnoT) must follow a pruning stage covering its targets, and takes its pattern."""
    planned = []
    mask_pattern: dict[str, str] = {}  # target -> pattern of the last pruning stage that masked it
    for index, stage in enumerate(recipe.stages):
        method = get_method(stage.method)(stage.params)
        where = f"stages.{index} ({stage.method})"
        selection = stage.params.targets
        targets = select(layout.targets, selection.include, selection.exclude, where=f"stages.{index}.targets")
        targets = method.restrict_targets(targets)
        if not targets:
            raise CompressError(f"{where}: no target left to work on; check its targets and parameters")
        for target in targets:
            method.check_target(target)
        if method.refines_mask:
            unmasked = [t.name for t in targets if t.name not in mask_pattern]
            if unmasked:
                raise CompressError(
                    f"{where} refines the mask of an earlier pruning stage, but no earlier stage pruned "
                    f"{unmasked[0]} ({len(unmasked)} targets): put a pruning stage (wanda, magnitude, sparsegpt) "
                    f"before it covering the same targets"
                )
            patterns = sorted({mask_pattern[t.name] for t in targets})
            if len(patterns) > 1:
                raise CompressError(f"{where}: its targets were pruned with different patterns {patterns}; split it into one stage per pattern")
            try:
                method.bind_mask_pattern(patterns[0])
            except ValueError as error:
                raise CompressError(f"{where}: {error}") from None
        if isinstance(stage.params, PruningParams):
            mask_pattern.update({t.name: stage.params.pattern for t in targets})
        planned.append(Stage(method, targets, label=f"stage {index} ({method.name})"))
    return planned


def resolve_output_dir(recipe: Recipe, out: str | Path | None) -> Path:
    """`--out`, else the recipe's output.dir, else runs/<recipe name>. Refuses to replace a folder
    that is not an earlier compress output."""
    path = Path(out or recipe.output.dir or Path("runs") / recipe.name)
    if path.exists():
        if not path.is_dir():
            raise CompressError(f"output path {path} exists and is not a folder")
        if any(path.iterdir()) and not (path / REPORT_FILE).is_file():
            raise CompressError(f"output folder {path} is not empty and holds no earlier {REPORT_FILE}; choose another --out")
    return path


def _eval_tokens(recipe: Recipe, loaded: LoadedModel) -> tuple[torch.Tensor, str]:
    path = recipe.evaluate.text or str(embedded_text("eval.txt"))
    ids = tokenize(loaded.tokenizer, read_text_file(path, "evaluation"))
    windows = eval_windows(ids, recipe.evaluate.seqlen, recipe.evaluate.max_windows)
    if windows.shape[0] == 0:
        raise CompressError(f"evaluation text {path} has {ids.numel()} tokens, fewer than evaluate.seqlen={recipe.evaluate.seqlen}")
    return windows, path if recipe.evaluate.text else "<embedded eval.txt>"


def _quality(loaded: LoadedModel, windows: torch.Tensor, batch_size: int, reference: torch.Tensor | None) -> dict[str, Any]:
    if loaded.kind == "causal":
        return {"perplexity": perplexity(loaded.model, windows, loaded.device, batch_size)}
    embeddings = mean_pooled_embeddings(loaded.model, windows, loaded.device, batch_size)
    return {"embeddings": embeddings, "embedding_cosine": embedding_cosine(reference, embeddings) if reference is not None else 1.0}


def run(recipe: Recipe, out: str | Path | None = None) -> dict[str, Any]:
    """Run a validated recipe end to end; returns the report (also written to OUT/report.json)."""
    started = time.perf_counter()
    out_dir = resolve_output_dir(recipe, out)

    # Everything that can be wrong with the input is found here, before calibration.
    loaded = load_model(recipe.model)
    layout = discover(loaded.model)
    planned = plan_stages(recipe, layout)
    windows, eval_source = _eval_tokens(recipe, loaded)
    calibration: list[torch.Tensor] = []
    calibration_info: dict[str, Any] = {**recipe.calibration.model_dump(mode="json"), "used": False}
    if any(stage.method.statistics for stage in planned):
        tokens, source = calibration_tokens(recipe.calibration, loaded.tokenizer)
        calibration = batches(tokens, recipe.calibration.batch_size)
        calibration_info.update(used=True, source=source, tokens=int(tokens.numel()))
    log.info("model %s (%s, %s): %d targets in %d blocks", loaded.source, loaded.kind, loaded.device, len(layout.targets), len(layout.blocks))

    metrics: dict[str, Any] = {}
    round_to_storage(loaded)
    dense_embeddings = None
    if recipe.evaluate.dense or loaded.kind == "encoder":  # an encoder's fidelity needs the dense embeddings
        dense = _quality(loaded, windows, recipe.evaluate.batch_size, None)
        dense_embeddings = dense.pop("embeddings", None)
        if "perplexity" in dense:
            metrics["dense_perplexity"] = dense["perplexity"]
            log.info("dense perplexity %.3f", dense["perplexity"])

    state = CompressionState()
    outcome = run_layerwise(loaded.model, layout, planned, state, calibration, loaded.device)
    stage_reports = []
    tokens_per_target: dict[str, int] = {}
    for index, (stage, result) in enumerate(zip(planned, outcome.stages)):
        if result.changed == 0:
            raise CompressError(f"{stage.label} changed no weight of its {len(stage.targets)} targets: check its parameters")
        tokens_per_target.update(result.tokens)
        stage_reports.append(
            {
                **recipe.stages[index].describe(),
                "seconds": result.seconds,
                "targets": len(stage.targets),
                "targets_changed": result.changed,
                "sparsity": result.sparsity,
                "no_calibration_tokens": result.no_tokens,
            }
        )
        if result.no_tokens:
            log.warning("%s: no calibration token reached %d targets (%s...): they were compressed without "
                        "activation statistics", stage.label, len(result.no_tokens), result.no_tokens[0])
        log.info("%s: %d targets, sparsity %.4f, %.2f s", stage.label, len(stage.targets), result.sparsity, result.seconds)
    calibration_info["forward_seconds"] = outcome.forward_seconds

    round_to_storage(loaded)
    compressed_targets = [t for t in layout.targets if t.name in state.targets]
    per_target, overall = target_sparsity(compressed_targets)
    quality = _quality(loaded, windows, recipe.evaluate.batch_size, dense_embeddings)
    quality.pop("embeddings", None)
    metrics.update(quality)
    metrics.update(
        sparsity=overall,
        params=sum(p.numel() for p in loaded.model.parameters()),
        target_params=sum(t.numel for t in compressed_targets),
    )
    report: dict[str, Any] = {
        "compress_version": __version__,
        "recipe": recipe.describe(),
        "model": model_info(loaded),
        "calibration": calibration_info,
        "evaluation": {
            "text": eval_source,
            "seqlen": recipe.evaluate.seqlen,
            "windows": int(windows.shape[0]),
            "tokens": int(windows.numel()),
            "windowing": "non-overlapping",
            "metric": "perplexity" if loaded.kind == "causal" else "embedding_cosine (mean-pooled, vs dense)",
        },
        "metrics": metrics,
        "stages": stage_reports,
        "targets": {
            t.name: {
                "shape": list(t.weight.shape),
                "sparsity": per_target[t.name],
                "stages": state.targets[t.name].stages,
                "calibration_tokens": tokens_per_target.get(t.name),
                "fused_expert": t.is_expert,
                "quantized": _quantization_info(state.targets[t.name].quantized),
            }
            for t in compressed_targets
        },
        "left_out": layout.left_out,
    }
    _write_output(out_dir, loaded, state, report, started, compressed_targets)
    return report


def _quantization_info(quantized: QuantizedWeight | None) -> dict[str, Any] | None:
    if quantized is None:
        return None
    outliers = quantized.outliers.count if quantized.outliers is not None else 0
    return {"bits": quantized.bits, "group_size": quantized.group_size, "outliers": outliers}


def _write_output(
    out_dir: Path, loaded: LoadedModel, state: CompressionState, report: dict[str, Any], started: float, compressed_targets: list[Target]
) -> None:
    """Write into a temporary sibling folder, then move it into place (replacing an earlier output)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        model_dir = partial / MODEL_DIR
        loaded.model.to(loaded.storage_dtype).save_pretrained(model_dir)
        loaded.model.to(loaded.compute_dtype)
        loaded.tokenizer.save_pretrained(model_dir)
        state.save(partial)
        # bits/param is measured from what was written: the packed file for quantized targets
        packed = partial / PACKED_FILE
        packed_bytes = packed.stat().st_size if packed.exists() else 0
        quantized_params = sum(e.quantized.numel for e in state.targets.values() if e.quantized is not None)
        report["metrics"]["bits_per_param"] = stored_bits_per_param(compressed_targets, loaded.storage_dtype, packed_bytes, quantized_params)
        if packed_bytes:
            report["metrics"]["packed_bytes"] = packed_bytes
        report["metrics"]["size_bytes"] = directory_bytes(model_dir)
        report["metrics"]["seconds"] = time.perf_counter() - started
        (partial / REPORT_FILE).write_text(json.dumps(report, indent=2))
        (partial / "recipe.json").write_text(json.dumps(report["recipe"], indent=2))
        if out_dir.exists():
            retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(retired)
            partial.rename(out_dir)
            shutil.rmtree(retired)
        else:
            partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
