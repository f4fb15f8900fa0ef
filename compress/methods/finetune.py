"""Fine-tuning that keeps the masks of earlier stages: the recovery training peers do after one-shot
pruning (the mask is fixed, the kept weights and everything else train), and, on a model no stage
pruned, plain continued training: the fair dense reference for a training method's budget.

A pruned weight's gradient is zeroed before each step and the weight re-zeroed after it, so every
zero stays exactly zero (and every N:M group valid) whatever the optimizer does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from compress.methods.base import CalibrationData, StageParams
from compress.methods.registry import register
from compress.methods.training import TrainingMethod, TrainingParams, TrainingTask
from compress.model.targets import Target

if TYPE_CHECKING:
    from compress.state import CompressionState


class FixedMaskTask(TrainingTask):
    def __init__(self, targets: list[Target], state: CompressionState) -> None:
        masks = {target.name: state.mask(target.name) for target in targets}
        self.kept = [(target, mask.to(target.weight.device)) for target in targets if (mask := masks[target.name]) is not None]

    def after_backward(self) -> None:
        for target, mask in self.kept:
            grad = getattr(target.module, target.param_name).grad
            if grad is not None:
                (grad if target.expert is None else grad[target.expert]).mul_(mask)

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        for target, mask in self.kept:
            target.weight.mul_(mask)


@register
class Finetune(TrainingMethod):
    name = "finetune"
    Params: ClassVar[type[StageParams]] = TrainingParams

    def apply(self, model: nn.Module, state: CompressionState, data: CalibrationData) -> CompressionState:
        task = FixedMaskTask(self.targets, state)
        result = data.train(model, task, self.params)
        data.info["training"] = result.summary()
        data.info["masks_kept"] = len(task.kept)
        return state
