"""The load step: find the model (a hub id is fetched into the local cache), resolve every stage
against its skeleton (all input errors surface here, before any calibration) and hash its files."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from compress.pipeline.checkpoints import compute_settings
from compress.pipeline.plan import build_plan
from compress.pipeline.store import StepResult, digest, tree_digest
from compress.recipe import Recipe

log = logging.getLogger("compress")


def load_step(recipe: Recipe) -> StepResult:
    started = time.perf_counter()
    plan = build_plan(recipe)
    path = Path(plan.model_path)
    key = digest("model", tree_digest(path), recipe.model.kind, compute_settings(recipe.model))
    info = {
        "model_path": plan.model_path,
        "source": plan.source,
        "kind": plan.kind,
        "model": plan.model_info(),
        "targets": plan.targets,
        "stage_targets": [len(stage.targets) for stage in plan.stages],
        "refines": [stage.refines for stage in plan.stages],
        "left_out": plan.left_out,
    }
    log.info("model %s (%s, %s): %d targets in %d blocks", plan.source, plan.kind, plan.device, plan.targets, plan.blocks)
    return StepResult("load", key, path, info, seconds=time.perf_counter() - started)
