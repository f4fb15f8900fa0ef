"""Triton kernels: y = x @ W.T straight from the packed tensors of group_quant (int2/3/4/8), nm (any N:M
up to 16) and sparse_quant with an N:M pattern, on a GPU (or on CPU tensors under TRITON_INTERPRET=1).

Import this module only when Triton is wanted: it imports Triton at the top (compress/kernels/dispatch.py
does so lazily, so `import compress` and every CPU path stay free of it).

Two kernels, the format a compile-time constant in each (Config.kernel picks; triton_config.py has the rules):
  - the FMA kernel (triton_gemv.py, batch of 1 to a few rows): a CUDA-core GEMV, accumulators per thread
    reduced once at the end;
  - the dot kernel (here, any batch): a program owns BLOCK_N output rows x BLOCK_M activation rows x a K
    range; a K step is NG sub-steps, each decoding a [BLOCK_N, BLOCK_K] weight tile in registers for a tl.dot
    with the tile as the left operand (tensor cores; fp32 activations take a full-precision dot). Fast
    tiles (FAST=1: group_quant int2/4/8, N:M with M = 2 or 4) lie in one quantization group: words loaded
    whole, fields cut out by a magic-number decode (no int->float conversion) and assembled in registers
    with tl.join, the tile holds code - zero exactly (N:M: the kept values, expanded by compare-select
    against the indices) and the group's scale multiplies the dot's result. int3 (FAST=2, 10 codes a word)
    takes sub-steps of whole words spanning at most two groups, statistics selected per element; other
    formats (3:5, 4:8, 2:4 + int3, odd group sizes) decode generically, statistics gathered per element.
Split-K (split_k > 1, few output rows) adds fp32 partial sums atomically into a zeroed buffer; otherwise a
program stores its tile in x's dtype: one launch. Fields are read exactly as compress/formats/words.py lays
them out. Triton 3.6 interpreter quirks: a run-time range bound needs a while loop under NumPy 2, and its
bf16 tl.dot is wrong, so when interpreting the dot is an fp32 dot of the bf16-rounded operands.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from compress.kernels import triton_gemv as tg
from compress.kernels import triton_nm_splitk as tns
from compress.kernels import triton_splitk as ts
from compress.kernels.triton_config import (
    FMT_GROUP_QUANT,
    FMT_NM,
    Config,
    default_config,
    format_args,
    launch_plan,
    supports,  # noqa: F401 (dispatch.py asks this module)
)
from compress.kernels.triton_gemv import _stat

DOT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the dot's operand dtype: x's
GQ, NM = tl.constexpr(FMT_GROUP_QUANT), tl.constexpr(FMT_NM)  # the formats, as the kernels see them


@triton.jit
def _f(w, z, p: tl.constexpr, BITS: tl.constexpr, FMASK, MAGIC, ZINT: tl.constexpr):
    """Field p of words w minus z (fp32, exact): masked in place, OR-ed with the exponent of 2^(23 - a); 0 past the
    word's last field (int3: lanes 10 to 15)."""
    if p >= 32 // BITS:
        out = tl.zeros(w.shape, dtype=tl.float32)
    else:
        a: tl.constexpr = p * BITS - 16 if p * BITS + BITS > 23 else p * BITS
        src = w >> 16 if p * BITS + BITS > 23 else w
        cf = ((src & (FMASK << a)) | ((MAGIC - a) << 23)).to(tl.float32, bitcast=True)
        out = cf - ((1 << (23 - a)) + z) if ZINT else (cf - (1 << (23 - a))) - z
    return out


@triton.jit
def _t4(w, z, o: tl.constexpr, st: tl.constexpr, BITS: tl.constexpr, FMASK, MAGIC, ZINT: tl.constexpr):
    """Fields o + i * st, i < 4, joined into a new minor [2, 2] (reshaped: field index i, in registers)."""
    return tl.join(tl.join(_f(w, z, o, BITS, FMASK, MAGIC, ZINT), _f(w, z, o + 2 * st, BITS, FMASK, MAGIC, ZINT)),
                   tl.join(_f(w, z, o + st, BITS, FMASK, MAGIC, ZINT), _f(w, z, o + 3 * st, BITS, FMASK, MAGIC, ZINT)))


@triton.jit
def _fields(w, z, BITS: tl.constexpr, PER: tl.constexpr, FMASK, MAGIC, ZINT: tl.constexpr):
    """[BN, W] words -> [BN, W * PER] codes minus z, column-ordered (PER = 4, 8 or 16)."""
    if PER == 4:
        t = _t4(w, z, 0, 1, BITS, FMASK, MAGIC, ZINT)
    elif PER == 8:
        t = tl.join(_t4(w, z, 0, 2, BITS, FMASK, MAGIC, ZINT), _t4(w, z, 1, 2, BITS, FMASK, MAGIC, ZINT))
    else:
        t = tl.join(tl.join(_t4(w, z, 0, 4, BITS, FMASK, MAGIC, ZINT), _t4(w, z, 2, 4, BITS, FMASK, MAGIC, ZINT)),
                    tl.join(_t4(w, z, 1, 4, BITS, FMASK, MAGIC, ZINT), _t4(w, z, 3, 4, BITS, FMASK, MAGIC, ZINT)))
    return tl.reshape(t, [w.shape[0], w.shape[1] * PER])


@triton.jit
def _words(ptr, rows, n_mask, w0, WPR, W: tl.constexpr):
    ww = w0 + tl.arange(0, W)[None, :]
    return tl.load(ptr + rows * WPR + ww, mask=n_mask[:, None] & (ww < WPR), other=0)


@triton.jit
def _nm_fast(a_ptr, b_ptr, rows, n_mask, k0, z, KC, WPR, IWPR, FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
             IBITS: tl.constexpr, IPER: tl.constexpr, NN: tl.constexpr, MM: tl.constexpr, FMASK, MAGIC, ZINT: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dense [BN, BLOCK_K] tile of an N:M weight (M = 2 or 4, N = 1 or 2), everything in the layout of the kept
    values [BN, G, N] (loaded contiguously; sparse_quant: code - z): each group's index word (and code word) read
    per group, its N indices cut out, and column m of the group = the kept value whose index is m."""
    G: tl.constexpr = BLOCK_K // MM
    gg = tl.arange(0, G)[None, :]
    jg = k0 // MM * NN + gg * NN                                                 # the group's first kept value
    ok = n_mask[:, None] & (jg < KC)
    iw = tl.load(b_ptr + rows * IWPR + jg // IPER, mask=ok, other=0) >> ((jg % IPER) * IBITS)
    if FMT == NM:
        jj = k0 // MM * NN + tl.arange(0, G * NN)[None, :]
        v = tl.load(a_ptr + rows * KC + jj, mask=n_mask[:, None] & (jj < KC), other=0.0).to(tl.float32)
    else:
        v = _fields(_words(a_ptr, rows, n_mask, k0 // MM * NN // PER, WPR, G * NN // PER), z, BITS, PER, FMASK, MAGIC, ZINT)
    v = tl.reshape(v, [BLOCK_N, G, NN])
    v0, v1 = tl.split(v) if NN == 2 else (tl.reshape(v, [BLOCK_N, G]), tl.reshape(v, [BLOCK_N, G]))
    i0 = iw & ((1 << IBITS) - 1)
    i1 = (iw >> IBITS) & ((1 << IBITS) - 1)
    d0 = tl.where(i0 == 0, v0, tl.where(i1 == 0, v1, 0.0) if NN == 2 else 0.0)
    d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, 0.0) if NN == 2 else 0.0)
    if MM == 2:
        return tl.reshape(tl.join(d0, d1), [BLOCK_N, BLOCK_K])
    d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, 0.0) if NN == 2 else 0.0)
    d3 = tl.where(i0 == 3, v0, tl.where(i1 == 3, v1, 0.0) if NN == 2 else 0.0)
    return tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), [BLOCK_N, BLOCK_K])


@triton.jit
def _generic(a_ptr, b_ptr, scale_ptr, zero_ptr, rows, n_mask, k0, K, KC, WPR, IWPR, GROUPS, ZWPR, FMT: tl.constexpr,
             BITS: tl.constexpr, PER: tl.constexpr, P2: tl.constexpr, IBITS: tl.constexpr, IPER: tl.constexpr, NN: tl.constexpr,
             MM: tl.constexpr, GROUP: tl.constexpr, ZERO_INT: tl.constexpr, S32: tl.constexpr, BLOCK_K: tl.constexpr):
    """Fully dequantized fp32 [BN, BLOCK_K] tile of any format, fields and statistics gathered per element.
    group_quant: BLOCK_K // P2 words from word k0 // P2 (lanes p >= PER dead: int3); N:M: columns k0 ..."""
    kk = tl.arange(0, BLOCK_K)[None, :]
    if FMT == GQ:
        col = (k0 // P2 + kk // P2) * PER + kk % P2
        ok = n_mask[:, None] & (kk % P2 < PER) & (col < K)
        code = (tl.load(a_ptr + rows * WPR + col // PER, mask=ok, other=0) >> ((col % PER) * BITS)) & ((1 << BITS) - 1)
        s, z = _stat(scale_ptr, zero_ptr, rows, col // GROUP, ok, GROUPS, ZWPR, BITS, PER, ZERO_INT, S32)
        return tl.where(ok, s * (code.to(tl.float32) - z), 0.0)
    col = k0 + kk  # N:M: column col holds kept value t of its group when that value's index is col % MM
    ok = n_mask[:, None] & (col < K)
    j = (col // MM) * NN
    w = tl.zeros(col.shape, dtype=tl.float32)
    for t in tl.static_range(NN):
        iw = tl.load(b_ptr + rows * IWPR + (j + t) // IPER, mask=ok, other=0)
        hit = ok & (((iw >> (((j + t) % IPER) * IBITS)) & ((1 << IBITS) - 1)) == col % MM)
        if FMT == NM:
            val = tl.load(a_ptr + rows * KC + j + t, mask=hit, other=0.0).to(tl.float32)
        else:
            code = (tl.load(a_ptr + rows * WPR + (j + t) // PER, mask=hit, other=0) >> (((j + t) % PER) * BITS)) & ((1 << BITS) - 1)
            s, z = _stat(scale_ptr, zero_ptr, rows, col // GROUP, hit, GROUPS, ZWPR, BITS, PER, ZERO_INT, S32)
            val = s * (code.to(tl.float32) - z)
        w += tl.where(hit, val, 0.0)
    return w


@triton.jit
def _dot(w, xt, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """w [BN, BK] fp32 @ xt [BK, BM] (x's dtype) in fp32."""
    if DOT == 0:
        return tl.dot(w, xt.to(tl.float32), input_precision="ieee")
    if INTERPRET:  # the interpreter's bf16 / fp16 dot is wrong: the same rounding, then an fp32 dot
        wt = w.to(tl.bfloat16 if DOT == 1 else tl.float16).to(tl.float32)
        return tl.dot(wt, xt.to(tl.float32), input_precision="ieee")
    return tl.dot(w.to(xt.dtype), xt)


@triton.jit
def _dot_kernel(x_ptr, out_ptr, a_ptr, b_ptr, scale_ptr, zero_ptr, M, N, K, KC, WPR, IWPR, GROUPS, ZWPR, k_iters, FMASK, MAGIC,
                FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, P2: tl.constexpr, IBITS: tl.constexpr, IPER: tl.constexpr,
                NN: tl.constexpr, MM: tl.constexpr, GROUP: tl.constexpr, ZERO_INT: tl.constexpr, FAST: tl.constexpr, DOT: tl.constexpr,
                ATOMIC: tl.constexpr, I64: tl.constexpr, S32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, NG: tl.constexpr, STAGES: tl.constexpr, INTERPRET: tl.constexpr):
    t0 = tl.program_id(1) * k_iters
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = (offs_n.to(tl.int64) if I64 else offs_n)[:, None]
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    xrows = (offs_m.to(tl.int64) if I64 else offs_m)[None, :] * K
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    it = 0
    while it < (k_iters if INTERPRET else 1):  # interpreted: the loop (NumPy 2 takes no run-time range bound)
        for i in tl.range(0, 1 if INTERPRET else k_iters, num_stages=STAGES):  # compiled: the pipelined loop
            for gi in tl.static_range(NG):  # a step: NG sub-steps of BLOCK_K dense columns (fast: each in one group)
                k0 = ((t0 + it + i) * NG + gi) * BLOCK_K                           # (generic group_quant: P2 a word)
                if FMT == GQ and FAST != 1:
                    kk = tl.arange(0, BLOCK_K)[:, None]
                    col = (k0 // P2 + kk // P2) * PER + kk % P2
                    xmask = (kk % P2 < PER) & (col < K)
                else:
                    col = k0 + tl.arange(0, BLOCK_K)[:, None]
                    xmask = col < K
                xt = tl.load(x_ptr + xrows + col, mask=xmask & (offs_m[None, :] < M), other=0.0)    # [BLOCK_K, BLOCK_M]
                smask = n_mask[:, None] & ((k0 // P2 * PER if FMT == GQ and FAST != 1 else k0) < K)  # none past K
                if FAST == 2:  # int3: BLOCK_K // P2 words span at most two groups; past the boundary, the second's statistics
                    g = (k0 // P2 * PER) // GROUP
                    s, z = _stat(scale_ptr, zero_ptr, rows, g, smask, GROUPS, ZWPR, BITS, PER, ZERO_INT, S32)
                    s2, z2 = _stat(scale_ptr, zero_ptr, rows, tl.minimum(g + 1, GROUPS - 1), smask, GROUPS, ZWPR, BITS, PER, ZERO_INT,
                                   S32)
                    hi = tl.reshape(col, [1, BLOCK_K]) >= (g + 1) * GROUP
                    c = _fields(_words(a_ptr, rows, n_mask, k0 // P2, WPR, BLOCK_K // P2), 0.0, BITS, P2, FMASK, MAGIC, True)
                    acc += _dot(tl.where(hi, s2, s) * (c - tl.where(hi, z2, z)), xt, DOT, INTERPRET)
                elif FAST:  # (code - zero) or the N:M values in the tile, the group's scale on the dot's result
                    s, z = tl.full([BLOCK_N, 1], 1.0, tl.float32), tl.zeros([BLOCK_N, 1], dtype=tl.float32)
                    if FMT != NM:
                        s, z = _stat(scale_ptr, zero_ptr, rows, k0 // GROUP, smask, GROUPS, ZWPR, BITS, PER, ZERO_INT, S32)
                    if FMT == GQ:
                        w = _fields(_words(a_ptr, rows, n_mask, k0 // PER, WPR, BLOCK_K // PER), z, BITS, PER, FMASK, MAGIC, ZERO_INT)
                    else:
                        w = _nm_fast(a_ptr, b_ptr, rows, n_mask, k0, z, KC, WPR, IWPR, FMT, BITS, PER, IBITS, IPER, NN, MM, FMASK,
                                     MAGIC, ZERO_INT, BLOCK_N, BLOCK_K)
                    acc += s * _dot(w, xt, DOT, INTERPRET)
                else:
                    acc += _dot(_generic(a_ptr, b_ptr, scale_ptr, zero_ptr, rows, n_mask, k0, K, KC, WPR, IWPR, GROUPS, ZWPR, FMT, BITS,
                                         PER, P2, IBITS, IPER, NN, MM, GROUP, ZERO_INT, S32, BLOCK_K), xt, DOT, INTERPRET)
        it += 1
    out = out_ptr + (offs_m.to(tl.int64) if I64 else offs_m)[None, :] * N + offs_n[:, None]
    out_mask = n_mask[:, None] & (offs_m[None, :] < M)
    if ATOMIC:
        tl.atomic_add(out, acc, mask=out_mask)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


_FITS: dict[tuple, int] = {}  # (Config, x dtype, format constants) -> the pipeline stages that fit the device's shared memory


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch(x2: torch.Tensor, out: torch.Tensor, args: dict, plan: dict, cfg: Config) -> None:
    batch, cols, rows = *x2.shape, out.shape[1]
    common = dict(ATOMIC=plan["split"] > 1, I64=plan["i64"], S32=plan["s32"], BLOCK_M=plan["block_m"], BLOCK_N=cfg.block_n,
                  STAGES=cfg.num_stages, INTERPRET=_interpret(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    fmt = dict(BITS=args["BITS"], PER=args["PER"], GROUP=args["GROUP"], ZERO_INT=args["ZERO_INT"])
    grid = (-(-rows // cfg.block_n), plan["split"], -(-batch // plan["block_m"]))
    runtime = (args["GROUPS"], args["ZWPR"], plan["k_iters"])
    if plan["kernel"] == "splitk" and args["FMT"] != FMT_GROUP_QUANT:
        tns.launch_nm24(x2, out, args, plan, cfg.block_n, cfg.num_warps, cfg.num_stages, plan["i64"], _interpret())
    elif plan["kernel"] == "splitk":
        ts.launch_splitk(x2, out, args, plan, cfg.block_n, cfg.num_warps, cfg.num_stages, plan["i64"], _interpret())
    elif plan["kernel"] == "fma" and args["FMT"] == FMT_GROUP_QUANT:
        tg._gq_gemv_kernel[grid](x2, out, args["a"], args["scale"], args["zero"], batch, rows, cols, args["WPR"], *runtime, plan["k_full"],
                                 plan["fmask"], 150, CH=plan["ch"], STATS=plan["stats"], Q=plan["lanes"], **fmt, **common)
    elif plan["kernel"] == "fma":
        tg._nm_gemv_kernel[grid](x2, out, args["a"], args["b"], args["scale"], args["zero"], batch, rows, cols, args["KC"], args["WPR"],
                                 args["IWPR"], *runtime, plan["fmask"], 150, FMT=args["FMT"], IBITS=args["IBITS"], IPER=args["IPER"],
                                 NN=args["NN"], MM=args["MM"], Q=plan["lanes"], **fmt, **common)
    else:
        _dot_kernel[grid](x2, out, args["a"], args["b"], args["scale"], args["zero"], batch, rows, cols, args["KC"], args["WPR"], args["IWPR"],
                          *runtime, plan["fmask"], 150, FMT=args["FMT"], P2=plan["p2"], IBITS=args["IBITS"], IPER=args["IPER"],
                          NN=args["NN"], MM=args["MM"], FAST=plan["fast"], DOT=DOT_KIND[x2.dtype], BLOCK_K=plan["block_k"], NG=plan["ng"],
                          **fmt, **common)


def packed_matmul(x: torch.Tensor, packed, config: Config | None = None) -> torch.Tensor:
    """x [..., in] (float32, bfloat16 or float16) @ W.T -> [..., out] in x's dtype, W never materialised. A tile that
    needs more shared memory than the device has (Triton's OutOfResources, raised before the kernel runs) is
    retried with one pipeline stage fewer, down to 1; the stages that fit are remembered per tile and format."""
    rows, cols = packed.shape
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {cols}")
    if x.dtype not in DOT_KIND:
        raise TypeError(f"activations must be float32, bfloat16 or float16, got {x.dtype}")
    args = format_args(packed, cols)
    x2 = x.reshape(-1, cols).contiguous()
    batch = x2.shape[0]
    if batch == 0 or rows == 0:
        return torch.zeros(*x.shape[:-1], rows, dtype=x.dtype, device=x.device)
    asked = config or default_config(batch, packed, x.device)
    key = (asked, x.dtype, *(args[k] for k in ("FMT", "BITS", "GROUP", "NN", "MM", "ZERO_INT")), x.device.type)
    cfg = dataclasses.replace(asked, num_stages=_FITS.get(key, asked.num_stages))
    plan = launch_plan(args, cfg, batch, rows, cols, x2.element_size())
    out = torch.zeros(batch, rows, dtype=torch.float32, device=x.device) if plan["split"] > 1 else \
        torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    while True:
        try:
            _launch(x2, out, args, plan, cfg)
            break
        except OutOfResources:
            if cfg.num_stages <= 1:
                raise
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
            _FITS[key] = cfg.num_stages
    if plan["split"] > 1:
        out = out.to(x.dtype)
    return out.reshape(*x.shape[:-1], rows)
