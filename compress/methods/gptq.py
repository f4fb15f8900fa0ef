"""GPTQ (Frantar et al. 2023, reference IST-DASLab/gptq): quantize column by column in the OBS sweep,
spreading each column's rounding error over the columns not yet quantized, with the layer's Hessian.

The grid is the shared min/max grid (`compress.methods.quantization`): per row for per-channel
quantization, fitted once on the whole weight before the sweep (as the reference); for groups, fitted
on a group's columns when the sweep reaches its first column, so it sees the updates made so far.
Weights an earlier stage pruned are set to zero (on the grid) and their error compensated like any
other column's, so masks survive and the rest of the row absorbs the change.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator

from compress.formats.quantized import QuantizedWeight
from compress.methods.base import TargetMethod, TargetResult, joint_mask, row_slices
from compress.methods.obs import HessianNotPositiveDefinite, hessian_or_identity, inverse_hessian_factor, obs_flops, obs_sweep
from compress.methods.quantization import (
    Grid,
    QuantizationParams,
    fit_grid,
    group_bounds,
    packed_weight,
    round_to_grid,
)
from compress.methods.registry import register
from compress.methods.rtn import RTN
from compress.model.targets import Target


class GPTQParams(QuantizationParams):
    """Defaults as the reference: blocks of 128 columns, damping 1% of the mean Hessian diagonal."""

    block_size: int = Field(default=128, gt=0)
    damp: float = Field(default=0.01, gt=0, lt=1)
    act_order: bool = False
    # Fit every group's grid on the weights before the sweep (the reference's --static-groups, and
    # what llm-compressor always does) instead of when the sweep reaches the group.
    static_groups: bool = False

    @model_validator(mode="after")
    def _static_groups_need_column_order(self) -> GPTQParams:
        if self.static_groups and self.act_order:
            raise ValueError("static_groups with act_order is not supported: groups would not be consecutive in sweep order")
        return self


class GPTQRule:
    """Rounds each column to its group's grid (zero where the mask prunes it)."""

    def __init__(
        self, weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, keep: torch.Tensor | None,
        static_groups: bool = False,
    ) -> None:
        self.weight = weight  # the matrix the sweep is fixing (columns after the block: lazy updates so far)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.keep = keep
        self.grid: Grid | None = None if group_size else fit_grid(weight, bits, symmetric)
        self.grids: list[Grid] = [] if group_size else [self.grid]
        self.static: list[Grid] | None = None
        if static_groups and group_size:
            self.static = [fit_grid(weight[:, a:b], bits, symmetric) for a, b in group_bounds(weight.shape[1], group_size)]

    def begin_block(self, start: int, block: torch.Tensor, hinv_block: torch.Tensor) -> None:
        pass

    def column(self, start: int, j: int, block: torch.Tensor, hinv_block: torch.Tensor) -> torch.Tensor:
        at = start + j
        if self.group_size and at % self.group_size == 0 and self.static is not None:
            self.grid = self.static[at // self.group_size]
            self.grids.append(self.grid)
        elif self.group_size and at % self.group_size == 0:
            inside = block[:, j : j + self.group_size]
            beyond = self.group_size - inside.shape[1]
            after_block = start + block.shape[1]
            columns = torch.cat([inside, self.weight[:, after_block : after_block + beyond]], dim=1) if beyond else inside
            self.grid = fit_grid(columns, self.bits, self.symmetric)
            self.grids.append(self.grid)
        value = round_to_grid(block[:, j : j + 1], self.grid).squeeze(1)
        return value if self.keep is None else value * self.keep[:, at]

    def fused_spec(self, start: int, block: torch.Tensor) -> dict | None:
        """The block for obs_fused: its groups must lie inside it (else, and for static groups, the column loop)."""
        width = block.shape[1]
        straddles = self.group_size and (start % self.group_size or (width % self.group_size and start + width < self.weight.shape[1]))
        if self.static is not None or straddles:
            return None
        keep = None if self.keep is None else self.keep[:, start : start + width]
        spec = dict(mode="grid", group=self.group_size or 0, maxq=2**self.bits - 1, symmetric=self.symmetric, keep=keep)
        if not self.group_size:
            spec.update(scale=self.grid.scale, zero=self.grid.zero)
        return spec

    def fused_result(self, start: int, spec: dict) -> None:
        for g in range(spec["scales"].shape[1] if spec["group"] else 0):
            self.grid = Grid(spec["scales"][:, g : g + 1].clone(), spec["zeros"][:, g : g + 1].clone(), 2**self.bits - 1)
            self.grids.append(self.grid)


def gptq_sweep(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None = 128,
    symmetric: bool = False,
    keep: torch.Tensor | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
) -> tuple[torch.Tensor, list[Grid], torch.Tensor | None]:
    """(the quantized weight in sweep order, its grids in that order, the column permutation or None).
    Every row is swept on its own (the grids are per row), so siblings' rows can be swept together.

    act_order: sweep the columns by descending Hessian diagonal (the reference's `--act-order`);
    groups are then consecutive in that order, and the packed form keeps the permutation.
    """
    perm = torch.argsort(torch.diag(hessian), descending=True) if act_order else None
    if perm is not None:
        weight, hessian = weight[:, perm], hessian[perm][:, perm]
        keep = None if keep is None else keep[:, perm]
    quantized = weight.float().clone()
    inverse = inverse_hessian_factor(hessian, damp)
    rule = GPTQRule(quantized, bits, group_size, symmetric, keep, static_groups)
    obs_sweep(quantized, inverse, rule, block_size)
    return quantized, rule.grids, perm


def packed_rows(quantized: torch.Tensor, grids: list[Grid], perm: torch.Tensor | None, rows: slice, bits: int,
                group_size: int | None, keep: torch.Tensor | None) -> QuantizedWeight:
    """The packed form of `rows` of a gptq_sweep result (`keep`: those rows' mask in column order, or None)."""
    if perm is not None and keep is not None:
        keep = keep[:, perm]
    packed = packed_weight(quantized[rows], [Grid(g.scale[rows], g.zero[rows], g.maxq) for g in grids], bits, group_size, keep)
    packed.perm = perm
    return packed


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None = 128, symmetric: bool = False,
    keep: torch.Tensor | None = None, **sweep: Any,
) -> tuple[torch.Tensor, QuantizedWeight]:
    """(quantized [out, in] weight, its packed form) for a weight and its X^T X: gptq_sweep (`sweep`: its block_size,
    damp, act_order, static_groups), then packed."""
    quantized, grids, perm = gptq_sweep(weight, hessian, bits, group_size, symmetric, keep, **sweep)
    packed = packed_rows(quantized, grids, perm, slice(None), bits, group_size, keep)
    return packed.dequantize(), packed


@register
class GPTQ(TargetMethod):
    name = "gptq"
    Params = GPTQParams
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
        p = self.params
        try:
            quantized, packed = gptq_quantize(weight, hessian, p.bits, p.group_size, p.symmetric, mask, block_size=p.block_size,
                                              damp=p.damp, act_order=p.act_order, static_groups=p.static_groups)
        except HessianNotPositiveDefinite as error:  # round to nearest on the same grids, in column order
            result = RTN(p).compress_target(weight, {}, mask)
            result.fallback = f"round-to-nearest ({error})"
            return result
        return TargetResult(weight=quantized, mask=mask, quantized=packed)

    def compress_siblings(self, weights: list[torch.Tensor], statistics: dict[str, torch.Tensor], masks: list[torch.Tensor | None]
                          ) -> list[TargetResult] | None:
        """One sweep over the siblings' rows concatenated (one factorization of their shared Hessian); every
        row's result is what its own target's sweep gives, up to the matrix products' summation order."""
        p = self.params
        try:
            quantized, grids, perm = gptq_sweep(torch.cat(weights), hessian_or_identity(statistics, weights[0]), p.bits, p.group_size,
                                                p.symmetric, joint_mask(weights, masks), p.block_size, p.damp, p.act_order, p.static_groups)
        except HessianNotPositiveDefinite:
            return None  # one by one: each falls back as compress_target does
        results = []
        for rows, mask in zip(row_slices(weights), masks):
            packed = packed_rows(quantized, grids, perm, rows, p.bits, p.group_size, mask)
            results.append(TargetResult(weight=packed.dequantize(), mask=mask, quantized=packed))
        return results
