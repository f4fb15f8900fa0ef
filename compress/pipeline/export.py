"""The export step: the output folder, written under a temporary name, verified, and moved into place
only when complete:

  packed/      the deployable model: packed targets in their kernel formats, config, tokenizer
  model/       the dense Hugging Face checkpoint (output.hf: true)
  model.onnx   checked in onnxruntime (output.onnx: true)
  report.json  what was done and measured; recipe.json; run.log (the run's messages up to the export)
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from compress import __version__
from compress.cleanup import undo_on_abort
from compress.deploy.packed_model import PACKED_DIR, write_packed_model
from compress.formats.quantized import QuantizedWeight
from compress.methods.training import ADAPTER_DIR
from compress.pipeline.metrics import directory_bytes
from compress.pipeline.output import output_identity, partial_folder, publish
from compress.pipeline.store import MODEL_DIR, StepResult
from compress.pipeline.verify import verify_export
from compress.recipe import Recipe
from compress.runlog import LOG_FILE, current_text
from compress.state import STATE_FILE, CompressionState, PackedOnDisk

log = logging.getLogger("compress")

REPORT_FILE = "report.json"
RECIPE_FILE = "recipe.json"


def layer_error_summary(errors: list[float]) -> dict[str, float]:
    """`layer_error_max` / `layer_error_mean` over targets (nothing when no error was measured)."""
    return {"layer_error_max": max(errors), "layer_error_mean": sum(errors) / len(errors)} if errors else {}


def export_step(
    out_dir: Path, recipe: Recipe, load: StepResult, calibration: StepResult, stages: list[StepResult],
    evaluation: StepResult, steps: list[StepResult], started: float,
) -> dict[str, Any]:
    """Write the output folder (checkpoint, state, packed weights, report) and return the report."""
    final = stages[-1]
    state = CompressionState.load(final.path)
    measured = evaluation.info
    metrics: dict[str, Any] = {}
    dense = measured.get("dense")
    if dense is not None and "perplexity" in dense:
        metrics["dense_perplexity"] = dense["perplexity"]
    for name in ("perplexity", "kl_to_dense", "top1_agreement", "embedding_cosine", "sparsity", "params", "target_params"):
        if name in measured:
            metrics[name] = measured[name]
    tokens: dict[str, int] = {}
    for step in stages:
        tokens.update(step.info["tokens"])
    metrics.update(layer_error_summary([e for step in stages for e in step.info["layer_error"].values()]))
    report: dict[str, Any] = {
        "compress_version": __version__,
        "recipe": recipe.describe(),
        "model": load.info["model"],
        "calibration": {
            **{k: v for k, v in calibration.info.items() if k not in ("seconds", "compress_version")},
            "forward_seconds": sum(step.info["forward_seconds"] for step in stages),
        },
        "evaluation": measured["evaluation"],
        "metrics": metrics,
        "stages": [
            {
                **recipe.stages[index].describe(),
                "seconds": step.info["stage_seconds"],
                "targets": step.info["targets"],
                "targets_changed": step.info["targets_changed"],
                "sparsity": step.info["sparsity"],
                "no_calibration_tokens": step.info["no_calibration_tokens"],
                "fallbacks": step.info.get("fallbacks", {}),
                "layer_error_max": max(step.info["layer_error"].values(), default=None),
                "cached": step.cached,
                # training stages; layer-wise ones
                **{key: step.info[key] for key in ("training", "adapter", "placement", "forward_group") if key in step.info},
            }
            for index, step in enumerate(stages)
        ],
        "targets": {
            name: {
                **target,
                "stages": state.targets[name].stages,
                "calibration_tokens": tokens.get(name),
                "quantized": _quantization_info(state.targets[name].quantized),
                # per stage (by index), the relative output error this stage caused and its seconds
                "layer_error": {str(i): s.info["layer_error"][name] for i, s in enumerate(stages) if name in s.info["layer_error"]},
                "seconds": {str(i): s.info["target_seconds"][name] for i, s in enumerate(stages) if name in s.info["target_seconds"]},
                # per stage (by index) whose method fell back on this target: what it did instead and why
                "fallback": {str(i): s.info["fallbacks"][name] for i, s in enumerate(stages) if name in s.info.get("fallbacks", {})},
            }
            for name, target in measured["targets"].items()
        },
        "left_out": load.info["left_out"],
        "steps": [{"step": s.kind, "key": s.key, "cached": s.cached, "seconds": s.seconds} for s in steps],
    }
    adapter = next((step.path / ADAPTER_DIR for step in reversed(stages) if (step.path / ADAPTER_DIR).is_dir()), None)
    _write_output(out_dir, final, report, started, measured, recipe, causal=load.info["kind"] == "causal", adapter=adapter)
    return report


def _quantization_info(quantized: QuantizedWeight | None) -> dict[str, Any] | None:
    if quantized is None:
        return None
    outliers = quantized.outliers.count if quantized.outliers is not None else 0
    info = {"bits": quantized.bits, "group_size": quantized.group_size, "outliers": outliers}
    return info | {"ternary": True} if quantized.ternary else info


def _write_output(out_dir: Path, final: StepResult, report: dict[str, Any], started: float, measured: dict[str, Any], recipe: Recipe,
                  causal: bool, adapter: Path | None = None) -> None:
    """Write into a temporary sibling folder, verify it, then move it into place (replacing an earlier
    output of ours only, compress/pipeline/output.py). `adapter`: a LoRA stage's unmerged adapter."""
    partial = partial_folder(out_dir)
    with undo_on_abort(lambda: shutil.rmtree(partial, ignore_errors=True)):
        try:
            state = CompressionState.load(final.path, read_packed_forms=False) if (final.path / STATE_FILE).is_file() else CompressionState()
            packed = write_packed_model(final.model_path, state, list(report["targets"]), partial / PACKED_DIR)
            for name, stored in packed["targets"].items():
                report["targets"][name]["format"] = stored["format"]
                if "reason" in stored:
                    report["targets"][name]["dense_because"] = stored["reason"]
            params = sum(target["shape"][0] * target["shape"][1] for target in report["targets"].values())
            # bits/param counted from the bytes written: every target weight's tensors in packed/
            report["metrics"]["bits_per_param"] = 8 * packed["target_bytes"] / params if params else 0.0
            report["metrics"].update(_expert_metrics(report["targets"], packed))
            report["metrics"]["packed_bytes"] = packed["bytes"]
            report["metrics"]["size_bytes"] = packed["bytes"]
            # the dense checkpoint's weight files over the packed ones, both counted from the files
            dense_weights = sum(f.stat().st_size for f in final.model_path.glob("*.safetensors"))
            packed_weights = sum(f.stat().st_size for f in (partial / PACKED_DIR).glob("*.safetensors"))
            report["metrics"]["compression_ratio"] = dense_weights / packed_weights
            report["formats"] = dict(Counter(stored["format"] for stored in packed["targets"].values()))
            if recipe.output.hf:
                shutil.copytree(final.model_path, partial / MODEL_DIR)
            if adapter is not None:
                shutil.copytree(adapter, partial / ADAPTER_DIR)
            if recipe.output.onnx:
                _export_onnx(final.model_path, partial, report, causal, state)
            if recipe.output.verify:
                report["verify"] = verify_export(partial / PACKED_DIR, recipe, final, causal)
                report["metrics"].update({k: report["verify"][k] for k in VERIFY_METRICS if k in report["verify"]})
                report["metrics"]["verify_ok"] = int(report["verify"]["verify_ok"])
            report["metrics"]["seconds"] = time.perf_counter() - started
            (partial / REPORT_FILE).write_text(json.dumps(report, indent=2))
            (partial / RECIPE_FILE).write_text(json.dumps(report["recipe"], indent=2))
            (partial / LOG_FILE).write_text(current_text())
            report["metrics"]["output_bytes"] = directory_bytes(partial)
            (partial / REPORT_FILE).write_text(json.dumps(report, indent=2))
            publish(partial, out_dir, output_identity(recipe))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


VERIFY_METRICS = ("verify_max_abs_diff", "verify_perplexity")


def _expert_metrics(targets: dict[str, dict], packed: dict[str, Any]) -> dict[str, float]:
    """bits/param over the MoE expert targets alone, from the bytes written; with dictionary-coded experts
    (QMoE) also what the reference's static dictionary would have stored (nothing for a model without experts)."""
    experts = [name for name, target in targets.items() if target.get("fused_expert")]
    params = sum(targets[name]["shape"][0] * targets[name]["shape"][1] for name in experts)
    if not params:
        return {}
    stored = sum(packed["by_target"][name] for name in experts)
    metrics = {"expert_bits_per_param": 8 * stored / params}
    static = packed["static_dictionary_bytes"]
    if static:
        alternative = stored + sum(static[name] - packed["by_target"][name] for name in static if name in experts)
        metrics["expert_bits_per_param_static_dictionary"] = 8 * alternative / params
    return metrics


def _export_onnx(dense_dir: Path, partial: Path, report: dict[str, Any], causal: bool, state: CompressionState) -> None:
    """model.onnx beside the packed model (quantized targets as MatMulNBits where they fit), checked in
    onnxruntime. A failure is recorded in the report and leaves every other export in place: the packed
    model is the output, ONNX one more form of it."""
    from compress.pipeline.onnx import ONNX_FILE, export_onnx  # onnx takes ~1 s to import: only runs that export it pay

    quantized = {name: entry.quantized.load() if isinstance(entry.quantized, PackedOnDisk) else entry.quantized
                 for name, entry in state.targets.items() if entry.quantized is not None}
    try:
        check = export_onnx(dense_dir, partial / ONNX_FILE, causal, quantized=quantized)
    except Exception as error:  # an architecture the exporters cannot handle
        (partial / ONNX_FILE).unlink(missing_ok=True)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        report["onnx"] = {"onnx_ok": False, "error": reason}
        report["metrics"]["onnx_ok"] = 0
        log.warning("ONNX export failed (%s); the checkpoint and packed weights are written, set output.onnx: false to skip ONNX", reason)
        return
    report["onnx"] = check
    report["metrics"]["onnx_max_abs_diff"] = check["onnx_max_abs_diff"]
    report["metrics"]["onnx_ok"] = int(check["onnx_ok"])
    if not check["onnx_ok"]:
        log.warning("ONNX output differs from PyTorch by %.3g (tolerance %.3g): model.onnx is written but suspect",
                    check["onnx_max_abs_diff"], check["onnx_tolerance"])
