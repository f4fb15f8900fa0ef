"""QMoE (Frantar & Alistarh 2023, reference IST-DASLab/qmoe): MoE experts quantized to a ternary grid
{min, 0, max} per output row (or a 2-bit grid) by GPTQ with each expert's own routed Hessian, then
stored dictionary-coded at under one bit a weight (compress/formats/ternary_dict.py).

As the reference: the grid of each row is fixed once from the original row (min and max, widened to
include 0; an all-zero row gets (-1, 1)); a weight becomes max where it exceeds max / 2, min where it
is below min / 2, else 0; relative damping 0.1 (experts see few tokens, so their Hessians are poorly
conditioned); no groups. The column sweep is the shared OBS sweep (compress/methods/obs.py) with a
ternary column rule; the 2-bit grid is GPTQ's own rule with one min/max grid per row. An expert no
calibration token reached gets the identity Hessian, i.e. plain rounding (the stage names it), as the
reference does. `rounding_only` rounds every expert to the same grid without the sweep: the baseline.

Only experts are compressed: the stage's other targets (attention, router, shared experts) are left to
other stages of the recipe. A model without experts is refused before calibration.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compress.errors import CompressError
from compress.formats.quantized import QuantizedWeight
from compress.methods.base import StageParams, TargetMethod, TargetResult
from compress.methods.gptq import gptq_quantize
from compress.methods.obs import HessianNotPositiveDefinite, hessian_or_identity, inverse_hessian_factor, obs_flops, obs_sweep
from compress.methods.registry import register
from compress.model.targets import Target


class QMoEParams(StageParams):
    """`grid`: "ternary" ({min, 0, max} per row, dictionary-coded) or "int2" (2-bit min/max grid per row);
    `damp`: relative damping of the Hessian (the reference's 0.1); `rounding_only`: the round-to-nearest
    baseline in the same grid and format."""

    grid: Literal["ternary", "int2"] = "ternary"
    damp: float = Field(default=0.1, gt=0, lt=1)
    block_size: int = Field(default=128, gt=0)
    rounding_only: bool = False


def ternary_bounds(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per row, [..., rows, 1] each: the row's range widened to include 0; (-1, 1) for a zero row.
    Rounded to bfloat16 (as the reference stores them), which float16 (the format's) also holds exactly
    in its normal range: the quantized weights are then the same in a bf16 checkpoint and in the format."""
    low = weight.min(dim=-1, keepdim=True).values.clamp(max=0)
    high = weight.max(dim=-1, keepdim=True).values.clamp(min=0)
    flat = (low == 0) & (high == 0)
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    return low.bfloat16().half().float(), high.bfloat16().half().float()


def ternary_codes(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """0 (zero), 1 (min) or 2 (max) for each value: max above max / 2, min below min / 2 (as the reference)."""
    return torch.where(values > high / 2, 2, torch.where(values < low / 2, 1, 0)).to(torch.uint8)


class TernaryRule:
    """The OBS sweep's column rule for the ternary grid: each column to {min, 0, max} of its row (for one
    weight, or a batch of experts swept together: every tensor then has the leading expert dimension)."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor, keep: torch.Tensor | None) -> None:
        self.table = torch.cat([torch.zeros_like(low), low, high], dim=-1)  # code -> value, per row
        self.low, self.high, self.keep = low.squeeze(-1), high.squeeze(-1), keep

    def begin_block(self, start: int, block: torch.Tensor, hinv_block: torch.Tensor) -> None:
        pass

    def column(self, start: int, j: int, block: torch.Tensor, hinv_block: torch.Tensor) -> torch.Tensor:
        codes = ternary_codes(block[..., j], self.low, self.high).long()
        if self.keep is not None:
            codes = codes * self.keep[..., start + j]
        return self.table.gather(-1, codes.unsqueeze(-1)).squeeze(-1)

    def fused_spec(self, start: int, block: torch.Tensor) -> dict:
        """The block for obs_fused (one weight, or a batch of experts)."""
        keep = None if self.keep is None else self.keep[..., start : start + block.shape[-1]]
        return dict(mode="ternary", low=self.low, high=self.high, keep=keep)

    def fused_result(self, start: int, spec: dict) -> None:
        pass


def ternary_weight(quantized: torch.Tensor, low: torch.Tensor, high: torch.Tensor, keep: torch.Tensor | None) -> QuantizedWeight:
    """The packed form of a weight whose every value is its row's min, 0 or max: a per-row table
    (0, min, max, 0) indexed by 2-bit codes, marked ternary."""
    codes = torch.where(quantized == high, 2, torch.where(quantized == low, 1, 0)).to(torch.uint8)
    codes[quantized == 0] = 0  # a row whose min (or max) is 0 stores its zeros as 0
    lut = torch.cat([torch.zeros_like(low), low, high, torch.zeros_like(low)], dim=1).half()
    rows, cols = quantized.shape
    return QuantizedWeight((rows, cols), 2, cols, codes, None, None, keep=keep, lut=lut, ternary=True)


def qmoe_ternary(weight: torch.Tensor, hessian: torch.Tensor | None, keep: torch.Tensor | None = None, damp: float = 0.1,
                 block_size: int = 128) -> tuple[torch.Tensor, QuantizedWeight]:
    """(ternary [out, in] weight, its packed form): GPTQ on the ternary grid with `hessian` (X^T X), or
    plain rounding when `hessian` is None."""
    quantized, low, high = ternary_sweep(weight, hessian, keep, damp, block_size)
    packed = ternary_weight(quantized, low, high, keep)
    return packed.dequantize(), packed


def ternary_sweep(weight: torch.Tensor, hessian: torch.Tensor | None, keep: torch.Tensor | None, damp: float, block_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(quantized weights, min, max) of one weight [out, in] or of a batch of experts [E, out, in] with
    their Hessians [E, in, in] (all factored with the same damping), swept together."""
    low, high = ternary_bounds(weight.float())
    if hessian is None:
        codes = ternary_codes(weight.float(), low, high)
        if keep is not None:
            codes = codes * keep
        return torch.cat([torch.zeros_like(low), low, high], dim=-1).gather(-1, codes.long()), low, high
    quantized = weight.float().clone()
    obs_sweep(quantized, inverse_hessian_factor(hessian, damp), TernaryRule(low, high, keep), block_size)
    return quantized, low, high


def is_expert(target: Target) -> bool:
    """A fused expert, or a Linear inside an `experts` list (older MoE layouts)."""
    return target.is_expert or ".experts." in f".{target.name}."


@register
class QMoE(TargetMethod):
    name = "qmoe"
    Params = QMoEParams
    statistics = ("hessian",)

    def restrict_targets(self, targets: list[Target]) -> list[Target]:
        experts = [t for t in targets if is_expert(t)]
        if not experts:
            raise CompressError(
                f"qmoe compresses MoE experts, and none of the {len(targets)} selected targets is one (is this an MoE model? "
                f"e.g. {targets[0].name if targets else 'no target'}): use gptq or rtn for dense layers")
        return experts

    def flops(self, target: Target, tokens: int) -> float:
        return 10.0 * target.out_features * target.in_features if self.params.rounding_only else obs_flops(
            target.out_features, target.in_features)

    def compress_target(self, weight: torch.Tensor, statistics: dict[str, torch.Tensor], mask: torch.Tensor | None,
                        dense: torch.Tensor | None = None) -> TargetResult:
        p = self.params
        hessian = None if p.rounding_only else hessian_or_identity(statistics, weight)
        try:
            if p.grid == "ternary":
                quantized, packed = qmoe_ternary(weight, hessian, mask, p.damp, p.block_size)
            else:
                eye = torch.eye(weight.shape[1], device=weight.device)
                quantized, packed = gptq_quantize(weight, eye if hessian is None else hessian, 2, None, keep=mask,
                                                  block_size=p.block_size, damp=p.damp)
        except HessianNotPositiveDefinite as error:  # round in the same grid
            result = type(self)(p.model_copy(update={"rounding_only": True})).compress_target(weight, {}, mask)
            result.fallback = f"round-to-nearest ({error})"
            return result
        return TargetResult(weight=quantized, mask=mask, quantized=packed)

    def compress_experts(self, weights: torch.Tensor, statistics: list[dict[str, torch.Tensor]], masks: torch.Tensor | None
                         ) -> list[TargetResult] | None:
        """The ternary sweep of several experts of one layer at once (their own Hessians, the identity for
        an expert no token reached); None (one at a time) for the 2-bit grid, rounding, or a Hessian that
        needs more damping than the others."""
        p = self.params
        if p.grid != "ternary" or p.rounding_only:
            return None
        hessians = torch.stack([hessian_or_identity(s, w) for s, w in zip(statistics, weights)])
        try:
            quantized, low, high = ternary_sweep(weights, hessians, masks, p.damp, p.block_size)
        except HessianNotPositiveDefinite:
            return None
        results = []
        for e in range(weights.shape[0]):
            packed = ternary_weight(quantized[e], low[e], high[e], None if masks is None else masks[e])
            results.append(TargetResult(weight=packed.dequantize(), mask=None if masks is None else masks[e], quantized=packed))
        return results
