"""Sparse and group-quantized weights: the positions of the kept weights as an N:M index stream (nm.py)
or a bitmask (bitmap.py), and group-quantized codes of the kept weights only (group_quant.py); groups
and their statistics are over the original input columns (a kept weight at column j is in group
j // group_size), w = scale * (code - zero) where kept, 0 elsewhere.

Tensors (prefix P):
  P.indices       N:M only: int32 [out, ceil(in * N / M / per_word)], exactly as nm.py
  P.bitmask       unstructured only: int32 [out, ceil(in / 32)], exactly as bitmap.py
  P.codes         int32 words of `bits`-bit codes of the kept weights (row by row, ascending column),
                  32 // bits to a word (10 for 3 bits), least significant first, every row starting at a
                  word boundary: N:M [out, ceil(in * N / M / per_word)]; unstructured a flat
                  [sum over rows of ceil(kept_r / per_word)]
  P.code_offsets  unstructured only: int32 (int64 past 2^31) [ceil(out / tile_rows) + 1], the word of
                  P.codes where tile t's first row starts (last entry: the word count); inside a tile a
                  row starts after ceil(popcount / per_word) words of each earlier row
  P.scale, P.zero as group_quant.py: float16 [out, groups]; zero int32 packed or float16
`unpack` is `QuantizedWeight(keep=mask).dequantize()` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats import bitmap, group_quant, nm
from compress.formats.quantized import QuantizedStatistic, QuantizedWeight
from compress.formats.words import check_tensor, codes_per_word, pack_fields, read_fields, tensor_bytes, to_int32, words_for

FORMAT = "sparse_quant"


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for "unstructured", else (N, M) of "N:M"."""
    if pattern == "unstructured":
        return None
    n, sep, m = pattern.partition(":")
    if not (sep and n.isdigit() and m.isdigit()):
        raise ValueError(f"pattern must be 'unstructured' or 'N:M', got {pattern!r}")
    return int(n), int(m)


def _slots(counts: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows of `counts` codes, each row starting at a word boundary: (words of each row, and for every
    code in row order its word and its bit shift)."""
    per = codes_per_word(bits)
    counts = counts.to(torch.int64)
    row_words = (counts + per - 1) // per
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first_code = torch.cumsum(counts, 0) - counts
    rank = torch.arange(rows.numel(), device=counts.device) - first_code[rows]
    word = (torch.cumsum(row_words, 0) - row_words)[rows] + rank // per
    return row_words, word, (rank % per) * bits


def pack_rows(codes: torch.Tensor, counts: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of rows of `counts` codes (concatenated) -> the flat int32 words, each row word aligned."""
    row_words, word, shift = _slots(counts, bits)
    words = torch.zeros(int(row_words.sum()), dtype=torch.int64, device=codes.device)
    return to_int32(words.index_add_(0, word, codes.to(torch.int64) << shift))


def read_rows(words: torch.Tensor, counts: torch.Tensor, bits: int) -> torch.Tensor:
    _, word, shift = _slots(counts, bits)
    return ((words[word].to(torch.int64) & 0xFFFFFFFF) >> shift) & ((1 << bits) - 1)


@dataclass
class SparseQuantWeight:
    shape: tuple[int, int]  # (out, in)
    pattern: str  # "unstructured" or "N:M"
    bits: int
    group_size: int
    codes: torch.Tensor  # int32, see the module docstring
    scale: torch.Tensor  # float16 [out, groups]
    zero: torch.Tensor  # int32 packed (integer) or float16 [out, groups]
    zero_kind: str = "integer"
    indices: torch.Tensor | None = None  # N:M
    bitmask: torch.Tensor | None = None  # unstructured
    code_offsets: torch.Tensor | None = None  # unstructured
    tile_rows: int = bitmap.DEFAULT_TILE_ROWS

    @property
    def groups(self) -> int:
        return -(-self.shape[1] // self.group_size)

    @property
    def meta(self) -> dict:
        meta = {"format": FORMAT, "shape": list(self.shape), "pattern": self.pattern, "bits": self.bits,
                "group_size": self.group_size, "zero": self.zero_kind}
        if self.bitmask is not None:
            meta.update(tile_rows=self.tile_rows, code_words=int(self.codes.numel()))
        return meta


def pack(mask: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
         pattern: str = "unstructured", zero_kind: str | None = None, tile_rows: int = bitmap.DEFAULT_TILE_ROWS) -> SparseQuantWeight:
    """The mask [out, in] (True = kept), integer codes [out, in] (only the kept ones are stored) and the
    float16 scale and zero points [out, ceil(in / group_size)] over the original columns."""
    wide = group_quant.check_codes(codes, bits)
    if codes.dim() != 2 or mask.shape != codes.shape or mask.dtype != torch.bool or group_size <= 0:
        raise ValueError(f"mask (bool) and codes must both be [out, in] and group_size positive, got "
                         f"{mask.dtype} {tuple(mask.shape)}, {tuple(codes.shape)}, {group_size}")
    rows, cols = codes.shape
    scale16, stored_zero, kind = group_quant.pack_statistics(scale, zero, bits, (rows, -(-cols // group_size)), zero_kind)
    kept = wide[mask]  # row by row, ascending column
    nm_pattern = parse_pattern(pattern)
    if nm_pattern is not None:
        indices = nm.pack_indices(mask, *nm_pattern)
        words = pack_fields(kept.view(rows, -1), bits)
        return SparseQuantWeight((rows, cols), pattern, bits, group_size, words, scale16, stored_zero, kind, indices=indices)
    counts = mask.sum(1)
    words = pack_rows(kept, counts, bits)
    offsets = bitmap.tile_offsets(_slots(counts, bits)[0], tile_rows)
    return SparseQuantWeight((rows, cols), pattern, bits, group_size, words, scale16, stored_zero, kind,
                             bitmask=bitmap.pack_bitmask(mask), code_offsets=offsets, tile_rows=tile_rows)


def from_quantized(q: QuantizedWeight, pattern: str = "unstructured", tile_rows: int = bitmap.DEFAULT_TILE_ROWS) -> SparseQuantWeight:
    """A pruned QuantizedWeight (a mask; plain statistics; no lut, outliers or perm)."""
    extras = [name for name in ("lut", "outliers", "perm") if getattr(q, name) is not None]
    if q.keep is None or extras or any(isinstance(s, QuantizedStatistic) for s in (q.scale, q.zero)):
        raise ValueError(f"sparse_quant needs a mask and plain scale/zero statistics; this weight has "
                         f"{'no mask' if q.keep is None else extras or 'quantized statistics'}")
    return pack(q.keep, q.codes, q.scale, q.zero, q.bits, q.group_size, pattern,
                "float16" if q.zero.dtype == torch.float16 else None, tile_rows)


def _statistics(packed: SparseQuantWeight) -> tuple[torch.Tensor, torch.Tensor]:
    return group_quant.statistic_values(packed.scale, packed.zero, packed.zero_kind, packed.bits, packed.groups)


def dense_codes(packed: SparseQuantWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask bool [out, in], codes int64 [out, in]: the kept weights' codes, 0 where pruned)."""
    rows, cols = packed.shape
    nm_pattern = parse_pattern(packed.pattern)
    if nm_pattern is not None:
        columns = nm.kept_columns(packed.indices, *nm_pattern, cols)
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=columns.device).scatter_(1, columns, True)
        kept = read_fields(packed.codes, packed.bits, columns.shape[1]).reshape(-1)
    else:
        mask = bitmap.read_bitmask(packed.bitmask, cols)
        kept = read_rows(packed.codes, mask.sum(1), packed.bits)
    codes = torch.zeros(rows, cols, dtype=torch.int64, device=mask.device)
    codes[mask] = kept
    return mask, codes


def as_group_quant(packed: SparseQuantWeight) -> group_quant.GroupQuantWeight:
    """The same weight as a group_quant one (integer zero points only): every pruned weight's code is its group's zero
    point, so scale * (code - zero) is exactly 0 there. A kernel of the dense grid then reads it (bits a weight: the
    code width, against the sparse form's fewer)."""
    if packed.zero_kind != "integer":
        raise ValueError("a sparse weight with float zero points has no exact code for a pruned weight")
    mask, codes = dense_codes(packed)
    zero = group_quant.expand(_statistics(packed)[1], packed.group_size, packed.shape[1]).round().long()
    codes = torch.where(mask, codes, zero)
    return group_quant.GroupQuantWeight(packed.shape, packed.bits, packed.group_size, pack_fields(codes, packed.bits), packed.scale,
                                        packed.zero, "integer")


def unpack(packed: SparseQuantWeight) -> torch.Tensor:
    mask, codes = dense_codes(packed)
    cols = packed.shape[1]
    scale, zero = (group_quant.expand(s, packed.group_size, cols) for s in _statistics(packed))
    weight = scale * (codes.float() - zero)  # the expression of QuantizedWeight.dequantize
    return torch.where(mask, weight, torch.zeros_like(weight))


def to_tensors(packed: SparseQuantWeight, prefix: str) -> dict[str, torch.Tensor]:
    parts = {"indices": packed.indices, "bitmask": packed.bitmask, "codes": packed.codes, "code_offsets": packed.code_offsets,
             "scale": packed.scale, "zero": packed.zero}
    return {f"{prefix}.{name}": tensor for name, tensor in parts.items() if tensor is not None}


def from_tensors(tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> SparseQuantWeight:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{prefix}: format {meta.get('format')!r}, expected {FORMAT!r}")
    (rows, cols), bits, group_size, kind = meta["shape"], meta["bits"], meta["group_size"], meta["zero"]
    if bits not in group_quant.SUPPORTED_BITS or kind not in group_quant.ZERO_KINDS:
        raise ValueError(f"{prefix}: bits {bits} / zero {kind!r} not supported")
    groups = -(-cols // group_size)
    zero_shape, zero_dtypes = group_quant.stored_zero_shape(rows, groups, bits, kind)
    scale = check_tensor(tensors, f"{prefix}.scale", (torch.float16,), (rows, groups))
    zero = check_tensor(tensors, f"{prefix}.zero", zero_dtypes, zero_shape)
    nm_pattern = parse_pattern(meta["pattern"])
    if nm_pattern is not None:
        n, m = nm_pattern
        if not 0 < n < m <= 16 or cols % m:
            raise ValueError(f"{prefix}: pattern {n}:{m} does not fit input size {cols}")
        count = cols // m * n
        indices = check_tensor(tensors, f"{prefix}.indices", (torch.int32,), (rows, words_for(count, nm.index_bits(m))))
        codes = check_tensor(tensors, f"{prefix}.codes", (torch.int32,), (rows, words_for(count, bits)))
        return SparseQuantWeight((rows, cols), meta["pattern"], bits, group_size, codes, scale, zero, kind, indices=indices)
    tile_rows = meta["tile_rows"]
    return SparseQuantWeight(
        (rows, cols), meta["pattern"], bits, group_size,
        check_tensor(tensors, f"{prefix}.codes", (torch.int32,), (meta["code_words"],)), scale, zero, kind,
        bitmask=check_tensor(tensors, f"{prefix}.bitmask", (torch.int32,), (rows, words_for(cols, 1))),
        code_offsets=check_tensor(tensors, f"{prefix}.code_offsets", (torch.int32, torch.int64), (-(-rows // tile_rows) + 1,)),
        tile_rows=tile_rows)


def nbytes(packed: SparseQuantWeight) -> int:
    return tensor_bytes(to_tensors(packed, ""))


def reference_matmul(x: torch.Tensor, packed: SparseQuantWeight) -> torch.Tensor:
    """x @ W.T one output row at a time: the row's kept columns (N:M indices or bitmask), its codes from
    its words (for a bitmask, walking from its tile's first word), each dequantized with the statistics of
    its column's group, dotted with x at those columns (fp32 accumulation, x's dtype out)."""
    rows, cols = packed.shape
    xf = x.reshape(-1, cols).float()
    out = torch.empty(xf.shape[0], rows, dtype=torch.float32, device=x.device)
    scale, zero = _statistics(packed)
    nm_pattern = parse_pattern(packed.pattern)
    start = 0
    for r in range(rows):
        if nm_pattern is not None:
            n, m = nm_pattern
            count = cols // m * n
            index = read_fields(packed.indices[r : r + 1], nm.index_bits(m), count)[0]
            columns = torch.arange(count, device=x.device) // n * m + index
            codes = read_fields(packed.codes[r : r + 1], packed.bits, count)[0]
        else:
            if r % packed.tile_rows == 0:
                start = int(packed.code_offsets[r // packed.tile_rows])
            columns = read_bitmask_row(packed.bitmask[r], cols)
            words = words_for(columns.numel(), packed.bits)
            codes = read_fields(packed.codes[start : start + words].unsqueeze(0), packed.bits, columns.numel())[0]
            start += words
        group = columns // packed.group_size
        weight = scale[r, group] * (codes.float() - zero[r, group])
        out[:, r] = xf[:, columns] @ weight
    return out.to(x.dtype).reshape(*x.shape[:-1], rows)


def read_bitmask_row(words: torch.Tensor, cols: int) -> torch.Tensor:
    """The kept columns (int64, ascending) of one row's bitmask words."""
    return bitmap.read_bitmask(words.unsqueeze(0), cols)[0].nonzero().squeeze(1)
