"""SpQR's core: lossless at 16 bits, better than GPTQ on the layer output, outliers only where kept,
and its packed form rebuilds exactly what it computed."""

import pytest
import torch

from compress.formats.packed_file import read_packed, write_packed
from compress.methods.gptq import gptq_quantize
from compress.methods.sparsegpt import sparsegpt_prune
from compress.methods.spqr import SpQRParams, leave_one_out_error, spqr_quantize


def _layer(rows=64, columns=128, tokens=2048, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    weight[torch.rand(rows, columns, generator=generator) < 0.01] *= 8  # a few large weights, as in LLMs
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5 + torch.eye(columns)
    scales = torch.rand(columns, generator=generator) * 3 + 0.1
    inputs = (torch.randn(tokens, columns, generator=generator) @ mixing) * scales
    return weight, inputs, inputs.T @ inputs


def _output_error(weight, new_weight, inputs):
    return ((inputs @ weight.T - inputs @ new_weight.T).pow(2).sum() / (inputs @ weight.T).pow(2).sum()).item()


def test_16_bits_is_lossless_within_fp_tolerance():
    weight, _, hessian = _layer()
    params = SpQRParams(bits=16, qq_scale_bits=None, qq_zero_bits=None)
    quantized, _ = spqr_quantize(weight, hessian, params)
    assert torch.allclose(quantized, weight, atol=1e-3 * weight.abs().max().item())


def test_beats_gptq_on_the_layer_output():
    weight, inputs, hessian = _layer()
    spqr, packed = spqr_quantize(weight, hessian, SpQRParams(bits=3))
    gptq, _ = gptq_quantize(weight, hessian, 3, 128)
    gptq_small_groups, _ = gptq_quantize(weight, hessian, 3, 16)
    assert 0 < packed.outliers.count < 0.05 * weight.numel()
    assert _output_error(weight, spqr, inputs) < 0.8 * _output_error(weight, gptq, inputs)
    assert _output_error(weight, spqr, inputs) < _output_error(weight, gptq_small_groups, inputs)


def test_threshold_controls_outliers_and_inf_turns_them_off():
    weight, _, hessian = _layer()
    counts = [spqr_quantize(weight, hessian, SpQRParams(bits=3, outlier_threshold=t))[1].outliers.count for t in (0.05, 0.2, 1.0)]
    assert counts[0] > counts[1] > counts[2]
    assert spqr_quantize(weight, hessian, SpQRParams(bits=3, outlier_threshold=float("inf")))[1].outliers.count == 0


def test_packed_form_round_trips_bit_for_bit(tmp_path):
    weight, _, hessian = _layer()
    quantized, packed = spqr_quantize(weight, hessian, SpQRParams(bits=3))
    write_packed(tmp_path / "p.safetensors", {"layer": packed})
    assert torch.equal(read_packed(tmp_path / "p.safetensors")["layer"].dequantize(), quantized)


@pytest.mark.parametrize("order", ["act_order", "identity"])
def test_pruned_weights_stay_zero_and_are_never_outliers(order):
    weight, inputs, hessian = _layer(seed=1)
    pruned, keep = sparsegpt_prune(weight, hessian, 0.5, "2:4", block_size=32)
    quantized, packed = spqr_quantize(pruned, hessian, SpQRParams(bits=3, permutation_order=order), keep)
    assert (quantized[~keep] == 0).all()
    assert ((quantized != 0).view(64, -1, 4).sum(-1) <= 2).all()
    rows, cols = packed.outliers.positions()
    stored_keep = packed.keep  # in the stored (permuted) column order
    assert packed.outliers.count > 0 and stored_keep[rows, cols].all()


def test_leave_one_out_flags_the_weight_that_stretches_the_grid():
    group = torch.tensor([[0.1, -0.2, 0.15, 0.05, 5.0, -0.1, 0.2, 0.0]])
    reduction = leave_one_out_error(group, torch.ones(8), bits=3)
    assert reduction.argmax().item() == 4 and reduction[0, 4] > 0
