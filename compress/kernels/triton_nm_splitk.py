"""The split-K GEMV for 2:4 weights (batch 1 by default): N:M with 16-bit values, and sparse + quant 2:4 with 4-bit
codes; y = x @ W.T straight from the kept values (or codes) and their 2-bit indices, laid out as the group-quant
split-K kernel (triton_splitk.py).

A lane owns one index word of every row a step: 16 kept values (8 words of bf16 / fp16 pairs, loaded flat
and coalesced) covering 32 dense columns, whose activations it loads as 8 vectors of 4. Each kept value
takes its activation among its group's 4 columns by two selects on its index bits (no gathers), is
widened to fp32 exactly (a bf16 is the high half of its fp32; an fp16 is converted) and multiplied into
a per-thread fp32 sum, reduced once at the end. With 16-bit values the index word is loaded once beside each of
the lane's 8 value words (the same address 8 times, from L1): loaded once, its coalesced layout differs from the
words', and the compiler then moved each select's predicates through shared memory (32 conversions a step; for
sm_90 1312 SASS instructions with 142 shared stores, 142 loads and 77 barriers, against 992 with 14, 15 and 15).
With 4-bit codes the index word and the group's scale and zero point are loaded beside each of the 2 code words
alike (1864 instructions, 200 shared stores and 135 barriers before; 1320, 46 and 43 after).
The grid is (row tiles, K splits, activation rows); with
several K splits the rows are fp32 atomics into a zeroed buffer (the caller casts)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.kernels.triton_config import FMT_SPARSE_QUANT
from compress.kernels.triton_gemv import _split4


@triton.jit
def _widen(half, F16: tl.constexpr):
    """The low 16 bits of int32 lanes (a bf16 or fp16 value) as fp32, exactly."""
    if F16:
        return (half & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return (half << 16).to(tl.float32, bitcast=True)


@triton.jit
def _pick4(x0, x1, x2, x3, iw, SHIFT: tl.constexpr):
    """The activation at the 2-bit index in bits SHIFT, SHIFT + 1 of iw: three selects."""
    idx = (iw >> SHIFT) & 3
    odd = (idx & 1) != 0
    return tl.where(idx >= 2, tl.where(odd, x3, x2), tl.where(odd, x1, x0))


@triton.jit
def _code(word, f: tl.constexpr):
    """4-bit field f of int32 words as fp32, exactly (OR-ed into the bits of 2^23, minus 2^23)."""
    return (((word >> (4 * f)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _nm24_step(acc, t, x_ptr, xrow, m_ok, v_ptr, i_ptr, scale_ptr, zero_ptr, rows, n_mask, K, VW, IWPR, GROUPS, ZWPR,
               SQ: tl.constexpr, F16: tl.constexpr, GROUP: tl.constexpr, ZERO_INT: tl.constexpr, L: tl.constexpr, MASKED: tl.constexpr):
    """One K step: every lane's 16 kept values of every row. SQ: 4-bit codes (2 words a lane, one group's scale and
    zero point: the group holds whole 32-column lanes), else 16-bit values (8 words a lane)."""
    lane = t * L + tl.arange(0, L)[None, :]                                       # each lane's index word, [1, L]
    W: tl.constexpr = 2 if SQ else 8                                              # value words a lane
    ww = t * (L * W) + tl.arange(0, L * W)[None, :]                               # the step's value words, flat
    wmask = n_mask[:, None] & (ww < VW) if MASKED else n_mask[:, None]
    words = tl.load(v_ptr + rows * VW + ww, mask=wmask, other=0)
    beside = tl.load(i_ptr + rows * IWPR + ww // W, mask=wmask, other=0)  # the index word beside each value word: the words' layout
    if SQ:
        iw, _ = tl.split(tl.reshape(beside, [rows.shape[0], L, 2]))
    else:
        iw, _, _, _ = _split4(tl.split(tl.reshape(beside, [rows.shape[0], L, 4, 2]))[0])
    if SQ:
        c_lo, c_hi = tl.split(tl.reshape(words, [rows.shape[0], L, 2]))          # codes of values 0-7 and 8-15
        g = (ww // W) * 32 // GROUP                                               # the lane's quantization group, beside each word
        s_ok = n_mask[:, None] & (g < GROUPS)
        s = tl.load(scale_ptr + rows * GROUPS + g, mask=s_ok, other=0.0).to(tl.float32)
        if ZERO_INT:
            zw = tl.load(zero_ptr + rows * ZWPR + g // 8, mask=s_ok, other=0)
            z = (((zw >> ((g % 8) * 4)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        else:
            z = tl.load(zero_ptr + rows * GROUPS + g, mask=s_ok, other=0.0).to(tl.float32)
        s, _ = tl.split(tl.reshape(s, [rows.shape[0], L, 2]))
        z, _ = tl.split(tl.reshape(z, [rows.shape[0], L, 2]))
        w_0, w_1, w_2, w_3, w_4, w_5, w_6, w_7 = c_lo, c_lo, c_lo, c_lo, c_hi, c_hi, c_hi, c_hi
    else:
        even, odd = tl.split(tl.reshape(words, [rows.shape[0], L, 4, 2]))          # words 0, 2, 4, 6 and 1, 3, 5, 7
        w_0, w_2, w_4, w_6 = _split4(even)
        w_1, w_3, w_5, w_7 = _split4(odd)
    p = tl.zeros_like(acc)
    for g in tl.static_range(8):                                                  # group g: columns 4g .. 4g + 3 of the lane
        w = w_0 if g == 0 else (w_1 if g == 1 else (w_2 if g == 2 else (w_3 if g == 3 else (w_4 if g == 4 else (
            w_5 if g == 5 else (w_6 if g == 6 else w_7))))))
        col = lane[:, :, None] * 32 + 4 * g + tl.arange(0, 4)[None, None, :]
        xg = tl.load(x_ptr + xrow + col, mask=(col < K) & m_ok if MASKED else m_ok, other=0.0).to(tl.float32)
        x0, x1, x2, x3 = _split4(xg)
        x0, x1, x2, x3 = tl.reshape(x0, [1, L]), tl.reshape(x1, [1, L]), tl.reshape(x2, [1, L]), tl.reshape(x3, [1, L])
        if SQ:  # values 2g, 2g + 1: fields 2g, 2g + 1 of their code word (code - zero, exact)
            p += (_code(w, (2 * g) % 8) - z) * _pick4(x0, x1, x2, x3, iw, 4 * g)
            p += (_code(w, (2 * g + 1) % 8) - z) * _pick4(x0, x1, x2, x3, iw, 4 * g + 2)
        else:  # values 2g, 2g + 1: the low and high halves of word g
            p += _widen(w, F16) * _pick4(x0, x1, x2, x3, iw, 4 * g)
            p += _widen(w >> 16, F16) * _pick4(x0, x1, x2, x3, iw, 4 * g + 2)
    if SQ:
        return acc + s * p
    return acc + p


@triton.jit
def _nm24_splitk_kernel(x_ptr, out_ptr, v_ptr, i_ptr, scale_ptr, zero_ptr, M, N, K, VW, IWPR, GROUPS, ZWPR, k_iters, SQ: tl.constexpr,
                        F16: tl.constexpr, GROUP: tl.constexpr, ZERO_INT: tl.constexpr, ATOMIC: tl.constexpr, I64: tl.constexpr,
                        MASKED: tl.constexpr, BLOCK_N: tl.constexpr, L: tl.constexpr, STAGES: tl.constexpr, INTERPRET: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = (offs_n.to(tl.int64) if I64 else offs_n)[:, None]
    m = tl.program_id(2)
    m = m.to(tl.int64) if I64 else m
    t0 = tl.program_id(1) * k_iters
    acc = tl.zeros([BLOCK_N, L], dtype=tl.float32)
    it = 0
    while it < (k_iters if INTERPRET else 1):  # interpreted: the loop (NumPy 2 takes no run-time range bound)
        for i in tl.range(0, 1 if INTERPRET else k_iters, num_stages=STAGES):
            acc = _nm24_step(acc, t0 + it + i, x_ptr, m * K, m < M, v_ptr, i_ptr, scale_ptr, zero_ptr, rows, n_mask, K, VW, IWPR, GROUPS,
                             ZWPR, SQ, F16, GROUP, ZERO_INT, L, MASKED)
        it += 1
    y = tl.sum(acc, axis=1)
    if ATOMIC:
        tl.atomic_add(out_ptr + m * N + offs_n, y, mask=n_mask, sem="relaxed")
    else:
        tl.store(out_ptr + m * N + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def launch_nm24(x2, out, args: dict, plan: dict, block_n: int, num_warps: int, num_stages: int, i64: bool, interpret: bool) -> None:
    """y (out: x's dtype, or a zeroed fp32 buffer when split > 1) = x2 @ W.T for a 2:4 NMWeight (16-bit values) or
    a 2:4 SparseQuantWeight (4-bit codes)."""
    batch, cols, rows = *x2.shape, out.shape[1]
    sq = args["FMT"] == FMT_SPARSE_QUANT
    values = args["a"] if sq else args["a"].view(torch.int32)  # 16-bit values: bf16 / fp16 pairs as int32 words (KC is even)
    grid = (-(-rows // block_n), plan["split"], batch)
    _nm24_splitk_kernel[grid](x2, out, values, args["b"], args["scale"], args["zero"], batch, rows, cols, values.shape[1], args["IWPR"],
                              args["GROUPS"], args["ZWPR"], plan["k_iters"], SQ=sq, F16=args["a"].dtype == torch.float16,
                              GROUP=args["GROUP"], ZERO_INT=args["ZERO_INT"], ATOMIC=plan["split"] > 1, I64=i64, MASKED=plan["masked"],
                              BLOCK_N=block_n, L=plan["lanes"], STAGES=num_stages, INTERPRET=interpret, num_warps=num_warps,
                              num_stages=num_stages)
