"""What an interrupted run undoes before its process ends.

A run that Ctrl-C or SIGTERM stops must end within seconds, leave no half-written folder and mark
its MLflow run KILLED; the unwinding of Prefect's engine takes about a minute, so the command line
stops the process itself (`compress.cli`), after running the actions registered here: each writer
of a temporary folder registers its removal while the folder exists, and the tracker registers
marking its runs KILLED. Standard library only.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_ACTIONS: dict[int, Callable[[], None]] = {}
_LOCK = threading.Lock()
_KEYS = itertools.count()


@contextmanager
def undo_on_abort(action: Callable[[], None]) -> Iterator[None]:
    """While inside, `action` runs if the process is interrupted (see `run_abort_actions`)."""
    key = next(_KEYS)
    with _LOCK:
        _ACTIONS[key] = action
    try:
        yield
    finally:
        with _LOCK:
            _ACTIONS.pop(key, None)


def run_abort_actions() -> None:
    """Run every registered action, the most recent first; one that fails does not stop the others."""
    with _LOCK:
        actions = [_ACTIONS.pop(key) for key in sorted(_ACTIONS, reverse=True)]
    for action in actions:
        try:
            action()
        except Exception:  # best effort: the process is ending
            pass
