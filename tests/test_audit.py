"""`compress audit`: a finished output checked against its report from the files alone; a
deliberately corrupted output (one target re-densified) is caught and named."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fast_recipe, output_bytes
from safetensors.torch import load_file, save_file

from compress.cli import main
from compress.model.load import embedded_model_path
from compress.pipeline.audit import audit_output
from compress.pipeline.engine import run
from compress.recipe import validate_recipe

VICTIM = "model.layers.1.mlp.up_proj"


def test_clean_output_passes_and_a_redensified_target_is_caught(tmp_path, capsys):
    out = tmp_path / "out"
    report = run(validate_recipe(fast_recipe({"method": "wanda", "sparsity": 0.5, "pattern": "2:4"},
                                             {"method": "rtn", "bits": 4})), out)
    assert report["audit"]["ok"] and report["metrics"]["audit_ok"] == 1
    assert report["audit"]["checked"] == len(report["targets"]) == 28
    assert report["targets"][VICTIM]["format"] == "sparse_quant"

    # the victim's packed tensors replaced by its dense weight, as if it had never been compressed
    weights_file = out / "packed" / "model.safetensors"
    weights = load_file(str(weights_file))
    for key in [key for key in weights if key.startswith(f"{VICTIM}.")]:
        del weights[key]
    dense = load_file(str(embedded_model_path() / "model.safetensors"))
    weights[f"{VICTIM}.weight"] = dense[f"{VICTIM}.weight"]
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    config = json.loads((out / "packed" / "config.json").read_text())
    del config["quantization_config"]["targets"][VICTIM]
    (out / "packed" / "config.json").write_text(json.dumps(config))

    assert main(["audit", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "1 of 28 targets are not what the report says" in printed
    problems = audit_output(out)["problems"]
    assert list(problems) == [VICTIM, "(output)"]
    found = " | ".join(problems[VICTIM])
    assert "sparsity" in found and "2:4 pattern" in found and "stored as dense, report says sparse_quant" in found
    assert "bits/param from the packed bytes" in problems["(output)"][0]


def test_fused_experts_are_audited(tmp_path, tiny_mixtral):
    report = run(validate_recipe(fast_recipe({"method": "wanda", "sparsity": 0.5}, {"method": "gptq", "bits": 3, "group_size": None},
                                             model={"source": str(tiny_mixtral)})), tmp_path / "moe")
    experts = [name for name, t in report["targets"].items() if t["fused_expert"]]
    assert len(experts) == 16 and report["audit"]["ok"] and report["audit"]["checked"] == len(report["targets"])


def test_rerun_leaves_the_caller_rng_untouched_and_is_deterministic(tmp_path):
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    recipe = validate_recipe(fast_recipe({"method": "sparsegpt", "sparsity": 0.5}))
    from compress.pipeline.store import StepStore

    first = run(recipe, tmp_path / "a", store=StepStore(tmp_path / "s1"))
    assert torch.equal(torch.random.get_rng_state(), state)
    second = run(recipe, tmp_path / "b", store=StepStore(tmp_path / "s2"))  # fresh store: computed again
    assert not any(s["cached"] for s in second["stages"])
    assert output_bytes(tmp_path / "a") == output_bytes(tmp_path / "b")
    assert first["metrics"]["perplexity"] == second["metrics"]["perplexity"]


def test_verify_fails_a_corrupted_export_names_the_layer_and_publishes_nothing(tmp_path, monkeypatch):
    """An export whose packed form does not compute what was evaluated (the first packed target's scales
    doubled on the way out) fails the run before the folder appears; the error names that layer."""
    import compress.deploy.packed_model as packed_model
    from compress.errors import CompressError

    honest, calls = packed_model.pack_target, []

    def corrupting_the_first(weight, mask, quantized):
        packed, reason = honest(weight, mask, quantized)
        calls.append(1)
        if len(calls) == 1:
            packed.scale = (packed.scale.float() * 2).half()
        return packed, reason

    monkeypatch.setattr(packed_model, "pack_target", corrupting_the_first)
    out = tmp_path / "out"
    with pytest.raises(CompressError) as error:
        run(validate_recipe(fast_recipe({"method": "rtn", "bits": 4})), out)
    message = str(error.value)
    first = "model.layers.0.mlp.down_proj"  # tensors are packed in name order
    assert message.startswith("verify:") and f"differ: {first}" in message and "not published" in message
    assert not out.exists() and not list(tmp_path.glob(".out*"))
