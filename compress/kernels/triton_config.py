"""What the Triton kernels (triton_kernels.py) are launched with, in plain Python (importable without
Triton): each format's constants and tensors, the tile sizes and the split-K. The default tiles were
chosen by the benchmark's --sweep on an H200 (benchmarks/gpu_kernels.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats import group_quant, nm, sparse_quant
from compress.formats.words import codes_per_word

FMA_MAX_BATCH = 4  # batches up to this take the CUDA-core path, larger ones tl.dot
FMT_GROUP_QUANT, FMT_NM, FMT_SPARSE_QUANT = 0, 1, 2
SUPPORTED = (group_quant.GroupQuantWeight, nm.NMWeight, sparse_quant.SparseQuantWeight)


@dataclass(frozen=True)
class Config:
    """Tile sizes (BLOCK_K counts kept values on the FMA path of N:M formats, columns otherwise), the split
    of the K loop over programs, and Triton's warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_split(batch: int, rows: int, block_m: int, block_n: int, klen: int, block_k: int, device: torch.device) -> int:
    """Programs along K so the grid has ~2 waves over the multiprocessors (each keeping >= 4 K steps)."""
    tiles = -(-rows // block_n) * -(-batch // block_m)
    k_tiles = -(-klen // block_k)
    target = 2 * sm_count(device)
    return max(1, min(-(-target // tiles), k_tiles // 4 or 1))


def default_config(batch: int, rows: int, klen: int, device: torch.device, dense_fma: bool) -> Config:
    """A tile and split for `batch` activation rows, `rows` output rows and a loop over `klen` (columns,
    or kept values on the N:M FMA path)."""
    if batch <= FMA_MAX_BATCH:
        block_m = pow2(batch)
        if dense_fma:
            # batch 1: (128, 64) was the best of the --sweep on the H200 (4096x14336 int4: 212 -> 53 us)
            block_n, block_k = {1: (128, 64), 2: (32, 128), 4: (32, 64)}[block_m]
        else:
            # batch 1: (16, 256) the sweep's best (2:4 bf16: 46 -> 41 us; 2:4 + int4: 313 -> 157 us)
            block_n, block_k = {1: (16, 256), 2: (32, 64), 4: (16, 64)}[block_m]
        warps, stages = 4, 3
    else:
        block_m = 16 if batch <= 16 else 32 if batch <= 32 else 64
        block_n, block_k = 64, 64
        warps, stages = 4, 3
    split = default_split(batch, rows, block_m, block_n, klen, block_k, device)
    return Config(block_m, block_n, block_k, split, warps, stages)


def default_config_for(batch: int, packed, device: torch.device) -> Config:
    """The configuration packed_matmul picks for this weight and batch."""
    rows, cols = packed.shape
    nm_fma = not isinstance(packed, group_quant.GroupQuantWeight) and batch <= FMA_MAX_BATCH
    klen = cols // packed.m * packed.n if isinstance(packed, nm.NMWeight) else cols
    if nm_fma and isinstance(packed, sparse_quant.SparseQuantWeight):
        n, m = sparse_quant.parse_pattern(packed.pattern)
        klen = cols // m * n
    return default_config(batch, rows, klen, device, dense_fma=not nm_fma)


def format_args(packed, cols: int) -> dict:
    """The kernel's constants and pointers for one packed weight."""
    if isinstance(packed, group_quant.GroupQuantWeight):
        bits = packed.bits
        return dict(FMT=FMT_GROUP_QUANT, a=packed.codes, b=packed.codes, scale=packed.scale, zero=packed.zero, BITS=bits,
                    PER=codes_per_word(bits), IBITS=1, IPER=32, NN=1, MM=1, GROUP=packed.group_size,
                    ZERO_INT=packed.zero_kind == "integer", KC=cols, WPR=packed.codes.shape[1], IWPR=1,
                    GROUPS=packed.groups, ZWPR=packed.zero.shape[1] if packed.zero_kind == "integer" else 1)
    if isinstance(packed, nm.NMWeight):
        ib = nm.index_bits(packed.m)
        return dict(FMT=FMT_NM, a=packed.values, b=packed.indices, scale=packed.values, zero=packed.values, BITS=1, PER=32,
                    IBITS=ib, IPER=codes_per_word(ib), NN=packed.n, MM=packed.m, GROUP=1, ZERO_INT=False,
                    KC=cols // packed.m * packed.n, WPR=1, IWPR=packed.indices.shape[1], GROUPS=1, ZWPR=1)
    if isinstance(packed, sparse_quant.SparseQuantWeight):
        pattern = sparse_quant.parse_pattern(packed.pattern)
        if pattern is None:
            raise TypeError("the Triton kernels take sparse_quant with an N:M pattern only")
        n, m = pattern
        ib = nm.index_bits(m)
        bits = packed.bits
        return dict(FMT=FMT_SPARSE_QUANT, a=packed.codes, b=packed.indices, scale=packed.scale, zero=packed.zero, BITS=bits,
                    PER=codes_per_word(bits), IBITS=ib, IPER=codes_per_word(ib), NN=n, MM=m, GROUP=packed.group_size,
                    ZERO_INT=packed.zero_kind == "integer", KC=cols // m * n, WPR=packed.codes.shape[1],
                    IWPR=packed.indices.shape[1], GROUPS=packed.groups,
                    ZWPR=packed.zero.shape[1] if packed.zero_kind == "integer" else 1)
    raise TypeError(f"no Triton kernel for {type(packed).__name__}")


def supports(packed) -> bool:
    """Whether a Triton kernel takes this packed weight."""
    if isinstance(packed, sparse_quant.SparseQuantWeight):
        return sparse_quant.parse_pattern(packed.pattern) is not None
    return isinstance(packed, SUPPORTED)
