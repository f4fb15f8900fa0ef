"""Sparse LoRA: recovery fine-tuning of a pruned model through low-rank adapters that keeps its mask.

`peft` LoRA adapters (W + scale * B A) train on the targets while the base stays frozen, on the
recipe's text, by default with cross-entropy plus SquareHead distillation from the model as loaded
(per block: mean((s - t)^2) / mean(t^2); IST-DASLab/SparseFinetuning). peft's own merge adds the
dense delta and so fills every pruned weight; here the merge is W' = M * (W + scale * B A) with the
mask M of the earlier stages, so every zero stays zero and every N:M group stays valid. The adapter is
also kept unmerged in peft's format (the stage's `adapter/`, exported as `adapter/`), relative to the
model the stage started from.

SoRA (Ding et al. 2023, TsinghuaC3I/SoRA), with `sora: true`: a gate vector between A and B, trained
with a proximal step (soft threshold lr * sora_lambda after each optimizer step); ranks whose gate
reached zero are removed at the end and the gate folded into B, so the adapter has the smaller rank.

`base_quantization: nf4` trains the adapters over a frozen NF4 copy of the targets (bitsandbytes,
compress/methods/quantized_base.py) for training memory; the merge goes into the full-precision weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt
from torch import nn

from compress.errors import CompressError
from compress.methods.base import CalibrationData, StageParams
from compress.methods.registry import register
from compress.methods.training import ADAPTER_DIR, TrainingMethod, TrainingParams, TrainingTask
from compress.model.targets import Target

if TYPE_CHECKING:
    from compress.state import CompressionState


class SparseLoraParams(TrainingParams):
    """`rank`, `alpha` (scale = alpha / rank), `dropout`: the adapters. `sora`: learn a gate per rank
    and drop the ranks it closes (`sora_lambda`: the soft threshold per unit of learning rate)."""

    rank: PositiveInt = 16
    alpha: PositiveFloat = 16.0
    dropout: float = Field(default=0.0, ge=0, lt=1)
    sora: bool = False
    sora_lambda: float = Field(default=0.1, ge=0)
    lr: PositiveFloat = 2e-4
    feature_weight: float = Field(default=1.0, ge=0)
    base_quantization: Literal["none", "nf4"] = "none"

    @property
    def resident_bytes_per_param(self) -> float:
        """The frozen base: fp32 (4 bytes a weight) or NF4 codes with their block scales (~0.56)."""
        return 0.5625 if self.base_quantization == "nf4" else 4.0


class LoraTask(TrainingTask):
    def __init__(self, model: nn.Module, targets: list[Target], params: SparseLoraParams) -> None:
        from compress.methods.quantized_base import quiet_hub_kernel_notice

        quiet_hub_kernel_notice()  # before peft imports bitsandbytes
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise CompressError("sparse_lora needs the `peft` package: pip install peft") from None

        self.targets, self.params = targets, params
        self.full_precision: dict[str, nn.Linear] = {}  # with an NF4 base: the layers it replaced, their weights on the CPU
        if params.base_quantization == "nf4":
            from compress.methods.quantized_base import to_nf4

            for target in targets:
                parent, _, child = target.name.rpartition(".")
                self.full_precision[target.name] = model.get_submodule(target.name)
                setattr(model.get_submodule(parent), child, to_nf4(self.full_precision[target.name]))
        config = LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout, target_modules=[t.name for t in targets])
        inject_adapter_in_model(config, model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)
        self.layers = {t.name: model.get_submodule(t.name) for t in targets}
        self.gates: dict[str, nn.Parameter] = {}
        if params.sora:
            for name, layer in self.layers.items():
                gate = nn.Parameter(torch.ones(params.rank, device=layer.lora_A["default"].weight.device))
                layer.register_parameter("sora_gate", gate)  # in the model's state_dict: checkpointed with it
                layer.lora_A["default"].register_forward_hook(lambda module, args, out, gate=gate: out * gate.to(out.dtype))
                self.gates[name] = gate
        self.optimizer_: torch.optim.Optimizer | None = None

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad] + list(self.gates.values())

    def optimizer(self, parameters: list[nn.Parameter], params: TrainingParams) -> torch.optim.Optimizer:
        gates = {id(g) for g in self.gates.values()}
        groups = [{"params": [p for p in parameters if id(p) not in gates], "weight_decay": params.weight_decay}]
        if gates:
            groups.append({"params": list(self.gates.values()), "weight_decay": 0.0})
        self.optimizer_ = torch.optim.AdamW(groups, lr=params.lr, betas=params.betas)
        return self.optimizer_

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        if not self.gates:
            return
        threshold = self.optimizer_.param_groups[-1]["lr"] * self.params.sora_lambda
        for gate in self.gates.values():  # the proximal step of the L1 penalty: soft thresholding
            gate.copy_(gate.sign() * (gate.abs() - threshold).clamp_min(0))

    def metrics(self) -> dict[str, float]:
        if not self.gates:
            return {}
        return {"ranks_open": sum(int((g != 0).sum()) for g in self.gates.values()) / len(self.gates)}

    @torch.no_grad()
    def finish(self, model: nn.Module, state: CompressionState, adapter_dir: Path | None) -> dict[str, object]:
        """Merge each adapter under its mask, put the plain Linear back, keep the adapter (its
        surviving ranks, the gate and the scale folded into B) in peft's format."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        tensors, ranks = {}, {}
        for target in self.targets:
            layer = self.layers[target.name]
            a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
            b = b * layer.scaling["default"]
            if target.name in self.gates:
                gate = self.gates[target.name].float()
                keep = gate != 0
                a, b = a[keep], (b * gate)[:, keep]
            ranks[target.name] = a.shape[0]
            base = layer.base_layer
            full = self.full_precision.pop(target.name, None)
            weight = base.weight if full is None else full.weight
            merged = weight.float().to(b.device) + b @ a
            mask = state.mask(target.name)
            if mask is not None:
                merged *= mask.to(merged.device)
            if full is None:
                base.weight.copy_(merged.to(base.weight.dtype))
            else:  # the NF4 base gives way to the full-precision layer, now holding the merged weight
                full.weight.data = merged.to(full.weight.dtype)
                base = full
            parent, _, child = target.name.rpartition(".")
            setattr(model.get_submodule(parent), child, base)
            if a.shape[0]:  # a target whose every rank closed has no adapter left
                tensors[f"base_model.model.{target.name}.lora_A.weight"] = a.contiguous().cpu()
                tensors[f"base_model.model.{target.name}.lora_B.weight"] = b.contiguous().cpu()
        if adapter_dir is not None:
            adapter_dir.mkdir(parents=True, exist_ok=True)
            kept = {name: r for name, r in ranks.items() if r > 0}
            config = LoraConfig(r=max(kept.values(), default=1), lora_alpha=max(kept.values(), default=1),
                                target_modules=sorted(kept), rank_pattern=kept, alpha_pattern=kept)  # scale 1: folded into B
            config.save_pretrained(str(adapter_dir))
            save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
        return {"ranks": {"initial": self.params.rank, "mean_kept": sum(ranks.values()) / max(len(ranks), 1),
                          "targets_closed": sum(r == 0 for r in ranks.values())}}


@register
class SparseLora(TrainingMethod):
    name = "sparse_lora"
    Params: ClassVar[type[StageParams]] = SparseLoraParams
    linear_only = "adapts"

    def apply(self, model: nn.Module, state: CompressionState, data: CalibrationData) -> CompressionState:
        task = LoraTask(model, self.targets, self.params)
        result = data.train(model, task, self.params)
        data.info["adapter"] = task.finish(model, state, data.output_dir / ADAPTER_DIR if data.output_dir else None)
        data.info["training"] = result.summary()
        return state
