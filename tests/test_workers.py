"""`compress workers`: a Prefect work pool with one worker per GPU, against real services (an MLflow
server on sqlite; the Prefect server `compress workers` starts itself), on the CPU: two submissions
at once run on two workers, each with its own CUDA_VISIBLE_DEVICES, and a submission's job variables
change neither the GPU, nor the roots, nor the tracking store, nor the command."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_workflow import FAST_SETS, REPO, _cli, _free_port, _mlflow_server, _start, _stop, _submitted, _wait_for_deployment, _wait_http

from compress.errors import CompressError
from compress.service.workers import Slot, worker_devices


def test_worker_slots_from_gpus_or_count():
    assert worker_devices("0,1", None, host="h") == [Slot("h-gpu0", "0"), Slot("h-gpu1", "1")]
    assert worker_devices(None, 2, host="h") == [Slot("h-cpu0", ""), Slot("h-cpu1", "")]
    for bad in ("", "0,0", "a", "1;2"):
        with pytest.raises(CompressError, match="--gpus"):
            worker_devices(bad, None)


def _hostile_submission(env: dict[str, str], evil: Path) -> tuple[str, str | None]:
    """A flow run of the deployment made through the Prefect API, with job variables that try to pick
    the GPU, the roots, the tracking store, the folder and the command: (flow run id, final state)."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from compress.recipe import load_recipe
    from compress.service.prefect import wait_for_flow_run

    data = load_recipe(REPO / "recipes" / "magnitude-50.yaml", FAST_SETS[1::2]).to_data()
    job_variables = {"env": {"CUDA_VISIBLE_DEVICES": "7", "COMPRESS_SERVED": "0", "COMPRESS_OUTPUT_ROOT": str(evil / "out"),
                             "MLFLOW_TRACKING_URI": f"sqlite:///{evil / 'mlflow.db'}"},
                     "command": f"touch {evil / 'ran'}", "working_dir": str(evil)}
    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        flow_run = run_deployment("compress-recipe/compress", parameters={"recipe": data, "submitter": "mallory"},
                                  job_variables=job_variables, timeout=0)
        state, message, _ = wait_for_flow_run(flow_run.id, poll=1)
    return str(flow_run.id), state if state == "COMPLETED" else f"{state}: {message}"


def _touch(path: str) -> None:
    Path(path).touch()


def _foreign_flow_run(env: dict[str, str], evil: Path) -> str:
    """A flow run of another deployment in the same pool, as anyone who reaches the API can make: its id."""
    from prefect import flow
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        flow(name="foreign")(_touch).to_deployment(name="foreign").apply(work_pool_name="compress")
        return str(run_deployment("foreign/foreign", parameters={"path": str(evil / "foreign")}, timeout=0).id)


def test_two_workers_take_two_submissions_side_by_side(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    home, evil = tmp_path / "home", tmp_path / "evil"
    evil.mkdir()
    env = {**os.environ, "COMPRESS_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "WARNING", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"}
    mlflow_uri, mlflow_process, mlflow_log = _mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path, env)
    env["MLFLOW_TRACKING_URI"] = mlflow_uri
    log = tmp_path / "workers.log"
    workers = _start([sys.executable, "-m", "compress", "workers", "--gpus", "0,1"], log, env)
    try:
        _wait_http(f"{mlflow_uri}/health", mlflow_process, mlflow_log)
        _wait_for_deployment(env, workers, log, timeout=180)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        monkeypatch.setenv("COMPRESS_HOME", str(home))
        foreign_id = _foreign_flow_run(env, evil)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            submitted = pool.submit(_cli, ["submit", "recipes/wanda-50.yaml", "--wait", *FAST_SETS], env)
            time.sleep(2)
            hostile = pool.submit(_hostile_submission, env, evil)
            result, (hostile_id, hostile_state) = submitted.result(), hostile.result()
        assert "state      COMPLETED" in result.stdout, result.stdout + result.stderr[-3000:] + log.read_text()[-3000:]
        assert hostile_state == "COMPLETED", f"{hostile_state}\n{log.read_text()[-3000:]}"
        flow_run_id, run_id = _submitted(result)

        client = MlflowClient(mlflow_uri)
        runs = [client.get_run(run_id)]
        runs += client.search_runs([runs[0].info.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{hostile_id}'")
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
        host = worker_devices("0", None)[0].name.rsplit("-", 1)[0]
        assert {r.data.tags["compress.worker"] for r in parents} == {f"{host}-gpu0", f"{host}-gpu1"}  # two workers
        assert {r.data.tags["compress.cuda_visible_devices"] for r in parents} == {"0", "1"}  # each its own GPU, never "7"
        assert {r.data.tags["compress.submitter"] for r in parents} == {"mallory", parents[0].data.tags["compress.submitter"]}
        assert sorted(p.name for p in evil.iterdir()) == []  # no command, folder, output root or tracking store of the submission's
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as prefect_client:
            assert prefect_client.read_flow_run(foreign_id).state.type.value == "SCHEDULED"  # another deployment's run: not taken
        assert len(list((home / "outputs").iterdir())) == 2  # both outputs under the worker's output root

        workers.send_signal(signal.SIGINT)  # Ctrl-C: the workers and the Prefect server it started stop
        assert workers.wait(timeout=60) == 130, log.read_text()[-3000:]
        pids = [int(pid) for pid in re.findall(r"worker \S+: CUDA_VISIBLE_DEVICES='\d', pid (\d+)", log.read_text())]
        assert len(pids) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in pids)
        probe = subprocess.run([sys.executable, "-c", f"import urllib.request; urllib.request.urlopen('{env['PREFECT_API_URL']}/health', timeout=2)"],
                               capture_output=True)
        assert probe.returncode != 0  # the server is gone
    finally:
        _stop(workers)
        _stop(mlflow_process)
