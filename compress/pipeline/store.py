"""The steps of a run, each a folder on disk keyed by the content of its inputs.

load -> calibrate -> stage 0 .. n-1 -> evaluate -> export. A step reads the folders of the steps
before it and writes its own; nothing but paths and small JSON passes between steps, so any step can
run in another process (a Prefect task, a worker) and a re-run finds every step whose inputs did not
change already done. A step's key hashes what decides its result: the recipe section it runs, the
keys of the steps it reads (which hash their own inputs in turn), the content of the files it reads
and the package version. A folder appears under its final name only when complete (written under a
temporary name, then renamed), so a killed run leaves no half-step that a later run would trust.

Where steps live: $COMPRESS_HOME/steps (default ~/.compress/steps). Every stage keeps a full
checkpoint, so `compress cache clear` (or deleting the folder) is how the space comes back.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compress import __version__
from compress.calibration.distributed import barrier, from_leader, is_follower, world_size
from compress.cleanup import undo_on_abort
from compress.errors import CompressError
from compress.settings import compress_home

log = logging.getLogger("compress")

STEP_FILE = "step.json"
MODEL_DIR = "model"
# The steps every process of a data-parallel run goes through together (compress/calibration/distributed.py),
# and whether the processes other than 0 compute them too (a stage: their share of the statistics).
SHARED_STEPS = {"calibrate": False, "stage": True}


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def tree_digest(root: Path) -> str:
    """Hash of every file's relative name and content under a folder (hidden entries skipped)."""
    hasher = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        hasher.update(str(relative).encode() + b"\0" + file_digest(path).encode() + b"\0")
    return hasher.hexdigest()


@dataclass
class StepResult:
    """What one step hands to the next: where its folder is and what it recorded (step.json)."""

    kind: str
    key: str
    path: Path
    info: dict[str, Any] = field(default_factory=dict)
    cached: bool = False  # found done in the store: nothing was computed this time
    seconds: float = 0.0  # wall time of this call (near zero when cached)

    @property
    def model_path(self) -> Path:
        """The Hugging Face checkpoint this step leaves (the source model for `load`)."""
        return Path(self.info["model_path"]) if "model_path" in self.info else self.path / MODEL_DIR


class StepStore:
    """Folders of finished steps, one per (kind, key)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def default(cls) -> StepStore:
        return cls(compress_home() / "steps")

    def folder(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}"

    def lookup(self, kind: str, key: str) -> StepResult | None:
        folder = self.folder(kind, key)
        marker = folder / STEP_FILE
        if not marker.is_file():
            return None
        return StepResult(kind, key, folder, json.loads(marker.read_text()), cached=True)

    def run(self, kind: str, key: str, compute: Callable[[Path], dict[str, Any]], resumable: bool = False) -> StepResult:
        """The stored result for (kind, key), or compute it into a fresh folder and store it.

        `compute(folder)` writes its files into `folder` and returns the JSON-able info kept in
        step.json. Two runs computing the same step at once both finish; the first rename wins.
        `resumable`: the work folder is named by the key alone and kept when the step fails or is
        killed, so the next run of the same step finds what `compute` checkpointed there (one run at
        a time holds it, by a lock; another computes in a folder of its own). In a data-parallel run
        the calibrate and stage steps are taken by every process together (`_run_together`).
        """
        if world_size() > 1 and kind in SHARED_STEPS:
            return self._run_together(kind, key, compute, resumable)
        started = time.perf_counter()
        found = self.lookup(kind, key)
        if found is not None:
            found.seconds = time.perf_counter() - started
            return found
        return self._compute(kind, key, compute, resumable, started)

    def _run_together(self, kind: str, key: str, compute: Callable[[Path], dict[str, Any]], resumable: bool) -> StepResult:
        """A step of a data-parallel run: process 0 looks it up and, if it is not stored, computes and
        stores it while the others compute alongside (a stage: their share of its statistics, written
        nowhere) or wait (SHARED_STEPS); then every process reads what process 0 stored."""
        started = time.perf_counter()
        found = None if is_follower() else self.lookup(kind, key)
        if from_leader(int(found is not None)):
            result = found or self.lookup(kind, key)
        else:
            if not is_follower():
                self._compute(kind, key, compute, resumable, started)
            elif SHARED_STEPS[kind]:
                with tempfile.TemporaryDirectory(prefix="compress-follower-") as scratch:
                    compute(Path(scratch))
            barrier()  # process 0's folder is in place
            result = self.lookup(kind, key)
            if result is None:
                raise CompressError(f"the {kind} step process 0 stored is not in {self.root}: every process needs the same COMPRESS_HOME")
            result.cached = False
        result.seconds = time.perf_counter() - started
        return result

    def _compute(self, kind: str, key: str, compute: Callable[[Path], dict[str, Any]], resumable: bool, started: float) -> StepResult:
        """Compute the step into a fresh folder and store it (see `run`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.folder(kind, key)
        with _work_folder(self.root, final.name, resumable) as (partial, keep_on_failure):
            try:
                info = compute(partial)
                info["seconds"] = time.perf_counter() - started
                info["compress_version"] = __version__
                (partial / STEP_FILE).write_text(json.dumps(info, indent=1))
                try:
                    partial.rename(final)
                except OSError:  # another run finished the same step first: theirs is as good as ours
                    if not (final / STEP_FILE).is_file():
                        raise
                    shutil.rmtree(partial, ignore_errors=True)
            except BaseException:
                if not keep_on_failure:
                    shutil.rmtree(partial, ignore_errors=True)
                raise
        result = self.lookup(kind, key)
        assert result is not None
        result.cached = False
        result.seconds = time.perf_counter() - started
        return result

    def clear(self) -> int:
        """Remove every stored step; returns how many there were."""
        if not self.root.is_dir():
            return 0
        count = sum(1 for p in self.root.iterdir() if (p / STEP_FILE).is_file())
        shutil.rmtree(self.root)
        return count


@contextmanager
def _work_folder(root: Path, name: str, resumable: bool) -> Iterator[tuple[Path, bool]]:
    """(folder to compute in, whether to keep it on failure). A resumable step gets the folder
    named by its key if no other process holds its lock, else a fresh one like any step."""
    if resumable:
        lock_path = root / f".{name}.lock"
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # another run is computing this step now: work apart from it
            else:
                folder = root / f".{name}.resume"
                folder.mkdir(exist_ok=True)
                try:
                    yield folder, True
                finally:
                    if not folder.exists():  # finished: nothing left to resume
                        lock_path.unlink(missing_ok=True)
                    fcntl.flock(lock, fcntl.LOCK_UN)
                return
    folder = root / f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    with undo_on_abort(lambda: shutil.rmtree(folder, ignore_errors=True)):
        yield folder, False


def save_tokens(path: Path, tokens: torch.Tensor) -> None:
    save_file({"tokens": tokens.contiguous()}, str(path))


def load_tokens(path: Path) -> torch.Tensor:
    return load_file(str(path))["tokens"]


def file_digests(paths: list[str]) -> list[str]:
    """Content hashes of input files (so a recipe naming the same text elsewhere hits the cache)."""
    out = []
    for path in paths:
        resolved = Path(path).expanduser()
        if not resolved.is_file():
            raise CompressError(f"file not found: {path}")
        out.append(file_digest(resolved))
    return out
