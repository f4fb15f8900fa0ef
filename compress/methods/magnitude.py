"""Magnitude pruning: the baseline. Score |W|, compared across the whole layer (unstructured) as in
the Wanda reference's `prune_magnitude`, or within each N:M group. Needs no calibration data."""

from __future__ import annotations

import torch

from compress.methods.base import TargetResult
from compress.methods.registry import register
from compress.methods.sparsity import PruningMethod, PruningParams, prune_mask


@register
class Magnitude(PruningMethod):
    name = "magnitude"
    Params = PruningParams
    statistics = ()

    def compress_target(
        self,
        weight: torch.Tensor,
        statistics: dict[str, torch.Tensor],
        mask: torch.Tensor | None,
        dense: torch.Tensor | None = None,
    ) -> TargetResult:
        keep = prune_mask(weight.abs(), self.params.sparsity, self.params.pattern, mask, scope="layer")
        return TargetResult(weight=weight * keep, mask=keep)
