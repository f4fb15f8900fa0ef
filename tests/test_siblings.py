"""Siblings, the targets that read the same input (q/k/v, gate/up) and so share one Hessian, compressed together
(`compress_siblings`: one factorization, one sweep over their rows concatenated): each target gets what its own
sweep gives, up to the summation order of the matrix products (GPTQ's grids and codes, SparseGPT's masks chosen
within each target's own rows), and the engine takes them together."""

from __future__ import annotations

import pytest
import torch

from compress.methods import get_method
from compress.methods.base import TargetResult


def _shared_hessian(columns: int, seed: int = 0) -> torch.Tensor:
    inputs = torch.randn(4 * columns, columns, generator=torch.Generator().manual_seed(seed))
    inputs[:, 3] = 0  # a dead input
    return inputs.T @ inputs


def _siblings(shapes: list[int], columns: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(rows, columns, generator=generator) for rows in shapes]


def _method(name: str, **params):
    return get_method(name)(get_method(name).Params(**params))


def _one_by_one(method, weights, hessian, masks) -> list[TargetResult]:
    return [method.compress_target(w.clone(), {"hessian": hessian}, m) for w, m in zip(weights, masks)]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


def _close(one: torch.Tensor, other: torch.Tensor) -> None:
    torch.testing.assert_close(one, other, rtol=0, atol=1e-5 if one.device.type == "cpu" else 1e-4)


@pytest.mark.parametrize("params", [
    dict(bits=4, group_size=32),
    dict(bits=3, group_size=None, act_order=True),
    dict(bits=4, group_size=32, act_order=True, symmetric=True),
])
@pytest.mark.parametrize("device", DEVICES)
def test_gptq_siblings_give_each_target_its_own_sweep(params, device):
    """On CUDA the blocks run as the fused kernel (16 rows a program: the 48 + 16 + 32 rows concatenated are 6 programs)."""
    hessian, weights = _shared_hessian(96).to(device), [w.to(device) for w in _siblings([48, 16, 32], 96)]
    masks = [None, (torch.rand(16, 96, generator=torch.Generator().manual_seed(2)) > 0.5).to(device), None]  # one target pruned before
    method = _method("gptq", **params)
    together = method.compress_siblings([w.clone() for w in weights], {"hessian": hessian}, masks)
    alone = _one_by_one(method, weights, hessian, masks)
    assert len(together) == len(weights)
    for joint, single, mask in zip(together, alone, masks):
        assert joint.weight.shape == single.weight.shape
        _close(joint.weight, single.weight)
        assert (joint.mask is None) == (mask is None) and (mask is None or torch.equal(joint.mask, mask))
        assert torch.equal(joint.quantized.codes, single.quantized.codes)
        _close(joint.quantized.scale.float(), single.quantized.scale.float())
        assert (joint.quantized.keep is None) == (mask is None)
        _close(joint.quantized.dequantize(), joint.weight)
    assert (together[1].weight[~masks[1]] == 0).all()  # the mask survives


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("device", DEVICES)
def test_sparsegpt_siblings_choose_each_mask_within_its_target(pattern, device):
    hessian, weights = _shared_hessian(64, seed=3).to(device), [w.to(device) for w in _siblings([32, 8], 64)]
    weights[1] *= 10  # a sibling whose weights are all larger: a joint choice would prune mostly the other one
    method = _method("sparsegpt", sparsity=0.5, pattern=pattern, block_size=32)
    together = method.compress_siblings([w.clone() for w in weights], {"hessian": hessian}, [None, None])
    alone = _one_by_one(method, weights, hessian, [None, None])
    for joint, single in zip(together, alone):
        assert torch.equal(joint.mask, single.mask)
        _close(joint.weight, single.weight)
        kept = joint.mask.float().reshape(joint.mask.shape[0], -1, 32).mean(dim=(0, 2))  # per block of 32 columns
        assert torch.equal(kept, torch.full_like(kept, 0.5))


def test_a_hessian_that_cannot_be_factored_is_left_to_each_target():
    hessian = torch.full((16, 16), float("nan"))
    method = _method("gptq", bits=4, group_size=None)
    assert method.compress_siblings(_siblings([8, 8], 16), {"hessian": hessian}, [None, None]) is None


def _engine_run(name: str, params: dict, monkeypatch, joint: bool) -> tuple[dict, int]:
    from compress.calibration.layerwise import PlannedStage, run_layerwise
    from compress.model.load import embedded_model_path, load_model
    from compress.model.targets import discover
    from compress.recipe import ModelSpec
    from compress.state import CompressionState

    monkeypatch.setenv("COMPRESS_JOINT_SIBLINGS", "1" if joint else "0")
    model = load_model(ModelSpec(source=str(embedded_model_path()), device="cpu")).model
    layout = discover(model)
    method, calls = _method(name, **params), [0]
    siblings = method.compress_siblings

    def counted(weights, *args):
        calls[0] += len(weights)
        return siblings(weights, *args)

    method.compress_siblings = counted
    stage = PlannedStage(method, layout.targets, label=name)
    batches = list(torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)).split(2))
    state = CompressionState()
    run_layerwise(model, layout, [stage], state, batches, torch.device("cpu"))
    return {t.name: (t.weight.detach().clone(), state.mask(t.name)) for t in layout.targets}, calls[0]


@pytest.mark.parametrize("name, params", [("gptq", dict(bits=4, group_size=32)), ("sparsegpt", dict(sparsity=0.5))])
def test_engine_takes_siblings_together(name, params, monkeypatch):
    """On the embedded LLaMA every q/k/v and gate/up goes through compress_siblings (5 of a block's 7 targets), and
    the model ends as with one target at a time (COMPRESS_JOINT_SIBLINGS=0)."""
    joint, calls = _engine_run(name, params, monkeypatch, joint=True)
    alone, none = _engine_run(name, params, monkeypatch, joint=False)
    assert none == 0 and calls == 5 / 7 * len(joint)
    for target, (weight, mask) in joint.items():
        torch.testing.assert_close(weight, alone[target][0], rtol=0, atol=2e-5 * float(weight.abs().max()), msg=target)
        assert (mask is None) == (alone[target][1] is None)
        if mask is not None:
            assert (mask != alone[target][1]).float().mean() < 1e-3, target
