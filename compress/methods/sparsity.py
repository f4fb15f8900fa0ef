"""Shared pruning core: the sparsity pattern, the mask from scores, and the stage parameters.

Magnitude and Wanda differ only in their score; DSnoT and SparseGPT reuse the pattern and the mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BeforeValidator, Field, model_validator

from compress.errors import CompressError
from compress.methods.base import StageParams, TargetMethod
from compress.model.targets import Target

_NM = re.compile(r"^(\d+):(\d+)$")


def _check_pattern(value: object) -> str:
    text = str(value).strip()
    if text == "unstructured":
        return text
    match = _NM.match(text)
    if not match:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {value!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"{text!r}: N:M needs 0 < N < M (keep N of every M weights)")
    return text


Pattern = Annotated[str, BeforeValidator(_check_pattern)]


@dataclass(frozen=True)
class NM:
    n: int  # kept weights per group
    m: int  # group size along the input dimension


def parse_pattern(pattern: str) -> NM | None:
    """None for unstructured, else the N:M group."""
    if pattern == "unstructured":
        return None
    n, m = pattern.split(":")
    return NM(int(n), int(m))


class PruningParams(StageParams):
    """`sparsity`: fraction of each target's weights set to zero. `pattern`: `unstructured` or `N:M`
    (keep N of every M consecutive input weights; fixes sparsity at (M-N)/M)."""

    sparsity: float | None = Field(default=None, gt=0, lt=1)
    pattern: Pattern = "unstructured"

    @model_validator(mode="before")
    @classmethod
    def _sparsity_message(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("sparsity"), (int, float)) and not 0 < data["sparsity"] < 1:
            raise ValueError(f"sparsity must be a fraction in (0, 1), got {data['sparsity']}")
        return data

    @model_validator(mode="after")
    def _resolve_sparsity(self) -> PruningParams:
        group = parse_pattern(self.pattern)
        if group is None:
            if self.sparsity is None:
                self.sparsity = 0.5
        else:
            implied = (group.m - group.n) / group.m
            if self.sparsity is None:
                self.sparsity = implied
            elif abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern} fixes sparsity at {implied:g}, got sparsity {self.sparsity:g}: "
                    f"drop `sparsity` or set it to {implied:g}"
                )
        return self

    def check_target(self, target: Target) -> None:
        check_nm_divisible(target, self.pattern)


class PruningMethod(TargetMethod):
    """A per-target method that prunes with `PruningParams`: its masks follow the stage's pattern."""

    params: PruningParams

    def mask_pattern(self) -> str | None:
        return self.params.pattern


def check_nm_divisible(target: Target, pattern: str) -> None:
    group = parse_pattern(pattern)
    if group is not None and target.in_features % group.m:
        raise CompressError(
            f"target {target.name}: input size {target.in_features} is not divisible by M={group.m} "
            f"of pattern {pattern}; exclude it (targets.exclude) or use another pattern"
        )


def prune_mask(
    scores: torch.Tensor,
    sparsity: float,
    pattern: str,
    previous_mask: torch.Tensor | None = None,
    scope: Literal["row", "layer"] = "row",
) -> torch.Tensor:
    """Mask (True = keep) that removes the lowest-scoring weights.

    Unstructured: `sparsity` of each output row (scope "row", as Wanda) or of the whole layer (scope
    "layer", as the magnitude baseline of the Wanda reference). N:M: the M-N lowest of every M
    consecutive input weights. Weights already pruned by an earlier stage stay pruned.
    """
    scores = scores.float()
    if previous_mask is not None:
        scores = scores.masked_fill(~previous_mask, float("-inf"))
    rows, cols = scores.shape
    group = parse_pattern(pattern)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if group is not None:
        grouped = scores.reshape(rows, cols // group.m, group.m)
        pruned = torch.topk(grouped, group.m - group.n, dim=-1, largest=False).indices
        mask.view(rows, cols // group.m, group.m).scatter_(-1, pruned, False)
    elif scope == "row":
        count = int(cols * sparsity)
        pruned = torch.sort(scores, dim=1, stable=True).indices[:, :count]
        mask.scatter_(1, pruned, False)
    else:
        count = int(scores.numel() * sparsity)
        pruned = torch.sort(scores.flatten(), stable=True).indices[:count]
        mask.view(-1)[pruned] = False
    if previous_mask is not None:
        mask &= previous_mask
    return mask
