"""Data-parallel calibration: several processes (torch.distributed; gloo on CPU, NCCL on GPUs) each run the
same block on their own slice of the calibration batches; the statistics a method reads are sums over
tokens (input norms, X^T X, per-expert routed sums, token counts), so summing them over the processes with
one all-reduce gives every process the statistics of all the batches. Every process then compresses the
block from the same sums (deterministic: the same weights everywhere) and runs its own slice through it.

One process (torch.distributed not initialised, or a world of one): every function here is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in the data-parallel run (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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


def _device() -> torch.device:
    """Where the collective's tensors must live: CUDA for NCCL, else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
