"""The split-K GEMV for 2:4 N:M weights with 16-bit values (batch 1 by default): y = x @ W.T straight from the
kept values and their 2-bit indices, laid out as the group-quant split-K kernel (triton_splitk.py).

A lane owns one index word of every row a step: 16 kept values (8 words of bf16 / fp16 pairs, loaded flat
and coalesced) covering 32 dense columns, whose activations it loads as 8 vectors of 4. Each kept value
takes its activation among its group's 4 columns by two selects on its index bits (no gathers), is
widened to fp32 exactly (a bf16 is the high half of its fp32; an fp16 is converted) and multiplied into
a per-thread fp32 sum, reduced once at the end. The grid is (row tiles, K splits, activation rows); with
several K splits the rows are fp32 atomics into a zeroed buffer (the caller casts)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _nm24_step(acc, t, x_ptr, xrow, m_ok, v_ptr, i_ptr, rows, n_mask, K, KC2, IWPR, F16: tl.constexpr, L: tl.constexpr,
               MASKED: tl.constexpr):
    lane = t * L + tl.arange(0, L)[None, :]                                       # each lane's index word, [1, L]
    iw = tl.load(i_ptr + rows * IWPR + lane, mask=n_mask[:, None] & (lane < IWPR) if MASKED else n_mask[:, None], other=0)
    ww = t * (L * 8) + tl.arange(0, L * 8)[None, :]                               # the step's value words, flat
    words = tl.load(v_ptr + rows * KC2 + ww, mask=n_mask[:, None] & (ww < KC2) if MASKED else n_mask[:, None], other=0)
    even, odd = tl.split(tl.reshape(words, [rows.shape[0], L, 4, 2]))              # words 0, 2, 4, 6 and 1, 3, 5, 7
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
        p += _widen(w, F16) * _pick4(x0, x1, x2, x3, iw, 4 * g)                # value 2g: the word's low half
        p += _widen(w >> 16, F16) * _pick4(x0, x1, x2, x3, iw, 4 * g + 2)       # value 2g + 1: its high half
    return acc + p


@triton.jit
def _nm24_splitk_kernel(x_ptr, out_ptr, v_ptr, i_ptr, M, N, K, KC2, IWPR, k_iters, F16: tl.constexpr, ATOMIC: tl.constexpr,
                        I64: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, L: tl.constexpr, STAGES: tl.constexpr,
                        INTERPRET: tl.constexpr):
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
            acc = _nm24_step(acc, t0 + it + i, x_ptr, m * K, m < M, v_ptr, i_ptr, rows, n_mask, K, KC2, IWPR, F16, L, MASKED)
        it += 1
    y = tl.sum(acc, axis=1)
    if ATOMIC:
        tl.atomic_add(out_ptr + m * N + offs_n, y, mask=n_mask, sem="relaxed")
    else:
        tl.store(out_ptr + m * N + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def launch_nm24(x2, out, args: dict, plan: dict, block_n: int, num_warps: int, num_stages: int, i64: bool, interpret: bool) -> None:
    """y (out: x's dtype, or a zeroed fp32 buffer when split > 1) = x2 @ W.T for a 2:4 NMWeight."""
    batch, cols, rows = *x2.shape, out.shape[1]
    values = args["a"].view(torch.int32)  # [out, KC / 2]: bf16 / fp16 pairs as int32 words (KC is even for 2:4)
    grid = (-(-rows // block_n), plan["split"], batch)
    _nm24_splitk_kernel[grid](x2, out, values, args["b"], batch, rows, cols, values.shape[1], args["IWPR"], plan["k_iters"],
                              F16=args["a"].dtype == torch.float16,
                              ATOMIC=plan["split"] > 1, I64=i64, MASKED=plan["masked"], BLOCK_N=block_n, L=plan["lanes"],
                              STAGES=num_stages, INTERPRET=interpret, num_warps=num_warps, num_stages=num_stages)
