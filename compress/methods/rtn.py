"""Round-to-nearest: the quantization baseline. Each group of each row gets its min/max grid and every
weight its nearest grid point. Needs no calibration data."""

from __future__ import annotations

import torch

from compress.methods.base import TargetMethod, TargetResult
from compress.methods.quantization import (
    Grid,
    QuantizationParams,
    fit_grid,
    group_bounds,
    packed_weight,
    round_to_grid,
)
from compress.methods.registry import register


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = False) -> tuple[torch.Tensor, list[Grid]]:
    """(the [out, in] weight with every group of every row rounded to its own grid, the grids)."""
    quantized = torch.empty_like(weight, dtype=torch.float32)
    grids = []
    for start, end in group_bounds(weight.shape[1], group_size):
        group = weight[:, start:end].float()
        grids.append(fit_grid(group, bits, symmetric))
        quantized[:, start:end] = round_to_grid(group, grids[-1])
    return quantized, grids


@register
class RTN(TargetMethod):
    name = "rtn"
    Params = QuantizationParams
    statistics = ()

    def compress_target(
        self,
        weight: torch.Tensor,
        statistics: dict[str, torch.Tensor],
        mask: torch.Tensor | None,
        dense: torch.Tensor | None = None,
    ) -> TargetResult:
        params = self.params
        quantized, grids = rtn_quantize(weight, params.bits, params.group_size, params.symmetric)
        packed = packed_weight(quantized, grids, params.bits, params.group_size, mask)
        # zero is on every grid, so pruned weights stay exactly zero; the evaluated weights are the
        # packed form's, bit for bit
        return TargetResult(weight=packed.dequantize(), mask=mask, quantized=packed)
