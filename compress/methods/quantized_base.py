"""A frozen base in 4-bit NF4 for adapter training (QLoRA-style, Dettmers et al. 2023), through
bitsandbytes.

The targets' Linear layers are swapped for bitsandbytes `Linear4bit` modules holding NF4 codes of the
same weights (NF4 has an exact zero, so a pruned weight stays zero in the base the adapters see). The
full-precision weights are kept aside on the CPU: the merge goes into them, not into the rounded base,
so the base's quantization error never reaches the exported model. On the GPU this is what saves
memory: the device holds ~0.5 byte a frozen weight instead of 4.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from compress.errors import CompressError


def _not_the_hub_kernel_notice(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()


def quiet_hub_kernel_notice() -> None:
    """On a CPU with AVX512-BF16, importing bitsandbytes (peft does, for any adapter) tries to fetch an
    optional kernel from the Hugging Face hub and warns to `pip install kernels` when it cannot; its
    built-in CPU path, the one used and tested here, works without it. Drop that one notice."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _not_the_hub_kernel_notice not in logger.filters:
        logger.addFilter(_not_the_hub_kernel_notice)


def _bitsandbytes():
    quiet_hub_kernel_notice()
    try:
        import bitsandbytes
    except ImportError:
        raise CompressError("base_quantization: nf4 needs the `bitsandbytes` package: pip install bitsandbytes") from None
    return bitsandbytes


def to_nf4(linear: nn.Linear) -> nn.Module:
    """An NF4 `Linear4bit` with `linear`'s weight and bias, on its device, to stand in its place while
    adapters train. `linear` keeps its full-precision weight, moved to the CPU (the merge puts it back)."""
    bnb = _bitsandbytes()
    weight = linear.weight.detach()
    device = weight.device
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute, quant_type="nf4")
    quantized.weight = bnb.nn.Params4bit(weight.to(compute), requires_grad=False, quant_type="nf4")
    quantized.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    quantized = quantized.to(device)  # bitsandbytes quantizes when the weight moves to its device
    linear.weight.data = weight.to("cpu", copy=True)
    return quantized


def nf4_weight(module: nn.Module) -> torch.Tensor:
    """The dequantized weight of an NF4 `Linear4bit` (what the adapters were trained against)."""
    bnb = _bitsandbytes()
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()

