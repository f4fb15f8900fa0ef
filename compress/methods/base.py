"""What every method shares: typed parameters with target selection, and the two kinds of method.

A per-target method (`TargetMethod`) is a pure function over tensors (`compress_target`: weight +
statistics + previous mask -> new weight + mask + packed form); the layer-wise engine connects it to
the model block by block, gathering exactly the statistics it names in `statistics`. A whole-model
method (`ModelMethod`: training stages) gets the model, the compression state and the calibration
data at once (`apply`) and returns the state. A method is registered by name (`@register`) in its own
file; nothing outside that file names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from compress.formats.quantized import QuantizedWeight
from compress.model.targets import Target

if TYPE_CHECKING:
    from compress.state import CompressionState


class TargetSelection(BaseModel):
    """Which targets a stage compresses: glob patterns (or `re:` regexes) over target names.

    Targets are the Linear layers and fused MoE experts inside the model's repeated blocks; lm_head,
    embeddings and norms are never targets. Gates and routers (`gate`, `router`, `*_gate` such as
    `shared_expert_gate`) are taken only by a pattern that spells out their name (`*.shared_expert_gate`),
    never through a wildcard (compress/model/targets.py). A pattern that matches nothing is an error.
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
    # what the method did instead when it could not do its own work on this target (a Hessian that
    # cannot be factored: round-to-nearest, magnitude pruning) and why; None when it did its own
    fallback: str | None = None


class Method:
    """Base of registered methods. Subclasses set `name`, `Params`, `statistics` and derive from one
    of the two kinds below."""

    name: ClassVar[str]
    Params: ClassVar[type[StageParams]] = StageParams
    # Per-target calibration statistics the method needs (see compress.calibration.statistics); empty means the
    # method needs no calibration data and the engine skips the forward passes.
    statistics: ClassVar[tuple[str, ...]] = ()
    # A method that refines the mask of an earlier pruning stage (DSnoT): planning checks that an
    # earlier stage pruned each of its targets, and the engine hands it each target's weights as they
    # were before the first stage touched them (`dense`).
    refines_mask: ClassVar[bool] = False
    # A training method (compress/methods/training.py): it reads the recipe's whole calibration text
    # through the shared training loop rather than the calibration windows.
    trains: ClassVar[bool] = False

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

    def mask_pattern(self) -> str | None:
        """The sparsity pattern the masks this method leaves follow (`unstructured`, `N:M`), or None
        for a method that prunes nothing: what a later refining stage and the audit check against."""
        return None

    def flops(self, target: Target, tokens: int) -> float:
        """A rough count of the floating-point work of compressing `target` with `tokens` calibration
        tokens (statistics aside): the plan's time estimate."""
        return 10.0 * target.out_features * target.in_features


class TargetMethod(Method):
    """A per-target method: the engine hands it each target in turn, block by block."""

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

    def compress_experts(self, weights: torch.Tensor, statistics: list[dict[str, torch.Tensor]], masks: torch.Tensor | None
                         ) -> list[TargetResult] | None:
        """Several experts of one fused MoE parameter at once (weights [E, out, in], fp32; masks [E, out,
        in] or None), as compress_target would one by one; None to have them taken one by one (the default)."""
        return None

    def compress_siblings(self, weights: list[torch.Tensor], statistics: dict[str, torch.Tensor], masks: list[torch.Tensor | None]
                          ) -> list[TargetResult] | None:
        """Targets that read the same input (q/k/v of one attention, gate/up of one MLP) at once, as
        compress_target would one by one: weights [out_i, in] (fp32), their shared statistics (one Hessian),
        each one's mask or None; None to have them taken one by one (the default)."""
        return None


def row_slices(weights: list[torch.Tensor]) -> list[slice]:
    """Where each weight's rows lie once the weights are concatenated along their rows."""
    bounds, start = [], 0
    for weight in weights:
        bounds.append(slice(start, start + weight.shape[0]))
        start += weight.shape[0]
    return bounds


def joint_mask(weights: list[torch.Tensor], masks: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The masks of weights concatenated along their rows (all kept where a weight has none); None if none has one."""
    if all(mask is None for mask in masks):
        return None
    return torch.cat([torch.ones_like(w, dtype=torch.bool) if m is None else m.to(w.device) for w, m in zip(weights, masks)])


@dataclass
class CalibrationData:
    """What a whole-model method gets besides the model: the calibration token batches, the device
    the model sits on and, for a training method, the shared training loop bound to the recipe's text,
    teacher and the stage's work folder (`train(model, task, params) -> TrainingResult`, see
    compress/train/loop.py). `info`: what the method reports about its work (the stage's step.json)."""

    batches: list[torch.Tensor]
    device: torch.device
    train: Callable[..., Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    output_dir: Path | None = None  # the stage's folder: files a method leaves beside the checkpoint (an adapter)


class ModelMethod(Method):
    """A whole-model method (training stages): it sees the model loaded whole, on its device, in its
    compute dtype, and the compression state of the earlier stages (masks to keep, packed forms), and
    returns the state after it. The stage step saves the model and the state it returns."""

    def apply(self, model: torch.nn.Module, state: CompressionState, data: CalibrationData) -> CompressionState:
        raise NotImplementedError
