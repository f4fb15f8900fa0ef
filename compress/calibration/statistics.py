"""Per-target calibration statistics, gathered by hooks while a block runs on calibration data.

Each statistic folds the target's input activations X ([tokens, in_features]) into a running value.
Methods name what they need (`Method.statistics`); the engine gathers only that. Fused MoE experts
get only the tokens routed to them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from compress.calibration.distributed import sum_over_processes, total_over_processes
from compress.errors import CompressError
from compress.model.targets import Target


class Statistic:
    def update(self, inputs: torch.Tensor) -> None:
        raise NotImplementedError

    def value(self) -> torch.Tensor:
        raise NotImplementedError

    def totals(self) -> list[torch.Tensor]:
        """The running sums, in a fixed order: a data-parallel run adds them up over its processes."""
        raise NotImplementedError


class InputSqNorm(Statistic):
    """Sum over tokens of x_j^2 per input feature: ||X_j||_2^2, Wanda's activation norm (fp32)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.total = torch.zeros(in_features, dtype=torch.float32, device=device)

    def update(self, inputs: torch.Tensor) -> None:
        self.total += inputs.float().pow(2).sum(dim=0)

    def value(self) -> torch.Tensor:
        return self.total

    def totals(self) -> list[torch.Tensor]:
        return [self.total]


class InputMean(Statistic):
    """Mean of each input feature over the calibration tokens (DSnoT's E[X_j]); float64 sums."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, inputs: torch.Tensor) -> None:
        self.sum += inputs.double().sum(dim=0)
        self.count += inputs.shape[0]

    def value(self) -> torch.Tensor:
        return (self.sum / self.count.clamp_min(1)).float()

    def totals(self) -> list[torch.Tensor]:
        return [self.sum, self.count]


class InputVariance(Statistic):
    """Variance of each input feature over the calibration tokens (DSnoT's Var(X_j)); float64 sums,
    population variance (divides by the token count)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.double()
        self.sum += x.sum(dim=0)
        self.sum_sq += x.pow(2).sum(dim=0)
        self.count += inputs.shape[0]

    def value(self) -> torch.Tensor:
        count = self.count.clamp_min(1)
        mean = self.sum / count
        return (self.sum_sq / count - mean.pow(2)).clamp_min(0).float()

    def totals(self) -> list[torch.Tensor]:
        return [self.sum, self.sum_sq, self.count]


@contextmanager
def tensor_core_fp32() -> Iterator[None]:
    """fp32 matmuls on TF32 tensor cores for this block only. For inputs that were bf16 or fp16 this is
    exact: their values keep all their bits in TF32 (10 mantissa bits), each product is exact in fp32 and
    the sums are fp32, so X^T X is the fp32 result up to summation order (~8x faster on an H200)."""
    matmul = torch.backends.cuda.matmul
    try:
        before = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
    except (AttributeError, RuntimeError):  # an older torch, or precision set through the legacy flags: left as it is
        before = None
    try:
        yield
    finally:
        if before is not None:
            matmul.fp32_precision = before


class Hessian(Statistic):
    """X^T X over the calibration tokens ([in, in], fp32): the layer-wise reconstruction Hessian
    of SparseGPT, GPTQ, SpQR (up to the factor 2/n, which their relative damping cancels)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.total = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.float()
        if inputs.is_cuda and inputs.dtype in (torch.bfloat16, torch.float16):
            with tensor_core_fp32():
                self.total.addmm_(x.T, x)
        else:
            self.total.addmm_(x.T, x)

    def value(self) -> torch.Tensor:
        return self.total

    def totals(self) -> list[torch.Tensor]:
        return [self.total]


STATISTICS: dict[str, type[Statistic]] = {
    "input_sq_norm": InputSqNorm,
    "input_mean": InputMean,
    "input_variance": InputVariance,
    "hessian": Hessian,
}


class TargetStatistics:
    """The statistics of one target and how many calibration tokens reached it."""

    def __init__(self, target: Target, names: tuple[str, ...]) -> None:
        device = target.weight.device
        self.tokens = 0
        self.parts = {name: STATISTICS[name](target.in_features, device) for name in names}
        # Set when every input this target saw was the very tensor another target had already folded
        # in (q/k/v, gate/up share their input): the statistics are that target's, computed once.
        self.same_as: TargetStatistics | None = None

    def update(self, inputs: torch.Tensor) -> None:
        if inputs.shape[0] == 0:
            return
        self.tokens += inputs.shape[0]
        for statistic in self.parts.values():
            statistic.update(inputs)

    def sum_over_processes(self) -> None:
        """A data-parallel run: the token count and the sums become those of every process's batches."""
        self.tokens = total_over_processes(self.tokens)
        if self.same_as is None:
            sum_over_processes([total for statistic in self.parts.values() for total in statistic.totals()])

    def values(self) -> dict[str, torch.Tensor]:
        """Empty when no token reached the target (an expert the router never chose)."""
        if self.same_as is not None:
            return self.same_as.values()
        return {name: s.value() for name, s in self.parts.items()} if self.tokens else {}


class _SharedInputs:
    """Which target first folded in each live input tensor, so siblings reading the same tensor
    (q/k/v of one attention, gate/up of one MLP) reuse its statistics instead of recomputing them
    (an [in, in] Hessian costs tokens x in^2 multiply-adds)."""

    def __init__(self) -> None:
        self._first: dict[int, tuple[weakref.ref, TargetStatistics]] = {}

    def owner(self, inputs: torch.Tensor, stats: TargetStatistics) -> TargetStatistics:
        entry = self._first.get(id(inputs))
        if entry is not None and entry[0]() is inputs:
            return entry[1]
        self._first[id(inputs)] = (weakref.ref(inputs), stats)
        return stats


@contextmanager
def gather(targets: list[Target], names: tuple[str, ...]) -> Iterator[dict[str, TargetStatistics]]:
    """Hooks that fold every forward's inputs into each target's statistics while the block runs."""
    collected = {t.name: TargetStatistics(t, names) for t in targets}
    shared = _SharedInputs()
    handles = []
    experts: dict[int, list[Target]] = {}
    for target in targets:
        if target.is_expert:
            experts.setdefault(id(target.module), []).append(target)
        else:
            handles.append(target.module.register_forward_hook(_linear_hook(collected[target.name], target.in_features, shared)))
    for group in experts.values():
        handles.append(group[0].module.register_forward_pre_hook(_experts_hook(group, collected), with_kwargs=True))
    try:
        yield collected
    finally:
        for handle in handles:
            handle.remove()


def _linear_hook(stats: TargetStatistics, in_features: int, shared: _SharedInputs):
    calls = 0

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal calls
        owner = shared.owner(args[0], stats)
        if calls == 0 and owner is not stats:
            stats.same_as = owner
        calls += 1
        if stats.same_as is None:
            stats.update(args[0].detach().reshape(-1, in_features))
        elif owner is not stats.same_as:  # shared the first input but not this one: cannot happen in one block
            raise RuntimeError("a target's inputs were shared with another target only in part")
        else:
            stats.tokens += args[0].numel() // in_features

    return hook


def _experts_hook(targets: list[Target], collected: dict[str, TargetStatistics]):
    """Route each expert's tokens to its targets, as the transformers 5 fused-experts forward does:
    gate_up_proj sees the routed hidden states, down_proj sees act(gate) * up of them."""
    module = targets[0].module
    if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
        raise CompressError(f"{type(module).__name__}: only [gate; up] concatenated, untransposed expert layouts are supported")
    by_expert: dict[int, dict[str, Target]] = {}
    for target in targets:
        if target.param_name not in ("gate_up_proj", "up_proj", "down_proj"):
            raise CompressError(f"{target.name}: fused expert parameter {target.param_name!r} is not supported yet")
        by_expert.setdefault(target.expert, {})[target.param_name] = target

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
        hidden, top_k_index = values[0].detach(), values[1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for expert, parts in by_expert.items():
            tokens = (top_k_index == expert).any(dim=-1).nonzero().squeeze(-1)
            routed = hidden[tokens]
            first = parts.get("gate_up_proj") or parts.get("up_proj")
            if first is not None:
                collected[first.name].update(routed)
            if "down_proj" in parts:
                collected[parts["down_proj"].name].update(_expert_hidden(module, expert, routed))

    return hook


def _expert_hidden(module: nn.Module, expert: int, routed: torch.Tensor) -> torch.Tensor:
    if hasattr(module, "gate_up_proj"):
        gate, up = nn.functional.linear(routed, module.gate_up_proj[expert]).chunk(2, dim=-1)
        return module.act_fn(gate) * up
    return module.act_fn(nn.functional.linear(routed, module.up_proj[expert]))
