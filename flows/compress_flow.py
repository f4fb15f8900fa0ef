"""The Prefect flow: a recipe's steps as tasks, tracked in MLflow.

    load -> calibrate -> stage 0 .. n-1 -> evaluate -> export

Each task is one step of compress.pipeline.engine (the same functions `compress run --no-track` calls), so
tasks hand each other step folders on disk, never models, and a step already stored under the same
inputs is found, not recomputed. MLflow gets a parent run for the submission and a child run per
step. `compress run` calls this flow in-process; `compress serve` serves it as a deployment that
`compress submit` sends recipes to.

A flow run of a deployment is a submission, someone else's recipe run with the worker's rights: its
paths are confined to the worker's roots, its output folder is the worker's choice, it is tracked in
the worker's MLflow, and it registers only under names its submitter owns (compress/service/confine.py,
docs/security.md). Neither the tracking store nor the MLflow run is a parameter.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from compress.errors import CompressError
from compress.pipeline.engine import run
from compress.pipeline.export import layer_error_summary
from compress.pipeline.output import model_label, output_lock
from compress.pipeline.store import StepResult, StepStore, digest
from compress.recipe import Recipe, validate_recipe
from compress.service.confine import Roots, confine, is_served, output_folder, registered_name, submitter_identity
from compress.service.ownership import check_owner
from compress.service.tracking import RunTracker, client
from compress.settings import compress_home
from compress.train.stage import read_curve

FLOW_NAME = "compress-recipe"
DEPLOYMENT_NAME = "compress"
# Only failures that another try may fix are retried (a file system or network hiccup); a bad
# input or a bug fails at once, with its message on the task and on the step's MLflow run.
TRANSIENT = (OSError, TimeoutError, ConnectionError)


def _retry_transient(task_, task_run, state) -> bool:
    try:
        state.result()
    except CompressError:
        return False
    except TRANSIENT:
        return True
    except BaseException:
        return False
    return False


def _step_metrics(result: Any) -> dict[str, Any]:
    """What a step's child run records: only what the step alone knows (its seconds, whether it was
    found stored, a stage's own sparsity and error summary), never the parent's headline metrics;
    per-target numbers go to the stage's table (_stage_table), not to metrics."""
    if not isinstance(result, StepResult):
        return {}  # export returns the report: its numbers are the parent run's
    info = result.info
    metrics = {"seconds": result.seconds, "cached": int(result.cached)}
    if result.kind == "stage":
        summary = layer_error_summary(list(info["layer_error"].values()))
        metrics.update(stage_sparsity=info["sparsity"], targets=info["targets"], targets_changed=info["targets_changed"],
                       stage_seconds=info["stage_seconds"], **{k.replace("layer_error", "stage_error"): v for k, v in summary.items()})
    elif result.kind == "calibrate" and info.get("used"):
        metrics["tokens"] = info["tokens"]
    elif result.kind == "load":
        metrics["targets"] = info["targets"]
    return metrics


def _stage_table(result: Any) -> dict[str, list[Any]] | None:
    """A stage's per-target table (target, relative output error, seconds), or None for other steps."""
    if not (isinstance(result, StepResult) and result.kind == "stage" and result.info.get("layer_error")):
        return None
    errors, seconds = result.info["layer_error"], result.info.get("target_seconds") or {}
    return {"target": list(errors), "error": [round(v, 6) for v in errors.values()],
            "seconds": [round(seconds.get(name, 0.0), 4) for name in errors]}


def worker_tags(environ: Any) -> dict[str, str]:
    """The worker that runs a submission and the GPUs it sees, as MLflow tags: runs from several
    workers side by side say where each ran."""
    tags = {"compress.worker": environ.get("COMPRESS_WORKER_NAME")}
    if "COMPRESS_WORKER_NAME" in environ:
        tags["compress.cuda_visible_devices"] = environ.get("CUDA_VISIBLE_DEVICES", "")
    return {tag: value for tag, value in tags.items() if value is not None}


def default_output_dir(recipe: Recipe, run_id: str) -> Path:
    return compress_home() / "outputs" / f"{recipe.name}-{model_label(recipe)}-{run_id[:8]}"


@flow(name=FLOW_NAME, log_prints=True, persist_result=False)
def compress_recipe(
    recipe: dict[str, Any],
    out: str | None = None,
    register_as: str | None = None,
    overwrite: bool = False,
    submitter: str | None = None,
) -> dict[str, Any]:
    """Run one recipe (its data, as `compress validate` resolves it); returns where the output is
    and the MLflow run and registered model version. `submitter`: the name a submission declares."""
    from prefect.runtime import deployment, flow_run

    logger = get_run_logger()
    parsed = validate_recipe(recipe, name=recipe.get("name") or "recipe")
    served = is_served(deployment.id)
    owner = None
    if served:  # everything checked before anything is written: no output folder, MLflow run or stored step
        roots = Roots.from_env()
        parsed = confine(parsed, roots, out=out, overwrite=overwrite)
        owner = submitter_identity(submitter)
        recipe = parsed.to_data()  # what runs: the resolved paths
    model_name = register_as or parsed.output.register_as or f"{parsed.name}-{model_label(parsed)}"
    if served and parsed.output.register_model:
        check_owner(client(), registered_name(model_name), owner)
    tracker = RunTracker(
        recipe, digest(parsed.describe()), str(parsed.model.source or "<embedded model>"), flow_run_id=str(flow_run.id or ""),
        model=model_label(parsed),
    )
    retries = int(os.environ.get("COMPRESS_STEP_RETRIES", "2"))

    held = ExitStack()  # the output lock, from the export step to the registration

    def runner(name: str, function: Any, *args: Any) -> Any:
        if name == "export":  # the folder stays this run's until it is registered from it
            held.enter_context(output_lock(args[0]))
        step_task = task(function, name=name, retries=retries, retry_delay_seconds=2,
                         retry_condition_fn=_retry_transient, cache_policy=NO_CACHE)
        with tracker.step(name) as child:
            result = step_task(*args)
            child.log(_step_metrics(result))
            table = _stage_table(result)
            if table:
                child.log_table(table)
            if isinstance(result, StepResult) and result.kind == "stage":
                child.log_curve(read_curve(result.path))
        if isinstance(result, StepResult):
            logger.info("%s: %s in %.2f s", name, "found stored" if result.cached else "done", result.seconds)
        return result

    try:
        if served:
            tracker.client.set_tag(tracker.run_id, "compress.submitter", owner)
            for tag, value in worker_tags(os.environ).items():  # which worker and GPU ran it (`compress workers`)
                tracker.client.set_tag(tracker.run_id, tag, value)
            out_dir = output_folder(parsed, roots, tracker.run_id)
        else:
            out_dir = Path(out) if out else (Path(parsed.output.dir) if parsed.output.dir else default_output_dir(parsed, tracker.run_id))
        with held:
            report = run(parsed, out_dir, store=StepStore.default(), runner=runner, overwrite=overwrite)
            version = tracker.finish(report, out_dir, model_name if parsed.output.register_model else None, owner)
    except BaseException as error:
        tracker.fail(error)
        raise
    return {"out": str(out_dir), "mlflow_run_id": tracker.run_id, "model_version": version, "report": report}
