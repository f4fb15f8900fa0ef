"""SpQR and SqueezeLLM (LUT) layers in one tensor-core launch: the grid's form (cuda_mma.py) with the weight's column
permutation and outliers read by the same kernel (mma_extras_layout.py), where extras_view.matmul takes three (the
permutation gather, the grid kernel, the outlier kernel). The outliers' sums join the block's fp32 sums before the one
rounding to the output dtype, and each lane's run in a fixed order: the result is deterministic.

The grid's form, with `COMPACT`: SpQR weights in SpQR's own layout (3-bit codes, groups of 16, quantized statistics)
the compact form (mma_spqr_layout.py: about 0.47 bytes a weight, statistics decoded in the kernel), LUT weights the
table form with 3-bit codes (0.375 bytes a weight against 0.5); else the scaled form of the view's grid (SpQR) and the
table form (LUT).

Outliers are walked for 1 to 16 activation rows (a lane holds one sum a row: beside the units up to 8, after them
above); where the layout does not fit (more than 2^16 columns, corrections past float16), the three launches stay.
On the dispatcher for 1 to 16 activation rows. At 1 the kernel gathers the activations through the permutation
itself; on an H100 one launch took a 3-bit SpQR layer from 1.18-1.34x dense (three launches) to 1.40-2.03x and a 3-bit
LUT layer from 1.13-1.79x to 2.03-2.36x. Above 1 row that gather (one 2-byte load a lane per activation) lost badly
(0.19x dense at batch 16 on 4096x14336), so there the activations are gathered by one launch before the kernel: at
batch 16 0.82-0.88x dense for SpQR and 0.90-1.15x for LUT against 0.63-0.67x / 0.67-0.77x in three launches
(docs/kernels-gpu.md; 2-15 rows not timed)."""

from __future__ import annotations

import dataclasses

import torch

from compress.formats import lut
from compress.kernels import cuda_mma, extras_view, mma_extras_layout, mma_lut_layout, mma_spqr_layout, views

DISPATCH = True  # whether dispatch.py sends SpQR / LUT layers here
DISPATCH_MAX_ROWS = 16  # activation rows up to which it does (measured at 1 and 16)
# activation rows up to which the kernel gathers them through the permutation (above: one gather launch before it)
GATHER_IN_KERNEL_MAX_ROWS = 1
# at 9-16 rows (outliers walked after the units) the walk reads a transposed copy of the activations: built, not yet
# measured on a GPU
TRANSPOSED_WALK = False
COMPACT = True  # 3-bit codes read as 3 bits: SpQR's compact form where mma_spqr_layout takes it, LUT's compact table form


def _bits(packed) -> int | None:
    return packed.bits if isinstance(packed, lut.LUTWeight) else None


def compact(packed) -> bool:
    return COMPACT and mma_spqr_layout.shape_ok(packed)


def supported(x: torch.Tensor, packed) -> bool:
    """Whether one launch takes this call: a SpQR / LUT weight with a view (extras_view.supported) whose grid a form
    takes, extras that fit the kernel's layout, and outliers with at most MAX_OUTLIER_ROWS activation rows."""
    if not extras_view.supported(packed):
        return False
    view = extras_view.cached(packed)
    grid_ok = cuda_mma.call_ok(x, packed.shape[1]) if compact(packed) else cuda_mma.form_supported(x, view.dense, _bits(packed))
    # the extras' check reads the corrections (a device sync): once a weight, before any graph capture
    if not (grid_ok and views.cached(view.dense.codes, "mma-extras-ok", lambda: mma_extras_layout.shape_ok(view))):
        return False
    return view.delta is None or x.numel() // x.shape[-1] <= mma_extras_layout.MAX_OUTLIER_ROWS


def preferred(x: torch.Tensor, packed) -> bool:
    return DISPATCH and x.numel() // x.shape[-1] <= DISPATCH_MAX_ROWS and supported(x, packed)


def form_of(packed, dtype: torch.dtype):
    """The cached grid form one launch runs for `dtype` activations (mma_layout.MmaWeight)."""
    if compact(packed):
        return views.cached(packed.codes, "mma-quantized", lambda: mma_spqr_layout.pack(packed))
    grid = extras_view.cached(packed).dense
    if COMPACT and isinstance(packed, lut.LUTWeight) and packed.bits <= 3 and mma_lut_layout.shape_ok(grid, packed.bits) and dtype in cuda_mma.DTYPES:
        return views.cached(grid.codes, f"mma-table-compact-{cuda_mma.DTYPES[dtype]}",
                            lambda: mma_lut_layout.pack_table(grid, packed.bits, dtype, compact=True))
    return cuda_mma.form_view_of(grid, _bits(packed), dtype)


def extras_of(view: extras_view.ExtrasView, tiles: int, gathered: bool = False) -> mma_extras_layout.MmaExtras:
    """The view's cached extras for a grid of `tiles` row tiles (kept while the view's grid lives); `gathered`: for
    activations gathered into stored column order before the launch (mma_extras_layout.build)."""
    key = "mma-extras-gathered" if gathered and view.perm is not None else "mma-extras"
    return views.cached(view.dense.codes, key, lambda: mma_extras_layout.build(view, tiles, gathered))


def prepared(packed, dtype: torch.dtype):
    """The weight's cached grid form for `dtype` activations and both extras layouts (the kernel's gather, and the one
    for activations gathered before it): built at the first call, whatever its rows, since building reads the outlier
    counts (a device sync) that a CUDA graph captured later at other rows could not."""
    form = form_of(packed, dtype)
    view = extras_view.cached(packed)
    return form, extras_of(view, form.tiles), extras_of(view, form.tiles, gathered=True)


def launch_for(form, batch: int, device: torch.device) -> cuda_mma.Launch:
    """cuda_mma.plan's launch, at most 8 warps above 4 rows: 16 warps leave a lane 128 registers, where the extras
    spill (compiled for sm_90)."""
    launch = cuda_mma.plan(form, batch, device)
    return dataclasses.replace(launch, warps=8) if launch.warps > 8 and batch > 4 else launch


def matmul(x: torch.Tensor, packed, gather_in_kernel: bool | None = None) -> torch.Tensor:
    """x [..., in] (the layer's column order) @ W.T for a SpQR / LUT weight in one launch (`supported`); with a
    permutation and `gather_in_kernel` False (default: above GATHER_IN_KERNEL_MAX_ROWS rows) two: the activations
    gathered into stored column order, then the kernel with the outliers."""
    form, extras, gathered = prepared(packed, x.dtype)
    batch = x.numel() // x.shape[-1]
    perm = extras_view.cached(packed).perm
    if perm is not None and not (batch <= GATHER_IN_KERNEL_MAX_ROWS if gather_in_kernel is None else gather_in_kernel):
        x, extras = x.index_select(x.dim() - 1, perm), gathered
    launch = launch_for(form, batch, x.device)
    transposed = None
    if TRANSPOSED_WALK and batch > 8 and extras.outliers and extras.perm is None:
        transposed = mma_extras_layout.transposed(x.reshape(batch, x.shape[-1]))
    return cuda_mma.matmul(x, form, launch, extras, transposed)
