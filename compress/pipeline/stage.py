"""A stage step: one recipe stage over the checkpoint the step before it left.

A per-target method runs through the layer-wise engine, streaming the checkpoint one block at a time
and checkpointing each finished block (a killed stage resumes where it died); the model-level
statistics it names (the Fisher diagonal) are computed first and kept on disk. A whole-model method
(training) gets the model loaded whole and the state, and its result is saved the same way.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from compress import __version__
from compress.calibration.distributed import is_follower, world_size
from compress.calibration.layerwise import PlannedStage, StageOutcome, run_layerwise
from compress.calibration.model_statistics import MODEL_STATISTICS, ShelvedStatistics
from compress.calibration.resume import FollowerBlocks, StageBlocks
from compress.calibration.shelf import TensorShelf
from compress.calibration.streaming import BlockwiseModel, open_blockwise, reference_weights
from compress.errors import CompressError
from compress.methods import get_method
from compress.methods.base import CalibrationData, ModelMethod
from compress.model.checkpoint import CheckpointWriter
from compress.model.load import load_model
from compress.model.targets import discover
from compress.pipeline.calibrate import calibration_batches
from compress.pipeline.checkpoints import checkpoint_spec, checkpoint_state, compute_settings
from compress.pipeline.stages import plan_stages
from compress.pipeline.store import MODEL_DIR, StepResult, StepStore, digest, file_digests
from compress.recipe import Recipe
from compress.train.stage import WORK_DIR as TRAIN_WORK_DIR
from compress.train.stage import bind_trainer

log = logging.getLogger("compress")


def stage_step(
    store: StepStore, recipe: Recipe, index: int, previous: StepResult, calibration: StepResult, reference: StepResult | None = None,
    original: StepResult | None = None,
) -> StepResult:
    """Run recipe stage `index` over the checkpoint `previous` left; `reference` is the checkpoint
    from before the pruning stage that a refining stage (DSnoT) refines; `original`: the model as
    loaded (a training stage's tokenizer and default teacher)."""
    stage = recipe.stages[index]
    method = get_method(stage.method)
    measure_error = recipe.evaluate.layer_error
    uses_data = bool(method.statistics) or measure_error
    text = _training_text(recipe) if method.trains else None
    key = digest(
        "stage", __version__, stage.describe(), previous.key, calibration.key if uses_data else None,
        reference.key if reference else None, compute_settings(recipe.model), measure_error, text, original.key if text and original else None,
        *((("processes", world_size()),) if world_size() > 1 else ()),  # summed in another order: other bits, another step
    )

    def compute(folder: Path) -> dict[str, Any]:
        calib = calibration_batches(calibration, recipe) if uses_data else []
        if issubclass(method, ModelMethod):
            return _whole_model(folder, recipe, index, previous, calib, original or previous)
        return _layerwise(folder, recipe, index, previous, calib, reference, key)

    return store.run("stage", key, compute, resumable=True)


def _layerwise(
    folder: Path, recipe: Recipe, index: int, previous: StepResult, calib: list[torch.Tensor], reference: StepResult | None, key: str
) -> dict[str, Any]:
    model = open_blockwise(checkpoint_spec(previous, recipe.model))
    state = checkpoint_state(previous, read_packed_forms=False)  # what this stage leaves alone is copied, not read
    layout = model.layout
    planned = plan_stages(recipe, layout)[index]
    if reference is not None:
        planned.reference = reference_weights(checkpoint_spec(reference, recipe.model), planned.targets)
    shelves = {name: TensorShelf(folder / name) for name in planned.method.statistics
               if name in MODEL_STATISTICS and model.loaded.kind in MODEL_STATISTICS[name].kinds}
    if shelves:  # in the work folder: a resumed stage finds them there
        planned.model_statistics = _model_statistics(shelves, previous, recipe, planned, calib)
    if is_follower():  # a data-parallel run's other process: its share of the statistics, nothing written
        run_layerwise(model.loaded.model, layout, [planned], state, calib, model.loaded.device, recipe.evaluate.layer_error, FollowerBlocks(model))
        return {}
    blocks = StageBlocks(model, folder, folder / MODEL_DIR, key)
    outcome = run_layerwise(model.loaded.model, layout, [planned], state, calib, model.loaded.device, recipe.evaluate.layer_error, blocks)
    result = outcome.stages[0]
    if result.changed == 0:
        raise CompressError(f"{planned.label} changed no weight of its {len(planned.targets)} targets: check its parameters")
    if result.no_tokens:
        log.warning("%s: no calibration token reached %d targets (%s...): they were compressed without "
                    "activation statistics", planned.label, len(result.no_tokens), result.no_tokens[0])
    if result.fallbacks:
        first = next(iter(result.fallbacks.items()))
        log.warning("%s: %d targets fell back to a data-free form (%s: %s%s)", planned.label, len(result.fallbacks), *first,
                    ", ..." if len(result.fallbacks) > 1 else "")
    for shelf in shelves.values():
        shelf.remove()  # an input of the stage, not part of its output
    blocks.close(state, folder)
    if blocks.resumed_at:
        log.info("%s: resumed at block %d of %d", planned.label, blocks.resumed_at, len(layout.blocks))
    log.info("%s: %d targets, sparsity %.4f, %.2f s (blocks: %s, %d calibration batches a forward)", planned.label, len(planned.targets),
             result.sparsity, result.seconds, outcome.placement, outcome.forward_group)
    return {**_stage_info(planned, result, outcome.forward_seconds, blocks.resumed_at, model.streamed), "placement": outcome.placement,
            "forward_group": outcome.forward_group}


def _model_statistics(
    shelves: dict[str, TensorShelf], checkpoint: StepResult, recipe: Recipe, stage: PlannedStage, calib: list[torch.Tensor]
) -> ShelvedStatistics:
    """The model-level statistics of the stage's targets on the calibration batches. They need every
    block at once (gradients), so the checkpoint is loaded whole for this pass (the stage itself
    streams); each goes to its shelf on disk as soon as it is complete, and the engine reads one
    target's at a time. A shelf a killed run completed is taken as it is."""
    for name, shelf in shelves.items():
        if shelf.complete:
            continue
        shelf.remove()  # a write cut off part way
        loaded = load_model(checkpoint_spec(checkpoint, recipe.model))
        wanted = {t.name for t in stage.targets}
        targets = [t for t in discover(loaded.model).targets if t.name in wanted]
        values = MODEL_STATISTICS[name].compute(loaded.model, targets, calib, loaded.device)
        del loaded, targets
        shelf.put(values)
    return ShelvedStatistics(shelves)


def _training_text(recipe: Recipe) -> Any:
    """What decides a training stage's data: the calibration source's content (files) or its id."""
    described = recipe.calibration.model_dump(mode="json", include={"text", "dataset", "dataset_config", "dataset_split", "dataset_field"})
    if recipe.calibration.text:
        described["text"] = file_digests(recipe.calibration.text)
    return described


def _whole_model(folder: Path, recipe: Recipe, index: int, previous: StepResult, calib: list[torch.Tensor], original: StepResult) -> dict[str, Any]:
    method = get_method(recipe.stages[index].method)
    spec = checkpoint_spec(previous, recipe.model)
    # a training stage keeps fp32 master weights (on CUDA it computes under bf16 autocast); saved in the checkpoint's dtype
    loaded = load_model(spec.model_copy(update={"dtype": "float32"}) if method.trains else spec)
    loaded.model.to(loaded.device)  # whole: a training stage needs every block at once
    state = checkpoint_state(previous)
    layout = discover(loaded.model)
    planned = plan_stages(recipe, layout)[index]
    before = {t.name: t.weight.detach().clone() for t in planned.targets}
    started = time.perf_counter()
    data = CalibrationData(calib, loaded.device, output_dir=folder)
    if method.trains:
        teachers = {"original": checkpoint_spec(original, recipe.model), "previous": spec}
        data.train = bind_trainer(recipe.calibration, original.model_path, teachers, folder)
    state = planned.method.apply(loaded.model, state, data)
    shutil.rmtree(folder / TRAIN_WORK_DIR, ignore_errors=True)  # the checkpoints: no part of the output
    result = StageOutcome(seconds=time.perf_counter() - started)
    unpacked = []
    for target in planned.targets:
        weight = target.weight.detach()
        if not torch.equal(weight, before[target.name]):
            result.changed += 1
            entry = state.get(target.name)
            entry.stages.append(planned.method.name)
            if entry.quantized is not None:  # its codes no longer say what the weight is
                entry.quantized = None
                unpacked.append(target.name)
        result.zeros += int((weight == 0).sum())
        result.numel += target.numel
    if result.changed == 0:
        raise CompressError(f"{planned.label} changed no weight of its {len(planned.targets)} targets: check its parameters")
    if unpacked:
        log.warning("%s changed %d quantized targets (%s, ...): their codes are dropped and they are stored in 16 bits (with "
                    "their mask); quantize after this stage to pack them again", planned.label, len(unpacked), unpacked[0])
    whole = BlockwiseModel(loaded, layout, None)
    writer = CheckpointWriter(folder / MODEL_DIR, len(layout.blocks))
    for block in range(len(layout.blocks)):
        writer.write(block + 1, whole.block_tensors(block))
    writer.write(0, whole.outside_tensors())
    writer.finish(whole.source)
    state.save(folder)
    log.info("%s: %d targets, sparsity %.4f, %.2f s", planned.label, len(planned.targets), result.sparsity, result.seconds)
    return {**_stage_info(planned, result, forward_seconds=0.0, resumed_at=0, streamed=False), **data.info}


def _stage_info(planned: PlannedStage, result: StageOutcome, forward_seconds: float, resumed_at: int, streamed: bool) -> dict[str, Any]:
    """What a stage step records in its step.json (the report and the tracking read it)."""
    return {
        "label": planned.label,
        "stage_seconds": result.seconds,
        "forward_seconds": forward_seconds,
        "targets": len(planned.targets),
        "targets_changed": result.changed,
        "sparsity": result.sparsity,
        "tokens": result.tokens,
        "no_calibration_tokens": result.no_tokens,
        "fallbacks": result.fallbacks,
        "layer_error": result.errors,
        "target_seconds": result.target_seconds,
        "resumed_at_block": resumed_at,
        "streamed": streamed,
    }
