"""The scatter form of a bitmap (unstructured sparse) weight for the tensor-core kernel of cuda_mma_scatter.py: each
kept value with its one-byte place in a 16 x 16 k-tile, so a warp writes a unit's kept values into a zeroed tile in
shared memory and loads the mma A fragments from there (ldmatrix), with no per-slot decode.

Places. Within a 16-row tile and a 128-column unit, k-tile j holds the columns the group-quant kernel gives it
(mma_layout.py: column t * 32 + 4 j + 2 qh + h is mma k index 2 t + 8 qh + h, so a lane's activations are its 32
consecutive columns). Its 256 slots are laid out [qh][row 16][k % 8] (a 16-bit value each): the four 8 x 8 matrices
of the A fragment are each 128 contiguous bytes, and lane l's ldmatrix row address is simply slot 8 l. A kept value
at row R of the tile and that column has place (qh * 16 + R) * 8 + 2 t + h, one byte.

Chunks. The kept values of each k-tile, in ascending place, are cut into chunks of 8 (the last one padded by
repeating its last value and place: writing it twice is harmless); a unit's chunks follow k-tile by k-tile.
- values int16 [chunks, 8]: the values in the activations' 16-bit dtype;
- places uint8 [chunks, 8];
- meta int32 [tiles, units, 4]: the unit's first chunk, its chunk count, and for k = 0 .. 7 the chunks of the
  unit before k-tile k, b_k (bytes: k = 0 .. 3 in the third word, 4 .. 7 in the fourth; b_0 = 0). Lanes 4 k .. 4 k + 3
  of the kernel write k-tile k: lane 4 k + i takes its chunks b_k + i, + 4, + 8, ... below b_(k + 1).
Bytes read: about 3 a kept weight (2 of value, 1 of place) and the padding (under 8 a k-tile): 0.9 a weight at 70%
sparsity against the bitmap form's 0.73 and dense bf16's 2. Row tiles are padded to a multiple of TILE_PAD with
rows that keep nothing.
"""

from __future__ import annotations

import dataclasses

import torch

from compress.formats import bitmap
from compress.kernels.mma_layout import UNIT, padded_tiles

DTYPES = (torch.bfloat16, torch.float16)
CHUNK = 8


@dataclasses.dataclass
class ScatterMmaWeight:
    shape: tuple[int, int]  # (out, in)
    dtype: torch.dtype  # the activations' dtype the values are in
    meta: torch.Tensor  # int32 [tiles, units, 4]
    values: torch.Tensor  # int16 [chunks, 8]
    places: torch.Tensor  # uint8 [chunks, 8]
    rounds: int  # chunks a kernel lane writes a unit (a k-tile's chunks / 4, rounded up) at the 95th percentile of k-tiles

    @property
    def tiles(self) -> int:
        return self.meta.shape[0]


def shape_ok(packed) -> bool:
    """A bitmap weight of whole 128-column units a row."""
    return isinstance(packed, bitmap.BitmapWeight) and packed.shape[1] % UNIT == 0


def _by_place(weight: torch.Tensor, tiles: int) -> torch.Tensor:
    """[rows, cols] -> [tiles, units, 8 k-tiles, 256 places] (rows padded with zeros)."""
    rows, cols = weight.shape
    padded = weight.new_zeros(tiles * 16, cols)
    padded[:rows] = weight
    # row = tile * 16 + R; column = u * 128 + t * 32 + j * 4 + qh * 2 + h; place = (qh * 16 + R) * 8 + 2 t + h
    split = padded.view(tiles, 16, cols // UNIT, 4, 8, 2, 2)  # [tile, R, u, t, j, qh, h]
    return split.permute(0, 2, 4, 5, 1, 3, 6).reshape(tiles, cols // UNIT, 8, 256)


def pack(packed: bitmap.BitmapWeight, dtype: torch.dtype) -> ScatterMmaWeight:
    """The scatter form of a bitmap weight for `dtype` (bfloat16 / float16) activations, on the weight's device."""
    if not shape_ok(packed) or dtype not in DTYPES:
        raise ValueError(f"not a layout the scatter kernel reads: {packed.shape} bitmap weight for {dtype} activations "
                         f"(it takes whole 128-column units a row and bfloat16 / float16)")
    rows, cols = packed.shape
    tiles, units, device = padded_tiles(rows), cols // UNIT, packed.values.device
    mask = bitmap.read_bitmask(packed.bitmask, cols)
    weight = torch.zeros(rows, cols, dtype=dtype, device=device)
    weight[mask] = packed.values.to(dtype)
    kept = _by_place(mask, tiles).reshape(-1, 256)  # a row a k-tile, in (tile, unit, k-tile) order
    value = _by_place(weight, tiles).reshape(-1, 256)[kept].view(torch.int16)
    segment, place = kept.nonzero(as_tuple=True)  # ascending k-tile, then place
    counts = kept.sum(1)
    chunks = (counts + CHUNK - 1) // CHUNK
    slots = chunks * CHUNK
    # every slot of a k-tile first takes its last kept value, then the kept values overwrite their own slots
    last = torch.cumsum(counts, 0) - 1
    has = counts > 0
    out_values = torch.repeat_interleave(value[last[has]], slots[has])
    out_places = torch.repeat_interleave(place[last[has]], slots[has])
    first_slot = torch.cumsum(slots, 0) - slots
    rank = torch.arange(segment.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[segment]
    out_values[first_slot[segment] + rank] = value
    out_places[first_slot[segment] + rank] = place
    per_tile = chunks.view(tiles * units, 8)
    before = torch.cumsum(per_tile, 1) - per_tile  # chunks of the unit before each k-tile
    unit_chunks = per_tile.sum(1)
    first_chunk = torch.cumsum(unit_chunks, 0) - unit_chunks
    shifts = 8 * torch.arange(4, device=device)
    low = (before[:, 0:4] << shifts).sum(1)
    high = (before[:, 4:8] << shifts).sum(1)
    meta = torch.stack([first_chunk, unit_chunks, low, high], 1)
    meta = torch.where(meta >= 2**31, meta - 2**32, meta).to(torch.int32).view(tiles, units, 4)
    rounds = int(torch.quantile(((chunks + 3) // 4).float().cpu(), 0.95).ceil()) if chunks.numel() else 1
    return ScatterMmaWeight(packed.shape, dtype, meta.contiguous(), out_values.view(-1, CHUNK).contiguous(),
                            out_places.to(torch.uint8).view(-1, CHUNK).contiguous(), max(1, rounds))


def chunk_ktiles(meta: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """The k-tile of chunk `chunk` (of its unit) from the unit's meta [..., 4] (int64): the last k with b_k <= chunk
    (an empty k-tile shares its bound with the next)."""
    bounds = [(meta[..., 2 + k // 4] >> (8 * (k % 4))) & 0xFF for k in range(1, 8)]
    return sum((chunk >= b).long() for b in bounds)


def dense(view: ScatterMmaWeight) -> torch.Tensor:
    """float32 [out, in] from the scatter form, read as the kernel reads it: each unit's chunks, each chunk's k-tile
    from the unit's bounds, each value written at its place."""
    rows, cols = view.shape
    tiles, units = view.meta.shape[:2]
    meta = view.meta.long() & 0xFFFFFFFF
    tile, u = torch.meshgrid(torch.arange(tiles), torch.arange(units), indexing="ij")
    counts = meta[..., 1].flatten()
    unit_of = torch.repeat_interleave(torch.arange(tiles * units), counts.cpu()).to(meta.device)
    chunk_in_unit = torch.arange(unit_of.numel(), device=meta.device) - (torch.cumsum(counts, 0) - counts)[unit_of]
    flat_meta = meta.view(-1, 4)[unit_of]
    ktile = chunk_ktiles(flat_meta, chunk_in_unit)
    chunk = flat_meta[:, 0] + chunk_in_unit
    place = view.places[chunk].long()  # [n, 8]
    value = view.values[chunk].view(view.dtype).float()
    qh, row, t, h = place // 128, (place // 8) % 16, (place % 8) // 2, place % 2
    tile_of, u_of = tile.flatten().to(meta.device)[unit_of], u.flatten().to(meta.device)[unit_of]
    full_row = tile_of[:, None] * 16 + row
    col = u_of[:, None] * UNIT + t * 32 + 4 * ktile[:, None] + 2 * qh + h
    out = torch.zeros(tiles * 16, cols, dtype=torch.float32, device=meta.device)
    out[full_row.flatten(), col.flatten()] = value.flatten()
    return out[:rows]
