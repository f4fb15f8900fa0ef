"""Resume inside a stage: each finished block is checkpointed, so a killed stage continues where it was.

The stage step works in a folder named by its key, the fingerprint of everything that decides its
result (model, recipe section, calibration data, package version; compress/steps.py), so a run with a
changed fingerprint never sees another's checkpoints. After block i the handler writes, each file
under a temporary name and renamed into place:
  model/model-…-of-….safetensors  block i, as its shard of the stage's output checkpoint
  resume/state-i/                  the masks and packed weights of block i's targets (which leave
                                   memory then; when the stage ends the masks come back and the
                                   packed weights are copied, bytes only, into its packed file)
  resume/hidden.safetensors        the calibration hidden states feeding block i + 1 (in a data-parallel
                                   run, every process's, by batch number: process 0 keeps them)
  resume/progress.json             written last: the next block to run and the outcomes so far
The last two are a resume point, written after a block once CHECKPOINT_SECONDS (default 60 s) have
passed since the previous one, not after every block: at 128 x 2048 calibration tokens a 7B model's
hidden states are 2 GB, more than its block. A killed stage loses at most that much work.
A restarted stage captures the other block arguments afresh (positions, masks: cheap and the same),
takes the hidden states and outcomes from the checkpoint and continues at the next block, so its
output is bit-identical to an uninterrupted run's. The `resume` folder goes when the stage finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compress.calibration.distributed import from_leader, gather_batches, scatter_batches
from compress.calibration.layerwise import BlockHandler, BlockInputs, StageOutcome
from compress.calibration.streaming import BlockwiseModel
from compress.errors import CompressError
from compress.model.checkpoint import CheckpointWriter, replace_file
from compress.state import CompressionState

RESUME_DIR = "resume"
PROGRESS_FILE = "progress.json"
HIDDEN_FILE = "hidden.safetensors"
CHECKPOINT_SECONDS = "COMPRESS_CHECKPOINT_SECONDS"


def checkpoint_seconds() -> float:
    """Seconds between two resume points of a stage ($COMPRESS_CHECKPOINT_SECONDS; 0: after every block)."""
    value = os.environ.get(CHECKPOINT_SECONDS, "60")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise CompressError(f"{CHECKPOINT_SECONDS}={value!r}: give a number of seconds, 0 or more")
    return seconds


def resume_point_due(since: float, interval: float) -> bool:
    """Whether a resume point is written now (process 0 decides for all: the hidden states are gathered
    from every process)."""
    return bool(from_leader(int(time.monotonic() - since >= interval)))


class StageBlocks(BlockHandler):
    """Streams blocks through a stage (compress/streaming.py) and checkpoints each finished one."""

    def __init__(self, model: BlockwiseModel, folder: Path, model_dir: Path, fingerprint: str) -> None:
        self.model = model
        self.resume_dir = folder / RESUME_DIR
        self.resume_dir.mkdir(parents=True, exist_ok=True)
        self.writer = CheckpointWriter(model_dir, len(model.layout.blocks))
        self.fingerprint = fingerprint
        self.resumed_at = 0
        self.interval = checkpoint_seconds()
        self.last_point = time.monotonic()

    def _targets_of(self, index: int) -> list[str]:
        return [t.name for t in self.model.layout.targets if t.block == index]

    def resume(self, outcomes: list[StageOutcome], state: CompressionState) -> tuple[int, list[torch.Tensor] | None]:
        first, hidden = self._saved_progress(outcomes)
        # a data-parallel run: the other processes start where this one does, each with its batches' hidden states
        first = from_leader(first)
        self.resumed_at = first
        return first, scatter_batches(hidden) if from_leader(int(hidden is not None)) else None

    def _saved_progress(self, outcomes: list[StageOutcome]) -> tuple[int, dict[int, torch.Tensor] | None]:
        """(next block, hidden states by batch number) of the checkpoints here; restores `outcomes`."""
        path = self.resume_dir / PROGRESS_FILE
        if not path.is_file():
            return 0, None
        progress = json.loads(path.read_text())
        if progress["fingerprint"] != self.fingerprint:  # cannot happen through the step store; be safe
            shutil.rmtree(self.resume_dir)
            self.resume_dir.mkdir()
            return 0, None
        for outcome, saved in zip(outcomes, progress["outcomes"], strict=True):
            for name, value in saved.items():
                setattr(outcome, name, value)
        hidden = None
        if progress["hidden"]:
            stored = load_file(str(self.resume_dir / HIDDEN_FILE))
            hidden = {int(i): tensor for i, tensor in stored.items()}
        return progress["next_block"], hidden

    def fetch(self, index: int) -> None:
        self.model.fetch(index)

    def finish(self, index: int, inputs: list[BlockInputs], outcomes: list[StageOutcome], state: CompressionState) -> None:
        self.writer.write(index + 1, self.model.block_tensors(index))
        self.model.release(index)
        names = [name for name in self._targets_of(index) if name in state.targets]
        if names:
            folder = self.resume_dir / f"state-{index}"
            partial = folder.with_name(f".{folder.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            state.subset(names).save(partial)
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
            for name in names:  # on disk now; `close` brings them back (a 7B model's masks are 0.8 GB)
                del state.targets[name]
        if not resume_point_due(self.last_point, self.interval):
            return
        self.last_point = time.monotonic()
        if inputs:  # every process's, by batch number (one process: its own)
            gathered = gather_batches([item.hidden for item in inputs])
            assert gathered is not None
            tensors = {str(i): tensor for i, tensor in gathered.items()}
            replace_file(self.resume_dir / HIDDEN_FILE, lambda p: save_file(tensors, str(p)))
        progress = {"fingerprint": self.fingerprint, "next_block": index + 1, "hidden": bool(inputs),
                    "outcomes": [asdict(outcome) for outcome in outcomes]}
        replace_file(self.resume_dir / PROGRESS_FILE, lambda p: p.write_text(json.dumps(progress)))

    def close(self, state: CompressionState, folder: Path) -> None:
        """The stage is done: bring the blocks' target states back into `state` (their packed forms
        stay on disk until they are copied), save it in `folder`, write what lies outside the blocks
        and the index, drop the checkpoints."""
        for index in range(len(self.model.layout.blocks)):
            saved = self.resume_dir / f"state-{index}"
            if saved.is_dir():
                state.update(CompressionState.load(saved, read_packed_forms=False))
        state.save(folder)
        self.writer.write(0, self.model.outside_tensors())
        self.writer.finish(self.model.source)
        shutil.rmtree(self.resume_dir)


class FollowerBlocks(BlockHandler):
    """A data-parallel run's other processes (not process 0): blocks streamed in and released as
    StageBlocks does, nothing written; their hidden states go to process 0's checkpoint, and a
    resumed stage starts at process 0's block with its hidden states from there."""

    def __init__(self, model: BlockwiseModel) -> None:
        self.model = model

    def resume(self, outcomes: list[StageOutcome], state: CompressionState) -> tuple[int, list[torch.Tensor] | None]:
        first = from_leader(0)
        return first, scatter_batches(None) if from_leader(0) else None

    def fetch(self, index: int) -> None:
        self.model.fetch(index)

    def finish(self, index: int, inputs: list[BlockInputs], outcomes: list[StageOutcome], state: CompressionState) -> None:
        if from_leader(0) and inputs:  # whether process 0 writes a resume point now (resume_point_due): a collective
            gather_batches([item.hidden for item in inputs])
        self.model.release(index)
        for target in self.model.layout.targets:  # process 0 keeps the state; here it would only take memory
            if target.block == index:
                state.targets.pop(target.name, None)
