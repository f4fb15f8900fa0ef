"""Calibration activations at a block's input: the model runs up to block 0 on each batch (the
blocks swapped for a stand-in that records what it receives and stops the pass), and each finished
block's outputs become the next block's inputs."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.calibration.placement import module_tensors, point_at
from compress.model.targets import ModelLayout


@dataclass
class BlockInputs:
    """One calibration batch at a block's input: the hidden states and the other arguments."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


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
    rotary tables) move to `device`; afterwards they point at their own tensors again (nothing is
    copied back: the capture changes none, and a copy into fresh host memory is slow).
    """
    captured: list[BlockInputs] = []
    stand_in = nn.ModuleList([_Catcher(layout.blocks[0], captured)])
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with _blocks_replaced(model, layout, stand_in), torch.no_grad():
        home_tensors = module_tensors(model)
        move_loaded(model, device)
        try:
            for batch in batches:
                batch = batch.to(device)
                try:
                    model(input_ids=batch, attention_mask=torch.ones_like(batch), **extra)
                except _StopForward:
                    pass
        finally:
            point_at(model, home_tensors)
    return captured


def move_loaded(model: nn.Module, device: torch.device) -> None:
    """model.to(device) for the tensors that are loaded; a streamed model's unread ones (an untied
    head, compress/streaming.py) stay on meta."""
    model._apply(lambda tensor: tensor if tensor.is_meta else tensor.to(device))
