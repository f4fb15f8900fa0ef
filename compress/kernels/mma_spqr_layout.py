"""The compact form of a SpQR weight for the tensor-core kernel (cuda_mma.py, form "q"): its 3-bit codes read as 3
bits and its quantized statistics decoded in the kernel, about 0.47 bytes a weight against the scaled form's 0.75
(3-bit codes widened to 4, float16 scale and bias a group of 16) for SpQR's own layout (3-bit codes, groups of 16
columns, 3-bit scales and zero points on grids of 16 rows).

Codes: the scaled form's 4-bit k-tile words (mma_layout.code_words, one k-tile of a lane a word: field pair (q, q + 4)
is A register q), then in each run of four k-tiles the fourth's codes moved into the spare top bit of the first
three's nibbles: bit b of its nibble n goes to bit 3 of nibble n of word b. The kernel gets it back with three shifts
and two bit selects (the decode masks each code to 3 bits, so the moved bits never reach a weight). A lane's 6 words
a unit, then one word of statistic codes: nibble rh * 4 + kind * 2 + h is the scale (kind 0) or zero point (kind 1)
code of row g + 8 rh and the lane's group h (columns t * 32 + 16 h of the unit). Per (tile, unit) 896 bytes: the 32
lanes' first four words (16 bytes each), their next two (8 bytes), their statistic codes (4 bytes).
Second level: per (tile, unit, t) 16 bytes: for each of the lane's two groups, its float16 scale low and step as one
word, its zero point low and step as another (the tile's 16 rows share them: the format's row groups of 16).

In the kernel a lane decodes its 4 (row, group) statistics in fp32 (low + step x code, one rounding, as the format's
reference), bias = -scale x zero, and rounds scale and bias to the activations' dtype: the scaled form's statistics
from there on. `dense` decodes the form with the kernel's index arithmetic (tests: against the format's reference).
"""

from __future__ import annotations

import torch

from compress.formats import group_quant, spqr
from compress.formats.words import read_fields, to_int32
from compress.kernels import views
from compress.kernels.mma_layout import (
    UNIT,
    MmaWeight,
    code_words,
    half_value,
    move_fourth,
    padded_tiles,
    restore_fourth,
    six_word_block,
    six_words,
)

GROUP = 16  # columns a group and rows a second-level group the form takes
WORDS = 224  # int32 words a (tile, unit): 32 lanes x (4 + 2 + 1)


def shape_ok(packed) -> bool:
    """SpQR's default layout without a keep mask: 3-bit codes, groups of 16 columns, scales and zero points quantized
    to at most 4 bits on grids of 16 rows, whole 128-column units a row."""
    return (isinstance(packed, spqr.SpQRWeight) and packed.bitmask is None and packed.bits == 3 and packed.group_size == GROUP
            and packed.scale_kind == packed.zero_kind == "quantized" and max(packed.scale_bits, packed.zero_bits) <= 4
            and packed.scale_group_size == packed.zero_group_size == GROUP and packed.shape[1] % UNIT == 0)


def pack(packed: spqr.SpQRWeight) -> MmaWeight:
    """The compact form of a SpQR weight `shape_ok` takes (one form for both activation dtypes)."""
    if not shape_ok(packed):
        got = (f"{packed.bits}-bit codes in groups of {packed.group_size}, {packed.scale_kind} / {packed.zero_kind} statistics"
               + (f" ({packed.scale_bits} / {packed.zero_bits} bits, grids of {packed.scale_group_size} / {packed.zero_group_size} rows)"
                  if packed.scale_kind == packed.zero_kind == "quantized" else ""))
        raise ValueError(f"no compact tensor-core form of this SpQR weight ({got}, {packed.shape}); it takes 3-bit codes in groups "
                         f"of {GROUP} with statistics quantized to at most 4 bits on grids of {GROUP} rows, no keep mask, whole "
                         f"{UNIT}-column units")
    rows, cols = packed.shape
    tiles, units = padded_tiles(rows), cols // UNIT
    grid = group_quant.GroupQuantWeight(packed.shape, 3, GROUP, packed.codes, torch.zeros(rows, cols // GROUP), torch.zeros(rows, 1), "float16")
    words = code_words(views.widen(grid)).long().view(tiles, units, 2, 32, 4).permute(0, 1, 3, 2, 4).reshape(tiles, units, 32, 2, 4)
    six = move_fourth((words & 0xFFFFFFFF).reshape(tiles, units, 32, 8))
    stat_codes = _statistic_codes(packed, tiles, units)
    block = torch.cat([six_word_block(six), stat_codes], dim=-1)
    return MmaWeight(packed.shape, 3, GROUP, to_int32(block).contiguous(), _second_level(packed, tiles, units), quantized=True)



def _padded_codes(codes: torch.Tensor, bits: int, groups: int, rows: int, tiles: int) -> torch.Tensor:
    out = torch.zeros(tiles * 16, groups, dtype=torch.int64, device=codes.device)
    out[:rows] = read_fields(codes, bits, groups).long()
    return out


def _statistic_codes(packed: spqr.SpQRWeight, tiles: int, units: int) -> torch.Tensor:
    """int64 [tiles, units, 32]: each lane's word of statistic codes (nibble rh * 4 + kind * 2 + h)."""
    rows, groups = packed.shape[0], packed.groups
    kinds = [_padded_codes(packed.scale_codes, packed.scale_bits, groups, rows, tiles),
             _padded_codes(packed.zero_codes, packed.zero_bits, groups, rows, tiles)]
    # [kind, tile, rh, g, unit, t, h] -> [tile, unit, g, t, rh, kind, h]
    nibbles = torch.stack(kinds).view(2, tiles, 2, 8, units, 4, 2).permute(1, 4, 3, 5, 2, 0, 6).reshape(tiles, units, 32, 8)
    return (nibbles << (4 * torch.arange(8, device=nibbles.device))).sum(-1)


def _second_level(packed: spqr.SpQRWeight, tiles: int, units: int) -> torch.Tensor:
    """int32 [tiles, units, 4, 4]: for lane quad position t, its groups' (scale low | step << 16, zero low | step << 16)."""
    halves = []
    for low, step in ((packed.scale_low, packed.scale_step), (packed.zero_low, packed.zero_step)):
        for value in (low, step):
            padded = torch.zeros(tiles, packed.groups, dtype=torch.float16, device=value.device)
            padded[: value.shape[0]] = value
            halves.append(padded.view(torch.int16).long() & 0xFFFF)
    words = torch.stack([halves[0] | halves[1] << 16, halves[2] | halves[3] << 16])  # [kind, tile, group]
    # [kind, tile, unit, t, h] -> [tile, unit, t, h, kind]
    return to_int32(words.view(2, tiles, units, 4, 2).permute(1, 2, 3, 4, 0).reshape(tiles, units, 4, 4)).contiguous()


def statistics(view: MmaWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [tiles * 16, groups] scale and bias as the kernel rounds them to `dtype`, decoded with its arithmetic."""
    tiles, units = view.tiles, view.shape[1] // UNIT
    dev = view.codes.device
    tile, u, lane, h, rh = torch.meshgrid(*(torch.arange(n, device=dev) for n in (tiles, units, 32, 2, 2)), indexing="ij")
    g, t = lane // 4, lane % 4
    codes = view.codes.long()[tile, u, 192 + lane] & 0xFFFFFFFF
    second = view.stats.long()[tile, u, t] & 0xFFFFFFFF  # [..., 4 words]
    values = []
    for kind in (0, 1):
        word = second.gather(-1, (2 * h + kind).unsqueeze(-1)).squeeze(-1)
        code = ((codes >> (16 * rh + 8 * kind + 4 * h)) & 0xF).double()
        step, low = (half_value(word, high, torch.float16).double() for high in (1, 0))
        values.append((step * code + low).float())  # one fp32 rounding of step x code + low, as fmaf
    scale, zero = values
    bias = -scale * zero
    out = torch.zeros(2, tiles * 16, units * 8, dtype=torch.float32, device=dev)
    row, group = tile * 16 + g + 8 * rh, u * 8 + 2 * t + h
    for k, value in enumerate((scale, bias)):
        out[k, row.flatten(), group.flatten()] = value.to(dtype).float().flatten()
    return out[0], out[1]


def dense(view: MmaWeight, dtype: torch.dtype) -> torch.Tensor:
    """float32 [out, in]: the weights the kernel multiplies for `dtype` activations, each round(scale x code + bias)
    with its codes read back from the moved bits as the kernel reads them."""
    rows, cols = view.shape
    tiles, units = view.tiles, cols // UNIT
    dev = view.codes.device
    words = restore_fourth(six_words(view.codes, tiles, units))  # k-tile j = word j
    tile, u, lane, j, q, e = torch.meshgrid(*(torch.arange(n, device=dev) for n in (tiles, units, 32, 8, 4, 2)), indexing="ij")
    g, t = lane // 4, lane % 4
    code = (words[tile, u, lane, j] >> (4 * (q + 4 * e))) & 7
    row, col = tile * 16 + g + 8 * (q % 2), u * UNIT + t * 32 + j * 4 + 2 * (q // 2) + e
    scale, bias = statistics(view, dtype)
    group = col // GROUP
    value = (scale[row, group].double() * code.double() + bias[row, group].double()).to(dtype).float()
    out = torch.zeros(tiles * 16, cols, dtype=torch.float32, device=dev)
    out[row.flatten(), col.flatten()] = value.flatten()
    return out[:rows]
