"""The tracking store checked before any work: a server that does not answer, or a SQLite file that
is not a database, is said in one line within seconds (MLflow's own client retries for minutes and
prints a long traceback)."""

from __future__ import annotations

import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

from compress.errors import CompressError

TIMEOUT_SECONDS = 5.0


def check_tracking_store(uri: str, timeout: float = TIMEOUT_SECONDS) -> None:
    """Raise CompressError unless the MLflow store at `uri` can be reached (http) or opened (sqlite)."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)  # the configured server
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise CompressError(f"the MLflow tracking server {uri} does not answer ({reason}); start it "
                                f"(mlflow/start-server.sh), fix MLFLOW_TRACKING_URI, or run with --no-track") from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.exists():
            if not _writable_folder(path.parent):
                raise CompressError(f"the MLflow store {path} cannot be created: {path.parent} is not writable")
            return
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout) as connection:
                connection.execute("PRAGMA quick_check").fetchone()
        except sqlite3.DatabaseError as error:
            raise CompressError(f"the MLflow store {path} is not a readable SQLite database ({error}); move it aside, "
                                f"or point MLFLOW_TRACKING_URI elsewhere") from None


def _writable_folder(folder: Path) -> bool:
    import os

    while not folder.exists():
        folder = folder.parent
    return os.access(folder, os.W_OK)
