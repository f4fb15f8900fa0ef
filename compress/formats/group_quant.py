"""Group-quantized weights in a layout a kernel reads row by row: int2/int3/int4/int8 codes on a uniform
grid per (output row, group of `group_size` input columns), w = scale * (code - zero).

Tensors (prefix P):
  P.codes  int32 [out, ceil(in / per_word)]: the codes of each row packed into 32-bit words, every row
           starting at a word boundary; per_word = 32 // bits (16 for 2 bits, 10 for 3 bits with the top
           2 bits of each word left zero so no code straddles a word, 8 for 4 bits, 4 for 8 bits); code k
           of a row is bits [(k % per_word) * bits, ...) of word k // per_word, least significant first
  P.scale  float16 [out, groups], groups = ceil(in / group_size) (a last, shorter group is allowed)
  P.zero   int32 [out, ceil(groups / per_word)]: integer zero points packed like the codes (meta
           zero="integer"), or float16 [out, groups] (zero="float16")
Values are read as unsigned 32-bit words (the int32 dtype is only the storage type).

The row-aligned word layout is compress/formats/words.py; the statistics here are shared with
sparse_quant; `unpack` is `QuantizedWeight.dequantize()` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats.quantized import QuantizedStatistic, QuantizedWeight
from compress.formats.words import check_tensor, exact_cast, pack_fields, read_fields, tensor_bytes, words_for

FORMAT = "group_quant"
SUPPORTED_BITS = (2, 3, 4, 8)
ZERO_KINDS = ("integer", "float16")


# -- statistics: float16 scales and integer or float16 zero points per (row, group) -----------------------


def pack_statistics(scale: torch.Tensor, zero: torch.Tensor, bits: int, shape: tuple[int, int],
                    zero_kind: str | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(float16 scale, stored zero, zero kind) for [out, groups] statistics. zero_kind None: integer
    when every zero point is an integer in [0, 2^bits), else float16."""
    if scale.shape != shape or zero.shape != shape:
        raise ValueError(f"scale {tuple(scale.shape)} and zero {tuple(zero.shape)} must both be [out, groups] = {shape}")
    if zero_kind not in (None, *ZERO_KINDS):
        raise ValueError(f"zero_kind must be one of {ZERO_KINDS} or None, got {zero_kind!r}")
    scale16 = exact_cast(scale, torch.float16, "scale")
    zero32 = zero.float()
    integer = bool(torch.equal(zero32, zero32.round()) and (zero32.numel() == 0 or (zero32.min() >= 0 and zero32.max() < 2**bits)))
    kind = zero_kind or ("integer" if integer else "float16")
    if kind == "integer":
        if not integer:
            raise ValueError(f"zero points must be integers in [0, {2**bits - 1}] to be stored in {bits} bits (use zero_kind='float16')")
        return scale16, pack_fields(zero32.to(torch.int64), bits), kind
    return scale16, exact_cast(zero, torch.float16, "zero"), kind


def statistic_values(scale: torch.Tensor, zero: torch.Tensor, zero_kind: str, bits: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (scale, zero), [out, groups] each, from their stored forms."""
    zero = read_fields(zero, bits, groups).float() if zero_kind == "integer" else zero.float()
    return scale.float(), zero


def stored_zero_shape(rows: int, groups: int, bits: int, zero_kind: str) -> tuple[tuple[int, int], tuple[torch.dtype]]:
    if zero_kind == "integer":
        return (rows, words_for(groups, bits)), (torch.int32,)
    return (rows, groups), (torch.float16,)


def check_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 codes, refusing non-integers and codes outside [0, 2^bits)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if codes.is_floating_point() and not torch.equal(codes, codes.round()):
        raise ValueError("codes must be integers")
    wide = codes.to(torch.int64)
    if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) >= 2**bits):
        bad = ((wide < 0) | (wide >= 2**bits)).nonzero()[0].tolist()
        raise ValueError(f"code {int(wide[tuple(bad)])} at {bad} is outside [0, {2**bits - 1}] for {bits} bits")
    return wide


# -- the format ------------------------------------------------------------------------------------------


@dataclass
class GroupQuantWeight:
    shape: tuple[int, int]  # (out, in)
    bits: int
    group_size: int
    codes: torch.Tensor  # int32 [out, words_for(in, bits)]
    scale: torch.Tensor  # float16 [out, groups]
    zero: torch.Tensor  # int32 [out, words_for(groups, bits)] (integer) or float16 [out, groups]
    zero_kind: str = "integer"

    @property
    def groups(self) -> int:
        return -(-self.shape[1] // self.group_size)

    @property
    def meta(self) -> dict:
        return {"format": FORMAT, "shape": list(self.shape), "bits": self.bits, "group_size": self.group_size, "zero": self.zero_kind}


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
         zero_kind: str | None = None) -> GroupQuantWeight:
    """Integer codes [out, in] with their float16 scale and zero points [out, ceil(in / group_size)]."""
    wide = check_codes(codes, bits)
    if codes.dim() != 2 or group_size <= 0:
        raise ValueError(f"codes must be [out, in] and group_size positive, got {tuple(codes.shape)} and {group_size}")
    rows, cols = codes.shape
    scale16, stored_zero, kind = pack_statistics(scale, zero, bits, (rows, -(-cols // group_size)), zero_kind)
    return GroupQuantWeight((rows, cols), bits, group_size, pack_fields(wide, bits), scale16, stored_zero, kind)


def from_quantized(q: QuantizedWeight) -> GroupQuantWeight:
    """A plain QuantizedWeight (float16 scale, integer or float16 zero; no lut, outliers, perm or mask)."""
    extras = [name for name in ("lut", "outliers", "perm", "keep") if getattr(q, name) is not None]
    if extras or any(isinstance(s, QuantizedStatistic) for s in (q.scale, q.zero)):
        raise ValueError(f"group_quant holds plain scale/zero statistics only; this weight has {extras or 'quantized statistics'}")
    return pack(q.codes, q.scale, q.zero, q.bits, q.group_size, "float16" if q.zero.dtype == torch.float16 else None)


def expand(statistic: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """[out, groups] -> [out, cols]: each group's value on each of its columns (as QuantizedWeight.group_values)."""
    return statistic.repeat_interleave(group_size, dim=1)[:, :cols]


def unpack(packed: GroupQuantWeight) -> torch.Tensor:
    rows, cols = packed.shape
    scale, zero = statistic_values(packed.scale, packed.zero, packed.zero_kind, packed.bits, packed.groups)
    codes = read_fields(packed.codes, packed.bits, cols).float()
    return expand(scale, packed.group_size, cols) * (codes - expand(zero, packed.group_size, cols))


def to_tensors(packed: GroupQuantWeight, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.codes": packed.codes, f"{prefix}.scale": packed.scale, f"{prefix}.zero": packed.zero}


def from_tensors(tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> GroupQuantWeight:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{prefix}: format {meta.get('format')!r}, expected {FORMAT!r}")
    (rows, cols), bits, group_size, kind = meta["shape"], meta["bits"], meta["group_size"], meta["zero"]
    if bits not in SUPPORTED_BITS or kind not in ZERO_KINDS:
        raise ValueError(f"{prefix}: bits {bits} / zero {kind!r} not supported")
    groups = -(-cols // group_size)
    zero_shape, zero_dtypes = stored_zero_shape(rows, groups, bits, kind)
    return GroupQuantWeight(
        (rows, cols), bits, group_size,
        check_tensor(tensors, f"{prefix}.codes", (torch.int32,), (rows, words_for(cols, bits))),
        check_tensor(tensors, f"{prefix}.scale", (torch.float16,), (rows, groups)),
        check_tensor(tensors, f"{prefix}.zero", zero_dtypes, zero_shape), kind)


def nbytes(packed: GroupQuantWeight) -> int:
    return tensor_bytes(to_tensors(packed, ""))


def reference_matmul(x: torch.Tensor, packed: GroupQuantWeight) -> torch.Tensor:
    """x @ W.T, decoding one row of W at a time from its words (fp32 accumulation, x's dtype out)."""
    rows, cols = packed.shape
    xf = x.reshape(-1, cols).float()
    out = torch.empty(xf.shape[0], rows, dtype=torch.float32, device=x.device)
    scale, zero = statistic_values(packed.scale, packed.zero, packed.zero_kind, packed.bits, packed.groups)
    for r in range(rows):
        codes = read_fields(packed.codes[r : r + 1], packed.bits, cols)[0].float()
        weight = torch.empty(cols, dtype=torch.float32, device=x.device)
        for g, start in enumerate(range(0, cols, packed.group_size)):
            end = min(start + packed.group_size, cols)
            weight[start:end] = scale[r, g] * (codes[start:end] - zero[r, g])
        out[:, r] = xf @ weight
    return out.to(x.dtype).reshape(*x.shape[:-1], rows)
