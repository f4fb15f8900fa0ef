"""AdamS, CAST's sparsity-aware optimizer (Huang et al. 2025, arXiv 2509.25996): Adam whose moment,
for the weights the current N:M mask would prune, is blended toward `decay * sign(w)`, an L1 pull to
zero, with a strength the caller ramps from 0 to 1 over training; the second moment is built from
that blended moment (as the predecessor AST, thu-ml/Adaptive-Sparse-Trainer, builds it from its
decayed moment), so the pull is normalised like any other update. Parameters without a mask (norms,
embeddings, scales) take plain Adam. Weight decay is decoupled, as AdamW's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.no_grad()
def adams_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
    pruned: torch.Tensor | None = None,
    strength: float = 0.0,
    decay: float = 0.0,
) -> None:
    """One AdamS step on `param` in place (step counts from 1). `pruned`: bool, True where the
    current mask would prune; None: a plain Adam(W) step."""
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    moment = exp_avg / (1 - beta1**step)
    if pruned is None:
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    else:
        if strength > 0:
            moment = torch.where(pruned, torch.lerp(moment, torch.sign(param).mul_(decay), strength), moment)
        exp_avg_sq.mul_(beta2).addcmul_(moment, moment, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
    if weight_decay:
        param.mul_(1 - lr * weight_decay)
    param.addcdiv_(moment, denom, value=-lr)


class AdamS(torch.optim.Optimizer):
    """`pruned[param]` (bool, True = pruned by the current mask) and `strength` are set by the caller
    as the mask and the ramp move; both are the caller's state, not the optimizer's."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decay: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "decay": decay})
        self.pruned: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.strength = 0.0

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                adams_update(param, param.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"]), lr=group["lr"],
                             betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                             pruned=self.pruned.get(param), strength=self.strength, decay=group["decay"])
