"""SpQR and SqueezeLLM (LUT) layers in one tensor-core launch: the grid's scaled or table form (cuda_mma.py) with the
weight's column permutation and outliers read by the same kernel (mma_extras_layout.py), where extras_view.matmul
takes three (the permutation gather, the grid kernel, the outlier kernel). The outliers' sums join the block's fp32
sums before the one rounding to the output dtype, and each lane's run in a fixed order: the result is deterministic.

Outliers are walked for 1 to 8 activation rows (a lane holds one sum a row); above, and where the layout does not
fit (more than 2^16 columns, corrections past float16), the three launches stay. Off the dispatcher (`DISPATCH`) until
measured against them on a GPU."""

from __future__ import annotations

import dataclasses

import torch

from compress.kernels import cuda_mma, extras_view, mma_extras_layout, views

DISPATCH = False  # whether dispatch.py sends SpQR / LUT layers here (not until measured against the three launches)


def supported(x: torch.Tensor, view: extras_view.ExtrasView, bits: int | None = None) -> bool:
    """Whether one launch takes this call: the grid's form takes it (cuda_mma.form_supported; `bits`: a LUT weight's
    code bits), the extras fit the kernel's layout, and outliers come with at most MAX_OUTLIER_ROWS activation rows."""
    if not (cuda_mma.form_supported(x, view.dense, bits) and mma_extras_layout.shape_ok(view)):
        return False
    return view.delta is None or x.numel() // x.shape[-1] <= mma_extras_layout.MAX_OUTLIER_ROWS


def preferred(x: torch.Tensor, view: extras_view.ExtrasView, bits: int | None = None) -> bool:
    return DISPATCH and supported(x, view, bits)


def extras_of(view: extras_view.ExtrasView, tiles: int) -> mma_extras_layout.MmaExtras:
    """The view's cached extras for a grid of `tiles` row tiles (kept while the view's grid lives)."""
    return views.cached(view.dense.codes, "mma-extras", lambda: mma_extras_layout.build(view, tiles))


def matmul(x: torch.Tensor, view: extras_view.ExtrasView, bits: int | None = None) -> torch.Tensor:
    """x [..., in] (the layer's column order) @ W.T for a SpQR / LUT weight's view in one launch (`supported`)."""
    form = cuda_mma.form_view_of(view.dense, bits, x.dtype)
    batch = x.numel() // x.shape[-1]
    launch = cuda_mma.plan(form, batch, x.device)
    if launch.warps > 8 and batch > 4:  # 16 warps leave a lane 128 registers: the extras' spill (compiled for sm_90)
        launch = dataclasses.replace(launch, warps=8)
    return cuda_mma.matmul(x, form, launch, extras_of(view, form.tiles))
