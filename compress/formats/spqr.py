"""SpQR weights in a layout a kernel reads row by row: `bits`-bit codes (2..8) on a uniform grid per
(output row, group of `group_size` stored input columns), w = scale * (code - zero), where the scales and
zero points may themselves be quantized along the output dimension (SpQR's second level), plus float16
outliers in CSR, an optional keep mask and an optional column permutation (act-order).

Tensors (prefix P), groups = ceil(in / group_size) (a last, shorter group is allowed):
  P.codes, P.bitmask, P.code_offsets, P.outlier_row_ptr, P.outlier_cols, P.outlier_values, P.perm:
                 the code stream, keep mask, outliers and permutation, exactly as row_extras.py says
  P.scale        meta scale="float16": float16 [out, groups]
  P.scale_codes  meta scale="quantized": int32 [out, ceil(groups / (32 // scale_bits))], the second-level
                 codes of each row's group scales, row-aligned `scale_bits`-bit fields (words.py)
  P.scale_step   meta scale="quantized": float16 [out / scale_group_size, groups]
  P.scale_low    meta scale="quantized": float16 [out / scale_group_size, groups]; the scale of (row r,
                 group g) is low[r // sgs, g] + step[r // sgs, g] * code[r, g] in float32
  P.zero         meta zero="float16": float16 [out, groups]; zero="integer": int32
                 [out, ceil(groups / (32 // bits))], `bits`-bit fields like the codes
  P.zero_codes, P.zero_step, P.zero_low: meta zero="quantized", as the scale's (zero_bits, zero_group_size)
The weight at stored column j of row r is scale[r, j // group_size] * (code - zero[r, j // group_size])
(float32, as QuantizedWeight.dequantize), replaced by its outlier value where there is one, 0 where the
mask prunes; column j of the stored order is column perm[j] of the layer. `unpack` is dequantize() bit
for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats import bitmap, group_quant, row_extras
from compress.formats.quantized import QuantizedStatistic, QuantizedWeight
from compress.formats.words import check_tensor, exact_cast, pack_fields, read_fields, tensor_bytes, words_for

FORMAT = "spqr"
SCALE_KINDS = ("float16", "quantized")
ZERO_KINDS = ("float16", "integer", "quantized")
STATISTIC_FIELDS = ("scale", "scale_codes", "scale_step", "scale_low", "zero", "zero_codes", "zero_step", "zero_low")


@dataclass
class SpQRWeight:
    shape: tuple[int, int]  # (out, in)
    bits: int
    group_size: int
    codes: torch.Tensor  # int32, see row_extras
    scale_kind: str = "float16"
    zero_kind: str = "float16"
    scale_bits: int = 0  # second level (quantized statistics only)
    scale_group_size: int = 0
    zero_bits: int = 0
    zero_group_size: int = 0
    tile_rows: int = bitmap.DEFAULT_TILE_ROWS
    scale: torch.Tensor | None = None
    scale_codes: torch.Tensor | None = None
    scale_step: torch.Tensor | None = None
    scale_low: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    zero_codes: torch.Tensor | None = None
    zero_step: torch.Tensor | None = None
    zero_low: torch.Tensor | None = None
    bitmask: torch.Tensor | None = None
    code_offsets: torch.Tensor | None = None
    outlier_row_ptr: torch.Tensor | None = None
    outlier_cols: torch.Tensor | None = None
    outlier_values: torch.Tensor | None = None
    perm: torch.Tensor | None = None

    @property
    def groups(self) -> int:
        return -(-self.shape[1] // self.group_size)

    @property
    def meta(self) -> dict:
        meta = {"format": FORMAT, "shape": list(self.shape), "bits": self.bits, "group_size": self.group_size,
                "scale": self.scale_kind, "zero": self.zero_kind}
        if self.scale_kind == "quantized":
            meta.update(scale_bits=self.scale_bits, scale_group_size=self.scale_group_size)
        if self.zero_kind == "quantized":
            meta.update(zero_bits=self.zero_bits, zero_group_size=self.zero_group_size)
        return meta | row_extras.extras_meta(vars(self), self.tile_rows)


def _pack_quantized(statistic: QuantizedStatistic, name: str, shape: tuple[int, int]) -> dict:
    rows, groups = shape
    if statistic.bits not in row_extras.SUPPORTED_BITS or statistic.group_size <= 0 or rows % statistic.group_size:
        raise ValueError(f"{name}: second-level bits {statistic.bits} (2..8) and group size {statistic.group_size} "
                         f"(dividing the output size {rows}) not supported")
    if tuple(statistic.codes.shape) != shape:
        raise ValueError(f"{name} codes {tuple(statistic.codes.shape)} must be [out, groups] = {shape}")
    outer = (rows // statistic.group_size, groups)
    if tuple(statistic.step.shape) != outer or tuple(statistic.low.shape) != outer:
        raise ValueError(f"{name} step {tuple(statistic.step.shape)} and low {tuple(statistic.low.shape)} must be {outer}")
    return {f"{name}_codes": pack_fields(row_extras.check_codes(statistic.codes, statistic.bits), statistic.bits),
            f"{name}_step": exact_cast(statistic.step.float(), torch.float16, f"{name} step"),
            f"{name}_low": exact_cast(statistic.low.float(), torch.float16, f"{name} low"),
            f"{name}_bits": statistic.bits, f"{name}_group_size": statistic.group_size}


def _pack_statistics(q: QuantizedWeight, shape: tuple[int, int]) -> dict:
    fields: dict = {}
    if isinstance(q.scale, QuantizedStatistic):
        fields.update(_pack_quantized(q.scale, "scale", shape), scale_kind="quantized")
    else:
        if q.scale is None or tuple(q.scale.shape) != shape:
            raise ValueError(f"scale must be [out, groups] = {shape}")
        fields.update(scale=exact_cast(q.scale.float(), torch.float16, "scale"), scale_kind="float16")
    if isinstance(q.zero, QuantizedStatistic):
        return fields | _pack_quantized(q.zero, "zero", shape) | {"zero_kind": "quantized"}
    if q.zero is None or tuple(q.zero.shape) != shape:
        raise ValueError(f"zero must be [out, groups] = {shape}")
    zero = q.zero.float()
    in_range = zero.numel() == 0 or bool(zero.min() >= 0 and zero.max() < 2**q.bits)
    integer = q.zero.dtype != torch.float16 and bool(torch.equal(zero, zero.round())) and in_range  # stored in `bits` bits
    if integer:
        return fields | {"zero": pack_fields(zero.to(torch.int64), q.bits), "zero_kind": "integer"}
    return fields | {"zero": exact_cast(zero, torch.float16, "zero"), "zero_kind": "float16"}


def from_quantized(q: QuantizedWeight, tile_rows: int = bitmap.DEFAULT_TILE_ROWS) -> SpQRWeight:
    """Any uniform-grid QuantizedWeight (no lut), bits 2..8: plain or second-level statistics, optional
    outliers, keep mask and permutation."""
    if q.lut is not None:
        raise ValueError("spqr stores uniform-grid weights; this one has a lut (use the lut format)")
    if q.group_size <= 0:
        raise ValueError(f"group_size must be positive, got {q.group_size}")
    rows, cols = q.shape
    shape = (rows, -(-cols // q.group_size))
    extras = row_extras.pack_extras(q, tile_rows)
    return SpQRWeight((rows, cols), q.bits, q.group_size, tile_rows=tile_rows, **_pack_statistics(q, shape),
                      **extras)


def _quantized_values(codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor, bits: int, group_size: int, groups: int) -> torch.Tensor:
    """float32 [out, groups], by QuantizedStatistic.values's expression."""
    step = step.float().repeat_interleave(group_size, dim=0)
    low = low.float().repeat_interleave(group_size, dim=0)
    return low + step * read_fields(codes, bits, groups).float()


def statistic_values(packed: SpQRWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (scale, zero), [out, groups] each, from their stored forms."""
    groups = packed.groups
    if packed.scale_kind == "quantized":
        scale = _quantized_values(packed.scale_codes, packed.scale_step, packed.scale_low, packed.scale_bits, packed.scale_group_size, groups)
    else:
        scale = packed.scale.float()
    if packed.zero_kind == "quantized":
        zero = _quantized_values(packed.zero_codes, packed.zero_step, packed.zero_low, packed.zero_bits, packed.zero_group_size, groups)
    elif packed.zero_kind == "integer":
        zero = read_fields(packed.zero, packed.bits, groups).float()
    else:
        zero = packed.zero.float()
    return scale, zero


def unpack(packed: SpQRWeight) -> torch.Tensor:
    rows, cols = packed.shape
    codes, mask = row_extras.read_codes(packed, cols)
    scale, zero = (group_quant.expand(s, packed.group_size, cols) for s in statistic_values(packed))
    return row_extras.finish_weight(scale * (codes.float() - zero), packed, mask)  # the expression of dequantize


def to_tensors(packed: SpQRWeight, prefix: str) -> dict[str, torch.Tensor]:
    fields = vars(packed)
    statistics = {f"{prefix}.{name}": fields[name] for name in STATISTIC_FIELDS if fields[name] is not None}
    return row_extras.extras_tensors(fields, prefix) | statistics


def _read_quantized(tensors: dict, prefix: str, name: str, meta: dict, shape: tuple[int, int]) -> dict:
    rows, groups = shape
    bits, group_size = meta[f"{name}_bits"], meta[f"{name}_group_size"]
    if bits not in row_extras.SUPPORTED_BITS or group_size <= 0 or rows % group_size:
        raise ValueError(f"{prefix}: {name} second-level bits {bits} / group size {group_size} not supported")
    outer = (rows // group_size, groups)
    return {f"{name}_codes": check_tensor(tensors, f"{prefix}.{name}_codes", (torch.int32,), (rows, words_for(groups, bits))),
            f"{name}_step": check_tensor(tensors, f"{prefix}.{name}_step", (torch.float16,), outer),
            f"{name}_low": check_tensor(tensors, f"{prefix}.{name}_low", (torch.float16,), outer),
            f"{name}_bits": bits, f"{name}_group_size": group_size}


def from_tensors(tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> SpQRWeight:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{prefix}: format {meta.get('format')!r}, expected {FORMAT!r}")
    (rows, cols), bits, group_size = meta["shape"], meta["bits"], meta["group_size"]
    if meta["scale"] not in SCALE_KINDS or meta["zero"] not in ZERO_KINDS or group_size <= 0:
        raise ValueError(f"{prefix}: scale {meta['scale']!r} / zero {meta['zero']!r} / group_size {group_size} not supported")
    shape = (rows, -(-cols // group_size))
    fields = row_extras.extras_from_tensors(tensors, prefix, meta)
    fields.update(scale_kind=meta["scale"], zero_kind=meta["zero"], tile_rows=meta.get("tile_rows", bitmap.DEFAULT_TILE_ROWS))
    if meta["scale"] == "quantized":
        fields.update(_read_quantized(tensors, prefix, "scale", meta, shape))
    else:
        fields["scale"] = check_tensor(tensors, f"{prefix}.scale", (torch.float16,), shape)
    if meta["zero"] == "quantized":
        fields.update(_read_quantized(tensors, prefix, "zero", meta, shape))
    elif meta["zero"] == "integer":
        fields["zero"] = check_tensor(tensors, f"{prefix}.zero", (torch.int32,), (rows, words_for(shape[1], bits)))
    else:
        fields["zero"] = check_tensor(tensors, f"{prefix}.zero", (torch.float16,), shape)
    return SpQRWeight((rows, cols), bits, group_size, **fields)


def nbytes(packed: SpQRWeight) -> int:
    return tensor_bytes(to_tensors(packed, ""))


def reference_matmul(x: torch.Tensor, packed: SpQRWeight) -> torch.Tensor:
    """x @ W.T one output row at a time: x gathered by perm, the row's kept columns and codes from its
    words, each code dequantized with its group's first-level statistics (decoded from the second level),
    the row's outliers in place of their grid weights, dotted with x (fp32 accumulation, x's dtype out)."""
    rows, cols = packed.shape
    xf = row_extras.stored_order(x.reshape(-1, cols).float(), packed)
    out = torch.empty(xf.shape[0], rows, dtype=torch.float32, device=x.device)
    scale, zero = statistic_values(packed)
    for r, columns, codes in row_extras.iter_rows(packed, cols):
        group = columns // packed.group_size
        weights = scale[r, group] * (codes.float() - zero[r, group])
        out[:, r] = xf[:, columns] @ row_extras.apply_row_outliers(weights, columns, packed, r)
    return out.to(x.dtype).reshape(*x.shape[:-1], rows)
