"""CAST: AdamS is Adam where no mask applies and pulls pruned weights to zero where one does; a CAST
stage leaves every target exactly N:M with its scales folded (a plain HF model loads it), hands its
masks to later stages, and its tracked run has loss curves; fixed-mask fine-tuning keeps every zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import exported_tensors, fast_recipe, output_bytes
from transformers import AutoModelForCausalLM

import compress
from compress.errors import CompressError
from compress.methods.adams import AdamS, adams_update
from compress.methods.cast import CastParams, CastTask
from compress.pipeline.engine import run
from compress.pipeline.store import StepStore
from compress.recipe import validate_recipe

TRAIN = {"steps": 12, "seqlen": 64, "batch_size": 2, "warmup_steps": 2, "log_every": 4, "checkpoint_every": 0, "lr": 1e-3}


def test_adams_without_a_mask_is_adam():
    torch.manual_seed(0)
    ours, reference = torch.nn.Parameter(torch.randn(6, 8)), None
    reference = torch.nn.Parameter(ours.detach().clone())
    mine = AdamS([ours], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    theirs = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(6, 8)
        ours.grad, reference.grad = grad.clone(), grad.clone()
        mine.step()
        theirs.step()
    torch.testing.assert_close(ours.detach(), reference.detach(), rtol=1e-5, atol=1e-6)


def test_adams_pulls_only_the_pruned_weights_toward_zero():
    torch.manual_seed(0)
    weight = torch.randn(4, 8)
    pruned = torch.zeros(4, 8, dtype=torch.bool)
    pruned[:, ::2] = True
    start = weight.clone()
    exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
    for step in range(1, 21):  # no loss gradient: only the pull acts
        adams_update(weight, torch.zeros_like(weight), exp_avg, exp_avg_sq, step, lr=0.01, betas=(0.9, 0.999), eps=1e-8,
                     pruned=pruned, strength=1.0, decay=1e-3)
    assert torch.equal(weight[~pruned], start[~pruned])
    assert (weight[pruned].abs() < start[pruned].abs()).all()
    # a normalised pull of lr a step: 0.2 over 20 steps, then it hovers within lr of zero
    expected = (start[pruned].abs() - 0.2).clamp_min(0)
    assert ((weight[pruned].abs() - expected).abs() <= 0.01 + 1e-4).all()


def test_cast_params_check_what_they_can():
    with pytest.raises(ValueError, match="N:M pattern"):
        CastParams(pattern="unstructured")
    with pytest.raises(ValueError, match="multiple of M=8"):
        CastParams(pattern="2:8", scale_group_size=12)
    assert CastParams().kl_weight == pytest.approx(1 / 3) and CastParams().mask_interval == 10


def test_the_activation_score_keeps_the_weights_of_loud_input_columns():
    """|W| alone would keep columns 2 and 3 of every group of four (the larger weights); column 0 sees
    inputs 100x louder, so |W| x RMS(x) keeps it."""
    from compress.model.targets import Target
    from compress.state import CompressionState

    layer = torch.nn.Linear(8, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]).repeat(3, 2))
    target = Target("layer", layer, "weight", 0)
    for score, kept in (("magnitude", [2, 3]), ("activation", [0, 3])):
        task = CastTask([target], CastParams(mask_score=score, weight_scaling=False), CompressionState())
        x = torch.ones(16, 8)
        x[:, 0::4] *= 100.0
        layer.train()
        layer(x)
        state = CompressionState()
        task.finish(state)
        mask = state.mask("layer")
        assert mask.view(3, 2, 4).sum(-1).eq(2).all()  # exactly 2:4
        assert mask.view(3, 2, 4)[..., kept].all(), score
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]).repeat(3, 2))


def test_a_cast_stage_ends_exactly_2_of_4_with_folded_scales_and_later_stages_keep_it(tmp_path):
    out = tmp_path / "out"
    report = compress.run(fast_recipe({"method": "cast", **TRAIN}, {"method": "gptq", "bits": 4, "group_size": 32},
                                      output={"hf": True}, evaluate={"layer_error": False}), out=out, track=False)
    training = report["stages"][0]["training"]
    assert training["steps"] == 12 and training["tokens"] == 12 * 2 * 64
    tensors = exported_tensors(out)
    original = AutoModelForCausalLM.from_pretrained(str(compress.embedded_model()))
    loaded = AutoModelForCausalLM.from_pretrained(str(out / "model"))  # a plain HF model: no scales left over
    assert set(loaded.state_dict()) == set(original.state_dict())
    checked = 0
    for name, tensor in tensors.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            groups = (tensor != 0).reshape(tensor.shape[0], -1, 4).sum(-1)
            assert (groups <= 2).all(), name  # the zeros survive the 4-bit stage after it
            checked += 1
    assert checked == 28
    assert report["metrics"]["sparsity"] >= 0.5 - 1e-6 and report["metrics"]["verify_ok"] == 1
    target = report["targets"]["model.layers.0.mlp.up_proj"]
    assert target["stages"] == ["cast", "gptq"] and target["format"] == "sparse_quant"  # packed: 2:4 positions + 4-bit values


def test_cast_refuses_fused_moe_experts_before_any_work(tiny_mixtral, tmp_path):
    recipe = fast_recipe({"method": "cast", **TRAIN}, model={"source": str(tiny_mixtral)})
    with pytest.raises(CompressError, match="cast trains Linear layers.*experts"):
        compress.run(recipe, out=tmp_path / "out", track=False)
    assert not (tmp_path / "out").exists()


def test_fixed_mask_finetuning_keeps_every_zero(tmp_path):
    out = tmp_path / "out"
    compress.run(fast_recipe({"method": "wanda", "pattern": "2:4"}, {"method": "finetune", **TRAIN, "kl_weight": 0.5},
                             evaluate={"layer_error": False}), out=out, track=False)
    pruned = tmp_path / "pruned"
    compress.run(fast_recipe({"method": "wanda", "pattern": "2:4"}, evaluate={"layer_error": False}), out=pruned, track=False)
    after, before = exported_tensors(out), exported_tensors(pruned)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(after[name] == 0, before[name] == 0)  # the same mask, exactly
    assert not torch.equal(after[name], before[name])  # the kept weights trained
    assert not torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # and the rest of the model


def test_a_tracked_training_stage_has_loss_curves(tmp_path):
    from compress.service.tracking import client

    report = compress.run(fast_recipe({"method": "cast", **TRAIN}, evaluate={"layer_error": False}), out=tmp_path / "out")
    mlflow = client()
    parent = report["tracking"]["mlflow_run_id"]
    children = mlflow.search_runs([mlflow.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    stage = next(run for run in children if run.data.tags.get("compress.step", "").startswith("stage 0"))
    loss = mlflow.get_metric_history(stage.info.run_id, "train/loss")
    assert [point.step for point in loss] == [4, 8, 12]
    assert {"train/lr", "train/kl", "train/ce", "train/mask_flipped"} <= set(stage.data.metrics)


def test_a_cast_stage_killed_after_a_checkpoint_resumes_to_the_same_output(tmp_path):
    """SIGKILL right after the second checkpoint (step 8 of 12); the same command again resumes there
    and writes the bytes of an uninterrupted run."""
    recipe = fast_recipe({"method": "cast", **TRAIN, "checkpoint_every": 4}, evaluate={"layer_error": False})
    script = (
        "import json, os, signal, sys; import compress.train.loop as loop; saved = loop.save_checkpoint\n"
        "def save_then_die(folder, state):\n"
        "    saved(folder, state)\n"
        "    if state['step'] == 8: os.kill(os.getpid(), signal.SIGKILL)\n"
        "loop.save_checkpoint = save_then_die\n"
        "from compress.pipeline.engine import run; from compress.recipe import validate_recipe; from compress.pipeline.store import StepStore\n"
        "run(validate_recipe(json.loads(sys.argv[1])), sys.argv[2], store=StepStore(sys.argv[3]))\n"
    )
    store = tmp_path / "steps"
    killed = subprocess.run([sys.executable, "-c", script, json.dumps(recipe), str(tmp_path / "out"), str(store)],
                            env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    resumed = run(validate_recipe(recipe), tmp_path / "out", store=StepStore(store))
    assert resumed["stages"][0]["training"]["resumed_at_step"] == 8
    assert not any(p.name.startswith(".") for p in store.iterdir())  # the checkpoints went with the finished stage
    fresh = run(validate_recipe(recipe), tmp_path / "fresh", store=StepStore(tmp_path / "fresh-steps"))
    assert fresh["stages"][0]["training"]["resumed_at_step"] == 0
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "fresh")
