"""CAST, continuous N:M sparsity-aware training (Huang et al. 2025, arXiv 2509.25996; predecessor AST,
thu-ml/Adaptive-Sparse-Trainer).

The forward pass stays dense while training. Every `mask_interval` steps (the paper's T1 = 10) each
target's N:M mask is recomputed from the magnitudes; AdamS (compress/methods/adams.py) pulls the
weights that mask would prune toward zero with a strength ramping linearly from 0 to 1, so the model
slides into the pattern instead of being cut. Weight scaling: a learnable scale per row and group of
`scale_group_size` input columns (a multiple of M, so a scale never splits an N:M group), initialised
to 1, makes up for the magnitude the pull takes. Distillation from the dense model: by default
1/3 KL(teacher || student) + 2/3 CE (eta = 1/3). At the end the scales are folded into the weights,
the final mask is applied exactly and handed to the state, so later stages keep it.

`mask_score: activation` (ours, not the paper's) ranks the weights of each N:M group by |W| times the
root mean square of their input column over the training batches so far (Wanda's score, Sun et al.
2023) instead of |W| alone; the statistics come from forward hooks on the training passes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator
from torch import nn
from torch.nn.utils import parametrize

from compress.methods.adams import AdamS
from compress.methods.base import CalibrationData, StageParams
from compress.methods.registry import register
from compress.methods.sparsity import Pattern, check_nm_divisible, parse_pattern, prune_mask
from compress.methods.training import TrainingMethod, TrainingParams, TrainingTask
from compress.model.targets import Target

if TYPE_CHECKING:
    from compress.state import CompressionState


class CastParams(TrainingParams):
    """`pattern`: the N:M pattern to train into. `mask_interval`: steps between mask updates (T1).
    `decay`: the size of AdamS's pull on pruned weights (lambda). `weight_scaling`: learn the scales."""

    pattern: Pattern = "2:4"
    mask_interval: PositiveInt = 10
    decay: PositiveFloat = 1e-2
    weight_scaling: bool = True
    scale_group_size: PositiveInt = 64
    mask_score: Literal["magnitude", "activation"] = "magnitude"
    ce_weight: float = Field(default=2 / 3, ge=0)
    kl_weight: float = Field(default=1 / 3, ge=0)

    @field_validator("pattern")
    @classmethod
    def _structured(cls, value: str) -> str:
        if parse_pattern(value) is None:
            raise ValueError("cast trains into an N:M pattern such as '2:4'; for unstructured sparsity use a pruning method")
        return value

    @model_validator(mode="after")
    def _groups_align(self) -> CastParams:
        m = parse_pattern(self.pattern).m
        if self.scale_group_size % m:
            raise ValueError(f"scale_group_size ({self.scale_group_size}) must be a multiple of M={m}: a scale may not split an N:M group")
        return self

    def check_target(self, target: Target) -> None:
        check_nm_divisible(target, self.pattern)


class GroupScale(nn.Module):
    """The weight times a learnable scale per row and group of `group` input columns."""

    def __init__(self, rows: int, cols: int, group: int, device: torch.device) -> None:
        super().__init__()
        self.group, self.cols = group, cols
        self.scale = nn.Parameter(torch.ones(rows, math.ceil(cols / group), device=device))

    def expanded(self) -> torch.Tensor:
        return self.scale.repeat_interleave(self.group, dim=1)[:, : self.cols]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.expanded().to(weight.dtype)


class CastTask(TrainingTask):
    def __init__(self, targets: list[Target], params: CastParams, state: CompressionState) -> None:
        self.targets, self.params = targets, params
        self.earlier = {t.name: state.mask(t.name) for t in targets}  # zeros an earlier stage left stay zeros
        self.masks: dict[str, torch.Tensor] = {}
        self.flipped = 0.0
        self.optimizer_: AdamS | None = None
        self.input_square_sums: dict[str, torch.Tensor] = {}  # per target: sum of x^2 per input column
        self.hooks = []
        if params.mask_score == "activation":
            for target in targets:
                self.hooks.append(target.module.register_forward_pre_hook(self._count_inputs(target.name)))
        if params.weight_scaling:
            for target in targets:
                scale = GroupScale(*target.weight.shape, params.scale_group_size, target.weight.device)
                parametrize.register_parametrization(target.module, "weight", scale)

    def weight(self, target: Target) -> nn.Parameter:
        """The trained weight (under the scale, when there is one)."""
        module = target.module
        return module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight") else module.weight

    def optimizer(self, parameters: list[nn.Parameter], params: TrainingParams) -> torch.optim.Optimizer:
        self.optimizer_ = AdamS(parameters, lr=params.lr, betas=params.betas, weight_decay=params.weight_decay, decay=self.params.decay)
        return self.optimizer_

    def _count_inputs(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if module.training:
                with torch.no_grad():
                    squares = args[0].detach().float().reshape(-1, args[0].shape[-1]).pow(2).sum(dim=0)
                    total = self.input_square_sums.get(name)
                    self.input_square_sums[name] = squares if total is None else total + squares
        return hook

    def score(self, target: Target, weight: torch.Tensor) -> torch.Tensor:
        """What the mask keeps the largest of in each N:M group: |W|, or |W| times the input column's
        norm over the batches so far (its RMS up to a factor common to the whole target, which ranks alike;
        before any batch was seen: |W|)."""
        squares = self.input_square_sums.get(target.name)
        if squares is None:
            return weight.abs()
        return weight.abs() * squares.sqrt().to(weight.device)

    def _update_masks(self) -> None:
        changed = total = 0
        for target in self.targets:
            weight = self.weight(target).detach()
            mask = prune_mask(self.score(target, weight), 0.0, self.params.pattern, _on(self.earlier[target.name], weight))
            previous = self.masks.get(target.name)
            if previous is not None:
                changed += int((previous != mask).sum())
                total += mask.numel()
            self.masks[target.name] = mask
            self.optimizer_.pruned[self.weight(target)] = ~mask
        self.flipped = changed / total if total else 0.0

    def before_step(self, step: int, total: int) -> None:
        if step % self.params.mask_interval == 0 or not self.masks:
            self._update_masks()
        self.optimizer_.strength = step / max(total - 1, 1)

    def metrics(self) -> dict[str, float]:
        return {"mask_flipped": self.flipped, "decay_strength": self.optimizer_.strength}

    def state_dict(self) -> dict[str, object]:
        return {"masks": {name: mask.cpu() for name, mask in self.masks.items()}, "flipped": self.flipped,
                "input_square_sums": {name: sums.cpu() for name, sums in self.input_square_sums.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        masks: dict[str, torch.Tensor] = state["masks"]  # type: ignore[assignment]
        self.flipped = float(state["flipped"])  # type: ignore[arg-type]
        self.input_square_sums = dict(state.get("input_square_sums", {}))  # type: ignore[arg-type]
        for target in self.targets:
            self.masks[target.name] = masks[target.name].to(self.weight(target).device)
            self.optimizer_.pruned[self.weight(target)] = ~self.masks[target.name]

    @torch.no_grad()
    def finish(self, state: CompressionState) -> None:
        """Fold the scales, prune exactly with the final mask, hand the masks to the state."""
        for hook in self.hooks:
            hook.remove()
        for target in self.targets:
            if parametrize.is_parametrized(target.module, "weight"):
                parametrize.remove_parametrizations(target.module, "weight", leave_parametrized=True)
            weight = target.weight
            mask = prune_mask(self.score(target, weight), 0.0, self.params.pattern, _on(self.earlier[target.name], weight))
            weight.mul_(mask)
            state.get(target.name).mask = mask.cpu()


def _on(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if mask is None else mask.to(like.device)


@register
class Cast(TrainingMethod):
    name = "cast"
    Params: ClassVar[type[StageParams]] = CastParams
    linear_only = "trains"

    def mask_pattern(self) -> str | None:
        return self.params.pattern

    def apply(self, model: nn.Module, state: CompressionState, data: CalibrationData) -> CompressionState:
        task = CastTask(self.targets, self.params, state)
        result = data.train(model, task, self.params)
        task.finish(state)
        data.info["training"] = result.summary()
        return state
