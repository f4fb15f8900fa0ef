"""The OBS sweep's in-block column loop as one Triton kernel a block (on CUDA), for the column rules that
fit in a few constants: GPTQ's rounding to a min/max grid (refitted at each group start inside the block,
or one grid a row for the whole sweep) and SparseGPT's masks (given for the block, or N:M chosen as the
sweep reaches each group of M columns).

Why: the torch loop in obs.py launches about a dozen small kernels a column, each behind a Python
dispatch, so on a GPU a 4096-column target spends its time launching, not computing. Here a program
holds a tile of rows of the block in registers and walks the block's columns itself: one launch a block.

The arithmetic is obs.obs_sweep's with the rules' own: column j's error (w_j - q_j) / d_j is spread over
the block by row j of the upper Cholesky factor (zero left of the diagonal, so fixed columns stay), the
fixed value q_j stored exactly; grids as quantization.fit_grid (scale rounded to float16, IEEE
divisions, round half to even). Results equal the torch loop's up to float summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.formats.quantized import SMALLEST_SCALE

MODES = {"grid": 0, "keep": 1, "nm": 2, "ternary": 3}  # a rule's fused_spec names its mode ("spqr": spqr_fused)
MODE_GRID, MODE_KEEP, MODE_NM, MODE_TERNARY = (tl.constexpr(MODES[name]) for name in MODES)  # constexpr: read inside kernels
BLOCK_ROWS = 16
SMALLEST = tl.constexpr(SMALLEST_SCALE)
ROUNDER = tl.constexpr(12582912.0)  # 1.5 * 2^23: (x + it) - it rounds x half to even, for |x| <= 2^22


@triton.jit
def _rint(x):
    """x rounded half to even (torch.round), as fp32 arithmetic (no libdevice: runs under the interpreter)."""
    x = tl.minimum(tl.maximum(x, -4194304.0), 4194304.0)  # past 2^22 the codes are clamped to the grid anyway
    return (x + ROUNDER) - ROUNDER


@triton.jit
def _column(t, c, j):
    """Column j of a [R, BW] register tile as [R]."""
    return tl.sum(tl.where(c[None, :] == j, t, 0.0), axis=1)


@triton.jit
def _fit(w, c, j, in_block, GROUP: tl.constexpr, MAXQ: tl.constexpr, SYM: tl.constexpr):
    """quantization.fit_grid over the group's columns [j, j + GROUP) of every row: (scale, zero)."""
    inside = (c[None, :] >= j) & (c[None, :] < j + GROUP) & in_block[None, :]
    low = tl.minimum(tl.min(tl.where(inside, w, float("inf")), axis=1), 0.0)
    high = tl.maximum(tl.max(tl.where(inside, w, float("-inf")), axis=1), 0.0)
    if SYM:
        high = tl.maximum(tl.abs(low), high)
        low = -high
    flat = (low == 0.0) & (high == 0.0)
    low = tl.where(flat, -1.0, low)
    high = tl.where(flat, 1.0, high)
    scale = tl.math.div_rn(high - low, tl.full(high.shape, MAXQ, tl.float32)).to(tl.float16).to(tl.float32)
    scale = tl.maximum(scale, SMALLEST)
    if SYM:
        zero = tl.full(scale.shape, (MAXQ + 1) / 2, tl.float32)
    else:
        zero = tl.minimum(tl.maximum(_rint(tl.math.div_rn(-low, scale)), 0.0), MAXQ)
    return scale, zero


@triton.jit
def _nm_keep(w, c, j, hdiag, in_block, N: tl.constexpr, M: tl.constexpr):
    """SparseGPT's N:M choice for columns [j, j + M): the N of largest w^2 / d^2 in every row (ties: the
    first), as 0/1 over the whole tile (zero outside the group)."""
    inside = (c[None, :] >= j) & (c[None, :] < j + M) & in_block[None, :]
    saliency = w * w / (hdiag * hdiag)[None, :]
    rank = tl.zeros(w.shape, dtype=tl.int32)
    for m in tl.static_range(M):
        other = _column(saliency, c, j + m)[:, None]
        rank += ((other > saliency) | ((other == saliency) & (j + m < c[None, :]))).to(tl.int32)
    return tl.where(inside & (rank < N), 1.0, 0.0)


@triton.jit
def _spread(w, col, q, c, j, h_ptr, q_ptr, e_ptr, r, r_ok, in_block, ld_w, ld_h):
    """Column j fixed to q: store q and its scaled error (col - q) / d, and spread that error over the tile
    by row j of the inverse Hessian's factor (zero left of the diagonal); returns the updated tile."""
    d = tl.load(h_ptr + j * ld_h + j)
    h_row = tl.load(h_ptr + j * ld_h + c, mask=in_block & (c >= j), other=0.0)
    err = tl.math.div_rn(col - q, tl.full(col.shape, 1.0, tl.float32) * d)
    tl.store(q_ptr + r * ld_w + j, q, mask=r_ok)
    tl.store(e_ptr + r * ld_w + j, err, mask=r_ok)
    return w - err[:, None] * h_row[None, :]


@triton.jit
def _block(w_ptr, h_ptr, q_ptr, e_ptr, keep_ptr, scale_ptr, zero_ptr, rows, width, ld_w, ld_h, ld_g,
           MODE: tl.constexpr, GROUP: tl.constexpr, MAXQ: tl.constexpr, SYM: tl.constexpr, HAS_KEEP: tl.constexpr,
           N: tl.constexpr, M: tl.constexpr, BLOCK_R: tl.constexpr, BW: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    c = tl.arange(0, BW)
    in_block = c < width
    tile = r_ok[:, None] & in_block[None, :]
    w = tl.load(w_ptr + r[:, None] * ld_w + c[None, :], mask=tile, other=0.0)
    keep = w * 0.0
    if MODE == MODE_KEEP or HAS_KEEP:
        keep = tl.load(keep_ptr + r[:, None] * ld_w + c[None, :], mask=tile, other=0.0)
    hdiag = tl.load(h_ptr + c * ld_h + c, mask=in_block, other=1.0)
    scale = tl.load(scale_ptr + r * ld_g, mask=r_ok, other=1.0)  # GROUP 0: the row's one grid
    zero = tl.load(zero_ptr + r * ld_g, mask=r_ok, other=0.0)
    j = 0
    while j < width:  # a while loop: the interpreter takes no run-time range bound
        # nested ifs: the outer conditions are compile-time constants, the inner ones run-time values
        if MODE == MODE_GRID and GROUP > 0:  # noqa: SIM102
            if j % GROUP == 0:
                scale, zero = _fit(w, c, j, in_block, GROUP, MAXQ, SYM)
                tl.store(scale_ptr + r * ld_g + j // GROUP, scale, mask=r_ok)
                tl.store(zero_ptr + r * ld_g + j // GROUP, zero, mask=r_ok)
        if MODE == MODE_NM:  # noqa: SIM102
            if j % M == 0:
                keep = tl.where((c[None, :] >= j) & (c[None, :] < j + M), _nm_keep(w, c, j, hdiag, in_block, N, M), keep)
        col = _column(w, c, j)
        if MODE == MODE_GRID:
            code = _rint(tl.math.div_rn(col, scale)) + zero
            q = scale * (tl.minimum(tl.maximum(code, 0.0), MAXQ) - zero)
            if HAS_KEEP:
                q = q * _column(keep, c, j)
        elif MODE == MODE_TERNARY:  # the row's max above max / 2, its min below min / 2, else 0 (scale: min, zero: max)
            q = tl.where(col > zero / 2, zero, tl.where(col < scale / 2, scale, 0.0))
            if HAS_KEEP:
                q = q * _column(keep, c, j)
        else:
            q = col * _column(keep, c, j)
        w = _spread(w, col, q, c, j, h_ptr, q_ptr, e_ptr, r, r_ok, in_block, ld_w, ld_h)
        j += 1
    if MODE == MODE_NM:
        tl.store(keep_ptr + r[:, None] * ld_w + c[None, :], keep, mask=tile)


def sweep_block(block: torch.Tensor, hinv_block: torch.Tensor, fixed: torch.Tensor, errors: torch.Tensor, spec: dict) -> None:
    """Fix the columns of `block` ([rows, width] float32) into `fixed` and their scaled errors into
    `errors` (both [rows, width]) as obs_sweep's column loop would with the rule `spec` describes:
    {"mode": "grid", "group": columns a refit (0: "scale"/"zero" [rows] given), "maxq", "symmetric",
    "keep": float [rows, width] or None} -> fills spec["scales"], spec["zeros"] [rows, groups]; or
    {"mode": "keep", "keep"}; or {"mode": "nm", "n", "m"} -> fills spec["keep"]; or {"mode": "ternary", "low", "high"
    [rows], "keep"}. A batch [E, rows, width] (experts; "ternary" only) goes expert by expert."""
    if block.dim() == 3:  # a batch of experts: one launch each, with its slices of the spec's tensors
        if spec["mode"] != "ternary":
            raise ValueError("a batch of weights takes only the ternary mode (it returns nothing per expert)")
        for e in range(block.shape[0]):
            sweep_block(block[e], hinv_block[e], fixed[e], errors[e], {k: (v[e] if isinstance(v, torch.Tensor) else v) for k, v in spec.items()})
        return
    rows, width = block.shape
    kind, group = spec["mode"], spec.get("group", 0)
    groups = max(1, -(-width // group)) if group else 1
    if kind == "ternary":  # the rows' min and max, through the grid's scale / zero slots
        scales, zeros = spec["low"].reshape(rows, 1).float().contiguous(), spec["high"].reshape(rows, 1).float().contiguous()
    elif kind == "grid" and not group:
        scales, zeros = spec["scale"].reshape(rows, 1).float().contiguous(), spec["zero"].reshape(rows, 1).float().contiguous()
    else:
        scales = torch.empty(rows, groups, device=block.device)
        zeros = torch.empty(rows, groups, device=block.device)
    keep = spec.get("keep")
    keep = torch.zeros_like(block) if keep is None else keep.float().contiguous()
    block = block.contiguous()
    hinv_block = hinv_block.contiguous()
    q = torch.empty_like(block)
    e = torch.empty_like(block)
    bw = max(16, triton.next_power_of_2(width))
    _block[(triton.cdiv(rows, BLOCK_ROWS),)](
        block, hinv_block, q, e, keep, scales, zeros, rows, width, width, hinv_block.shape[1], scales.shape[1],
        MODE=MODES[kind], GROUP=group, MAXQ=spec.get("maxq", 1), SYM=spec.get("symmetric", False), HAS_KEEP=spec.get("keep") is not None,
        N=spec.get("n", 1), M=spec.get("m", 1), BLOCK_R=BLOCK_ROWS, BW=bw, num_warps=4)
    fixed.copy_(q)
    errors.copy_(e)
    if kind == "grid" and group:
        spec["scales"], spec["zeros"] = scales, zeros
    if kind == "nm":
        spec["keep"] = keep > 0
