"""The learning-rate schedule: linear warmup, then cosine or linear decay to `min_lr_ratio` of the
peak (or constant)."""

from __future__ import annotations

import math

from compress.methods.training import TrainingParams


def learning_rate(step: int, params: TrainingParams) -> float:
    """The learning rate of optimizer step `step` (0-based) of `params.steps`."""
    peak, warmup = params.lr, params.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if params.schedule == "constant":
        return peak
    progress = (step - warmup) / max(params.steps - warmup - 1, 1)
    floor = peak * params.min_lr_ratio
    if params.schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
