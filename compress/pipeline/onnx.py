"""ONNX export of a compressed checkpoint, checked in onnxruntime.

The model is exported in float32 (pruned zeros and quantized values are exact in it) with dynamic
batch and sequence axes, then loaded in onnxruntime (CPU) and run on a fixed batch: the check passes
when the largest absolute difference to PyTorch's output is at most ONNX_RTOL times the largest
absolute PyTorch output (float32 kernels differ in summation order, nothing more).

Given the quantized targets' packed forms, the model exported and checked is the packed form's: each
quantized target computes with `QuantizedWeight.dequantize()` in float32, as the pipeline evaluated
it, not with the checkpoint's rounding of it to its storage dtype (bfloat16 cannot hold a float16
scale times a code). Those weights are then exactly what MatMulNBits computes with
(compress/pipeline/onnx_nbits.py), so the same tolerance holds; how far the result is from the
checkpoint as stored is reported beside it (`onnx_checkpoint_max_abs_diff`), not checked.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from compress.formats.quantized import QuantizedWeight
from compress.pipeline.onnx_nbits import NBitsRewrite, rewrite_matmul_nbits

log = logging.getLogger("compress")

ONNX_FILE = "model.onnx"
EXPORTERS = ("torchscript", "dynamo")
ONNX_RTOL = 1e-4
CHECK_SHAPE = (2, 32)  # the fixed batch: 2 sequences of 32 token ids from a seeded generator
EXTERNAL_DATA_BYTES = 1 << 30  # above this many weight bytes the weights go to model.onnx.data (protobuf stops at 2 GiB)


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


def _export(module: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor], path: Path, exporter: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes, not ours to act on
        if exporter == "torchscript":
            axes = {"batch": 0, "sequence": 1}
            dynamic = {name: {i: n for n, i in axes.items()} for name in ("input_ids", "attention_mask", "output")}
            torch.onnx.export(module, inputs, str(path), input_names=["input_ids", "attention_mask"],
                              output_names=["output"], dynamic_axes=dynamic, opset_version=18, dynamo=False)
        else:
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(module, inputs, str(path), input_names=["input_ids", "attention_mask"],
                              output_names=["output"], opset_version=18, dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}))


def _export_friendly(model_dir: Path) -> dict[str, Any]:
    """Loading options that make a model traceable: fused MoE experts run through transformers'
    `batched_mm` implementation (every token's chosen experts gathered, no data-dependent loop or
    `torch.histc`), which both exporters handle; the default loop over the experts hit by the batch
    exports with neither."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    moe = any(getattr(config, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts"))
    return {"experts_implementation": "batched_mm"} if moe else {}


def _load_dequantized(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
    """Each quantized target's weight set to its packed form's dequantized float32 values."""
    from compress.model.targets import discover

    targets = {target.name: target for target in discover(model).targets}
    unknown = sorted(set(quantized) - set(targets))
    if unknown:
        raise ValueError(f"quantized targets not in the model: {', '.join(unknown[:5])}")
    for name, weight in quantized.items():
        targets[name].weight.copy_(weight.dequantize().to(targets[name].weight.dtype))


def _external_files(model: onnx.ModelProto, folder: Path) -> set[Path]:
    """The external data files `model`'s initializers are stored in."""
    return {folder / entry.value for tensor in model.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}


def onnx_file_bytes(path: Path) -> int:
    """model.onnx and its external data files, in bytes."""
    header = onnx.load(str(path), load_external_data=False)
    return sum(file.stat().st_size for file in {path} | _external_files(header, path.parent))


def _save(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path`, its weights to one model.onnx.data beside it when they are large, and
    remove the external data files the exporter wrote that the rewritten model no longer reads."""
    exported = _external_files(onnx.load(str(path), load_external_data=False), path.parent)
    large = sum(tensor.ByteSize() for tensor in model.graph.initializer) > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + ".data")
    if large:
        data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True, location=data.name)
    for stale in exported - ({data} if large else set()):
        stale.unlink(missing_ok=True)


def export_onnx(model_dir: Path, path: Path, causal: bool, quantized: dict[str, QuantizedWeight] | None = None) -> dict[str, Any]:
    """Export the checkpoint in `model_dir` to `path` and check it; returns the check's numbers. With
    `quantized` ({target name: packed form}), those targets compute with their dequantized weights and
    the ones MatMulNBits can hold are stored as MatMulNBits (see the module docstring)."""
    import onnxruntime
    from transformers import AutoModel, AutoModelForCausalLM

    started = time.perf_counter()
    loader = AutoModelForCausalLM if causal else AutoModel
    model = loader.from_pretrained(model_dir, dtype=torch.float32, **_export_friendly(model_dir)).eval()
    module = _Outputs(model, causal)
    generator = torch.Generator().manual_seed(0)  # our own: the caller's RNG is untouched
    input_ids = torch.randint(0, model.config.vocab_size, CHECK_SHAPE, generator=generator)
    attention_mask = torch.ones_like(input_ids)
    stored = None
    with torch.no_grad():
        if quantized:
            stored = module(input_ids, attention_mask).float()  # the checkpoint as stored, for the report
            _load_dequantized(model, quantized)
        expected = module(input_ids, attention_mask).float()
    tolerance = ONNX_RTOL * max(float(expected.abs().max()), 1.0)
    rewrite = NBitsRewrite()
    # The TorchScript exporter takes ~2 s on our small models where the dynamo one takes ~15 s, but
    # it traced a BERT wrongly (max difference 2.25): each export is checked, the next tried on failure.
    for exporter in EXPORTERS:
        try:
            _export(module, (input_ids, attention_mask), path, exporter)
        except Exception as error:  # an architecture this exporter cannot handle
            log.info("ONNX export with %s failed: %s", exporter, str(error).splitlines()[0] if str(error) else type(error).__name__)
            difference = float("inf")
            continue
        if quantized:
            rewritten, rewrite = rewrite_matmul_nbits(path, quantized)
            _save(rewritten, path)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (actual,) = session.run(["output"], {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        difference = float((torch.from_numpy(actual).float() - expected).abs().max())
        if difference <= tolerance:
            break
        log.info("ONNX export with %s differs from PyTorch by %.3g (tolerance %.3g)", exporter, difference, tolerance)
    if not path.exists():
        raise RuntimeError("ONNX export failed with every exporter; set output.onnx: false to skip it")
    check = {
        "onnx_max_abs_diff": difference,
        "onnx_tolerance": tolerance,
        "onnx_ok": difference <= tolerance,
        "onnx_exporter": exporter,
        "onnx_check_shape": list(CHECK_SHAPE),
        "onnx_seconds": time.perf_counter() - started,
        "onnx_bytes": onnx_file_bytes(path),
        **rewrite.counts(),
    }
    if stored is not None and difference != float("inf"):
        check["onnx_checkpoint_max_abs_diff"] = float((torch.from_numpy(actual).float() - stored).abs().max())
    return check
