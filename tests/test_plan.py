"""`compress plan`: stages resolved against a weightless skeleton; `compress run` fails on the same
errors before anything is calibrated."""

from __future__ import annotations

import json
import os

from conftest import fast_recipe

from compress.cli import main
from compress.pipeline.plan import build_plan
from compress.recipe import validate_recipe


def test_plan_lists_targets_experts_and_left_out(tiny_mixtral):
    recipe = validate_recipe(fast_recipe({"method": "wanda", "sparsity": 0.5}, {"method": "gptq", "bits": 4, "group_size": None},
                                         model={"source": str(tiny_mixtral)}))
    plan = build_plan(recipe)
    wanda, gptq = plan.stages
    experts = [t for t in wanda.targets if t["fused_expert"]]
    assert len(experts) == 2 * 2 * 4  # 2 blocks x (gate_up, down) x 4 experts
    assert any(t["name"] == "model.layers.0.mlp.experts.3.gate_up_proj" and t["shape"] == [96, 32] for t in experts)
    assert gptq.params["bits"] == 4 and wanda.params["sparsity"] == 0.5
    assert all(s.peak_host_bytes > 0 and s.seconds_estimate > 0 for s in plan.stages)
    left_out = " ".join(f"{k} {v}" for k, v in plan.left_out.items())
    assert "lm_head" in left_out and "router" in left_out and "embed_tokens" in left_out and "normalisation" in left_out


def test_run_fails_before_calibration_on_a_pattern_that_matches_nothing(tmp_path, capsys):
    home = os.environ["COMPRESS_HOME"]
    before = set(os.listdir(os.path.join(home, "steps"))) if os.path.isdir(os.path.join(home, "steps")) else set()
    code = main(["run", "recipes/wanda-50.yaml", "--out", str(tmp_path / "out"),
                 "--set", 'stages.0.targets.include=["*.attn_nothing"]'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: stages.0.targets.include pattern '*.attn_nothing' matches no target "
                                 "(target names look like 'model.layers.0.self_attn.q_proj')"]
    after = set(os.listdir(os.path.join(home, "steps"))) if os.path.isdir(os.path.join(home, "steps")) else set()
    assert after == before and not (tmp_path / "out").exists()  # nothing calibrated, nothing written


def test_plan_command_json(capsys):
    assert main(["plan", "recipes/wanda-2of4.yaml", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["stages"][0]["params"]["pattern"] == "2:4" and len(plan["stages"][0]["targets"]) == 28
