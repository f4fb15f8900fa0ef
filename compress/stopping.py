"""How a command stops on Ctrl-C or SIGTERM: within seconds, with one line, and nothing left running.

`compress run` does its work in a worker thread, so the main thread is free to take the signal
whatever the work is doing (a Prefect flow run installs its own SIGTERM handler only when it runs in
the main thread, and unwinding through it takes about a minute). On a signal the main thread runs
the registered undo actions (compress/cleanup.py: half-written folders removed, MLflow runs marked
KILLED), stops the processes this one started (a temporary Prefect server), prints one line and
exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM). What a killed run leaves is
what the step store keeps on purpose: finished steps, and the finished blocks of the stage it was
in, so the same command resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from compress.cleanup import run_abort_actions

T = TypeVar("T")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_interruptible(work: Callable[[], T], stopped_message: str, announce: bool = True) -> T:
    """`work()` in a worker thread; its result, or its exception re-raised here. On SIGINT/SIGTERM:
    undo, stop child processes, print `interrupted (SIGINT): <stopped_message>` (unless not `announce`:
    one process of several says it), exit 128 + signal."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # handed to the main thread
            outcome["error"] = error

    def stop(signum: int, frame: object) -> None:
        for sig in SIGNALS:  # a second Ctrl-C while stopping changes nothing
            signal.signal(sig, signal.SIG_IGN)
        run_abort_actions()
        stop_children()
        if announce:
            start = "\n" if sys.stderr.isatty() else ""  # below a progress bar
            print(f"{start}interrupted ({signal.Signals(signum).name}): {stopped_message}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    worker = threading.Thread(target=target, name="compress-run", daemon=True)
    previous = {sig: signal.signal(sig, stop) for sig in SIGNALS}
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, from /proc (Linux); none elsewhere."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid` in the process tree (children, their children, ...)."""
    found, pending = [], [pid]
    while pending:
        for child in _children(pending.pop()):
            found.append(child)
            pending.append(child)
    return found


def stop_children(timeout: float = 5.0) -> None:
    """SIGTERM every descendant of this process, then SIGKILL what is still there after `timeout`."""
    started = descendants(os.getpid())
    for pid in started:
        _send(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid) for pid in started):
        time.sleep(0.1)
    for pid in started:
        _send(pid, signal.SIGKILL)


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if fields[0] == "Z":  # exited, waiting for its parent to reap it
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def run_server(command: list[str]) -> int:
    """Run a server command in its own process group until it exits or this process gets SIGINT or
    SIGTERM; then the whole group is stopped (a server's workers included) and 128 + signal returned."""
    process = subprocess.Popen(command, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        _signal_group(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    try:
        while True:
            try:
                code = process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.1)
        _signal_group(process.pid, signal.SIGKILL)
    return 128 + received[0] if received else code


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
