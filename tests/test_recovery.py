"""Faults caught before the work, and leftovers of killed runs cleaned at the next start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import namedtuple

import pytest

from compress.cli import main
from compress.leftovers import OWNER_VARIABLE, pid_alive

FAST = ["--set", "evaluate.layer_error=false", "--set", "evaluate.max_windows=4", "--set", "evaluate.kl_top_k=0",
        "--set", "output.onnx=false"]
RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "magnitude-50.yaml")


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert not pid_alive(process.pid)
    return process.pid


def _cli(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def test_leftovers_of_a_killed_run_are_cleaned_at_the_next_start(tmp_path, capsys, compress_home):
    dead, alive = _dead_pid(), os.getppid()
    out = tmp_path / "out"
    killed = [tmp_path / f".out.partial-{dead}", tmp_path / f".out.old-{dead}",
              compress_home / "steps" / f".stage-0123abcd.partial-{dead}-deadbeef"]
    running = tmp_path / f".other.partial-{alive}"  # a writer that still lives: never touched
    for folder in [*killed, running]:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env={**os.environ, OWNER_VARIABLE: str(dead)})
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env={**os.environ, OWNER_VARIABLE: str(alive)})
    try:
        code, _ = _cli(capsys, "run", RECIPE, "--no-track", "--out", str(out), *FAST)
        assert code == 0
        assert not any(folder.exists() for folder in killed) and running.is_dir()
        assert orphan.wait(timeout=10) is not None  # stopped: its owner was gone
        assert ours.poll() is None  # its owner lives
    finally:
        for process in (orphan, ours):
            process.kill()
            process.wait()


def test_a_run_left_running_by_a_dead_process_is_marked_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    from compress.service.recovery import HOST_TAG, PID_TAG, owner_tags
    from compress.service.tracking import RunTracker, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = ensure_experiment(client)
    host = owner_tags()[HOST_TAG]
    killed = client.create_run(experiment, tags={HOST_TAG: host, PID_TAG: str(_dead_pid())}).info.run_id
    living = client.create_run(experiment, tags={HOST_TAG: host, PID_TAG: str(os.getpid())}).info.run_id
    elsewhere = client.create_run(experiment, tags={HOST_TAG: "another-host", PID_TAG: str(_dead_pid())}).info.run_id
    RunTracker({"name": "next"}, "hash", "model", uri=uri)  # the next tracked run starts
    assert client.get_run(killed).info.status == "FAILED" and "ended without finishing" in client.get_run(killed).data.tags["compress.error"]
    assert client.get_run(living).info.status == "RUNNING" and client.get_run(elsewhere).info.status == "RUNNING"


def test_an_unreachable_tracking_server_is_one_line_in_seconds(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "COMPRESS_HOME": str(tmp_path / "home")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "compress", "run", RECIPE, "--out", str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=120)
    # seconds, not MLflow's minutes of retries: the imports alone take 5-8 s on an idle 2-core machine, up to 18 on a busy one
    assert time.monotonic() - started < 30
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "does not answer" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_corrupt_tracking_store_is_one_line(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "mlflow.db").write_text("not a database")
    monkeypatch.setenv("COMPRESS_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, err = _cli(capsys, "run", RECIPE, "--out", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and "not a readable SQLite database" in err[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_output_location_is_refused_before_the_work(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = _cli(capsys, "run", RECIPE, "--no-track", "--out", str(locked / "out"), *FAST)
    finally:
        locked.chmod(0o700)
    assert code == 2 and len(err) == 1 and "not writable" in err[0]


def test_no_room_on_disk_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    code, err = _cli(capsys, "run", RECIPE, "--no-track", "--out", str(tmp_path / "out"), *FAST)
    assert code == 2 and len(err) == 1 and "GiB free" in err[0]
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_location_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    """As the test above, where root may write anyway: the location reports itself not writable."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    code, err = _cli(capsys, "run", RECIPE, "--no-track", "--out", str(locked / "out"), *FAST)
    assert code == 2 and len(err) == 1 and "not writable" in err[0]
    assert not (locked / "out").exists()
