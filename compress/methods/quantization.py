"""The shared quantization core: a uniform asymmetric (or symmetric) grid per output row and group of
input columns, fitted by min/max as the GPTQ reference's `Quantizer`, and the stage parameters.

RTN rounds every weight to its group's grid; GPTQ (and SpQR after it) fits the same grid but chooses
each column in the OBS sweep. Zero is always on the grid (the range is widened to include it), so a
pruned weight quantizes to exactly zero and masks survive quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from compress.formats.quantized import SMALLEST_SCALE, QuantizedWeight
from compress.methods.base import StageParams


class QuantizationParams(StageParams):
    """`bits`: grid size 2^bits (2-8; 16 for a lossless check); `group_size`: input columns sharing
    one scale and zero point per output row (None: one per row, "per-channel"); where it does not
    divide a target's input size, the last group is shorter and quantized like the others;
    `symmetric`: a grid centred on zero instead of min/max."""

    bits: int = Field(default=4, ge=2, le=16)
    group_size: int | None = Field(default=128, gt=0)
    symmetric: bool = False


@dataclass
class Grid:
    """One grid per output row: w ~ scale * (code - zero), code in [0, 2^bits - 1]."""

    scale: torch.Tensor  # [rows, 1]
    zero: torch.Tensor  # [rows, 1], an integer-valued float
    maxq: int


def fit_grid(weights: torch.Tensor, bits: int, symmetric: bool = False) -> Grid:
    """Min/max grid for each row of `weights` ([rows, columns]), its range widened to include 0."""
    maxq = 2**bits - 1
    low = weights.min(dim=1, keepdim=True).values.clamp(max=0)
    high = weights.max(dim=1, keepdim=True).values.clamp(min=0)
    if symmetric:
        high = torch.maximum(low.abs(), high)
        low = -high
    flat = (low == 0) & (high == 0)  # an all-zero row: any grid reproduces it
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    # the scale is stored in float16 (packed format): the grid the method uses is the stored one
    scale = ((high - low) / maxq).half().float().clamp_min(SMALLEST_SCALE)
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else torch.round(-low / scale).clamp(0, maxq)
    return Grid(scale, zero, maxq)


def quantize_codes(weights: torch.Tensor, grid: Grid) -> torch.Tensor:
    return torch.clamp(torch.round(weights / grid.scale) + grid.zero, 0, grid.maxq)


def dequantize(codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    return grid.scale * (codes - grid.zero)


def round_to_grid(weights: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The nearest grid point of every weight (what the model computes with)."""
    return dequantize(quantize_codes(weights, grid), grid)


def group_bounds(columns: int, group_size: int | None) -> list[tuple[int, int]]:
    size = group_size or columns
    return [(start, min(start + size, columns)) for start in range(0, columns, size)]


def packed_weight(
    weight: torch.Tensor, grids: list[Grid], bits: int, group_size: int | None, keep: torch.Tensor | None = None
) -> QuantizedWeight:
    """The packed form of a weight whose every group lies on its grid (`grids` in column order);
    with `keep`, pruned weights are stored as the mask alone."""
    columns = weight.shape[1]
    bounds = group_bounds(columns, group_size)
    if len(bounds) != len(grids):
        raise ValueError(f"{len(grids)} grids for {len(bounds)} groups")
    codes = torch.cat([quantize_codes(weight[:, a:b].float(), grid) for (a, b), grid in zip(bounds, grids)], dim=1)
    scale = torch.cat([grid.scale for grid in grids], dim=1).half()
    zero = torch.cat([grid.zero for grid in grids], dim=1)
    codes = codes.to(torch.uint8 if bits <= 8 else torch.int32)
    return QuantizedWeight(tuple(weight.shape), bits, group_size or columns, codes, scale, zero, keep=keep)
