"""Statistics of the whole model rather than of a block's inputs: they need the loss, so gradients
through every block (the Fisher diagonal, compress/calibration/fisher.py). The stage step computes
the ones its method names before the block-wise pass, puts them on a shelf on disk, and the engine
reads one target's at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from compress.calibration.fisher import fisher_diagonal
from compress.calibration.shelf import TensorShelf
from compress.model.targets import Target


@dataclass(frozen=True)
class ModelStatistic:
    """compute(model, targets, batches, device) -> {target name: value}; `kinds`: the model kinds it
    exists for (an encoder has no LM loss: a method asking for the Fisher there falls back)."""

    compute: Callable[[nn.Module, list[Target], list[torch.Tensor], torch.device], dict[str, torch.Tensor]]
    kinds: tuple[str, ...]


def _fisher(model: nn.Module, targets: list[Target], batches: list[torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return fisher_diagonal(model, targets, batches, device, return_model=False)


MODEL_STATISTICS: dict[str, ModelStatistic] = {"fisher": ModelStatistic(_fisher, kinds=("causal",))}


class ShelvedStatistics(Mapping):
    """{target name: {statistic: tensor}} over shelves of one statistic each, read when asked for."""

    def __init__(self, shelves: dict[str, TensorShelf]) -> None:
        self.shelves = shelves

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        found = {statistic: shelf[name] for statistic, shelf in self.shelves.items() if name in shelf}
        if not found:
            raise KeyError(name)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(name for shelf in self.shelves.values() for name in shelf))

    def __len__(self) -> int:
        return sum(1 for _ in self)
