"""ONNX export of a compressed checkpoint, checked in onnxruntime.

The model is exported in float32 (pruned zeros and quantized values are exact in it) with dynamic
batch and sequence axes, then loaded in onnxruntime (CPU) and run on a fixed batch: the check passes
when the largest absolute difference to PyTorch's output is at most ONNX_RTOL times the largest
absolute PyTorch output (float32 kernels differ in summation order, nothing more).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("compress")

ONNX_FILE = "model.onnx"
ONNX_RTOL = 1e-4
CHECK_SHAPE = (2, 32)  # the fixed batch: 2 sequences of 32 token ids from a seeded generator


class _Outputs(nn.Module):
    """input_ids, attention_mask -> logits (causal LM) or last hidden states (encoder)."""

    def __init__(self, model: nn.Module, causal: bool) -> None:
        super().__init__()
        self.model = model
        self.causal = causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.causal:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _export(module: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor], path: Path) -> str:
    names = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
             "output": {0: "batch", 1: "sequence"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes, not ours to act on
        try:
            # The TorchScript exporter: ~2 s for our small models where the dynamo one takes ~15 s.
            torch.onnx.export(module, inputs, str(path), input_names=["input_ids", "attention_mask"],
                              output_names=["output"], dynamic_axes=names, opset_version=18, dynamo=False)
            return "torchscript"
        except Exception as error:  # an architecture it cannot trace: the dynamo exporter may
            log.info("TorchScript ONNX export failed (%s); trying the dynamo exporter", type(error).__name__)
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(module, inputs, str(path), input_names=["input_ids", "attention_mask"],
                              output_names=["output"], opset_version=18, dynamo=True,
                              dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}))
            return "dynamo"


def export_onnx(model_dir: Path, path: Path, causal: bool) -> dict[str, Any]:
    """Export the checkpoint in `model_dir` to `path` and check it; returns the check's numbers."""
    import onnxruntime
    from transformers import AutoModel, AutoModelForCausalLM

    started = time.perf_counter()
    loader = AutoModelForCausalLM if causal else AutoModel
    model = loader.from_pretrained(model_dir, dtype=torch.float32).eval()
    module = _Outputs(model, causal)
    generator = torch.Generator().manual_seed(0)  # our own: the caller's RNG is untouched
    input_ids = torch.randint(0, model.config.vocab_size, CHECK_SHAPE, generator=generator)
    attention_mask = torch.ones_like(input_ids)
    exporter = _export(module, (input_ids, attention_mask), path)
    with torch.no_grad():
        expected = module(input_ids, attention_mask).float()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["output"], {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
    difference = float((torch.from_numpy(actual).float() - expected).abs().max())
    scale = float(expected.abs().max())
    tolerance = ONNX_RTOL * max(scale, 1.0)
    return {
        "onnx_max_abs_diff": difference,
        "onnx_tolerance": tolerance,
        "onnx_ok": difference <= tolerance,
        "onnx_exporter": exporter,
        "onnx_check_shape": list(CHECK_SHAPE),
        "onnx_seconds": time.perf_counter() - started,
        "onnx_bytes": path.stat().st_size,
    }
