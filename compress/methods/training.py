"""What training stages share below the training loop: their typed recipe parameters and the hooks
through which a method shapes the loop (`TrainingTask`).

A training method is a whole-model method (`ModelMethod`) whose `apply` builds a task and hands it to
the loop the stage step passes in (`CalibrationData.train`, compress/train/loop.py): data packing,
teacher, losses, accumulation, schedule, checkpoints and curves are the loop's; what the method adds
(a mask kept or recomputed, a sparsity-aware optimizer, learnable scales, a proximal step) is in
its task. Methods never import the loop itself (it sits in a higher layer of the package).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from compress.errors import CompressError
from compress.methods.base import ModelMethod, StageParams
from compress.model.targets import Target

ADAPTER_DIR = "adapter"  # where a stage that trains adapters leaves them unmerged (exported under the same name)


class TrainingParams(StageParams):
    """The training loop's parameters. Sequences of `seqlen` tokens are packed from the recipe's
    calibration text (all of it, not only the calibration windows); one optimizer step sees
    `batch_size * grad_accum` sequences. The loss is `ce_weight * CE + kl_weight * KL(teacher ||
    student) + feature_weight * (per-block normalised feature distance)`; the teacher is the model as
    loaded (`original`) or as the previous stage left it (`previous`)."""

    steps: PositiveInt = 200
    seqlen: PositiveInt = 256
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    lr: PositiveFloat = 1e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: NonNegativeInt = 10
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)  # the schedule ends at lr * min_lr_ratio
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = Field(default=1.0, ge=0)  # 0: no clipping
    ce_weight: float = Field(default=1.0, ge=0)
    kl_weight: float = Field(default=0.0, ge=0)
    feature_weight: float = Field(default=0.0, ge=0)
    kl_temperature: PositiveFloat = 1.0
    teacher: Literal["original", "previous"] = "original"
    log_every: PositiveInt = 10
    checkpoint_every: NonNegativeInt = 50  # steps between resumable checkpoints; 0: none
    seed: int = 0

    @model_validator(mode="after")
    def _some_loss(self) -> TrainingParams:
        if self.ce_weight + self.kl_weight + self.feature_weight == 0:
            raise ValueError("ce_weight, kl_weight and feature_weight are all 0: nothing to train on")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")
        if self.warmup_steps >= self.steps and self.warmup_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps ({self.steps})")
        return self

    @property
    def resident_bytes_per_param(self) -> float:
        """Bytes a parameter takes while training: fp32 weight, gradient and two optimizer moments."""
        return 16.0

    @property
    def uses_teacher(self) -> bool:
        return self.kl_weight > 0 or self.feature_weight > 0


class TrainingTask:
    """A training method's hooks into the shared loop; each default does what plain training does.

    Call order per optimizer step: `before_step` -> forward/backward over the accumulated micro-batches
    -> `after_backward` -> gradient clipping -> optimizer step -> `after_step`. `state_dict` holds
    whatever of the task a resumed run needs beyond the model's parameters and the optimizer's state."""

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters to train (default: all of the model's)."""
        return [p for p in model.parameters() if p.requires_grad]

    def optimizer(self, parameters: list[torch.nn.Parameter], params: TrainingParams) -> torch.optim.Optimizer:
        return torch.optim.AdamW(parameters, lr=params.lr, betas=params.betas, weight_decay=params.weight_decay)

    def before_step(self, step: int, total: int) -> None:
        """Before optimizer step `step` (0-based) of `total`."""

    def after_backward(self) -> None:
        """Gradients are complete (accumulated, unclipped)."""

    def after_step(self, step: int, total: int) -> None:
        """After optimizer step `step` updated the parameters."""

    def metrics(self) -> dict[str, float]:
        """Extra numbers logged with the loss at each logging interval."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TrainingMethod(ModelMethod):
    """A whole-model method that trains through the shared loop."""

    Params: ClassVar[type[StageParams]] = TrainingParams
    trains: ClassVar[bool] = True
    # what the method does to Linear layers (`trains`, `adapts`) when it cannot work on fused MoE expert
    # tensors: those are refused before any work, with their names; None: every target is taken
    linear_only: ClassVar[str | None] = None

    def restrict_targets(self, targets: list[Target]) -> list[Target]:
        fused = [t.name for t in targets if t.is_expert or not isinstance(t.module, torch.nn.Linear)]
        if self.linear_only and fused:
            raise CompressError(f"{self.name} {self.linear_only} Linear layers; {fused[0]} ({len(fused)} targets) is a fused MoE "
                                f"expert tensor: exclude the experts (targets.exclude)")
        self.targets = targets  # bound to the model the stage loaded: apply works on these
        return targets

    def flops(self, target: Any, tokens: int) -> float:
        params: TrainingParams = self.params  # type: ignore[assignment]
        trained = params.steps * params.batch_size * params.grad_accum * params.seqlen
        return 8.0 * target.out_features * target.in_features * trained  # forward, backward, teacher
