"""SpQR on a GPU through the group-quant kernels: a SpQR weight without a keep mask is a group-quantized weight
(the same code words) plus a few outliers and a column permutation. Its view, built once per weight on its
device: the code words shared, not copied (3-bit codes: widened to 4-bit words once, views.widen); the
statistics decoded from their stored forms (second-level codes included) to float16 scale and zero point per
group, as the group-quant kernels read them; every outlier as a correction, its value minus what the dense part
computes at its position. Then

    y = group_quant_matmul(x[:, perm], dense) + sum over outliers of x[:, perm][:, col] * delta   (into row)

with the corrections added in fp32 by index_add_ (every step a device op: CUDA-graph safe, no host sync).

The decoded statistics cost 2 x 16 bits a group beside the stored form (2 bits a weight at groups of 16), and
quantized (second-level) statistics are rounded to float16 (a relative 2^-12 on average, far below bfloat16
activations' 2^-9): the GPU result equals the reference to that rounding, not bit for bit. A SpQR weight with
a keep mask, or with codes of 5-7 bits (no group-quant kernel), stays on the reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from compress.formats import group_quant, row_extras, spqr
from compress.formats.words import codes_per_word
from compress.kernels import views

KERNEL_BITS = (2, 3, 4, 8)  # the group-quant kernels' code widths


@dataclass
class SpQRView:
    dense: group_quant.GroupQuantWeight  # codes shared with the SpQR weight (3-bit: widened), float16 statistics
    perm: torch.Tensor | None  # int64 [in]: x[:, perm] is x in the stored column order
    rows: torch.Tensor | None  # int64 [outliers], the output row of each outlier
    cols: torch.Tensor | None  # int64 [outliers], its stored column
    delta: torch.Tensor | None  # float32 [outliers]: outlier value - the dense part's weight there


def supported(packed: spqr.SpQRWeight) -> bool:
    return packed.bitmask is None and packed.bits in KERNEL_BITS


def build(packed: spqr.SpQRWeight) -> SpQRView:
    """The view of a SpQR weight (no keep mask, 2/3/4/8-bit codes), on the weight's device."""
    if not supported(packed):
        raise ValueError(f"no group-quant view of a SpQR weight with {'a keep mask' if packed.bitmask is not None else f'{packed.bits}-bit codes'}")
    scale, zero = spqr.statistic_values(packed)
    dense = group_quant.GroupQuantWeight(packed.shape, packed.bits, packed.group_size, packed.codes, scale.half(), zero.half(), "float16")
    perm = None if packed.perm is None else row_extras.unsigned16(packed.perm)
    if packed.outlier_values is None or packed.outlier_values.numel() == 0:
        return SpQRView(_kernel_dense(dense), perm, None, None, None)
    counts = (packed.outlier_row_ptr[1:] - packed.outlier_row_ptr[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(packed.shape[0], device=counts.device), counts)
    cols = row_extras.unsigned16(packed.outlier_cols)
    per = codes_per_word(packed.bits)
    words = packed.codes[rows, cols // per].to(torch.int64) & 0xFFFFFFFF
    codes = ((words >> ((cols % per) * packed.bits)) & ((1 << packed.bits) - 1)).float()
    group = cols // packed.group_size
    grid = dense.scale[rows, group].float() * (codes - dense.zero[rows, group].float())  # what the kernel computes there
    return SpQRView(_kernel_dense(dense), perm, rows, cols, packed.outlier_values.float() - grid)


def matmul(x: torch.Tensor, view: SpQRView, dense_matmul: Callable) -> torch.Tensor:
    """x [..., in] @ W.T in x's dtype; dense_matmul(x2, group_quant weight) computes the grid part."""
    cols = view.dense.shape[1]
    x2 = x.reshape(-1, cols)
    stored = x2 if view.perm is None else x2.index_select(1, view.perm)
    y = dense_matmul(stored, view.dense)
    if view.delta is not None:
        y = y.float().index_add_(1, view.rows, stored.index_select(1, view.cols).float() * view.delta).to(x.dtype)
    return y.reshape(*x.shape[:-1], view.dense.shape[0])


def _kernel_dense(dense: group_quant.GroupQuantWeight) -> group_quant.GroupQuantWeight:
    return views.widen(dense) if dense.bits == 3 else dense  # 3-bit codes: the 4-bit words the fast kernels read


def cached(packed: spqr.SpQRWeight) -> SpQRView:
    """The view of this weight, built on its first call and kept while its code tensor lives."""
    return views.cached(packed.codes, "spqr", lambda: build(packed))
