"""The layer-wise engine: runs a method over the model's blocks one at a time.

As the Wanda/SparseGPT references do: the calibration batches are captured at the input of block 0;
for block i, hooks gather each target's statistics on a forward pass, the method compresses every
target of the block, and a second forward pass through the compressed block gives the inputs of
block i+1. Only the current block needs to sit on the accelerator; the rest of the model stays where
it was loaded (the embeddings and other small modules outside the blocks move with the inputs).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.methods.base import Method
from compress.state import CompressionState
from compress.statistics import gather
from compress.targets import ModelLayout, Target


@dataclass
class BlockInputs:
    """One calibration batch at a block's input: the hidden states and the other arguments."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class StageOutcome:
    seconds: float
    tokens: dict[str, int] = field(default_factory=dict)  # calibration tokens that reached each target
    no_tokens: list[str] = field(default_factory=list)  # targets (experts) no token reached: method fell back


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
    home = next(model.parameters()).device
    stand_in = nn.ModuleList([_Catcher(layout.blocks[0], captured)])
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with _blocks_replaced(model, layout, stand_in), torch.no_grad():
        model.to(device)
        try:
            for batch in batches:
                batch = batch.to(device)
                try:
                    model(input_ids=batch, attention_mask=torch.ones_like(batch), **extra)
                except _StopForward:
                    pass
        finally:
            model.to(home)
    return captured


def _run_block(block: nn.Module, inputs: list[BlockInputs]) -> None:
    for item in inputs:
        block(item.hidden, *item.args, **item.kwargs)


def _block_outputs(block: nn.Module, inputs: list[BlockInputs]) -> None:
    """Replace each batch's hidden states by the block's output (the next block's input)."""
    for item in inputs:
        out = block(item.hidden, *item.args, **item.kwargs)
        item.hidden = out[0] if isinstance(out, (tuple, list)) else out


def apply_to_target(method: Method, target: Target, statistics: dict[str, torch.Tensor], state: CompressionState) -> None:
    """Apply the method's pure core to one target and record its mask in the state."""
    previous = state.mask(target.name)
    weight = target.weight
    previous = None if previous is None else previous.to(weight.device)
    result = method.compress_target(weight.float(), statistics, previous)
    weight.copy_(result.weight.to(weight.dtype))
    entry = state.get(target.name)
    if result.mask is not None:
        entry.mask = result.mask.cpu()
    entry.stages.append(method.name)


def run_layerwise(
    model: nn.Module,
    layout: ModelLayout,
    targets: list[Target],
    method: Method,
    state: CompressionState,
    batches: list[torch.Tensor],
    device: torch.device,
    label: str = "",
) -> StageOutcome:
    """Compress `targets` with `method`, block by block, on calibration token batches."""
    start = time.perf_counter()
    outcome = StageOutcome(seconds=0.0)
    per_block = layout.by_block(targets)
    if not method.statistics:  # data-free method (magnitude): no forward pass needed
        with torch.no_grad():
            for target in tqdm(targets, desc=label or method.name, unit="target", leave=False):
                apply_to_target(method, target, {}, state)
        outcome.seconds = time.perf_counter() - start
        return outcome

    inputs = capture_block_inputs(model, layout, batches, device)
    last_block = max(i for i, block_targets in enumerate(per_block) if block_targets)
    home = next(layout.blocks.parameters()).device
    progress = tqdm(total=last_block + 1, desc=label or method.name, unit="block", leave=False)
    with torch.no_grad():
        for index in range(last_block + 1):
            block = layout.blocks[index].to(device)
            block_targets = per_block[index]
            if block_targets:
                with gather(block_targets, method.statistics) as collected:
                    _run_block(block, inputs)
                for target in block_targets:
                    stats = collected[target.name]
                    outcome.tokens[target.name] = stats.tokens
                    if stats.tokens == 0:
                        outcome.no_tokens.append(target.name)
                    apply_to_target(method, target, stats.values(), state)
                del collected
            if index < last_block:
                _block_outputs(block, inputs)
            layout.blocks[index].to(home)
            progress.update(1)
    progress.close()
    outcome.seconds = time.perf_counter() - start
    return outcome
