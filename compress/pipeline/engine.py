"""The run as a chain of steps: load, calibrate, each stage, evaluate, export.

Every step but load and export is stored by the content of its inputs (compress/steps.py), so a
re-run of a failed or edited recipe redoes only what changed. Steps hand each other folders: a stage
reads the checkpoint (model + masks + packed weights) the step before it wrote and writes its own.
`run` chains them with a `runner` that calls each step: plainly here, as a Prefect task with an
MLflow child run in the flow (flows/compress_flow.py), so both give bit-identical outputs.

Everything the user can get wrong is checked in the load step, before calibration; the output folder
is written under a temporary name and moved into place only when complete, so a failed run leaves
nothing behind in `--out`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compress import __version__
from compress.calibration.data import batches, calibration_tokens, embedded_text, read_text_file, tokenize
from compress.calibration.layerwise import Stage, run_layerwise
from compress.calibration.resume import StageBlocks
from compress.calibration.streaming import TensorShelf, open_blockwise, reference_weights
from compress.errors import CompressError
from compress.pipeline.metrics import (
    TopTokens,
    causal_scores,
    directory_bytes,
    embedding_cosine,
    eval_windows,
    mean_pooled_embeddings,
    stored_bits_per_param,
    target_sparsity,
)
from compress.methods.sparsity import PruningParams
from compress.model.load import LoadedModel, load_model, pick_device
from compress.pipeline.onnx import ONNX_FILE, export_onnx
from compress.formats.packed_file import PACKED_FILE, QuantizedWeight
from compress.recipe import ModelSpec, Recipe
from compress.methods.registry import get_method
from compress.state import STATE_FILE, STATE_INDEX, CompressionState
from compress.pipeline.store import MODEL_DIR, StepResult, StepStore, digest, file_digests, load_tokens, save_tokens, tree_digest
from compress.model.targets import ModelLayout, discover, select

log = logging.getLogger("compress")

REPORT_FILE = "report.json"
RECIPE_FILE = "recipe.json"
TOKENS_FILE = "tokens.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
TOP_TOKENS_FILE = "top_tokens.safetensors"  # the dense model's top-k next tokens: the KL's reference


def plan_stages(recipe: Recipe, layout: ModelLayout) -> list[Stage]:
    """Resolve each stage's targets and check the method can handle every one of them; a stage that
    refines a mask (DSnoT) must follow a pruning stage covering its targets, and takes its pattern."""
    planned = []
    mask_pattern: dict[str, str] = {}  # target -> pattern of the last pruning stage that masked it
    mask_stage: dict[str, int] = {}  # target -> index of that stage
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
        refines = None
        if method.refines_mask:
            sources = sorted({mask_stage[t.name] for t in targets})
            if len(sources) > 1:
                raise CompressError(f"{where}: its targets were pruned by different stages {sources}; split it into one stage per pruning stage")
            refines = sources[0]
        if isinstance(stage.params, PruningParams):
            mask_pattern.update({t.name: stage.params.pattern for t in targets})
            mask_stage.update({t.name: index for t in targets})
        planned.append(Stage(method, targets, label=f"stage {index} ({method.name})", refines=refines))
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


def _eval_tokens_from(recipe: Recipe, tokenizer: object) -> tuple[torch.Tensor, str]:
    path = recipe.evaluate.text or str(embedded_text("eval.txt"))
    ids = tokenize(tokenizer, read_text_file(path, "evaluation"))
    windows = eval_windows(ids, recipe.evaluate.seqlen, recipe.evaluate.max_windows)
    if windows.shape[0] == 0:
        raise CompressError(f"evaluation text {path} has {ids.numel()} tokens, fewer than evaluate.seqlen={recipe.evaluate.seqlen}")
    return windows, path if recipe.evaluate.text else "<embedded eval.txt>"


# --- checkpoints --------------------------------------------------------------------------------


def _compute_settings(spec: ModelSpec) -> dict[str, str]:
    """What, besides the inputs, decides a step's numbers: the resolved device type and dtype."""
    return {"device": pick_device(spec.device).type, "dtype": spec.dtype}


def checkpoint_spec(step: StepResult, spec: ModelSpec) -> ModelSpec:
    """The recipe's model section pointed at the checkpoint a step left (the source model for load)."""
    return spec.model_copy(update={"source": str(step.model_path), "kind": step.info.get("kind", spec.kind)})


def checkpoint_state(step: StepResult, read_packed_forms: bool = True) -> CompressionState:
    """The compression state a step left (empty for load); see CompressionState.load."""
    return CompressionState.load(step.path, read_packed_forms) if (step.path / STATE_FILE).is_file() else CompressionState()


def open_checkpoint(step: StepResult, spec: ModelSpec) -> tuple[LoadedModel, CompressionState]:
    """The model, loaded whole, and compression state a step left."""
    return load_model(checkpoint_spec(step, spec)), checkpoint_state(step)


# --- steps --------------------------------------------------------------------------------------


def load_step(recipe: Recipe) -> StepResult:
    """Find the model (a hub id is fetched into the local cache), resolve every stage against its
    skeleton (compress/plan.py: all input errors surface here, before any calibration) and hash
    its files."""
    from compress.pipeline.plan import build_plan  # the plan resolves stages with this module's plan_stages

    started = time.perf_counter()
    plan = build_plan(recipe)
    path = Path(plan.model_path)
    key = digest("model", tree_digest(path), recipe.model.kind, _compute_settings(recipe.model))
    info = {
        "model_path": plan.model_path,
        "source": plan.source,
        "kind": plan.kind,
        "model": plan.model_info(),
        "targets": plan.targets,
        "stage_targets": [len(stage.targets) for stage in plan.stages],
        "refines": [stage.refines for stage in plan.stages],
        "left_out": plan.left_out,
    }
    log.info("model %s (%s, %s): %d targets in %d blocks", plan.source, plan.kind, plan.device, plan.targets, plan.blocks)
    return StepResult("load", key, path, info, seconds=time.perf_counter() - started)


def needs_calibration(recipe: Recipe) -> bool:
    return recipe.evaluate.layer_error or any(get_method(stage.method).statistics for stage in recipe.stages)


def calibrate_step(store: StepStore, recipe: Recipe, load: StepResult) -> StepResult:
    """Seeded calibration token windows, stored; skipped when no stage gathers statistics."""
    spec = recipe.calibration
    if not needs_calibration(recipe):
        return StepResult("calibrate", "none", load.path, {**spec.model_dump(mode="json"), "used": False}, cached=True)
    described = spec.model_dump(mode="json")
    if spec.text:
        described["text"] = file_digests(spec.text)  # the content decides, not where it lies
    key = digest("calibrate", __version__, described, load.key)

    def compute(folder: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(load.model_path))
        tokens, source = calibration_tokens(spec, tokenizer)
        save_tokens(folder / TOKENS_FILE, tokens)
        return {**spec.model_dump(mode="json"), "used": True, "source": source, "tokens": int(tokens.numel())}

    return store.run("calibrate", key, compute)


def stage_step(
    store: StepStore, recipe: Recipe, index: int, previous: StepResult, calibration: StepResult, reference: StepResult | None = None
) -> StepResult:
    """Run recipe stage `index` over the checkpoint `previous` left; `reference` is the checkpoint
    from before the pruning stage that a refining stage (DSnoT) refines."""
    stage = recipe.stages[index]
    method = get_method(stage.method)
    measure_error = recipe.evaluate.layer_error
    uses_data = bool(method.statistics) or measure_error
    key = digest(
        "stage", __version__, stage.describe(), previous.key, calibration.key if uses_data else None,
        reference.key if reference else None, _compute_settings(recipe.model), measure_error,
    )

    def compute(folder: Path) -> dict[str, Any]:
        model = open_blockwise(checkpoint_spec(previous, recipe.model))
        state = checkpoint_state(previous, read_packed_forms=False)  # what this stage leaves alone is copied, not read
        layout = model.layout
        planned = plan_stages(recipe, layout)[index]
        if reference is not None:
            planned.reference = reference_weights(checkpoint_spec(reference, recipe.model), planned.targets)
        calib = batches(load_tokens(calibration.path / TOKENS_FILE), recipe.calibration.batch_size) if uses_data else []
        fisher = TensorShelf(folder / "fisher")  # in the work folder: a resumed stage finds it there
        if "fisher" in method.statistics and model.loaded.kind == "causal":  # an encoder has no LM loss: the method falls back
            planned.model_statistics = _fisher_of(previous, recipe, planned, calib, fisher)
        blocks = StageBlocks(model, folder, folder / MODEL_DIR, key)
        outcome = run_layerwise(model.loaded.model, layout, [planned], state, calib, model.loaded.device, measure_error, blocks)
        result = outcome.stages[0]
        if result.changed == 0:
            raise CompressError(f"{planned.label} changed no weight of its {len(planned.targets)} targets: check its parameters")
        if result.no_tokens:
            log.warning("%s: no calibration token reached %d targets (%s...): they were compressed without "
                        "activation statistics", planned.label, len(result.no_tokens), result.no_tokens[0])
        fisher.remove()  # an input of the stage, not part of its output
        blocks.close(state, folder)
        if blocks.resumed_at:
            log.info("%s: resumed at block %d of %d", planned.label, blocks.resumed_at, len(layout.blocks))
        log.info("%s: %d targets, sparsity %.4f, %.2f s", planned.label, len(planned.targets), result.sparsity, result.seconds)
        return {
            "label": planned.label,
            "stage_seconds": result.seconds,
            "forward_seconds": outcome.forward_seconds,
            "targets": len(planned.targets),
            "targets_changed": result.changed,
            "sparsity": result.sparsity,
            "tokens": result.tokens,
            "no_calibration_tokens": result.no_tokens,
            "layer_error": result.errors,
            "target_seconds": result.target_seconds,
            "resumed_at_block": blocks.resumed_at,
            "streamed": model.streamed,
        }

    return store.run("stage", key, compute, resumable=True)


def _fisher_of(
    checkpoint: StepResult, recipe: Recipe, stage: Stage, calib: list[torch.Tensor], shelf: TensorShelf
) -> Mapping[str, dict[str, torch.Tensor]]:
    """The Fisher diagonal of the stage's targets on the calibration batches, by target name. The
    gradients need every block at once, so the checkpoint is loaded whole for this pass (the stage
    itself streams); the sums go to `shelf` on disk as soon as they are complete and the engine reads
    one block's at a time. A shelf a killed run completed is taken as it is."""
    from compress.calibration.fisher import fisher_diagonal

    if not shelf.complete:
        shelf.remove()  # a write cut off part way
        loaded = load_model(checkpoint_spec(checkpoint, recipe.model))
        wanted = {t.name for t in stage.targets}
        targets = [t for t in discover(loaded.model).targets if t.name in wanted]
        sums = fisher_diagonal(loaded.model, targets, calib, loaded.device, return_model=False)
        del loaded, targets
        shelf.put(sums)
    return _Named(shelf, "fisher")


class _Named(Mapping):
    """{name: {statistic: tensor}} over a mapping of one statistic by name, read when asked for."""

    def __init__(self, values: Mapping[str, torch.Tensor], statistic: str) -> None:
        self.values, self.statistic = values, statistic

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        return {self.statistic: self.values[name]}

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def layer_error_summary(errors: list[float]) -> dict[str, float]:
    """`layer_error_max` / `layer_error_mean` over targets (nothing when no error was measured)."""
    return {"layer_error_max": max(errors), "layer_error_mean": sum(errors) / len(errors)} if errors else {}


def evaluate_step(store: StepStore, recipe: Recipe, load: StepResult, final: StepResult) -> StepResult:
    """Quality of the compressed model (and, stored apart, of the dense one), sparsity per target."""
    spec = recipe.evaluate
    text_key = file_digests([spec.text])[0] if spec.text else "embedded"
    settings = _compute_settings(recipe.model)
    causal = load.info["kind"] == "causal"
    dense = None
    if spec.dense or not causal:  # an encoder's fidelity needs the dense embeddings
        dense_key = digest("dense", __version__, spec.model_dump(mode="json"), text_key, load.key, settings)
        dense = store.run("dense", dense_key, lambda folder: _measure(recipe, load, folder, None, keep_top=spec.kl_top_k))
    key = digest("evaluate", __version__, spec.model_dump(mode="json"), text_key, final.key, dense.key if dense else None, settings)
    result = store.run("evaluate", key, lambda folder: _measure(recipe, final, folder, dense))
    result.info["dense"] = dense.info if dense is not None else None  # not stored: the key already covers it
    return result


def _measure(recipe: Recipe, checkpoint: StepResult, folder: Path, dense: StepResult | None, keep_top: int = 0) -> dict[str, Any]:
    """Quality of `checkpoint` (against the `dense` step's outputs, if given); `keep_top` > 0: keep
    this model's top next tokens, for later KLs against it (the dense pass)."""
    loaded, state = open_checkpoint(checkpoint, recipe.model)
    windows, source = _eval_tokens_from(recipe, loaded.tokenizer)
    info: dict[str, Any] = {
        "evaluation": {
            "text": source,
            "seqlen": recipe.evaluate.seqlen,
            "windows": int(windows.shape[0]),
            "tokens": int(windows.numel()),
            "windowing": "non-overlapping",
            "metric": "perplexity" if loaded.kind == "causal" else "embedding_cosine (mean-pooled, vs dense)",
        }
    }
    if loaded.kind == "causal":
        reference = None
        if dense is not None and (dense.path / TOP_TOKENS_FILE).exists():
            saved = load_file(str(dense.path / TOP_TOKENS_FILE))
            reference = TopTokens(saved["ids"], saved["logprobs"])
        scores = causal_scores(loaded.model, windows, loaded.device, recipe.evaluate.batch_size, reference, keep_top)
        info["perplexity"] = scores.perplexity
        if scores.top_tokens is not None:
            save_file({"ids": scores.top_tokens.ids, "logprobs": scores.top_tokens.logprobs}, str(folder / TOP_TOKENS_FILE))
        if reference is not None:
            info["kl_to_dense"] = scores.kl_to_reference
            info["top1_agreement"] = scores.top1_agreement
            info["evaluation"]["kl_to_dense"] = (f"mean per-token KL(dense || compressed), nats, over the dense model's top "
                                                 f"{reference.ids.shape[-1]} next tokens + the rest as one bin (a lower bound)")
    else:
        embeddings = mean_pooled_embeddings(loaded.model, windows, loaded.device, recipe.evaluate.batch_size)
        save_file({"embeddings": embeddings.contiguous()}, str(folder / EMBEDDINGS_FILE))
        reference = embeddings if dense is None else load_file(str(dense.path / EMBEDDINGS_FILE))["embeddings"]
        info["embedding_cosine"] = embedding_cosine(reference, embeddings)
    layout = discover(loaded.model)
    compressed = [t for t in layout.targets if t.name in state.targets]
    per_target, overall = target_sparsity(compressed)
    info.update(
        sparsity=overall,
        params=sum(p.numel() for p in loaded.model.parameters()),
        target_params=sum(t.numel for t in compressed),
        storage_bits=torch.finfo(loaded.storage_dtype).bits,
        targets={
            t.name: {"shape": list(t.weight.shape), "sparsity": per_target[t.name], "fused_expert": t.is_expert}
            for t in compressed
        },
    )
    return info


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
                "layer_error_max": max(step.info["layer_error"].values(), default=None),
                "cached": step.cached,
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
            }
            for name, target in measured["targets"].items()
        },
        "left_out": load.info["left_out"],
        "steps": [{"step": s.kind, "key": s.key, "cached": s.cached, "seconds": s.seconds} for s in steps],
    }
    _write_output(out_dir, final, report, started, measured, onnx=recipe.output.onnx, causal=load.info["kind"] == "causal")
    return report


def _quantization_info(quantized: QuantizedWeight | None) -> dict[str, Any] | None:
    if quantized is None:
        return None
    outliers = quantized.outliers.count if quantized.outliers is not None else 0
    return {"bits": quantized.bits, "group_size": quantized.group_size, "outliers": outliers}


def _write_output(
    out_dir: Path, final: StepResult, report: dict[str, Any], started: float, measured: dict[str, Any], onnx: bool, causal: bool
) -> None:
    """Write into a temporary sibling folder, then move it into place (replacing an earlier output)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        shutil.copytree(final.model_path, partial / MODEL_DIR)
        for name in (STATE_FILE, STATE_INDEX, PACKED_FILE):
            if (final.path / name).is_file():
                shutil.copy2(final.path / name, partial / name)
        # bits/param is measured from what was written: the packed file for quantized targets
        packed = partial / PACKED_FILE
        packed_bytes = packed.stat().st_size if packed.exists() else 0
        quantized_params = sum(
            target["shape"][0] * target["shape"][1] for target in report["targets"].values() if target["quantized"] is not None
        )
        report["metrics"]["bits_per_param"] = stored_bits_per_param(
            [t["shape"][0] * t["shape"][1] for t in report["targets"].values()], measured["storage_bits"], packed_bytes, quantized_params
        )
        if packed_bytes:
            report["metrics"]["packed_bytes"] = packed_bytes
        report["metrics"]["size_bytes"] = directory_bytes(partial / MODEL_DIR)
        if onnx:
            check = export_onnx(partial / MODEL_DIR, partial / ONNX_FILE, causal)
            report["onnx"] = check
            report["metrics"]["onnx_max_abs_diff"] = check["onnx_max_abs_diff"]
            report["metrics"]["onnx_ok"] = int(check["onnx_ok"])
            if not check["onnx_ok"]:
                log.warning("ONNX output differs from PyTorch by %.3g (tolerance %.3g): model.onnx is written but suspect",
                            check["onnx_max_abs_diff"], check["onnx_tolerance"])
        report["metrics"]["seconds"] = time.perf_counter() - started
        (partial / REPORT_FILE).write_text(json.dumps(report, indent=2))
        (partial / RECIPE_FILE).write_text(json.dumps(report["recipe"], indent=2))
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


# --- the chain ----------------------------------------------------------------------------------

Runner = Callable[..., Any]


def run_directly(name: str, function: Callable[..., Any], *args: Any) -> Any:
    """The plain runner: call the step here and now."""
    return function(*args)


def run(recipe: Recipe, out: str | Path | None = None, *, store: StepStore | None = None, runner: Runner = run_directly) -> dict[str, Any]:
    """Run a validated recipe end to end; returns the report (also written to OUT/report.json).

    `runner(name, step_function, *args)` calls each step; the Prefect flow passes one that runs it
    as a task and tracks it in MLflow."""
    started = time.perf_counter()
    out_dir = resolve_output_dir(recipe, out)
    store = store or StepStore.default()
    load = runner("load", load_step, recipe)
    calibration = runner("calibrate", calibrate_step, store, recipe, load)
    inputs: list[StepResult] = []
    stages: list[StepResult] = []
    previous = load
    for index, stage in enumerate(recipe.stages):
        inputs.append(previous)
        refines = load.info["refines"][index]
        reference = inputs[refines] if refines is not None else None
        previous = runner(f"stage {index} ({stage.method})", stage_step, store, recipe, index, previous, calibration, reference)
        stages.append(previous)
    evaluation = runner("evaluate", evaluate_step, store, recipe, load, previous)
    steps = [load, calibration, *stages, evaluation]
    runner("export", export_step, out_dir, recipe, load, calibration, stages, evaluation, steps, started)
    from compress.pipeline.audit import audit_step  # audit reads outputs with this module's helpers

    report = runner("audit", audit_step, out_dir)
    if not report["audit"]["ok"]:
        log.warning("audit: %d targets are not what the report says: %s", len(report["audit"]["problems"]),
                    "; ".join(f"{k}: {v[0]}" for k, v in list(report["audit"]["problems"].items())[:3]))
    return report
