"""What stages hand to each other: per target, the sparsity mask and, once quantized, the packed
form (codes, statistics, outliers). Later stages keep the zeros of earlier ones. Saved beside the
checkpoint: masks in compress_state.safetensors, packed weights in packed.safetensors.

Masks are held and stored 1 bit a weight (a 7B model's masks are 0.8 GB so, 6.5 GB as bools), and
unpacked when a stage or a check reads one. A stage leaves the packed forms it did not compute in
their files (`PackedOnDisk`) and its save copies their bytes: a streamed 7B stage never holds the
model's codes (6.5 GB at one byte a weight) in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compress.formats.bits import pack_bits, unpack_bits
from compress.formats.packed_file import FORMAT_VERSION, PACKED_FILE, merge_packed, packed_format, read_packed, write_packed
from compress.formats.quantized import QuantizedWeight

STATE_FILE = "compress_state.safetensors"
STATE_INDEX = "compress_state.json"


@dataclass(frozen=True)
class PackedOnDisk:
    """A target's packed form left in a packed file, not read: saving a state copies its bytes over
    (a streamed stage's blocks each leave one; read whole, a 7B model's codes are 6.5 GB)."""

    path: Path
    name: str

    def load(self) -> QuantizedWeight:
        return read_packed(self.path, [self.name])[self.name]


@dataclass
class TargetState:
    packed_mask: torch.Tensor | None = None  # uint8, the mask 1 bit a weight (see `mask`)
    shape: tuple[int, int] | None = None  # the mask's [out, in]
    stages: list[str] = field(default_factory=list)  # methods that changed this target
    quantized: QuantizedWeight | PackedOnDisk | None = None  # the packed form, when the last stage quantized it

    @property
    def mask(self) -> torch.Tensor | None:
        """bool [out, in], True where a weight is kept; None when no stage pruned the target."""
        return self.mask_on(torch.device("cpu"))

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        # packed where the mask lies, then moved: on a GPU that moves 1 bit a weight, not a byte, and
        # the packing is not left to the host (a 7B block's masks are 200 MB as bools)
        self.packed_mask = None if value is None else pack_bits(value, 1).cpu()
        self.shape = None if value is None else tuple(value.shape)

    def mask_on(self, device: torch.device) -> torch.Tensor | None:
        """The mask unpacked on `device` (only its packed bits cross to it)."""
        if self.packed_mask is None:
            return None
        rows, cols = self.shape
        return unpack_bits(self.packed_mask.to(device), 1, rows * cols, torch.bool).view(rows, cols)


@dataclass
class CompressionState:
    targets: dict[str, TargetState] = field(default_factory=dict)

    def get(self, name: str) -> TargetState:
        return self.targets.setdefault(name, TargetState())

    def mask(self, name: str, device: torch.device | None = None) -> torch.Tensor | None:
        """The target's mask (on the CPU, or unpacked on `device`), None if no stage pruned it."""
        entry = self.targets.get(name)
        return None if entry is None else entry.mask_on(device or torch.device("cpu"))

    def subset(self, names: list[str]) -> CompressionState:
        return CompressionState({name: self.targets[name] for name in names if name in self.targets})

    def update(self, other: CompressionState) -> None:
        self.targets.update(other.targets)

    def save(self, directory: Path) -> None:
        tensors = {f"{name}.mask": entry.packed_mask.contiguous() for name, entry in self.targets.items() if entry.packed_mask is not None}
        save_file(tensors, str(directory / STATE_FILE))
        index = {name: {"stages": entry.stages, "mask_shape": entry.shape, "quantized": entry.quantized is not None}
                 for name, entry in self.targets.items()}
        (directory / STATE_INDEX).write_text(json.dumps(index, indent=1))
        in_memory = {name: entry.quantized for name, entry in self.targets.items() if isinstance(entry.quantized, QuantizedWeight)}
        on_disk: dict[Path, list[str]] = {}
        current: dict[Path, bool] = {}  # per packed file: of the format that merges
        for name, entry in self.targets.items():
            if isinstance(entry.quantized, PackedOnDisk):
                source = entry.quantized.path
                if current.setdefault(source, packed_format(source) == FORMAT_VERSION):
                    on_disk.setdefault(entry.quantized.path, []).append(entry.quantized.name)
                else:  # an older format is read and written anew
                    in_memory[name] = entry.quantized.load()
        if not on_disk:
            if in_memory:
                write_packed(directory / PACKED_FILE, in_memory)
            return
        parts = list(on_disk.items())
        held = directory / f".{PACKED_FILE}.in-memory"
        if in_memory:
            write_packed(held, in_memory)
            parts.insert(0, (held, list(in_memory)))
        try:
            merge_packed(parts, directory / PACKED_FILE)
        finally:
            held.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: Path, read_packed_forms: bool = True) -> CompressionState:
        """The state saved in `directory`; with `read_packed_forms` False the packed forms stay in
        its packed file (`PackedOnDisk`) until a save copies them."""
        tensors = load_file(str(directory / STATE_FILE))
        index = json.loads((directory / STATE_INDEX).read_text())
        packed: dict[str, QuantizedWeight | PackedOnDisk] = {}
        if (directory / PACKED_FILE).exists():
            if read_packed_forms:
                packed.update(read_packed(directory / PACKED_FILE))
            else:
                packed.update({name: PackedOnDisk(directory / PACKED_FILE, name) for name, info in index.items() if info["quantized"]})
        return cls({
            name: TargetState(tensors.get(f"{name}.mask"), tuple(info["mask_shape"]) if info["mask_shape"] else None,
                              info["stages"], packed.get(name))
            for name, info in index.items()
        })
