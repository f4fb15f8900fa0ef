"""The fused OBS block kernel (compress/methods/obs_fused.py) against the torch column loop of obs_sweep:
GPTQ (groups refitted inside a block, symmetric, one grid a row, a keep mask, a last partial group) and
SparseGPT (unstructured masks, 2:4 and 4:8 chosen in the kernel) give the same weights, grids and masks.
Runs on CUDA where present, else under TRITON_INTERPRET=1 on CPU tensors (small shapes: the interpreter
walks the columns in Python)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (pip install triton): the fused sweep cannot be tested", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported

from compress.methods import gptq, obs, qmoe, sparsegpt, spqr

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    rows, cols = 37, 168  # a partial row tile, a last block of 40 columns (a partial group of 40)
    weight = torch.randn(rows, cols, generator=g)
    x = torch.randn(512, cols, generator=g)
    x[:, 5] = 0  # an input that never fires: a dead column
    keep = torch.rand(rows, cols, generator=g) > 0.5
    return weight.to(DEVICE), (x.T @ x).to(DEVICE), keep.to(DEVICE)


def _both(monkeypatch, module, call):
    """call() with the torch column loop, then with the fused kernel."""
    results = []
    for fused in (False, True):
        monkeypatch.setattr(module, "obs_sweep", lambda *a, fused_=fused, **k: obs.obs_sweep(*a, **{**k, "fused": fused_}))
        results.append(call())
    return results


@pytest.mark.parametrize("bits, group_size, symmetric, with_keep",
                         [(4, 128, False, False), (3, 64, True, False), (4, None, False, False), (4, 128, False, True), (2, 32, False, False)])
def test_gptq_fused_equals_column_loop(monkeypatch, problem, bits, group_size, symmetric, with_keep):
    weight, hessian, keep = problem
    (w_loop, q_loop), (w_fused, q_fused) = _both(
        monkeypatch, gptq, lambda: gptq.gptq_quantize(weight, hessian, bits, group_size, symmetric, keep if with_keep else None))
    assert torch.allclose(w_fused, w_loop, rtol=0, atol=1e-5)
    assert (w_fused != w_loop).float().mean() < 0.01  # the same grid points but for float-rounding ties
    assert torch.equal(q_fused.scale, q_loop.scale)
    if with_keep:
        assert not w_fused[~keep].any()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_sparsegpt_fused_equals_column_loop(monkeypatch, problem, pattern):
    weight, hessian, _ = problem
    (w_loop, keep_loop), (w_fused, keep_fused) = _both(monkeypatch, sparsegpt, lambda: sparsegpt.sparsegpt_prune(weight, hessian, 0.5, pattern))
    assert torch.equal(keep_fused, keep_loop)
    assert torch.allclose(w_fused, w_loop, rtol=1e-5, atol=1e-5)
    if pattern != "unstructured":
        n, m = map(int, pattern.split(":"))
        assert (keep_fused.reshape(weight.shape[0], -1, m).sum(-1) == n).all()


@pytest.mark.parametrize("experts, with_keep", [(0, False), (3, True)])
def test_qmoe_ternary_fused_equals_column_loop(monkeypatch, problem, experts, with_keep):
    """QMoE's ternary rule, on one weight and on a batch of experts swept together (one launch an expert a block)."""
    weight, hessian, keep = problem
    if experts:
        g = torch.Generator().manual_seed(3)
        weight = torch.randn(experts, *weight.shape, generator=g).to(DEVICE)
        x = torch.randn(experts, 256, weight.shape[-1], generator=g).to(DEVICE)
        hessian = x.transpose(1, 2) @ x
        keep = keep.expand(experts, -1, -1)
    kept = keep if with_keep else None
    (q_loop, low, high), (q_fused, _, _) = _both(monkeypatch, qmoe, lambda: qmoe.ternary_sweep(weight, hessian, kept, 0.1, 128))
    assert torch.equal(q_fused, q_loop)
    values = torch.cat([torch.zeros_like(low), low, high], dim=-1)  # [..., rows, 3]
    assert ((q_fused.unsqueeze(-1) == values.unsqueeze(-2)).any(-1)).all()  # every weight is its row's min, 0 or max


@pytest.mark.parametrize("update, with_keep", [
    ({}, False),  # the reference configuration: beta1 = beta2 = 16, 3-bit statistics, leave-one-out outliers, act-order
    ({"bits": 4, "qq_scale_bits": None, "qq_zero_bits": None, "permutation_order": "identity"}, True),  # float16 statistics, a mask
    ({"simplified_outliers": True, "qq_zero_bits": 4, "outlier_threshold": float("inf")}, False),  # no leave-one-out; outliers off
])
def test_spqr_fused_equals_column_loop(monkeypatch, update, with_keep):
    """SpQR's rule in the kernel: the same codes, statistics (both levels) and outliers as the torch loop
    but for criteria within float rounding of the threshold (leave-one-out sums in another order)."""
    g = torch.Generator().manual_seed(1)
    rows, cols = 48, 168  # three second-level row groups; a last block of 40 columns ends in a group of 8
    weight = torch.randn(rows, cols, generator=g)
    weight[3, 7] = 9.0  # an outlier the threshold must catch
    x = torch.randn(384, cols, generator=g)
    x[:, 11] = 0
    keep = (torch.rand(rows, cols, generator=g) > 0.3).to(DEVICE) if with_keep else None
    params = spqr.SpQRParams(bits=3).model_copy(update=update)
    weight, hessian = weight.to(DEVICE), (x.T @ x).to(DEVICE)
    (w_loop, p_loop), (w_fused, p_fused) = _both(monkeypatch, spqr, lambda: spqr.spqr_quantize(weight, hessian, params, keep))
    if DEVICE == "cpu":  # the interpreter sums in numpy's order, as torch on the CPU: bit for bit here
        assert torch.equal(p_fused.codes, p_loop.codes) and torch.equal(w_fused, w_loop)
    assert (p_fused.codes != p_loop.codes).float().mean() < 0.01
    assert (w_fused != w_loop).float().mean() < 0.01 and torch.allclose(w_fused, w_loop, rtol=0, atol=0.05)
    for name in ("scale", "zero"):
        found, expected = getattr(p_fused, name), getattr(p_loop, name)
        if isinstance(expected, torch.Tensor):
            assert (found != expected).float().mean() < 0.02, name
        else:
            assert (found.codes != expected.codes).float().mean() < 0.02 and (found.step != expected.step).float().mean() < 0.05, name
    loop_outliers, fused_outliers = (_outlier_mask(packed, rows, cols) for packed in (p_loop, p_fused))
    assert (fused_outliers ^ loop_outliers).sum() <= max(2, loop_outliers.sum() // 20)
    if update.get("outlier_threshold") == float("inf"):
        assert not fused_outliers.any()
    else:
        assert loop_outliers.any() and fused_outliers.any()
    if with_keep:
        assert not w_fused[~keep].any()


def _outlier_mask(packed, rows: int, cols: int) -> torch.Tensor:
    found = torch.zeros(rows, cols, dtype=torch.bool)
    if packed.outliers is not None:
        r, c = packed.outliers.positions()
        found[r.cpu(), c.cpu()] = True
    return found


def test_rules_fall_back_where_the_kernel_does_not_apply(problem):
    weight, hessian, _ = problem
    rule = gptq.GPTQRule(weight.clone(), 4, 96, False, None)  # groups of 96 straddle 128-column blocks
    assert rule.fused_spec(0, weight[:, :128]) is None
    static = gptq.GPTQRule(weight.clone(), 4, 128, False, None, static_groups=True)
    assert static.fused_spec(0, weight[:, :128]) is None
    previous = sparsegpt._SparseGPTRule(0.5, "unstructured", torch.ones_like(weight, dtype=torch.bool), weight.shape, weight.device)
    assert previous.fused_spec(0, weight[:, :128]) is None
    assert not obs.fused_available(torch.zeros(1))  # a CPU weight: the column loop by default
