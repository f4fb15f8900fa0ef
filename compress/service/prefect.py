"""The service side: where Prefect and MLflow are, starting a local Prefect server when none is
named, submitting recipes to the served flow, and reading runs back from MLflow.

Configuration is the standard variables only: PREFECT_API_URL (default: a server on
127.0.0.1:4200, which `compress serve` starts if nothing answers there) and MLFLOW_TRACKING_URI
(default: sqlite under $COMPRESS_HOME, see compress/tracking.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.settings import compress_home

DEFAULT_PREFECT_API = "http://127.0.0.1:4200/api"
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def configure_prefect_home() -> None:
    """Prefect's own files (its local database, logs) under $COMPRESS_HOME unless PREFECT_HOME is set.
    Must run before prefect is imported: it reads its settings then."""
    os.environ.setdefault("PREFECT_HOME", str(compress_home() / "prefect"))
    # the temporary server dies silently (and Prefect waits out its timeout) if the folder is missing
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    # Without a server, Prefect starts a temporary one per process: ~20 s on a 2-core machine with
    # a new database, just over its default 20 s limit.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no internet to send it to
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its store-creation notes are not the user's business
    # Our CLI prints the lines users need; Prefect's own banner and hints would bury them.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def prefect_api_url() -> str:
    return os.environ.get("PREFECT_API_URL") or DEFAULT_PREFECT_API


def api_is_up(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_prefect_server(url: str, log_path: Path, wait: float = 120.0) -> subprocess.Popen:
    """Start `prefect server start` for a loopback URL and wait until it answers."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost"):
        raise CompressError(f"PREFECT_API_URL={url} does not answer, and compress only starts a server on loopback")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", parsed.hostname, "--port", str(parsed.port or 4200)]
    env = {**os.environ, "PREFECT_API_URL": url}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if api_is_up(url):
            return process
        if process.poll() is not None:
            raise CompressError(f"the Prefect server exited with code {process.returncode}; see {log_path}")
        time.sleep(0.5)
    process.terminate()
    raise CompressError(f"the Prefect server did not answer at {url} within {wait:.0f} s; see {log_path}")


def submit(recipe_data: dict[str, Any], out: str | None, wait: bool, poll: float = 2.0) -> dict[str, Any]:
    """Create the MLflow parent run, start a flow run of the deployment, return both ids (and, with
    `wait`, the final state)."""
    from prefect.deployments import run_deployment

    from compress.pipeline.store import digest
    from compress.recipe import validate_recipe
    from compress.service.tracking import RunTracker, tracking_uri
    from flows.compress_flow import DEPLOYMENT_NAME, FLOW_NAME

    recipe = validate_recipe(recipe_data, name=recipe_data.get("name") or "recipe")
    if not api_is_up(prefect_api_url()):
        raise CompressError(f"no Prefect API at {prefect_api_url()}: start `compress serve` (or set PREFECT_API_URL)")
    uri = tracking_uri()
    tracker = RunTracker(recipe_data, digest(recipe.describe()), str(recipe.model.source or "<embedded model>"), uri=uri)
    try:
        flow_run = run_deployment(
            f"{FLOW_NAME}/{DEPLOYMENT_NAME}",
            parameters={"recipe": recipe_data, "out": out, "mlflow_run_id": tracker.run_id, "tracking_uri": uri},
            timeout=0,
        )
    except Exception as error:
        tracker.fail(error)
        raise CompressError(f"could not submit to deployment {FLOW_NAME}/{DEPLOYMENT_NAME}: {error}") from None
    tracker.client.set_tag(tracker.run_id, "prefect.flow_run_id", str(flow_run.id))
    result = {"flow_run_id": str(flow_run.id), "mlflow_run_id": tracker.run_id, "state": flow_run.state_type.value if flow_run.state_type else None}
    if wait:
        result["state"] = wait_for_flow_run(flow_run.id, poll)
    return result


def wait_for_flow_run(flow_run_id: Any, poll: float = 2.0) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect_client:
        while True:
            state = prefect_client.read_flow_run(flow_run_id).state
            if state is not None and state.type.value in FINAL_STATES:
                return state.type.value
            time.sleep(poll)


def list_runs(limit: int = 20) -> list[dict[str, Any]]:
    """The latest submissions (parent runs), newest first."""
    from compress.service.tracking import client, ensure_experiment

    mlflow_client = client()
    experiment = ensure_experiment(mlflow_client)
    runs = mlflow_client.search_runs([experiment], filter_string="tags.`compress.recipe_hash` != ''",
                                     order_by=["attributes.start_time DESC"], max_results=limit)
    return [_run_row(run) for run in runs if "mlflow.parentRunId" not in run.data.tags]


def _run_row(run: Any) -> dict[str, Any]:
    return {
        "run_id": run.info.run_id,
        "recipe": run.data.tags.get("compress.recipe", ""),
        "status": run.info.status,
        "metrics": dict(run.data.metrics),
        "params": dict(run.data.params),
        "model_version": run.data.tags.get("compress.registered_model", ""),
        "flow_run_id": run.data.tags.get("prefect.flow_run_id", ""),
    }


def get_run(prefix: str) -> dict[str, Any]:
    """A run by id or unique id prefix."""
    from mlflow.exceptions import MlflowException

    from compress.service.tracking import client

    mlflow_client = client()
    try:
        return _run_row(mlflow_client.get_run(prefix))
    except MlflowException:
        pass
    matches = [row for row in list_runs(limit=1000) if row["run_id"].startswith(prefix)]
    if len(matches) != 1:
        raise CompressError(f"run id {prefix!r} matches {len(matches)} runs; give more of the id (see `compress runs`)")
    return matches[0]
