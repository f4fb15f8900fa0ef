"""What stages hand to each other: per target, the sparsity mask and, once quantized, the packed
form (codes, statistics, outliers). Later stages keep the zeros of earlier ones. Saved beside the
checkpoint: masks in compress_state.safetensors, packed weights in packed.safetensors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compress.packing import PACKED_FILE, QuantizedWeight, read_packed, write_packed

STATE_FILE = "compress_state.safetensors"
STATE_INDEX = "compress_state.json"


@dataclass
class TargetState:
    mask: torch.Tensor | None = None  # bool [out, in], True where a weight is kept
    stages: list[str] = field(default_factory=list)  # methods that changed this target
    quantized: QuantizedWeight | None = None  # the packed form, when the last stage quantized it


@dataclass
class CompressionState:
    targets: dict[str, TargetState] = field(default_factory=dict)

    def get(self, name: str) -> TargetState:
        return self.targets.setdefault(name, TargetState())

    def mask(self, name: str) -> torch.Tensor | None:
        entry = self.targets.get(name)
        return None if entry is None else entry.mask

    def save(self, directory: Path) -> None:
        tensors = {f"{name}.mask": entry.mask.cpu().contiguous() for name, entry in self.targets.items() if entry.mask is not None}
        save_file(tensors, str(directory / STATE_FILE))
        index = {name: {"stages": entry.stages, "has_mask": entry.mask is not None, "quantized": entry.quantized is not None}
                 for name, entry in self.targets.items()}
        (directory / STATE_INDEX).write_text(json.dumps(index, indent=1))
        quantized = {name: entry.quantized for name, entry in self.targets.items() if entry.quantized is not None}
        if quantized:
            write_packed(directory / PACKED_FILE, quantized)

    @classmethod
    def load(cls, directory: Path) -> "CompressionState":
        tensors = load_file(str(directory / STATE_FILE))
        index = json.loads((directory / STATE_INDEX).read_text())
        packed = read_packed(directory / PACKED_FILE) if (directory / PACKED_FILE).exists() else {}
        return cls({name: TargetState(tensors.get(f"{name}.mask"), info["stages"], packed.get(name)) for name, info in index.items()})
