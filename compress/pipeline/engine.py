"""The run engine: a recipe's steps in the order the data flows.

    load -> calibrate -> stage 0 .. n-1 -> evaluate -> export -> audit

Every step but load and export is stored by the content of its inputs (compress/pipeline/store.py),
so a re-run of a failed or edited recipe redoes only what changed. Steps hand each other folders: a
stage reads the checkpoint (model + masks + packed weights) the step before it wrote and writes its
own. `run` calls each step through a `runner`: plainly here, as a Prefect task with an MLflow child
run in the flow (flows/compress_flow.py), so both give bit-identical outputs. Every input the user
can get wrong is checked in the load step (the plan), before calibration; the output folder appears
only when complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.calibration.distributed import world_size
from compress.pipeline.audit import audit_step
from compress.pipeline.calibrate import calibrate_step
from compress.pipeline.evaluate import evaluate_step
from compress.pipeline.export import export_step
from compress.pipeline.load import load_step
from compress.pipeline.output import output_lock, resolve_output_dir
from compress.pipeline.parallel import check_data_parallel
from compress.pipeline.stage import stage_step
from compress.pipeline.store import StepResult, StepStore
from compress.recipe import Recipe
from compress.runlog import capture

log = logging.getLogger("compress")

Runner = Callable[..., Any]


def run_directly(name: str, function: Callable[..., Any], *args: Any) -> Any:
    """The plain runner: call the step here and now."""
    return function(*args)


def run(
    recipe: Recipe, out: str | Path | None = None, *, store: StepStore | None = None, runner: Runner = run_directly, overwrite: bool = False
) -> dict[str, Any]:
    """Run a validated recipe end to end; returns the report (also written to OUT/report.json).

    `runner(name, step_function, *args)` calls each step; the Prefect flow passes one that runs it
    as a task and tracks it in MLflow. `overwrite`: replace an output of another recipe or model."""
    with capture():
        return _run(recipe, out, store, runner, overwrite)


def follow(recipe: Recipe, store: StepStore | None = None) -> None:
    """What a data-parallel run's processes other than 0 do (compress/calibration/distributed.py): the
    steps all of them take together, load, calibrate and the stages, with their share of the batches;
    process 0 stores each step, evaluates and exports."""
    _compress(recipe, store or StepStore.default(), run_directly)


def _compress(recipe: Recipe, store: StepStore, runner: Runner) -> tuple[StepResult, StepResult, list[StepResult]]:
    """The load, calibrate and stage steps: (load, calibration, each stage's result)."""
    if world_size() > 1:
        check_data_parallel(recipe, world_size())
    load = runner("load", load_step, recipe)
    calibration = runner("calibrate", calibrate_step, store, recipe, load)
    checkpoints: list[StepResult] = [load]  # what each stage starts from, then the last stage's output
    for index, stage in enumerate(recipe.stages):
        refines = load.info["refines"][index]  # the checkpoint a mask-refining stage (DSnoT) compares against
        reference = checkpoints[refines] if refines is not None else None
        checkpoints.append(runner(f"stage {index} ({stage.method})", stage_step, store, recipe, index, checkpoints[-1], calibration, reference,
                                  load))
    return load, calibration, checkpoints[1:]


def _run(recipe: Recipe, out: str | Path | None, store: StepStore | None, runner: Runner, overwrite: bool) -> dict[str, Any]:
    started = time.perf_counter()
    out_dir = resolve_output_dir(recipe, out, overwrite)
    store = store or StepStore.default()
    load, calibration, stages = _compress(recipe, store, runner)
    evaluation = runner("evaluate", evaluate_step, store, recipe, load, stages[-1] if stages else load)
    steps = [load, calibration, *stages, evaluation]
    with output_lock(out_dir):  # from writing the folder to reading it back (and, in the flow, registering it)
        runner("export", export_step, out_dir, recipe, load, calibration, stages, evaluation, steps, started)
        report = runner("audit", audit_step, out_dir)
    if not report["audit"]["ok"]:
        problems = report["audit"]["problems"]
        log.warning("audit: %d targets are not what the report says: %s", len(problems),
                    "; ".join(f"{k}: {v[0]}" for k, v in list(problems.items())[:3]))
    return report
