"""The outlier corrections of a SpQR or SqueezeLLM (LUT) weight's view in one kernel: y[b, r] += sum over row r's
outliers of x[b, col] x delta (compress/kernels/extras_view.py; delta: the outlier's value minus what the grid kernel
computed there), added in fp32 to y and rounded once more to y's dtype.

A program takes ROWS output rows and one activation row, and walks the rows' outliers (the format's own CSR: row
pointers, columns ascending) BLOCK a row at a time, a [ROWS, BLOCK] tile a step, until the longest row is done; each
row's sum is in a fixed order (deterministic, unlike index_add_'s atomics). Rows without outliers are left untouched.

Measured on an H200, the first form (a program a row) made SpQR's and SqueezeLLM's layers 2-3x slower than their grid
kernel alone: 14336 programs of a few dependent loads each are latency, not bytes (1% outliers of 4096 x 14336 are
4.7 MB at 8 bytes each, about 1 us of HBM). Tested against the plain-torch corrections under Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 32  # output rows a program
BLOCK = 32  # outliers of a row a step (1% of 4096 columns is ~41 a row)


@triton.jit
def _row_corrections(y_ptr, ldy, x_ptr, ldx, row_ptr, col_ptr, delta_ptr, N, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b = tl.program_id(1).to(tl.int64)
    in_rows = rows < N
    start = tl.load(row_ptr + rows, mask=in_rows, other=0)
    count = tl.load(row_ptr + rows + 1, mask=in_rows, other=0) - start
    longest = tl.max(count, axis=0)
    acc = tl.zeros([ROWS], dtype=tl.float32)
    k = 0
    while k < longest:  # (a while loop: the interpreter takes no tensor bound in range())
        slot = k + tl.arange(0, BLOCK)
        here = slot[None, :] < count[:, None]
        offs = start[:, None] + slot[None, :]
        col = tl.load(col_ptr + offs, mask=here, other=0)
        delta = tl.load(delta_ptr + offs, mask=here, other=0.0)
        xv = tl.load(x_ptr + b * ldx + col, mask=here, other=0.0)
        acc += tl.sum(xv.to(tl.float32) * delta, axis=1)
        k += BLOCK
    out = y_ptr + b * ldy + rows
    touched = count > 0
    y = tl.load(out, mask=touched, other=0.0).to(tl.float32)
    tl.store(out, (y + acc).to(y_ptr.dtype.element_ty), mask=touched)


def add_corrections(y: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor,
                    rows_per_program: int = ROWS, block: int = BLOCK, num_warps: int = 4) -> torch.Tensor:
    """y [batch, rows] += the corrections of x [batch, in] (row_ptr int32 [rows + 1], cols int32/int64 [outliers] into
    x's columns, delta float32 [outliers]), in place; returns y. `rows_per_program`, `block`, `num_warps`: the tiling
    (powers of two; benchmarks/outlier_probe.py times them)."""
    if y.dim() != 2 or x.dim() != 2 or y.shape[0] != x.shape[0] or row_ptr.numel() != y.shape[1] + 1:
        raise ValueError(f"corrections of x {tuple(x.shape)} into y {tuple(y.shape)} with {row_ptr.numel() - 1} rows of outliers")
    if y.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("the corrections take row-major y and x")
    batch, rows = y.shape
    if batch and rows:
        _row_corrections[(triton.cdiv(rows, rows_per_program), batch)](y, y.stride(0), x, x.stride(0), row_ptr, cols, delta, rows,
                                                                        ROWS=rows_per_program, BLOCK=block, num_warps=num_warps)
    return y
