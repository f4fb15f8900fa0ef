"""Wanda (Sun et al. 2023, reference locuslab/wanda): prune by |W_ij| * ||X_j||_2, compared within
each output row (unstructured) or within each group of M consecutive input weights (N:M)."""

from __future__ import annotations

import torch

from compress.methods.base import TargetResult
from compress.methods.registry import register
from compress.methods.sparsity import PruningMethod, PruningParams, prune_mask


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| scaled by each input feature's L2 norm over the calibration tokens ([out, in])."""
    return weight.abs().float() * input_sq_norm.float().sqrt().unsqueeze(0)


@register
class Wanda(PruningMethod):
    name = "wanda"
    Params = PruningParams
    statistics = ("input_sq_norm",)

    def compress_target(
        self,
        weight: torch.Tensor,
        statistics: dict[str, torch.Tensor],
        mask: torch.Tensor | None,
        dense: torch.Tensor | None = None,
    ) -> TargetResult:
        # An expert that no calibration token reached has no activation norms: rank by |W| within
        # each row instead (the engine lists such targets in the report).
        input_sq_norm = statistics.get("input_sq_norm", torch.ones(weight.shape[1], device=weight.device))
        scores = wanda_scores(weight, input_sq_norm)
        keep = prune_mask(scores, self.params.sparsity, self.params.pattern, mask, scope="row")
        return TargetResult(weight=weight * keep, mask=keep)
