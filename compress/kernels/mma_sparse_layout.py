"""The re-packed form of a 2:4 sparse, group-quantized int4 weight (sparse_quant, pattern 2:4) for the sparse tensor-core
instruction `mma.sp.m16n8k32` (cuda_mma_sparse.py): the tensor core takes the kept values and a 2-bit position for
each, so the kernel reads a quarter byte of codes and an eighth of a byte of positions a weight and decodes only the
kept codes.

For 16 output rows (a tile) and 128 columns (a unit, 32 groups of 4) a warp runs 4 instructions j. Instruction j's
4-column chunk c (0-7) is the unit's group 16 * (c % 2) + 4 * j + c // 2, so the two lanes of a pair (t = 2P, 2P + 1)
read the activations of 16 consecutive columns for each j and exchange half of them. Lane (g, t) holds, for each j,
one word of 8 kept codes: rows g and g + 8, chunks t and t + 4, both kept values; field pair q (fields q and q + 4,
one shift-and-mask as in mma_layout.py) is A register q: q & 1 the row half, q >> 1 the chunk half, each pair the
chunk's two kept values in column order.

The positions (the instruction's metadata, sparsity selector 0): lanes t = 0 and 1 of a quad give one word an
instruction; lane (g, t') holds chunks 4 t' .. 4 t' + 3, row g in bits 0-15 and row g + 8 in bits 16-31, chunk k at
bits 4 k (first kept position) and 4 k + 2 (second). This layout is read from public sparse-MMA code, not from the
ISA text (which gives it as a figure); `benchmarks/mma_sp_layout_probe.py` measured it on an H200 and found exactly
this (benchmarks/results/mma_sp_layout-2026-12-05.json). `meta_shift` is the one place it lives.

Tensors: codes int32 [tiles, units, 32 lanes, 4 instructions]; positions int32 [tiles, units, 8 (g), 2 (t'), 4];
statistics as mma_layout.py. Row tiles are padded to a multiple of TILE_PAD with zero codes and scales (and valid
positions 0, 1).

The same layout carries 2:4 weights of 16-bit values (nm, `pack_values`): the four A registers of instruction j are
the kept values themselves, in the same places as the codes' field pairs (register q: row half q & 1, chunk half
q >> 1, the chunk's two kept values in its low and high half), one uint4 a lane an instruction: values int32
[tiles, units, 4 instructions, 32 lanes, 4 registers], so each of the four loads of a unit is 512 contiguous bytes.
"""

from __future__ import annotations

import dataclasses

import torch

from compress.formats import nm, sparse_quant
from compress.formats.words import pack_fields, read_fields
from compress.kernels.mma_layout import UNIT, padded_tiles, statistic_values, statistics


def meta_shift(row_half, chunk_in_lane, kept):
    """Bit offset, in the metadata word, of the position of kept value `kept` (0, 1) of chunk 4 t' + chunk_in_lane
    in row g + 8 * row_half."""
    return 16 * row_half + 4 * chunk_in_lane + 2 * kept


@dataclasses.dataclass
class SparseMmaWeight:
    shape: tuple[int, int]  # (out, in)
    group_size: int  # a multiple of UNIT
    codes: torch.Tensor  # int32 [tiles, units, 32, 4]
    positions: torch.Tensor  # int32 [tiles, units, 8, 2, 4]
    stats: torch.Tensor  # int32 [tiles, groups, 8, 2], as mma_layout.MmaWeight

    @property
    def tiles(self) -> int:
        return self.codes.shape[0]


def shape_ok(packed) -> bool:
    """2:4 sparse int4 codes, integer zero points, groups of whole 128-column units, whole units a row."""
    return (isinstance(packed, sparse_quant.SparseQuantWeight) and packed.pattern == "2:4" and packed.bits == 4
            and packed.zero_kind == "integer" and packed.group_size % UNIT == 0 and packed.shape[1] % UNIT == 0)


def _chunk_group(chunk: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
    """The unit's group (0-31) that instruction j's chunk c holds."""
    return 16 * (chunk % 2) + 4 * instruction + chunk // 2


def _split(kept: torch.Tensor, tiles: int, units: int) -> torch.Tensor:
    """[tiles * 16, units * 64] kept-order values of every row as [tile, rh, g, unit, P, j, qh, th, e]: the unit's group
    16 P + 4 j + i with i = 2 qh + th, so that lane (g, t = 2 th + P) holds chunk t + 4 qh (instruction j)."""
    return kept.view(tiles, 2, 8, units, 2, 4, 2, 2, 2)


def _meta_words(position: torch.Tensor, tiles: int, units: int) -> torch.Tensor:
    """The metadata words (int32 [tiles, units, 8, 2, 4]) of every row's kept positions [tiles * 16, units * 64]."""
    # lane (g, t') chunk 4 t' + k, k = 2 i' + P' -> chunk c = 4 t' + k: P = c % 2 = k % 2, i = c // 2 = 2 t' + k // 2
    pos = _split(position, tiles, units).permute(0, 3, 2, 6, 5, 1, 7, 4, 8)  # [.., g, t', j, rh, k//2, P, kept]
    pos = pos.reshape(tiles, units, 8, 2, 4, 2, 4, 2)  # [.., g, t', j, rh, k, kept]
    shifts = torch.tensor([[[meta_shift(rh, k, e) for e in range(2)] for k in range(4)] for rh in range(2)], device=position.device)
    meta = (pos << shifts).sum((-3, -2, -1))
    return torch.where(meta >= 1 << 31, meta - (1 << 32), meta).to(torch.int32).contiguous()


def _pad_rows(kept: torch.Tensor, tiles: int) -> torch.Tensor:
    """Every row's kept values [rows, n] with zero rows up to tiles * 16."""
    return torch.cat([kept, kept.new_zeros(tiles * 16 - kept.shape[0], kept.shape[1])])


def _positions(indices: torch.Tensor, rows: int, cols: int, tiles: int) -> torch.Tensor:
    """Every row's kept positions in their groups of 4, padding rows 0, 1 (valid, ascending)."""
    position = _pad_rows(read_fields(indices, nm.index_bits(4), cols // 2), tiles)
    position[rows:, 1::2] = 1
    return position


def pack(packed: sparse_quant.SparseQuantWeight) -> SparseMmaWeight:
    if not shape_ok(packed):
        raise ValueError(f"not a layout the sparse tensor-core kernel reads: {packed.pattern} {packed.bits}-bit, group "
                         f"{packed.group_size}, {packed.zero_kind} zero points, {packed.shape}")
    rows, cols = packed.shape
    tiles, units = padded_tiles(rows), cols // UNIT
    code = _pad_rows(read_fields(packed.codes, 4, cols // 2), tiles)  # padding rows: code 0 (scale 0)
    lane_code = _split(code, tiles, units).permute(0, 3, 2, 7, 4, 5, 8, 6, 1)  # [.., g, th, P, j, e, qh, rh]
    fields = lane_code.reshape(-1, 8)  # field = e * 4 + qh * 2 + rh, lanes g * 4 + th * 2 + P
    words = pack_fields(fields, 4).view(tiles, units, 32, 4)
    meta = _meta_words(_positions(packed.indices, rows, cols, tiles), tiles, units)
    return SparseMmaWeight(packed.shape, packed.group_size, words.contiguous(), meta, statistics(packed.scale, packed.zero, 4, rows, tiles))


@dataclasses.dataclass
class SparseMmaValues:
    shape: tuple[int, int]  # (out, in)
    dtype: torch.dtype  # of the values: the activations' (the instruction takes both in one type)
    values: torch.Tensor  # int32 [tiles, units, 4, 32, 4]: a lane's A registers of each instruction
    positions: torch.Tensor  # int32 [tiles, units, 8, 2, 4], as SparseMmaWeight

    @property
    def tiles(self) -> int:
        return self.values.shape[0]


def values_shape_ok(packed) -> bool:
    """2:4 weights of 16-bit values, whole 128-column units a row."""
    return isinstance(packed, nm.NMWeight) and (packed.n, packed.m) == (2, 4) and packed.shape[1] % UNIT == 0


def pack_values(packed: nm.NMWeight, dtype: torch.dtype) -> SparseMmaValues:
    """A 2:4 weight for `dtype` (bfloat16 / float16) activations: its values in that type (exact when it is theirs)."""
    if not values_shape_ok(packed) or dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"not a layout the sparse tensor-core kernel reads: {type(packed).__name__} {getattr(packed, 'n', '?')}:"
                         f"{getattr(packed, 'm', '?')} of shape {packed.shape} for {dtype} activations (2:4, 128-column units)")
    rows, cols = packed.shape
    tiles, units = padded_tiles(rows), cols // UNIT
    value = _pad_rows(packed.values.to(dtype), tiles).view(torch.int16)
    lanes = _split(value, tiles, units).permute(0, 3, 5, 2, 7, 4, 6, 1, 8)  # [tile, unit, j, g, th, P, qh, rh, e]
    words = lanes.contiguous().view(torch.int32).view(tiles, units, 4, 32, 4)
    return SparseMmaValues(packed.shape, dtype, words, _meta_words(_positions(packed.indices, rows, cols, tiles), tiles, units))


def _lane_places(view):
    """For every (tile, unit, lane, instruction j, A register q, kept value e) the kernel reads: where it reads it
    (its tensor's index) and the row and column the instruction gives it (the positions through meta_shift)."""
    rows, cols = view.shape
    units, dev = cols // UNIT, view.positions.device
    tile, u, lane, j, q, e = torch.meshgrid(*(torch.arange(n, device=dev) for n in (view.tiles, units, 32, 4, 4, 2)), indexing="ij")
    g, t = lane // 4, lane % 4
    row_half, chunk = q % 2, t + 4 * (q // 2)
    meta = view.positions.long()[tile, u, g, chunk // 4, j] & 0xFFFFFFFF
    position = (meta >> meta_shift(row_half, chunk % 4, e)) & 3
    row = tile * 16 + g + 8 * row_half
    col = u * UNIT + 4 * _chunk_group(chunk, j) + position
    return (tile, u, lane, j, q, e, g, row_half), row, col


def dense(view: SparseMmaWeight) -> torch.Tensor:
    """float32 [out, in] from the re-packed form, indexed as the kernel and the instruction index it."""
    (tile, u, lane, j, q, e, g, row_half), row, col = _lane_places(view)
    code = (view.codes.long()[tile, u, lane, j] & 0xFFFFFFFF) >> ((q + 4 * e) * 4) & 15
    scale, zero = statistic_values(view.stats.long()[tile, col // view.group_size, g], row_half)
    out = torch.zeros(view.tiles * 16, view.shape[1], dtype=torch.float32, device=code.device)
    out[row.flatten(), col.flatten()] = (scale * (code - zero).float()).flatten()
    return out[: view.shape[0]]


def dense_values(view: SparseMmaValues) -> torch.Tensor:
    """float32 [out, in] from the values layout, indexed as the kernel and the instruction index it (lane, instruction,
    A register, its low or high half)."""
    (tile, u, lane, j, q, e, _, _), row, col = _lane_places(view)
    halves = view.values.view(torch.int16).view(*view.values.shape, 2)
    value = halves[tile, u, j, lane, q, e].view(view.dtype)
    out = torch.zeros(view.tiles * 16, view.shape[1], dtype=torch.float32, device=value.device)
    out[row.flatten(), col.flatten()] = value.float().flatten()
    return out[: view.shape[0]]
