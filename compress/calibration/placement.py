"""Where a block's weights live while the engine works on it.

The model stays where it was loaded ("home": host memory, or the device itself); the block being
compressed is copied onto the compute device and, when done, copied back into the very host tensors
it came from. `module.to("cpu")` would allocate fresh host memory for every block instead, and a copy
into freshly allocated pageable memory runs about ten times slower than into memory already touched
(measured on an H200 host: 1.1 against 13 GB/s). While block i runs, block i+1 is already being
copied up by a side thread on its own CUDA stream, so the upload overlaps the GPU work.

`mode` says which of these ran: "resident" (the blocks already live on the device: nothing moves),
"block by block" (blocks cross to the device one at a time), or "in place" (no calibration data: blocks are
compressed where they lie).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

_Uploaded = tuple[dict[str, torch.Tensor], "torch.cuda.Event | None"]


def _tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """The data of the block's parameters and buffers by name, each once (a tied one under its first
    name): plain tensors, not the Parameter objects, whose data the swap replaces."""
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
        if id(tensor) not in seen and not tensor.is_meta:
            seen.add(id(tensor))
            found[name] = tensor.data
    return found


def _same_device(a: torch.device, b: torch.device) -> bool:
    """"cuda" and "cuda:0" are one device when 0 is the current one (torch.device compares them unequal)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.index == b.index or None in (a.index, b.index)
    return (a.index if a.index is not None else torch.cuda.current_device()) == (b.index if b.index is not None else torch.cuda.current_device())


class BlockPlacement:
    """Moves blocks between their home and the compute device (see the module docstring)."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, moves: bool) -> None:
        self.blocks = blocks
        self.device = device
        first = next((t for b in blocks for t in _tensors(b).values()), None)
        home = first.device if first is not None else device
        self.moves = moves and not _same_device(home, device)
        self.mode = "block by block" if self.moves else ("resident" if moves else "in place")
        self._host: dict[int, dict[str, torch.Tensor]] = {}
        self._pending: dict[int, Future[_Uploaded]] = {}
        overlap = self.moves and device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-upload") if overlap else None
        self._stream = torch.cuda.Stream(device) if overlap else None

    def _upload(self, index: int) -> _Uploaded:
        tensors = _tensors(self.blocks[index])
        if self._stream is None:
            return {name: t.to(self.device) for name, t in tensors.items()}, None
        with torch.cuda.stream(self._stream):
            uploaded = {name: t.to(self.device, non_blocking=t.is_pinned()) for name, t in tensors.items()}
            done = torch.cuda.Event()
            done.record(self._stream)
        return uploaded, done

    def prefetch(self, index: int) -> None:
        """Start copying block `index` to the device (a no-op unless blocks stream to a GPU)."""
        if self._pool is not None and 0 <= index < len(self.blocks) and index not in self._pending and index not in self._host:
            self._pending[index] = self._pool.submit(self._upload, index)

    def fetch(self, index: int) -> nn.Module:
        """Block `index` with its tensors on the device."""
        block = self.blocks[index]
        if not self.moves or index in self._host:
            return block
        pending = self._pending.pop(index, None)
        uploaded, done = pending.result() if pending is not None else self._upload(index)
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for tensor in uploaded.values():
                tensor.record_stream(current)  # allocated on the side stream, used and freed on this one
        self._host[index] = _tensors(block)
        self._swap(block, uploaded)
        return block

    def release(self, index: int) -> None:
        """Copy block `index` back into its home tensors and point the block at them again."""
        host = self._host.pop(index, None)
        if host is None:
            return
        block = self.blocks[index]
        for name, tensor in _tensors(block).items():
            host[name].copy_(tensor)
        self._swap(block, host)

    def close(self) -> None:
        for index in list(self._pending):
            self._pending.pop(index).result()  # let uploads finish; their copies are dropped
        if self._pool is not None:
            self._pool.shutdown()

    @staticmethod
    def _swap(block: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = block.get_submodule(owner_name) if owner_name else block
            if leaf in owner._parameters:
                owner._parameters[leaf].data = tensor
            else:
                owner._buffers[leaf] = tensor
