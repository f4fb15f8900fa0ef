"""Which kernel-ready format stores a compressed target: the smallest that holds it exactly and that a
kernel runs (a ternary QMoE expert: the dictionary-coded format). A target no format fits (not
compressed, too little sparsity to pay for a bitmask, 16-bit codes, weights not exactly representable
in 16 bits) stays a dense weight, with the reason."""

from __future__ import annotations

import torch

from compress.formats import bitmap, group_quant, lut, nm, sparse_quant, spqr, ternary_dict
from compress.formats.quantized import QuantizedStatistic, QuantizedWeight

# Below this a bitmask (1 bit a weight) plus 16-bit values is barely smaller than dense 16-bit and the
# kernel's skipping gains nothing: the target stays dense.
MIN_BITMAP_SPARSITY = 0.3
N_M_GROUPS = (2, 4, 8, 16)


def detect_nm(mask: torch.Tensor) -> tuple[int, int] | None:
    """(N, M) when every group of M consecutive input weights keeps exactly N (smallest M first:
    a 1:2 mask is also 2:4, and 1-bit indices are cheaper), else None."""
    rows, cols = mask.shape
    for m in N_M_GROUPS:
        if cols % m == 0 and rows and cols:
            counts = mask.reshape(rows, -1, m).sum(-1)
            n = int(counts[0, 0])
            if 0 < n < m and bool((counts == n).all()):
                return n, m
    return None


def _plain(q: QuantizedWeight) -> bool:
    """Uniform grid, plain statistics, no outliers or permutation: group_quant / sparse_quant hold it."""
    return (q.lut is None and q.outliers is None and q.perm is None and q.bits in group_quant.SUPPORTED_BITS
            and not any(isinstance(s, QuantizedStatistic) for s in (q.scale, q.zero)))


def pack_target(weight: torch.Tensor, mask: torch.Tensor | None, quantized: QuantizedWeight | None):
    """(packed weight, None) in the format that fits, or (None, why it stays dense).

    `weight` is the stored [out, in] weight (what the evaluated model computes with), `mask` the
    sparsity mask (True = kept) and `quantized` the packed form a quantizing stage left."""
    try:
        if quantized is not None:
            if quantized.bits > 8:
                return None, f"{quantized.bits}-bit codes (the formats hold 2-8 bits)"
            if quantized.ternary and quantized.keep is None and quantized.outliers is None and quantized.perm is None:
                return ternary_dict.from_quantized(quantized), None  # QMoE: dictionary-coded, under 1 bit a weight
            if quantized.lut is not None:
                return lut.from_quantized(quantized), None
            if _plain(quantized):
                if quantized.keep is None:
                    return group_quant.from_quantized(quantized), None
                pattern = detect_nm(quantized.keep)
                return sparse_quant.from_quantized(quantized, f"{pattern[0]}:{pattern[1]}" if pattern else "unstructured"), None
            return spqr.from_quantized(quantized), None
        if mask is None:
            return None, "not compressed"
        if weight.dtype not in nm.VALUE_DTYPES.values():
            return None, f"{weight.dtype} weights (sparse values are stored in 16 bits)"
        pattern = detect_nm(mask)
        if pattern is not None:
            return nm.pack(weight, mask, *pattern, dtype=weight.dtype), None
        sparsity = 1 - float(mask.sum()) / mask.numel()
        if sparsity < MIN_BITMAP_SPARSITY:
            return None, f"sparsity {sparsity:.2f} below {MIN_BITMAP_SPARSITY} (a bitmask would not pay)"
        return bitmap.pack(weight, mask, dtype=weight.dtype), None
    except ValueError as error:  # a weight the format cannot hold exactly: dense, and say why
        return None, str(error)
