"""N:M sparse weights in a layout a kernel reads row by row: N of every M consecutive input weights
kept (0 < N < M <= 16: 2:4, 1:4, 4:8, 2:8, ...).

Tensors (prefix P):
  P.values   float16 or bfloat16 [out, in * N / M]: the kept weights, row by row, group by group, in
             ascending column order within a group (a kept weight that is exactly 0 is still stored)
  P.indices  int32 [out, ceil(in * N / M / per_word)]: each kept value's index inside its group of M,
             index_bits = ceil(log2 M) bits each (1 for M = 2, 2 for M <= 4, 3 for M <= 8, 4 for M <= 16),
             per_word = 32 // index_bits, every row starting at a word boundary; index k of a row is bits
             [(k % per_word) * index_bits, ...) of word k // per_word, least significant first (3-bit
             indices: 10 to a word, the top 2 bits zero). Value k of a row is column
             (k // N) * M + index k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats.words import check_tensor, exact_cast, pack_fields, read_fields, tensor_bytes, words_for

FORMAT = "nm"
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def index_bits(m: int) -> int:
    """ceil(log2 M): the bits of an index inside a group of M."""
    return (m - 1).bit_length()


def check_nm(mask: torch.Tensor, n: int, m: int) -> None:
    """Refuse a mask [out, in] that does not keep exactly N of every M consecutive input weights."""
    if not 0 < n < m <= 16:
        raise ValueError(f"N:M needs 0 < N < M <= 16, got {n}:{m}")
    if mask.dim() != 2 or mask.shape[1] % m:
        raise ValueError(f"input size {mask.shape[-1]} is not divisible by M={m} of pattern {n}:{m}")
    counts = mask.reshape(mask.shape[0], -1, m).sum(-1)
    wrong = (counts != n).nonzero()
    if wrong.numel():
        row, group = wrong[0].tolist()
        raise ValueError(f"mask is not {n}:{m}: row {row}, group {group} (columns {group * m}..{group * m + m - 1}) keeps "
                         f"{int(counts[row, group])} of {m}")


def check_pruned_zero(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Refuse a nonzero weight where the mask prunes (it would not survive the round trip)."""
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool and shaped like the weight {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    wrong = (~mask & (weight != 0)).nonzero()
    if wrong.numel():
        raise ValueError(f"weight {wrong[0].tolist()} is nonzero but pruned by the mask (apply the mask first)")


def pack_indices(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """int32 words of the in-group index of every kept weight of an N:M mask (checked)."""
    check_nm(mask, n, m)
    rows = mask.shape[0]
    within = torch.arange(mask.shape[1], device=mask.device) % m
    return pack_fields(within.expand_as(mask)[mask].view(rows, -1), index_bits(m))


def kept_columns(indices: torch.Tensor, n: int, m: int, cols: int) -> torch.Tensor:
    """int64 [rows, cols * N / M]: the column of every stored value, from the packed indices."""
    count = cols // m * n
    index = read_fields(indices, index_bits(m), count)
    return torch.arange(count, device=indices.device) // n * m + index


@dataclass
class NMWeight:
    shape: tuple[int, int]  # (out, in)
    n: int
    m: int
    values: torch.Tensor  # float16 / bfloat16 [out, in * n / m]
    indices: torch.Tensor  # int32 [out, words_for(in * n / m, index_bits(m))]

    @property
    def meta(self) -> dict:
        dtype = next(name for name, d in VALUE_DTYPES.items() if d == self.values.dtype)
        return {"format": FORMAT, "shape": list(self.shape), "n": self.n, "m": self.m, "dtype": dtype}


def value_dtype(dtype: torch.dtype | str) -> torch.dtype:
    dtype = VALUE_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in VALUE_DTYPES.values():
        raise ValueError(f"values are stored in float16 or bfloat16, got {dtype}")
    return dtype


def pack(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int, dtype: torch.dtype | str = torch.bfloat16) -> NMWeight:
    """An N:M pruned weight [out, in] and its mask (True = kept). Every kept weight must be exactly
    representable in `dtype` and every pruned one zero: the format rebuilds the weight bit for bit."""
    dtype = value_dtype(dtype)
    check_pruned_zero(weight, mask)
    indices = pack_indices(mask, n, m)
    rows = weight.shape[0]
    values = exact_cast(weight.float(), dtype, "weight")[mask].view(rows, -1)
    return NMWeight(tuple(weight.shape), n, m, values, indices)


def unpack(packed: NMWeight) -> torch.Tensor:
    rows, cols = packed.shape
    columns = kept_columns(packed.indices, packed.n, packed.m, cols)
    weight = torch.zeros(rows, cols, dtype=torch.float32, device=packed.values.device)
    return weight.scatter_(1, columns, packed.values.float())


def to_tensors(packed: NMWeight, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.values": packed.values, f"{prefix}.indices": packed.indices}


def from_tensors(tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> NMWeight:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{prefix}: format {meta.get('format')!r}, expected {FORMAT!r}")
    (rows, cols), n, m = meta["shape"], meta["n"], meta["m"]
    if not 0 < n < m <= 16 or cols % m:
        raise ValueError(f"{prefix}: pattern {n}:{m} does not fit input size {cols}")
    count = cols // m * n
    values = check_tensor(tensors, f"{prefix}.values", (value_dtype(meta["dtype"]),), (rows, count))
    indices = check_tensor(tensors, f"{prefix}.indices", (torch.int32,), (rows, words_for(count, index_bits(m))))
    return NMWeight((rows, cols), n, m, values, indices)


def nbytes(packed: NMWeight) -> int:
    return tensor_bytes(to_tensors(packed, ""))


def reference_matmul(x: torch.Tensor, packed: NMWeight) -> torch.Tensor:
    """x @ W.T, one output row at a time: decode the row's indices, gather x at the kept columns and dot
    with the row's values (fp32 accumulation, x's dtype out)."""
    rows, cols = packed.shape
    xf = x.reshape(-1, cols).float()
    out = torch.empty(xf.shape[0], rows, dtype=torch.float32, device=x.device)
    count = cols // packed.m * packed.n
    for r in range(rows):
        index = read_fields(packed.indices[r : r + 1], index_bits(packed.m), count)[0]
        columns = torch.arange(count, device=x.device) // packed.n * packed.m + index
        out[:, r] = xf[:, columns] @ packed.values[r].float()
    return out.to(x.dtype).reshape(*x.shape[:-1], rows)
