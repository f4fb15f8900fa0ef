"""Resume inside a stage (issue 8.5): a run SIGKILLed during block k continues at block k and gives
the bytes an uninterrupted run gives; a changed fingerprint starts clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import KILL_AT, fast_recipe, output_bytes, register_kill_method

from compress.calibration.capture import BlockInputs
from compress.calibration.layerwise import StageOutcome
from compress.calibration.resume import HIDDEN_FILE, PROGRESS_FILE, RESUME_DIR, StageBlocks
from compress.calibration.streaming import open_blockwise
from compress.pipeline.engine import run
from compress.pipeline.store import StepStore
from compress.recipe import ModelSpec, validate_recipe
from compress.state import CompressionState

TESTS = Path(__file__).parent
TARGETS_PER_BLOCK = 7  # the embedded LLaMA: q, k, v, o, gate, up, down


def _recipe(seed: int = 0) -> dict:
    return fast_recipe({"method": register_kill_method(), "bits": 4, "group_size": 32}, calibration={"seed": seed})


def _run_killed(recipe: dict, out: Path, store: Path, kill_at: int, base: str = "gptq") -> subprocess.CompletedProcess:
    script = (
        f"import json, sys; sys.path.insert(0, sys.argv[1]); import conftest; conftest.register_kill_method({base!r}); "
        "from compress.pipeline.engine import run; from compress.recipe import validate_recipe; from compress.pipeline.store import StepStore; "
        "run(validate_recipe(json.loads(sys.argv[2])), sys.argv[3], store=StepStore(sys.argv[4]))"
    )
    env = {**os.environ, KILL_AT: str(kill_at)}
    return subprocess.run([sys.executable, "-c", script, str(TESTS), json.dumps(recipe), str(out), str(store)],
                          env=env, capture_output=True, text=True, timeout=300)


def _resume_folder(store: Path) -> Path:
    (folder,) = [p for p in store.iterdir() if p.name.startswith(".stage-") and p.name.endswith(".resume")]
    return folder


def test_sigkill_mid_stage_then_resume_is_bit_identical(tmp_path):
    recipe = _recipe()
    store = tmp_path / "steps"
    killed = _run_killed(recipe, tmp_path / "out", store, kill_at=2 * TARGETS_PER_BLOCK + 3)  # during block 2
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    progress = json.loads((_resume_folder(store) / "resume" / "progress.json").read_text())
    assert progress["next_block"] == 2  # blocks 0 and 1 were checkpointed, block 2 was not

    resumed = run(validate_recipe(recipe), tmp_path / "out", store=StepStore(store))
    stage_info = json.loads(next(store.glob("stage-*/step.json")).read_text())
    assert stage_info["resumed_at_block"] == 2
    assert not any(p.name.startswith(".") for p in store.iterdir())  # checkpoints removed with the finished stage

    fresh = run(validate_recipe(recipe), tmp_path / "fresh", store=StepStore(tmp_path / "fresh-steps"))
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "fresh")
    assert resumed["metrics"]["perplexity"] == fresh["metrics"]["perplexity"]
    assert resumed["targets"] == fresh["targets"] | {
        name: {**t, "seconds": resumed["targets"][name]["seconds"]} for name, t in fresh["targets"].items()
    }


def test_resume_points_are_spaced_in_time_and_blocks_are_still_written(tmp_path, monkeypatch):
    """With an hour between resume points none is written in a short stage: a run killed during block 2 has
    written blocks 0 and 1 (shards and states, which are its output) but no hidden states, and starts again
    at block 0 with the same result."""
    monkeypatch.setenv("COMPRESS_CHECKPOINT_SECONDS", "3600")
    recipe = _recipe()
    store = tmp_path / "steps"
    killed = _run_killed(recipe, tmp_path / "out", store, kill_at=2 * TARGETS_PER_BLOCK + 3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resume = _resume_folder(store) / "resume"
    assert not (resume / "progress.json").exists() and not (resume / "hidden.safetensors").exists()
    assert (resume / "state-1").is_dir()
    run(validate_recipe(recipe), tmp_path / "out", store=StepStore(store))
    assert json.loads(next(store.glob("stage-*/step.json")).read_text())["resumed_at_block"] == 0
    run(validate_recipe(recipe), tmp_path / "fresh", store=StepStore(tmp_path / "fresh-steps"))
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "fresh")


def test_a_checkpoint_interval_that_is_not_a_number_of_seconds_is_refused(monkeypatch):
    from compress.calibration.resume import checkpoint_seconds
    from compress.errors import CompressError

    for value in ("soon", "-1", "nan"):
        monkeypatch.setenv("COMPRESS_CHECKPOINT_SECONDS", value)
        with pytest.raises(CompressError, match="COMPRESS_CHECKPOINT_SECONDS"):
            checkpoint_seconds()
    monkeypatch.setenv("COMPRESS_CHECKPOINT_SECONDS", "0")
    assert checkpoint_seconds() == 0


def test_changed_fingerprint_starts_clean(tmp_path):
    store = tmp_path / "steps"
    killed = _run_killed(_recipe(seed=0), tmp_path / "out", store, kill_at=TARGETS_PER_BLOCK + 1)  # during block 1
    assert killed.returncode == -9, killed.stderr[-2000:]
    run(validate_recipe(_recipe(seed=1)), tmp_path / "other", store=StepStore(store))  # other calibration data
    infos = [json.loads(p.read_text()) for p in store.glob("stage-*/step.json")]
    assert [info["resumed_at_block"] for info in infos] == [0]
    assert _resume_folder(store)  # the other fingerprint's checkpoints are untouched, still resumable


def test_a_resumed_squeezellm_stage_reuses_its_fisher_sums(tmp_path, monkeypatch):
    recipe = fast_recipe({"method": register_kill_method("squeezellm"), "bits": 3})
    store = tmp_path / "steps"
    killed = _run_killed(recipe, tmp_path / "out", store, kill_at=2 * TARGETS_PER_BLOCK + 3, base="squeezellm")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (_resume_folder(store) / "fisher" / "complete").is_file()

    import compress.calibration.fisher

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the Fisher diagonal was computed again")

    with monkeypatch.context() as patch:
        patch.setattr(compress.calibration.fisher, "fisher_diagonal", no_second_pass)
        run(validate_recipe(recipe), tmp_path / "out", store=StepStore(store))
    (stage,) = store.glob("stage-*")
    assert json.loads((stage / "step.json").read_text())["resumed_at_block"] == 2
    assert not (stage / "fisher").exists()  # the sums are an input of the stage, not part of its output
    run(validate_recipe(recipe), tmp_path / "fresh", store=StepStore(tmp_path / "fresh-steps"))
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "fresh")


def test_checkpoints_under_another_fingerprint_are_dropped_and_own_ones_resume(tmp_path):
    """StageBlocks directly: blocks 0 and 1 checkpointed under fingerprint A (shards, target states,
    hidden states, progress.json). Opened again with A it resumes at block 2 with those hidden states
    and outcomes; opened with B it starts at block 0 with nothing restored and the stale files gone."""
    spec = ModelSpec(device="cpu", kind="causal")
    folder = tmp_path / "stage"
    resume_dir = folder / RESUME_DIR
    generator = torch.Generator().manual_seed(0)
    hidden = [torch.randn(2, 16, 128, generator=generator) for _ in range(2)]

    first_run = StageBlocks(open_blockwise(spec), folder, folder / "model", "fingerprint-A")
    outcomes, state = [StageOutcome()], CompressionState()
    for index in (0, 1):
        first_run.fetch(index)
        for target in first_run.model.layout.targets:
            if target.block == index:
                state.get(target.name).mask = target.weight != 0
                outcomes[0].tokens[target.name] = 32
        outcomes[0].zeros += 100 * (index + 1)
        first_run.finish(index, [BlockInputs(h, (), {}) for h in hidden], outcomes, state)
    saved = json.loads((resume_dir / PROGRESS_FILE).read_text())
    assert saved["fingerprint"] == "fingerprint-A" and saved["next_block"] == 2
    stale = sorted(p.name for p in resume_dir.iterdir())
    assert stale == sorted([HIDDEN_FILE, PROGRESS_FILE, "state-0", "state-1"])

    same = StageBlocks(open_blockwise(spec), folder, folder / "model", "fingerprint-A")
    restored = [StageOutcome()]
    start, states = same.resume(restored, CompressionState())
    assert start == 2 and same.resumed_at == 2
    assert states is not None and len(states) == 2 and all(torch.equal(a, b) for a, b in zip(states, hidden))
    assert restored[0].zeros == 300 and restored[0].tokens == outcomes[0].tokens
    assert sorted(p.name for p in resume_dir.iterdir()) == stale  # resuming reads, it removes nothing

    other = StageBlocks(open_blockwise(spec), folder, folder / "model", "fingerprint-B")
    fresh = [StageOutcome()]
    start, states = other.resume(fresh, CompressionState())
    assert start == 0 and states is None and other.resumed_at == 0
    assert fresh == [StageOutcome()]  # nothing of fingerprint A's outcomes came in
    assert resume_dir.is_dir() and list(resume_dir.iterdir()) == []  # A's progress, hidden states, target states gone
