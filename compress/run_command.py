"""`compress run`: the recipe run here, in one process, or data-parallel in several (`--nproc N`, or
every process of a torchrun launch running the same command).

Data-parallel, each process calibrates on its share of the batches and all of them compress from the
same summed statistics (compress/calibration/distributed.py). Process 0 checks the run before any
work (its refusal reaches the others), prints, tracks, stores every step, evaluates and writes the
output; the others print nothing and write nothing. Stopped or failed, a data-parallel run resumes as
a single one does, with the same command: process 0 holds the finished steps and blocks.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compress.errors import EXIT_INPUT_ERROR, EXIT_RUN_FAILED, CompressError

if TYPE_CHECKING:
    from compress.recipe import Recipe


@dataclass
class Joined:
    """This process's place in a torchrun-style launch (from its environment)."""

    rank: int
    world: int
    local_rank: int
    local_world: int


def joined_launch() -> Joined | None:
    """The launch this process is part of (torchrun, or `compress run --nproc`), if any."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    return Joined(rank, world, int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world)))


def run_command(args: argparse.Namespace, recipe: Recipe) -> int:
    """`compress run` with its parsed arguments; returns the exit code."""
    from compress.pipeline.parallel import check_data_parallel

    joined = joined_launch()
    if joined is not None and args.nproc not in (1, joined.world):
        raise CompressError(f"--nproc {args.nproc} under a launcher that started {joined.world} processes: leave --nproc out")
    check_data_parallel(recipe, joined.world if joined else args.nproc)  # before any process starts or any work
    if joined is not None and joined.world > 1:
        return _run_rank(args, recipe, joined)
    if joined is None and args.nproc > 1:
        return _launch(args, recipe)
    return _run_here(args, recipe)


def _again(args: argparse.Namespace) -> str:
    return shlex.join(["compress", *(args.argv or sys.argv[1:])])


def _kept(args: argparse.Namespace) -> str:
    from compress.pipeline.store import StepStore

    return f"finished steps and blocks are kept in {StepStore.default().root}; resume with: {_again(args)}"


def _run_here(args: argparse.Namespace, recipe: Recipe) -> int:
    from compress.api import execute, prepare
    from compress.stopping import run_interruptible
    from compress.summary import run_header, run_summary

    track = not args.no_track
    out, plan = prepare(recipe, args.out, overwrite=args.overwrite, track=track)
    print(run_header(recipe, plan), file=sys.stderr)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    report = run_interruptible(lambda: execute(recipe, out, track=track, overwrite=args.overwrite), _kept(args))
    print(run_summary(report, str(out)))
    return 0


def _launch(args: argparse.Namespace, recipe: Recipe) -> int:
    """Start --nproc processes running this same command, wait, and say which one failed, if one did."""
    from compress.launch import launch
    from compress.leftovers import remove_dead_partials
    from compress.pipeline.output import resolve_output_dir
    from compress.pipeline.parallel import backend_for
    from compress.pipeline.store import StepStore

    out = resolve_output_dir(recipe, args.out, args.overwrite)
    backend_for(recipe, args.nproc)  # enough devices, before any process starts
    if args.argv is None:  # the command as started (an installed script, python -m, python -c), by this interpreter
        command = [sys.executable, *sys.orig_argv[1:]]
    else:
        command = [sys.executable, "-m", "compress", *args.argv]
    outcome = launch(command, args.nproc)
    if outcome is None:
        return 0
    for folder in (out.parent, StepStore.default().root):  # what a process killed before it could undo its work left
        remove_dead_partials(folder)
    if isinstance(outcome, int):  # stopped by a signal: process 0 said what was kept
        return 128 + outcome
    if outcome.code == EXIT_INPUT_ERROR:  # that process said what to fix, in one line
        return EXIT_INPUT_ERROR
    print(f"error: {outcome.describe()}; the other processes were stopped; {_kept(args)}", file=sys.stderr)
    return EXIT_RUN_FAILED


def _run_rank(args: argparse.Namespace, recipe: Recipe, joined: Joined) -> int:
    """One process of a data-parallel run: join the others, then lead (rank 0) or follow."""
    import torch
    import torch.distributed as dist

    from compress.launch import INIT_VARIABLE, record_failure, stop_with_launcher
    from compress.pipeline.parallel import backend_for

    stop_with_launcher()
    try:
        backend = backend_for(recipe, joined.local_world)
        device = joined.local_rank if backend == "nccl" else None
        if device is not None:
            torch.cuda.set_device(device)
        if joined.rank > 0:
            from compress.progress import set_quiet

            set_quiet(True)
            logging.getLogger("compress").setLevel(logging.ERROR)
        os.environ["COMPRESS_STEP_RETRIES"] = "0"  # a step retried in one process alone would leave the others behind
        dist.init_process_group(backend, init_method=os.environ.get(INIT_VARIABLE, "env://"), rank=joined.rank, world_size=joined.world)
        code = _lead(args, recipe, device) if joined.rank == 0 else _follow(recipe, device)
    except BaseException as error:
        record_failure(error)
        raise
    dist.destroy_process_group()
    return code


def _on_device(device: int | None, work: Callable[[], Any]) -> Callable[[], Any]:
    """`work` for the worker thread run_interruptible starts: CUDA's current device is per thread."""
    def run() -> Any:
        if device is not None:
            import torch

            torch.cuda.set_device(device)
        return work()

    return run


def _word_of_leader(refusal: str | None) -> str | None:
    """Process 0's refusal of the run (None: it goes ahead), on every process."""
    import torch.distributed as dist

    carried: list[Any] = [refusal]
    dist.broadcast_object_list(carried, src=0)
    return carried[0]


def _lead(args: argparse.Namespace, recipe: Recipe, device: int | None) -> int:
    from compress.api import execute, prepare
    from compress.stopping import run_interruptible
    from compress.summary import run_header, run_summary

    track = not args.no_track
    try:
        out, plan = prepare(recipe, args.out, overwrite=args.overwrite, track=track)
    except Exception as error:  # the others would wait for its word
        _word_of_leader(f"{type(error).__name__}: {error}")
        raise
    _word_of_leader(None)
    print(run_header(recipe, plan), file=sys.stderr)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    work = _on_device(device, lambda: execute(recipe, out, track=track, overwrite=args.overwrite))
    try:
        report = run_interruptible(work, _kept(args))
    except CompressError as error:
        raise CompressError(f"rank 0: {error}") from error
    print(run_summary(report, str(out)))
    return 0


def _follow(recipe: Recipe, device: int | None) -> int:
    import torch.distributed as dist

    from compress.pipeline.engine import follow
    from compress.stopping import run_interruptible

    if _word_of_leader(None) is not None:  # process 0 refused the run and says why
        return EXIT_INPUT_ERROR
    try:
        run_interruptible(_on_device(device, lambda: follow(recipe)), "", announce=False)
    except CompressError as error:
        raise CompressError(f"rank {dist.get_rank()}: {error}") from error
    return 0
