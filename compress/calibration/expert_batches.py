"""The experts of one fused MoE parameter compressed together, for a method that can (`compress_experts`,
e.g. QMoE's batched ternary sweep): one pass over [E, out, in] instead of E passes, so a GPU runs
large kernels and the per-column Python overhead is paid once. Each expert keeps its own statistics
and mask; the engine records the results target by target as if they had come one at a time."""

from __future__ import annotations

import time

import torch

from compress.methods.base import TargetMethod, TargetResult
from compress.model.targets import Target
from compress.state import CompressionState

HESSIAN_BYTES = 1 << 30  # stacked Hessians a batch holds at most (4096 inputs: 16 experts; 14336: 1, i.e. one at a time)


def expert_groups(method: TargetMethod, targets: list[Target]) -> list[list[Target]]:
    """The batches of experts the engine offers `method.compress_experts`: the experts of one fused parameter,
    HESSIAN_BYTES' worth at a time, two at least; none for a method without compress_experts. Re-grouping
    any set of whole batches gives those batches again (every batch but a parameter's last is full)."""
    if type(method).compress_experts is TargetMethod.compress_experts:
        return []
    groups: dict[tuple[int, str], list[Target]] = {}
    for target in targets:
        if target.is_expert:
            groups.setdefault((id(target.module), target.param_name), []).append(target)
    batches = []
    for group in groups.values():
        per_batch = max(1, HESSIAN_BYTES // (4 * group[0].in_features ** 2))
        batches += [group[first : first + per_batch] for first in range(0, len(group), per_batch)]
    return [batch for batch in batches if len(batch) > 1]


def expert_batches(method: TargetMethod, targets: list[Target], statistics: dict[str, dict[str, torch.Tensor]],
                   state: CompressionState) -> tuple[dict[str, TargetResult], dict[str, float]]:
    """({target: its result}, {target: seconds, its share of its batch}) for the experts the method took
    in batches; the other targets (and every target of a method without compress_experts) are absent."""
    results: dict[str, TargetResult] = {}
    seconds: dict[str, float] = {}
    for batch in expert_groups(method, targets):
        masks = [state.mask(t.name, t.weight.device) for t in batch]
        if len({m is None for m in masks}) > 1:  # masked and unmasked mixed
            continue
        start = time.perf_counter()
        weights = torch.stack([t.weight.float() for t in batch])
        stacked = None if masks[0] is None else torch.stack(masks).to(weights.device)
        found = method.compress_experts(weights, [statistics.get(t.name, {}) for t in batch], stacked)
        if found is None:
            continue
        share = (time.perf_counter() - start) / len(batch)
        for target, result in zip(batch, found):
            results[target.name], seconds[target.name] = result, share
    return results, seconds
