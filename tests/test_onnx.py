"""ONNX export: written beside the checkpoint, checked in onnxruntime against PyTorch, for a causal LM
and an encoder; the pruned zeros survive the export; quantized targets become MatMulNBits where it can
hold them exactly, and stay dense where it cannot."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import fast_recipe
from onnx import numpy_helper

from compress.formats.outliers import Outliers
from compress.formats.quantized import QuantizedStatistic, QuantizedWeight
from compress.methods.quantization import packed_weight
from compress.methods.rtn import rtn_quantize
from compress.model.load import embedded_model_path
from compress.model.targets import discover
from compress.pipeline.engine import run
from compress.pipeline.onnx import ONNX_RTOL, export_onnx
from compress.pipeline.onnx_nbits import rewrite_matmul_nbits
from compress.recipe import validate_recipe


@pytest.mark.parametrize("kind", ["causal", "encoder"])
def test_export_matches_pytorch_in_onnxruntime(kind, tmp_path, tiny_bert):
    sections = {"output": {"onnx": True}}
    if kind == "encoder":
        sections["model"] = {"source": str(tiny_bert)}
    report = run(validate_recipe(fast_recipe({"method": "magnitude", "sparsity": 0.5}, **sections)), tmp_path / "out")
    check = report["onnx"]
    assert report["metrics"]["onnx_ok"] == 1 and check["onnx_max_abs_diff"] <= check["onnx_tolerance"]
    assert check["onnx_tolerance"] >= ONNX_RTOL  # relative to max(1, |output|)

    path = tmp_path / "out" / "model.onnx"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 1000, size=(3, 17), dtype=np.int64)  # another shape: axes are dynamic
    (output,) = session.run(["output"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert output.shape[:2] == (3, 17)

    # every pruned target keeps its zeros in the exported graph's initializers
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    half_zero = [w for w in weights if w.ndim == 2 and abs((w == 0).mean() - 0.5) < 1e-6]
    assert len(half_zero) >= len(report["targets"])


@pytest.mark.parametrize("kind", ["causal", "encoder"])
def test_onnxruntime_output_is_the_checkpoints_pytorch_output(kind, tmp_path, tiny_bert):
    """Not the export's own verdict: model.onnx run here in onnxruntime (its own input and output
    names) against the output checkpoint's model/ folder run here in PyTorch, within the tolerance the
    export claims (ONNX_RTOL of max(1, |output|)), on inputs the export's check never saw."""
    from transformers import AutoModel, AutoModelForCausalLM

    sections = {"output": {"onnx": True, "hf": True}, "evaluate": {"dense": False}}  # hf: model/ to compare with
    if kind == "encoder":
        sections["model"] = {"source": str(tiny_bert)}
    run(validate_recipe(fast_recipe({"method": "magnitude", "sparsity": 0.5}, **sections)), tmp_path / "out")

    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(0, 8192, size=(3, 19), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    names = [i.name for i in session.get_inputs()]
    assert sorted(names) == sorted(feeds)
    (actual,) = session.run([session.get_outputs()[0].name], {name: feeds[name] for name in names})

    loader = AutoModelForCausalLM if kind == "causal" else AutoModel
    model = loader.from_pretrained(tmp_path / "out" / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long))
    expected = (out.logits if kind == "causal" else out.last_hidden_state).numpy()
    assert actual.shape == expected.shape
    difference = float(np.abs(actual.astype(np.float32) - expected).max())
    tolerance = ONNX_RTOL * max(float(np.abs(expected).max()), 1.0)
    assert difference <= tolerance, f"onnxruntime differs from the checkpoint by {difference:.3g} (tolerance {tolerance:.3g})"


# -- quantized targets as onnxruntime MatMulNBits ----------------------------------------------------------

OUT, IN = 24, 96  # a synthetic target: one Linear, so every form is checked in well under a second


def _quantized_weight(bits=4, group_size=32, *, keep=False, perm=False, float_zero=False, second_level=False,
                      lut=False, outliers=False, seed=0) -> QuantizedWeight:
    generator = torch.Generator().manual_seed(seed)
    groups = -(-IN // group_size)
    codes = torch.randint(0, 2**bits, (OUT, IN), generator=generator)
    scale = (torch.rand(OUT, groups, generator=generator) * 0.1 + 0.01).half()
    zero = torch.randint(0, 2**bits, (OUT, groups), generator=generator).float()
    if float_zero:
        zero = (zero + torch.rand(OUT, groups, generator=generator) - 0.5).half()
    if second_level:  # SpQR: the scales themselves on a 3-bit grid per 8 rows
        step = (torch.rand(OUT // 8, groups, generator=generator) * 0.01 + 0.001).half()
        low = (torch.rand(OUT // 8, groups, generator=generator) * 0.01).half()
        scale = QuantizedStatistic(torch.randint(0, 8, (OUT, groups), generator=generator), 3, 8, step, low)
    weight = QuantizedWeight((OUT, IN), bits, group_size, codes, scale, zero)
    if keep:
        weight.keep = torch.rand(OUT, IN, generator=generator) > 0.5
    if perm:
        weight.perm = torch.randperm(IN, generator=generator)
    if lut:
        weight.lut, weight.scale, weight.zero = torch.randn(OUT, 2**bits, generator=generator).half(), None, None
    if outliers:
        weight.outliers = Outliers.from_mask(torch.randn(OUT, IN, generator=generator), torch.rand(OUT, IN, generator=generator) > 0.99)
    return weight


def _linear_model(path, weight: torch.Tensor, layout: str, bias: torch.Tensor | None = None) -> None:
    """y = x @ weight.T (+ bias) laid out as the exporters do: a transposed initializer into MatMul, an
    [out, in] one through a Transpose node, or a Gemm with transB."""
    from onnx import TensorProto, helper

    w = weight.numpy().astype(np.float32)
    inits, nodes = [], []
    if layout == "matmul":
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "onnx::MatMul_7"))
        nodes.append(helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["y"]))
    elif layout == "transpose":
        inits.append(numpy_helper.from_array(w, "val_3"))
        nodes += [helper.make_node("Transpose", ["val_3"], ["val_3_t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["x", "val_3_t"], ["y"])]
    else:
        inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias.numpy(), "b")]
        nodes.append(helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1))
    rank = 2 if layout == "gemm" else 3
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", IN][-rank:])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", OUT][-rank:])], inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


REPRESENTABLE = {
    "4-bit g32": dict(bits=4, group_size=32),
    "2-bit g16": dict(bits=2, group_size=16),
    "8-bit g64 (last group shorter)": dict(bits=8, group_size=64),
    "3-bit in 4-bit codes": dict(bits=3, group_size=32),
    "6-bit g48 in 8-bit codes, blocks of 16": dict(bits=6, group_size=48),
    "4-bit one group per row": dict(bits=4, group_size=IN),
    "pruned, integer zero points": dict(keep=True),
    "act-order permutation": dict(perm=True, keep=True),
    "float zero points": dict(float_zero=True),
    "second-level scales": dict(second_level=True),
}


@pytest.mark.parametrize("layout", ["matmul", "transpose", "gemm"])
@pytest.mark.parametrize("form", list(REPRESENTABLE))
def test_matmul_nbits_computes_the_dequantized_weights(form, layout, tmp_path):
    quantized = _quantized_weight(**REPRESENTABLE[form])
    weight = quantized.dequantize()
    bias = torch.randn(OUT) if layout == "gemm" else None
    _linear_model(tmp_path / "linear.onnx", weight, layout, bias)

    model, outcome = rewrite_matmul_nbits(tmp_path / "linear.onnx", {"layers.0.proj": quantized})
    assert outcome.nbits == ["layers.0.proj"] and not outcome.dense
    assert [n.op_type for n in model.graph.node if n.op_type != "Gather"] == ["MatMulNBits"]
    assert not [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
                and t.dims[0] * t.dims[1] == OUT * IN], "the float weight is removed"
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 5, IN)[-(2 if layout == "gemm" else 3):]).astype(np.float32)
    (actual,) = session.run(None, {"x": x})
    expected = x @ weight.numpy().T + (0 if bias is None else bias.numpy())
    assert np.abs(actual - expected).max() <= 1e-5 * max(np.abs(expected).max(), 1.0)


DENSE = {
    "lookup table": dict(lut=True),
    "outliers": dict(outliers=True),
    "16 bits": dict(bits=16, group_size=32),
    "group size 24": dict(group_size=24),
    "float zero points with 8-bit codes": dict(bits=8, float_zero=True),
    "pruned weights with non-integer zero points": dict(keep=True, float_zero=True),
}


@pytest.mark.parametrize("form", list(DENSE))
def test_forms_matmul_nbits_cannot_hold_stay_dense(form, tmp_path):
    quantized = _quantized_weight(**DENSE[form])
    _linear_model(tmp_path / "linear.onnx", quantized.dequantize(), "matmul")
    model, outcome = rewrite_matmul_nbits(tmp_path / "linear.onnx", {"proj": quantized})
    assert outcome.dense == {"proj": form} and not outcome.nbits
    assert [n.op_type for n in model.graph.node] == ["MatMul"]


@pytest.fixture(scope="module")
def dense_onnx_bytes(tmp_path_factory) -> int:
    """The embedded model's plain float32 export, for the size comparison."""
    path = tmp_path_factory.mktemp("dense-onnx") / "model.onnx"
    return export_onnx(embedded_model_path(), path, causal=True)["onnx_bytes"]


@pytest.mark.parametrize("group_size", [16, 32])
def test_rtn_4bit_export_stores_targets_as_matmul_nbits(group_size, tmp_path, dense_onnx_bytes):
    """RTN 4-bit on the embedded model, one target at a group size no MatMulNBits block tiles: the
    checkpoint is written as the pipeline writes it (dequantized, rounded to its bfloat16), the export
    gets the packed forms; onnxruntime matches PyTorch computing with the dequantized weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32).eval()
    odd_one = "model.layers.0.mlp.down_proj"
    quantized = {}
    with torch.no_grad():
        for target in discover(model).targets:
            size = 24 if target.name == odd_one else group_size
            rounded, grids = rtn_quantize(target.weight, 4, size)
            quantized[target.name] = packed_weight(rounded, grids, 4, size)
            target.weight.copy_(quantized[target.name].dequantize())
    model.to(torch.bfloat16).save_pretrained(tmp_path / "model")
    model.float()
    with torch.no_grad():  # back to what the packed forms compute with, unrounded
        for target in discover(model).targets:
            target.weight.copy_(quantized[target.name].dequantize())

    check = export_onnx(tmp_path / "model", tmp_path / "model.onnx", causal=True, quantized=quantized)
    assert check["onnx_ok"] and check["onnx_max_abs_diff"] <= check["onnx_tolerance"]
    assert check["onnx_nbits_targets"] == len(quantized) - 1 and check["onnx_dense_targets"] == 1
    assert check["onnx_dense_reasons"] == {"group size 24": 1}

    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert sorted(n.name.removesuffix(".nbits.MatMulNBits") for n in nbits) == sorted(set(quantized) - {odd_one})
    assert {onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "block_size"} == {group_size}
    # the 4-bit targets: 0.5 byte a weight, a float32 scale and a packed zero point a group, instead of 4 bytes
    target_bytes = 4 * sum(q.numel for name, q in quantized.items() if name != odd_one)
    saved = dense_onnx_bytes - check["onnx_bytes"]
    assert saved >= target_bytes * (1 - (0.5 + 4.5 / group_size) / 4) * 0.99
    print(f"g{group_size}: {check['onnx_bytes']} bytes vs {dense_onnx_bytes} dense, max abs diff {check['onnx_max_abs_diff']:.3g}")

    # independently: other inputs, PyTorch computing with the dequantized weights in float32
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(2).integers(0, 8192, size=(3, 19), dtype=np.int64)
    (actual,) = session.run(["output"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert np.abs(actual - expected).max() <= ONNX_RTOL * max(float(np.abs(expected).max()), 1.0)
