"""Where a block's weights live while the engine works on it.

The model stays where it was loaded ("home": host memory, or the device itself); the block being
compressed is copied onto the compute device and, when done, copied back into the very host tensors
it came from. `module.to("cpu")` would allocate fresh host memory for every block instead, and a copy
into freshly allocated pageable memory runs about ten times slower than into memory already touched
(measured on an H200 host: 1.1 against 13 GB/s). While block i runs, block i+1 is already being
copied up by a side thread on its own CUDA stream, so the upload overlaps the GPU work; and with
`write_behind`, block i-1 is copied back by another thread on another stream (the GPU's other copy
engine) while block i runs: the block keeps pointing at its device tensors, which hold the same values,
until that copy is done, and is pointed back at its host tensors then (at the next release, or at close).

`mode` says which of these ran: "resident" (the blocks already live on the device: nothing moves),
"block by block" (blocks cross to the device one at a time), or "in place" (no calibration data: blocks are
compressed where they lie).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

_Uploaded = tuple[dict[str, torch.Tensor], "torch.cuda.Event | None"]


def module_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """The data of the block's parameters and buffers by name, each once (a tied one under its first
    name): plain tensors, not the Parameter objects, whose data the swap replaces."""
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
        if id(tensor) not in seen and not tensor.is_meta:
            seen.add(id(tensor))
            found[name] = tensor.data
    return found


def point_at(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Point the module's parameters (their data) and buffers, by name, at `tensors`."""
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            owner._parameters[leaf].data = tensor
        else:
            owner._buffers[leaf] = tensor


def _same_device(a: torch.device, b: torch.device) -> bool:
    """"cuda" and "cuda:0" are one device when 0 is the current one (torch.device compares them unequal)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.index == b.index or None in (a.index, b.index)
    return (a.index if a.index is not None else torch.cuda.current_device()) == (b.index if b.index is not None else torch.cuda.current_device())


class BlockPlacement:
    """Moves blocks between their home and the compute device (see the module docstring)."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, moves: bool, write_behind: bool = False) -> None:
        """`write_behind`: copy released blocks back in the background (module docstring); only for blocks
        nobody reads from their host tensors before `close` (a streamed stage writes each to disk at once)."""
        self.blocks = blocks
        self.device = device
        self.moves = moves
        self.moved = False  # some block was copied up (decided block by block: a streamed block is read when its turn comes)
        self._host: dict[int, dict[str, torch.Tensor]] = {}
        self._pending: dict[int, Future[_Uploaded]] = {}
        self._writing: dict[int, tuple[Future[None], dict[str, torch.Tensor]]] = {}  # block -> its copy home, its home tensors
        overlap = moves and device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-upload") if overlap else None
        self._stream = torch.cuda.Stream(device) if overlap else None
        behind = overlap and write_behind
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-write-back") if behind else None
        self._write_stream = torch.cuda.Stream(device) if behind else None

    @property
    def mode(self) -> str:
        """Where the blocks were worked on so far (the module docstring)."""
        return "in place" if not self.moves else ("block by block" if self.moved else "resident")

    def _elsewhere(self, index: int) -> bool:
        """Whether block `index` has tensors off the device (a block not read yet, still on meta, has none)."""
        return any(not _same_device(t.device, self.device) for t in module_tensors(self.blocks[index]).values())

    def _upload(self, index: int) -> _Uploaded:
        tensors = module_tensors(self.blocks[index])
        if self._stream is None:
            return {name: t.to(self.device) for name, t in tensors.items()}, None
        with torch.cuda.stream(self._stream):
            uploaded = {name: t.to(self.device, non_blocking=t.is_pinned()) for name, t in tensors.items()}
            done = torch.cuda.Event()
            done.record(self._stream)
        return uploaded, done

    def prefetch(self, index: int) -> None:
        """Start copying block `index` to the device (a no-op unless blocks stream to a GPU)."""
        if (self._pool is not None and 0 <= index < len(self.blocks) and index not in self._pending and index not in self._host
                and self._elsewhere(index)):
            self._pending[index] = self._pool.submit(self._upload, index)

    def fetch(self, index: int) -> nn.Module:
        """Block `index` with its tensors on the device."""
        block = self.blocks[index]
        pending = self._pending.pop(index, None)
        if not self.moves or index in self._host or (pending is None and not self._elsewhere(index)):
            return block
        self.moved = True
        uploaded, done = pending.result() if pending is not None else self._upload(index)
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for tensor in uploaded.values():
                tensor.record_stream(current)  # allocated on the side stream, used and freed on this one
        self._host[index] = module_tensors(block)
        point_at(block, uploaded)
        return block

    def release(self, index: int) -> None:
        """Copy block `index` back into its home tensors and point the block at them again (with
        `write_behind`: start that copy; the block is pointed home when it is done)."""
        self._finish_writes()  # the previous block's copy ran while this block was worked on
        host = self._host.pop(index, None)
        if host is None:
            return
        block = self.blocks[index]
        if self._writer is None:
            for name, tensor in module_tensors(block).items():
                host[name].copy_(tensor)
            point_at(block, host)
            return
        computed = torch.cuda.Event()
        computed.record(torch.cuda.current_stream(self.device))  # the block's last use on this stream
        self._writing[index] = self._writer.submit(self._write_back, module_tensors(block), host, computed), host

    def _write_back(self, tensors: dict[str, torch.Tensor], host: dict[str, torch.Tensor], computed: torch.cuda.Event) -> None:
        assert self._write_stream is not None
        with torch.cuda.stream(self._write_stream):
            self._write_stream.wait_event(computed)
            for name, tensor in tensors.items():
                host[name].copy_(tensor, non_blocking=host[name].is_pinned())
        # done before the device tensors may go: they are only dropped after this returns
        self._write_stream.synchronize()

    def _finish_writes(self) -> None:
        for index in list(self._writing):
            written, host = self._writing.pop(index)
            written.result()
            point_at(self.blocks[index], host)

    def close(self) -> None:
        for index in list(self._pending):
            self._pending.pop(index).result()  # let uploads finish; their copies are dropped
        self._finish_writes()
        for pool in (self._pool, self._writer):
            if pool is not None:
                pool.shutdown()
