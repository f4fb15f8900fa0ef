"""The layer-wise engine: runs a recipe's stages over the model's blocks one block at a time.

As the Wanda/SparseGPT references do: the calibration batches are captured at the input of block 0;
for block i, each stage in turn gathers its targets' statistics on a forward pass through the block
as it stands (hooks), then compresses those targets; a last forward pass through the compressed block
gives the inputs of block i+1. So every stage sees, at every block, the inputs the fully compressed
model will give it, and a stage that refines an earlier one (DSnoT after Wanda) sees that stage's
result on the same block. Only the current block needs to sit on the accelerator; the rest of the
model stays where it was loaded (the small modules outside the blocks move with the inputs).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.calibration.capture import BlockInputs, capture_block_inputs
from compress.calibration.distributed import total_over_processes, world_size
from compress.calibration.expert_batches import joint_results
from compress.calibration.forward_batches import block_group, block_outputs, run_block
from compress.calibration.placement import BlockPlacement
from compress.calibration.statistics import STATISTICS, gather
from compress.calibration.target_split import TargetSplit
from compress.errors import CompressError
from compress.methods.base import TargetMethod, TargetResult
from compress.model.targets import ModelLayout, Target
from compress.progress import bar
from compress.state import CompressionState


@dataclass
class PlannedStage:
    """One recipe stage resolved against the model: its method and the targets it compresses."""

    method: TargetMethod
    targets: list[Target]
    label: str = ""
    # For a stage that refines a mask (DSnoT): the weights before the pruning stage it refines, by
    # target name. Without it, the weights as they stand before the first stage of this pass.
    reference: dict[str, torch.Tensor] | None = None
    refines: int | None = None  # index (in the recipe) of the pruning stage whose mask this one refines
    # statistics of the whole model the method names (compress.calibration.model_statistics), by
    # target name, computed before the pass
    model_statistics: Mapping[str, dict[str, torch.Tensor]] | None = None


@dataclass
class StageOutcome:
    seconds: float = 0.0  # the stage's own statistics passes and compression
    tokens: dict[str, int] = field(default_factory=dict)  # calibration tokens that reached each target
    no_tokens: list[str] = field(default_factory=list)  # targets (experts) no token reached: method fell back
    fallbacks: dict[str, str] = field(default_factory=dict)  # target -> what its method did instead (TargetResult.fallback)
    changed: int = 0  # targets whose weights the stage changed
    # relative output error on the calibration inputs, ||(W - W')X||^2 / ||WX||^2 (W: before the
    # stage), and the seconds each target took; when the run measures errors
    errors: dict[str, float] = field(default_factory=dict)
    target_seconds: dict[str, float] = field(default_factory=dict)
    zeros: int = 0  # zero weights of its targets right after the stage
    numel: int = 0

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.numel, 1)


@dataclass
class RunOutcome:
    stages: list[StageOutcome]
    forward_seconds: float = 0.0  # capturing block 0's inputs and carrying them from block to block
    placement: str = "in place"  # where the blocks were worked on (compress.calibration.placement)
    forward_group: int = 1  # calibration batches a forward through a block took (compress.calibration.forward_batches)


def _fingerprint(weight: torch.Tensor) -> tuple[int, float]:
    return int((weight == 0).sum()), float(weight.float().pow(2).sum())


def apply_to_target(
    method: TargetMethod,
    target: Target,
    statistics: dict[str, torch.Tensor],
    state: CompressionState,
    dense: torch.Tensor | None = None,
    fallbacks: dict[str, str] | None = None,
    result: TargetResult | None = None,
) -> bool:
    """Apply the method's pure core to one target (or take its `result`, computed with other experts)
    and record its mask in the state (and in `fallbacks`, what the method did instead of its own work,
    if it had to); True if the target's weights changed."""
    weight = target.weight
    previous = state.mask(target.name, weight.device)
    before = _fingerprint(weight)
    dense = None if dense is None else dense.to(weight.device, torch.float32)
    if result is None:
        result = method.compress_target(weight.float(), statistics, previous, dense)
    weight.copy_(result.weight.to(weight.dtype))
    entry = state.get(target.name)
    if result.mask is not None:
        entry.mask = result.mask
    entry.quantized = None if result.quantized is None else result.quantized.to("cpu")  # a later stage's change voids it
    entry.stages.append(method.name)
    if result.fallback is not None and fallbacks is not None:
        fallbacks[target.name] = result.fallback
    return _fingerprint(weight) != before


def relative_output_error(before: torch.Tensor, after: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - W')X||^2 / ||WX||^2 from H = X^T X: tr(D H D^T) / tr(W H W^T), D = W - W'."""
    delta = after.float() - before.float()
    reference = float(((before.float() @ hessian) * before.float()).sum())
    return float(((delta @ hessian) * delta).sum()) / reference if reference > 0 else 0.0


def _compress_targets(
    stage: PlannedStage,
    targets: list[Target],
    statistics: dict[str, dict[str, torch.Tensor]],
    state: CompressionState,
    originals: dict[str, torch.Tensor],
    outcome: StageOutcome,
    measure_error: bool,
) -> None:
    split = TargetSplit.plan(stage.method, targets, outcome.tokens, state, statistics)  # with --nproc N: this process's share
    batched, batch_seconds = joint_results(stage.method, split.mine, statistics, state)  # experts and siblings taken together
    changed: dict[str, bool] = {}
    for target in split.mine:
        dense = originals.get(target.name) if stage.method.refines_mask else None
        stats = statistics.get(target.name, {})
        hessian = stats.get("hessian") if measure_error else None
        if hessian is not None and "hessian" in stage.method.statistics:
            hessian = hessian.clone()  # the method may damp it in place
        before = target.weight.float().clone() if hessian is not None else None
        start = time.perf_counter()
        changed[target.name] = apply_to_target(stage.method, target, stats, state, dense, outcome.fallbacks, batched.get(target.name))
        outcome.target_seconds[target.name] = time.perf_counter() - start + batch_seconds.get(target.name, 0.0)
        if hessian is not None:
            outcome.errors[target.name] = relative_output_error(before, target.weight, hessian)
    split.share(state, changed, outcome)  # the other processes' results, here
    outcome.changed += sum(changed.values())
    outcome.zeros += sum(int((target.weight == 0).sum()) for target in targets)
    outcome.numel += sum(target.numel for target in targets)


class BlockHandler:
    """What the engine calls around each block. This default keeps the whole model in memory;
    a stage step passes one that streams blocks from disk and checkpoints each finished block
    (compress/resume.py)."""

    def resume(self, outcomes: list[StageOutcome], state: CompressionState) -> tuple[int, list[torch.Tensor] | None]:
        """(first block to run, hidden states at its input or None); restores `outcomes` and
        `state` of the blocks before it."""
        return 0, None

    def fetch(self, index: int) -> None:
        """Make block `index`'s weights present before the engine touches it."""

    def finish(self, index: int, inputs: list[BlockInputs], outcomes: list[StageOutcome], state: CompressionState) -> None:
        """Block `index` is done; `inputs` now feed block index + 1."""


def run_layerwise(
    model: nn.Module,
    layout: ModelLayout,
    stages: list[PlannedStage],
    state: CompressionState,
    batches: list[torch.Tensor],
    device: torch.device,
    measure_error: bool = False,
    handler: BlockHandler | None = None,
    forward_group: int | None = None,
) -> RunOutcome:
    """Run the stages block by block on calibration token batches (see the module docstring).
    `measure_error`: also gather X^T X for every target and record each one's relative output error.
    `handler`: where blocks come from and go (default: all in memory); every block passes through
    it, those after the last target's too, so a streamed checkpoint is written whole. `forward_group`: batches
    a forward takes (default: compress.calibration.forward_batches.forward_group)."""
    handler = handler or BlockHandler()
    if world_size() > 1 and any(stage.model_statistics is not None for stage in stages):
        names = ", ".join(stage.method.name for stage in stages if stage.model_statistics is not None)
        raise CompressError(f"{names}: whole-model statistics (a gradient pass) are not summed over processes yet: run it in one process")
    outcomes = [StageOutcome() for _ in stages]
    run = RunOutcome(outcomes)
    per_stage_block = [layout.by_block(stage.targets) for stage in stages]
    used_blocks = [i for i in range(len(layout.blocks)) if any(blocks[i] for blocks in per_stage_block)]
    needs_data = bool(used_blocks) and (measure_error or any(stage.method.statistics for stage in stages))
    context = BlockContext(
        layout=layout, stages=stages, per_stage_block=per_stage_block, outcomes=outcomes, state=state, device=device,
        needs_data=needs_data, measure_error=measure_error, last_block=used_blocks[-1] if used_blocks else -1,
        sequences=total_over_processes(sum(batch.shape[0] for batch in batches)),
        wanted=[tuple(name for name in dict.fromkeys((*stage.method.statistics, *(("hessian",) if measure_error else ())))
                      if name in STATISTICS) for stage in stages],
        forward_group=forward_group,
    )
    if needs_data:
        start = time.perf_counter()
        context.inputs = capture_block_inputs(model, layout, batches, device)  # also on resume: the other arguments
        run.forward_seconds += time.perf_counter() - start
    first, hidden = handler.resume(outcomes, state)
    if hidden is not None:
        for item, saved in zip(context.inputs, hidden, strict=True):
            item.hidden = saved.to(item.hidden.device, item.hidden.dtype)
    # blocks from the default handler are all in memory already, so the next one can be uploaded early, and
    # nobody reads a finished one before the pass ends, so it can go home in the background
    look_ahead = type(handler) is BlockHandler
    context.placement = BlockPlacement(layout.blocks, device, moves=needs_data, write_behind=look_ahead)
    progress = bar(total=len(layout.blocks), initial=first, desc=" + ".join(s.label or s.method.name for s in stages), unit="block")
    try:
        with torch.no_grad():
            for index in range(first, len(layout.blocks)):
                handler.fetch(index)
                if index <= context.last_block:
                    if look_ahead and index < context.last_block:
                        context.placement.prefetch(index + 1)
                    run.forward_seconds += _compress_block(index, context)
                handler.finish(index, context.inputs, outcomes, state)
                progress.update(1)
    finally:
        context.placement.close()
        progress.close()
    run.placement = context.placement.mode  # known once the blocks were seen (a streamed one is read when its turn comes)
    run.forward_group = context.forward_group or 1
    return run


@dataclass
class BlockContext:
    """What every block of one layer-wise pass shares."""

    layout: ModelLayout
    stages: list[PlannedStage]
    per_stage_block: list[list[list[Target]]]  # [stage][block] -> its targets there
    wanted: list[tuple[str, ...]]  # per stage, the hook statistics to gather
    outcomes: list[StageOutcome]
    state: CompressionState
    device: torch.device
    needs_data: bool  # some stage gathers statistics (or errors are measured): blocks run on calibration data
    measure_error: bool
    last_block: int  # the last block holding a target; later blocks are only passed through
    sequences: int  # calibration sequences in all
    inputs: list[BlockInputs] = field(default_factory=list)  # the current block's calibration inputs
    placement: BlockPlacement | None = None
    forward_group: int | None = None  # batches a forward takes; None: chosen at the first block that runs on data

    @property
    def keeps_originals(self) -> bool:
        return any(stage.method.refines_mask for stage in self.stages)


def _compress_block(index: int, ctx: BlockContext) -> float:
    """Every stage's targets in block `index`, then (if a later block needs them) its outputs; returns
    the seconds that last forward pass took."""
    block = ctx.placement.fetch(index)
    if ctx.forward_group is None and ctx.needs_data:  # measured with the first statistics hooks that will run
        ctx.forward_group = block_group(block, ctx.inputs, ctx.device, *next(
            ((blocks[index], names) for blocks, names in zip(ctx.per_stage_block, ctx.wanted) if blocks[index] and names), ([], ())))
    # a refining stage (DSnoT) needs the weights from before the first stage: one block's worth
    originals = {}
    if ctx.keeps_originals:
        originals = {
            t.name: t.weight.clone() if stage.reference is None else stage.reference[t.name]
            for stage, blocks in zip(ctx.stages, ctx.per_stage_block)
            if stage.method.refines_mask
            for t in blocks[index]
        }
    for stage, outcome, blocks, names in zip(ctx.stages, ctx.outcomes, ctx.per_stage_block, ctx.wanted):
        targets = blocks[index]
        if not targets:
            continue
        start = time.perf_counter()
        statistics: dict[str, dict[str, torch.Tensor]] = {}
        if names:
            with gather(targets, names) as collected:
                run_block(block, ctx.inputs, ctx.forward_group or 1)
            # a data-parallel run: the sums of every process's batches (no-op in one process), all of them before any
            # is read (a sibling reading a shared input takes its statistics from the target that gathered them)
            for target in targets:
                collected[target.name].sum_over_processes()
            for target in targets:
                gathered = collected[target.name]
                outcome.tokens[target.name] = gathered.tokens
                if gathered.tokens == 0:
                    outcome.no_tokens.append(target.name)
                    continue
                statistics[target.name] = {**gathered.values(), "tokens_per_sequence": torch.tensor(gathered.tokens / ctx.sequences)}
            del collected
        if stage.model_statistics is not None:
            for target in targets:
                statistics.setdefault(target.name, {}).update(stage.model_statistics.get(target.name, {}))
        _compress_targets(stage, targets, statistics, ctx.state, originals, outcome, ctx.measure_error)
        outcome.seconds += time.perf_counter() - start
    del originals
    start = time.perf_counter()
    if ctx.needs_data and index < ctx.last_block:
        block_outputs(block, ctx.inputs, ctx.forward_group or 1)
    ctx.placement.release(index)
    return time.perf_counter() - start
