"""The training objective: weighted terms, each a function of the student's and the teacher's outputs.

  ce       next-token cross-entropy on the text
  kl       KL(teacher || student) of the next-token distributions, at a temperature (scaled by T^2)
  feature  per-block feature distillation: sum over blocks of mean((s - t)^2) / mean(t^2) of the
           block outputs (SquareHead, IST-DASLab/SparseFinetuning)

A term is looked up by name in LOSSES; its weight comes from the stage's `<name>_weight` parameter, and
a term of weight 0 is not computed (nor is the teacher, when no term needs it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress.methods.training import TrainingParams


@dataclass
class Outputs:
    logits: torch.Tensor  # [batch, seq, vocab]
    hidden: tuple[torch.Tensor, ...] | None = None  # each block's output, when a term needs them


def cross_entropy(student: Outputs, teacher: Outputs | None, ids: torch.Tensor, params: TrainingParams) -> torch.Tensor:
    logits = student.logits[:, :-1].flatten(0, 1).float()
    return F.cross_entropy(logits, ids[:, 1:].flatten())


def kl_to_teacher(student: Outputs, teacher: Outputs | None, ids: torch.Tensor, params: TrainingParams) -> torch.Tensor:
    t = params.kl_temperature
    log_student = F.log_softmax(student.logits.flatten(0, 1).float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher.logits.flatten(0, 1).float() / t, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * t * t


def feature_distance(student: Outputs, teacher: Outputs | None, ids: torch.Tensor, params: TrainingParams) -> torch.Tensor:
    total = torch.zeros((), device=student.logits.device)
    for s, t in zip(student.hidden, teacher.hidden, strict=True):
        t = t.float()
        total = total + (s.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
    return total


Loss = Callable[[Outputs, "Outputs | None", torch.Tensor, TrainingParams], torch.Tensor]
LOSSES: dict[str, tuple[Loss, bool]] = {  # name -> (function, needs the teacher)
    "ce": (cross_entropy, False),
    "kl": (kl_to_teacher, True),
    "feature": (feature_distance, True),
}


def weights(params: TrainingParams) -> dict[str, float]:
    """The terms with a non-zero weight."""
    return {name: w for name in LOSSES if (w := float(getattr(params, f"{name}_weight"))) > 0}


def objective(student: Outputs, teacher: Outputs | None, ids: torch.Tensor, params: TrainingParams) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum, and each term's value (for the curves)."""
    total, parts = None, {}
    for name, weight in weights(params).items():
        value = LOSSES[name][0](student, teacher, ids, params)
        parts[name] = float(value.detach())
        total = weight * value if total is None else total + weight * value
    return total, parts
