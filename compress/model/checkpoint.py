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


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header


def read_header(file: Path) -> dict[str, dict]:
    """The tensors a safetensors file declares ({name: {"dtype", "shape", "data_offsets"}}), from its
    header alone (8-byte little-endian length, then JSON); the data is never read. CompressError naming
    the file when it is truncated or corrupt: the checks safetensors makes when it opens a file
    (offsets in order, each tensor's size matching its dtype and shape, the data exactly covered)."""
    def corrupt(why: str) -> CompressError:
        return CompressError(f"model file {file} is truncated or corrupt: {why}")

    size = file.stat().st_size
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or length > size - 8:
            raise corrupt(f"{size} bytes, too short for the header it declares")
        if not 0 < length <= MAX_HEADER_BYTES:
            raise corrupt(f"header length {length}")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise corrupt("its header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, info in sorted(header.items(), key=lambda item: _offsets(item[1])):
        start, stop = _offsets(info)
        shape = info.get("shape") if isinstance(info, dict) else None
        width = SAFETENSORS_DTYPE_BYTES.get(info.get("dtype")) if isinstance(info, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape) or start != end:
            raise corrupt(f"tensor {name}: bad entry {info}")
        if width is not None and stop - start != _numel(shape) * width:
            raise corrupt(f"tensor {name}: {stop - start} bytes for shape {shape} of {info['dtype']}")
        end = stop
    if end != size - 8 - length:
        raise corrupt(f"its header declares {end} bytes of tensor data, the file holds {size - 8 - length}")
    return header


def _offsets(info: object) -> tuple[int, int]:
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets) and 0 <= offsets[0] <= offsets[1]:
        return offsets[0], offsets[1]
    return -1, -1


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
                self.where.update({key: file.name for key in read_header(file)})

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
