"""A quantization group size that does not divide a target's input size: the last, shorter group is
quantized like the others (RTN, GPTQ, SpQR), packed, read back bit for bit, counted in bits/param
and accepted by the audit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import checkpoint_tensors, exported_tensors, fast_recipe

import compress
from compress.formats.packed_file import read_packed, write_packed
from compress.methods.gptq import gptq_quantize
from compress.methods.quantization import packed_weight
from compress.methods.rtn import rtn_quantize
from compress.methods.spqr import SpQRParams, spqr_quantize

ROOT = Path(__file__).resolve().parent.parent


def _layer(rows=32, columns=177, tokens=512, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    inputs = torch.randn(tokens, columns, generator=generator)
    return weight, inputs.T @ inputs


def _round_trip(packed, path: Path):
    write_packed(path, {"w": packed})
    return read_packed(path)["w"].dequantize()


def _distinct_per_group(weight: torch.Tensor, group_size: int) -> int:
    return max(weight[row, start : start + group_size].unique().numel()
               for row in range(weight.shape[0]) for start in range(0, weight.shape[1], group_size))


@pytest.mark.parametrize("columns", [176, 177])  # a last group of 48 columns, and of 49
def test_rtn_quantizes_the_last_shorter_group(columns, tmp_path):
    weight, _ = _layer(columns=columns)
    quantized, grids = rtn_quantize(weight, 3, 128)
    packed = packed_weight(quantized, grids, 3, 128)
    assert packed.scale.shape == (32, 2) and packed.group_size == 128
    assert torch.equal(packed.dequantize(), quantized) and torch.equal(_round_trip(packed, tmp_path / "p"), quantized)
    assert _distinct_per_group(quantized, 128) <= 8
    assert torch.equal(quantized[:, 128:], rtn_quantize(weight[:, 128:], 3, None)[0])  # its own grid


@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"static_groups": True}, {"block_size": 48}])
def test_gptq_quantizes_the_last_shorter_group(options, tmp_path):
    weight, hessian = _layer()
    quantized, packed = gptq_quantize(weight, hessian, 3, 128, **options)
    assert packed.scale.shape == (32, 2)
    assert torch.equal(packed.dequantize(), quantized) and torch.equal(_round_trip(packed, tmp_path / "p"), quantized)
    in_packed_order = quantized if packed.perm is None else quantized[:, packed.perm]
    assert _distinct_per_group(in_packed_order, 128) <= 8


@pytest.mark.parametrize("columns", [184, 177])  # a last group of 8 columns, and of 1
def test_spqr_quantizes_the_last_shorter_group(columns, tmp_path):
    weight, hessian = _layer(columns=columns)
    quantized, packed = spqr_quantize(weight, hessian, SpQRParams(bits=3, group_size=16))
    assert packed.scale.codes.shape == (32, -(-columns // 16))
    assert torch.equal(packed.dequantize(), quantized) and torch.equal(_round_trip(packed, tmp_path / "p"), quantized)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random LLaMA whose MLP width (176) is not a multiple of 128 (nor of 48)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama-176")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(compress.embedded_model()).save_pretrained(path)
    return path


def _stages_of(recipe: str) -> list[dict]:
    return yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())["stages"]


@pytest.mark.parametrize("stages", [
    [{**stage, "group_size": 128} for stage in _stages_of("rtn-3bit")],
    [{**stage, "group_size": 128} for stage in _stages_of("gptq-3bit")],
    [{**stage, "group_size": 48, "block_size": 96} for stage in _stages_of("spqr-3bit")],  # 64 = 48 + 16, 176 = 3 x 48 + 32
])
def test_recipes_run_with_partial_groups_and_pass_the_audit(tiny_llama, stages, tmp_path):
    out = tmp_path / "out"
    report = compress.run(fast_recipe(*stages, model={"source": str(tiny_llama)}, output={"hf": True}), out=out, track=False)
    assert report["audit"]["ok"], report["audit"]["problems"]
    group_size = stages[0]["group_size"]
    down = "model.layers.0.mlp.down_proj"
    assert report["targets"][down]["shape"] == [64, 176] and report["targets"][down]["quantized"]["group_size"] == group_size
    checkpoint, exported = checkpoint_tensors(out / "model"), exported_tensors(out)
    assert sum(report["formats"].values()) == 2 * 7 and "dense" not in report["formats"]
    for name in report["targets"]:
        assert torch.equal(exported[f"{name}.weight"], checkpoint[f"{name}.weight"]), name
    assert report["verify"]["verify_ok"]
    assert 3 < report["metrics"]["bits_per_param"] < 8
