"""Where compress keeps its files: $COMPRESS_HOME (default ~/.compress) holds the step cache, the
default MLflow store and Prefect's own files. Standard library only: every command reads it first."""

from __future__ import annotations

import os
from pathlib import Path


def compress_home() -> Path:
    """Where compress keeps its step cache and, by default, its MLflow store."""
    return Path(os.environ.get("COMPRESS_HOME") or Path.home() / ".compress").expanduser()
