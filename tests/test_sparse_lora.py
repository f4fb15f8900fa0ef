"""Sparse LoRA: the merge keeps every zero (and every 2:4 group) of the pruned model, the unmerged
adapter loads with peft on the pruned model and gives the merged weights once masked, and SoRA's gates
remove ranks from the exported adapter."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import exported_tensors, fast_recipe
from peft import PeftModel
from transformers import AutoModelForCausalLM

import compress
from compress.errors import CompressError
from compress.methods.quantized_base import nf4_weight
from compress.methods.sparse_lora import LoraTask, SparseLoraParams
from compress.model.targets import discover
from compress.state import CompressionState

TRAIN = {"steps": 8, "seqlen": 64, "batch_size": 2, "warmup_steps": 1, "log_every": 4, "checkpoint_every": 0, "lr": 2e-3, "rank": 4}
QUIET = {"evaluate": {"layer_error": False}}


def _pruned_and_adapted(tmp_path, pattern: str, lora: dict) -> tuple[dict, dict, dict]:
    prune = {"method": "wanda", "pattern": pattern} if ":" in pattern else {"method": "wanda", "sparsity": float(pattern)}
    adapted = compress.run(fast_recipe(prune, {"method": "sparse_lora", **TRAIN, **lora}, **QUIET), out=tmp_path / "adapted", track=False)
    compress.run(fast_recipe(prune, output={"hf": True}, **QUIET), out=tmp_path / "pruned", track=False)
    return adapted, exported_tensors(tmp_path / "adapted"), exported_tensors(tmp_path / "pruned")


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_the_merge_keeps_every_zero_of_the_pruned_model(tmp_path, pattern):
    report, adapted, pruned = _pruned_and_adapted(tmp_path, pattern, {})
    changed = 0
    for name, weight in pruned.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            assert torch.equal(adapted[name] == 0, weight == 0), name  # exactly the same zeros
            changed += not torch.equal(adapted[name], weight)
    assert changed == 28  # and every target learned something
    assert report["metrics"]["sparsity"] == pytest.approx(0.5, abs=1e-3) and report["metrics"]["verify_ok"] == 1
    assert report["stages"][1]["training"]["steps"] == 8 and report["stages"][1]["adapter"]["ranks"]["initial"] == 4


def test_the_unmerged_adapter_loads_with_peft_on_the_pruned_model(tmp_path):
    _, adapted, _ = _pruned_and_adapted(tmp_path, "0.5", {})
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned" / "model"), dtype=torch.float32)
    zeros = {n: p == 0 for n, p in base.state_dict().items() if n.endswith("proj.weight")}
    merged = PeftModel.from_pretrained(base, str(tmp_path / "adapted" / "adapter")).merge_and_unload()
    for name, weight in merged.state_dict().items():
        if name in zeros:
            assert (weight[zeros[name]] != 0).any(), name  # peft's own merge fills the pruned weights ...
            masked = (weight * ~zeros[name]).to(torch.bfloat16)
            torch.testing.assert_close(masked.float(), adapted[name].float(), rtol=0.02, atol=2e-3)  # ... ours is it, masked


def test_on_an_unpruned_model_peft_with_the_adapter_gives_the_merged_models_logits(tmp_path):
    """No mask: our merge is peft's merge, so the exported model and the original model with the
    adapter loaded by peft compute the same logits."""
    compress.run(fast_recipe({"method": "sparse_lora", **TRAIN}, output={"hf": True}, **QUIET), out=tmp_path / "out", track=False)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "model"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(compress.embedded_model()), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapter"))
    ids = torch.randint(0, base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, peft_logits = merged(ids).logits, adapted(ids).logits
        with adapted.disable_adapter():
            before = adapted(ids).logits
    scale = before.abs().max()
    assert (peft_logits - before).abs().max() > 0.05 * scale  # the adapter changes the model (by more than the tolerance) ...
    torch.testing.assert_close(ours, peft_logits, rtol=0, atol=0.01 * float(scale))  # ... and both routes agree


def test_sora_drops_the_closed_ranks_and_folds_the_gate_into_b(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(compress.embedded_model()), dtype=torch.float32)
    targets = [t for t in discover(model).targets if t.name.endswith("mlp.up_proj")]
    before = {t.name: t.weight.clone() for t in targets}
    task = LoraTask(model, targets, SparseLoraParams(rank=4, alpha=8.0, sora=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, layer in task.layers.items():
            layer.lora_B["default"].weight.normal_()
            task.gates[name].copy_(torch.tensor([0.5, 0.0, -2.0, 0.0]))
    expected = {}
    for name, layer in task.layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected[name] = before[name] + 2.0 * b @ torch.diag(task.gates[name].detach()) @ a
    state = CompressionState()
    info = task.finish(model, state, tmp_path / "adapter")
    assert info["ranks"]["mean_kept"] == 2
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {2}
    for target in targets:
        assert isinstance(model.get_submodule(target.name), torch.nn.Linear)  # the plain layer is back
        torch.testing.assert_close(target.weight, expected[target.name], rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(str(compress.embedded_model()), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()
    for target in targets:
        torch.testing.assert_close(adapted.get_submodule(target.name).weight, expected[target.name], rtol=1e-5, atol=1e-5)


def test_a_sora_penalty_that_closes_every_rank_is_reported(tmp_path):
    with pytest.raises(CompressError, match="sparse_lora\\) changed no weight"):
        compress.run(fast_recipe({"method": "wanda", "sparsity": 0.5}, {"method": "sparse_lora", **TRAIN, "sora": True, "sora_lambda": 1e4}, **QUIET),
                     out=tmp_path / "out", track=False)


def test_sparse_lora_refuses_fused_experts(tiny_mixtral, tmp_path):
    with pytest.raises(CompressError, match="sparse_lora adapts Linear layers.*exclude the experts"):
        compress.run(fast_recipe({"method": "sparse_lora", **TRAIN}, model={"source": str(tiny_mixtral)}), out=tmp_path / "out", track=False)


def test_a_training_stage_after_quantization_drops_the_stale_codes(tmp_path):
    """LoRA merged into a quantized model changes its weights: the 4-bit codes no longer describe them,
    so the export stores those targets unquantized (and still verifies) instead of the stale codes."""
    report = compress.run(fast_recipe({"method": "gptq", "bits": 4, "group_size": 32}, {"method": "sparse_lora", **TRAIN}, **QUIET),
                          out=tmp_path / "out", track=False)
    target = report["targets"]["model.layers.0.mlp.up_proj"]
    assert target["stages"] == ["gptq", "sparse_lora"] and target["quantized"] is None
    assert report["metrics"]["verify_ok"] == 1 and report["audit"]["ok"]


def _bitsandbytes():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: the NF4 base cannot be built")


def test_an_nf4_base_trains_over_4_bit_codes_and_merges_into_the_full_precision_weights(tmp_path):
    bnb = _bitsandbytes()
    model = AutoModelForCausalLM.from_pretrained(str(compress.embedded_model()), dtype=torch.float32)
    targets = [t for t in discover(model).targets if t.name.endswith("mlp.down_proj")]
    before = {t.name: t.weight.clone() for t in targets}
    mask = {t.name: torch.rand_like(before[t.name]) > 0.5 for t in targets}
    state = CompressionState()
    for target in targets:
        before[target.name] *= mask[target.name]
        target.module.weight.data.copy_(before[target.name])
        state.get(target.name).mask = mask[target.name]
    task = LoraTask(model, targets, SparseLoraParams(rank=4, alpha=4.0, base_quantization="nf4"))
    for name, layer in task.layers.items():
        base = layer.base_layer
        assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8  # 4-bit codes, two a byte
        assert base.weight.numel() * 2 == before[name].numel()
        rounded = nf4_weight(base)
        assert (rounded[before[name] == 0] == 0).all()  # NF4 keeps the zeros
        assert not torch.equal(rounded, before[name])  # and rounds the rest
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in task.layers.values():
            layer.lora_B["default"].weight.normal_()
    deltas = {name: layer.lora_B["default"].weight @ layer.lora_A["default"].weight for name, layer in task.layers.items()}
    task.finish(model, state, None)
    for target in targets:
        layer = model.get_submodule(target.name)
        assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
        # the full-precision weight plus the masked delta: no NF4 rounding reaches the merged model
        torch.testing.assert_close(layer.weight, (before[target.name] + deltas[target.name]) * mask[target.name], rtol=1e-6, atol=1e-6)


def test_a_pipeline_with_an_nf4_base_keeps_the_zeros_and_verifies(tmp_path):
    _bitsandbytes()
    report, adapted, pruned = _pruned_and_adapted(tmp_path, "2:4", {"base_quantization": "nf4"})
    for name, weight in pruned.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            assert torch.equal(adapted[name] == 0, weight == 0), name
    curve = report["stages"][1]["training"]
    assert curve["steps"] == 8 and report["metrics"]["verify_ok"] == 1 and report["audit"]["ok"]
