"""Bitmap (unstructured sparse) weights on the GPU (compress.formats.bitmap): y = x @ W.T straight from the bitmask and
the row-packed kept values, instead of the format's row-by-row reference.

A view per weight (views.cached): for every row and every block of WORD_BLOCK bitmask words (256 columns), the index
of the block's first kept value in the value stream (the stream is row by row, so it is the exclusive running count
of kept weights in row-major order). A program owns BLOCK_N rows and up to BLOCK_M activation rows; for each block it
expands the rows' words to [BLOCK_N, 256] bits, numbers the kept ones with a running sum (so no popcount), gathers
their values (consecutive in memory within a row) and dots them with the block's 256 activations in fp32.

Batches above MAX_BATCH (prefill) decode the weight to dense once and call F.linear: "dense on the decoded tile".
Not yet timed on a GPU (built when no device time was left); tested against the reference under Triton's interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from compress.formats import bitmap

WORD_BLOCK = 8  # bitmask words a step: 256 columns
BLOCK_N = 4  # output rows a program
BLOCK_M = 4  # activation rows a program
MAX_BATCH = 16


@dataclass
class BitmapView:
    shape: tuple[int, int]
    bitmask: torch.Tensor  # int32 [rows, words], the weight's own (an alias)
    values: torch.Tensor  # [nnz], the weight's own (an alias)
    block_start: torch.Tensor  # int32 (int64 past 2^31 values) [rows, blocks]: the first kept value of each block


_POPCOUNT8 = None


def _popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each int32 word, int64."""
    global _POPCOUNT8
    if _POPCOUNT8 is None or _POPCOUNT8.device != words.device:
        _POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device=words.device)
    return _POPCOUNT8[words.contiguous().view(torch.uint8).long()].view(*words.shape, 4).sum(-1)


def build_view(packed: bitmap.BitmapWeight) -> BitmapView:
    rows, words = packed.bitmask.shape
    counts = _popcount(packed.bitmask).reshape(-1)
    starts = (torch.cumsum(counts, 0) - counts).view(rows, words)[:, ::WORD_BLOCK]
    dtype = torch.int32 if packed.values.numel() < 2**31 else torch.int64
    return BitmapView(packed.shape, packed.bitmask.detach(), packed.values.detach(), starts.to(dtype).contiguous())


@triton.jit
def _bitmap_kernel(x_ptr, out_ptr, mask_ptr, values_ptr, start_ptr, M, N, K, WORDS, BLOCKS,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, WB: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok, m_ok = rows < N, ms < M
    word = tl.arange(0, WB)
    bit = tl.arange(0, 32)
    span = tl.arange(0, WB * 32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    blk = 0
    while blk < BLOCKS:  # a while loop: Triton's interpreter (NumPy 2) takes no run-time range bound
        w_idx = blk * WB + word
        w = tl.load(mask_ptr + rows[:, None] * WORDS + w_idx[None, :], mask=r_ok[:, None] & (w_idx[None, :] < WORDS), other=0)
        kept = tl.reshape((w[:, :, None] >> bit[None, None, :]) & 1, [BLOCK_N, WB * 32])  # column blk * 256 + j
        first = tl.load(start_ptr + rows * BLOCKS + blk, mask=r_ok, other=0)
        index = first[:, None] + tl.cumsum(kept, axis=1) - 1  # the kept value's place in the stream
        v = tl.load(values_ptr + index, mask=(kept != 0) & r_ok[:, None], other=0.0).to(tl.float32)  # [BN, 256]
        cols = blk * WB * 32 + span
        xv = tl.load(x_ptr + ms[:, None] * K + cols[None, :], mask=m_ok[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)
        acc += tl.sum(v[None, :, :] * xv[:, None, :], axis=2)
        blk += 1
    tl.store(out_ptr + ms[:, None] * N + rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


def matmul(x: torch.Tensor, packed: bitmap.BitmapWeight) -> torch.Tensor:
    """x [..., in] @ W.T -> [..., out] in x's dtype (fp32 accumulation), for x on the weight's device."""
    from compress.kernels import views

    rows, cols = packed.shape
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {cols}")
    x2 = x.reshape(-1, cols)
    batch = x2.shape[0]
    if batch > MAX_BATCH:  # prefill: dense on the decoded weight
        return F.linear(x, bitmap.unpack(packed).to(x.dtype))
    view = views.cached(packed.bitmask, "bitmap", lambda: build_view(packed))
    x2 = x2.contiguous()
    out = torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    if batch and rows:
        words = view.bitmask.shape[1]
        grid = (triton.cdiv(rows, BLOCK_N), triton.cdiv(batch, BLOCK_M))
        _bitmap_kernel[grid](x2, out, view.bitmask, view.values, view.block_start, batch, rows, cols, words, view.block_start.shape[1],
                             BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, WB=WORD_BLOCK)
    return out.reshape(*x.shape[:-1], rows)
