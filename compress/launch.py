"""Start the processes of a data-parallel run on this machine and watch them, as torchrun would.

Each process runs the same command with torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE) and meets the others through a file in a folder this process owns. A process that
fails (an exception, a kill, an exit code) fails the run: the others are stopped at once (SIGTERM, so
each undoes its half-written work, then SIGKILL), and the one that failed first is named, with the
error line it left in the meeting folder. Ctrl-C or SIGTERM here reaches every process, and the run
ends when they have stopped. A process whose parent dies is stopped too (Linux). Standard library only.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

INIT_VARIABLE = "COMPRESS_INIT_METHOD"  # where the spawned processes meet (torch.distributed init_method)
ERRORS_VARIABLE = "COMPRESS_RANK_ERRORS"  # the folder a failing process leaves its error line in
PARENT_VARIABLE = "COMPRESS_LAUNCHER_PID"
STOP_SECONDS = 30.0  # from SIGTERM to SIGKILL for the processes still running after one failed
_PR_SET_PDEATHSIG = 1


@dataclass
class Failure:
    """How the run's first failing process ended."""

    rank: int
    world: int
    code: int  # exit code; negative: killed by that signal
    error: str = ""  # the error line it left, if any

    def describe(self) -> str:
        what = f"rank {self.rank} of {self.world}"
        if self.code < 0:
            return f"{what} was killed ({signal.Signals(-self.code).name})"
        return f"{what} failed: {self.error}" if self.error else f"{what} exited with code {self.code}"


def launch(command: list[str], world: int) -> Failure | int | None:
    """Run `command` as ranks 0..world-1 and wait for them. None: all succeeded; a Failure: the first
    process that failed (the others stopped); an int: the signal that stopped the run here."""
    with tempfile.TemporaryDirectory(prefix="compress-ranks-") as meeting:
        threads = max(1, _cores() // world)
        processes = []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                   INIT_VARIABLE: f"file://{meeting}/store", ERRORS_VARIABLE: meeting, PARENT_VARIABLE: str(os.getpid())}
            env.setdefault("OMP_NUM_THREADS", str(threads))  # the processes share the cores, not each take all of them
            processes.append(subprocess.Popen(command, env=env))
        return _watch(processes, Path(meeting))


def _watch(processes: list[subprocess.Popen], meeting: Path) -> Failure | int | None:
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stopping_since = None
        while True:
            codes = [process.poll() for process in processes]
            failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
            if received:  # every process stops itself; the run ends when they have, or are made to
                stopping_since = stopping_since or time.monotonic()
                if all(code is not None for code in codes) or time.monotonic() - stopping_since > STOP_SECONDS:
                    return received[0]
            elif failed:
                first = _first_failure(failed, processes, meeting)
                _stop(processes)
                return first
            elif all(code == 0 for code in codes):
                return None
            time.sleep(0.05)
    finally:
        _stop(processes)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _first_failure(failed: list[int], processes: list[subprocess.Popen], meeting: Path) -> Failure:
    """Of the processes found failed together, the cause: one killed by a signal (it could leave no
    line), else the one whose error came first (the others' errors follow from it)."""
    def when(rank: int) -> tuple[int, float, int]:
        killed = processes[rank].returncode < 0
        return (0 if killed else 1, _error(meeting, rank)[0], rank)

    rank = min(failed, key=when)
    return Failure(rank, len(processes), processes[rank].returncode, _error(meeting, rank)[1])


def _error(meeting: Path, rank: int) -> tuple[float, str]:
    try:
        stamp, line = (meeting / f"rank-{rank}.error").read_text().split("\n", 1)
        return float(stamp), line.strip()
    except (OSError, ValueError):
        return math.inf, ""


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM what still runs, SIGKILL it after STOP_SECONDS."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def record_failure(error: BaseException) -> None:
    """In a launched process: leave the error line the launcher names the failure with."""
    folder, rank = os.environ.get(ERRORS_VARIABLE), os.environ.get("RANK")
    if folder and rank is not None and Path(folder).is_dir():
        line = f"{type(error).__name__}: {error}".splitlines()[0] if str(error) else type(error).__name__
        (Path(folder) / f"rank-{rank}.error").write_text(f"{time.time()}\n{line}\n")


def stop_with_launcher() -> None:
    """In a launched process: be stopped (SIGTERM) if the launcher dies, as its other processes are (Linux)."""
    parent = os.environ.get(PARENT_VARIABLE)
    if not parent:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the request took
        os.kill(os.getpid(), signal.SIGTERM)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
