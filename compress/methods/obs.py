"""The Optimal Brain Surgeon column sweep shared by SparseGPT and GPTQ (and SpQR, QMoE after them).

Both references (IST-DASLab/sparsegpt `fasterprune`, IST-DASLab/gptq `fasterquant`) run the same
loop: factor the damped inverse Hessian once (upper Cholesky factor U, H^-1 = U^T U), then walk the
input columns left to right in blocks; each column is fixed to a new value (zero where pruned, a grid
point where quantized) and its error, scaled by U's diagonal, is spread over the columns not yet
fixed. Updates inside a block are immediate; the rest of the matrix gets them once per block ("lazy
batch" updates). What differs between methods is only how a column's new value is chosen: that is a
`ColumnRule`. This module holds the sweep once; methods bring their rule.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Protocol

import torch

from compress.errors import CompressError


class ColumnRule(Protocol):
    """How a method fixes each column. `block` is the live [rows, count] slice of the weights being
    swept (columns before `j` are already fixed, columns from `j` on carry the updates so far)."""

    def begin_block(self, start: int, block: torch.Tensor, hinv_block: torch.Tensor) -> None: ...

    def column(self, start: int, j: int, block: torch.Tensor, hinv_block: torch.Tensor) -> torch.Tensor: ...


class HessianNotPositiveDefinite(CompressError):
    """The damped Hessian could not be factored even after the retries (a NaN, a degenerate input, too
    little calibration data): a method falls back to its data-free form on that target."""


@dataclass
class InverseHessian:
    factor: torch.Tensor  # upper Cholesky factor of the damped inverse Hessian
    dead: torch.Tensor  # bool [in]: inputs that were always zero on the calibration data
    damp: float  # the relative damping that made H positive definite


def obs_flops(rows: int, columns: int) -> float:
    """Rough work of one OBS sweep over a [rows, columns] weight: the updates and the inverse."""
    return 2.0 * rows * columns * columns + columns**3


def hessian_or_identity(statistics: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The target's X^T X, or the identity for an expert no calibration token reached: with H = I the
    sweep compensates nothing, and the method reduces to its data-free form (the report lists such
    targets)."""
    hessian = statistics.get("hessian")
    return torch.eye(weight.shape[1], device=weight.device) if hessian is None else hessian


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, retries: int = 4) -> InverseHessian:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, as both references compute it.

    Inputs that never fired (zero diagonal) get a unit diagonal so the matrix stays invertible; their
    weights do not affect the output on the calibration data. If H is not positive definite even after
    damping (rank-deficient calibration), the damping is raised tenfold, up to `retries` times; then
    HessianNotPositiveDefinite (a factor with NaN or inf counts as a failure too). A batch of Hessians
    [..., in, in] is factored at once (experts of one layer); every one must factor with the same damping.
    """
    hessian = hessian.float().clone()
    diagonal_view = hessian.diagonal(dim1=-2, dim2=-1)
    dead = diagonal_view == 0
    diagonal_view[dead] = 1
    mean_diagonal = torch.mean(diagonal_view.contiguous(), dim=-1, keepdim=True)
    for _attempt in range(retries + 1):
        damped = hessian.clone()
        damped.diagonal(dim1=-2, dim2=-1).add_(damp * mean_diagonal)
        lower, info = torch.linalg.cholesky_ex(damped)
        if not bool(info.any()):
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not bool(info.any()) and bool(torch.isfinite(upper).all()):
                return InverseHessian(upper, dead, damp)
        damp *= 10
    raise HessianNotPositiveDefinite(
        f"Hessian is not positive definite even with damping {damp / 10:g}: use more calibration samples"
    )


def fused_available(weight: torch.Tensor) -> bool:
    """Whether obs_sweep runs its blocks as one Triton kernel each (obs_fused): a CUDA weight, Triton
    installed, and COMPRESS_FUSED_SWEEP not "0" (the column loop in torch, e.g. to compare)."""
    return weight.is_cuda and os.environ.get("COMPRESS_FUSED_SWEEP") != "0" and importlib.util.find_spec("triton") is not None


def obs_sweep(weight: torch.Tensor, inverse: InverseHessian, rule: ColumnRule, block_size: int = 128, fused: bool | None = None) -> torch.Tensor:
    """Fix every column of `weight` ([out, in], float32, modified in place) by `rule`, compensating
    each column's error on the columns after it. Returns the per-row OBS loss sum (w - q)^2 / d^2 / 2.
    A batch of weights [..., out, in] with one inverse Hessian each ([..., in, in]) is swept together,
    the rule then fixing [..., out] values a column: the experts of one layer in one pass.
    `fused` (default: fused_available): a block whose rule has a `fused_spec` for it runs as one Triton
    kernel (obs_fused.sweep_block) instead of the column loop; the same results up to float rounding."""
    if weight.dtype != torch.float32:
        raise TypeError("obs_sweep works on float32 weights")
    fused = (fused_available(weight) if fused is None else fused) and weight.dim() in (2, 3) and hasattr(rule, "fused_spec")
    columns = weight.shape[-1]
    hinv = inverse.factor
    weight.masked_fill_(inverse.dead.unsqueeze(-2), 0)
    losses = torch.zeros(weight.shape[:-1], device=weight.device)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = weight[..., start:end].clone()
        fixed = torch.zeros_like(block)
        errors = torch.zeros_like(block)
        hinv_block = hinv[..., start:end, start:end]
        rule.begin_block(start, block, hinv_block)
        spec = rule.fused_spec(start, block) if fused else None
        if spec is not None:
            from compress.methods import obs_fused, spqr_fused

            kernel = spqr_fused if spec["mode"] == "spqr" else obs_fused
            kernel.sweep_block(block, hinv_block, fixed, errors, spec)
            rule.fused_result(start, spec)
        else:
            for j in range(end - start):
                value = rule.column(start, j, block, hinv_block)
                fixed[..., j] = value
                error = (block[..., j] - value) / hinv_block[..., j, j].unsqueeze(-1)
                block[..., j:].sub_(error.unsqueeze(-1) * hinv_block[..., j, j:].unsqueeze(-2))
                errors[..., j] = error
        losses += errors.pow(2).sum(dim=-1) / 2  # (w - q)^2 / d^2 / 2, summed per row
        weight[..., start:end] = fixed
        weight[..., end:] -= errors @ hinv[..., start:end, end:]
    return losses
