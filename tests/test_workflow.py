"""The service-style workflow against real services started once for this module: an MLflow server
(sqlite, and PostgreSQL where Debian's server is installed), a Prefect server, and `compress serve`
as the worker. Submissions go through the `compress` command line; results are read back through
MLflow's and Prefect's own clients."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import FAULT_FLAG, output_bytes

REPO = Path(__file__).resolve().parents[1]
# small enough to run in seconds, real enough to compress and evaluate the embedded model
FAST_SETS = ["--set", "calibration.nsamples=16", "--set", "calibration.seqlen=128", "--set", "evaluate.seqlen=128",
             "--set", "evaluate.max_windows=8"]
# onnx_ok / onnx_max_abs_diff only with output.onnx: true (not in the shipped recipes)
CORE_METRICS = {"perplexity", "dense_perplexity", "sparsity", "bits_per_param", "size_bytes", "seconds", "audit_ok", "layer_error_max",
                "verify_ok", "verify_max_abs_diff", "verify_perplexity", "output_bytes"}
STEPS = ["load", "calibrate", "stage 0 (wanda)", "evaluate", "export", "audit"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _mlflow_server(backend: str, root: Path, env: dict[str, str]) -> tuple[str, subprocess.Popen, Path]:
    port = _free_port()
    log = root / f"mlflow-{port}.log"
    process = _start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                      "--artifacts-destination", str(root / f"artifacts-{port}"), "--host", "127.0.0.1",
                      "--port", str(port), "--workers", "1"], log, env)
    return f"http://127.0.0.1:{port}", process, log


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """MLflow (sqlite) + Prefect servers, started side by side, and `compress serve` as the worker."""
    root = tmp_path_factory.mktemp("services")
    home = root / "home"
    env = {**os.environ, "COMPRESS_HOME": str(home), "PREFECT_HOME": str(root / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_LOGGING_LEVEL": "WARNING", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    (root / "prefect").mkdir()
    mlflow_uri, mlflow_process, mlflow_log = _mlflow_server(f"sqlite:///{root / 'mlflow.db'}", root, env)
    prefect_port = _free_port()
    prefect_url = f"http://127.0.0.1:{prefect_port}/api"
    prefect_log = root / "prefect.log"
    prefect_process = _start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                              "--port", str(prefect_port)], prefect_log, env)
    processes = [mlflow_process, prefect_process]
    try:
        _wait_http(f"{mlflow_uri}/health", mlflow_process, mlflow_log)
        _wait_http(f"{prefect_url}/health", prefect_process, prefect_log)
        env.update(MLFLOW_TRACKING_URI=mlflow_uri, PREFECT_API_URL=prefect_url)
        worker_log = root / "worker.log"
        worker = _start([sys.executable, "-m", "compress", "serve", "--limit", "4"], worker_log, env)
        processes.append(worker)
        _wait_for_deployment(env, worker, worker_log)
        yield {"env": env, "mlflow": mlflow_uri, "prefect": prefect_url, "root": root, "worker_log": worker_log,
               "mlflow_log": mlflow_log}
    finally:
        for process in reversed(processes):
            _stop(process)


def _wait_for_deployment(env: dict[str, str], worker: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    probe = ("from prefect.client.orchestration import get_client\n"
             "with get_client(sync_client=True) as c: c.read_deployment_by_name('compress-recipe/compress')")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0:
            return
        if worker.poll() is not None:
            raise RuntimeError(f"compress serve exited:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    raise RuntimeError(f"the deployment did not appear:\n{log.read_text()[-3000:]}")


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress", *args], env=env, capture_output=True, text=True, cwd=REPO, timeout=600)


def _submitted(result: subprocess.CompletedProcess) -> tuple[str, str]:
    assert result.returncode == 0, result.stderr[-3000:]
    flow_run = next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("flow run"))
    mlflow_run = next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("mlflow run"))
    return flow_run, mlflow_run


def _children(client, run):
    return client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")


def test_four_submissions_at_once_are_tracked_runs_with_registered_models(services):
    """Four submissions at once all finish, each with its own recipe; the two shipped recipes' runs are checked whole:
    step children, metrics, artifacts, logged and registered models, then listed and compared."""
    from mlflow.tracking import MlflowClient

    env = services["env"]
    recipes = {"recipes/wanda-50.yaml": [], "recipes/wanda-2of4.yaml": [],
               "sparsity 0.3": ["--set", "stages.0.sparsity=0.3", "--set", "output.register_as=wanda-30-embedded"],
               "sparsity 0.7": ["--set", "stages.0.sparsity=0.7", "--set", "output.register_as=wanda-70-embedded"]}

    def submit(recipe: str) -> subprocess.CompletedProcess:
        path = recipe if recipe.endswith(".yaml") else "recipes/wanda-50.yaml"
        return _cli(["submit", path, "--wait", *FAST_SETS, *recipes[recipe]], env)

    with concurrent.futures.ThreadPoolExecutor(len(recipes)) as pool:
        results = dict(zip(recipes, pool.map(submit, recipes)))
    assert all("state      COMPLETED" in r.stdout for r in results.values()), [r.stdout + r.stderr[-2000:] for r in results.values()]
    submitted = {recipe: _submitted(result) for recipe, result in results.items()}

    client = MlflowClient(services["mlflow"])
    sparsities = [client.get_run(submitted[r][1]).data.metrics["sparsity"] for r in recipes]
    assert sparsities == pytest.approx([0.5, 0.5, 0.3, 0.7], abs=0.01)  # each run its own recipe
    logs = services["worker_log"].read_text() + services["mlflow_log"].read_text()
    assert "database is locked" not in logs
    shipped = {recipe: ids for recipe, ids in submitted.items() if recipe.endswith(".yaml")}
    metric_names = []
    for recipe, (flow_run_id, run_id) in shipped.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["prefect.flow_run_id"] == flow_run_id
        assert run.data.tags["compress.recipe_hash"] and run.data.tags["compress.version"]
        assert run.data.params["stages.0.method"] == "wanda"
        children = _children(client, run)  # as the UI lists them (newest first): in step order
        children = sorted(children, key=lambda c: c.info.start_time, reverse=True)
        assert [c.data.tags["compress.step"] for c in children] == STEPS
        assert all(c.info.status == "FINISHED" for c in children)
        metric_names.append(set(run.data.metrics))
        assert set(run.data.metrics) >= CORE_METRICS and "onnx_ok" not in run.data.metrics
        assert run.data.metrics["verify_ok"] == 1.0 and run.data.metrics["audit_ok"] == 1.0
        artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "plots")}
        assert {"report.json", "recipe.json", "report.md", "targets.json", "plots/targets.png"} <= artifacts
        assert not {"packed", "model", "model.onnx"} & artifacts  # the model is the run's logged model, not a copy of the output
        (logged,) = [client.get_logged_model(o.model_id) for o in run.outputs.model_outputs]
        assert logged.source_run_id == run_id and logged.name == f"{Path(recipe).stem}-embedded"
        assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"calibration", "evaluation"}
        name = f"{Path(recipe).stem}-embedded"  # registered names include the model
        versions = client.search_model_versions(f"name = '{name}'")
        assert [(v.run_id, v.source) for v in versions] == [(run_id, logged.artifact_location)]  # made from the logged model
    assert metric_names[0] == metric_names[1]  # the same names whatever the method

    listing = _cli(["runs"], env)
    assert listing.returncode == 0 and all(run_id[:12] in listing.stdout for _, run_id in shipped.values())
    compare = _cli(["compare", *(run_id[:10] for _, run_id in shipped.values())], env)
    assert compare.returncode == 0, compare.stderr
    assert "perplexity" in compare.stdout and "stages.0.pattern" in compare.stdout
    figure = services["root"] / "compare.png"
    ids = [run_id for _, run_id in shipped.values()]
    drawn = _cli(["compare", *(run_id[:10] for run_id in ids), "--figure", str(figure), "--log"], env)
    assert drawn.returncode == 0, drawn.stderr
    assert figure.read_bytes().startswith(b"\x89PNG") and f"figure: {figure}" in drawn.stderr
    for run_id in ids:
        assert [a.path for a in client.list_artifacts(run_id, "compare")] == ["compare/compare.png"]


def test_failed_stage_resumes_through_the_flow(services, tmp_path, monkeypatch, fault_method):
    """A recipe whose second stage fails is re-run after the fix: the first stage is found stored
    (not recomputed) and the output is bit-identical to an uninterrupted run."""
    from conftest import fast_recipe
    from mlflow.tracking import MlflowClient
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from compress.recipe import validate_recipe
    from flows.compress_flow import compress_recipe

    monkeypatch.setenv("MLFLOW_TRACKING_URI", services["mlflow"])
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    flag = tmp_path / "fault"
    flag.touch()
    monkeypatch.setenv(FAULT_FLAG, str(flag))
    monkeypatch.setenv("COMPRESS_STEP_RETRIES", "0")
    data = validate_recipe(fast_recipe({"method": "wanda", "sparsity": 0.5}, {"method": fault_method, "bits": 3}, output={"onnx": True}),
                           name="resume").to_data()
    client = MlflowClient(services["mlflow"])
    with temporary_settings(updates={PREFECT_API_URL: services["prefect"]}):
        with pytest.raises(RuntimeError, match="injected fault"):
            compress_recipe(recipe=data, out=str(tmp_path / "out"))
        failed = client.search_runs([client.get_experiment_by_name("compress").experiment_id],
                                    filter_string="tags.`compress.recipe` = 'resume'")
        assert [r.info.status for r in failed] == ["FAILED"]
        assert "injected fault" in failed[0].data.tags["compress.error"]
        stage0 = next((tmp_path / "home" / "steps").glob("stage-*"))
        written = (stage0 / "step.json").stat().st_mtime_ns

        flag.unlink()  # the fix
        resumed = compress_recipe(recipe=data, out=str(tmp_path / "out"))
        assert [s["cached"] for s in resumed["report"]["stages"]] == [True, False]
        assert (stage0 / "step.json").stat().st_mtime_ns == written
        stage_runs = [c for c in _children(client, client.get_run(resumed["mlflow_run_id"]))
                      if c.data.tags["compress.step"].startswith("stage 0")]
        assert stage_runs[0].data.metrics["cached"] == 1.0

        monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home-fresh"))
        fresh = compress_recipe(recipe=data, out=str(tmp_path / "fresh"))
    assert [s["cached"] for s in fresh["report"]["stages"]] == [False, False]
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "fresh")
    assert (tmp_path / "out" / "model.onnx").read_bytes() == (tmp_path / "fresh" / "model.onnx").read_bytes()


@pytest.mark.skipif(shutil.which("initdb") is None and not Path("/usr/lib/postgresql").is_dir(),
                    reason="PostgreSQL server binaries not installed")
def test_postgres_backend_same_code_other_environment(services, tmp_path, monkeypatch):
    """Scale-out by configuration: an MLflow server on a PostgreSQL store, only the environment changes
    (the worker's: it tracks where its own MLFLOW_TRACKING_URI says, whatever a client sets)."""
    from mlflow.tracking import MlflowClient

    data_dir = Path(tempfile.mkdtemp(prefix="compress-pg-"))  # under /tmp: the postgres user must reach it
    port = _free_port()
    script = REPO / "mlflow" / "postgres-dev.sh"
    started = subprocess.run(["bash", str(script), "start", str(data_dir), str(port)], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    uri = started.stdout.strip().splitlines()[-1]
    env = {**services["env"]}
    server = None
    try:
        tracking, server, log = _mlflow_server(uri, tmp_path, env)
        _wait_http(f"{tracking}/health", server, log)
        env["MLFLOW_TRACKING_URI"] = tracking
        with _prefect_and_worker(env, tmp_path) as (env, _):
            result = _cli(["submit", "recipes/magnitude-50.yaml", "--wait", *FAST_SETS], env)
        assert "state      COMPLETED" in result.stdout, result.stdout + result.stderr[-3000:]
        _, run_id = _submitted(result)
        run = MlflowClient(tracking).get_run(run_id)
        assert run.info.status == "FINISHED" and set(run.data.metrics) >= CORE_METRICS
        assert MlflowClient(tracking).search_model_versions("name = 'magnitude-50-embedded'")[0].run_id == run_id
    finally:
        if server is not None:
            _stop(server)
        subprocess.run(["bash", str(script), "stop", str(data_dir)], capture_output=True)
        shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.contextmanager
def _prefect_and_worker(env: dict[str, str], root: Path, server_env: dict[str, str] | None = None):
    """A Prefect server of its own and `compress serve` on it, both with `env` (the server also with
    `server_env`); yields the environment that submits to it, and the worker's log."""
    (root / "prefect").mkdir(exist_ok=True)
    env = {key: value for key, value in env.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(root / "prefect")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    server_log, worker_log = root / "prefect.log", root / "worker.log"
    processes = [_start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_log,
                        {**env, **(server_env or {})})]
    try:
        _wait_http(f"{url}/health", processes[0], server_log)
        env["PREFECT_API_URL"] = url
        processes.append(_start([sys.executable, "-m", "compress", "serve", "--limit", "1"], worker_log, env))
        _wait_for_deployment(env, processes[1], worker_log)
        yield env, worker_log
    finally:
        for process in reversed(processes):
            _stop(process)


def _written(client, experiment_id: str, home: Path) -> tuple[set[str], list[str], list[str]]:
    """What a submission could have left: MLflow runs, output folders, stored steps."""
    runs = {run.info.run_id for run in client.search_runs([experiment_id], max_results=5000)}
    listing = [sorted(p.name for p in folder.iterdir()) if folder.is_dir() else [] for folder in (home / "outputs", home / "steps")]
    return runs, *listing


def _deployment_run(services, monkeypatch, parameters: dict) -> tuple[str, str]:
    """A flow run of the served deployment with any parameters, as anyone who reaches the Prefect API
    can start one: (final state, its message), or ("REJECTED", why) if the API refused it."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from compress.service.prefect import wait_for_flow_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", services["mlflow"])
    with temporary_settings(updates={PREFECT_API_URL: services["prefect"]}):
        try:
            flow_run = run_deployment("compress-recipe/compress", parameters=parameters, timeout=0)
        except Exception as error:
            return "REJECTED", str(error)
        state, message, _ = wait_for_flow_run(flow_run.id, poll=1)
    return state, message or ""


def test_served_submissions_are_confined_to_the_workers_roots(services, tmp_path, monkeypatch):
    """Paths outside the worker's roots, a client's output folder or tracking store, and another
    submitter's registered model are refused in one line, before anything is written."""
    from conftest import fast_recipe
    from mlflow.tracking import MlflowClient

    from compress.recipe import validate_recipe

    env, home = services["env"], Path(services["env"]["COMPRESS_HOME"])
    client = MlflowClient(services["mlflow"])
    experiment_id = client.get_experiment_by_name("compress").experiment_id
    before = _written(client, experiment_id, home)
    secret = tmp_path / "passwd"  # outside $COMPRESS_HOME/texts, the worker's text root
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 400)
    refused = _cli(["submit", "recipes/wanda-50.yaml", "--wait", *FAST_SETS, "--set", f"calibration.text=[{secret}]"], env)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 1 and len(errors) == 1, refused.stdout + refused.stderr[-3000:]
    assert "outside the worker's text roots" in errors[0] and "mlflow run (none)" in refused.stdout

    client.create_registered_model("taken-by-alice", tags={"compress.owner": "alice"})
    collides = _cli(["submit", "recipes/wanda-50.yaml", "--wait", *FAST_SETS, "--set", "output.register_as=taken-by-alice"],
                    {**env, "COMPRESS_SUBMITTER": "mallory"})
    errors = [line for line in collides.stderr.splitlines() if line.startswith("error:")]
    assert collides.returncode == 1 and len(errors) == 1, collides.stdout + collides.stderr[-3000:]
    assert "belongs to submitter 'alice'" in errors[0]
    assert client.search_model_versions("name = 'taken-by-alice'") == []

    data = validate_recipe(fast_recipe({"method": "wanda", "sparsity": 0.5}), name="raw").to_data()
    out, store = tmp_path / "client-out", tmp_path / "client-mlflow.db"
    state, message = _deployment_run(services, monkeypatch, {"recipe": data, "out": str(out)})
    assert state == "FAILED" and "output.dir" in message, message
    state, message = _deployment_run(services, monkeypatch, {"recipe": data, "tracking_uri": f"sqlite:///{store}"})
    assert state != "COMPLETED", message
    assert not out.exists() and not store.exists()  # the client's folder and tracking store were not used
    assert _written(client, experiment_id, home) == before


def test_prefect_basic_auth_with_credentials_from_the_environment(tmp_path):
    """Behind Prefect's basic auth: the worker and `compress submit` authenticate with
    PREFECT_API_AUTH_STRING from their environment; without it a submission is refused in one line."""
    credentials = "compress:s3cret-for-the-test"
    env = {**os.environ, "COMPRESS_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_API_AUTH_STRING": credentials}
    env.pop("MLFLOW_TRACKING_URI", None)
    with _prefect_and_worker(env, tmp_path, {"PREFECT_SERVER_API_AUTH_STRING": credentials}) as (signed, worker_log):
        assert "submissions are confined to" in worker_log.read_text()
        anonymous = {key: value for key, value in signed.items() if key != "PREFECT_API_AUTH_STRING"}
        denied = _cli(["submit", "recipes/wanda-50.yaml", *FAST_SETS], anonymous)
        assert denied.returncode == 2 and "401" in denied.stderr, denied.stderr[-3000:]
        assert len([line for line in denied.stderr.splitlines() if line.startswith("error:")]) == 1
        refused = _cli(["submit", "recipes/wanda-50.yaml", "--wait", *FAST_SETS, "--set", f"output.dir={tmp_path / 'x'}"], signed)
        assert refused.returncode == 1 and "error: output.dir" in refused.stderr, refused.stdout + refused.stderr[-3000:]
        assert not (tmp_path / "x").exists()
