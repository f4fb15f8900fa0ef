"""A shelf of tensors on disk: model-level statistics (the Fisher diagonal) leave memory as soon as
they are complete and come back one target at a time."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from compress.model.checkpoint import CheckpointFiles, replace_file


class TensorShelf(Mapping):
    """Tensors by name kept in safetensors files in `folder` instead of memory: `put` writes them a
    bounded chunk at a time (each file complete or absent: temporary name + rename), reading returns
    one tensor from its file. `complete` marks a shelf whose writer finished, so a resumed step can
    take it as it is."""

    CHUNK_BYTES = 1 << 30  # at most this much host memory in transit while writing

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: CheckpointFiles | None = None

    @property
    def complete(self) -> bool:
        return (self.folder / "complete").is_file()

    def put(self, tensors: dict[str, torch.Tensor]) -> None:
        """Writes and then drops (pops) every entry of `tensors`, wherever it lives, then marks the shelf complete."""
        self.folder.mkdir(parents=True, exist_ok=True)
        pending: dict[str, torch.Tensor] = {}
        size = part = 0
        for name in list(tensors):
            tensor = tensors.pop(name).detach().cpu().contiguous()
            pending[name] = tensor
            size += tensor.numel() * tensor.element_size()
            if size >= self.CHUNK_BYTES or not tensors:
                replace_file(self.folder / f"part-{part:05d}.safetensors", lambda path, pending=pending: save_file(pending, str(path)))
                pending, size, part = {}, 0, part + 1
        (self.folder / "complete").touch()
        self._files = None

    def _index(self) -> CheckpointFiles:
        if self._files is None:
            self._files = CheckpointFiles(self.folder)
        return self._files

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._index().where:
            raise KeyError(name)
        return self._index().read([name])[name]

    def __contains__(self, name: object) -> bool:
        return name in self._index().where  # without reading the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._index().where)

    def __len__(self) -> int:
        return len(self._index().where)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self._files = None
