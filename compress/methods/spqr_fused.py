"""SpQR's column rule inside the fused OBS block kernel (obs_fused): one launch a block of columns.

A program holds 16 rows of the block in registers, one second-level statistics group (beta2 = 16 rows),
and walks the block's columns as spqr.SpQRRule does: at each group's first column it computes the
leave-one-out outlier criterion of every weight of the group, fits the min/max grid on the group with
the likely outliers replaced by the row's mean of the others, quantizes the 16 rows' scales and zero
points to their 3-bit (or fp16) form, then per column rounds to that grid and keeps the weights whose
scaled error passes the threshold as float16 outliers. The rest (error spread over the block by the
inverse Hessian's row) is obs_fused's `_spread`.

Same arithmetic as the torch rule: IEEE divisions, round half to even, no fused multiply-adds (the
kernel is compiled without them), so grids, codes and outliers agree but for sums whose order differs
(the leave-one-out errors): a criterion within float rounding of the threshold may fall either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.methods.obs_fused import BLOCK_ROWS, _column, _rint, _spread

TINY = tl.constexpr(1e-9)  # spqr._round's clamp of the scale


@triton.jit
def _minmax(values, inside, MAXQ: tl.constexpr):
    """spqr._minmax_grid per row over the columns `inside` ([BW] or [R, BW]): (scale, zero), zero not rounded."""
    low = tl.min(tl.where(inside, values, float("inf")), axis=1)
    high = tl.max(tl.where(inside, values, float("-inf")), axis=1)
    flat = low == high
    low = tl.where(flat, -1.0, low)
    high = tl.where(flat, 1.0, high)
    scale = tl.math.div_rn(high - low, tl.full(high.shape, MAXQ, tl.float32))
    return scale, tl.math.div_rn(-low, scale)


@triton.jit
def _round(values, scale, zero, MAXQ: tl.constexpr):
    code = _rint(tl.math.div_rn(values, tl.maximum(scale, TINY)) + zero)
    return tl.minimum(tl.maximum(code, 0.0), MAXQ)


@triton.jit
def _group_error(w, inside, hdiag, MAXQ: tl.constexpr):
    """sum over the columns `inside` of ((w - q) / d)^2 per row, on the grid fitted to those columns."""
    scale, zero = _minmax(w, inside, MAXQ)
    q = scale[:, None] * (_round(w, scale[:, None], zero[:, None], MAXQ) - zero[:, None])
    term = tl.math.div_rn(q - w, tl.zeros_like(w) + hdiag[None, :])
    return tl.sum(tl.where(inside, term * term, 0.0), axis=1)


@triton.jit
def _second_level(values, QQ_BITS: tl.constexpr):
    """spqr.quantize_statistic over the program's rows: (codes [R], step, low (float16 values), what a reader decodes [R])."""
    maxq = tl.full(values.shape, 2**QQ_BITS - 1, tl.float32)
    low = tl.zeros_like(values) + tl.min(values, axis=0)
    high = tl.zeros_like(values) + tl.max(values, axis=0)
    flat = low == high
    low = tl.where(flat, -1.0, low)
    high = tl.where(flat, 1.0, high)
    step = tl.math.div_rn(high - low, maxq)
    zero = tl.math.div_rn(-low, step)
    low16 = (-zero * step).to(tl.float16).to(tl.float32)
    step16 = step.to(tl.float16).to(tl.float32)
    codes = tl.minimum(tl.maximum(_rint(tl.math.div_rn(values - low16, tl.maximum(step16, TINY))), 0.0), maxq)
    return codes, step16, low16, low16 + step16 * codes


@triton.jit
def _store_statistic(values, ptr, step_ptr, low_ptr, r, group, ld_g, QQ_BITS: tl.constexpr):
    """Store one group's statistic of the program's rows; returns the values the weights are rounded with."""
    if QQ_BITS > 0:
        codes, step, low, stored = _second_level(values, QQ_BITS)
        tl.store(ptr + r * ld_g + group, codes)
        first = r == tl.min(r, axis=0)  # one second-level group a program: its step and low stored once
        tl.store(step_ptr + tl.program_id(0) * ld_g + group + r * 0, step, mask=first)
        tl.store(low_ptr + tl.program_id(0) * ld_g + group + r * 0, low, mask=first)
    else:
        stored = values.to(tl.float16).to(tl.float32)
        tl.store(ptr + r * ld_g + group, stored)
    return stored


@triton.jit
def _spqr_block(w_ptr, h_ptr, q_ptr, e_ptr, keep_ptr, code_ptr, out_ptr, sc_ptr, ss_ptr, sl_ptr, zc_ptr, zs_ptr, zl_ptr,
                threshold, width, ld_w, ld_h, ld_g,
                GROUP: tl.constexpr, MAXQ: tl.constexpr, QQ_SCALE: tl.constexpr, QQ_ZERO: tl.constexpr, LOO: tl.constexpr,
                HAS_KEEP: tl.constexpr, BLOCK_R: tl.constexpr, BW: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows are a multiple of BLOCK_R (the caller checks)
    c = tl.arange(0, BW)
    in_block = c < width
    tile = (r[:, None] >= 0) & in_block[None, :]
    w = tl.load(w_ptr + r[:, None] * ld_w + c[None, :], mask=tile, other=0.0)
    keep = w * 0.0 + 1.0
    if HAS_KEEP:
        keep = tl.load(keep_ptr + r[:, None] * ld_w + c[None, :], mask=tile, other=0.0)
    hdiag = tl.load(h_ptr + c * ld_h + c, mask=in_block, other=1.0)
    scale = tl.zeros([BLOCK_R], tl.float32)
    zero = tl.zeros([BLOCK_R], tl.float32)
    j = 0
    while j < width:
        if j % GROUP == 0:
            inside = (c[None, :] >= j) & (c[None, :] < j + GROUP) & tile
            excluded = inside & (keep == 0.0)
            if LOO:  # noqa: SIM102
                if tl.minimum(width - j, GROUP) > 1:  # a last group one column wide has no one to leave out
                    baseline = _group_error(w, inside, hdiag, MAXQ)
                    for m in range(GROUP):  # a loop, not unrolled: 16 copies of the tile work spill registers
                        others = inside & (c[None, :] != j + m)
                        gain = baseline - _group_error(w, others, hdiag, MAXQ)
                        excluded = excluded | (inside & (c[None, :] == j + m) & (gain[:, None] > threshold))
            included = tl.where(inside & ~excluded, 1.0, 0.0)
            mean = tl.math.div_rn(tl.sum(w * included, axis=1), tl.maximum(tl.sum(included, axis=1), 1.0))
            scale, zero = _minmax(tl.where(excluded, mean[:, None], w), inside, MAXQ)
            scale = _store_statistic(scale, sc_ptr, ss_ptr, sl_ptr, r, j // GROUP, ld_g, QQ_SCALE)
            zero = _store_statistic(zero, zc_ptr, zs_ptr, zl_ptr, r, j // GROUP, ld_g, QQ_ZERO)
        col = _column(w, c, j)
        code = _round(col, scale, zero, MAXQ)
        q = scale * (code - zero)
        d = tl.load(h_ptr + j * ld_h + j)
        scaled = tl.math.div_rn(col - q, tl.zeros_like(col) + d)
        outlier = scaled * scaled > threshold
        if HAS_KEEP:
            kept = _column(keep, c, j) > 0.0
            outlier = outlier & kept
            q = tl.where(outlier, col.to(tl.float16).to(tl.float32), q)
            q = tl.where(kept, q, 0.0)
        else:
            q = tl.where(outlier, col.to(tl.float16).to(tl.float32), q)
        tl.store(code_ptr + r * ld_w + j, code)
        tl.store(out_ptr + r * ld_w + j, tl.where(outlier, 1.0, 0.0))
        w = _spread(w, col, q, c, j, h_ptr, q_ptr, e_ptr, r, r >= 0, in_block, ld_w, ld_h)
        j += 1


def sweep_block(block: torch.Tensor, hinv_block: torch.Tensor, fixed: torch.Tensor, errors: torch.Tensor, spec: dict) -> None:
    """obs_fused.sweep_block's "spqr" mode. spec: "group" (beta1), "bits", "qq_scale_bits" / "qq_zero_bits"
    (None: float16), "threshold", "leave_one_out", "keep" (bool [rows, width] or None). Fills spec["codes"],
    spec["outliers"] ([rows, width]) and, per statistic, spec["scale"] / spec["zero"]: (codes [rows, groups],
    step, low [rows / 16, groups]) or float16-rounded values [rows, groups]."""
    rows, width = block.shape
    if rows % BLOCK_ROWS:
        raise ValueError(f"the fused SpQR block takes a multiple of {BLOCK_ROWS} rows, not {rows}")
    group = spec["group"]
    groups = -(-width // group)
    device = block.device
    statistics = {}
    for name in ("scale", "zero"):
        second = spec[f"qq_{name}_bits"] is not None
        statistics[name] = (torch.empty(rows, groups, device=device),
                            torch.empty(rows // BLOCK_ROWS if second else 1, groups, device=device),
                            torch.empty(rows // BLOCK_ROWS if second else 1, groups, device=device))
    keep = spec.get("keep")
    keep_tile = torch.empty(1, device=device) if keep is None else keep.float().contiguous()
    block = block.contiguous()
    hinv_block = hinv_block.contiguous()
    q, e, codes, outliers = (torch.empty_like(block) for _ in range(4))
    _spqr_block[(rows // BLOCK_ROWS,)](
        block, hinv_block, q, e, keep_tile, codes, outliers, *statistics["scale"], *statistics["zero"],
        float(spec["threshold"]), width, width, hinv_block.shape[1], groups,
        GROUP=group, MAXQ=2 ** spec["bits"] - 1, QQ_SCALE=spec["qq_scale_bits"] or 0, QQ_ZERO=spec["qq_zero_bits"] or 0,
        LOO=bool(spec["leave_one_out"]), HAS_KEEP=keep is not None, BLOCK_R=BLOCK_ROWS, BW=max(16, triton.next_power_of_2(width)),
        num_warps=4, enable_fp_fusion=False)
    fixed.copy_(q)
    errors.copy_(e)
    spec["codes"], spec["outliers"] = codes, outliers > 0
    for name in ("scale", "zero"):
        values, step, low = statistics[name]
        spec[name] = (values, step, low) if spec[f"qq_{name}_bits"] is not None else values
