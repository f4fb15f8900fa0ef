"""Triton kernels: y = x @ W.T straight from the packed tensors of group_quant (int2/3/4/8), nm (any N:M
up to 16) and sparse_quant with an N:M pattern, on a GPU (or on CPU tensors under TRITON_INTERPRET=1).

Import this module only when Triton is wanted: it imports Triton at the top (compress/kernels/dispatch.py
does so lazily, so `import compress` and every CPU path stay free of it).

Design ("load as sparse, compute as dense"): one kernel for the three formats, its format a compile-time
constant. A program owns BLOCK_M activation rows x BLOCK_N output rows x one K-range (split-K: SPLIT_K
programs share an output tile and add their partial sums atomically into an fp32 buffer, so a batch-1
matvec of a 4096-row weight still fills all the multiprocessors). Inside the K loop the weight tile is
decoded in registers from its words (codes, scales, zero points, N:M indices) and multiplied in fp32:
  - batch <= 4 (the FMA path): acc[m, n] += sum_k x[m, k] * w[n, k] on CUDA cores; group_quant decodes
    a dense tile, nm / sparse_quant decode a tile of *kept* values and gather x at their columns, so
    the arithmetic is that of the kept weights only;
  - batch > 4 (the dot path): the tile is expanded to a dense [BLOCK_N, BLOCK_K] tile (pruned weights
    0) in the activation dtype and fed to tl.dot (tensor cores; fp32 activations in full precision).
Accumulation is fp32 throughout; y comes back in x's dtype. Fields are read exactly as
compress/formats/words.py lays them out: `per` fields of `bits` bits in each 32-bit word, every row
starting at a word boundary (int3: 10 codes a word).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from compress.kernels.triton_config import (
    FMA_MAX_BATCH,
    FMT_GROUP_QUANT,
    FMT_NM,
    Config,
    default_config,
    format_args,
    pow2,
    supports,  # noqa: F401 (dispatch.py asks this module)
)

DOT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the dot's operand dtype: x's


@triton.jit
def _field(words_ptr, row_start, index, BITS: tl.constexpr, PER: tl.constexpr, mask):
    """Field `index` of the row whose first word is `row_start` (int32 words, `PER` fields of `BITS`)."""
    word = tl.load(words_ptr + row_start + index // PER, mask=mask, other=0)
    return (word >> ((index % PER) * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _dequant(code, group, rows64, mask, scale_ptr, zero_ptr, GROUPS, ZWPR,
             BITS: tl.constexpr, PER: tl.constexpr, ZERO_INT: tl.constexpr):
    """scale * (code - zero) in fp32 for codes whose group (column // group_size) is `group`."""
    scale = tl.load(scale_ptr + rows64 * GROUPS + group, mask=mask, other=0.0).to(tl.float32)
    if ZERO_INT:
        zero = _field(zero_ptr, rows64 * ZWPR, group, BITS, PER, mask).to(tl.float32)
    else:
        zero = tl.load(zero_ptr + rows64 * GROUPS + group, mask=mask, other=0.0).to(tl.float32)
    return scale * (code.to(tl.float32) - zero)


@triton.jit
def _gq_tile3(codes_ptr, scale_ptr, zero_ptr, offs_n, n_mask, w0, K, WPR, GROUPS, ZWPR,
              BITS: tl.constexpr, PER: tl.constexpr, PER_P2: tl.constexpr, W: tl.constexpr, GROUP: tl.constexpr,
              ZERO_INT: tl.constexpr, SINGLE_GROUP: tl.constexpr):
    """group_quant weights of words w0 .. w0 + W of each row as an fp32 [BLOCK_N, W, PER_P2] tile: the words
    loaded whole (contiguous, vectorized), field p of word w (column w * PER + p) cut out by a shift, lanes
    p >= PER (int3: 10 codes a word) and columns past K are 0. Also the columns and their mask."""
    rows64 = offs_n.to(tl.int64)[:, None, None]
    ww = w0 + tl.arange(0, W)[None, :, None]
    pp = tl.arange(0, PER_P2)[None, None, :]
    col = ww * PER + pp
    cmask = (pp < PER) & (col < K)
    words = tl.load(codes_ptr + rows64 * WPR + ww, mask=n_mask[:, None, None] & (ww < WPR), other=0)
    code = (words >> (pp * BITS)) & ((1 << BITS) - 1)
    if SINGLE_GROUP:  # the tile lies in one group: one scale and zero point per row
        g1 = tl.zeros([1, 1, 1], dtype=tl.int32) + (w0 * PER) // GROUP
        w = _dequant(code, g1, rows64, n_mask[:, None, None] & (w0 < WPR), scale_ptr, zero_ptr, GROUPS, ZWPR, BITS, PER, ZERO_INT)
    else:
        w = _dequant(code, col // GROUP, rows64, n_mask[:, None, None] & cmask, scale_ptr, zero_ptr, GROUPS, ZWPR, BITS, PER, ZERO_INT)
    return tl.where(cmask, w, 0.0), col, cmask


@triton.jit
def _dense_tile(a_ptr, b_ptr, scale_ptr, zero_ptr, offs_n, n_mask, offs_k, k0, K, KC, WPR, IWPR, GROUPS, ZWPR,
                FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, IBITS: tl.constexpr, IPER: tl.constexpr,
                NN: tl.constexpr, MM: tl.constexpr, GROUP: tl.constexpr, ZERO_INT: tl.constexpr, SINGLE_GROUP: tl.constexpr):
    """The fp32 weight tile W[offs_n, offs_k] (pruned weights and padding 0)."""
    rows64 = offs_n.to(tl.int64)[:, None]
    kk = offs_k[None, :]
    mask = n_mask[:, None] & (kk < K)
    if FMT == 0:  # group_quant: code k of the row, dequantized with its group's statistics
        code = _field(a_ptr, rows64 * WPR, kk, BITS, PER, mask)
        if SINGLE_GROUP:  # the whole K tile lies in group k0 // GROUP: one scale and zero per row
            g1 = tl.zeros([1, 1], dtype=tl.int32) + k0 // GROUP
            w = _dequant(code, g1, rows64, n_mask[:, None] & (k0 < K), scale_ptr, zero_ptr, GROUPS, ZWPR, BITS, PER, ZERO_INT)
        else:
            w = _dequant(code, kk // GROUP, rows64, mask, scale_ptr, zero_ptr, GROUPS, ZWPR, BITS, PER, ZERO_INT)
    else:  # N:M positions: column k holds kept value t of its group when that value's index is k % MM
        group_first = (kk // MM) * NN
        position = kk % MM
        w = tl.zeros(mask.shape, dtype=tl.float32)
        for t in tl.static_range(NN):
            j = group_first + t
            index = _field(b_ptr, rows64 * IWPR, j, IBITS, IPER, mask)
            if FMT == 1:
                value = tl.load(a_ptr + rows64 * KC + j, mask=mask, other=0.0).to(tl.float32)
            else:
                code = _field(a_ptr, rows64 * WPR, j, BITS, PER, mask)
                if SINGLE_GROUP:
                    g1 = tl.zeros([1, 1], dtype=tl.int32) + k0 // GROUP
                    value = _dequant(code, g1, rows64, n_mask[:, None] & (k0 < K), scale_ptr, zero_ptr, GROUPS, ZWPR, BITS, PER, ZERO_INT)
                else:
                    value = _dequant(code, kk // GROUP, rows64, mask, scale_ptr, zero_ptr, GROUPS, ZWPR, BITS, PER, ZERO_INT)
            w += tl.where(index == position, value, 0.0)
    return w


@triton.jit
def _step(acc, it, pid_k, k_iters, x_ptr, xrows, m_mask, a_ptr, b_ptr, scale_ptr, zero_ptr, offs_n, n_mask, K, KC, WPR, IWPR, GROUPS, ZWPR,
          FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, IBITS: tl.constexpr, IPER: tl.constexpr,
          NN: tl.constexpr, MM: tl.constexpr, GROUP: tl.constexpr, ZERO_INT: tl.constexpr,
          SINGLE_GROUP: tl.constexpr, USE_DOT: tl.constexpr, DOT: tl.constexpr, BLOCK_K: tl.constexpr,
          INTERPRET: tl.constexpr, PER_P2: tl.constexpr, BLOCK_M: tl.constexpr, IPER_P2: tl.constexpr):
    """One K step of a program: acc [BLOCK_M, BLOCK_N] += x tile @ decoded weight tile.T."""
    if FMT == 0:  # group_quant: BLOCK_K counts words here
        w0 = (pid_k * k_iters + it) * BLOCK_K
        w, col, cmask = _gq_tile3(a_ptr, scale_ptr, zero_ptr, offs_n, n_mask, w0, K, WPR, GROUPS, ZWPR,
                                  BITS, PER, PER_P2, BLOCK_K, GROUP, ZERO_INT, SINGLE_GROUP)
        if USE_DOT:
            x = tl.load(x_ptr + xrows[:, None, None] + col, mask=m_mask[:, None, None] & cmask, other=0.0)
            x2 = tl.reshape(x, [x.shape[0], BLOCK_K * PER_P2])
            w2 = tl.reshape(w, [w.shape[0], BLOCK_K * PER_P2])
            if DOT == 0:
                acc += tl.dot(x2.to(tl.float32), tl.trans(w2), input_precision="ieee")
            elif DOT == 1:
                if INTERPRET:
                    acc += tl.dot(x2.to(tl.float32), tl.trans(w2.to(tl.bfloat16).to(tl.float32)), input_precision="ieee")
                else:
                    acc += tl.dot(x2.to(tl.bfloat16), tl.trans(w2.to(tl.bfloat16)))
            else:
                acc += tl.dot(x2.to(tl.float16), tl.trans(w2.to(tl.float16)))
        else:  # one activation row at a time: sum over the words and their fields
            for m in tl.static_range(BLOCK_M):
                row = tl.max(tl.where(tl.arange(0, BLOCK_M) == m, xrows, 0), axis=0)
                valid = tl.max(tl.where(tl.arange(0, BLOCK_M) == m, m_mask.to(tl.int32), 0), axis=0) > 0
                x = tl.load(x_ptr + row + col, mask=cmask & valid, other=0.0).to(tl.float32)
                part = tl.sum(tl.sum(w * x, axis=2), axis=1)
                acc += tl.where(tl.arange(0, BLOCK_M)[:, None] == m, part[None, :], 0.0)
    else:
        k0 = (pid_k * k_iters + it) * BLOCK_K  # along K (dense tiles) or along the kept values (FMA N:M)
        offs = k0 + tl.arange(0, BLOCK_K)
        if USE_DOT:
            w = _dense_tile(a_ptr, b_ptr, scale_ptr, zero_ptr, offs_n, n_mask, offs, k0, K, KC, WPR, IWPR, GROUPS, ZWPR,
                            FMT, BITS, PER, IBITS, IPER, NN, MM, GROUP, ZERO_INT, SINGLE_GROUP)
            xmask = m_mask[:, None] & (offs[None, :] < K)
            x = tl.load(x_ptr + xrows[:, None] + offs[None, :], mask=xmask, other=0.0)
            if USE_DOT:
                if DOT == 0:  # fp32 activations: a full-precision dot
                    acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
                elif DOT == 1:
                    if INTERPRET:  # the interpreter's bf16 dot is wrong: the same rounding, then an fp32 dot
                        acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.bfloat16).to(tl.float32)), input_precision="ieee")
                    else:
                        acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
                else:
                    acc += tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)))
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
        else:  # FMA path of N:M formats: index words loaded whole, kept values j of each row, x gathered at their columns
            t0 = (pid_k * k_iters + it) * BLOCK_K  # BLOCK_K counts index words here
            rows64 = offs_n.to(tl.int64)[:, None, None]
            ww = t0 + tl.arange(0, BLOCK_K)[None, :, None]
            pp = tl.arange(0, IPER_P2)[None, None, :]
            jj = ww * IPER + pp
            jmask = n_mask[:, None, None] & (pp < IPER) & (jj < KC)
            words = tl.load(b_ptr + rows64 * IWPR + ww, mask=n_mask[:, None, None] & (ww < IWPR), other=0)
            index = (words >> (pp * IBITS)) & ((1 << IBITS) - 1)
            column = (jj // NN) * MM + index
            if FMT == 1:
                value = tl.load(a_ptr + rows64 * KC + jj, mask=jmask, other=0.0).to(tl.float32)
            else:
                code = _field(a_ptr, rows64 * WPR, jj, BITS, PER, jmask)
                if SINGLE_GROUP:  # the tile's columns lie in one group
                    g1 = tl.zeros([1, 1, 1], dtype=tl.int32) + (t0 * IPER // NN * MM) // GROUP
                    value = _dequant(code, g1, rows64, n_mask[:, None, None] & (t0 < IWPR), scale_ptr, zero_ptr, GROUPS, ZWPR, BITS, PER,
                                     ZERO_INT)
                else:
                    value = _dequant(code, column // GROUP, rows64, jmask, scale_ptr, zero_ptr, GROUPS, ZWPR, BITS, PER, ZERO_INT)
            value = tl.where(jmask, value, 0.0)
            for m in tl.static_range(BLOCK_M):
                row = tl.max(tl.where(tl.arange(0, BLOCK_M) == m, xrows, 0), axis=0)
                valid = tl.max(tl.where(tl.arange(0, BLOCK_M) == m, m_mask.to(tl.int32), 0), axis=0) > 0
                x = tl.load(x_ptr + row + column, mask=jmask & valid, other=0.0).to(tl.float32)
                part = tl.sum(tl.sum(value * x, axis=2), axis=1)
                acc += tl.where(tl.arange(0, BLOCK_M)[:, None] == m, part[None, :], 0.0)
    return acc


@triton.jit
def _packed_mm_kernel(x_ptr, out_ptr, a_ptr, b_ptr, scale_ptr, zero_ptr,
                      M, N, K, KC, KLEN, WPR, IWPR, GROUPS, ZWPR, k_iters,
                      FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, IBITS: tl.constexpr, IPER: tl.constexpr,
                      NN: tl.constexpr, MM: tl.constexpr, GROUP: tl.constexpr, ZERO_INT: tl.constexpr,
                      SINGLE_GROUP: tl.constexpr, USE_DOT: tl.constexpr, DOT: tl.constexpr, ATOMIC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
                      PER_P2: tl.constexpr, IPER_P2: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    xrows = offs_m.to(tl.int64) * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if INTERPRET:  # the interpreter (with NumPy 2) cannot take a run-time range bound; a while loop it can
        it = 0
        while it < k_iters:
            acc = _step(acc, it, pid_k, k_iters, x_ptr, xrows, m_mask, a_ptr, b_ptr, scale_ptr, zero_ptr, offs_n, n_mask, K, KC, WPR, IWPR,
                        GROUPS, ZWPR, FMT, BITS, PER, IBITS, IPER, NN, MM, GROUP, ZERO_INT, SINGLE_GROUP, USE_DOT, DOT, BLOCK_K,
                        INTERPRET, PER_P2, BLOCK_M, IPER_P2)
            it += 1
    else:
        for it in range(k_iters):
            acc = _step(acc, it, pid_k, k_iters, x_ptr, xrows, m_mask, a_ptr, b_ptr, scale_ptr, zero_ptr, offs_n, n_mask, K, KC, WPR, IWPR,
                        GROUPS, ZWPR, FMT, BITS, PER, IBITS, IPER, NN, MM, GROUP, ZERO_INT, SINGLE_GROUP, USE_DOT, DOT, BLOCK_K,
                        INTERPRET, PER_P2, BLOCK_M, IPER_P2)
    out_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + out_offs, acc, mask=out_mask)
    else:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def packed_matmul(x: torch.Tensor, packed, config: Config | None = None) -> torch.Tensor:
    """x [..., in] (float32, bfloat16 or float16) @ W.T -> [..., out] in x's dtype, W never materialised."""
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
    nm_fma = args["FMT"] != FMT_GROUP_QUANT and batch <= FMA_MAX_BATCH
    klen = args["KC"] if nm_fma else cols
    cfg = config or default_config(batch, rows, klen, x.device, dense_fma=not nm_fma)
    per_p2 = pow2(args["PER"])
    block_k = cfg.block_k
    iper_p2 = pow2(args["IPER"])
    if args["FMT"] == FMT_GROUP_QUANT:  # the loop runs over words, block_k // per_p2 of them a step
        block_k = max(1, cfg.block_k // per_p2)
        klen = args["WPR"]
    elif nm_fma:  # over index words, block_k // iper_p2 of them a step
        block_k = max(1, cfg.block_k // iper_p2)
        klen = args["IWPR"]
    use_dot = batch > FMA_MAX_BATCH
    if use_dot and cfg.block_m < 16:
        raise ValueError(f"batch {batch} takes the tl.dot path, which needs block_m >= 16, got {cfg.block_m}")
    k_tiles = -(-klen // block_k)
    split = max(1, min(cfg.split_k, k_tiles))
    k_iters = -(-k_tiles // split)
    split = -(-k_tiles // k_iters)
    kept = block_k * args["IPER"]  # kept values one FMA step of an N:M format covers
    span = kept // args["NN"] * args["MM"] if nm_fma else cfg.block_k  # columns one K step covers
    single = args["FMT"] != FMT_NM and args["GROUP"] % span == 0 and (not nm_fma or kept % args["NN"] == 0)
    if args["FMT"] == FMT_GROUP_QUANT:
        single = per_p2 == args["PER"] and args["GROUP"] % (block_k * args["PER"]) == 0
    atomic = split > 1
    out = (torch.zeros if atomic else torch.empty)(batch, rows, dtype=torch.float32 if atomic else x.dtype, device=x.device)
    grid = (-(-rows // cfg.block_n), split, -(-batch // cfg.block_m))
    _packed_mm_kernel[grid](
        x2, out, args["a"], args["b"], args["scale"], args["zero"],
        batch, rows, cols, args["KC"], klen, args["WPR"], args["IWPR"], args["GROUPS"], args["ZWPR"], k_iters,
        FMT=args["FMT"], BITS=args["BITS"], PER=args["PER"], IBITS=args["IBITS"], IPER=args["IPER"], NN=args["NN"], MM=args["MM"],
        GROUP=args["GROUP"], ZERO_INT=args["ZERO_INT"], SINGLE_GROUP=single, USE_DOT=use_dot, DOT=DOT_KIND[x.dtype],
        ATOMIC=atomic, INTERPRET=_interpret(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, PER_P2=per_p2, IPER_P2=iper_p2,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if atomic:
        out = out.to(x.dtype)
    return out.reshape(*x.shape[:-1], rows)
