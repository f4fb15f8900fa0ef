"""Outliers: weights kept in float16 beside a quantized target, CSR by output row with 16-bit column
indices (as the SpQR format). Stored row pointers are per-row counts in the narrowest integer type."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Outliers:
    """Weights kept in 16 bits, CSR by output row (16-bit column indices, as the SpQR format)."""

    row_ptr: torch.Tensor  # int32 [out + 1]
    col_idx: torch.Tensor  # int16 [nnz]
    values: torch.Tensor  # float16 [nnz]

    @classmethod
    def from_mask(cls, weight: torch.Tensor, mask: torch.Tensor) -> Outliers:
        rows, cols = mask.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=mask.shape[0])
        row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64, device=mask.device), counts.cumsum(0)])
        return cls(row_ptr.to(torch.int32), cols.to(torch.int16), weight[rows, cols].to(torch.float16))

    @property
    def count(self) -> int:
        return int(self.values.numel())

    def row_counts(self) -> torch.Tensor:
        """Each row's outlier count in the narrowest integer type that holds them all (as stored)."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int64)
        largest = int(counts.max()) if counts.numel() else 0
        if largest <= 255:
            return counts.to(torch.uint8)
        if largest <= 65535:
            return counts.to(torch.int32).to(torch.int16)  # wraps above 32767: read as unsigned
        return counts.to(torch.int32)

    @classmethod
    def from_row_counts(cls, counts: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor) -> Outliers:
        counts = counts.to(torch.int64) & (0xFFFF if counts.dtype == torch.int16 else -1)
        row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        return cls(row_ptr.to(torch.int32), col_idx, values)

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        return rows, self.col_idx.to(torch.int64) & 0xFFFF  # int16 holds column indices up to 65535
