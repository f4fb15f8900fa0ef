"""Gates and routers are left out unless a stage names them: Qwen2-MoE's `mlp.shared_expert_gate` (a
[1, hidden] Linear scaling the shared expert) is no target of `*`, is listed in left_out, and a
pattern that spells out its name selects it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fast_recipe

from compress.errors import CompressError
from compress.pipeline.plan import build_plan
from compress.recipe import validate_recipe

GATE = "model.layers.0.mlp.shared_expert_gate"


@pytest.fixture(scope="module")
def tiny_qwen2_moe(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

    from compress.model.load import embedded_model_path

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        vocab_size=8192, hidden_size=32, intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny-qwen2-moe")
    Qwen2MoeForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(path)
    return path


def _plan(model: Path, *stages):
    return build_plan(validate_recipe(fast_recipe(*stages, model={"source": str(model)}), name="gates"))


def test_shared_expert_gate_is_left_out_by_default(tiny_qwen2_moe):
    plan = _plan(tiny_qwen2_moe, {"method": "wanda", "sparsity": 0.5}, {"method": "rtn", "bits": 4, "group_size": None})
    for stage in plan.stages:
        names = [t["name"] for t in stage.targets]
        assert not any("shared_expert_gate" in name for name in names)
        assert "model.layers.0.mlp.shared_expert.gate_proj" in names  # an MLP weight, not a gate
    for block in range(2):
        assert "explicitly" in plan.left_out[f"model.layers.{block}.mlp.shared_expert_gate"]
    assert "router" in plan.left_out["model.layers.0.mlp.gate"]


@pytest.mark.parametrize("pattern", ["*.shared_expert_gate", GATE, r"re:model\.layers\.\d+\.mlp\.shared_expert_gate"])
def test_a_pattern_naming_the_gate_selects_it(tiny_qwen2_moe, pattern):
    plan = _plan(tiny_qwen2_moe, {"method": "rtn", "bits": 8, "group_size": None, "targets": {"include": [pattern]}})
    names = [t["name"] for t in plan.stages[0].targets]
    assert GATE in names and all(name.endswith("shared_expert_gate") for name in names)


@pytest.mark.parametrize("pattern", ["*_gate", "*gate", "re:.*gate"])
def test_a_wildcard_never_selects_a_gate(tiny_qwen2_moe, pattern):
    with pytest.raises(CompressError, match="only gates/routers"):
        _plan(tiny_qwen2_moe, {"method": "rtn", "bits": 8, "group_size": None, "targets": {"include": [pattern]}})



def test_a_wildcard_over_gates_and_weights_takes_the_weights_only(tiny_qwen2_moe):
    plan = _plan(tiny_qwen2_moe, {"method": "rtn", "bits": 8, "group_size": None, "targets": {"include": ["*.mlp.*"]}})
    names = [t["name"] for t in plan.stages[0].targets]
    assert "model.layers.0.mlp.shared_expert.up_proj" in names and not any("shared_expert_gate" in name for name in names)
