"""What a killed process (SIGKILL, out of memory, power) leaves behind, found and removed at the next
start: temporary folders named after a process that no longer exists, and processes compress
started (a temporary Prefect server, the MLflow UI's workers) whose owner is gone.

Every process compress starts inherits COMPRESS_OWNER_PID (the pid of the command that started it),
so an orphan is recognised by its environment; temporary folders carry their writer's pid in their
name (`.NAME.partial-PID...`, `.NAME.old-PID`). A pid that is alive may belong to another program
now: such a folder is left alone (safe), never removed on a guess. Linux (/proc); elsewhere a no-op.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

OWNER_VARIABLE = "COMPRESS_OWNER_PID"
_WRITER = re.compile(r"^\..+\.(?:partial|old)-(\d+)(?:-[0-9a-f]+)?$")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def claim_children() -> None:
    """Mark every process this one starts from now on as ours (they inherit the variable)."""
    os.environ[OWNER_VARIABLE] = str(os.getpid())


def remove_dead_partials(folder: Path) -> list[Path]:
    """Remove the temporary folders in `folder` whose writer process is gone; returns them."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _WRITER.match(entry.name)
        if match and entry.is_dir() and int(match[1]) != os.getpid() and not pid_alive(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def stop_orphans() -> list[int]:
    """SIGTERM the processes compress started whose owner process is gone; returns their pids."""
    stopped = []
    mine = os.getpid()
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == mine:
            continue
        owner = _environ(pid).get(OWNER_VARIABLE)
        if owner and owner.isdigit() and int(owner) != mine and not pid_alive(int(owner)):
            try:
                os.kill(pid, signal.SIGTERM)
                stopped.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
    return stopped
