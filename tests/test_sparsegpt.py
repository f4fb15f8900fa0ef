"""SparseGPT's core against properties that hold by construction and an independent transcription of
the reference's `fasterprune` loop."""

import pytest
import torch

from compress.errors import CompressError
from compress.methods.obs import inverse_hessian_factor
from compress.methods.sparsegpt import SparseGPT, sparsegpt_prune
from compress.recipe import validate_recipe


def _layer(rows=32, columns=64, tokens=512, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    # correlated inputs, so that compensation has something to exploit
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5 + torch.eye(columns)
    inputs = torch.randn(tokens, columns, generator=generator) @ mixing
    return weight, inputs, inputs.T @ inputs


def _output_error(weight, new_weight, inputs):
    return ((inputs @ weight.T - inputs @ new_weight.T).pow(2).sum() / (inputs @ weight.T).pow(2).sum()).item()


def test_sparsity_zero_returns_the_weights_unchanged():
    weight, _, hessian = _layer()
    pruned, keep = sparsegpt_prune(weight, hessian, 0.0)
    assert keep.all()
    assert torch.equal(pruned, weight)


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5), ("4:8", 0.5)])
def test_exact_sparsity_and_compensation_beats_masking_alone(pattern, sparsity):
    weight, inputs, hessian = _layer()
    pruned, keep = sparsegpt_prune(weight, hessian, sparsity, pattern, block_size=16)
    assert torch.equal(pruned == 0, ~keep)
    if pattern == "unstructured":
        assert (~keep).sum() == 4 * int(32 * 16 * sparsity)  # the same count in every block of 16 columns
    else:
        n, m = map(int, pattern.split(":"))
        assert (keep.view(32, -1, m).sum(-1) == n).all()
    # the reconstruction lowers the output error well below that of the same mask without updates
    assert _output_error(weight, pruned, inputs) < 0.8 * _output_error(weight, weight * keep, inputs)


def test_earlier_zeros_stay_zero():
    weight, _, hessian = _layer(seed=1)
    previous = torch.rand(weight.shape, generator=torch.Generator().manual_seed(5)) > 0.3
    pruned, keep = sparsegpt_prune(weight, hessian, 0.5, "2:4", previous_mask=previous, block_size=16)
    assert not (keep & ~previous).any()
    assert (pruned[~previous] == 0).all()


def _reference_fasterprune(weight, hessian, sparsity, blocksize, percdamp):
    """The reference loop (IST-DASLab/sparsegpt, unstructured), with the mask count made exact."""
    W = weight.clone().float()
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H[range(H.shape[0]), range(H.shape[0])] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        order = torch.sort(tmp.flatten(), stable=True).indices[: int(tmp.numel() * sparsity)]
        mask1 = torch.zeros(tmp.numel(), dtype=torch.bool)
        mask1[order] = True
        mask1 = mask1.view_as(tmp)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def test_matches_the_reference_loop():
    weight, _, hessian = _layer(seed=2)
    hessian[3, :] = 0  # a dead input
    hessian[:, 3] = 0
    pruned, _ = sparsegpt_prune(weight, hessian, 0.6, block_size=16, damp=0.01)
    expected = _reference_fasterprune(weight, hessian, 0.6, 16, 0.01)
    assert torch.allclose(pruned, expected, atol=1e-5, rtol=1e-5)


def test_singular_hessian_gets_more_damping():
    inputs = torch.randn(2, 8)  # rank 2 of 8
    inverse = inverse_hessian_factor(inputs.T @ inputs, 1e-12, retries=10)
    assert inverse.damp > 1e-12
    with pytest.raises(CompressError, match="not positive definite"):
        inverse_hessian_factor(-torch.eye(8), 0.01, retries=1)


def test_no_tokens_falls_back_to_magnitude_per_block():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    params = SparseGPT.Params(sparsity=0.5, block_size=32)
    result = SparseGPT(params).compress_target(weight, {}, None)
    threshold = weight.abs().flatten().sort().values[128]
    assert torch.equal(result.mask, weight.abs() >= threshold)


def test_block_size_must_hold_whole_groups():
    with pytest.raises(CompressError, match="multiple of M=8"):
        validate_recipe({"stages": [{"method": "sparsegpt", "pattern": "4:8", "block_size": 12}]})
