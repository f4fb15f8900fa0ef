"""What a served submission may name: every path in it lies inside the worker's roots.

A submission (`compress submit`, or anyone calling the Prefect API) is someone else's recipe run with
the worker's rights, so the served flow confines it (`compress run` on the user's own machine is not
confined). The roots are the worker's configuration, read from its own environment:

    COMPRESS_MODEL_ROOTS   folders (separated by `:`) that model folders may lie in ($COMPRESS_HOME/models)
    COMPRESS_TEXT_ROOTS    folders that calibration and evaluation texts may lie in ($COMPRESS_HOME/texts)
    COMPRESS_OUTPUT_ROOT   the folder submissions' outputs are written under ($COMPRESS_HOME/outputs)

Every path is resolved (symlinks, `..`, `~`) before it is compared, a model folder's files too, and
the recipe the run uses holds the resolved paths. Hub ids (`name`, `org/name`) are not paths and stay
allowed; the embedded model and texts too. The output folder is the worker's choice, never the
submitter's. Pure functions: nothing here writes anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompressError
from compress.model.load import _looks_like_local_path
from compress.pipeline.output import model_label
from compress.recipe import Recipe

SERVED_FLAG = "COMPRESS_SERVED"  # set by `compress serve` in its own environment: its flow runs are confined
MODEL_ROOTS, TEXT_ROOTS, OUTPUT_ROOT = "COMPRESS_MODEL_ROOTS", "COMPRESS_TEXT_ROOTS", "COMPRESS_OUTPUT_ROOT"
WORKER_SUBMITTER = "COMPRESS_WORKER_SUBMITTER"  # set on a worker: every submission it runs is this submitter's
ANONYMOUS = "anonymous"
MAX_FILES = 100_000  # in one model folder or dataset folder

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # recipe names, submitters: safe as a file name
_REGISTERED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # registered model names (MLflow refuses '/' and ':')
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


@dataclass(frozen=True)
class Roots:
    models: tuple[Path, ...]
    texts: tuple[Path, ...]
    output: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Roots:
        """The roots from the worker's environment (default: under $COMPRESS_HOME), resolved."""
        env = os.environ if environ is None else environ
        home = Path(env.get("COMPRESS_HOME") or Path.home() / ".compress").expanduser()

        def folders(name: str, default: Path) -> tuple[Path, ...]:
            listed = [part for part in (env.get(name) or "").split(os.pathsep) if part.strip()]
            return tuple(Path(part).expanduser().resolve() for part in listed) or (default.resolve(),)

        output = (env.get(OUTPUT_ROOT) or "").strip()
        return cls(folders(MODEL_ROOTS, home / "models"), folders(TEXT_ROOTS, home / "texts"),
                   Path(output).expanduser().resolve() if output else (home / "outputs").resolve())

    def describe(self) -> str:
        return (f"models under {os.pathsep.join(map(str, self.models))}, texts under {os.pathsep.join(map(str, self.texts))}, "
                f"outputs under {self.output}")


def is_served(deployment_id: str | None, environ: Mapping[str, str] | None = None) -> bool:
    """A flow run is a submission when it belongs to a deployment (anything that came through the
    Prefect API) or its worker says so; neither is a parameter a submitter can set."""
    env = os.environ if environ is None else environ
    return bool(deployment_id) or env.get(SERVED_FLAG) == "1"


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _real(path: Path, what: str, value: str) -> Path:
    try:
        return path.expanduser().resolve()
    except (RuntimeError, OSError):  # a symlink loop; a name too long
        raise CompressError(f"{what} {value}: {path} cannot be resolved (a symlink loop?)") from None


def _resolved(value: str, roots: tuple[Path, ...], what: str, kind: str) -> Path:
    path = _real(Path(value), what, value)
    if not _inside(path, roots):
        raise CompressError(f"{what} {value}: outside the worker's {kind} roots ({os.pathsep.join(map(str, roots))}); "
                            f"a submission may only name paths under them")
    return path


def _tree_inside(folder: Path, roots: tuple[Path, ...], what: str, value: str, kind: str) -> None:
    """Every file and folder under `folder`, followed through symlinks, resolves inside `roots`."""
    seen: set[Path] = set()
    count = 0
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = _real(Path(top), what, value)
        if real in seen:  # a symlink loop, or a folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        for name in dirs + files:
            count += 1
            if count > MAX_FILES:
                raise CompressError(f"{what} {value}: more than {MAX_FILES} files")
            if not _inside(_real(Path(top) / name, what, value), roots):
                inner = (Path(top) / name).relative_to(folder)
                raise CompressError(f"{what} {value}: {inner} leads outside the worker's {kind} roots")


def _source(value: str, roots: tuple[Path, ...], what: str, kind: str) -> str:
    """A model or dataset source: a hub id as it is, a path resolved inside `roots` (with its files)."""
    if not _looks_like_local_path(value):
        if not _HUB_ID.fullmatch(value):
            raise CompressError(f"{what} {value!r}: neither a hub id (name or org/name) nor a path")
        return value
    path = _resolved(value, roots, what, kind)
    if path.is_dir():
        _tree_inside(path, roots, what, value, kind)
    return str(path)


def confine(recipe: Recipe, roots: Roots, *, out: str | None = None, overwrite: bool = False) -> Recipe:
    """The recipe a submission may run: its paths resolved inside the roots, or CompressError (one
    line). `out` and `overwrite` are the flow's own parameters: a submission may set neither."""
    if out is not None or recipe.output.dir is not None:
        raise CompressError("output.dir: a submission's output folder is chosen by the worker (one per run under its "
                            "COMPRESS_OUTPUT_ROOT); leave output.dir unset")
    if overwrite:
        raise CompressError("overwrite: a submission always writes a new folder; leave it unset")
    if not _NAME.fullmatch(recipe.name):
        raise CompressError(f"name {recipe.name!r}: a submitted recipe's name is letters, digits, '.', '_' and '-' "
                            f"(at most 128, not starting with '.' or '-')")
    model, calibration, evaluate = recipe.model, recipe.calibration, recipe.evaluate
    if model.source is not None:
        model = model.model_copy(update={"source": _source(model.source, roots.models, "model.source", "model")})
    if calibration.text:
        texts = [str(_resolved(text, roots.texts, "calibration.text", "text")) for text in calibration.text]
        calibration = calibration.model_copy(update={"text": texts})
    if calibration.dataset:
        calibration = calibration.model_copy(update={"dataset": _source(calibration.dataset, roots.texts, "calibration.dataset", "text")})
    if evaluate.text:
        evaluate = evaluate.model_copy(update={"text": str(_resolved(evaluate.text, roots.texts, "evaluate.text", "text"))})
    return recipe.model_copy(update={"model": model, "calibration": calibration, "evaluate": evaluate})


def output_folder(recipe: Recipe, roots: Roots, run_id: str) -> Path:
    """Where a submission's output goes: a new folder under the output root, named by the worker."""
    folder = roots.output / f"{recipe.name}-{model_label(recipe)}-{run_id[:8]}"
    if folder.resolve().parent != roots.output:
        raise CompressError(f"output folder {folder} would not lie directly under the output root {roots.output}")
    return folder


def registered_name(name: str) -> str:
    """A registered model name a submission may ask for (who owns it is checked against MLflow)."""
    if not _REGISTERED.fullmatch(name):
        raise CompressError(f"output.register_as {name!r}: letters, digits, '.', '_' and '-' (at most 200)")
    return name


def submitter_identity(declared: str | None, environ: Mapping[str, str] | None = None) -> str:
    """Who a submission belongs to: the worker's COMPRESS_WORKER_SUBMITTER when set (a worker
    dedicated to one person or team: the server side decides), else the name the client declared
    (not authenticated: see docs/security.md), else 'anonymous'."""
    env = os.environ if environ is None else environ
    fixed = (env.get(WORKER_SUBMITTER) or "").strip()
    name = fixed or (declared or "").strip() or ANONYMOUS
    if not _NAME.fullmatch(name):
        raise CompressError(f"submitter {name!r}: letters, digits, '.', '_' and '-' (at most 128)")
    return name
