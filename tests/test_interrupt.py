"""Ctrl-C and SIGTERM stop a tracked run within seconds, with one line, the MLflow run KILLED and
nothing half-written; the same command then resumes to the bytes of an uninterrupted run. Stopping
`compress ui` stops every process it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import SLEEP, fast_recipe, output_bytes, register_slow_method

TESTS = Path(__file__).parent
CLI = f"import sys; sys.path.insert(0, {str(TESTS)!r}); from conftest import register_slow_method; register_slow_method(); " \
      "from compress.cli import main; sys.exit(main(sys.argv[1:]))"


def _progress(home: Path) -> int:
    """Blocks the running stage has checkpointed (0 until its first block is done)."""
    for path in (home / "steps").glob(".stage-*.resume/resume/progress.json"):
        try:
            return json.loads(path.read_text())["next_block"]
        except (OSError, ValueError):
            pass
    return 0


# Both signals reach the same handler (compress.stopping.run_interruptible's `stop`), which leaves the same
# state whichever it was; each is checked to stop the run fast, with its own line and exit code, and the run
# killed in MLflow. The resume from what the stop left is the same code path for both: it is run after one.
@pytest.mark.parametrize(("sig", "resume"), [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_stops_fast_is_killed_in_mlflow_and_resumes_bit_identical(tmp_path, sig, resume):
    from mlflow.tracking import MlflowClient

    from compress.pipeline.engine import run
    from compress.pipeline.store import StepStore
    from compress.recipe import validate_recipe

    recipe = fast_recipe({"method": register_slow_method(), "bits": 4, "group_size": 64}, name="slow-gptq")
    recipe_file = tmp_path / "slow-gptq.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    home = tmp_path / "home"
    env = {**os.environ, "COMPRESS_HOME": str(home), SLEEP: "0.4"}
    command = [sys.executable, "-c", CLI, "run", str(recipe_file), "--out", str(tmp_path / "out"), "--quiet"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _progress(home) < 1:  # mid-stage: its first block checkpointed, the next ones to come
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.2)
    sent = time.monotonic()
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert process.returncode == 128 + sig
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) <= 3 and lines[-1].startswith(f"interrupted ({sig.name}): ") and "resume with: compress run" in lines[-1]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    assert not list((home / "steps").glob(".*.partial-*"))  # no half-written step; the stage's checkpoints stay

    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "compress"]
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parent] == ["KILLED"]
    assert "KILLED" in {r.info.status for r in runs if r.data.tags.get("compress.step", "").startswith("stage 0")}
    if not resume:
        return

    resumed = subprocess.run(command, env={**env, SLEEP: "0"}, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    stage = json.loads(next((home / "steps").glob("stage-*/step.json")).read_text())
    assert stage["resumed_at_block"] >= 1
    fresh = run(validate_recipe(recipe, name="slow-gptq"), tmp_path / "fresh", store=StepStore(tmp_path / "fresh-steps"))
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "fresh")
    assert report["metrics"]["perplexity"] == fresh["metrics"]["perplexity"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    from compress.stopping import descendants

    return descendants(pid)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_stopping_the_ui_stops_every_process_it_started(tmp_path):
    port = _free_port()
    env = {**os.environ, "COMPRESS_HOME": str(tmp_path / "home")}
    process = subprocess.Popen([sys.executable, "-m", "compress", "ui", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:  # wait for the UI to answer
        assert process.poll() is None and time.monotonic() < deadline
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    started = _descendants(process.pid)
    assert started, "the UI started no server process"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in started if _alive(pid)]
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # the port is free again
