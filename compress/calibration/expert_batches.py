"""Targets compressed together, for a method that can, so a GPU runs large kernels and the per-column
Python overhead is paid once:
- the experts of one fused MoE parameter (`compress_experts`, e.g. QMoE's batched ternary sweep): one pass
  over [E, out, in] instead of E passes, each expert with its own statistics;
- siblings, the targets that read the same input (q/k/v of one attention, gate/up of one MLP) and so share
  one Hessian (`compress_siblings`, GPTQ and SparseGPT): one factorization and one sweep over their rows.
Each target keeps its own mask; the engine records the results target by target as if they had come one at
a time."""

from __future__ import annotations

import os
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


def sibling_groups(method: TargetMethod, targets: list[Target], statistics: dict[str, dict[str, torch.Tensor]]) -> list[list[Target]]:
    """The targets (not experts) whose Hessian is one tensor, two at least (the statistics pass gives siblings that read
    the same input the same one), in target order; none for a method without compress_siblings or
    COMPRESS_JOINT_SIBLINGS=0 (one target at a time, e.g. to compare)."""
    if type(method).compress_siblings is TargetMethod.compress_siblings or os.environ.get("COMPRESS_JOINT_SIBLINGS") == "0":
        return []
    groups: dict[int, list[Target]] = {}
    for target in targets:
        hessian = statistics.get(target.name, {}).get("hessian")
        if hessian is not None and not target.is_expert:
            groups.setdefault(id(hessian), []).append(target)
    return [group for group in groups.values() if len(group) > 1]


def joint_groups(method: TargetMethod, targets: list[Target], statistics: dict[str, dict[str, torch.Tensor]]) -> list[list[Target]]:
    """Every batch of targets the engine offers the method at once: expert batches and sibling groups."""
    return expert_groups(method, targets) + sibling_groups(method, targets, statistics)


def joint_results(method: TargetMethod, targets: list[Target], statistics: dict[str, dict[str, torch.Tensor]],
                  state: CompressionState) -> tuple[dict[str, TargetResult], dict[str, float]]:
    """({target: its result}, {target: seconds, its share of its batch}) for the targets the method took
    together; the others (and every target of a method that takes none together) are absent."""
    results: dict[str, TargetResult] = {}
    seconds: dict[str, float] = {}
    tagged = [(True, batch) for batch in expert_groups(method, targets)]
    tagged += [(False, batch) for batch in sibling_groups(method, targets, statistics)]
    for experts, batch in tagged:
        masks = [state.mask(t.name, t.weight.device) for t in batch]
        start = time.perf_counter()
        if experts:
            if len({m is None for m in masks}) > 1:  # masked and unmasked mixed
                continue
            weights = torch.stack([t.weight.float() for t in batch])
            stacked = None if masks[0] is None else torch.stack(masks).to(weights.device)
            found = method.compress_experts(weights, [statistics.get(t.name, {}) for t in batch], stacked)
        else:
            found = method.compress_siblings([t.weight.float() for t in batch], statistics[batch[0].name], masks)
        if found is None:
            continue
        share = (time.perf_counter() - start) / len(batch)
        for target, result in zip(batch, found, strict=True):
            results[target.name], seconds[target.name] = result, share
    return results, seconds
