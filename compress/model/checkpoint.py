"""Hugging Face safetensors checkpoints on disk: read tensors by name from one file or shards with an
index, and write one shard at a time (each shard complete or absent), so a model never has to be
held whole to be read or written."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compress.errors import CompressError
from compress.formats.packed_file import SAFETENSORS_DTYPE_BYTES

INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".index.json")


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """`write(temporary path)`, then rename it to `path`: the file appears complete or not at all."""
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    os.replace(partial, path)


class CheckpointFiles:
    """The tensors of a Hugging Face safetensors checkpoint (one file or shards with an index), read by name."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / INDEX_FILE
        if index.is_file():
            self.where = dict(json.loads(index.read_text())["weight_map"])
        else:
            self.where = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), "pt") as handle:
                    self.where.update({key: file.name for key in handle.keys()})

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.where[name], []).append(name)
        for file, keys in by_file.items():
            with safe_open(str(self.folder / file), "pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in keys})
        return tensors


def unique_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name, a tied parameter under its first name only."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor
    return tensors


def keys_match(model: nn.Module, files: CheckpointFiles) -> bool:
    """Whether the checkpoint's files hold every tensor of `model` under its own name."""
    return set(unique_tensors(model)) <= set(files.where)


class CheckpointWriter:
    """Writes a checkpoint one shard at a time: shard 0 holds what lies outside the blocks, shard i+1
    block i. Each shard appears complete or not at all (temporary name + rename), so after a kill
    the shards present are whole and a resumed stage writes only the rest."""

    def __init__(self, folder: Path, blocks: int) -> None:
        self.folder = folder
        self.total = blocks + 1
        folder.mkdir(parents=True, exist_ok=True)

    def shard_name(self, part: int) -> str:
        return f"model-{part + 1:05d}-of-{self.total:05d}.safetensors"

    def has(self, part: int) -> bool:
        return (self.folder / self.shard_name(part)).is_file()

    def write(self, part: int, tensors: dict[str, torch.Tensor]) -> None:
        replace_file(self.folder / self.shard_name(part), lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))

    def finish(self, source: Path) -> None:
        """The index over all shards, and the source's config and tokenizer files."""
        weight_map: dict[str, str] = {}
        total_size = 0
        for part in range(self.total):
            name = self.shard_name(part)
            if not self.has(part):
                raise CompressError(f"checkpoint shard {name} is missing")  # a bug, not a user error
            with safe_open(str(self.folder / name), "pt") as handle:
                for key in handle.keys():
                    weight_map[key] = name
                    piece = handle.get_slice(key)
                    total_size += _numel(piece.get_shape()) * SAFETENSORS_DTYPE_BYTES[piece.get_dtype()]
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
        if source.resolve() == self.folder.resolve():
            return
        for file in sorted(source.iterdir()):
            if file.is_file() and not file.name.endswith(WEIGHT_SUFFIXES) and not file.name.startswith("."):
                shutil.copy2(file, self.folder / file.name)


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
