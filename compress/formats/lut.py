"""Non-uniform (SqueezeLLM) weights in a layout a kernel reads row by row: `bits`-bit codes (2..8)
indexing a per-row table of 2^bits float16 values, plus float16 outliers in CSR, an optional keep
mask and an optional column permutation.

Tensors (prefix P):
  P.codes, P.bitmask, P.code_offsets, P.outlier_row_ptr, P.outlier_cols, P.outlier_values, P.perm:
           the code stream, keep mask, outliers and permutation, exactly as row_extras.py says
  P.lut    float16 [out, 2^bits]: row r's weight for code c is lut[r, c]
The weight at stored column j of row r is lut[r, code] (float32), replaced by its outlier value where
there is one, 0 where the mask prunes; stored column j is column perm[j] of the layer. `unpack` is
QuantizedWeight.dequantize() bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats import bitmap, row_extras
from compress.formats.quantized import QuantizedWeight
from compress.formats.words import check_tensor, exact_cast, tensor_bytes

FORMAT = "lut"


@dataclass
class LUTWeight:
    shape: tuple[int, int]  # (out, in)
    bits: int
    codes: torch.Tensor  # int32, see row_extras
    lut: torch.Tensor  # float16 [out, 2^bits]
    tile_rows: int = bitmap.DEFAULT_TILE_ROWS
    bitmask: torch.Tensor | None = None
    code_offsets: torch.Tensor | None = None
    outlier_row_ptr: torch.Tensor | None = None
    outlier_cols: torch.Tensor | None = None
    outlier_values: torch.Tensor | None = None
    perm: torch.Tensor | None = None

    @property
    def meta(self) -> dict:
        return {"format": FORMAT, "shape": list(self.shape), "bits": self.bits} | row_extras.extras_meta(vars(self), self.tile_rows)


def from_quantized(q: QuantizedWeight, tile_rows: int = bitmap.DEFAULT_TILE_ROWS) -> LUTWeight:
    """A QuantizedWeight with a per-row lut (bits 2..8), optional outliers, keep mask and permutation."""
    if q.lut is None:
        raise ValueError("the lut format needs a per-row lookup table; this weight has a uniform grid (use spqr)")
    rows, cols = q.shape
    if tuple(q.lut.shape) != (rows, 2**q.bits):
        raise ValueError(f"lut {tuple(q.lut.shape)} must be [out, 2^bits] = {(rows, 2**q.bits)}")
    lut = exact_cast(q.lut.float(), torch.float16, "lut")
    return LUTWeight((rows, cols), q.bits, lut=lut, tile_rows=tile_rows, **row_extras.pack_extras(q, tile_rows))


def unpack(packed: LUTWeight) -> torch.Tensor:
    codes, mask = row_extras.read_codes(packed, packed.shape[1])
    return row_extras.finish_weight(packed.lut.float().gather(1, codes), packed, mask)  # the expression of dequantize


def to_tensors(packed: LUTWeight, prefix: str) -> dict[str, torch.Tensor]:
    return row_extras.extras_tensors(vars(packed), prefix) | {f"{prefix}.lut": packed.lut}


def from_tensors(tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> LUTWeight:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{prefix}: format {meta.get('format')!r}, expected {FORMAT!r}")
    (rows, cols), bits = meta["shape"], meta["bits"]
    fields = row_extras.extras_from_tensors(tensors, prefix, meta)
    lut = check_tensor(tensors, f"{prefix}.lut", (torch.float16,), (rows, 2**bits))
    return LUTWeight((rows, cols), bits, lut=lut, tile_rows=meta.get("tile_rows", bitmap.DEFAULT_TILE_ROWS), **fields)


def nbytes(packed: LUTWeight) -> int:
    return tensor_bytes(to_tensors(packed, ""))


def reference_matmul(x: torch.Tensor, packed: LUTWeight) -> torch.Tensor:
    """x @ W.T one output row at a time: x gathered by perm, the row's kept columns and codes from its
    words, each code looked up in the row's table, the row's outliers in place of their table values,
    dotted with x (fp32 accumulation, x's dtype out)."""
    rows, cols = packed.shape
    xf = row_extras.stored_order(x.reshape(-1, cols).float(), packed)
    out = torch.empty(xf.shape[0], rows, dtype=torch.float32, device=x.device)
    for r, columns, codes in row_extras.iter_rows(packed, cols):
        weights = packed.lut[r].float()[codes]
        out[:, r] = xf[:, columns] @ row_extras.apply_row_outliers(weights, columns, packed, r)
    return out.to(x.dtype).reshape(*x.shape[:-1], rows)
