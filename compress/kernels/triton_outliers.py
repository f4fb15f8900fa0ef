"""The outlier corrections of a SpQR or SqueezeLLM (LUT) weight's view in one kernel: y[b, r] += sum over row r's
outliers of x[b, col] x delta (compress/kernels/extras_view.py; delta: the outlier's value minus what the grid kernel
computed there), added in fp32 to y and rounded once more to y's dtype.

Before, the corrections were six device ops (y to fp32, two gathers, a product, `index_add_`, back to y's dtype):
a few microseconds each under a CUDA graph, as long as the grid part itself on a 4096-column layer. Here a program
takes one output row and up to BLOCK_B activation rows and walks the row's outliers (the format's own CSR: row
pointers, columns ascending) BLOCK at a time; the sum is in a fixed order (deterministic, unlike index_add_'s atomics).
Tested against the plain-torch corrections under Triton's interpreter; not yet timed on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 32  # outliers a step (1% of 4096 columns is ~41 a row)
BLOCK_B = 16  # activation rows a program


@triton.jit
def _row_corrections(y_ptr, ldy, x_ptr, ldx, row_ptr, col_ptr, delta_ptr, B, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr):
    row = tl.program_id(0)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_batch = b < B
    start = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)
    if end > start:  # most rows of a 1% weight have outliers; the others are left untouched
        acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        k = start
        while k < end:  # (a while loop: the interpreter takes no tensor bound in range())
            offs = k + tl.arange(0, BLOCK)
            here = offs < end
            col = tl.load(col_ptr + offs, mask=here, other=0)
            delta = tl.load(delta_ptr + offs, mask=here, other=0.0)
            xv = tl.load(x_ptr + b[:, None].to(tl.int64) * ldx + col[None, :], mask=in_batch[:, None] & here[None, :], other=0.0)
            acc += tl.sum(xv.to(tl.float32) * delta[None, :], axis=1)
            k += BLOCK
        out = y_ptr + b.to(tl.int64) * ldy + row
        y = tl.load(out, mask=in_batch, other=0.0).to(tl.float32)
        tl.store(out, (y + acc).to(y_ptr.dtype.element_ty), mask=in_batch)


def add_corrections(y: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """y [batch, rows] += the corrections of x [batch, in] (row_ptr int32 [rows + 1], cols int32 [outliers] into x's
    columns, delta float32 [outliers]), in place; returns y."""
    if y.dim() != 2 or x.dim() != 2 or y.shape[0] != x.shape[0] or row_ptr.numel() != y.shape[1] + 1:
        raise ValueError(f"corrections of x {tuple(x.shape)} into y {tuple(y.shape)} with {row_ptr.numel() - 1} rows of outliers")
    if y.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("the corrections take row-major y and x")
    batch, rows = y.shape
    if batch and rows:
        _row_corrections[(rows, triton.cdiv(batch, BLOCK_B))](y, y.stride(0), x, x.stride(0), row_ptr, cols, delta, batch,
                                                               BLOCK=BLOCK, BLOCK_B=BLOCK_B)
    return y
