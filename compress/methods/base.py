"""What every method shares: typed parameters with target selection, and the per-target contract.

A method's core is a pure function over tensors (`compress_target`: weight + statistics + previous
mask -> new weight + mask). The layer-wise engine connects it to the model: it gathers the statistics
the method names in `statistics` and hands each target over in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from compress.formats.packed_file import QuantizedWeight
from compress.model.targets import Target


class TargetSelection(BaseModel):
    """Which targets a stage compresses: glob patterns (or `re:` regexes) over target names.

    Targets are the Linear layers and fused MoE experts inside the model's repeated blocks; lm_head,
    embeddings, norms and MoE routers are never targets. A pattern that matches nothing is an error.
    """

    model_config = ConfigDict(extra="forbid")

    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)


class StageParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: TargetSelection = Field(default_factory=TargetSelection)

    def check_target(self, target: Target) -> None:
        """Raise CompressError if these parameters do not fit the target's shape (an N:M group or a
        quantization group that does not divide its input size, ...)."""


@dataclass
class TargetResult:
    weight: torch.Tensor
    mask: torch.Tensor | None = None  # True where a weight is kept
    quantized: QuantizedWeight | None = None  # the packed form, for methods that quantize


class Method:
    """Base of registered methods. Subclasses set `name`, `Params`, `statistics`."""

    name: ClassVar[str]
    Params: ClassVar[type[StageParams]] = StageParams
    # Per-target calibration statistics the method needs (see compress.calibration.statistics); empty means the
    # method needs no calibration data and the engine skips the forward passes.
    statistics: ClassVar[tuple[str, ...]] = ()
    # A method that refines the mask of an earlier pruning stage (DSnoT): planning checks that an
    # earlier stage pruned each of its targets, and the engine hands it each target's weights as they
    # were before the first stage touched them (`dense`).
    refines_mask: ClassVar[bool] = False

    def __init__(self, params: StageParams) -> None:
        self.params = params

    def restrict_targets(self, targets: list[Target]) -> list[Target]:
        """The targets the method actually works on, out of those the stage selected."""
        return targets

    def check_target(self, target: Target) -> None:
        """Raise CompressError if the method cannot handle this target (checked before calibration)."""
        self.params.check_target(target)

    def bind_mask_pattern(self, pattern: str) -> None:
        """For `refines_mask` methods: the sparsity pattern of the earlier stage's masks."""

    def compress_target(
        self,
        weight: torch.Tensor,
        statistics: dict[str, torch.Tensor],
        mask: torch.Tensor | None,
        dense: torch.Tensor | None = None,
    ) -> TargetResult:
        """weight: the target as it stands (fp32); statistics: what `statistics` names, empty when no
        calibration token reached the target; mask: the earlier stages' (True = kept) or None; dense:
        the weight before any stage, given to `refines_mask` methods only."""
        raise NotImplementedError
