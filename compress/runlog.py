"""The run's log kept beside its output: every message the `compress` logger emits while a run is in
progress (INFO and above, whatever the terminal shows), timestamped, written to OUT/run.log by the
export step. Collected by a handler on the logger for the run's duration, so messages from every
thread of the run (Prefect runs tasks in worker threads) are caught."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

LOG_FILE = "run.log"
_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
_active: list[RunLog] = []
_lock = threading.Lock()


class RunLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(_FORMAT.format(record))


@contextmanager
def capture() -> Iterator[RunLog]:
    """Collect the compress logger's messages while the block runs."""
    logger = logging.getLogger("compress")
    handler = RunLog()
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:  # a quiet terminal still gets a complete file
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    with _lock:
        _active.append(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        with _lock:
            _active.remove(handler)


def current_text() -> str:
    """What the innermost run in progress has logged so far ("" outside a run)."""
    with _lock:
        return "\n".join(_active[-1].lines) + "\n" if _active and _active[-1].lines else ""
