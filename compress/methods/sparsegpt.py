"""SparseGPT (Frantar & Alistarh 2023, reference IST-DASLab/sparsegpt): prune with the layer's
Hessian and reconstruct the kept weights so the layer's output on the calibration data moves least.

The mask is chosen by the OBS saliency w^2 / [H^-1]_jj^2 ("adaptive mask selection"): for
unstructured sparsity, the lowest `sparsity` of each block of `block_size` columns, chosen when the
sweep reaches that block (so it sees the updates of the blocks before); for N:M, the M-N lowest of each
group of M columns, chosen when the sweep reaches the group. Pruned weights become zero and their
error is compensated on the columns not yet fixed (the shared OBS sweep, `compress.methods.obs`).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from compress.methods.base import TargetResult, joint_mask, row_slices
from compress.methods.magnitude import Magnitude
from compress.methods.obs import HessianNotPositiveDefinite, hessian_or_identity, inverse_hessian_factor, obs_flops, obs_sweep
from compress.methods.registry import register
from compress.methods.sparsity import NM, PruningMethod, PruningParams, parse_pattern, prune_mask
from compress.model.targets import Target


class SparseGPTParams(PruningParams):
    """Defaults as the reference: blocks of 128 columns, damping 1% of the mean Hessian diagonal."""

    block_size: int = Field(default=128, gt=0)
    damp: float = Field(default=0.01, gt=0, lt=1)

    @model_validator(mode="after")
    def _groups_fit_blocks(self) -> SparseGPTParams:
        group = parse_pattern(self.pattern)
        if group is not None and self.block_size % group.m:
            raise ValueError(f"block_size {self.block_size} must be a multiple of M={group.m} of pattern {self.pattern}")
        return self


class _SparseGPTRule:
    """Chooses the mask of each block (unstructured) or group (N:M) as the sweep reaches it."""

    def __init__(self, sparsity: float, pattern: str, previous_mask: torch.Tensor | None, shape: torch.Size, device: torch.device,
                 targets: list[slice] | None = None) -> None:
        self.sparsity = sparsity
        self.targets = targets or [slice(None)]  # the rows of each target (siblings swept together): each its own unstructured choice
        self.pattern = pattern
        self.group: NM | None = parse_pattern(pattern)
        self.previous = previous_mask
        self.keep = torch.ones(shape, dtype=torch.bool, device=device)

    def _previous(self, start: int, end: int) -> torch.Tensor | None:
        return None if self.previous is None else self.previous[:, start:end]

    def begin_block(self, start: int, block: torch.Tensor, hinv_block: torch.Tensor) -> None:
        if self.group is None:
            end = start + block.shape[1]
            saliency = block.pow(2) / torch.diag(hinv_block).pow(2).unsqueeze(0)
            previous = self._previous(start, end)
            for rows in self.targets:
                self.keep[rows, start:end] = prune_mask(saliency[rows], self.sparsity, "unstructured",
                                                        None if previous is None else previous[rows], scope="layer")

    def column(self, start: int, j: int, block: torch.Tensor, hinv_block: torch.Tensor) -> torch.Tensor:
        if self.group is not None and j % self.group.m == 0:
            m = self.group.m
            saliency = block[:, j : j + m].pow(2) / torch.diag(hinv_block)[j : j + m].pow(2).unsqueeze(0)
            at = start + j
            self.keep[:, at : at + m] = prune_mask(saliency, self.sparsity, self.pattern, self._previous(at, at + m))
        return block[:, j] * self.keep[:, start + j]

    def fused_spec(self, start: int, block: torch.Tensor) -> dict | None:
        """The block for obs_fused (a previous mask to respect: the column loop)."""
        width = block.shape[1]
        if self.previous is not None or (self.group is not None and width % self.group.m):
            return None
        if self.group is None:
            return dict(mode="keep", keep=self.keep[:, start : start + width])
        return dict(mode="nm", n=self.group.n, m=self.group.m)

    def fused_result(self, start: int, spec: dict) -> None:
        if spec["mode"] == "nm":
            self.keep[:, start : start + spec["keep"].shape[1]] = spec["keep"]


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    previous_mask: torch.Tensor | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    targets: list[slice] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned and reconstructed weight, keep mask) for one [out, in] weight and its Hessian X^T X.
    `targets`: the rows of each target when siblings' weights are swept together (concatenated rows):
    an unstructured block's mask is chosen within each target's rows, as its own sweep would."""
    pruned = weight.float().clone()
    inverse = inverse_hessian_factor(hessian, damp)
    rule = _SparseGPTRule(sparsity, pattern, previous_mask, pruned.shape, pruned.device, targets)
    obs_sweep(pruned, inverse, rule, block_size)
    return pruned * rule.keep, rule.keep


@register
class SparseGPT(PruningMethod):
    name = "sparsegpt"
    Params = SparseGPTParams
    statistics = ("hessian",)

    def flops(self, target: Target, tokens: int) -> float:
        return obs_flops(target.out_features, target.in_features)

    def compress_target(
        self,
        weight: torch.Tensor,
        statistics: dict[str, torch.Tensor],
        mask: torch.Tensor | None,
        dense: torch.Tensor | None = None,
    ) -> TargetResult:
        hessian = hessian_or_identity(statistics, weight)
        params = self.params
        try:
            pruned, keep = sparsegpt_prune(weight, hessian, params.sparsity, params.pattern, mask, params.block_size, params.damp)
        except HessianNotPositiveDefinite as error:  # magnitude pruning, same pattern and sparsity (prune_mask)
            result = Magnitude(params).compress_target(weight, {}, mask)
            result.fallback = f"magnitude pruning ({error})"
            return result
        return TargetResult(weight=pruned, mask=keep)

    def compress_siblings(self, weights: list[torch.Tensor], statistics: dict[str, torch.Tensor], masks: list[torch.Tensor | None]
                          ) -> list[TargetResult] | None:
        """One sweep over the siblings' rows concatenated (one factorization of their shared Hessian); each
        target's mask is chosen within its own rows, so the result is its own sweep's up to summation order."""
        p = self.params
        targets = row_slices(weights)
        try:
            pruned, keep = sparsegpt_prune(torch.cat(weights), hessian_or_identity(statistics, weights[0]), p.sparsity, p.pattern,
                                           joint_mask(weights, masks), p.block_size, p.damp, targets)
        except HessianNotPositiveDefinite:
            return None  # one by one: each falls back as compress_target does
        return [TargetResult(weight=pruned[rows], mask=keep[rows]) for rows in targets]
