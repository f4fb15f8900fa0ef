"""Two tracked runs writing the same output folder at once: each registered model version holds the
weights its own run computed (the output is locked from export to registration)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow.artifacts
import torch
import yaml
from conftest import checkpoint_tensors, fast_recipe

from compress.deploy.packed_model import dense_tensors


def _waits_for_a_lock(pid: int) -> bool:
    """Whether process `pid` is blocked on a file lock (/proc/locks lists waiters after '->')."""
    return any(line.split()[1] == "->" and line.split()[5] == str(pid)
               for line in Path("/proc/locks").read_text().splitlines() if len(line.split()) > 5)


def test_concurrent_runs_to_one_output_register_their_own_weights(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import compress
    from compress.service.tracking import RunTracker

    home = tmp_path / "home"
    monkeypatch.setenv("COMPRESS_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "shared-out"
    recipes = {name: fast_recipe(stage, name=name) for name, stage in
               (("race-a", {"method": "magnitude", "sparsity": 0.5}), ("race-b", {"method": "rtn", "bits": 4, "group_size": 64}))}
    file_b = tmp_path / "race-b.yaml"
    file_b.write_text(yaml.safe_dump(recipes["race-b"]))
    finish = RunTracker.finish
    second: list[subprocess.Popen] = []

    def finish_after_b_is_ready(self, report, out_dir, *args, **kwargs):
        """Run B starts while A holds its output: B computes everything, then must wait for A."""
        evaluations = len(list((home / "steps").glob("evaluate-*")))
        second.append(subprocess.Popen([sys.executable, "-m", "compress", "run", str(file_b), "--out", str(out), "--overwrite", "--quiet"],
                                       env={**os.environ, "COMPRESS_HOME": str(home)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        deadline = time.monotonic() + 300
        while not _waits_for_a_lock(second[0].pid):  # B waits for A's output lock (else, unlocked, B runs on)
            assert second[0].poll() is None and time.monotonic() < deadline, second[0].communicate()[1][-2000:]
            if len(list((home / "steps").glob("evaluate-*"))) > evaluations:  # B computed its model without waiting
                time.sleep(5)  # and its export replaces the folder now
                break
            time.sleep(0.5)
        return finish(self, report, out_dir, *args, **kwargs)

    monkeypatch.setattr(RunTracker, "finish", finish_after_b_is_ready)
    report_a = compress.run(recipes["race-a"], out=out)
    _, stderr = second[0].communicate(timeout=300)
    assert second[0].returncode == 0, stderr[-2000:]

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    for name in ("race-a", "race-b"):
        (version,) = client.search_model_versions(f"name = '{name}-embedded'")
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path / f"download-{name}"),
                                                         tracking_uri=client.tracking_uri))
        (output,) = (local / "artifacts").iterdir()  # the deployable part of the output, as registered
        registered = output / "packed"
        run = client.get_run(version.run_id)
        stage_steps = [s for s in (report_a if name == "race-a" else None or {}).get("steps", []) if s["step"] == "stage"]
        if name == "race-a":  # A registered A's weights, not B's: its packed model holds A's stage checkpoint
            (stage,) = stage_steps
            own = checkpoint_tensors(home / "steps" / f"stage-{stage['key']}" / "model")
            packed = dense_tensors(registered)
            assert all(torch.equal(packed[key], own[key]) for key in own)
        assert run.data.tags["compress.recipe"] == name
        assert yaml.safe_load((registered.parent / "report.json").read_text())["recipe"]["name"] == name
    assert yaml.safe_load((out / "report.json").read_text())["recipe"]["name"] == "race-b"  # B published after A
