"""The FMA kernels (batch of 1 to a few rows): y = x @ W.T on CUDA cores, fp32 accumulators kept per thread
across the K loop and reduced once at the end (no cross-lane reduction inside the loop).

Layout: a program's lanes and warps lie along K and every lane holds all BLOCK_N rows. A lane owns 4 code
words (one 16-byte load) of each row (group_quant) or one index word of each row (N:M); its activations are
loaded as [1, lanes, 8] tiles, whose coalesced layout is "one 16-byte vector a lane": weights, activations
and per-(row, lane) statistics share registers (no layout conversion), one activation serves BLOCK_N rows.
Decoding: field p of a word masked in place (after >> 16 above bit 23) and OR-ed with the exponent of
2^(23 - a) is the fp32 2^(23 - a) + code: LOP3 + FADD give code - zero exactly. group_quant folds the zero
per chunk, sum s (c - z) x = s (sum c x - z sum x): a weight costs LOP3 + FADD + FFMA; int3 chunks may
straddle two groups (STATS=1), groups smaller than a chunk gather statistics per element (STATS=2). N:M
(M = 2 or 4) picks each kept value's activation among its group's M columns by index bits (selects, no
gathers). Loops carry num_stages (tl.range): Triton streams weights, activations and statistics (read
through 32-bit words, S32) through shared memory with cp.async.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _split4(t):
    """[A, B, 4] -> its four [A, B] slices (in-thread when the 4 are one vector: free)."""
    a, b = tl.split(tl.reshape(t, [t.shape[0], t.shape[1], 2, 2]))
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, b0, a1, b1


@triton.jit
def _split8(t):
    """[1, Q, 8] -> its eight [1, Q] slices, in the order 0, 4, 2, 6, 1, 5, 3, 7."""
    a, b = tl.split(tl.reshape(t, [t.shape[0], t.shape[1], 2, 2, 2]))
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    x0, x4 = tl.split(a0)
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    return x0, x4, x2, x6, x1, x5, x3, x7


@triton.jit
def _codes(word, pp, BITS: tl.constexpr, FMASK, MAGIC, z=0.0, ZINT: tl.constexpr = True):
    """Fields pp of the [BN, Q] words as [BN, Q, CH] fp32 codes minus z, exactly (an integer z: one FADD)."""
    high = pp * BITS + BITS > 23
    a = tl.where(high, pp * BITS - 16, pp * BITS)
    w3 = word[:, :, None]
    src = tl.where(high, w3 >> 16, w3)
    cf = ((src & (FMASK << a)) | ((MAGIC - a) << 23)).to(tl.float32, bitcast=True)  # MAGIC = 150 at run time: one LOP3
    magic = ((150 - a) << 23).to(tl.float32, bitcast=True)
    return cf - (magic + z) if ZINT else (cf - magic) - z


@triton.jit
def _half(ptr, idx, mask, S32: tl.constexpr):
    """fp16 ptr[idx] as fp32; S32: through its 32-bit word (pipelined: cp.async takes >= 32-bit loads only)."""
    if S32:
        w = tl.load(ptr.to(tl.pointer_type(tl.int32)) + idx // 2, mask=mask, other=0)
        return ((w >> ((idx % 2) * 16)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _stat(scale_ptr, zero_ptr, rows, g, mask, GROUPS, ZWPR, BITS: tl.constexpr, PER: tl.constexpr, ZERO_INT: tl.constexpr,
          S32: tl.constexpr):
    """Scale and zero point (fp32) of rows x groups g (broadcastable int tensors)."""
    s = _half(scale_ptr, rows * GROUPS + g, mask, S32)
    if ZERO_INT:
        zw = tl.load(zero_ptr + rows * ZWPR + g // PER, mask=mask, other=0)
        z = (((zw >> ((g % PER) * BITS)) & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        z = _half(zero_ptr, rows * GROUPS + g, mask, S32)
    return s, z


@triton.jit
def _start(N, k_iters, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, Q: tl.constexpr, I64: tl.constexpr):
    """Program (n, k, m): rows [n * BLOCK_N, ...), K steps from k * k_iters, batch rows from m * BLOCK_M."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m0 = tl.program_id(2) * BLOCK_M
    rows = (offs_n.to(tl.int64) if I64 else offs_n)[:, None]
    return tl.program_id(1) * k_iters, offs_n, offs_n < N, rows, m0.to(tl.int64) if I64 else m0, tl.zeros([BLOCK_N, Q], dtype=tl.float32)


@triton.jit
def _store(out_ptr, acc0, acc1, acc2, acc3, offs_n, n_mask, m0, M, N, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row sums of the accumulators of batch rows m0 .. m0 + BLOCK_M - 1 (fp32 atomics when K is split)."""
    for k in tl.static_range(BLOCK_M):
        y = tl.sum(acc0 if k == 0 else (acc1 if k == 1 else (acc2 if k == 2 else acc3)), axis=1)
        ptrs = out_ptr + (m0 + k) * N + offs_n
        if ATOMIC:
            tl.atomic_add(ptrs, y, mask=n_mask & (m0 + k < M))
        else:
            tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=n_mask & (m0 + k < M))


@triton.jit
def _gq_row(acc, w_0, w_1, w_2, w_3, x_ptr, xrow, m_ok, wcol, g, s, z, s2, z2, scale_ptr, zero_ptr, rows, n_mask, K, GROUPS, ZWPR,
            FMASK, MAGIC, BITS: tl.constexpr, PER: tl.constexpr, CH: tl.constexpr, GROUP: tl.constexpr, ZERO_INT: tl.constexpr,
            STATS: tl.constexpr, MASKED: tl.constexpr, S32: tl.constexpr):
    """acc [BN, Q] += one batch row's products with the lanes' 4 words [BN, Q] of every row. STATS 0: one group a
    chunk, sum s (c - z) x = s (sum c x - z sum x); 1: the columns past the chunk's group boundary take the next
    group's statistics; 2: statistics gathered per element."""
    p = tl.zeros([acc.shape[0], acc.shape[1], CH], dtype=tl.float32)   # per-lane sums, reduced once a step
    ph = p
    xs = tl.zeros([1, acc.shape[1], CH], dtype=tl.float32)
    xsh = xs
    for j in tl.static_range(4):
        word = w_0 if j == 0 else (w_1 if j == 1 else (w_2 if j == 2 else w_3))
        for f in tl.static_range(PER // CH):
            pp = f * CH + tl.arange(0, CH)[None, None, :]
            col = (wcol[:, :, None] + j) * PER + pp                                 # [1, Q, CH]
            x = tl.load(x_ptr + xrow + col, mask=(col < K) & m_ok if MASKED else m_ok, other=0.0).to(tl.float32)
            c = _codes(word, pp, BITS, FMASK, MAGIC)
            if STATS == 0:
                p += c * x
                xs += x
            elif STATS == 1:
                xh = tl.where(col >= (g[:, :, None] + 1) * GROUP, x, 0.0)
                p += c * (x - xh)
                xs += x - xh
                ph += c * xh
                xsh += xh
            else:
                sg, zg = _stat(scale_ptr, zero_ptr, rows[:, :, None], col // GROUP, n_mask[:, None, None] & (col < K), GROUPS, ZWPR,
                               BITS, PER, ZERO_INT, S32)
                p += sg * (c - zg) * x
    if STATS == 2:
        acc += tl.sum(p, axis=2)
    elif STATS == 0:
        acc += s * (tl.sum(p, axis=2) - z * tl.sum(xs, axis=2))
    else:
        acc += s * (tl.sum(p, axis=2) - z * tl.sum(xs, axis=2)) + s2 * (tl.sum(ph, axis=2) - z2 * tl.sum(xsh, axis=2))
    return acc


@triton.jit
def _gq_step(acc0, acc1, acc2, acc3, t, x_ptr, codes_ptr, scale_ptr, zero_ptr, rows, n_mask, m0, M, K, WPR, GROUPS, ZWPR, FMASK, MAGIC,
             BITS: tl.constexpr, PER: tl.constexpr, CH: tl.constexpr, GROUP: tl.constexpr, ZERO_INT: tl.constexpr, STATS: tl.constexpr,
             MASKED: tl.constexpr, BLOCK_M: tl.constexpr, Q: tl.constexpr, S32: tl.constexpr):
    """K step t: Q lanes x 4 words of every row, for BLOCK_M (1, 2 or 4) batch rows."""
    wcol = t * (Q * 4) + tl.arange(0, Q)[None, :] * 4                           # first word of each lane's chunk, [1, Q]
    vv = tl.arange(0, 4)[None, None, :]
    wmask = n_mask[:, None, None] & (wcol[:, :, None] + vv < WPR) if MASKED else n_mask[:, None, None]
    words = tl.load(codes_ptr + rows[:, :, None] * WPR + wcol[:, :, None] + vv, mask=wmask, other=0)
    g = (wcol * PER) // GROUP                                                    # the group of the chunk's first column
    smask = n_mask[:, None] & (wcol < WPR)
    s, z = _stat(scale_ptr, zero_ptr, rows, g, smask, GROUPS, ZWPR, BITS, PER, ZERO_INT, S32)
    s2, z2 = s, z
    if STATS == 1:
        s2, z2 = _stat(scale_ptr, zero_ptr, rows, tl.minimum(g + 1, GROUPS - 1), smask, GROUPS, ZWPR, BITS, PER, ZERO_INT, S32)
    w_0, w_1, w_2, w_3 = _split4(words)
    xrow = m0 * K
    acc0 = _gq_row(acc0, w_0, w_1, w_2, w_3, x_ptr, xrow, m0 < M, wcol, g, s, z, s2, z2, scale_ptr, zero_ptr, rows, n_mask, K, GROUPS, ZWPR,
                   FMASK, MAGIC, BITS, PER, CH, GROUP, ZERO_INT, STATS, MASKED, S32)
    if BLOCK_M > 1:
        acc1 = _gq_row(acc1, w_0, w_1, w_2, w_3, x_ptr, xrow + K, m0 + 1 < M, wcol, g, s, z, s2, z2, scale_ptr, zero_ptr, rows, n_mask, K,
                       GROUPS, ZWPR, FMASK, MAGIC, BITS, PER, CH, GROUP, ZERO_INT, STATS, MASKED, S32)
    if BLOCK_M > 2:
        acc2 = _gq_row(acc2, w_0, w_1, w_2, w_3, x_ptr, xrow + 2 * K, m0 + 2 < M, wcol, g, s, z, s2, z2, scale_ptr, zero_ptr, rows, n_mask,
                       K, GROUPS, ZWPR, FMASK, MAGIC, BITS, PER, CH, GROUP, ZERO_INT, STATS, MASKED, S32)
        acc3 = _gq_row(acc3, w_0, w_1, w_2, w_3, x_ptr, xrow + 3 * K, m0 + 3 < M, wcol, g, s, z, s2, z2, scale_ptr, zero_ptr, rows, n_mask,
                       K, GROUPS, ZWPR, FMASK, MAGIC, BITS, PER, CH, GROUP, ZERO_INT, STATS, MASKED, S32)
    return acc0, acc1, acc2, acc3


@triton.jit
def _gq_gemv_kernel(x_ptr, out_ptr, codes_ptr, scale_ptr, zero_ptr, M, N, K, WPR, GROUPS, ZWPR, k_iters, k_full, FMASK, MAGIC,
                    BITS: tl.constexpr, PER: tl.constexpr, CH: tl.constexpr, GROUP: tl.constexpr, ZERO_INT: tl.constexpr,
                    STATS: tl.constexpr, ATOMIC: tl.constexpr, I64: tl.constexpr, S32: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, Q: tl.constexpr, STAGES: tl.constexpr, INTERPRET: tl.constexpr):
    """group_quant. Steps below k_full cover whole words inside K (no masks); the tail is masked."""
    t0, offs_n, n_mask, rows, m0, acc0 = _start(N, k_iters, BLOCK_N, BLOCK_M, Q, I64)
    acc1, acc2, acc3 = acc0, acc0, acc0
    n_full = tl.minimum(tl.maximum(k_full - t0, 0), k_iters)
    it = 0
    while it < (n_full if INTERPRET else 1):  # interpreted: the loop (NumPy 2 takes no run-time range bound)
        for i in tl.range(0, 1 if INTERPRET else n_full, num_stages=STAGES):  # compiled: the pipelined loop
            acc0, acc1, acc2, acc3 = _gq_step(acc0, acc1, acc2, acc3, t0 + it + i, x_ptr, codes_ptr, scale_ptr, zero_ptr, rows, n_mask, m0,
                                              M, K, WPR, GROUPS, ZWPR, FMASK, MAGIC, BITS, PER, CH, GROUP, ZERO_INT, STATS, False,
                                              BLOCK_M, Q, S32)
        it += 1
    it = n_full
    while it < k_iters:  # the tail: masked steps
        acc0, acc1, acc2, acc3 = _gq_step(acc0, acc1, acc2, acc3, t0 + it, x_ptr, codes_ptr, scale_ptr, zero_ptr, rows, n_mask, m0, M, K,
                                          WPR, GROUPS, ZWPR, FMASK, MAGIC, BITS, PER, CH, GROUP, ZERO_INT, STATS, True, BLOCK_M, Q, S32)
        it += 1
    _store(out_ptr, acc0, acc1, acc2, acc3, offs_n, n_mask, m0, M, N, ATOMIC, BLOCK_M)


@triton.jit
def _bit(b, POS: tl.constexpr):
    if POS == 31:
        return b < 0
    return (b & (1 << POS)) != 0


@triton.jit
def _pick(x0, x1, x2, x3, b, BIT: tl.constexpr, M: tl.constexpr):
    """The candidate at the index whose bits start at bit BIT of b (M = 2 or 4): selects, no gathers."""
    lo = tl.where(_bit(b, BIT), x1, x0)
    if M == 2:
        return lo
    return tl.where(_bit(b, BIT + 1), tl.where(_bit(b, BIT), x3, x2), lo)


@triton.jit
def _el(v0, v1, v2, v3, i: tl.constexpr):
    return v0 if i == 0 else (v1 if i == 1 else (v2 if i == 2 else v3))


@triton.jit
def _nm_row(acc, iw, cw, c0, j0, K, x_ptr, xrow, m_ok, a_ptr, rows, n_mask, KC, s, z, FMASK, MAGIC, FMT: tl.constexpr,
            BITS: tl.constexpr, PER: tl.constexpr, IBITS: tl.constexpr, IPER: tl.constexpr, NN: tl.constexpr, MM: tl.constexpr,
            CWL: tl.constexpr, ZINT: tl.constexpr):
    """acc [BN, Q] += one batch row times each lane's IPER kept values (one index word iw [BN, Q]) of every row."""
    KW: tl.constexpr = 8 // MM * NN                                              # kept values in 8 dense columns
    p = tl.zeros_like(acc)
    c_0, c_1, c_2, c_3 = iw, iw, iw, iw                                          # the lane's code words (sparse_quant)
    if FMT == 2:
        if CWL == 4:
            c_0, c_1, c_2, c_3 = _split4(cw)
        elif CWL == 2:
            c_0, c_1 = tl.split(cw)
        else:
            c_0 = tl.reshape(cw, [cw.shape[0], cw.shape[1]])
    for win in tl.static_range(IPER // KW):
        xc = c0[:, :, None] + win * 8 + tl.arange(0, 8)[None, None, :]
        xw = tl.load(x_ptr + xrow + xc, mask=(xc < K) & m_ok, other=0.0).to(tl.float32)
        x_0, x_4, x_2, x_6, x_1, x_5, x_3, x_7 = _split8(xw)
        v_0, v_1, v_2, v_3 = p, p, p, p
        if FMT == 1:
            jj = j0[:, :, None] + win * KW + tl.arange(0, KW)[None, None, :]
            vw = tl.load(a_ptr + rows[:, :, None] * KC + jj, mask=n_mask[:, None, None] & (jj < KC), other=0.0).to(tl.float32)
            if KW == 4:
                v_0, v_1, v_2, v_3 = _split4(vw)
            else:
                v_0, v_1 = tl.split(vw)
        for t in tl.static_range(KW):
            k = win * KW + t                                                      # kept value of the lane's chunk
            gl = t // NN                                                          # its group among the 8 columns
            if MM == 4:
                xs = _pick(_el(x_0, x_4, x_0, x_0, gl), _el(x_1, x_5, x_1, x_1, gl), _el(x_2, x_6, x_2, x_2, gl),
                           _el(x_3, x_7, x_3, x_3, gl), iw, k * IBITS, MM)
            else:
                xs = _pick(_el(x_0, x_2, x_4, x_6, gl), _el(x_1, x_3, x_5, x_7, gl), x_0, x_0, iw, k * IBITS, MM)
            if FMT == 1:
                p += _el(v_0, v_1, v_2, v_3, t) * xs
            else:
                f = k % PER
                c = _codes(_el(c_0, c_1, c_2, c_3, k // PER), tl.full([1, 1, 1], f, tl.int32), BITS, FMASK, MAGIC, z[:, :, None],
                           ZINT)
                p += tl.reshape(c, [c.shape[0], c.shape[1]]) * xs
    return acc + s * p


@triton.jit
def _nm_gemv_kernel(x_ptr, out_ptr, a_ptr, b_ptr, scale_ptr, zero_ptr, M, N, K, KC, WPR, IWPR, GROUPS, ZWPR, k_iters, FMASK, MAGIC,
                    FMT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, IBITS: tl.constexpr, IPER: tl.constexpr, NN: tl.constexpr,
                    MM: tl.constexpr, GROUP: tl.constexpr, ZERO_INT: tl.constexpr, ATOMIC: tl.constexpr, I64: tl.constexpr,
                    S32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q: tl.constexpr, STAGES: tl.constexpr,
                    INTERPRET: tl.constexpr):
    """N:M (M = 2 or 4, a power of two kept values in 8 columns): a lane owns one index word of every row a step."""
    CWL: tl.constexpr = IPER * BITS // 32 if FMT == 2 else 1                   # code words of a lane's kept values
    t0, offs_n, n_mask, rows, m0, acc0 = _start(N, k_iters, BLOCK_N, BLOCK_M, Q, I64)
    acc1, acc2, acc3 = acc0, acc0, acc0
    it = 0
    while it < (k_iters if INTERPRET else 1):
        for i in tl.range(0, 1 if INTERPRET else k_iters, num_stages=STAGES):
            iwi = (t0 + it + i) * Q + tl.arange(0, Q)[None, :]                   # each lane's index word
            lane_ok = iwi < IWPR
            j0 = iwi * IPER                                                      # its first kept value
            c0 = j0 // NN * MM                                                   # and first dense column
            iw = tl.load(b_ptr + rows * IWPR + iwi, mask=n_mask[:, None] & lane_ok, other=0)
            cw = iw[:, :, None]
            s, z = tl.full([BLOCK_N, 1], 1.0, tl.float32), tl.zeros([BLOCK_N, 1], dtype=tl.float32)
            if FMT == 2:
                cwi = iwi[:, :, None] * CWL + tl.arange(0, CWL)[None, None, :]
                cw = tl.load(a_ptr + rows[:, :, None] * WPR + cwi, mask=n_mask[:, None, None] & (cwi < WPR), other=0)
                s, z = _stat(scale_ptr, zero_ptr, rows, c0 // GROUP, n_mask[:, None] & lane_ok, GROUPS, ZWPR, BITS, PER, ZERO_INT, S32)
            xrow = m0 * K
            acc0 = _nm_row(acc0, iw, cw, c0, j0, K, x_ptr, xrow, m0 < M, a_ptr, rows, n_mask, KC, s, z, FMASK, MAGIC, FMT, BITS, PER,
                           IBITS, IPER, NN, MM, CWL, ZERO_INT)
            if BLOCK_M > 1:
                acc1 = _nm_row(acc1, iw, cw, c0, j0, K, x_ptr, xrow + K, m0 + 1 < M, a_ptr, rows, n_mask, KC, s, z, FMASK, MAGIC, FMT,
                               BITS, PER, IBITS, IPER, NN, MM, CWL, ZERO_INT)
            if BLOCK_M > 2:
                acc2 = _nm_row(acc2, iw, cw, c0, j0, K, x_ptr, xrow + 2 * K, m0 + 2 < M, a_ptr, rows, n_mask, KC, s, z, FMASK, MAGIC,
                               FMT, BITS, PER, IBITS, IPER, NN, MM, CWL, ZERO_INT)
                acc3 = _nm_row(acc3, iw, cw, c0, j0, K, x_ptr, xrow + 3 * K, m0 + 3 < M, a_ptr, rows, n_mask, KC, s, z, FMASK, MAGIC,
                               FMT, BITS, PER, IBITS, IPER, NN, MM, CWL, ZERO_INT)
        it += 1
    _store(out_ptr, acc0, acc1, acc2, acc3, offs_n, n_mask, m0, M, N, ATOMIC, BLOCK_M)

