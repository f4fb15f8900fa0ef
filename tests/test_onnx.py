"""ONNX export: written beside the checkpoint, checked in onnxruntime against PyTorch, for a causal LM
and an encoder; the pruned zeros survive the export."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import fast_recipe
from onnx import numpy_helper

from compress.pipeline.engine import run
from compress.pipeline.onnx import ONNX_RTOL
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
