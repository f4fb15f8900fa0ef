"""A recipe's stages resolved against a model's targets, before any calibration: each stage's targets
selected and checked against its method; a stage that refines a mask (DSnoT) bound to the pruning
stage before it and to its pattern."""

from __future__ import annotations

from compress.calibration.layerwise import PlannedStage
from compress.calibration.model_statistics import MODEL_STATISTICS
from compress.calibration.statistics import STATISTICS
from compress.errors import CompressError
from compress.methods import get_method
from compress.model.targets import ModelLayout, select
from compress.recipe import Recipe


def plan_stages(recipe: Recipe, layout: ModelLayout) -> list[PlannedStage]:
    """Resolve each stage's targets and check the method can handle every one of them; a stage that
    refines a mask (DSnoT) must follow a pruning stage covering its targets, and takes its pattern."""
    planned = []
    mask_pattern: dict[str, str] = {}  # target -> pattern of the last pruning stage that masked it
    mask_stage: dict[str, int] = {}  # target -> index of that stage
    for index, stage in enumerate(recipe.stages):
        method = get_method(stage.method)(stage.params)
        where = f"stages.{index} ({stage.method})"
        unknown = [name for name in method.statistics if name not in STATISTICS and name not in MODEL_STATISTICS]
        if unknown:
            known = sorted([*STATISTICS, *MODEL_STATISTICS])
            raise CompressError(f"{where}: method asks for unknown statistics {unknown} (known: {', '.join(known)})")
        selection = stage.params.targets
        targets = select(layout.targets, selection.include, selection.exclude, where=f"stages.{index}.targets")
        targets = method.restrict_targets(targets)
        if not targets:
            raise CompressError(f"{where}: no target left to work on; check its targets and parameters")
        for target in targets:
            method.check_target(target)
        refines = None
        if method.refines_mask:
            unmasked = [t.name for t in targets if t.name not in mask_pattern]
            if unmasked:
                raise CompressError(
                    f"{where} refines the mask of an earlier pruning stage, but no earlier stage pruned "
                    f"{unmasked[0]} ({len(unmasked)} targets): put a pruning stage (wanda, magnitude, sparsegpt) "
                    f"before it covering the same targets"
                )
            patterns = sorted({mask_pattern[t.name] for t in targets})
            if len(patterns) > 1:
                raise CompressError(f"{where}: its targets were pruned with different patterns {patterns}; split it into one stage per pattern")
            try:
                method.bind_mask_pattern(patterns[0])
            except ValueError as error:
                raise CompressError(f"{where}: {error}") from None
            sources = sorted({mask_stage[t.name] for t in targets})
            if len(sources) > 1:
                raise CompressError(f"{where}: its targets were pruned by different stages {sources}; split it into one stage per pruning stage")
            refines = sources[0]
        pattern = method.mask_pattern()
        if pattern is not None:
            mask_pattern.update({t.name: pattern for t in targets})
            mask_stage.update({t.name: index for t in targets})
        planned.append(PlannedStage(method, targets, label=f"stage {index} ({method.name})", refines=refines))
    return planned
