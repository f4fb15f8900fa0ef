"""ONNX export: written beside the checkpoint, checked in onnxruntime against PyTorch, for a causal LM
and an encoder; the pruned zeros survive the export."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
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


@pytest.mark.parametrize("kind", ["causal", "encoder"])
def test_onnxruntime_output_is_the_checkpoints_pytorch_output(kind, tmp_path, tiny_bert):
    """Not the export's own verdict: model.onnx run here in onnxruntime (its own input and output
    names) against the output checkpoint's model/ folder run here in PyTorch, within the tolerance the
    export claims (ONNX_RTOL of max(1, |output|)), on inputs the export's check never saw."""
    from transformers import AutoModel, AutoModelForCausalLM

    sections = {"output": {"onnx": True}, "evaluate": {"dense": False}}
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
