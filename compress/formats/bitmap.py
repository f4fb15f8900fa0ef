"""Unstructured sparse weights (30-95% sparsity) in a layout a kernel can start at any tile of rows:
a bitmask per row and the kept values packed row by row.

Tensors (prefix P):
  P.bitmask       int32 [out, ceil(in / 32)]: bit j % 32 (least significant first) of word j // 32 of
                  row r is 1 when weight [r, j] is kept; every row starts at a word boundary, padding
                  bits are zero
  P.values        float16 or bfloat16 [nnz]: the kept weights, row by row, ascending column within a
                  row (a kept weight that is exactly 0 is still stored)
  P.tile_offsets  int32 (int64 when nnz >= 2^31) [ceil(out / tile_rows) + 1]: entry t is the index in
                  P.values of the first value of tile t (rows t * tile_rows ...); the last entry is nnz.
                  Inside a tile, a row's values start after the popcounts of the tile's earlier rows.
A row with no kept weight has an all-zero bitmask and no values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats.nm import VALUE_DTYPES, check_pruned_zero, value_dtype
from compress.formats.words import check_tensor, exact_cast, pack_fields, read_fields, tensor_bytes, words_for

FORMAT = "bitmap"
DEFAULT_TILE_ROWS = 16


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [out, in] -> int32 [out, ceil(in / 32)], bit j % 32 of word j // 32 for column j."""
    return pack_fields(mask.to(torch.int64), 1)


def read_bitmask(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    return read_fields(bitmask, 1, cols).bool()


def tile_offsets(row_sizes: torch.Tensor, tile_rows: int) -> torch.Tensor:
    """Where each tile of `tile_rows` rows starts in a stream of rows of `row_sizes` entries, and the
    stream's end: [ceil(rows / tile_rows) + 1], int32 when the end fits, else int64."""
    if tile_rows <= 0:
        raise ValueError(f"tile_rows must be positive, got {tile_rows}")
    starts = torch.cat([row_sizes.new_zeros(1), row_sizes.to(torch.int64).cumsum(0)])
    offsets = torch.cat([starts[:-1][::tile_rows], starts[-1:]])
    return offsets.to(torch.int32 if int(starts[-1]) < 2**31 else torch.int64)


@dataclass
class BitmapWeight:
    shape: tuple[int, int]  # (out, in)
    tile_rows: int
    bitmask: torch.Tensor  # int32 [out, ceil(in / 32)]
    values: torch.Tensor  # float16 / bfloat16 [nnz]
    tile_offsets: torch.Tensor  # int32 / int64 [tiles + 1]

    @property
    def tiles(self) -> int:
        return -(-self.shape[0] // self.tile_rows)

    @property
    def meta(self) -> dict:
        dtype = next(name for name, d in VALUE_DTYPES.items() if d == self.values.dtype)
        return {"format": FORMAT, "shape": list(self.shape), "tile_rows": self.tile_rows, "dtype": dtype, "nnz": int(self.values.numel())}


def pack(weight: torch.Tensor, mask: torch.Tensor | None = None, dtype: torch.dtype | str = torch.bfloat16,
         tile_rows: int = DEFAULT_TILE_ROWS) -> BitmapWeight:
    """A pruned weight [out, in] and its mask (True = kept; None: the nonzero weights). Kept weights
    must be exactly representable in `dtype` and pruned ones zero (the format is bit exact)."""
    dtype = value_dtype(dtype)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got {tuple(weight.shape)}")
    mask = weight != 0 if mask is None else mask
    check_pruned_zero(weight, mask)
    values = exact_cast(weight.float(), dtype, "weight")[mask]  # row-major: row by row, ascending column
    return BitmapWeight(tuple(weight.shape), tile_rows, pack_bitmask(mask), values, tile_offsets(mask.sum(1), tile_rows))


def unpack(packed: BitmapWeight) -> torch.Tensor:
    rows, cols = packed.shape
    mask = read_bitmask(packed.bitmask, cols)
    weight = torch.zeros(rows, cols, dtype=torch.float32, device=packed.values.device)
    weight[mask] = packed.values.float()
    return weight


def to_tensors(packed: BitmapWeight, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.bitmask": packed.bitmask, f"{prefix}.values": packed.values, f"{prefix}.tile_offsets": packed.tile_offsets}


def from_tensors(tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> BitmapWeight:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{prefix}: format {meta.get('format')!r}, expected {FORMAT!r}")
    (rows, cols), tile_rows, nnz = meta["shape"], meta["tile_rows"], meta["nnz"]
    bitmask = check_tensor(tensors, f"{prefix}.bitmask", (torch.int32,), (rows, words_for(cols, 1)))
    values = check_tensor(tensors, f"{prefix}.values", (value_dtype(meta["dtype"]),), (nnz,))
    offsets = check_tensor(tensors, f"{prefix}.tile_offsets", (torch.int32, torch.int64), (-(-rows // tile_rows) + 1,))
    return BitmapWeight((rows, cols), tile_rows, bitmask, values, offsets)


def nbytes(packed: BitmapWeight) -> int:
    return tensor_bytes(to_tensors(packed, ""))


def reference_matmul(x: torch.Tensor, packed: BitmapWeight) -> torch.Tensor:
    """x @ W.T, tile by tile from the tile's first value, row by row inside it: decode the row's bitmask,
    take its popcount of values, dot them with x at the kept columns (fp32 accumulation, x's dtype out)."""
    rows, cols = packed.shape
    xf = x.reshape(-1, cols).float()
    out = torch.empty(xf.shape[0], rows, dtype=torch.float32, device=x.device)
    for tile in range(packed.tiles):
        start = int(packed.tile_offsets[tile])
        for r in range(tile * packed.tile_rows, min((tile + 1) * packed.tile_rows, rows)):
            kept = read_bitmask(packed.bitmask[r : r + 1], cols)[0]
            count = int(kept.sum())
            out[:, r] = xf[:, kept] @ packed.values[start : start + count].float()
            start += count
    return out.to(x.dtype).reshape(*x.shape[:-1], rows)
