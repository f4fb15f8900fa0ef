"""Bitmap (unstructured sparse) weights on the GPU: y = x @ W.T straight from the bitmask and the row-packed kept
values (compress.formats.bitmap) or kept codes with group statistics (compress.formats.sparse_quant, pattern
"unstructured"), instead of the formats' row-by-row references.

A view per weight (views.cached): for every row and every block of WORD_BLOCK bitmask words (256 columns), the index
of the block's first kept value in the value stream (the stream is row by row, so it is the exclusive running count
of kept weights in row-major order); for codes, the index inside the row and each row's first code word (a row's
codes start at a word boundary). A program owns BLOCK_N rows and up to BLOCK_M activation rows; for each block it
expands the rows' words to [BLOCK_N, 256] bits, numbers the kept ones with a running sum (so no popcount), gathers
their values (consecutive in memory within a row) and dots them with the block's 256 activations in fp32.

Batches above MAX_BATCH (prefill) decode the weight to dense once and call F.linear: "dense on the decoded tile".
Measured on an H200 at 70% sparsity: 0.11x dense bf16 at batch 1, 0.03x at 16; bitmap weights now take the
shared-memory tensor-core kernel at batch 1-16 (cuda_mma_scatter.py) and come here above, unstructured sparse_quant
ones with float zero points or when COMPRESS_GPU_KERNEL=triton (the rest run on their grid: dispatch.py). Tested
against the reference under Triton's interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from compress.formats import bitmap, sparse_quant
from compress.formats.words import codes_per_word

WORD_BLOCK = 8  # bitmask words a step: 256 columns
BLOCK_N = 4  # output rows a program
BLOCK_M = 4  # activation rows a program
MAX_BATCH = 16


@dataclass
class BitmapView:
    shape: tuple[int, int]
    bitmask: torch.Tensor  # int32 [rows, words], the weight's own (an alias)
    values: torch.Tensor  # [nnz] values, or the flat int32 code words: the weight's own (an alias)
    block_start: torch.Tensor  # int32 (int64 past 2^31) [rows, blocks]: the first kept value of each block (codes: in its row)
    row_word: torch.Tensor | None = None  # codes: int32 / int64 [rows], each row's first code word


_POPCOUNT8 = None


def _popcount(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each int32 word, int64."""
    global _POPCOUNT8
    if _POPCOUNT8 is None or _POPCOUNT8.device != words.device:
        _POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64, device=words.device)
    return _POPCOUNT8[words.contiguous().view(torch.uint8).long()].view(*words.shape, 4).sum(-1)


def _index(values: torch.Tensor, limit: int) -> torch.Tensor:
    return values.to(torch.int32 if limit < 2**31 else torch.int64).contiguous()


def build_view(packed: bitmap.BitmapWeight | sparse_quant.SparseQuantWeight) -> BitmapView:
    rows, words = packed.bitmask.shape
    counts = _popcount(packed.bitmask)
    if isinstance(packed, bitmap.BitmapWeight):
        flat = counts.reshape(-1)
        starts = (torch.cumsum(flat, 0) - flat).view(rows, words)[:, ::WORD_BLOCK]
        return BitmapView(packed.shape, packed.bitmask.detach(), packed.values.detach(), _index(starts, packed.values.numel()))
    per = codes_per_word(packed.bits)
    starts = (torch.cumsum(counts, 1) - counts)[:, ::WORD_BLOCK]  # inside the row
    row_words = (counts.sum(1) + per - 1) // per
    row_word = torch.cumsum(row_words, 0) - row_words
    return BitmapView(packed.shape, packed.bitmask.detach(), packed.codes.detach(), _index(starts, packed.shape[1]),
                      _index(row_word, packed.codes.numel()))


@triton.jit
def _bitmap_kernel(x_ptr, out_ptr, mask_ptr, values_ptr, start_ptr, row_word_ptr, scale_ptr, zero_ptr, M, N, K, WORDS, BLOCKS,
                   GROUPS, ZWPR, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, WB: tl.constexpr, CODES: tl.constexpr,
                   BITS: tl.constexpr, PER: tl.constexpr, GROUP: tl.constexpr, ZINT: tl.constexpr):
    """CODES: values_ptr holds the code words; a kept weight is scale * (code - zero) of its row and column group."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok, m_ok = rows < N, ms < M
    word_in_block = tl.arange(0, WB)
    bit = tl.arange(0, 32)
    span = tl.arange(0, WB * 32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    blk = 0
    while blk < BLOCKS:  # a while loop: Triton's interpreter (NumPy 2) takes no run-time range bound
        w_idx = blk * WB + word_in_block
        w = tl.load(mask_ptr + rows[:, None] * WORDS + w_idx[None, :], mask=r_ok[:, None] & (w_idx[None, :] < WORDS), other=0)
        kept = tl.reshape((w[:, :, None] >> bit[None, None, :]) & 1, [BLOCK_N, WB * 32])  # column blk * 256 + j
        first = tl.load(start_ptr + rows * BLOCKS + blk, mask=r_ok, other=0)
        index = first[:, None] + tl.cumsum(kept, axis=1) - 1  # the kept value's place in the stream (codes: in the row)
        on = (kept != 0) & r_ok[:, None]
        cols = blk * WB * 32 + span
        if CODES:
            row_word = tl.load(row_word_ptr + rows, mask=r_ok, other=0)
            code_word = tl.load(values_ptr + row_word[:, None] + index // PER, mask=on, other=0)
            code = ((code_word >> ((index % PER) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
            group = cols[None, :] // GROUP
            scale = tl.load(scale_ptr + rows[:, None] * GROUPS + group, mask=on, other=0.0).to(tl.float32)
            if ZINT:
                zword = tl.load(zero_ptr + rows[:, None] * ZWPR + group // PER, mask=on, other=0)
                zero = ((zword >> ((group % PER) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
            else:
                zero = tl.load(zero_ptr + rows[:, None] * GROUPS + group, mask=on, other=0.0).to(tl.float32)
            v = tl.where(on, scale * (code - zero), 0.0)
        else:
            v = tl.load(values_ptr + index, mask=on, other=0.0).to(tl.float32)  # [BN, 256]
        xv = tl.load(x_ptr + ms[:, None] * K + cols[None, :], mask=m_ok[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)
        acc += tl.sum(v[None, :, :] * xv[:, None, :], axis=2)
        blk += 1
    tl.store(out_ptr + ms[:, None] * N + rows[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


def view_of(packed: bitmap.BitmapWeight | sparse_quant.SparseQuantWeight) -> BitmapView:
    """The weight's cached view (built on the first call, e.g. before a CUDA-graph capture)."""
    from compress.kernels import views

    return views.cached(packed.bitmask, "bitmap", lambda: build_view(packed))


def supports(packed) -> bool:
    return isinstance(packed, bitmap.BitmapWeight) or (isinstance(packed, sparse_quant.SparseQuantWeight) and packed.bitmask is not None)


def matmul(x: torch.Tensor, packed: bitmap.BitmapWeight | sparse_quant.SparseQuantWeight) -> torch.Tensor:
    """x [..., in] @ W.T -> [..., out] in x's dtype (fp32 accumulation), for x on the weight's device."""
    rows, cols = packed.shape
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {cols}")
    x2 = x.reshape(-1, cols)
    batch = x2.shape[0]
    codes = isinstance(packed, sparse_quant.SparseQuantWeight)
    if batch > MAX_BATCH:  # prefill: dense on the decoded weight
        return F.linear(x, (sparse_quant.unpack if codes else bitmap.unpack)(packed).to(x.dtype))
    view = view_of(packed)
    x2 = x2.contiguous()
    out = torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    if batch and rows:
        words = view.bitmask.shape[1]
        grid = (triton.cdiv(rows, BLOCK_N), triton.cdiv(batch, BLOCK_M))
        stats = (packed.scale, packed.zero, packed.groups, packed.zero.shape[1]) if codes else (view.values, view.values, 1, 1)
        _bitmap_kernel[grid](x2, out, view.bitmask, view.values, view.block_start, view.row_word if codes else view.block_start, *stats[:2],
                             batch, rows, cols, words, view.block_start.shape[1], *stats[2:], BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M,
                             WB=WORD_BLOCK, CODES=codes, BITS=packed.bits if codes else 1, PER=codes_per_word(packed.bits) if codes else 1,
                             GROUP=packed.group_size if codes else 1, ZINT=not codes or packed.zero_kind == "integer")
    return out.reshape(*x.shape[:-1], rows)
