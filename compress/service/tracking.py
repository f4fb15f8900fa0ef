"""MLflow tracking: one parent run per submission, one child run per step, the model registered.

Embedded default: a sqlite store and an artifact folder under $COMPRESS_HOME (nothing to start);
`MLFLOW_TRACKING_URI` points it at a server instead. Every run logs the same metric names whatever
its methods (perplexity, dense_perplexity, sparsity, bits_per_param, size_bytes, seconds, ...), so
runs line up column by column in the MLflow compare view.

The client API (MlflowClient) is used rather than mlflow's fluent "active run": steps may run in
Prefect's worker threads, and several flows may share one process.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compress import __version__
from compress.cleanup import undo_on_abort
from compress.service import mlflow_view as view
from compress.service.figures import plot_targets
from compress.service.ownership import OWNER_TAG, check_owner
from compress.service.recovery import fail_orphaned_runs, owner_tags
from compress.settings import compress_home

log = logging.getLogger("compress")

DEFAULT_EXPERIMENT = "compress"
# The metrics every run reports under these names (missing ones are simply absent, e.g. perplexity
# for an encoder, which reports embedding_cosine).
RUN_METRICS = (
    "perplexity", "dense_perplexity", "kl_to_dense", "top1_agreement", "embedding_cosine", "sparsity", "bits_per_param", "size_bytes",
    "packed_bytes", "seconds", "params", "target_params", "onnx_max_abs_diff", "onnx_ok", "layer_error_max",
    "layer_error_mean", "audit_ok", "verify_ok", "verify_max_abs_diff", "verify_perplexity", "output_bytes", "compression_ratio",
)


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a sqlite file under $COMPRESS_HOME."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = compress_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def default_artifact_root() -> str:
    return (compress_home() / "mlartifacts").as_uri()


def experiment_name() -> str:
    return os.environ.get("COMPRESS_EXPERIMENT", DEFAULT_EXPERIMENT)


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


def ensure_experiment(mlflow_client, name: str | None = None) -> str:
    """The experiment's id, creating it (with its artifacts under $COMPRESS_HOME for a local store).
    It is marked a model-development experiment, so the MLflow UI opens it on the runs table."""
    from mlflow.exceptions import MlflowException

    name = name or experiment_name()
    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        local_store = mlflow_client.tracking_uri.startswith(("sqlite:", "file:", "/"))
        try:
            return mlflow_client.create_experiment(name, artifact_location=default_artifact_root() if local_store else None,
                                                   tags={view.EXPERIMENT_KIND_TAG: view.EXPERIMENT_KIND,
                                                         view.SHARED_VIEW_TAG + view.VIEW_KEY: view.view_state()})
        except MlflowException:  # created by a concurrent submission in between
            found = mlflow_client.get_experiment_by_name(name)
    wanted = {view.EXPERIMENT_KIND_TAG: view.EXPERIMENT_KIND, view.SHARED_VIEW_TAG + view.VIEW_KEY: view.view_state()}
    for key, value in wanted.items():  # one made before (or by MLflow itself as a GenAI one)
        if found.tags.get(key) != value:
            mlflow_client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """`{"stages": [{"method": "wanda"}]}` -> `{"stages.0.method": "wanda"}` (MLflow params are flat)."""
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list) and any(isinstance(item, (dict, list)) for item in data):
        out = {}
        for index, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{index}."))
        return out
    return {prefix.rstrip("."): json.dumps(data) if isinstance(data, list) else str(data)}


def numeric_metrics(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunTracker:
    """The MLflow side of one submission."""

    def __init__(self, recipe_data: dict[str, Any], recipe_hash: str, model_source: str, run_id: str | None = None,
                 uri: str | None = None, flow_run_id: str | None = None, model: str | None = None) -> None:
        """`model`: the model's short label (compress.pipeline.output.model_label), in the run's name."""
        self.client = client(uri)
        self.recipe_hash = recipe_hash
        self.experiment_id = ensure_experiment(self.client)
        self.steps = 0  # child runs so far: the next one is numbered steps + 1
        model = model or model_source
        tags = {
            "compress.recipe": recipe_data.get("name", ""),
            "compress.recipe_hash": recipe_hash,
            "compress.model_source": model_source,
            "compress.version": __version__,
            "mlflow.runName": view.run_name(recipe_data, model),
            **view.recipe_tags(recipe_data, model),
        }
        if flow_run_id:
            tags["prefect.flow_run_id"] = flow_run_id
        tags.update(owner_tags())  # a later run marks this one FAILED if its process dies (recovery.py)
        fail_orphaned_runs(self.client, self.experiment_id)
        if run_id is None:
            run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=tags["mlflow.runName"]).info.run_id
        else:
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
        self.run_id = run_id
        self.start_ms = self.client.get_run(run_id).info.start_time
        # an interrupted process marks its run KILLED before it ends (compress/stopping.py)
        self._killed_on_abort = undo_on_abort(lambda: self.client.set_terminated(self.run_id, "KILLED"))
        self._killed_on_abort.__enter__()
        self._log(run_id, params=flatten(recipe_data))

    def _log(self, run_id: str, metrics: dict[str, float] | None = None, params: dict[str, str] | None = None,
             tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, v[:6000]) for k, v in (params or {}).items()],
            tags=[RunTag(k, v) for k, v in (tags or {}).items()],
        )

    @contextmanager
    def step(self, name: str) -> Iterator[StepRun]:
        """A child run for one step, named `<n> <step>` in the order the steps run; FAILED with the
        error message if the step raises."""
        self.steps += 1
        started = time.time()
        tags = {"mlflow.parentRunId": self.run_id, "compress.step": name, "compress.step_index": str(self.steps),
                "compress.started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)), **owner_tags()}
        # The MLflow UI lists runs newest first, children under their parent in the same order: each
        # step's start time is the parent's less its number in milliseconds, so `1 load` comes first.
        # Its end time keeps the real duration (the Duration column); the real start is the tag above.
        start_ms = self.start_ms - self.steps
        child = self.client.create_run(self.experiment_id, start_time=start_ms, run_name=view.step_run_name(self.steps, name), tags=tags)
        handle = StepRun(self, child.info.run_id)

        def end(status: str) -> None:
            self.client.set_terminated(handle.run_id, status, end_time=start_ms + int((time.time() - started) * 1000))

        with undo_on_abort(lambda: end("KILLED")):
            try:
                yield handle
            except BaseException as error:
                self._log(handle.run_id, tags={"compress.error": f"{type(error).__name__}: {error}"[:5000]})
                end("FAILED")
                raise
            end("FINISHED")

    def finish(self, report: dict[str, Any], out_dir: Path, register_as: str | None, owner: str | None = None) -> str | None:
        """Log the report's headline metrics (rounded) and artifacts on the parent run: report.json,
        recipe.json, report.md, the per-target table and plot; register the model (as `owner`'s, for
        a submission); returns the registered version."""
        from compress.service.report_md import report_markdown, target_table

        self._log(self.run_id, metrics=view.headline_metrics(report["metrics"]), tags={"compress.output": str(out_dir)})
        self._log_datasets(report)
        for name in ("report.json", "recipe.json"):
            self.client.log_artifact(self.run_id, str(out_dir / name))
        self.client.log_text(self.run_id, report_markdown(report), "report.md")
        if report.get("targets"):
            self.client.log_table(self.run_id, data=target_table(report), artifact_file="targets.json")
        with tempfile.TemporaryDirectory() as scratch:
            plot = Path(scratch) / "targets.png"
            if plot_targets(report, plot):
                self.client.log_artifact(self.run_id, str(plot), "plots")
        logged = self._log_model(out_dir, report)
        version = None
        if register_as:
            version = self._register(logged, register_as, owner, report)
        self.client.set_terminated(self.run_id, "FINISHED")
        self._killed_on_abort.__exit__(None, None, None)
        return version

    def fail(self, error: BaseException) -> None:
        self._log(self.run_id, tags={"compress.error": f"{type(error).__name__}: {error}"[:5000]})
        self.client.set_terminated(self.run_id, "FAILED")
        self._killed_on_abort.__exit__(None, None, None)

    def _log_datasets(self, report: dict[str, Any]) -> None:
        """The calibration and evaluation texts as the run's dataset inputs (the runs table's Dataset
        column): name, content digest, source file, and how much of it the run used."""
        from mlflow.entities import DatasetInput, InputTag

        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)]) for context, dataset in view.datasets(report)]
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def _log_model(self, out_dir: Path, report: dict[str, Any]) -> Any:
        """The deployable output (packed/ and report.json, with the compress package as code) as an
        MLflow model of this run (a LoggedModel: the runs table's Models column); returns it."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        from compress.service.mlflow_model import save_pyfunc_model

        name = view.model_name(report)
        logged = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id, model_type="compressed-llm",
                                                 tags=view.version_tags(report, self.recipe_hash),
                                                 params={k: v[:6000] for k, v in flatten(report["recipe"]).items()})
        self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / "model"
            meta = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=self.run_id, model_id=logged.model_id)
            save_pyfunc_model(out_dir, local, meta)
            self.client.log_model_artifacts(logged.model_id, str(local))
        self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        self._log(self.run_id, tags={"compress.logged_model": logged.model_id})
        return logged

    def _register(self, logged: Any, name: str, owner: str | None = None, report: dict[str, Any] | None = None) -> str:
        """Add the run's logged model as a new registry version. With an `owner` (a submission), a new
        registered model is tagged as theirs, and one that is not theirs is refused (checked again
        here: another submitter may have created it since the start)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, tags={OWNER_TAG: owner} if owner else None)
        except MlflowException:  # exists already (or created by a concurrent run)
            if owner:
                check_owner(self.client, name, owner)
        tags, description = {"compress.recipe_hash": self.recipe_hash}, None
        if report is not None:  # the base model and headline numbers, readable in the registry
            tags, description = view.version_tags(report, self.recipe_hash), view.version_description(report)
        # the logged model's own location (a `models:/<id>` source would be looked up in MLflow's global store)
        version = self.client.create_model_version(name, logged.artifact_location, run_id=self.run_id, tags=tags, description=description,
                                                   model_id=logged.model_id)
        self._log(self.run_id, tags={"compress.registered_model": f"{name}/{version.version}"})
        return str(version.version)


class StepRun:
    def __init__(self, tracker: RunTracker, run_id: str) -> None:
        self.tracker = tracker
        self.run_id = run_id

    def log(self, metrics: dict[str, Any], tags: dict[str, str] | None = None) -> None:
        self.tracker._log(self.run_id, metrics={k: view.rounded(k, v) for k, v in numeric_metrics(metrics).items()}, tags=tags)

    def log_table(self, table: dict[str, list[Any]], artifact_file: str = "targets.json") -> None:
        self.tracker.client.log_table(self.run_id, data=table, artifact_file=artifact_file)

    def log_curve(self, curve: list[dict[str, float]]) -> None:
        """A training stage's curve as step metrics (`train/loss`, `train/lr`, ...: charts in the UI),
        one point per logging interval, stamped with the time it was measured."""
        from mlflow.entities import Metric

        points = [Metric(f"train/{name}", float(value), int(point["time"] * 1000), int(point["step"]))
                  for point in curve for name, value in point.items() if name not in ("step", "time")]
        for start in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics a batch
            self.tracker.client.log_batch(self.run_id, metrics=points[start : start + 1000])
