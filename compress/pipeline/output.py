"""The output folder: its default name, the marker that says compress wrote it, and the rules for
replacing it.

Default: runs/<recipe>-<model>-<8 hex of the recipe and model>, so the same recipe on two models
never shares a folder. A folder is replaced only if compress wrote it: it holds a marker
(`.compress-output.json`) naming the run that wrote it and every file it wrote. A folder without
the marker, or with files the marker does not list (a user's notes put beside the outputs), is never
replaced, `--overwrite` or not; one written for another recipe or model only with `--overwrite`.
Inputs (the model, the texts) may not lie inside it. The new output is written beside it under a
temporary name and renamed into place when complete.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.pipeline.store import digest
from compress.recipe import Recipe

MARKER_FILE = ".compress-output.json"


def model_label(recipe: Recipe) -> str:
    """A short, file-name-safe name of the recipe's model: the folder name or the hub id."""
    source = recipe.model.source
    if source is None:
        return "embedded"
    path = Path(source).expanduser()
    name = path.resolve().name if path.exists() else source.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def output_identity(recipe: Recipe) -> dict[str, str]:
    """What makes two runs the same job: the recipe's content and the model it ran on."""
    described = recipe.describe()
    described.pop("output", None)  # where and how it is written is not what it computes
    model = recipe.model.source or "<embedded model>"
    path = Path(model).expanduser()
    return {"recipe": recipe.name, "model": str(path.resolve()) if path.exists() else model, "key": digest(described, model)}


def default_output_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{model_label(recipe)}-{output_identity(recipe)['key'][:8]}"


def resolve_output_dir(recipe: Recipe, out: str | Path | None, overwrite: bool = False) -> Path:
    """`out`, else the recipe's output.dir, else the default; raises CompressError (one line) when
    the run may not write there."""
    path = Path(out or recipe.output.dir or default_output_dir(recipe))
    _check_inputs_outside(recipe, path)
    check_replaceable(path, output_identity(recipe), overwrite)
    return path


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.expanduser().resolve().relative_to(folder.expanduser().resolve())
    except ValueError:
        return False
    return True


def _check_inputs_outside(recipe: Recipe, out: Path) -> None:
    inputs = {"model": [recipe.model.source] if recipe.model.source else [],
              "calibration.text": recipe.calibration.text or [], "evaluate.text": [recipe.evaluate.text] if recipe.evaluate.text else []}
    for what, paths in inputs.items():
        for path in paths:
            if Path(path).expanduser().exists() and _inside(Path(path), out):
                raise CompressError(f"{what} {path} lies inside the output folder {out}, which a run replaces: choose another --out")


def written_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER_FILE)


def check_replaceable(path: Path, identity: dict[str, str], overwrite: bool) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise CompressError(f"output path {path} exists and is not a folder; choose another --out")
    if not any(path.iterdir()):
        return
    marker = path / MARKER_FILE
    if not marker.is_file():
        raise CompressError(f"output folder {path} is not empty and was not written by compress (no {MARKER_FILE}); "
                            f"choose another --out (nothing there is replaced, --overwrite or not)")
    written = json.loads(marker.read_text())
    foreign = sorted(set(written_files(path)) - set(written.get("files", [])))
    if foreign:
        raise CompressError(f"output folder {path} holds {len(foreign)} files compress did not write ({foreign[0]}"
                            f"{', ...' if len(foreign) > 1 else ''}); move them or choose another --out")
    before = written.get("identity", {})
    if before.get("key") != identity["key"] and not overwrite:
        raise CompressError(f"output folder {path} holds recipe {before.get('recipe')!r} on {before.get('model')}; "
                            f"add --overwrite to replace it, or choose another --out")


def publish(partial: Path, out_dir: Path, identity: dict[str, Any]) -> None:
    """Mark the finished `partial` folder as ours and move it into place, replacing an earlier output
    of ours (checked again now: another run may have written there since the start)."""
    (partial / MARKER_FILE).write_text(json.dumps({"identity": identity, "files": written_files(partial)}, indent=1))
    check_replaceable(out_dir, identity, overwrite=True)
    if out_dir.exists():
        retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(retired)
        partial.rename(out_dir)
        shutil.rmtree(retired)
    else:
        partial.rename(out_dir)


def partial_folder(out_dir: Path) -> Path:
    """A fresh temporary sibling of `out_dir`, removed if the process is interrupted."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    return partial



_HELD: dict[Path, list[int]] = {}  # parent folder -> [its open descriptor, how many hold the lock here]
_HELD_LOCK = threading.Lock()


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold the output folder from export to registration: two runs writing the same folder take
    turns, so each registers what it wrote. The lock is taken on the folder's parent directory (no
    lock file left anywhere; runs writing other folders of the same parent take turns too, for their
    export only). Counted within a process: the flow holds it from the export step to the
    registration, the engine around export and audit; the last one out releases it."""
    parent = out_dir.expanduser().absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    with _HELD_LOCK:
        held = _HELD.get(parent)
        if held is None:
            handle = os.open(parent, os.O_RDONLY)
            _HELD[parent] = held = [handle, 0]
    if held[1] == 0:
        fcntl.flock(held[0], fcntl.LOCK_EX)
    held[1] += 1
    try:
        yield
    finally:
        held[1] -= 1
        if held[1] == 0:
            with _HELD_LOCK:
                del _HELD[parent]
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])


def check_space(out_dir: Path, store_root: Path, params: int, storage_bits: int, stages: int, onnx: bool, hf: bool = False) -> None:
    """Raise CompressError (one line, before any work) when the output or the step store cannot be
    written, or their file systems lack room: the output holds the packed model (at most the dense
    checkpoint's size), the dense checkpoint with `hf` and a float32 ONNX file with `onnx`; the store
    a checkpoint per stage. Estimates, 10% margin."""
    checkpoint = params * storage_bits // 8
    needs = {out_dir.parent: checkpoint * (2 if hf else 1) + (params * 4 if onnx else 0), store_root: checkpoint * (stages + 1)}
    for folder, need in needs.items():
        existing = folder
        while not existing.exists():
            existing = existing.parent
        if not os.access(existing, os.W_OK):
            raise CompressError(f"cannot write to {folder} ({existing} is not writable): choose another --out or COMPRESS_HOME")
        free = shutil.disk_usage(existing).free
        if free < need * 1.1:
            raise CompressError(f"{existing} has {free / 2**30:.1f} GiB free, the run needs about {need * 1.1 / 2**30:.1f} GiB there: "
                                f"free some space or choose another --out or COMPRESS_HOME")
