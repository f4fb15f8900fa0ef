"""A SpQR or SqueezeLLM (LUT) weight's column permutation and outliers in the form the tensor-core kernel reads them
itself (cuda_mma.py with extras), so such a layer is one launch instead of three (the permutation gather, the grid
kernel, the outlier kernel: each a few microseconds under a CUDA graph on layers whose target time is 10-30 us).

- The permutation: int16 [in] (uint16 bits): stored column j's activation is x[:, perm[j]]. A lane gathers its 32
  activations of a unit through it instead of four 16-byte loads.
- The outliers: per 16-row tile an ELL block of K slices of 16 entries (K: the most outliers of any of the tile's
  rows); entry (k, r) is row r's k-th outlier: its activation column (the permutation applied) in the low 16 bits, its
  correction (extras_view.ExtrasView.delta) as float16 in the high 16; padding entries are 0 (skipped). tile_ptr int32
  [tiles + 1]: tile t's slices are tile_ptr[t] .. tile_ptr[t + 1] - 1, so a block's rows' slices are contiguous. Each
  warp walks its share of the block's slices beside its units (loads one unit step ahead), a lane its row's sum for
  every activation row in fp32 in a fixed order, added to the block's sums before the one rounding to the output dtype.
  4 bytes an outlier plus the padding (a tile's rows' counts against their largest).

`corrections` replays the walk's sums on CPU, so the layout is tested against extras_view's reference corrections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats.words import to_int32
from compress.kernels import extras_view

MAX_COLS = 1 << 16  # activation columns the 16-bit indices reach
FLOAT16_MAX = 65504.0
MAX_OUTLIER_ROWS = 16  # activation rows the kernel's outlier walk sums (a lane: one register a row and row tile)


@dataclass
class MmaExtras:
    perm: torch.Tensor | None  # int16 [in]: stored column j reads activation column perm[j] (uint16 bits)
    slices: torch.Tensor | None  # int32 [slices * 16]: activation column | float16 correction << 16, 0 for padding
    tile_ptr: torch.Tensor | None  # int32 [tiles + 1]

    @property
    def outliers(self) -> bool:
        return self.slices is not None

    def tag(self, batch: int) -> str:
        """The kernel name's extras (cuda_mma.kernel_name) for `batch` activation rows: "p" with a permutation, "o<n>"
        with outliers (n: the rows' power of two, at most MAX_OUTLIER_ROWS)."""
        if self.outliers and not 1 <= batch <= MAX_OUTLIER_ROWS:
            raise ValueError(f"the kernel adds outliers for 1 to {MAX_OUTLIER_ROWS} activation rows, not {batch}")
        return ("p" if self.perm is not None else "") + (f"o{1 << (batch - 1).bit_length()}" if self.outliers else "")


def shape_ok(view: extras_view.ExtrasView) -> bool:
    """Whether the kernel can read this view's extras: at most 2^16 columns, every correction finite in float16."""
    if view.dense.shape[1] > MAX_COLS:
        return False
    return view.delta is None or bool((view.delta.abs() <= FLOAT16_MAX).all())


def build(view: extras_view.ExtrasView, tiles: int, gathered: bool = False) -> MmaExtras:
    """The kernel's form of a view's permutation and outliers for a grid of `tiles` 16-row tiles (mma_layout's padded
    count, at least the rows'). `gathered`: for activations already in stored column order (x[:, view.perm], gathered
    before the launch): no permutation, the outliers' columns stored ones."""
    rows, cols = view.dense.shape
    if not shape_ok(view) or tiles * 16 < rows:
        raise ValueError(f"no in-kernel extras for a {rows}x{cols} weight in {tiles} tiles (at most {MAX_COLS} columns, "
                         "float16-finite corrections)")
    perm = None if view.perm is None or gathered else _int16(view.perm.to(torch.int64))
    if view.delta is None:
        return MmaExtras(perm, None, None)
    device = view.delta.device
    counts = torch.zeros(tiles * 16, dtype=torch.int64, device=device)
    counts[:rows] = (view.row_ptr[1:] - view.row_ptr[:-1]).to(torch.int64)
    depth = counts.view(tiles, 16).amax(dim=1)
    tile_ptr = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), depth.cumsum(0)])
    rank = torch.arange(view.delta.numel(), device=device) - view.row_ptr.to(torch.int64)[view.rows]
    slot = (tile_ptr[view.rows // 16] + rank) * 16 + view.rows % 16
    column = view.cols.to(torch.int64) if view.perm is None or gathered else view.perm.to(torch.int64)[view.cols.to(torch.int64)]
    correction = view.delta.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    entries = torch.zeros(int(tile_ptr[-1]) * 16, dtype=torch.int64, device=device)
    entries[slot] = column | (correction << 16)
    return MmaExtras(perm, to_int32(entries), tile_ptr.to(torch.int32))


def _int16(values: torch.Tensor) -> torch.Tensor:
    """int64 values below 2^16 as int16 with the same low 16 bits."""
    return torch.where(values >= 1 << 15, values - (1 << 16), values).to(torch.int16)



def transposed(x: torch.Tensor) -> torch.Tensor:
    """x [batch <= 16, in] as the outlier walk reads it at 9-16 rows (cuda_mma.matmul's `transposed`): [in, 16], a
    column's activation rows in one 32-byte run, rows past `batch` zero."""
    if x.dim() != 2 or not 8 < x.shape[0] <= MAX_OUTLIER_ROWS:
        raise ValueError(f"transposed activations are for 9-{MAX_OUTLIER_ROWS} rows [batch, in], not {tuple(x.shape)}")
    padded = x if x.shape[0] == MAX_OUTLIER_ROWS else torch.nn.functional.pad(x, (0, 0, 0, MAX_OUTLIER_ROWS - x.shape[0]))
    return padded.t().contiguous()  # one launch at 16 rows, two below


def stored_activations(x: torch.Tensor, extras: MmaExtras) -> torch.Tensor:
    """x [batch, in] in stored column order, read through the permutation as the kernel reads it."""
    return x if extras.perm is None else x[:, extras.perm.to(torch.int64) & 0xFFFF]


def corrections(x: torch.Tensor, extras: MmaExtras, rows: int) -> torch.Tensor:
    """float32 [batch, rows]: each row's sum of correction x activation over its entries (x [batch, in] in the
    layer's column order), read from the slices as the kernel reads them (padding skipped)."""
    out = torch.zeros(x.shape[0], rows, dtype=torch.float32, device=x.device)
    if not extras.outliers:
        return out
    entries = extras.slices.to(torch.int64) & 0xFFFFFFFF
    depth = (extras.tile_ptr[1:] - extras.tile_ptr[:-1]).to(torch.int64)
    tile = torch.repeat_interleave(torch.arange(depth.numel(), device=x.device), depth * 16)
    row = tile * 16 + torch.arange(entries.numel(), device=x.device) % 16
    live = (entries >> 16 != 0) & (row < rows)
    column, bits = entries[live] & 0xFFFF, (entries[live] >> 16).to(torch.int32)
    correction = torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16).view(torch.float16).float()
    return out.index_add_(1, row[live], x[:, column].float() * correction)
