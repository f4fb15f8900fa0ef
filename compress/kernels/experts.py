"""Fused MoE experts with kernel-backed projections.

transformers 5 stores a layer's experts as 3-D parameters (Mixtral, Qwen2/3-MoE, ...: `gate_up_proj`
[E, 2I, H] and `down_proj` [E, H, I]) and runs them in a loop over the experts a batch hits. A packed
export stores each expert's projection in its own format (`<experts>.<e>.<param>.<field>`, the target's
name), so `PackedExperts` holds, per fused parameter, either one kernel-backed module per expert (child
`<e>`, attribute `<param>`: the same names, so the file's keys load by name) or, where the export kept
it dense, the fused parameter itself. Its forward is the eager loop of those models: gate and up from
one projection, act(gate) * up, down, weighted by the router and added per token.

Experts of another layout (biases, transposed weights, no gate_up/down pair) are not taken: `supports`
says so and the export keeps them dense.
"""

from __future__ import annotations

import torch
from torch import nn

FUSED_PARAMS = ("gate_up_proj", "down_proj")


def supports(module: nn.Module) -> bool:
    """Whether `module` is a fused-experts module of the gate_up / down layout, without biases."""
    params = {name for name, p in module.named_parameters(recurse=False) if p.dim() == 3}
    others = {name for name, _ in module.named_parameters(recurse=False)} - params
    return params == set(FUSED_PARAMS) and not others and hasattr(module, "act_fn") and not getattr(module, "is_transposed", False)


class ExpertProjections(nn.Module):
    """One expert's packed projections (only those the export packed)."""


class PackedExperts(nn.Module):
    """A drop-in for a fused-experts module: forward(hidden_states, top_k_index, top_k_weights)."""

    def __init__(self, original: nn.Module, packed: dict[str, list[nn.Module]]) -> None:
        super().__init__()
        if not supports(original):
            raise ValueError(f"{type(original).__name__}: only fused experts with gate_up_proj and down_proj (no bias) take packed projections")
        self.num_experts = original.gate_up_proj.shape[0]
        self.act_fn = original.act_fn
        self.packed_params = tuple(sorted(packed))
        for name in FUSED_PARAMS:
            if name in packed:
                if len(packed[name]) != self.num_experts:
                    raise ValueError(f"{name}: {len(packed[name])} packed experts for {self.num_experts}")
            else:  # kept dense: the fused parameter as the checkpoint holds it
                setattr(self, name, getattr(original, name))
        for expert in range(self.num_experts):
            holder = ExpertProjections()
            for name in self.packed_params:
                holder.add_module(name, packed[name][expert])
            if self.packed_params:
                self.add_module(str(expert), holder)

    def project(self, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        if name in self.packed_params:
            return getattr(self._modules[str(expert)], name)(x)
        return nn.functional.linear(x, getattr(self, name)[expert])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.bincount(top_k_index.flatten(), minlength=self.num_experts)[: self.num_experts].nonzero().flatten().tolist()
        for expert in hit:
            token_idx, top_k_pos = torch.where(top_k_index == expert)
            state = hidden_states[token_idx]
            gate, up = self.project("gate_up_proj", expert, state).chunk(2, dim=-1)
            out = self.project("down_proj", expert, self.act_fn(gate) * up)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final
