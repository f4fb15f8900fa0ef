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


def entry_point(name: str, threads: int, params: list[str], call: str) -> str:
    """The extern "C" kernel `name` (at most `threads` threads a block) taking `params` ("type name" each) and passing
    them in order to `call` (a device function or template instance)."""
    names = [param.split()[-1].lstrip("*") for param in params]
    return (f'extern "C" __global__ void __launch_bounds__({threads}) {name}({", ".join(params)}) {{\n'
            f'  {call}({", ".join(names)});\n}}\n')


def device_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def on_device(device: torch.device):
    """A context that makes `device` current for a launch (nothing to do when it already is)."""
    index = device_index(device)
    return contextlib.nullcontext() if index == torch.cuda.current_device() else torch.cuda.device(index)
