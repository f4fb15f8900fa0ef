"""The layer-wise engine: runs a recipe's stages over the model's blocks one block at a time.

As the Wanda/SparseGPT references do: the calibration batches are captured at the input of block 0;
for block i, each stage in turn gathers its targets' statistics on a forward pass through the block
as it stands (hooks), then compresses those targets; a last forward pass through the compressed block
gives the inputs of block i+1. So every stage sees, at every block, the inputs the fully compressed
model will give it, and a stage that refines an earlier one (DSnoT after Wanda) sees that stage's
result on the same block. Only the current block needs to sit on the accelerator; the rest of the
model stays where it was loaded (the embeddings and other small modules outside the blocks move with
the inputs).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.methods.base import Method
from compress.state import CompressionState
from compress.calibration.statistics import MODEL_STATISTICS, gather
from compress.model.targets import ModelLayout, Target


@dataclass
class BlockInputs:
    """One calibration batch at a block's input: the hidden states and the other arguments."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Stage:
    """One recipe stage as the engine runs it: a method and the targets it compresses."""

    method: Method
    targets: list[Target]
    label: str = ""
    # For a stage that refines a mask (DSnoT): the weights before the pruning stage it refines, by
    # target name. Without it, the weights as they stand before the first stage of this pass.
    reference: dict[str, torch.Tensor] | None = None
    refines: int | None = None  # index (in the recipe) of the pruning stage whose mask this one refines
    # statistics of the whole model the method names (compress.calibration.statistics.MODEL_STATISTICS), by
    # target name, computed before the pass
    model_statistics: Mapping[str, dict[str, torch.Tensor]] | None = None


@dataclass
class StageOutcome:
    seconds: float = 0.0  # the stage's own statistics passes and compression
    tokens: dict[str, int] = field(default_factory=dict)  # calibration tokens that reached each target
    no_tokens: list[str] = field(default_factory=list)  # targets (experts) no token reached: method fell back
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


class _StopForward(Exception):
    pass


@contextmanager
def _blocks_replaced(model: nn.Module, layout: ModelLayout, stand_in: nn.ModuleList) -> Iterator[None]:
    parent_path, _, leaf = layout.blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, stand_in)
    try:
        yield
    finally:
        setattr(parent, leaf, layout.blocks)


class _Catcher(nn.Module):
    """Stands in for block 0 during the capture: records its inputs and stops the forward pass."""

    def __init__(self, block: nn.Module, captured: list[BlockInputs]) -> None:
        super().__init__()
        self.captured = captured
        for name in ("attention_type", "is_sliding", "layer_idx"):  # read by some models' forward
            if hasattr(block, name):
                setattr(self, name, getattr(block, name))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        self.captured.append(BlockInputs(hidden.detach(), tuple(args[1:]), kwargs))
        raise _StopForward


def capture_block_inputs(
    model: nn.Module, layout: ModelLayout, batches: list[torch.Tensor], device: torch.device
) -> list[BlockInputs]:
    """Run the model up to block 0 on each batch of token ids and keep what block 0 receives.

    The blocks are swapped out for the capture, so only the modules outside them (embeddings,
    rotary tables) move to `device`, and back afterwards.
    """
    captured: list[BlockInputs] = []
    home = next(p for p in model.parameters() if not p.is_meta).device
    stand_in = nn.ModuleList([_Catcher(layout.blocks[0], captured)])
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with _blocks_replaced(model, layout, stand_in), torch.no_grad():
        _move_loaded(model, device)
        try:
            for batch in batches:
                batch = batch.to(device)
                try:
                    model(input_ids=batch, attention_mask=torch.ones_like(batch), **extra)
                except _StopForward:
                    pass
        finally:
            _move_loaded(model, home)
    return captured


def _move_loaded(model: nn.Module, device: torch.device) -> None:
    """model.to(device) for the tensors that are loaded; a streamed model's unread ones (an untied
    head, compress/streaming.py) stay on meta."""
    model._apply(lambda tensor: tensor if tensor.is_meta else tensor.to(device))


def _run_block(block: nn.Module, inputs: list[BlockInputs]) -> None:
    for item in inputs:
        block(item.hidden, *item.args, **item.kwargs)


def _block_outputs(block: nn.Module, inputs: list[BlockInputs]) -> None:
    """Replace each batch's hidden states by the block's output (the next block's input)."""
    for item in inputs:
        out = block(item.hidden, *item.args, **item.kwargs)
        item.hidden = out[0] if isinstance(out, (tuple, list)) else out


def _fingerprint(weight: torch.Tensor) -> tuple[int, float]:
    return int((weight == 0).sum()), float(weight.float().pow(2).sum())


def apply_to_target(
    method: Method,
    target: Target,
    statistics: dict[str, torch.Tensor],
    state: CompressionState,
    dense: torch.Tensor | None = None,
) -> bool:
    """Apply the method's pure core to one target and record its mask in the state; True if the
    target's weights changed."""
    previous = state.mask(target.name)
    weight = target.weight
    before = _fingerprint(weight)
    previous = None if previous is None else previous.to(weight.device)
    dense = None if dense is None else dense.to(weight.device, torch.float32)
    result = method.compress_target(weight.float(), statistics, previous, dense)
    weight.copy_(result.weight.to(weight.dtype))
    entry = state.get(target.name)
    if result.mask is not None:
        entry.mask = result.mask.cpu()
    entry.quantized = None if result.quantized is None else result.quantized.to("cpu")  # a later stage's change voids it
    entry.stages.append(method.name)
    return _fingerprint(weight) != before


def relative_output_error(before: torch.Tensor, after: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - W')X||^2 / ||WX||^2 from H = X^T X: tr(D H D^T) / tr(W H W^T), D = W - W'."""
    delta = after.float() - before.float()
    reference = float(((before.float() @ hessian) * before.float()).sum())
    return float(((delta @ hessian) * delta).sum()) / reference if reference > 0 else 0.0


def _compress_targets(
    stage: Stage,
    targets: list[Target],
    statistics: dict[str, dict[str, torch.Tensor]],
    state: CompressionState,
    originals: dict[str, torch.Tensor],
    outcome: StageOutcome,
    measure_error: bool,
) -> None:
    for target in targets:
        dense = originals.get(target.name) if stage.method.refines_mask else None
        stats = statistics.get(target.name, {})
        hessian = stats.get("hessian") if measure_error else None
        if hessian is not None and "hessian" in stage.method.statistics:
            hessian = hessian.clone()  # the method may damp it in place
        before = target.weight.float().clone() if hessian is not None else None
        start = time.perf_counter()
        outcome.changed += apply_to_target(stage.method, target, stats, state, dense)
        outcome.target_seconds[target.name] = time.perf_counter() - start
        if hessian is not None:
            outcome.errors[target.name] = relative_output_error(before, target.weight, hessian)
        outcome.zeros += int((target.weight == 0).sum())
        outcome.numel += target.numel


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
    stages: list[Stage],
    state: CompressionState,
    batches: list[torch.Tensor],
    device: torch.device,
    measure_error: bool = False,
    handler: BlockHandler | None = None,
) -> RunOutcome:
    """Run the stages block by block on calibration token batches (see the module docstring).
    `measure_error`: also gather X^T X for every target and record each one's relative output error.
    `handler`: where blocks come from and go (default: all in memory); every block passes through
    it, those after the last target's too, so a streamed checkpoint is written whole."""
    handler = handler or BlockHandler()
    outcomes = [StageOutcome() for _ in stages]
    run = RunOutcome(outcomes)
    per_stage_block = [layout.by_block(stage.targets) for stage in stages]
    used_blocks = [i for i in range(len(layout.blocks)) if any(blocks[i] for blocks in per_stage_block)]
    last_block = used_blocks[-1] if used_blocks else -1
    needs_data = bool(used_blocks) and (measure_error or any(stage.method.statistics for stage in stages))
    wanted = [tuple(name for name in dict.fromkeys((*stage.method.statistics, *(("hessian",) if measure_error else ())))
                    if name not in MODEL_STATISTICS) for stage in stages]
    keep_originals = any(stage.method.refines_mask for stage in stages)
    sequences = sum(batch.shape[0] for batch in batches)

    inputs: list[BlockInputs] = []
    if needs_data:
        start = time.perf_counter()
        inputs = capture_block_inputs(model, layout, batches, device)  # also on resume: the other arguments
        run.forward_seconds += time.perf_counter() - start
    first, hidden = handler.resume(outcomes, state)
    if hidden is not None:
        for item, saved in zip(inputs, hidden, strict=True):
            item.hidden = saved.to(item.hidden.device, item.hidden.dtype)
    progress = tqdm(total=len(layout.blocks), initial=first, desc=" + ".join(s.label or s.method.name for s in stages), unit="block", leave=False)
    with torch.no_grad():
        for index in range(first, len(layout.blocks)):
            handler.fetch(index)
            if index <= last_block:
                run.forward_seconds += _compress_block(index, layout, stages, per_stage_block, wanted, outcomes, state, inputs,
                                                       device, needs_data, keep_originals, sequences, measure_error, last_block)
            handler.finish(index, inputs, outcomes, state)
            progress.update(1)
    progress.close()
    return run


def _compress_block(
    index: int, layout: ModelLayout, stages: list[Stage], per_stage_block: list[list[list[Target]]],
    wanted: list[tuple[str, ...]], outcomes: list[StageOutcome], state: CompressionState, inputs: list[BlockInputs],
    device: torch.device, needs_data: bool, keep_originals: bool, sequences: int, measure_error: bool, last_block: int,
) -> float:
    """Every stage's targets in block `index`, then (if a later block needs them) its outputs; returns
    the seconds that last forward pass took."""
    home = next(layout.blocks[index].parameters()).device
    block = layout.blocks[index].to(device) if needs_data else layout.blocks[index]
    # a refining stage (DSnoT) needs the weights from before the first stage: one block's worth
    originals = {}
    if keep_originals:
        originals = {
            t.name: t.weight.clone() if stage.reference is None else stage.reference[t.name]
            for stage, blocks in zip(stages, per_stage_block)
            if stage.method.refines_mask
            for t in blocks[index]
        }
    for stage, outcome, blocks, names in zip(stages, outcomes, per_stage_block, wanted):
        targets = blocks[index]
        if not targets:
            continue
        start = time.perf_counter()
        statistics: dict[str, dict[str, torch.Tensor]] = {}
        if names:
            with gather(targets, names) as collected:
                _run_block(block, inputs)
            for target in targets:
                gathered = collected[target.name]
                outcome.tokens[target.name] = gathered.tokens
                if gathered.tokens == 0:
                    outcome.no_tokens.append(target.name)
                    continue
                statistics[target.name] = {**gathered.values(), "tokens_per_sequence": torch.tensor(gathered.tokens / sequences)}
            del collected
        if stage.model_statistics is not None:
            for target in targets:
                statistics.setdefault(target.name, {}).update(stage.model_statistics.get(target.name, {}))
        _compress_targets(stage, targets, statistics, state, originals, outcome, measure_error)
        outcome.seconds += time.perf_counter() - start
    del originals
    start = time.perf_counter()
    if needs_data and index < last_block:
        _block_outputs(block, inputs)
    if needs_data:
        layout.blocks[index].to(home)
    return time.perf_counter() - start
