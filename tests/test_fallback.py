"""A Hessian that cannot be factored even with the extra damping does not fail the run: that target
falls back to its method's data-free form (GPTQ, SpQR: round to nearest on the same grid; SparseGPT:
magnitude pruning with the same pattern and sparsity), and the report names it and the fallback."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import checkpoint_tensors, exported_tensors, fast_recipe

import compress
from compress.methods import register
from compress.methods.gptq import GPTQ
from compress.methods.obs import HessianNotPositiveDefinite, inverse_hessian_factor
from compress.methods.registry import _METHODS
from compress.methods.rtn import RTN
from compress.methods.sparsegpt import SparseGPT
from compress.methods.sparsity import prune_mask
from compress.methods.spqr import SpQR

BROKEN = "model.layers.0.mlp.down_proj"  # the one target of block 0's MLP whose input is the MLP width (384)


def _broken(base):
    """`base`, but the Hessian of a target with 384 inputs (block 0's down_proj here) is negative
    definite: no damping makes it factorable."""

    class Broken(base):
        name = f"{base.name}-broken-hessian"

        def compress_target(self, weight, statistics, mask, dense=None):
            if weight.shape[1] == 384:
                statistics = {**statistics, "hessian": -statistics["hessian"]}
            return super().compress_target(weight, statistics, mask, dense)

    if Broken.name not in _METHODS:
        register(Broken)
    return Broken.name


def test_an_unfactorable_hessian_raises_its_own_error():
    for hessian in (-torch.eye(8), torch.full((8, 8), float("nan"))):
        with pytest.raises(HessianNotPositiveDefinite, match="not positive definite"):
            inverse_hessian_factor(hessian, 0.01)


@pytest.mark.parametrize("stage, fallback", [
    ({"method": "gptq", "bits": 3, "group_size": 128}, "round-to-nearest"),
    ({"method": "spqr", "bits": 3, "group_size": 16, "qq_groupsize": 16}, "round-to-nearest"),
    ({"method": "sparsegpt", "sparsity": 0.5}, "magnitude pruning"),
])
def test_a_target_whose_hessian_fails_falls_back_and_is_reported(tmp_path, stage, fallback):
    method = {"gptq": GPTQ, "spqr": SpQR, "sparsegpt": SparseGPT}[stage["method"]]
    stage = {**stage, "method": _broken(method), "targets": {"include": ["model.layers.0.mlp.*"]}}
    out = tmp_path / "out"
    compress.run(fast_recipe(stage, evaluate={"layer_error": False}), out=out, track=False)
    report = json.loads((out / "report.json").read_text())
    fallbacks = report["stages"][0]["fallbacks"]
    assert list(fallbacks) == [BROKEN] and fallbacks[BROKEN].startswith(fallback) and "not positive definite" in fallbacks[BROKEN]
    assert report["targets"][BROKEN]["fallback"] == {"0": fallbacks[BROKEN]}
    assert report["targets"]["model.layers.0.mlp.up_proj"]["fallback"] == {}
    assert report["audit"]["ok"], report["audit"]["problems"]
    before = checkpoint_tensors(compress.embedded_model())[f"{BROKEN}.weight"]
    after = exported_tensors(out)[f"{BROKEN}.weight"]
    if stage["method"].startswith("gptq"):  # exactly what RTN gives on the same grid
        expected = RTN(method.Params(bits=3, group_size=128)).compress_target(before.float(), {}, None).weight
        assert torch.equal(after, expected.to(after.dtype))
    elif stage["method"].startswith("sparsegpt"):  # the magnitude mask over the whole layer, 50%
        assert torch.equal(after != 0, prune_mask(before.abs(), 0.5, "unstructured", scope="layer"))
        assert torch.equal(after[after != 0], before[after != 0])
    else:
        assert report["targets"][BROKEN]["quantized"]["bits"] == 3 and not torch.equal(after, before)
