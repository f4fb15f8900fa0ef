"""Loading a packed folder with transformers' own `from_pretrained`: a quantization config and a
quantizer registered under quant_method "compress" (as bitsandbytes, GPTQ and compressed-tensors
checkpoints load). Before the weights are read, each packed target's Linear is replaced by its
format's kernel-backed module holding empty (meta) buffers of the shapes the config lists; transformers
then fills them from the file by name. No dense weight of a packed target is ever built."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from compress.deploy.packed_model import FORMAT, QUANT_METHOD, fused_parts
from compress.formats.registry import empty_tensors, from_tensors
from compress.kernels.experts import PackedExperts
from compress.kernels.modules import PackedLinear, from_packed
from compress.model.targets import is_fused_experts


class CompressQuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` section of a packed folder's config.json (compress/deploy/packed_model.py)."""

    def __init__(self, targets: dict[str, dict] | None = None, dense_targets: dict[str, str] | None = None, format: str = FORMAT,
                 compress_version: str | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format = format
        self.compress_version = compress_version
        self.targets = targets or {}
        self.dense_targets = dense_targets or {}
        if format != FORMAT:
            raise ValueError(f"packed model format {format!r}; this version of compress reads {FORMAT!r}")


def replace_targets(model: nn.Module, targets: dict[str, dict], device: str | torch.device = "meta") -> None:
    """Swap each packed target's Linear for its kernel-backed module, with empty buffers on `device`; a
    fused-experts module whose experts are packed becomes a PackedExperts (compress/kernels/experts.py)."""
    experts: dict[str, dict[str, dict[int, nn.Module]]] = {}  # experts module -> param -> expert -> packed module
    for name, info in targets.items():
        meta = {k: v for k, v in info.items() if k != "tensors"}
        packed = from_tensors(empty_tensors(name, info["tensors"], device), name, meta)
        head, expert, param = fused_parts(name)
        if expert is not None and _is_fused(model, head):
            experts.setdefault(head, {}).setdefault(param, {})[expert] = from_packed(packed)
            continue
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"packed target {name} is not a module of {type(model).__name__}: the folder belongs to another architecture") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"packed target {name} is a {type(linear).__name__} in {type(model).__name__}, not a Linear")
        if tuple(packed.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"packed target {name} is {tuple(packed.shape)}, the model's Linear is {(linear.out_features, linear.in_features)}")
        bias = None if linear.bias is None else torch.empty(linear.out_features, dtype=linear.bias.dtype, device=device)
        model.set_submodule(name, from_packed(packed, bias))
    for head, params in experts.items():
        original = model.get_submodule(head)
        lists = {}
        for param, by_expert in params.items():
            fused = getattr(original, param)
            if sorted(by_expert) != list(range(fused.shape[0])):
                raise ValueError(f"{head}.{param}: the folder packs experts {sorted(by_expert)} of {fused.shape[0]}")
            for expert, module in by_expert.items():
                if (module.out_features, module.in_features) != tuple(fused.shape[1:]):
                    raise ValueError(f"packed target {head}.{expert}.{param} is {(module.out_features, module.in_features)}, "
                                     f"the model's experts are {tuple(fused.shape[1:])}")
            lists[param] = [by_expert[e] for e in range(fused.shape[0])]
        model.set_submodule(head, PackedExperts(original, lists))


def _is_fused(model: nn.Module, path: str) -> bool:
    try:
        return is_fused_experts(model.get_submodule(path))
    except AttributeError:
        return False


def check_loaded(model: nn.Module, targets: dict[str, dict]) -> None:
    """Every packed buffer was read from the file, in the dtype and shape the format stores (a cast by
    the loader would change the numbers the kernels read)."""
    for name, info in targets.items():
        module = model.get_submodule(name)
        if not isinstance(module, PackedLinear):
            raise ValueError(f"{name}: expected a packed module, found {type(module).__name__}")
        tensors = {f"{name}.{field}": tensor for field, tensor in module.named_buffers(recurse=False) if field != "bias"}
        missing = [key for key, tensor in tensors.items() if tensor.is_meta]
        if missing:
            raise ValueError(f"{name}: the packed file holds no {', '.join(missing)}")
        from_tensors(tensors, name, {k: v for k, v in info.items() if k != "tensors"})


class CompressQuantizer(HfQuantizer):
    """Loads packed folders (pre-quantized only: compressing is what `compress run` does)."""

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("quant_method 'compress' loads packed folders written by compress; to compress a model, run `compress run`")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        return False

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        replace_targets(model, self.quantization_config.targets)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        check_loaded(model, self.quantization_config.targets)
        return model

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return False


def register() -> None:
    """Register the config and the quantizer with transformers (once; later calls do nothing)."""
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is CompressQuantizer:
        return
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(CompressQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(CompressQuantizer)
