"""A bitmap (unstructured sparse) weight as a 2:4 weight plus its overflow, for the sparse tensor cores: in each group
of 4 columns the two largest kept weights (or the kept ones and zeros) form a 2:4 weight (nm.NMWeight, which
cuda_mma_sparse.py multiplies at 1.7-2x dense bf16 on an H200), and the kept weights past two a group become
outliers, added by the SpQR / SqueezeLLM correction kernel (extras_view.matmul, triton_outliers.py).

At s sparsity with kept weights spread at random, a group overflows when it keeps 3 or 4: at 70% 2.3% of all weights
are outliers (8 bytes each), so the view reads about 1.125 + 0.18 bytes a weight against dense bf16's 2; at 50%,
9.4% are, and the view reads about as much as dense. `overflow_share` says which a weight is; the dispatcher takes
this view only below SPLIT_MAX_OVERFLOW (0 until measured on a GPU: the shared-memory scatter kernel stays the
default). The view equals the weight exactly: outliers carry their values and the 2:4 part is zero there.
"""

from __future__ import annotations

import torch

from compress.formats import bitmap, nm
from compress.kernels import extras_view, views
from compress.kernels.extras_view import ExtrasView

SPLIT_MAX_OVERFLOW = 0.0  # the most outliers, as a share of all weights, for which the dispatcher takes this view


def _groups(packed: bitmap.BitmapWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept mask, weight in its stored dtype), both [rows, cols // 4, 4]."""
    rows, cols = packed.shape
    mask = bitmap.read_bitmask(packed.bitmask, cols)
    weight = torch.zeros(rows, cols, dtype=packed.values.dtype, device=mask.device)
    weight[mask] = packed.values
    return mask.view(rows, -1, 4), weight.view(rows, -1, 4)


def overflow_share(packed: bitmap.BitmapWeight) -> float:
    """The share of all weights kept past two in their group of 4 (the outliers of the split)."""
    if packed.shape[1] % 4:
        return 1.0
    mask, _ = _groups(packed)
    return float((mask.sum(-1) - 2).clamp_min(0).sum()) / max(1, mask.numel())


def split(packed: bitmap.BitmapWeight) -> ExtrasView:
    """The 2:4 part (the two largest kept weights of each group of 4, zeros where fewer are kept) and the outliers."""
    rows, cols = packed.shape
    if cols % 4:
        raise ValueError(f"a 2:4 split needs columns in groups of 4, got {cols}")
    mask, weight = _groups(packed)
    position = torch.arange(4, device=mask.device)
    # kept weights by magnitude first, then the unkept ones (zeros) by position: the first two of each group are the 2:4 part
    score = torch.where(mask, weight.float().abs() + 1.0, -position.float())
    chosen = score.argsort(dim=-1, descending=True, stable=True)[..., :2]
    part = torch.zeros_like(mask).scatter_(-1, chosen, True)
    dense = nm.pack((weight.float() * part).view(rows, cols), part.view(rows, cols), 2, 4, packed.values.dtype)
    over = (mask & ~part).view(rows, cols)
    row, col = over.nonzero(as_tuple=True)
    counts = over.sum(1)
    row_ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int32)
    delta = weight.view(rows, cols)[row, col].float()
    return ExtrasView(dense, None, row, row_ptr, col.to(torch.int32), delta)


def cached(packed: bitmap.BitmapWeight) -> ExtrasView:
    """The split of this weight, built on its first call and kept while its bitmask tensor lives."""
    return views.cached(packed.bitmask, "nm-split", lambda: split(packed))


def preferred(packed) -> bool:
    """Whether the dispatcher takes this view for a bitmap weight: its outliers (counted once a weight) at most
    SPLIT_MAX_OVERFLOW of its weights."""
    if SPLIT_MAX_OVERFLOW <= 0 or not isinstance(packed, bitmap.BitmapWeight) or packed.shape[1] % 128:
        return False
    return views.cached(packed.bitmask, "nm-split-share", lambda: overflow_share(packed)) <= SPLIT_MAX_OVERFLOW


def matmul(x: torch.Tensor, packed: bitmap.BitmapWeight) -> torch.Tensor:
    """x @ W.T on a GPU through the split: the 2:4 part on the sparse tensor cores (batch 1-16 of 16-bit activations,
    else the Triton N:M kernels), then the outliers' corrections."""
    from compress.kernels import cuda_mma_sparse, triton_kernels, triton_outliers

    def part(x2: torch.Tensor, dense: nm.NMWeight) -> torch.Tensor:
        return cuda_mma_sparse.matmul(x2, dense) if cuda_mma_sparse.supported(x2, dense) else triton_kernels.packed_matmul(x2, dense)

    return extras_view.matmul(x, cached(packed), part, triton_outliers.add_corrections)
