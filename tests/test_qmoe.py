"""QMoE: ternary GPTQ on MoE experts, the dictionary-coded export, the packed experts module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fast_recipe

import compress
from compress.errors import CompressError
from compress.formats import ternary_dict
from compress.methods.qmoe import QMoE, QMoEParams, qmoe_ternary
from compress.pipeline.engine import run
from compress.recipe import validate_recipe

SHARED_MOE = Path(__file__).resolve().parents[2] / "shared" / "models" / "shakespeare-mixtral-6m"


def _layer(rows: int = 48, cols: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    inputs = torch.randn(512, cols, generator=generator) @ torch.randn(cols, cols, generator=generator) * 0.3  # correlated inputs
    return weight, inputs, inputs.T @ inputs


def test_every_row_holds_exactly_min_zero_max_and_the_format_rebuilds_it():
    weight, _, hessian = _layer()
    quantized, packed = qmoe_ternary(weight, hessian)
    for row, (low, high) in zip(quantized, packed.lut[:, 1:3].float()):
        assert set(row.unique().tolist()) <= {0.0, low.item(), high.item()} and low < 0 < high
    stored = ternary_dict.from_quantized(packed)
    assert torch.equal(ternary_dict.unpack(stored), quantized)
    assert torch.equal(quantized.bfloat16().float(), quantized)  # exact in a bf16 checkpoint too


def test_ternary_gptq_beats_ternary_rounding_on_the_layer_output():
    weight, inputs, hessian = _layer(seed=1)
    gptq, _ = qmoe_ternary(weight, hessian)
    rounded, _ = qmoe_ternary(weight, None)
    error = lambda w: float((inputs @ (w - weight).T).pow(2).sum())  # noqa: E731
    assert error(gptq) < 0.7 * error(rounded)


def test_an_expert_without_tokens_is_rounded_in_the_same_grid():
    weight, _, _ = _layer(seed=2)
    method = QMoE(QMoEParams())
    result = method.compress_target(weight, {}, None)  # what the engine hands an expert no token reached
    assert torch.equal(result.weight, qmoe_ternary(weight, None)[0]) and result.quantized.ternary


def test_two_bit_grid_and_rounding_only():
    weight, inputs, hessian = _layer(seed=3)
    method = QMoE(QMoEParams(grid="int2"))
    result = method.compress_target(weight, {"hessian": hessian}, None)
    assert result.quantized.bits == 2 and result.quantized.group_size == weight.shape[1] and not result.quantized.ternary
    assert all(row.unique().numel() <= 4 for row in result.weight)
    rounded = QMoE(QMoEParams(grid="int2", rounding_only=True)).compress_target(weight, {"hessian": hessian}, None)
    error = lambda w: float((inputs @ (w - weight).T).pow(2).sum())  # noqa: E731
    assert error(result.weight) < error(rounded.weight)


def test_a_dense_model_is_refused_before_calibration(tmp_path):
    recipe = validate_recipe(fast_recipe({"method": "qmoe"}))
    with pytest.raises(CompressError, match="qmoe compresses MoE experts"):
        compress.run(recipe, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _unreachable_experts_model(tiny_mixtral: Path, folder: Path) -> Path:
    """The tiny Mixtral with top-1 routing whose router sends every token to expert 0 or 1 (logits
    ±a*h_0 for those, 0 for experts 2 and 3): experts 2 and 3 never see a calibration token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    model.config.num_experts_per_tok = 1
    for layer in model.model.layers:
        layer.mlp.gate.top_k = 1
        weight = torch.zeros_like(layer.mlp.gate.weight)
        weight[0, 0], weight[1, 0] = 50.0, -50.0
        layer.mlp.gate.weight.data = weight
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_mixtral).save_pretrained(folder)
    return folder


def test_moe_export_is_dictionary_coded_loads_and_names_unreached_experts(tiny_mixtral, tmp_path):
    model = _unreachable_experts_model(tiny_mixtral, tmp_path / "model")
    recipe = fast_recipe({"method": "qmoe"}, model={"source": str(model)}, evaluate={"dense": False})
    report = run(validate_recipe(recipe), tmp_path / "out")
    experts = [name for name, t in report["targets"].items() if t["fused_expert"]]
    assert experts and all(report["targets"][name]["format"] == "ternary_dict" for name in experts)
    assert "model.layers.0.mlp.experts.2.gate_up_proj" in report["stages"][0]["no_calibration_tokens"]
    assert report["targets"]["model.layers.0.mlp.experts.0.gate_up_proj"]["calibration_tokens"] > 0
    assert report["audit"]["ok"] and report["verify"]["verify_ok"]
    metrics = report["metrics"]
    assert metrics["expert_bits_per_param"] > 0 and "expert_bits_per_param_static_dictionary" in metrics
    loaded = compress.load(tmp_path / "out")
    experts_module = loaded.model.layers[0].mlp.experts
    assert type(experts_module).__name__ == "PackedExperts"
    assert not any(p.dim() == 3 for p in experts_module.parameters())  # no dense expert weight anywhere
    assert type(experts_module._modules["1"].down_proj).__name__ == "TernaryDictLinear"


@pytest.mark.skipif(not SHARED_MOE.is_dir(), reason="the shared MoE model is not beside the repository")
def test_qmoe_ternary_is_far_better_than_ternary_rounding_on_the_shared_moe(tmp_path):
    perplexity = {}
    for rounding_only in (False, True):
        recipe = fast_recipe({"method": "qmoe", "rounding_only": rounding_only}, model={"source": str(SHARED_MOE)},
                             output={"verify": False})
        perplexity[rounding_only] = run(validate_recipe(recipe), tmp_path / str(rounding_only))["metrics"]["perplexity"]
    assert perplexity[False] < 0.6 * perplexity[True], perplexity


def test_experts_swept_together_match_one_at_a_time():
    layers = [_layer(rows=24, cols=64, seed=10 + e) for e in range(3)]
    weights = torch.stack([w for w, _, _ in layers])
    statistics = [{"hessian": h} for _, _, h in layers[:2]] + [{}]  # the third expert saw no token: rounded
    method = QMoE(QMoEParams())
    together = method.compress_experts(weights, statistics, None)
    for e, result in enumerate(together):
        alone = method.compress_target(weights[e], statistics[e], None)
        assert (result.quantized.codes == alone.quantized.codes).float().mean() > 0.99
        assert torch.equal(result.quantized.lut, alone.quantized.lut) and result.quantized.ternary
    assert QMoE(QMoEParams(grid="int2")).compress_experts(weights, statistics, None) is None  # one by one
