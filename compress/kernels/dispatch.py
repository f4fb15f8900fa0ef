"""Which kernel computes y = x @ W.T for a packed weight off the CPU.

CUDA tensors of group_quant, nm and N:M sparse_quant weights go to the Triton kernels (triton_kernels.py), except at
batch 1 to 16 of bf16/fp16 activations: group_quant weights with 2-4-bit codes go to the tensor-core kernel of
cuda_mma.py (its exact form for integer zero points and groups of whole 128-column units, its scaled form for groups
of 16-64 and float zero points), 2:4 sparse int4 and 2:4 nm (16-bit values) ones to the sparse tensor-core kernel of
cuda_mma_sparse.py. Bitmap weights go to the shared-memory scatter kernel (cuda_mma_scatter.py) at batch 1 to 16 of
bf16/fp16 activations (all batches with its ALL_BATCHES), else to triton_bitmap.py; sparse + group-quant weights the
sparse kernels read slowly (unstructured ones; N:M ones other than 2:4 int4) to the group-quant kernels through their
grid view (`_sparse_on_grid`); SpQR and LUT weights without a keep mask through their views (extras_view.py; 3-bit
codes read as 4-bit words, views.py): the grid part on the tensor-core kernel's scaled form (SpQR) or table form (LUT
codes of 2-3 bits) at batch 1 to 16, else on the Triton kernels, the outliers by triton_outliers.py (with
cuda_mma_extras.DISPATCH, the permutation, grid and outliers in one launch: cuda_mma_extras.py); ternary_dict
weights to triton_ternary.py (at batch 1 to the CUDA kernel of cuda_ternary.py where it is the faster).
COMPRESS_GPU_KERNEL=triton keeps every weight on the Triton kernels. All are imported on first use only, so `import
compress` and every CPU path stay free of Triton; every other format or device, and every device when Triton is
missing, takes the format's plain-torch reference_matmul. COMPRESS_GPU_KERNEL=torch forces the reference
(COMPRESS_GPU_KERNEL=triton makes a missing Triton an error instead of a silent fallback). CPU tensors never come
here: cpu.py keeps its own paths."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from compress.formats import bitmap, group_quant, lut, nm, sparse_quant, spqr, ternary_dict
from compress.kernels import views

ENV = "COMPRESS_GPU_KERNEL"
CHOICES = ("auto", "triton", "torch")
REFERENCE = {nm.NMWeight: nm.reference_matmul, group_quant.GroupQuantWeight: group_quant.reference_matmul,
             bitmap.BitmapWeight: bitmap.reference_matmul, sparse_quant.SparseQuantWeight: sparse_quant.reference_matmul,
             spqr.SpQRWeight: spqr.reference_matmul, lut.LUTWeight: lut.reference_matmul,
             ternary_dict.TernaryDictWeight: ternary_dict.reference_matmul}
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_kernels():
    from compress.kernels import triton_kernels

    return triton_kernels


def _triton_ternary():
    from compress.kernels import triton_ternary

    return triton_ternary


def _cuda_ternary():
    from compress.kernels import cuda_ternary

    return cuda_ternary


def _cuda_mma():
    from compress.kernels import cuda_mma

    return cuda_mma


def _bitmask_layout(packed) -> bool:
    """Bitmap weights and unstructured sparse_quant ones: triton_bitmap.py's kernel."""
    return isinstance(packed, bitmap.BitmapWeight) or (isinstance(packed, sparse_quant.SparseQuantWeight) and packed.bitmask is not None)


def _choice() -> str:
    choice = os.environ.get(ENV, "auto").lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: expected one of {CHOICES}")
    return choice


def _extras_grid(packed):
    """The grid part's kernel of a SpQR / LUT weight's view: the tensor-core kernel's scaled or table form where it takes
    the grid (auto), else the Triton kernels."""
    triton = _triton_kernels().packed_matmul
    if _choice() != "auto":
        return triton
    bits = packed.bits if isinstance(packed, lut.LUTWeight) else None

    def grid(x2: torch.Tensor, dense) -> torch.Tensor:
        mma = _cuda_mma()
        return mma.form_matmul(x2, dense, bits) if mma.form_supported(x2, dense, bits) else triton(x2, dense)

    return grid


def _sparse_on_grid(x: torch.Tensor, packed) -> group_quant.GroupQuantWeight | None:
    """A sparse + group-quant weight the sparse kernels read slower than its dense grid (auto, integer zero points):
    unstructured ones at every batch (the Triton bitmap kernel runs at 0.03-0.11x dense bf16, the grid's kernels at
    0.5-2.8x), N:M ones other than 2:4 int4 where the tensor-core kernel's exact form takes the grid; their cached grid
    view (sparse_quant.as_group_quant), else None. Only kernels that compute scale x (code - zero) exactly read it (the
    exact form, the Triton kernels): the scaled form's rounded bias would leave a pruned weight a rounding residue."""
    if not isinstance(packed, sparse_quant.SparseQuantWeight) or packed.zero_kind != "integer" or _choice() != "auto":
        return None
    unstructured = packed.bitmask is not None
    if not unstructured:
        from compress.kernels import cuda_mma_sparse

        if cuda_mma_sparse.supported(x, packed) or not _cuda_mma().call_ok(x, packed.shape[1]):
            return None  # the sparse tensor cores take it, or no tensor-core kernel takes this call
    grid = views.cached(packed.codes, "grid", lambda: sparse_quant.as_group_quant(packed))
    return grid if unstructured or _cuda_mma().supported(x, grid) else None


def kernel_for(x: torch.Tensor, packed) -> str:
    """"cpu" (cpu.py's kernels), "triton" or "torch" (the format's reference) for this input and weight."""
    if x.device.type == "cpu":
        return "cpu"
    choice = _choice()
    if choice == "torch" or x.device.type != "cuda" or x.dtype not in TRITON_DTYPES:
        return "torch"
    if not triton_available():
        if choice == "triton":
            raise RuntimeError(f"{ENV}=triton but Triton is not installed")
        return "torch"
    if isinstance(packed, ternary_dict.TernaryDictWeight) or _bitmask_layout(packed):
        return "triton"
    if isinstance(packed, (spqr.SpQRWeight, lut.LUTWeight)):
        from compress.kernels import extras_view

        return "triton" if extras_view.supported(packed) else "torch"
    return "triton" if _triton_kernels().supports(packed) else "torch"


def device_matmul(x: torch.Tensor, packed, table: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T for a non-CPU x: the Triton kernel where one takes this weight, else the reference. `table`:
    a ternary_dict weight's kernel table on x's device, when the caller keeps one (TernaryDictLinear)."""
    if x.shape[-1] != packed.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {packed.shape[1]}")
    if kernel_for(x, packed) == "triton":
        if isinstance(packed, ternary_dict.TernaryDictWeight):
            if _choice() == "auto" and _cuda_ternary().preferred(x, packed):
                return _cuda_ternary().ternary_matmul(x, packed)
            return _triton_ternary().ternary_dict_matmul(x, packed, table)
        grid = _sparse_on_grid(x, packed)
        if grid is not None:
            if _cuda_mma().supported(x, grid):
                return _cuda_mma().matmul(x, grid)
            return _triton_kernels().packed_matmul(x, views.kernel_form(grid))
        if _bitmask_layout(packed):
            from compress.kernels import cuda_mma_scatter, nm_split, triton_bitmap

            if _choice() == "auto" and nm_split.preferred(packed):
                return nm_split.matmul(x, packed)

            if _choice() == "auto" and cuda_mma_scatter.supported(x, packed):
                return cuda_mma_scatter.matmul(x, packed)
            return triton_bitmap.matmul(x, packed)
        if isinstance(packed, (spqr.SpQRWeight, lut.LUTWeight)):
            from compress.kernels import cuda_mma_extras, extras_view, triton_outliers

            if _choice() == "auto" and cuda_mma_extras.preferred(x, packed):
                return cuda_mma_extras.matmul(x, packed)
            return extras_view.matmul(x, extras_view.cached(packed), _extras_grid(packed), triton_outliers.add_corrections)
        if isinstance(packed, group_quant.GroupQuantWeight) and _choice() == "auto":
            if _cuda_mma().supported(x, packed):
                return _cuda_mma().matmul(x, packed)
            if _cuda_mma().form_supported(x, packed):
                return _cuda_mma().form_matmul(x, packed)
        if isinstance(packed, (sparse_quant.SparseQuantWeight, nm.NMWeight)) and _choice() == "auto":
            from compress.kernels import cuda_mma_sparse

            if cuda_mma_sparse.supported(x, packed):
                return cuda_mma_sparse.matmul(x, packed)
        return _triton_kernels().packed_matmul(x, views.kernel_form(packed))
    try:
        return REFERENCE[type(packed)](x, packed)
    except KeyError:
        raise TypeError(f"no kernel for {type(packed).__name__}") from None
