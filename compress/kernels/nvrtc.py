"""NVRTC kernels (torch.cuda._compile_kernel) on the device their tensors live on: a compiled module belongs to the
context of the device that was current when it was loaded, so a kernel is compiled once per device and launched with
that device current."""

from __future__ import annotations

import contextlib

import torch


def compile_kernel(source: str, name: str, device_index: int):
    """`name` from `source`, compiled for and loaded on CUDA device `device_index` (callers cache the result by name and
    device)."""
    with torch.cuda.device(device_index):
        return torch.cuda._compile_kernel(source, name)


def device_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def on_device(device: torch.device):
    """A context that makes `device` current for a launch (nothing to do when it already is)."""
    index = device_index(device)
    return contextlib.nullcontext() if index == torch.cuda.current_device() else torch.cuda.device(index)
