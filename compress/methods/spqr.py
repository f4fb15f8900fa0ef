"""SpQR (Dettmers et al. 2023, reference Vahe1994/SpQR): GPTQ with small groups whose statistics are
themselves quantized, and the weights the groups cannot represent kept in 16 bits as sparse outliers.

In the shared OBS sweep (`compress.methods.obs`), optionally over columns reordered by descending
Hessian diagonal (act-order), SpQR's column rule:
- at a group's first column (groups of `group_size` = beta1 input columns, the last one shorter where
  beta1 does not divide the input size): fit a min/max grid per row on the group's current weights,
  with the weights whose leave-one-out criterion marks them as likely outliers (and pruned weights)
  replaced by the row's mean of the others; then quantize the group's scales and zero points along
  the output dimension, `qq_groupsize` = beta2 rows sharing a `qq_*_bits` grid with float16
  statistics. Weights are quantized with the dequantized statistics.
- per column: round to the group's grid; a weight whose scaled error ((w - q) / d)^2 exceeds the
  outlier threshold keeps its (float16) value instead, and is stored in CSR. Pruned weights stay 0
  and are never outliers.
The threshold is `outlier_threshold * mean_j(Var_rows(W_:j) / d_j^2)`, d = diag of the inverse
Hessian's Cholesky factor, as the reference. Defaults are the reference README's recommended
configuration (beta1 = beta2 = 16, 3-bit statistics, threshold 0.2, act-order, damping 1.0).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from compress.errors import CompressError
from compress.formats.outliers import Outliers
from compress.formats.quantized import QuantizedStatistic, QuantizedWeight
from compress.methods.base import TargetMethod, TargetResult
from compress.methods.obs import HessianNotPositiveDefinite, hessian_or_identity, inverse_hessian_factor, obs_flops, obs_sweep
from compress.methods.quantization import QuantizationParams
from compress.methods.registry import register
from compress.model.targets import Target


class SpQRParams(QuantizationParams):
    group_size: int | None = Field(default=16, gt=0)  # beta1
    qq_scale_bits: int | None = Field(default=3, ge=2, le=8)  # None: scales stored in float16
    qq_zero_bits: int | None = Field(default=3, ge=2, le=8)  # None: zero points stored in float16
    qq_groupsize: int = Field(default=16, gt=0)  # beta2, along the output dimension
    outlier_threshold: float = Field(default=0.2, gt=0)  # relative; float("inf") turns outliers off
    simplified_outliers: bool = False  # skip the leave-one-out exclusion when fitting group statistics
    permutation_order: Literal["act_order", "identity"] = "act_order"
    damp: float = Field(default=1.0, gt=0)
    block_size: int = Field(default=128, gt=0)

    @model_validator(mode="after")
    def _groups_fit_blocks(self) -> SpQRParams:
        if self.group_size is None:
            raise ValueError("spqr needs a group_size (beta1), e.g. 16")
        if self.block_size % self.group_size:
            raise ValueError(f"block_size {self.block_size} must be a multiple of group_size {self.group_size}")
        return self

    def check_target(self, target: Target) -> None:
        super().check_target(target)
        if target.out_features % self.qq_groupsize:
            raise CompressError(f"target {target.name}: output size {target.out_features} is not divisible by "
                                f"qq_groupsize={self.qq_groupsize}; choose a qq_groupsize that divides it, or exclude the target")
        if target.in_features > 65536:
            raise CompressError(f"target {target.name}: input size {target.in_features} exceeds the 16-bit column indices of outliers")


def _minmax_grid(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min/max grid over the last dimension, zero point not rounded (SpQR's quantizer)."""
    maxq = 2**bits - 1
    low, high = values.min(dim=-1, keepdim=True).values, values.max(dim=-1, keepdim=True).values
    flat = low == high  # as the reference: a constant row gets the range (-1, 1)
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    # a tensor divisor: torch on CUDA divides by a Python number as a multiply by its reciprocal (1 ulp
    # off the IEEE quotient), and an fp32 scale one ulp off flips codes (the fused kernel divides exactly)
    scale = (high - low) / torch.full_like(high, maxq)
    return scale, -low / scale


def _round(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(values / scale.clamp_min(1e-9) + zero), 0, 2**bits - 1)


def leave_one_out_error(group: torch.Tensor, diagonal: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, g]: how much the group's quantization error sum_j ((w_j - q_j) / d_j)^2 drops when
    weight j is left out of the grid and the sum (the reference's `get_leave_one_out_error`)."""
    g = group.shape[1]
    others = torch.arange(g, device=group.device).expand(g, g)[~torch.eye(g, dtype=torch.bool, device=group.device)].view(g, g - 1)
    left_out = group[:, others]  # [rows, g, g-1]
    scale, zero = _minmax_grid(left_out, bits)
    error = ((scale * (_round(left_out, scale, zero, bits) - zero) - left_out) / diagonal[others]).square().sum(-1)
    scale, zero = _minmax_grid(group, bits)
    baseline = ((scale * (_round(group, scale, zero, bits) - zero) - group) / diagonal).square().sum(-1, keepdim=True)
    return baseline - error


def quantize_statistic(values: torch.Tensor, bits: int, group_size: int) -> QuantizedStatistic:
    """Quantize a [rows] statistic in groups of `group_size` rows on a min/max grid whose step and
    low end are stored in float16 (the codes are chosen against what is stored)."""
    grouped = values.view(-1, group_size)
    step, zero = _minmax_grid(grouped, bits)
    step, low = step.half(), (-zero * step).half()
    codes = torch.clamp(torch.round((grouped - low.float()) / step.float().clamp_min(1e-9)), 0, 2**bits - 1)
    return QuantizedStatistic(codes.view(-1, 1), bits, group_size, step.view(-1, 1), low.view(-1, 1))


def _store_statistic(values: torch.Tensor, bits: int | None, group_size: int) -> QuantizedStatistic | torch.Tensor:
    return values.half() if bits is None else quantize_statistic(values.squeeze(1), bits, group_size)


def _stored_values(statistic: QuantizedStatistic | torch.Tensor) -> torch.Tensor:
    return statistic.values() if isinstance(statistic, QuantizedStatistic) else statistic.float()


class SpQRRule:
    def __init__(self, params: SpQRParams, weight: torch.Tensor, keep: torch.Tensor | None, threshold: float) -> None:
        self.p = params
        self.keep = keep
        self.threshold = threshold
        rows, columns = weight.shape
        self.codes = torch.zeros(rows, columns, dtype=torch.uint8 if params.bits <= 8 else torch.int32, device=weight.device)
        self.outlier = torch.zeros(rows, columns, dtype=torch.bool, device=weight.device)
        self.scales: list = []  # per group: QuantizedStatistic, or float16 [rows, 1] without second level
        self.zeros: list = []

    def begin_block(self, start: int, block: torch.Tensor, hinv_block: torch.Tensor) -> None:
        pass

    def _fit_group(self, at: int, group: torch.Tensor, diagonal: torch.Tensor) -> None:
        p = self.p
        excluded = torch.zeros_like(group, dtype=torch.bool)
        if self.threshold != float("inf") and not p.simplified_outliers and group.shape[1] > 1:  # a last group may be 1 wide
            excluded |= leave_one_out_error(group, diagonal, p.bits) > self.threshold
        if self.keep is not None:
            excluded |= ~self.keep[:, at : at + group.shape[1]]
        included = (~excluded).float()
        mean = (group * included).sum(1, keepdim=True) / included.sum(1, keepdim=True).clamp_min(1)
        scale, zero = _minmax_grid(torch.where(excluded, mean, group), p.bits)
        scale_q = _store_statistic(scale, p.qq_scale_bits, p.qq_groupsize)
        zero_q = _store_statistic(zero, p.qq_zero_bits, p.qq_groupsize)
        self.scales.append(scale_q)
        self.zeros.append(zero_q)
        self.scale, self.zero = _stored_values(scale_q), _stored_values(zero_q)  # what the reader will compute

    def column(self, start: int, j: int, block: torch.Tensor, hinv_block: torch.Tensor) -> torch.Tensor:
        at = start + j
        g = self.p.group_size
        if at % g == 0:
            self._fit_group(at, block[:, j : j + g], torch.diag(hinv_block)[j : j + g])
        weight = block[:, j : j + 1]
        codes = _round(weight, self.scale, self.zero, self.p.bits)
        value = (self.scale * (codes - self.zero)).squeeze(1)
        weight = weight.squeeze(1)
        outlier = ((weight - value) / hinv_block[j, j]).square() > self.threshold
        if self.keep is not None:
            outlier &= self.keep[:, at]
        value = torch.where(outlier, weight.half().float(), value)  # outliers are stored in float16
        if self.keep is not None:
            value = torch.where(self.keep[:, at], value, torch.zeros_like(value))
        self.codes[:, at] = codes.squeeze(1).to(self.codes.dtype)
        self.outlier[:, at] = outlier
        return value


    def fused_spec(self, start: int, block: torch.Tensor) -> dict | None:
        """The block for the fused kernel (spqr_fused): its programs hold 16 rows, so with second-level
        statistics the rows must form groups of exactly 16 (beta2 = 16, the default); else the column loop."""
        from compress.methods.obs_fused import BLOCK_ROWS

        p = self.p
        second_level = p.qq_scale_bits is not None or p.qq_zero_bits is not None
        if block.shape[0] % BLOCK_ROWS or (second_level and p.qq_groupsize != BLOCK_ROWS):
            return None
        keep = None if self.keep is None else self.keep[:, start : start + block.shape[1]]
        return dict(mode="spqr", group=p.group_size, bits=p.bits, qq_scale_bits=p.qq_scale_bits, qq_zero_bits=p.qq_zero_bits,
                    threshold=self.threshold, leave_one_out=self.threshold != float("inf") and not p.simplified_outliers, keep=keep)

    def fused_result(self, start: int, spec: dict) -> None:
        width = spec["codes"].shape[1]
        self.codes[:, start : start + width] = spec["codes"].to(self.codes.dtype)
        self.outlier[:, start : start + width] = spec["outliers"]
        for g in range(-(-width // self.p.group_size)):
            for name, found, bits in (("scale", self.scales, self.p.qq_scale_bits), ("zero", self.zeros, self.p.qq_zero_bits)):
                if bits is None:
                    found.append(spec[name][:, g : g + 1].half())
                else:
                    codes, step, low = spec[name]
                    found.append(QuantizedStatistic(codes[:, g : g + 1], bits, self.p.qq_groupsize,
                                                    step[:, g : g + 1].half(), low[:, g : g + 1].half()))


def _stack(statistics: list[QuantizedStatistic] | list[torch.Tensor]) -> QuantizedStatistic | torch.Tensor:
    first = statistics[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(statistics, dim=1)
    return QuantizedStatistic(
        torch.cat([s.codes for s in statistics], dim=1), first.bits, first.group_size,
        torch.cat([s.step for s in statistics], dim=1), torch.cat([s.low for s in statistics], dim=1),
    )


def spqr_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, params: SpQRParams, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, QuantizedWeight]:
    """(quantized [out, in] weight, its packed form) for one weight and its X^T X."""
    rows, columns = weight.shape
    perm = None
    if params.permutation_order == "act_order":
        perm = torch.argsort(torch.diag(hessian), descending=True)
        weight, hessian = weight[:, perm], hessian[perm][:, perm]
        keep = None if keep is None else keep[:, perm]
    work = weight.float().clone()
    inverse = inverse_hessian_factor(hessian, params.damp)
    work[:, inverse.dead] = 0
    diagonal = torch.diag(inverse.factor)
    threshold = params.outlier_threshold * (work.var(dim=0) / diagonal.square()).mean().item()
    rule = SpQRRule(params, work, keep, threshold)
    obs_sweep(work, inverse, rule, params.block_size)
    outliers = Outliers.from_mask(work, rule.outlier)
    packed = QuantizedWeight((rows, columns), params.bits, params.group_size, rule.codes, _stack(rule.scales),
                             _stack(rule.zeros), outliers, keep=keep, perm=perm)
    return packed.dequantize(), packed


@register
class SpQR(TargetMethod):
    name = "spqr"
    Params = SpQRParams
    statistics = ("hessian",)

    def flops(self, target: Target, tokens: int) -> float:
        return 2 * obs_flops(target.out_features, target.in_features)  # leave-one-out outlier tests, second-level statistics

    def compress_target(
        self,
        weight: torch.Tensor,
        statistics: dict[str, torch.Tensor],
        mask: torch.Tensor | None,
        dense: torch.Tensor | None = None,
    ) -> TargetResult:
        hessian = hessian_or_identity(statistics, weight)
        try:
            quantized, packed = spqr_quantize(weight, hessian, self.params, mask)
        except HessianNotPositiveDefinite as error:
            # round to nearest on SpQR's own grids and format: with H = I the sweep compensates nothing
            # (as for an expert no token reached), in column order
            identity = hessian_or_identity({}, weight)
            quantized, packed = spqr_quantize(weight, identity, self.params.model_copy(update={"permutation_order": "identity"}), mask)
            return TargetResult(weight=quantized, mask=mask, quantized=packed, fallback=f"round-to-nearest ({error})")
        return TargetResult(weight=quantized, mask=mask, quantized=packed)
