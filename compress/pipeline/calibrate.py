"""The calibrate step: seeded calibration token windows, stored by the content of their source;
skipped when no stage gathers statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compress import __version__
from compress.calibration.data import batches, calibration_tokens
from compress.calibration.distributed import share, world_size
from compress.errors import CompressError
from compress.methods import get_method
from compress.pipeline.store import StepResult, StepStore, digest, file_digests, load_tokens, save_tokens
from compress.recipe import Recipe

TOKENS_FILE = "tokens.safetensors"


def needs_calibration(recipe: Recipe) -> bool:
    return recipe.evaluate.layer_error or any(get_method(stage.method).statistics for stage in recipe.stages)


def calibrate_step(store: StepStore, recipe: Recipe, load: StepResult) -> StepResult:
    spec = recipe.calibration
    if not needs_calibration(recipe):
        return StepResult("calibrate", "none", load.path, {**spec.model_dump(mode="json"), "used": False}, cached=True)
    described = spec.model_dump(mode="json")
    if spec.text:
        described["text"] = file_digests(spec.text)  # the content decides, not where it lies
    key = digest("calibrate", __version__, described, load.key)

    def compute(folder: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(load.model_path))
        tokens, source = calibration_tokens(spec, tokenizer)
        save_tokens(folder / TOKENS_FILE, tokens)
        return {**spec.model_dump(mode="json"), "used": True, "source": source, "tokens": int(tokens.numel())}

    return store.run("calibrate", key, compute)


def calibration_batches(calibration: StepResult, recipe: Recipe) -> list[torch.Tensor]:
    """The stored calibration tokens in the recipe's batches; in a data-parallel run, this process's
    share of them (batches[rank::world]: the statistics are summed over the processes)."""
    every = batches(load_tokens(calibration.path / TOKENS_FILE), recipe.calibration.batch_size)
    if len(every) < world_size():
        raise CompressError(f"{len(every)} calibration batches cannot be shared by {world_size()} processes: "
                            "raise calibration.nsamples or lower calibration.batch_size")
    return share(every)
