"""Targets: the weight matrices a stage may compress, resolved before any calibration.

A target is a Linear layer inside one of the model's repeated blocks, or one expert of a fused MoE
parameter (transformers 5 stores experts as 3-D tensors, `experts.gate_up_proj` [E, 2I, H]): each
expert is its own target, named like the per-expert Linear it replaces
(`model.layers.0.mlp.experts.3.gate_up_proj`), so patterns written for either layout match.
lm_head, embeddings, norms and MoE routers that are not Linear layers (transformers 5's `TopKRouter`)
are never targets.

Gates and routers are left out by default. A Linear is a gate when its own name (the last part of its
module path) is `gate` or `router`, or ends in `_gate` or `_router` (Qwen2-MoE's `shared_expert_gate`,
a [1, hidden] Linear scaling the shared expert's output); `gate_proj` and `gate_up_proj` are MLP
weights, not gates. A gate is a target that `select` takes only when an include pattern both matches
its name and spells its own name out as the pattern's last dot-separated part, with no wildcard
(`*.shared_expert_gate`, `model.layers.0.mlp.shared_expert_gate`, `re:.*\\.shared_expert_gate`): `*`,
`*_gate` or `*.mlp.*` never take it. The layout lists every gate in `left_out` with that reason.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.errors import CompressError

ROUTER_NAMES = ("gate", "router")  # a module with this name inside a MoE block is its router
GATE_SUFFIXES = ("_gate", "_router")  # shared_expert_gate: a gate too (gate_proj, gate_up_proj are not)
ROUTER_REASON = "MoE router (kept dense: it decides which expert sees a token)"
GATE_REASON = "gate (kept dense: it decides how much of a branch's output a token gets)"
OPT_IN = "; compressed only when a stage's targets.include names it explicitly"


def is_gate_name(leaf: str) -> bool:
    """Whether a module's own name makes it a gate or router (see the module docstring)."""
    return leaf in ROUTER_NAMES or leaf.endswith(GATE_SUFFIXES)


@dataclass(eq=False)
class Target:
    name: str
    module: nn.Module
    param_name: str  # "weight" for a Linear; the 3-D parameter's name for fused experts
    block: int
    expert: int | None = None
    gate: bool = False  # a gate or router: selected only when an include pattern names it explicitly

    @property
    def weight(self) -> torch.Tensor:
        """The [out, in] weight matrix (a view into the model's parameter; writes go to the model)."""
        data = getattr(self.module, self.param_name).data
        return data if self.expert is None else data[self.expert]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def numel(self) -> int:
        return self.weight.numel()

    @property
    def is_expert(self) -> bool:
        return self.expert is not None


@dataclass
class ModelLayout:
    """The repeated blocks of a model, every target inside them, and what is deliberately left out."""

    blocks_path: str
    blocks: nn.ModuleList
    targets: list[Target]
    left_out: dict[str, str] = field(default_factory=dict)  # name -> why it is not a target

    def by_block(self, targets: list[Target]) -> list[list[Target]]:
        grouped: list[list[Target]] = [[] for _ in self.blocks]
        for target in targets:
            grouped[target.block].append(target)
        return grouped


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated blocks holding most of the parameters (decoder or encoder layers)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 1:
            if len({type(child) for child in module}) != 1:
                continue
            count = sum(p.numel() for p in module.parameters())
            if best is None or count > best[0]:
                best = (count, name, module)
    if best is None:
        raise CompressError(f"{type(model).__name__}: found no list of repeated blocks (decoder or encoder layers)")
    return best[1], best[2]


def is_fused_experts(module: nn.Module) -> bool:
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def discover(model: nn.Module) -> ModelLayout:
    """Every Linear and fused expert inside the blocks; everything else named in `left_out`."""
    blocks_path, blocks = find_blocks(model)
    targets: list[Target] = []
    left_out: dict[str, str] = {}
    for index, block in enumerate(blocks):
        prefix = f"{blocks_path}.{index}"
        moe_parents = {
            name.rsplit(".", 1)[0] if "." in name else ""
            for name, module in block.named_modules()
            if is_fused_experts(module) or (name.endswith("experts") and isinstance(module, nn.ModuleList))
        }
        for name, module in block.named_modules():
            full = f"{prefix}.{name}"
            parent, _, leaf = name.rpartition(".")
            if isinstance(module, nn.Linear):
                gate = is_gate_name(leaf)
                if gate:
                    router = leaf in ROUTER_NAMES and parent in moe_parents
                    left_out[full] = (ROUTER_REASON if router else GATE_REASON) + OPT_IN
                targets.append(Target(full, module, "weight", index, gate=gate))
            elif is_fused_experts(module):
                for param_name, param in module.named_parameters(recurse=False):
                    if param.dim() != 3:
                        continue
                    for expert in range(param.shape[0]):
                        targets.append(Target(f"{full}.{expert}.{param_name}", module, param_name, index, expert))
            elif leaf in ROUTER_NAMES and parent in moe_parents:
                left_out[full] = ROUTER_REASON
    block_params = {id(p) for p in blocks.parameters()}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and not any(id(p) in block_params for p in module.parameters()):
            reason = "output head" if isinstance(module, nn.Linear) else "embedding"
            tied = isinstance(module, nn.Linear) and _is_tied_to_embedding(model, module)
            left_out[name] = reason + (" (tied to the input embeddings)" if tied else "") + ", outside the blocks"
    if not targets:
        raise CompressError(f"{type(model).__name__}: its blocks ({blocks_path}) hold no Linear layer or fused expert")
    return ModelLayout(blocks_path, blocks, targets, left_out)


def _is_tied_to_embedding(model: nn.Module, head: nn.Linear) -> bool:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings is not None and embeddings.weight.data_ptr() == head.weight.data_ptr()


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _names_gate(pattern: str, target: Target) -> bool:
    """Whether an include pattern takes a gate: it matches the gate's name and its last dot-separated
    part is the gate's own name, spelled out (no wildcard takes a gate)."""
    leaf = target.name.rpartition(".")[2]
    last = pattern[3:].replace("\\.", ".").rpartition(".")[2] if pattern.startswith("re:") else pattern.rpartition(".")[2]
    return last == leaf and _matches(pattern, target.name)


def _included(patterns: list[str], target: Target) -> bool:
    if target.gate:
        return any(_names_gate(p, target) for p in patterns)
    return any(_matches(p, target.name) for p in patterns)


def select(targets: list[Target], include: list[str], exclude: list[str], where: str = "targets") -> list[Target]:
    """Targets matching any include pattern and no exclude pattern; a pattern matching nothing is an
    error. A gate (`Target.gate`) is included only by a pattern that names it (see the module docstring)."""
    for kind, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as error:
                    raise CompressError(f"{where}.{kind}: bad regex {pattern!r}: {error}") from None
            matched = [t for t in targets if _matches(pattern, t.name)]
            if not matched:
                example = targets[0].name
                raise CompressError(
                    f"{where}.{kind} pattern {pattern!r} matches no target (target names look like {example!r})"
                )
            if kind == "include" and not any(_included([pattern], t) for t in matched):
                raise CompressError(
                    f"{where}.include pattern {pattern!r} matches only gates/routers ({matched[0].name}, ...), which are "
                    f"taken only by a pattern that spells out their own name, such as '*.{matched[0].name.rpartition('.')[2]}'"
                )
    chosen = [t for t in targets if _included(include, t) and not any(_matches(p, t.name) for p in exclude)]
    if not chosen:
        raise CompressError(f"{where}: include {include} minus exclude {exclude} leaves no target to compress")
    return chosen
