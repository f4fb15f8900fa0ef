"""The table form of the tensor-core kernel (cuda_mma.py): a SqueezeLLM (LUT) weight's 2- or 3-bit codes, each row's
table of 8 16-bit values held in registers, looked up with byte permutes (`prmt`) straight into the mma's A fragment.
4-bit codes (16 entries, the wide form, under WIDE_TABLES): a row's table is 8 words (low bytes of entries 0-3, 4-7,
8-11, 12-15, then their high bytes); two permutes on each code's low 3 bits pick from entries 0-7 and 8-15 and a byte
select on its top bit keeps one (a permute with sign replication makes the select's mask).

A row's table in the activations' dtype is 16 bytes: its entries' low bytes (two words) and high bytes (two words).
One `prmt` of the two low-byte words with a selector of four 3-bit codes (one per nibble) gives the four entries'
low bytes, one more their high bytes, and two `prmt` interleave them into two A registers (two weights each): about
1.1 instructions a weight, no arithmetic; each weight is its table entry rounded once to the dtype (fp16 tables are
exact with fp16 activations).

So a lane's word of a k-tile holds, nibble by nibble, row g's codes of columns c0 .. c0 + 3, then row g + 8's
(c0 = t * 32 + j * 4 in the unit, as in mma_layout): the low 16 bits are row g's selector, the high 16 row g + 8's.
Codes: int32 [tiles, units, 2, 32 lanes, 4 words] (a lane's two 16-byte loads a unit, k-tile j in load j // 4, word
j % 4); tables: int32 [tiles, 8, 2, 4]: for lane group g, rows g and g + 8, the words (low bytes of entries 0-3, of
4-7, high bytes of 0-3, of 4-7). `dense` decodes the form with the kernel's index arithmetic (checked on CPU).
"""

from __future__ import annotations

import torch

from compress.formats.words import pack_fields, read_fields, to_int32
from compress.kernels.mma_layout import UNIT, MmaWeight, half_value, move_fourth, padded_tiles, restore_fourth, six_word_block, six_words
from compress.kernels.views import LUTCodes

ENTRIES = 8  # table entries a row one byte permute reaches (codes of 3 bits or fewer)
WIDE_ENTRIES = 16  # 4-bit codes: two permutes, a byte select on each code's top bit (the wide table form)
WIDE_TABLES = False  # whether `shape_ok` takes 4-bit codes (the wide form: built, not yet run on a GPU)


def entries(bits: int) -> int:
    return WIDE_ENTRIES if bits == 4 else ENTRIES


def shape_ok(view: LUTCodes, bits: int) -> bool:
    """A LUT weight's codes view (views.lut_codes) the table form takes: codes of 3 bits or fewer (4 with WIDE_TABLES),
    whole units a row."""
    return isinstance(view, LUTCodes) and (bits <= 3 or (bits == 4 and WIDE_TABLES)) and view.shape[1] % UNIT == 0


def pack_table(view: LUTCodes, bits: int, dtype: torch.dtype, compact: bool = False) -> MmaWeight:
    """The table form of a LUT weight's codes view (its 4-bit code words and fp32 tables) for `dtype` activations;
    `compact`: its codes read as 3 bits (each run of four k-tile words as six, mma_layout.move_fourth; codes [tiles,
    units, 192], mma_layout.six_word_block), 0.375 bytes a weight against 0.5."""
    if not shape_ok(view, bits) or (compact and bits > 3):
        raise ValueError(f"not a layout the table kernel reads: {bits}-bit codes{' (compact: 3 bits at most)' if compact else ''}, {view.shape}")
    rows, cols = view.shape
    tiles, units = padded_tiles(rows), cols // UNIT
    codes = torch.zeros(tiles * 16, cols, dtype=torch.uint8, device=view.codes.device)
    codes[:rows] = read_fields(view.codes, view.bits, cols).to(torch.uint8)
    # row = tile*16 + rh*8 + g; column = u*128 + t*32 + (c*4 + v)*4 + e -> [tile, u, c, lane = g*4 + t, word v, nibble rh*4 + e]
    fields = codes.view(tiles, 2, 8, units, 4, 2, 4, 4).permute(0, 3, 5, 2, 4, 6, 1, 7).reshape(-1, 8)
    words = pack_fields(fields, 4).view(tiles, units, 2, 32, 4).contiguous()
    count = entries(bits)
    table = torch.zeros(tiles * 16, count, dtype=dtype, device=view.table.device)
    table[:rows] = view.table[:, :count].to(dtype)
    byte_planes = table.view(torch.uint8).view(tiles * 16, count, 2).permute(0, 2, 1)  # [row, low / high byte, entry]
    tables = byte_planes.contiguous().view(torch.int32).view(tiles, 2, 8, count // 2).permute(0, 2, 1, 3).contiguous()
    if compact:  # [tiles, units, 2 loads, 32, 4] -> each lane's 8 words (k-tile j = word j) -> 6
        words = six_word_block(move_fourth(words.long().permute(0, 1, 3, 2, 4).reshape(tiles, units, 32, 8) & 0xFFFFFFFF))
        words = to_int32(words).contiguous()
    return MmaWeight(view.shape, 4, cols, words, tables, dtype=dtype, table=True, compact=compact, wide_table=bits == 4)


def dense(view: MmaWeight) -> torch.Tensor:
    """float32 [out, in] from the table form, indexed as the kernel indexes it (lane, k-tile, A register, half)."""
    rows, cols = view.shape
    units, dev = cols // UNIT, view.codes.device
    tile, u, lane, j, q, e = torch.meshgrid(*(torch.arange(n, device=dev) for n in (view.tiles, units, 32, 8, 4, 2)), indexing="ij")
    g, t, rh = lane // 4, lane % 4, q % 2
    if view.compact:  # the kernel's words: the fourth of each run rebuilt, every nibble masked to its 3 code bits
        word = restore_fourth(six_words(view.codes, view.tiles, units))[tile, u, lane, j] & 0x77777777
    else:
        word = view.codes.long()[tile, u, j // 4, lane, j % 4] & 0xFFFFFFFF
    select = (word >> (4 * (rh * 4 + 2 * (q // 2) + e))) & 0xF  # the prmt selector's nibble
    planes = view.stats.long()[tile, g, rh] & 0xFFFFFFFF  # [..., 4 or 8 words]
    if view.wide_table:  # two permutes on the code's low 3 bits (entries 0-7, 8-15), a byte select on its top bit
        code, top = select & 7, select >= 8
        # words: low bytes of entries 0-3, 4-7, 8-11, 12-15, then the high bytes'
        entries_0_7, entries_8_15 = ([((planes[..., k] | (planes[..., k + 1] << 32)) >> (8 * code) & 0xFF) for k in (first, first + 4)]
                                     for first in (0, 2))
        low, high = (torch.where(top, entries_8_15[b], entries_0_7[b]) for b in (0, 1))
    else:
        code, replicate = select & 7, select >= 8  # bit 3: prmt fills the byte with the picked byte's sign bit
        low, high = (((planes[..., k] | (planes[..., k + 1] << 32)) >> (8 * code) & 0xFF) for k in (0, 2))
        low, high = (torch.where(replicate, (byte >> 7) * 0xFF, byte) for byte in (low, high))
    value = half_value(low | (high << 8), torch.zeros_like(code), view.dtype)
    out = torch.zeros(view.tiles * 16, cols, dtype=torch.float32, device=dev)
    out[(tile * 16 + g + 8 * rh).flatten(), (u * UNIT + t * 32 + j * 4 + 2 * (q // 2) + e).flatten()] = value.flatten()
    return out[:rows]
