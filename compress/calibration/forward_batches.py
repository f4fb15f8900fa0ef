"""Calibration batches joined into larger forward passes through a block.

The engine keeps the calibration data as the batches it was given (resume checkpoints and data-parallel runs
count them by number), but a GPU runs a block faster on fewer, larger batches: fewer kernel launches and hook
calls, each statistic folded in once per forward. So a forward may take `group` batches at once: their hidden
states are concatenated, their other arguments joined (a per-sequence tensor concatenated, a shared one taken
once) and the output is split back into the batches. The statistics are sums over tokens, so they do not
depend on how tokens are grouped (up to float summation order).

`forward_group` chooses the group on a GPU: small batches are joined until a forward holds ENOUGH_TOKENS
tokens, as far as they fit in half of the memory free after a measured forward of one batch. Larger forwards
gain nothing measurable and cost memory (see ENOUGH_TOKENS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compress.calibration.capture import BlockInputs
from compress.calibration.statistics import gather
from compress.model.targets import Target


class _CannotJoin(Exception):
    pass


def _join_values(values: list[Any], batch_sizes: list[int]) -> Any:
    """One argument of several batches as one: a tensor with a leading batch dimension (and at least one more)
    concatenated, anything else the same in every batch and taken once."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if all(isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[0] == b for v, b in zip(values, batch_sizes, strict=True)):
            return torch.cat(values)
        if all(v is first or (isinstance(v, torch.Tensor) and v.shape == first.shape and torch.equal(v, first)) for v in values):
            return first
        raise _CannotJoin
    if isinstance(first, (tuple, list)) and all(isinstance(v, type(first)) and len(v) == len(first) for v in values):
        return type(first)(_join_values([v[i] for v in values], batch_sizes) for i in range(len(first)))
    if all(v is first or v == first for v in values):
        return first
    raise _CannotJoin


def join(items: list[BlockInputs]) -> BlockInputs | None:
    """The batches as one (None where an argument differs between them in a way that cannot be joined)."""
    if len(items) == 1:
        return items[0]
    sizes = [item.hidden.shape[0] for item in items]
    try:
        args = _join_values([item.args for item in items], sizes)
        keys = items[0].kwargs.keys()
        if any(item.kwargs.keys() != keys for item in items):
            raise _CannotJoin
        kwargs = {key: _join_values([item.kwargs[key] for item in items], sizes) for key in keys}
    except _CannotJoin:
        return None
    return BlockInputs(torch.cat([item.hidden for item in items]), args, kwargs)


def _forwards(block: nn.Module, inputs: list[BlockInputs], group: int, keep: Callable[[list[BlockInputs], torch.Tensor], None] | None) -> None:
    for start in range(0, len(inputs), group):
        items = inputs[start : start + group]
        joined = join(items)
        for members, given in [(items, joined)] if joined is not None else [([item], item) for item in items]:
            out = block(given.hidden, *given.args, **given.kwargs)
            if keep is not None:
                keep(members, out[0] if isinstance(out, (tuple, list)) else out)


def run_block(block: nn.Module, inputs: list[BlockInputs], group: int = 1) -> None:
    """The block on every batch (for the hooks gathering statistics), `group` batches a forward."""
    _forwards(block, inputs, group, None)


def block_outputs(block: nn.Module, inputs: list[BlockInputs], group: int = 1) -> None:
    """Replace each batch's hidden states by the block's output (the next block's input)."""

    def keep(members: list[BlockInputs], output: torch.Tensor) -> None:
        for item, part in zip(members, output.split([m.hidden.shape[0] for m in members]), strict=True):
            item.hidden = part

    _forwards(block, inputs, group, keep)


# Tokens a forward needs to keep a large GPU busy: at LLaMA-7B's shape on an H200, Wanda with its 16 batches of
# 8 x 2048 joined into one forward took 19.8 s against 18.7 s one batch at a time, and 38 GiB against 5.4.
ENOUGH_TOKENS = 16384


def forward_group(one_forward: Callable[[], None], batches: int, tokens_per_batch: int, device: torch.device, budget: float = 0.5) -> int:
    """How many batches a forward takes: on CUDA, enough for ENOUGH_TOKENS tokens, as far as they fit in `budget`
    of the memory free after `one_forward()` (a forward of one batch, with whatever hooks the real ones carry),
    measured by its peak; elsewhere 1 (a CPU gains nothing from larger batches and its memory is the host's)."""
    wanted = min(batches, -(-ENOUGH_TOKENS // max(tokens_per_batch, 1)))
    if device.type != "cuda" or wanted <= 1:
        return 1
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    one_forward()
    torch.cuda.synchronize(device)
    per_batch = max(torch.cuda.max_memory_allocated(device) - before, 1)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch, free to it
    return max(1, min(wanted, int(budget * free // per_batch)))


def block_group(block: nn.Module, inputs: list[BlockInputs], device: torch.device, targets: list[Target], names: tuple[str, ...]) -> int:
    """`forward_group` for this block's forwards, measured on its first batch with the statistics hooks of
    `targets` (whose sums are dropped) when there are any."""

    def one_forward() -> None:
        if targets and names:
            with gather(targets, names):
                run_block(block, inputs[:1])
        else:
            run_block(block, inputs[:1])

    return forward_group(one_forward, len(inputs), inputs[0].hidden.shape[:-1].numel(), device)
