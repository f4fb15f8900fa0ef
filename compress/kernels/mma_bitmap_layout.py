"""The re-packed form of a bitmap (unstructured sparse) weight that the tensor-core bitmap kernel (cuda_mma_bitmap.py)
reads: the same kept values, re-ordered so each lane finds its A fragments' values in a few bytes, and its keep bits
as one 8-byte load a 128-column unit.

Within a 16-row tile and a 128-column unit, lane (g, t) holds for each of the unit's 8 k-tiles j the A fragment of
`mma.m16n8k16` exactly as the group-quant layout places it (mma_layout.py): element e (0-7) of the lane is register
q = e // 2, half e % 2: row g + 8 (q % 2), column t * 32 + 4 j + 2 (q // 2) + e % 2. So the activations a lane needs
are its 32 consecutive columns, loaded as for the group-quant kernel.
- masks int32 [tiles, units, 32 lanes, 2]: byte j % 4 of word j // 4 is the lane's 8 keep bits of k-tile j (bit e);
- values int16 [kept + 8]: the kept values as 16-bit floats of the activations' dtype, k-tile by k-tile, in each
  k-tile lane by lane and in a lane element by element (then 8 zeros, so no load runs past the end);
- starts int32 [tiles, units, 8]: the index of each k-tile's first value.
Lane l of k-tile j reads its values from starts[j] + (the kept values of lanes 0 .. l - 1 in that k-tile) on, one
after the other as its keep bits say: no popcount a weight, only one a lane a k-tile and a scan across the warp.

Row tiles are padded to a multiple of TILE_PAD with rows that keep nothing. `dense` decodes the form with the
kernel's own index arithmetic, so the layout is checked on CPU against the bitmap format's reference.
"""

from __future__ import annotations

import dataclasses

import torch

from compress.formats import bitmap
from compress.kernels.mma_layout import UNIT, half_value, padded_tiles

DTYPES = (torch.bfloat16, torch.float16)


@dataclasses.dataclass
class BitmapMmaWeight:
    shape: tuple[int, int]  # (out, in)
    dtype: torch.dtype  # the activations' dtype the values are in
    masks: torch.Tensor  # int32 [tiles, units, 32, 2]
    starts: torch.Tensor  # int32 [tiles, units, 8]
    values: torch.Tensor  # int16 [kept + 8]

    @property
    def tiles(self) -> int:
        return self.masks.shape[0]


def shape_ok(packed) -> bool:
    """A bitmap weight of whole 128-column units a row, fewer than 2^31 kept values."""
    return isinstance(packed, bitmap.BitmapWeight) and packed.shape[1] % UNIT == 0 and packed.values.numel() < 2**31 - 8


def _fragments(weight: torch.Tensor, tiles: int) -> torch.Tensor:
    """[rows, cols] -> [tiles, units, 8 k-tiles, 32 lanes, 8 elements] in the kernel's order (rows padded with zeros)."""
    rows, cols = weight.shape
    padded = weight.new_zeros(tiles * 16, cols)
    padded[:rows] = weight
    # row = tile*16 + rh*8 + g; column = u*128 + t*32 + j*4 + qh*2 + h; lane = g*4 + t; element e = qh*4 + rh*2 + h
    split = padded.view(tiles, 2, 8, cols // UNIT, 4, 8, 2, 2)
    return split.permute(0, 3, 5, 2, 4, 6, 1, 7).reshape(tiles, cols // UNIT, 8, 32, 8)


def pack(packed: bitmap.BitmapWeight, dtype: torch.dtype) -> BitmapMmaWeight:
    """The kernel's form of a bitmap weight for `dtype` (bfloat16 / float16) activations, on the weight's device."""
    if not shape_ok(packed) or dtype not in DTYPES:
        raise ValueError(f"not a layout the tensor-core bitmap kernel reads: {packed.shape} bitmap weight for {dtype} activations "
                         f"(it takes whole 128-column units a row and bfloat16 / float16)")
    rows, cols = packed.shape
    tiles = padded_tiles(rows)
    kept = _fragments(bitmap.read_bitmask(packed.bitmask, cols), tiles)
    weight = torch.zeros(rows, cols, dtype=dtype, device=packed.values.device)
    weight[bitmap.read_bitmask(packed.bitmask, cols)] = packed.values.to(dtype)
    values = _fragments(weight, tiles)[kept]  # k-tile by k-tile, lane by lane, element by element
    bits = (kept.to(torch.int64) << torch.arange(8, device=kept.device)).sum(-1)  # [tiles, units, 8 j, 32 lanes]
    masks = (bits.view(tiles, cols // UNIT, 2, 4, 32) << (8 * torch.arange(4, device=kept.device)).view(1, 1, 1, 4, 1)).sum(3)
    masks = torch.where(masks >= 2**31, masks - 2**32, masks).to(torch.int32).permute(0, 1, 3, 2).contiguous()
    counts = kept.sum((-2, -1)).reshape(-1)
    starts = (torch.cumsum(counts, 0) - counts).to(torch.int32).view(tiles, cols // UNIT, 8)
    padded_values = torch.cat([values.view(torch.int16), values.new_zeros(8).view(torch.int16)])
    return BitmapMmaWeight(packed.shape, dtype, masks, starts.contiguous(), padded_values)


def dense(view: BitmapMmaWeight) -> torch.Tensor:
    """float32 [out, in] from the re-packed form, read as the kernel reads it: lane l of k-tile j takes its kept values
    from starts[j] + the popcounts of the k-tile's lanes before it, one after the other along its keep bits."""
    rows, cols = view.shape
    tiles, units = view.masks.shape[:2]
    words = view.masks.to(torch.int64) & 0xFFFFFFFF  # [tiles, units, 32, 2]
    j = torch.arange(8, device=words.device)
    bytes_ = (words[..., j // 4] >> (8 * (j % 4))) & 0xFF  # [tiles, units, 32 lanes, 8 j]
    bits = ((bytes_.unsqueeze(-1) >> torch.arange(8, device=words.device)) & 1).permute(0, 1, 3, 2, 4)  # [.., j, lane, e]
    lane_counts = bits.sum(-1)
    lane_start = view.starts.to(torch.int64).unsqueeze(-1) + torch.cumsum(lane_counts, -1) - lane_counts  # [.., j, lane]
    index = lane_start.unsqueeze(-1) + torch.cumsum(bits, -1) - bits  # the value an element takes when kept
    values = half_value(view.values.to(torch.int64)[index] & 0xFFFF, torch.zeros_like(index, dtype=torch.bool), view.dtype)
    fragments = torch.where(bits.bool(), values, 0.0)  # [tiles, units, j, lane, e]
    tile, u, j, lane, e = torch.meshgrid(*(torch.arange(n, device=words.device) for n in fragments.shape), indexing="ij")
    row = tile * 16 + lane // 4 + 8 * ((e // 2) % 2)  # register q = e // 2: rows g, g + 8 alternating
    col = u * UNIT + (lane % 4) * 32 + 4 * j + 2 * (e // 4) + e % 2  # then the next two columns
    out = torch.zeros(tiles * 16, cols, dtype=torch.float32, device=words.device)
    out[row.flatten(), col.flatten()] = fragments.flatten()
    return out[:rows]
