"""Resumable training checkpoints: the model's parameters and buffers, the optimizer's state, the
task's (masks, ...), the step (which fixes the schedule and the data position: compress/train/data.py)
and the curve so far. Written to a temporary file and renamed into place, so a run killed while
writing leaves the previous checkpoint whole. Read back with `weights_only` (no code runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{CHECKPOINT_FILE}.partial"
    torch.save(state, partial)
    os.replace(partial, folder / CHECKPOINT_FILE)


def load_checkpoint(folder: Path | None) -> dict[str, Any] | None:
    path = None if folder is None else folder / CHECKPOINT_FILE
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
