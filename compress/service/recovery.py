"""MLflow runs left RUNNING by a process that was killed (SIGKILL, out of memory): each run records
the host and pid of the process tracking it, and the next tracked run on that host marks those
whose process is gone FAILED, saying why."""

from __future__ import annotations

import os
import socket
from typing import Any

from compress.leftovers import pid_alive

HOST_TAG = "compress.host"
PID_TAG = "compress.pid"


def owner_tags() -> dict[str, str]:
    """Tags that say which process tracks a run."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def fail_orphaned_runs(client: Any, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs of this host whose tracking process is gone; returns their ids."""
    host = socket.gethostname()
    found = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
                               max_results=1000)
    failed = []
    for run in found:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            client.set_tag(run.info.run_id, "compress.error", f"its process ({pid} on {host}) ended without finishing it (killed?)")
            client.set_terminated(run.info.run_id, "FAILED")
            failed.append(run.info.run_id)
    return failed
