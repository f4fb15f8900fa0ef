"""Steps stored by the content of their inputs: a re-run redoes only what changed, and a run that
failed part-way resumes from its last finished step with a bit-identical result."""

from __future__ import annotations

import pytest
from conftest import FAULT_FLAG, fast_recipe, output_bytes

from compress.pipeline.engine import run
from compress.pipeline.store import STEP_FILE, StepStore
from compress.recipe import validate_recipe

_files = output_bytes


def _steps(report: dict) -> dict[str, bool]:
    return {f"{s['step']}:{i}": s["cached"] for i, s in enumerate(report["steps"])}


def test_rerun_is_all_cached_and_identical(tmp_path):
    store = StepStore(tmp_path / "steps")
    recipe = validate_recipe(fast_recipe({"method": "wanda", "sparsity": 0.5}, {"method": "rtn", "bits": 4}))
    first = run(recipe, tmp_path / "a", store=store)
    second = run(recipe, tmp_path / "b", store=store)
    assert not any(s["cached"] for s in first["steps"] if s["step"] in ("stage", "evaluate"))
    assert all(s["cached"] for s in second["steps"] if s["step"] != "load")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert second["metrics"]["perplexity"] == first["metrics"]["perplexity"]


def test_editing_the_second_stage_keeps_the_first(tmp_path):
    store = StepStore(tmp_path / "steps")
    stages = [{"method": "wanda", "sparsity": 0.5}, {"method": "rtn", "bits": 4}]
    run(validate_recipe(fast_recipe(*stages)), tmp_path / "a", store=store)
    stages[1]["bits"] = 3
    report = run(validate_recipe(fast_recipe(*stages)), tmp_path / "b", store=store)
    cached = {f"stage{i}": s["cached"] for i, s in enumerate(report["stages"])}
    assert cached == {"stage0": True, "stage1": False}


def test_failed_stage_resumes_bit_identical(tmp_path, monkeypatch, fault_method):
    flag = tmp_path / "fault"
    flag.touch()
    monkeypatch.setenv(FAULT_FLAG, str(flag))
    recipe = validate_recipe(fast_recipe({"method": "wanda", "sparsity": 0.5}, {"method": fault_method, "bits": 3}))
    store = StepStore(tmp_path / "steps")
    with pytest.raises(RuntimeError, match="injected fault"):
        run(recipe, tmp_path / "out", store=store)
    assert not (tmp_path / "out").exists()
    hidden = sorted(p.name for p in store.root.iterdir() if p.name.startswith("."))
    assert len(hidden) == 2 and hidden[0].endswith(".lock") and hidden[1].endswith(".resume")  # kept to resume, nothing else
    stage0 = [p for p in store.root.iterdir() if p.name.startswith("stage-")]
    assert len(stage0) == 1
    written = (stage0[0] / STEP_FILE).stat().st_mtime_ns

    flag.unlink()  # the fix
    resumed = run(recipe, tmp_path / "out", store=store)
    assert [s["cached"] for s in resumed["stages"]] == [True, False]
    assert (stage0[0] / STEP_FILE).stat().st_mtime_ns == written  # not recomputed
    assert not any(p.name.startswith(".") for p in store.root.iterdir())  # checkpoints gone with the finished stage

    fresh = run(recipe, tmp_path / "fresh", store=StepStore(tmp_path / "fresh-steps"))
    assert [s["cached"] for s in fresh["stages"]] == [False, False]
    assert _files(tmp_path / "out") == _files(tmp_path / "fresh")
    assert resumed["metrics"]["perplexity"] == fresh["metrics"]["perplexity"]
