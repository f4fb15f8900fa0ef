"""The service side: where Prefect and MLflow are, starting a local Prefect server when none is
named, submitting recipes to the served flow, and reading runs back from MLflow.

Configuration is the standard variables only: PREFECT_API_URL (default: a server on
127.0.0.1:4200, which `compress serve` starts if nothing answers there) and MLFLOW_TRACKING_URI
(default: sqlite under $COMPRESS_HOME, see compress/tracking.py); credentials, where the servers ask
for them, are the clients' own variables (PREFECT_API_AUTH_STRING or PREFECT_API_KEY,
MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN), never part of a recipe.

A submission sends the recipe and the submitter's declared name, nothing else: the worker decides
where it writes, which MLflow it tracks in and which paths it may read (compress/service/confine.py,
docs/security.md).
"""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
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
    os.environ.setdefault("PREFECT_RUNNER_SERVER_HOST", "127.0.0.1")  # the worker's own webserver, if enabled: loopback
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


def start_prefect_server(url: str, log_path: Path, wait: float = 120.0, extra_env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start `prefect server start` for a loopback URL (its environment: ours, plus `extra_env`) and wait until it answers."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost"):
        raise CompressError(f"PREFECT_API_URL={url} does not answer, and compress only starts a server on loopback")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", parsed.hostname, "--port", str(parsed.port or 4200)]
    env = {**os.environ, **(extra_env or {}), "PREFECT_API_URL": url}
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


def start_service(what: str) -> subprocess.Popen | None:
    """What `compress serve` and `compress workers` do before they take submissions: a Prefect
    server if none answers (returned, for the caller to stop), their flow runs marked as submissions
    (confined), the roots and warnings printed, and the tracking store created."""
    url = prefect_api_url()
    server = None
    if not api_is_up(url):
        log = compress_home() / "prefect-server.log"
        print(f"starting a Prefect server at {url} (log: {log})", file=sys.stderr)
        server = start_prefect_server(url, log)
    os.environ["PREFECT_API_URL"] = url
    os.environ["COMPRESS_SERVED"] = "1"  # every flow run this worker starts is a submission, confined (docs/security.md)
    for note in serving_notes():
        print(note, file=sys.stderr)
    from compress.service.tracking import client, ensure_experiment

    # Create the tracking store now: flow runs starting at once on a new sqlite store race to
    # create its tables ("table ... already exists"); once it exists they share it fine.
    ensure_experiment(client())
    print(f"{what} at {url}; submit with `compress submit RECIPE`", file=sys.stderr)
    return server


def stop_server(server: subprocess.Popen | None) -> None:
    """Stop the Prefect server `start_service` started, if it did."""
    if server is not None and server.poll() is None:
        server.terminate()
        server.wait(timeout=30)


def submit(recipe_data: dict[str, Any], wait: bool, poll: float = 2.0, submitter: str | None = None,
           accept_timeout: float = 120.0) -> dict[str, Any]:
    """Start a flow run of the deployment with the recipe; return its id, the MLflow run the worker
    made for it (None if refused, or not started within `accept_timeout`), the state and, for a
    failed or refused run, its error in one line. Without `wait` it returns once a worker has
    accepted (or refused) the submission."""
    from prefect.deployments import run_deployment

    from compress.recipe import validate_recipe
    from flows.compress_flow import DEPLOYMENT_NAME, FLOW_NAME

    validate_recipe(recipe_data, name=recipe_data.get("name") or "recipe")
    if not api_is_up(prefect_api_url()):
        raise CompressError(f"no Prefect API at {prefect_api_url()}: start `compress serve` (or set PREFECT_API_URL)")
    parameters = {"recipe": recipe_data, "submitter": submitter or declared_submitter()}
    try:
        flow_run = run_deployment(f"{FLOW_NAME}/{DEPLOYMENT_NAME}", parameters=parameters, timeout=0)
    except Exception as error:
        raise CompressError(f"could not submit to deployment {FLOW_NAME}/{DEPLOYMENT_NAME}: {_first_line(error)}") from None
    deadline = None if wait else time.monotonic() + accept_timeout
    state, message, mlflow_run_id = wait_for_flow_run(flow_run.id, poll, deadline)
    failed = state in FINAL_STATES and state != "COMPLETED"
    return {"flow_run_id": str(flow_run.id), "mlflow_run_id": mlflow_run_id, "state": state,
            "error": failure_line(message) if failed else None}


def declared_submitter() -> str:
    """The name `compress submit` declares: $COMPRESS_SUBMITTER, else the login name (made file-name
    safe). Not authenticated: the worker may replace it (COMPRESS_WORKER_SUBMITTER)."""
    name = os.environ.get("COMPRESS_SUBMITTER", "").strip()
    if not name:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):  # no login name (a container's uid without a passwd entry)
            name = ""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:128] or "anonymous"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def failure_line(message: str | None) -> str:
    """The one line a failed flow run's state says (Prefect prefixes it and may append a traceback)."""
    text = (message or "the flow run failed").strip()
    for marker in ("CompressError: ", "Flow run encountered an exception: "):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    return text.splitlines()[0] if text else "the flow run failed"


def find_mlflow_run(flow_run_id: Any) -> str | None:
    """The parent MLflow run the worker made for a flow run, if it has made one yet."""
    from compress.service.tracking import client, experiment_name

    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(experiment_name())
    if experiment is None:
        return None
    runs = mlflow_client.search_runs([experiment.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    return parents[0].info.run_id if parents else None


def wait_for_flow_run(flow_run_id: Any, poll: float = 2.0, deadline: float | None = None) -> tuple[str | None, str | None, str | None]:
    """(state, its message, MLflow run id) once the flow run is final, or, with a `deadline`, once
    its MLflow run exists or the deadline passes."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect_client:
        while True:
            state = prefect_client.read_flow_run(flow_run_id).state
            kind = state.type.value if state is not None else None
            if kind in FINAL_STATES:
                return kind, state.message, find_mlflow_run(flow_run_id)
            if deadline is not None:
                run_id = find_mlflow_run(flow_run_id)
                if run_id is not None or time.monotonic() > deadline:
                    return kind, None, run_id
            time.sleep(poll)


def serving_notes(environ: Mapping[str, str] | None = None) -> list[str]:
    """What `compress serve` says before it takes submissions: the roots it confines them to, and a
    warning for each API that anyone who reaches it may use (docs/security.md)."""
    from urllib.parse import urlparse

    from compress.service.confine import Roots

    env = os.environ if environ is None else environ
    notes = [f"submissions are confined to {Roots.from_env(env).describe()}"]
    exposed = {"PREFECT_API_URL": (env.get("PREFECT_API_URL") or DEFAULT_PREFECT_API, ("PREFECT_API_AUTH_STRING", "PREFECT_API_KEY")),
               "MLFLOW_TRACKING_URI": (env.get("MLFLOW_TRACKING_URI") or "", ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN"))}
    for name, (url, credentials) in exposed.items():
        host = urlparse(url).hostname if url.startswith(("http://", "https://")) else None
        if host and host not in ("127.0.0.1", "localhost", "::1") and not any(env.get(c) for c in credentials):
            notes.append(f"warning: {name}={url} is not on loopback and no {' or '.join(credentials)} is set: "
                         f"anyone who reaches it can submit, read and change runs (docs/security.md)")
    return notes


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
