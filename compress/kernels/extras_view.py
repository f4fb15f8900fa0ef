"""SpQR and SqueezeLLM (LUT) weights on a GPU through the kernels of their grids (the tensor-core kernel's scaled or
table form at batch 1-16, else the split-K / group-quant Triton kernels: dispatch.py). Without a keep
mask, such a weight is a dense code grid plus a few outliers and a column permutation. Its view, built once per
weight on its device (views.cached):
- SpQR: a group-quant weight, the code words shared (3-bit codes widened to 4-bit words once, views.widen), the
  statistics decoded from their stored forms (second-level codes included) to float16 scale and zero point a
  group, as the group-quant kernels read them;
- LUT: views.LUTCodes, the codes in 4-bit (8-bit) words and each row's table in fp32, for the split-K GEMV's
  table mode;
- every outlier as a correction, its value minus what the dense part computes at its position. Then

    y = dense_matmul(x[:, perm], dense) + sum over outliers of x[:, perm][:, col] * delta   (into row)

with the corrections added in fp32 (every step a device op: CUDA-graph safe, no host sync): on the GPU by one kernel
over the format's own row pointers (triton_outliers.py), else by index_add_.

SpQR's decoded statistics cost 2 x 16 bits a group beside the stored form (2 bits a weight at groups of 16), and
quantized (second-level) statistics are rounded to float16 (a relative 2^-12 on average, far below bfloat16
activations' 2^-9): the GPU result equals the reference to that rounding, not bit for bit; LUT views are exact.
A weight with a keep mask, or SpQR codes of 5-7 bits (no group-quant kernel), stays on the reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from compress.formats import group_quant, lut, nm, row_extras, spqr
from compress.formats.words import codes_per_word, read_fields
from compress.kernels import views

SPQR_BITS = (2, 3, 4, 8)  # the group-quant kernels' code widths


@dataclass
class ExtrasView:
    dense: group_quant.GroupQuantWeight | views.LUTCodes | nm.NMWeight  # the grid (a 2:4 part: nm_split.py) the kernels read
    perm: torch.Tensor | None  # int64 [in]: x[:, perm] is x in the stored column order
    rows: torch.Tensor | None  # int64 [outliers], the output row of each outlier
    row_ptr: torch.Tensor | None  # int32 [out + 1]: row r's outliers are entries row_ptr[r] .. row_ptr[r + 1] - 1
    cols: torch.Tensor | None  # int32 [outliers], its stored column
    delta: torch.Tensor | None  # float32 [outliers]: outlier value - the dense part's weight there


def supported(packed) -> bool:
    if isinstance(packed, spqr.SpQRWeight):
        return packed.bitmask is None and packed.bits in SPQR_BITS
    return isinstance(packed, lut.LUTWeight) and packed.bitmask is None


def build(packed: spqr.SpQRWeight | lut.LUTWeight) -> ExtrasView:
    """The view of a SpQR or LUT weight without a keep mask (SpQR: 2/3/4/8-bit codes), on the weight's device."""
    if not supported(packed):
        why = "a keep mask" if packed.bitmask is not None else f"{packed.bits}-bit codes"
        raise ValueError(f"no kernel view of a {type(packed).__name__} with {why}")
    if isinstance(packed, spqr.SpQRWeight):
        scale, zero = spqr.statistic_values(packed)
        grid = group_quant.GroupQuantWeight(packed.shape, packed.bits, packed.group_size, packed.codes.detach(), scale.half(), zero.half(),
                                            "float16")  # the codes shared through an alias (views.cached)
        dense = views.widen(grid) if grid.bits == 3 else grid
    else:
        dense = views.lut_codes(packed.codes, packed.lut, packed.shape, packed.bits)
    perm = None if packed.perm is None else row_extras.unsigned16(packed.perm)
    if packed.outlier_values is None or packed.outlier_values.numel() == 0:
        return ExtrasView(dense, perm, None, None, None, None)
    counts = (packed.outlier_row_ptr[1:] - packed.outlier_row_ptr[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(packed.shape[0], device=counts.device), counts)
    cols = row_extras.unsigned16(packed.outlier_cols)
    per = codes_per_word(packed.bits)
    words = packed.codes[rows, cols // per].to(torch.int64) & 0xFFFFFFFF
    codes = (words >> ((cols % per) * packed.bits)) & ((1 << packed.bits) - 1)
    if isinstance(packed, spqr.SpQRWeight):  # what the kernel computes there
        group = cols // packed.group_size
        value = dense.scale[rows, group].float() * (codes.float() - dense.zero[rows, group].float())
    else:
        value = dense.table[rows, codes]
    return ExtrasView(dense, perm, rows, packed.outlier_row_ptr, cols.to(torch.int32), packed.outlier_values.float() - value)


def matmul(x: torch.Tensor, view: ExtrasView, dense_matmul: Callable, corrections: Callable | None = None) -> torch.Tensor:
    """x [..., in] @ W.T in x's dtype; dense_matmul(x2, view.dense) computes the grid part, `corrections` (y, x2,
    row_ptr, cols, delta) adds the outliers' in place (triton_outliers.add_corrections), else `reference_corrections`."""
    cols = view.dense.shape[1]
    x2 = x.reshape(-1, cols)
    stored = x2 if view.perm is None else x2.index_select(1, view.perm)
    y = dense_matmul(stored, view.dense)
    if view.delta is not None and corrections is not None:
        y = corrections(y.contiguous(), stored.contiguous(), view.row_ptr, view.cols, view.delta)
    elif view.delta is not None:
        y = reference_corrections(y, stored, view)
    return y.reshape(*x.shape[:-1], view.dense.shape[0])


def reference_corrections(y: torch.Tensor, stored: torch.Tensor, view: ExtrasView) -> torch.Tensor:
    """y + the outliers' corrections of the activations in stored column order, summed in fp32 (plain torch)."""
    return y.float().index_add_(1, view.rows, stored.index_select(1, view.cols).float() * view.delta).to(y.dtype)


def cached(packed: spqr.SpQRWeight | lut.LUTWeight) -> ExtrasView:
    """The view of this weight, built on its first call and kept while its code tensor lives."""
    return views.cached(packed.codes, "extras", lambda: build(packed))


def reference_dense(x: torch.Tensor, dense: group_quant.GroupQuantWeight | views.LUTCodes) -> torch.Tensor:
    """The dense part in plain torch (tests; no Triton): x @ grid.T, fp32 accumulation, x's dtype."""
    if isinstance(dense, group_quant.GroupQuantWeight):
        return group_quant.reference_matmul(x, dense)
    codes = read_fields(dense.codes, dense.bits, dense.shape[1])
    return (x.float() @ dense.table.gather(1, codes).T).to(x.dtype)
