"""QMoE's decode-matvec on a GPU: the kernels over dictionary-coded ternary experts (compress/kernels/cuda_ternary.py
at batch 1, triton_ternary.py) against dense bf16 F.linear on MoE expert shapes.

    python benchmarks/qmoe_kernels.py [--batches 1,4,16] [--json out.jsonl]
    python benchmarks/qmoe_kernels.py --sweep [--sweep-batches 1,16] [--json sweep.jsonl]

Each expert weight is random (normal), rounded to its row's ternary grid {min, 0, max} (the QMoE
baseline rounding: about 90% zeros) and coded with its own adaptive dictionary, as the export stores
it. Timing as benchmarks/gpu_kernels.py: a CUDA graph calling the op on each of R copies of the weights
(R copies > 3x the L2, so every call reads its weights from HBM), median replay / R. GB/s counts the
stored bytes (codes, row offsets, min/max; the dictionary's table stays in L2) plus x and y.
Correctness first: the Triton kernel's output against F.linear on the decoded weight (relative error), the CUDA
kernel's against the Triton one. At batch 1 a record holds the CUDA kernel's variants, the Triton time, and as
`us` the time of the kernel the dispatcher picks (`kernel`).
`--sweep` times every tile of TILE_GRID (block_rows, chunk, num_warps; compiled up front in parallel) per
shape and sweep batch beside the default tiles (triton_ternary.tiles), to set that rule from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import copies_for, time_op

from compress.formats import ternary_dict
from compress.kernels import cuda_ternary, triton_ternary

SHAPES = {  # out x in of one expert's projection
    "mixtral-8x7b w1/w3": (14336, 4096), "mixtral-8x7b w2": (4096, 14336),
    "qwen2-moe-a2.7b gate/up": (1408, 2048), "qwen2-moe-a2.7b down": (2048, 1408),
    "qwen3-moe-30b-a3b gate/up": (768, 2048), "qwen3-moe-30b-a3b down": (2048, 768),
}


# (block_rows, chunk, num_warps): 128 to 2048 codes a program, 8 warps for the large ones; batch > 1 (the
# [rows, chunk * S, batch] x tile) up to 512 codes; and the first version's fixed tile (4, 16, 4)
TILE_GRID = [(r, c, w) for c in (32, 64, 128, 256) for r in (1, 2, 4, 8, 16) if 128 <= r * c <= 2048
             for w in ((4, 8) if r * c >= 1024 else (4,))] + [(4, 16, 4), (8, 16, 4), (2, 64, 2), (4, 32, 2)]


def precompile(tiles: list, x: torch.Tensor, packed) -> None:
    """Compile the kernel for every tile in a thread pool (Triton's AsyncCompileMode); failures show in the timing."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    kernel = triton_ternary._ternary_dict_kernel
    original = kernel.run
    kernel.run = lambda *a, grid=None, warmup=False, **kw: original(*a, grid=grid, warmup=True, **kw)
    try:
        with AsyncCompileMode(ThreadPoolExecutor(max_workers=os.cpu_count() or 8), ignore_errors=True):
            for tile in tiles:
                triton_ternary.ternary_dict_matmul(x, packed, None, *tile)
    except Exception as error:
        print(f"  parallel compile stopped: {type(error).__name__}: {str(error)[:200]}", flush=True)
    finally:
        kernel.run = original


def sweep(name: str, packed_copies: list, cols: int, batch: int, dense_us: float) -> dict:
    """Every tile of TILE_GRID (batch > 1: up to 512 codes a program) and the default, timed at this batch."""
    grid = [t for t in TILE_GRID if batch == 1 or t[0] * t[1] <= 512]
    xb = torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16)
    precompile(grid, xb, packed_copies[0])
    timed = []
    for tile in grid:
        try:
            us = time_op(lambda x, p, t=tile: triton_ternary.ternary_dict_matmul(x, p, None, *t), [(xb, p) for p in packed_copies], reps=7)
            timed.append((round(us, 2), list(tile)))
        except Exception as error:
            print(f"  {tile}: {type(error).__name__}: {str(error)[:200]}", flush=True)
    timed.sort()
    auto = triton_ternary.tiles(packed_copies[0].shape[0], packed_copies[0].codes.numel(), batch, xb.device)
    auto_us = time_op(triton_ternary.ternary_dict_matmul, [(xb, p) for p in packed_copies], reps=7)
    return {"shape": name, "batch": batch, "sweep": True, "dense_us": round(dense_us, 2), "best_us": timed[0][0], "best_tile": timed[0][1],
            "best_ratio_vs_dense": round(dense_us / timed[0][0], 3), "default_tile": list(auto), "default_us": round(auto_us, 2),
            "codes_per_row": round(packed_copies[0].codes.numel() / packed_copies[0].shape[0], 1), "all": timed}


def cuda_variants(x: torch.Tensor, packed_copies: list) -> tuple[dict, str]:
    """The CUDA kernel (compress/kernels/cuda_ternary.py) at batch 1: its default and other block sizes and codes a
    lane, each checked against the Triton kernel first, and which kernel the dispatcher picks. ({}, "triton")
    where it does not take the weight."""
    first = packed_copies[0]
    if not cuda_ternary.supported(x, first):
        return {}, "triton"
    want = triton_ternary.ternary_dict_matmul(x, first).float()
    timed = {}
    for label, warps, per_lane in [("cuda default", None, 2)] + [(f"cuda {w} warps {c} a lane", w, c) for w in (8, 16) for c in (1, 2, 4)]:
        got = cuda_ternary.ternary_matmul(x, first, warps, per_lane).float()
        error = float((got - want).norm() / want.norm().clamp_min(1e-30))
        if error > 1e-2:
            print(f"  {label}: relative error {error:.2e} against the Triton kernel", flush=True)
            continue
        timed[label] = round(time_op(lambda a, p, w=warps, c=per_lane: cuda_ternary.ternary_matmul(a, p, w, c), [(x, p) for p in packed_copies]), 2)
    return timed, "cuda" if cuda_ternary.preferred(x, first) else "triton"


def ternary_expert(rows: int, cols: int, seed: int) -> ternary_dict.TernaryDictWeight:
    """A normal random weight rounded to its rows' ternary grids (max above max / 2, min below min / 2, as
    QMoE's baseline; compress.methods is not imported, the GPU machine lacks its dependencies)."""
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    low, high = weight.min(1, keepdim=True).values.half(), weight.max(1, keepdim=True).values.half()
    symbols = torch.where(weight > high.float() / 2, 2, torch.where(weight < low.float() / 2, 1, 0))
    return ternary_dict.from_ternary(symbols, torch.cat([low, high], dim=1), "adaptive")


def on_device(packed: ternary_dict.TernaryDictWeight, device: str) -> ternary_dict.TernaryDictWeight:
    return ternary_dict.TernaryDictWeight(packed.shape, packed.codes.to(device), packed.row_offsets.to(device), packed.minmax.to(device),
                                          packed.symbol_counts, packed.dictionary, packed.codewords, packed.max_pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--json", help="write one JSON record per (shape, batch) to this file")
    parser.add_argument("--sweep", action="store_true", help="time TILE_GRID per shape and sweep batch")
    parser.add_argument("--sweep-batches", default="1,16")
    args = parser.parse_args()
    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": __import__("triton").__version__,
           "python": platform.python_version(), "command": " ".join(sys.argv)}
    print(json.dumps(env), flush=True)
    records = []
    out = open(args.json, "w") if args.json else None  # noqa: SIM115 - written record by record, so a cut-off run keeps its part
    if out:
        out.write(json.dumps(env) + "\n")
    for name in args.shapes.split(","):
        rows, cols = SHAPES[name]
        packed = ternary_expert(rows, cols, seed=rows + cols)
        stored = ternary_dict.nbytes(packed) - packed.symbol_counts.numel() * 8
        gpu = on_device(packed, "cuda")
        dense = ternary_dict.unpack(packed).to("cuda", torch.bfloat16)
        x = torch.randn(1, cols, device="cuda", dtype=torch.bfloat16)
        got = triton_ternary.ternary_dict_matmul(x, gpu).float()
        want = F.linear(x.float(), dense.float())
        error = float((got - want).norm() / want.norm())
        copies = copies_for(min(stored, rows * cols * 2))
        dense_copies = [dense.clone() for _ in range(copies_for(rows * cols * 2))]
        packed_copies = [on_device(ternary_dict.TernaryDictWeight(packed.shape, packed.codes.clone(), packed.row_offsets, packed.minmax,
                                                                  packed.symbol_counts, packed.dictionary), "cuda") for _ in range(copies)]
        zeros = 1 - float((ternary_dict.symbols_of(packed) != 0).float().mean())
        for batch in (int(b) for b in (args.sweep_batches if args.sweep else args.batches).split(",")):
            xb = torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16)
            dense_us = time_op(F.linear, [(xb, w) for w in dense_copies])
            if args.sweep:
                records.append({**sweep(name, packed_copies, cols, batch, dense_us), "rel_error_batch1": error})
                print(json.dumps({k: v for k, v in records[-1].items() if k != "all"}), flush=True)
                if out:
                    out.write(json.dumps(records[-1]) + "\n") and out.flush()
                continue
            triton_us = time_op(triton_ternary.ternary_dict_matmul, [(xb, p) for p in packed_copies])
            variants, kernel = cuda_variants(xb, packed_copies) if batch == 1 else ({}, "triton")
            ours_us = variants["cuda default"] if kernel == "cuda" else triton_us  # what the dispatcher runs
            io = 2 * batch * (rows + cols)
            record = {"shape": name, "out_x_in": f"{rows}x{cols}", "batch": batch, "zero_share": round(zeros, 4),
                      "bits_per_param": round(8 * stored / (rows * cols), 4), "rel_error": error, "kernel": kernel,
                      "dense_us": round(dense_us, 2), "us": round(ours_us, 2), "ratio_vs_dense": round(dense_us / ours_us, 3),
                      "gbps": round((stored + io) / ours_us / 1e3, 1), "dense_gbps": round((rows * cols * 2 + io) / dense_us / 1e3, 1),
                      "triton_us": round(triton_us, 2), "triton_ratio_vs_dense": round(dense_us / triton_us, 3), "cuda_variants": variants}
            records.append(record)
            print(json.dumps(record), flush=True)
            if out:
                out.write(json.dumps(record) + "\n") and out.flush()
    if out:
        out.close()


if __name__ == "__main__":
    main()
