"""Data-parallel calibration: several processes (torch.distributed; gloo on CPU, NCCL on GPUs) each run the
same block on their own slice of the calibration batches; the statistics a method reads are sums over
tokens (input norms, X^T X, per-expert routed sums, token counts), so summing them over the processes with
one all-reduce gives every process the statistics of all the batches. The processes then compress the
block's targets from the same sums, each its share, and send each other the results (target_split.py):
the same weights everywhere; then each runs its own slice through the block.

Process 0 leads: it alone writes (stored steps, a stage's block checkpoints, the output) and decides
(whether a step is already stored, where a resumed stage starts); the others follow its word. Batch i
belongs to process i % world (`share`), so a stage's checkpointed hidden states, gathered on process 0 by
batch number, are the single-process file and scatter back the same way on resume.

One process (torch.distributed not initialised, or a world of one): every function here is a no-op.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_MAX_DIMS = 8  # a shape sent ahead of a tensor: [ndim, d0, ..., d7]


def world_size() -> int:
    """Processes in the data-parallel run (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's place in the data-parallel run (0: the leader, and the only one in a plain run)."""
    return dist.get_rank() if world_size() > 1 else 0


def is_follower() -> bool:
    """Whether this process computes alongside process 0 but writes nothing of its own."""
    return rank() > 0


def share(items: list[T]) -> list[T]:
    """This process's slice of a list all processes hold alike (calibration batches): items[rank::world]."""
    return items[rank()::world_size()]


def sum_over_processes(tensors: list[torch.Tensor]) -> None:
    """Each tensor replaced in place by its sum over the processes (in the same order on every process)."""
    if world_size() == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor)


def total_over_processes(count: int) -> int:
    """An integer count summed over the processes."""
    if world_size() == 1:
        return count
    total = torch.tensor([count], dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    return int(total.item())


def from_leader(value: int) -> int:
    """Process 0's integer, on every process (the others' `value` is ignored): one decision for all."""
    if world_size() == 1:
        return value
    carried = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.broadcast(carried, 0)
    return int(carried.item())


def barrier() -> None:
    """Wait until every process is here (process 0 has finished what the others will read)."""
    if world_size() > 1:
        dist.barrier()


def gather_batches(tensors: list[torch.Tensor]) -> dict[int, torch.Tensor] | None:
    """Every process's per-batch tensors (its `share`), on process 0 by batch number, on the host;
    None on the other processes, which send theirs."""
    if world_size() == 1:
        return {i: t.detach().cpu().contiguous() for i, t in enumerate(tensors)}
    device, world, me = _device(), world_size(), rank()
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(tensors)], dtype=torch.int64, device=device))
    if me > 0:
        for tensor in tensors:
            _send(tensor, 0)
        return None
    gathered = {j * world: t.detach().cpu().contiguous() for j, t in enumerate(tensors)}
    dtype = tensors[0].dtype if tensors else torch.float32
    for source in range(1, world):
        for j in range(int(counts[source].item())):
            gathered[j * world + source] = _receive(source, dtype).cpu().contiguous()
    return dict(sorted(gathered.items()))


def scatter_batches(saved: dict[int, torch.Tensor] | None) -> list[torch.Tensor]:
    """The inverse of `gather_batches`: process 0 holds every batch's tensor by batch number; each
    process gets its `share`, in order (the others' `saved` is ignored)."""
    if world_size() == 1:
        assert saved is not None
        return [saved[i] for i in sorted(saved)]
    device, world, me = _device(), world_size(), rank()
    total = from_leader(len(saved) if me == 0 and saved is not None else 0)
    if me > 0:
        dtype = _dtype_from_leader(torch.float32)
        return [_receive(0, dtype).cpu() for _ in range(me, total, world)]
    assert saved is not None
    _dtype_from_leader(saved[0].dtype if saved else torch.float32)
    for index in range(total):
        if index % world:
            _send(saved[index].to(device), index % world)
    return [saved[index] for index in range(0, total, world)]


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _dtype_from_leader(dtype: torch.dtype) -> torch.dtype:
    """Process 0's dtype of the tensors it is about to send (the others' `dtype` is ignored)."""
    return _DTYPES[from_leader(_DTYPES.index(dtype) if dtype in _DTYPES else 0)]


def _send(tensor: torch.Tensor, to: int) -> None:
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"a tensor of {tensor.dim()} dimensions cannot be sent (at most {_MAX_DIMS})")
    shape = [tensor.dim(), *tensor.shape] + [0] * (_MAX_DIMS - tensor.dim())
    dist.send(torch.tensor(shape, dtype=torch.int64, device=_device()), to)
    dist.send(tensor.detach().to(_device()).contiguous(), to)


def _receive(source: int, dtype: torch.dtype) -> torch.Tensor:
    shape = torch.zeros(_MAX_DIMS + 1, dtype=torch.int64, device=_device())
    dist.recv(shape, source)
    dims = [int(d) for d in shape[1:1 + int(shape[0])]]
    tensor = torch.empty(dims, dtype=dtype, device=_device())
    dist.recv(tensor, source)
    return tensor


def _device() -> torch.device:
    """Where the collective's tensors must live: CUDA for NCCL, else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
