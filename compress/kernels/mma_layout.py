"""The re-packed form of a group-quantized int2 / int4 weight that the tensor-core kernel (cuda_mma.py) reads: the same
codes and statistics, re-ordered so a lane's 16-byte loads hold exactly its mma A fragments.

For 16 output rows (a tile) and 128 columns (a unit) lane (g, t) of a warp holds, for each of the unit's 8 k-tiles j,
the A fragment of `mma.m16n8k16`: rows g and g + 8, columns c0, c0 + 1, c0 + 2, c0 + 3 with c0 = t * 32 + j * 4. The
columns are permuted within the unit (the mma's k order is free when A and B agree) so that the activations a lane
needs are 32 consecutive values. Its 8 codes of a k-tile are one word's field pairs (i, i + per / 2), pair q the A
register q (rows g, g + 8 alternating, then the next two columns): one shift-and-mask per register. 2-bit words hold
two k-tiles. Codes: int32 [tiles, units, chunks, 32 lanes, 4 words] (chunks = bits / 2 16-byte loads a lane a unit);
statistics: int32 [tiles, groups, 8, 2]: the float16 scales of rows g and g + 8 as one word, their zero points as
two bytes. Row tiles are padded to a multiple of TILE_PAD with zero codes and scales.

The scaled form (`pack_scaled`) takes what the exact one cannot: groups of 16, 32 or 64 columns and float zero points.
The codes are the same words; each weight is scaled before the mma, w = scale x code + bias with bias = -scale x zero,
both in the activations' 16-bit dtype (so a weight is rounded to that dtype once, as a dense layer's is). Statistics:
int32 [tiles, units, 32 lanes, 2 x lane groups]: for each group among the lane's 32 columns (two at groups of 16, else
one), the scales of rows g | g + 8 as one word, then their biases.

`dense` decodes either form with the kernel's own index arithmetic, so the layout is checked on CPU against the
format's reference.
"""

from __future__ import annotations

import dataclasses

import torch

from compress.formats import group_quant
from compress.formats.words import pack_fields, read_fields

BITS = (2, 4)
SCALED_GROUPS = (16, 32, 64)  # groups within a unit the scaled form takes (and whole units)
UNIT = 128  # columns a lane quad covers per step: 4 lanes x 32 consecutive activations
TILE_PAD = 2  # row tiles are padded to a multiple of this (the most row tiles a block takes)


@dataclasses.dataclass
class MmaWeight:
    shape: tuple[int, int]  # (out, in)
    bits: int  # 2 or 4
    group_size: int  # a multiple of UNIT
    codes: torch.Tensor  # int32 [tiles, units, CH, 32, 4]
    stats: torch.Tensor  # int32 [tiles, groups, 8, 2]: (scale of rows g | g + 8 as float16 bits, zero g | zero g + 8 << 8)
    lane_groups: int = 0  # the scaled form: groups a lane's 32 columns span (1 or 2), stats as in the module docstring
    dtype: torch.dtype | None = None  # the scaled and table forms: the activations' dtype their statistics are in
    table: bool = False  # the table form (mma_lut_layout.py): stats are each row's table, codes index it
    quantized: bool = False  # the compact SpQR form (mma_spqr_layout.py): 3-bit codes, statistics decoded in the kernel
    compact: bool = False  # the table form with 3-bit codes (mma_layout.move_fourth): 6 words a lane a unit
    wide_table: bool = False  # the table form of 4-bit codes: 16 entries a row

    @property
    def tiles(self) -> int:
        return self.codes.shape[0]

    @property
    def form(self) -> str:
        """The kernel's form (cuda_mma.kernel_name): "" exact, "s1" / "s2" scaled, "t" / "tc" / "tw" table (compact, wide),
        "q" compact SpQR."""
        if self.table:
            return "tc" if self.compact else "tw" if self.wide_table else "t"
        return "q" if self.quantized else f"s{self.lane_groups}" if self.lane_groups else ""


def shape_ok(packed) -> bool:
    """What the kernel reads: 2- or 4-bit codes (3-bit through views.widen), integer zero points, groups of whole
    128-column units and whole units a row."""
    return (isinstance(packed, group_quant.GroupQuantWeight) and packed.bits in (*BITS, 3) and packed.zero_kind == "integer"
            and packed.group_size % UNIT == 0 and packed.shape[1] % UNIT == 0)


def scaled_shape_ok(packed) -> bool:
    """What the scaled form takes: 2-, 3- or 4-bit codes with integer or float zero points, groups of 16, 32, 64 or
    whole units, whole units a row."""
    return (isinstance(packed, group_quant.GroupQuantWeight) and packed.bits in (*BITS, 3) and packed.shape[1] % UNIT == 0
            and (packed.group_size in SCALED_GROUPS or packed.group_size % UNIT == 0))


def padded_tiles(rows: int) -> int:
    """Row tiles of 16 a weight of `rows` rows is padded to (a multiple of TILE_PAD)."""
    return -(-rows // (16 * TILE_PAD)) * TILE_PAD


def pack(packed: group_quant.GroupQuantWeight) -> MmaWeight:
    """The kernel's form of a 2- or 4-bit group-quant weight (the same codes and statistics, re-ordered)."""
    if not shape_ok(packed) or packed.bits not in BITS:
        raise ValueError(f"not a layout the tensor-core kernel reads: {packed.bits}-bit, group {packed.group_size}, {packed.shape}")
    rows, tiles = packed.shape[0], padded_tiles(packed.shape[0])
    stats = statistics(packed.scale, packed.zero, packed.bits, rows, tiles)
    return MmaWeight(packed.shape, packed.bits, packed.group_size, code_words(packed), stats)


def pack_scaled(packed: group_quant.GroupQuantWeight, dtype: torch.dtype, codes: torch.Tensor | None = None) -> MmaWeight:
    """The scaled form of a 2- or 4-bit group-quant weight for `dtype` (bfloat16 / float16) activations; `codes`: its
    code words when already re-packed (`pack`'s, shared by both forms and both dtypes)."""
    if not scaled_shape_ok(packed) or packed.bits not in BITS:
        raise ValueError(f"not a layout the scaled tensor-core kernel reads: {packed.bits}-bit, group {packed.group_size}, {packed.shape}")
    lane_groups = 2 if packed.group_size == 16 else 1
    codes = code_words(packed) if codes is None else codes
    return MmaWeight(packed.shape, packed.bits, packed.group_size, codes, scaled_statistics(packed, dtype, codes.shape[0], lane_groups),
                     lane_groups, dtype)


def code_words(packed: group_quant.GroupQuantWeight) -> torch.Tensor:
    """int32 [tiles, units, chunks, 32, 4]: the codes of a 2- or 4-bit weight as the lanes load them."""
    rows, cols = packed.shape
    bits, tiles, units = packed.bits, padded_tiles(rows), cols // UNIT
    per = 32 // bits
    chunks, ktiles = bits // 2, per // 8  # 16-byte chunks a lane a unit; k-tiles a word
    codes = torch.zeros(tiles * 16, cols, dtype=torch.uint8, device=packed.codes.device)
    codes[:rows] = read_fields(packed.codes, bits, cols).to(torch.uint8)
    # row = tile*16 + rh*8 + g; column = u*128 + t*32 + (c*4 + v)*T*4 + h*4 + qh*2 + e (k-tile j = (c*4 + v)*T + h)
    split = codes.view(tiles, 2, 8, units, 4, chunks, 4, ktiles, 2, 2)
    # -> [tile, u, c, lane = g*4 + t, word v, field = e*P + h*4 + qh*2 + rh]
    fields = split.permute(0, 3, 5, 2, 4, 6, 9, 7, 8, 1).reshape(-1, per)
    return pack_fields(fields, bits).view(tiles, units, chunks, 32, 4).contiguous()


def dense(view: MmaWeight) -> torch.Tensor:
    """float32 [out, in] from the re-packed form, indexed as the kernel indexes it (lane, k-tile, A register, half)."""
    rows, cols = view.shape
    bits, per = view.bits, 32 // view.bits
    ktiles, units = per // 8, cols // UNIT
    dev = view.codes.device
    tile, u, lane, j, q, e = torch.meshgrid(*(torch.arange(n, device=dev) for n in (view.tiles, units, 32, 8, 4, 2)), indexing="ij")
    g, t, wi, h = lane // 4, lane % 4, j // ktiles, j % ktiles
    word = view.codes.long()[tile, u, wi // 4, lane, wi % 4] & 0xFFFFFFFF
    code = (word >> ((h * 4 + q + e * (per // 2)) * bits)) & ((1 << bits) - 1)
    row = tile * 16 + g + 8 * (q % 2)
    col = u * UNIT + t * 32 + j * 4 + 2 * (q // 2) + e
    if view.lane_groups:  # the lane's group: the k-tile's half of its columns at groups of 16
        words = view.stats.long()[tile, u, lane, (j // 4 if view.lane_groups == 2 else 0) * 2 + torch.arange(2, device=dev).view(2, *[1] * 6)]
        scale, bias = (half_value(w, q % 2, view.dtype) for w in words)
        value = scale * code.float() + bias
    else:
        scale, zero = statistic_values(view.stats.long()[tile, col // view.group_size, g], q % 2)
        value = scale * (code - zero).float()
    out = torch.zeros(view.tiles * 16, cols, dtype=torch.float32, device=dev)
    out[row.flatten(), col.flatten()] = value.flatten()
    return out[:rows]


def half_value(words: torch.Tensor, high: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 of the 16-bit `dtype` value in the low (high = 0) or high half of int64 words."""
    bits16 = (words >> (16 * high)) & 0xFFFF
    return torch.where(bits16 >= 1 << 15, bits16 - (1 << 16), bits16).to(torch.int16).view(dtype).float()


def statistic_values(stat: torch.Tensor, row_half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scales and int64 zero points from `statistics` entries [..., 2] (as int64) of rows g + 8 * row_half."""
    return half_value(stat[..., 0], row_half, torch.float16), (stat[..., 1] >> (8 * row_half)) & 0xFF


def statistics(scale: torch.Tensor, zero: torch.Tensor, bits: int, rows: int, tiles: int) -> torch.Tensor:
    """int32 [tiles, groups, 8, 2] from float16 scales [rows, groups] and integer zero points packed in `bits`-bit fields:
    for lane group g the scales of rows g and g + 8 as one word (float16 bits), their zero points as two bytes."""
    groups = scale.shape[1]
    padded_scale = torch.zeros(tiles * 16, groups, dtype=torch.float16, device=scale.device)
    padded_scale[:rows] = scale
    padded_zero = torch.zeros(tiles * 16, groups, dtype=torch.int32, device=scale.device)
    padded_zero[:rows] = read_fields(zero, bits, groups).to(torch.int32)
    scale_pairs = padded_scale.view(tiles, 2, 8, groups).permute(0, 3, 2, 1).contiguous().view(torch.int32)  # [tiles, groups, 8, 1]
    zp = padded_zero.view(tiles, 2, 8, groups).permute(0, 3, 2, 1)
    return torch.cat([scale_pairs, (zp[..., 0] | (zp[..., 1] << 8)).unsqueeze(-1)], dim=-1).contiguous()


def scaled_values(packed: group_quant.GroupQuantWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The scaled form's statistics as the kernel multiplies them, float32 [out, groups]: scale and bias = -scale x zero,
    each rounded to `dtype`."""
    scale = packed.scale.float()
    zero = read_fields(packed.zero, packed.bits, packed.groups).float() if packed.zero_kind == "integer" else packed.zero.float()
    return scale.to(dtype).float(), (-scale * zero).to(dtype).float()


def scaled_statistics(packed: group_quant.GroupQuantWeight, dtype: torch.dtype, tiles: int, lane_groups: int) -> torch.Tensor:
    """int32 [tiles, units, 32, 2 x lane_groups]: lane (g, t)'s groups (those of columns t * 32 and, at groups of 16,
    t * 32 + 16 of each unit): the scales of rows g | g + 8 in `dtype` as one word, then the biases."""
    rows, cols = packed.shape
    units = cols // UNIT
    first = (torch.arange(units).view(-1, 1, 1) * UNIT + torch.arange(4).view(1, -1, 1) * 32 + torch.arange(lane_groups) * 16).flatten()
    padded = torch.zeros(2, tiles * 16, units * 4 * lane_groups, dtype=dtype, device=packed.scale.device)
    for k, value in enumerate(scaled_values(packed, dtype)):
        padded[k, :rows] = value[:, (first // packed.group_size).to(value.device)].to(dtype)
    # [k, tile, rh, g, u, t, lg] -> [tile, u, g, t, lg, k, rh]: rows g, g + 8 of one statistic in one word
    arranged = padded.view(2, tiles, 2, 8, units, 4, lane_groups).permute(1, 4, 3, 5, 6, 0, 2).contiguous()
    return arranged.view(torch.int32).view(tiles, units, 32, 2 * lane_groups)


def move_fourth(words: torch.Tensor) -> torch.Tensor:
    """int64 [..., 8] k-tile words of 3-bit nibble codes (bit 3 of every nibble 0) -> [..., 6]: in each run of four,
    the fourth's codes moved into the spare top bits of the first three (bit b of its nibble n to bit 3 of nibble n of
    word b): 3 bits a code. The kernels get the fourth back with three shifts and two bit selects (`restore_fourth`)."""
    runs = words.view(*words.shape[:-1], 2, 4)
    first, fourth = runs[..., :3], runs[..., 3:]
    masks = torch.tensor([0x11111111, 0x22222222, 0x44444444], device=words.device)
    moved = first | (((fourth & masks) << torch.tensor([3, 2, 1], device=words.device)) & 0x88888888)
    return moved.reshape(*words.shape[:-1], 6)


def restore_fourth(words: torch.Tensor) -> torch.Tensor:
    """int64 [..., 6] -> [..., 8] as the kernels rebuild them: the fourth word's bits of mask 2 from word 1 >> 2, of
    mask 4 from word 2 >> 1, the rest from word 0 >> 3 (its bit 3 of each nibble holding another bit: the kernels
    read 3 bits a nibble)."""
    runs = words.view(*words.shape[:-1], 2, 3)
    inner = ((runs[..., 1] >> 2) & 0x22222222) | ((runs[..., 0] >> 3) & 0xDDDDDDDD)
    fourth = ((runs[..., 2] >> 1) & 0x44444444) | (inner & 0xBBBBBBBB)
    return torch.cat([runs, fourth.unsqueeze(-1)], -1).reshape(*words.shape[:-1], 8)


def six_word_block(six: torch.Tensor) -> torch.Tensor:
    """int64 [tiles, units, 32, 6] lanes' six words of a unit -> [tiles, units, 192], the order the kernels load them:
    the 32 lanes' first four (16 bytes a lane), then their last two (8 bytes a lane)."""
    tiles, units = six.shape[:2]
    return torch.cat([six[..., :4].reshape(tiles, units, 128), six[..., 4:].reshape(tiles, units, 64)], dim=-1)


def six_words(codes: torch.Tensor, tiles: int, units: int) -> torch.Tensor:
    """`six_word_block`'s inverse from a form's code blocks (int32 [tiles, units, at least 192]), as int64."""
    lanes = codes.long().view(tiles, units, -1) & 0xFFFFFFFF
    return torch.cat([lanes[..., :128].reshape(tiles, units, 32, 4), lanes[..., 128:192].reshape(tiles, units, 32, 2)], -1)
