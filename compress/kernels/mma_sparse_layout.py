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


def pack(packed: sparse_quant.SparseQuantWeight) -> SparseMmaWeight:
    if not shape_ok(packed):
        raise ValueError(f"not a layout the sparse tensor-core kernel reads: {packed.pattern} {packed.bits}-bit, group "
                         f"{packed.group_size}, {packed.zero_kind} zero points, {packed.shape}")
    rows, cols = packed.shape
    tiles, units, device = padded_tiles(rows), cols // UNIT, packed.codes.device
    kept = cols // 2
    # every row's kept values in column order: 2 a group; their codes and positions inside the group
    position = torch.zeros(tiles * 16, kept, dtype=torch.int64, device=device)
    position[:, 1::2] = 1  # padding rows: positions 0, 1 and code 0 (scale 0)
    code = torch.zeros(tiles * 16, kept, dtype=torch.int64, device=device)
    position[:rows] = read_fields(packed.indices, nm.index_bits(4), kept)
    code[:rows] = read_fields(packed.codes, 4, kept)
    # [tile, rh, g, unit, group 32, kept 2] -> instruction j, chunk c = (P, i): group = 16 P + 4 j + i
    split = lambda t: t.view(tiles, 2, 8, units, 2, 4, 4, 2)  # noqa: E731 - [.., P, j, i, kept]
    code, position = split(code), split(position)
    # lane (g, t) chunk t + 4 qh: P = t % 2, i = t // 2 + 2 qh -> t = 2 (i % 2) + P, qh = i // 2
    lane_code = code.view(tiles, 2, 8, units, 2, 4, 2, 2, 2).permute(0, 3, 2, 7, 4, 5, 8, 6, 1)  # [.., g, t // 2, P, j, e, qh, rh]
    fields = lane_code.reshape(-1, 8)  # field = e * 4 + qh * 2 + rh, lanes g * 4 + (t // 2) * 2 + P
    words = pack_fields(fields, 4).view(tiles, units, 32, 4)
    # positions: lane (g, t') chunk 4 t' + k, k = 2 i' + P' -> chunk c = 4 t' + k: P = c % 2 = k % 2, i = c // 2 = 2 t' + k // 2
    pos = position.view(tiles, 2, 8, units, 2, 4, 2, 2, 2).permute(0, 3, 2, 6, 5, 1, 7, 4, 8)  # [.., g, t', j, rh, k//2, P, kept]
    pos = pos.reshape(tiles, units, 8, 2, 4, 2, 4, 2)  # [.., g, t', j, rh, k, kept]
    shifts = torch.tensor([[[meta_shift(rh, k, e) for e in range(2)] for k in range(4)] for rh in range(2)], device=device)
    meta = (pos << shifts).sum((-3, -2, -1))
    meta = torch.where(meta >= 1 << 31, meta - (1 << 32), meta).to(torch.int32)
    return SparseMmaWeight(packed.shape, packed.group_size, words.contiguous(), meta.contiguous(),
                           statistics(packed.scale, packed.zero, 4, rows, tiles))


def dense(view: SparseMmaWeight) -> torch.Tensor:
    """float32 [out, in] from the re-packed form, indexed as the kernel and the instruction index it (lane, instruction,
    A register, kept value; the positions through meta_shift)."""
    rows, cols = view.shape
    units, dev = cols // UNIT, view.codes.device
    tile, u, lane, j, q, e = torch.meshgrid(*(torch.arange(n, device=dev) for n in (view.tiles, units, 32, 4, 4, 2)), indexing="ij")
    g, t = lane // 4, lane % 4
    code = (view.codes.long()[tile, u, lane, j] & 0xFFFFFFFF) >> ((q + 4 * e) * 4) & 15
    row_half, chunk = q % 2, t + 4 * (q // 2)
    meta = view.positions.long()[tile, u, g, chunk // 4, j] & 0xFFFFFFFF
    position = (meta >> meta_shift(row_half, chunk % 4, e)) & 3
    row = tile * 16 + g + 8 * row_half
    col = u * UNIT + 4 * _chunk_group(chunk, j) + position
    scale, zero = statistic_values(view.stats.long()[tile, col // view.group_size, g], row_half)
    out = torch.zeros(view.tiles * 16, cols, dtype=torch.float32, device=dev)
    out[row.flatten(), col.flatten()] = (scale * (code - zero).float()).flatten()
    return out[:rows]
