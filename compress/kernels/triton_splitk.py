"""The split-K GEMV (batch 1 by default) for group_quant int2 / int4 / int8 (PER = 16, 8 or 4 codes a word):
y = x @ W.T, bandwidth-first (Config.kernel "splitk"; triton_config.splitk_plan derives the launch). Its table
mode (LUT) runs SqueezeLLM weights (views.LUTCodes: 4- or 8-bit codes, each looked up in its row's fp32 table).

A program owns BLOCK_N output rows and a K range of k_iters steps; the grid is (row tiles, K splits, batch tiles).
A step loads each row's next L * V words flat (16-byte coalesced loads, V = 4 words a lane, the lane's V * PER
columns inside one quantization group), so a 2-warp program reads 2 KB of every row a step with plain loads (no
cp.async pipeline: occupancy, not stages, hides the latency). Each word's fields become fp32 code - zero by the
magic-number decode (a field masked in place, OR-ed with the exponent of 2^(23 - a) is 2^(23 - a) + code: one
AND/OR and one add, exact; fields above bit 23 from word >> 16), multiplied by the lane's activations (loaded
per word as [1, L, CH] vectors, the words' register layout: no layout conversion) into per-thread fp32
accumulators, reduced over the step's fields once and scaled by the lane's group scale (fp16 zero points:
s * (sum c x - z sum x)). One K split: y stored in x's dtype; several: fp32 atomic_add into a zeroed buffer.
Measured (benchmarks/gpu_gemv_probe.py, H200, int4 g128, batch 1): 7.3-18.6 us, 1.7-1.9x dense bf16."""

from __future__ import annotations

import triton
import triton.language as tl

from compress.kernels.triton_config import splitk_ok, splitk_plan  # noqa: F401 (the launch rules live there)
from compress.kernels.triton_gemv import _codes, _split4


@triton.jit
def _row(acc, w_0, w_1, w_2, w_3, wcol, x_ptr, xrow, m_ok, K, s, z, zc, FMASK, MAGIC, table_ptr, r3, BITS: tl.constexpr,
         PER: tl.constexpr, CH: tl.constexpr, V: tl.constexpr, ZINT: tl.constexpr, MASKED: tl.constexpr, LUT: tl.constexpr):
    """acc [BN, L] += s * (one batch row's products with the lanes' V words of every row): per-thread FMAs into
    p [BN, L, CH], reduced once a step (and sum x for fp16 zero points). LUT: each field indexes its row's fp32
    table (2^BITS entries at table_ptr + row * 2^BITS; s = 1)."""
    p = tl.zeros([w_0.shape[0], w_0.shape[1], CH], dtype=tl.float32)
    xs = tl.zeros([1, w_0.shape[1], CH], dtype=tl.float32)
    for j in tl.static_range(V):
        w = w_0 if j == 0 else (w_1 if j == 1 else (w_2 if j == 2 else w_3))
        for h in tl.static_range(PER // CH):
            pp = h * CH + tl.arange(0, CH)[None, None, :]
            col = (wcol[:, :, None] + j) * PER + pp
            x = tl.load(x_ptr + xrow + col, mask=(col < K) & m_ok if MASKED else m_ok, other=0.0).to(tl.float32)   # [1, L, CH]
            if LUT:
                code = (w[:, :, None] >> (pp * BITS)) & FMASK  # [BN, L, CH]
                p += tl.load(table_ptr + r3 * (1 << BITS) + code) * x  # the row's table: a few L1 lines
            else:
                p += _codes(w, pp, BITS, FMASK, MAGIC, zc[:, :, None]) * x  # code - z, exact for an integer z
            if not ZINT:
                xs += x
    if ZINT:
        return acc + s * tl.sum(p, axis=2)
    return acc + s * (tl.sum(p, axis=2) - z * tl.sum(xs, axis=2))


@triton.jit
def _out(out_ptr, acc, offs_n, n_mask, m, M, N, ATOMIC: tl.constexpr):
    y = tl.sum(acc, axis=1)
    ptrs = out_ptr + m * N + offs_n
    if ATOMIC:
        tl.atomic_add(ptrs, y, mask=n_mask & (m < M), sem="relaxed")
    else:
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=n_mask & (m < M))


@triton.jit
def _words(words, V: tl.constexpr):
    """[BN, L, V] -> V [BN, L] word tensors (V = 1, 2 or 4; V = 8 / 16: the pairs / quads of words, split again in _row)."""
    if V == 4:
        w_0, w_1, w_2, w_3 = _split4(words)
    elif V == 2:
        w_0, w_1 = tl.split(words)
        w_2, w_3 = w_0, w_1
    else:
        w_0 = tl.reshape(words, [words.shape[0], words.shape[1]])
        w_1, w_2, w_3 = w_0, w_0, w_0
    return w_0, w_1, w_2, w_3


@triton.jit
def _step(acc0, acc1, acc2, acc3, t, x_ptr, codes_ptr, scale_ptr, zero_ptr, rows, n_mask, m0, M, K, WPR, GROUPS, ZWPR, FMASK, MAGIC,
          BITS: tl.constexpr, PER: tl.constexpr, CH: tl.constexpr, GROUP: tl.constexpr, ZERO_INT: tl.constexpr, BLOCK_M: tl.constexpr,
          L: tl.constexpr, V: tl.constexpr, MASKED: tl.constexpr, LUT: tl.constexpr):
    """K step t: V words a lane (L lanes) of every row, for BLOCK_M (1, 2 or 4) batch rows."""
    wcol = t * (L * V) + tl.arange(0, L)[None, :] * V                            # each lane's first word, [1, L]
    ww = t * (L * V) + tl.arange(0, L * V)[None, :]                             # the step's words, loaded flat (coalesced)
    wmask = n_mask[:, None] & (ww < WPR) if MASKED else n_mask[:, None]
    words = tl.reshape(tl.load(codes_ptr + rows * WPR + ww, mask=wmask, other=0), [rows.shape[0], L, V])
    g = ((wcol * PER) // GROUP)[:, :, None]                                      # [1, L, 1]: each lane's group
    smask = n_mask[:, None, None] & (g < GROUPS)
    r3 = rows[:, :, None]
    if LUT:  # tables: no statistics (s = 1, z = 0)
        s = tl.full([rows.shape[0], L, 1], 1.0, tl.float32)
        z = tl.zeros([rows.shape[0], L, 1], dtype=tl.float32)
    else:
        s = tl.load(scale_ptr + r3 * GROUPS + g, mask=smask, other=0.0).to(tl.float32)
        if ZERO_INT:
            zw = tl.load(zero_ptr + r3 * ZWPR + g // PER, mask=smask, other=0)
            z = (((zw >> ((g % PER) * BITS)) & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        else:
            z = tl.load(zero_ptr + r3 * GROUPS + g, mask=smask, other=0.0).to(tl.float32)
    s = tl.reshape(s, [rows.shape[0], L])
    z = tl.reshape(z, [rows.shape[0], L])
    zc = z if ZERO_INT else tl.zeros_like(z)
    w_0, w_1, w_2, w_3 = _words(words, V)
    rt = tl.where(n_mask[:, None, None], r3, 0)  # the table row (masked rows read row 0's table: their codes are 0)
    acc0 = _row(acc0, w_0, w_1, w_2, w_3, wcol, x_ptr, m0 * K, m0 < M, K, s, z, zc, FMASK, MAGIC, scale_ptr, rt, BITS, PER, CH, V, ZERO_INT,
                MASKED, LUT)
    if BLOCK_M > 1:
        acc1 = _row(acc1, w_0, w_1, w_2, w_3, wcol, x_ptr, (m0 + 1) * K, m0 + 1 < M, K, s, z, zc, FMASK, MAGIC, scale_ptr, rt, BITS,
                    PER, CH, V, ZERO_INT, MASKED, LUT)
    if BLOCK_M > 2:
        acc2 = _row(acc2, w_0, w_1, w_2, w_3, wcol, x_ptr, (m0 + 2) * K, m0 + 2 < M, K, s, z, zc, FMASK, MAGIC, scale_ptr, rt, BITS,
                    PER, CH, V, ZERO_INT, MASKED, LUT)
        acc3 = _row(acc3, w_0, w_1, w_2, w_3, wcol, x_ptr, (m0 + 3) * K, m0 + 3 < M, K, s, z, zc, FMASK, MAGIC, scale_ptr, rt, BITS,
                    PER, CH, V, ZERO_INT, MASKED, LUT)
    return acc0, acc1, acc2, acc3


@triton.jit
def _gq_splitk_kernel(x_ptr, out_ptr, codes_ptr, scale_ptr, zero_ptr, M, N, K, WPR, GROUPS, ZWPR, k_iters, FMASK, MAGIC,
                      BITS: tl.constexpr, PER: tl.constexpr, CH: tl.constexpr, GROUP: tl.constexpr, ZERO_INT: tl.constexpr,
                      ATOMIC: tl.constexpr, I64: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      L: tl.constexpr, V: tl.constexpr, STAGES: tl.constexpr, INTERPRET: tl.constexpr, LUT: tl.constexpr):
    """Program (n, k, m): rows [n * BLOCK_N, ...), K steps [k * k_iters, ...), batch rows [m * BLOCK_M, ...)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = (offs_n.to(tl.int64) if I64 else offs_n)[:, None]
    m0 = tl.program_id(2) * BLOCK_M
    m0 = m0.to(tl.int64) if I64 else m0
    t0 = tl.program_id(1) * k_iters
    acc0 = tl.zeros([BLOCK_N, L], dtype=tl.float32)
    acc1, acc2, acc3 = acc0, acc0, acc0
    it = 0
    while it < (k_iters if INTERPRET else 1):  # interpreted: the loop (NumPy 2 takes no run-time range bound)
        for i in tl.range(0, 1 if INTERPRET else k_iters, num_stages=STAGES):  # compiled: the pipelined loop
            acc0, acc1, acc2, acc3 = _step(acc0, acc1, acc2, acc3, t0 + it + i, x_ptr, codes_ptr, scale_ptr, zero_ptr, rows, n_mask, m0,
                                           M, K, WPR, GROUPS, ZWPR, FMASK, MAGIC, BITS, PER, CH, GROUP, ZERO_INT, BLOCK_M, L, V, MASKED, LUT)
        it += 1
    _out(out_ptr, acc0, offs_n, n_mask, m0, M, N, ATOMIC)
    if BLOCK_M > 1:
        _out(out_ptr, acc1, offs_n, n_mask, m0 + 1, M, N, ATOMIC)
    if BLOCK_M > 2:
        _out(out_ptr, acc2, offs_n, n_mask, m0 + 2, M, N, ATOMIC)
        _out(out_ptr, acc3, offs_n, n_mask, m0 + 3, M, N, ATOMIC)


def launch_splitk(x2, out, args: dict, plan: dict, block_n: int, num_warps: int, num_stages: int, i64: bool, interpret: bool) -> None:
    """y (out: x's dtype, or a zeroed fp32 buffer when split > 1) = x2 @ W.T."""
    batch, cols, rows = *x2.shape, out.shape[1]
    grid = (-(-rows // block_n), plan["split"], -(-batch // plan["block_m"]))
    _gq_splitk_kernel[grid](x2, out, args["a"], args["scale"], args["zero"], batch, rows, cols, args["WPR"], args["GROUPS"], args["ZWPR"],
                            plan["k_iters"], (1 << args["BITS"]) - 1, 150, BITS=args["BITS"], PER=args["PER"], CH=plan["ch"],
                            GROUP=args["GROUP"], ZERO_INT=args["ZERO_INT"], ATOMIC=plan["split"] > 1, I64=i64, MASKED=plan["masked"],
                            BLOCK_M=plan["block_m"], BLOCK_N=block_n, L=plan["lanes"], V=plan["v"], STAGES=num_stages,
                            INTERPRET=interpret, LUT=args.get("LUT", False), num_warps=num_warps, num_stages=num_stages)

