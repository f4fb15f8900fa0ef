"""The CUDA group-quant GEMV (compress/kernels/cuda_gemv.py) against the Triton split-K GEMV the modules run and dense
bf16 F.linear, batch 1, on the issue's shapes; every (rows a warp, team) pair for int4, a few for int2 / int8.

    python benchmarks/cuda_gemv_probe.py [--shapes 14336x4096,...] [--json out.jsonl]
    python benchmarks/cuda_gemv_probe.py --read-only [--json out.jsonl]   # the kernel's loads alone, no decode

Timing as benchmarks/gpu_kernels.py (a CUDA graph over R copies of the weight, R copies > 3x the L2, median replay
/ R). Every CUDA result is checked against the format's reference first (relative error < 4e-3 with bf16 x).
`--read-only` compiles the kernel with GQ_READ_ONLY: the same loads and launch, no decode, so its time is what the
access pattern alone reaches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import copies_for, print_and_keep, save_jsonl, time_op, weight_copies

from compress.formats import group_quant
from compress.kernels import cuda_gemv
from compress.kernels import triton_kernels as tk

SHAPES = "14336x4096,4096x14336,4096x4096,8192x8192,11008x4096"


def grid(bits: int) -> list[tuple[int, int]]:
    if bits == 4:
        return [(r, g) for r in cuda_gemv.ROWS for g in cuda_gemv.TEAMS]
    return [(2, 1), (4, 1), (2, 4), (4, 4)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES, help="out x in, comma-separated")
    parser.add_argument("--bits", default="4,2,8")
    parser.add_argument("--read-only", action="store_true", help="time the kernel's loads alone (no decode)")
    parser.add_argument("--json", help="write one JSON record per (shape, bits) to this file")
    args = parser.parse_args(argv)
    if args.read_only:
        compile_full = cuda_gemv._kernel
        cuda_gemv._kernel = lambda name, device: compile_full(name, device, "#define GQ_READ_ONLY\n")
    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "command": " ".join(sys.argv)}
    records = []
    for shape in args.shapes.split(","):
        rows, cols = map(int, shape.split("x"))
        dense_w = [torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(rows * cols * 2))]
        xs = [torch.randn(1, cols, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        dense_us = time_op(F.linear, [(xs[i % 4], w) for i, w in enumerate(dense_w)], reps=15)
        del dense_w
        for bits in map(int, args.bits.split(",")):
            copies, nbytes = weight_copies(f"int{bits}_g128", rows, cols, checked=False)
            packed = copies[0]
            calls = [(xs[i % 4], p) for i, p in enumerate(copies)]
            ref = group_quant.reference_matmul(xs[0].float(), packed).double()
            record = {"shape": [rows, cols], "bits": bits, "batch": 1, "read_only": args.read_only, "dense_us": round(dense_us, 2),
                      "triton_us": round(time_op(tk.packed_matmul, calls, reps=15), 2), "plan": list(cuda_gemv.plan(packed))}
            for r, g in grid(bits):
                if not args.read_only:
                    got = cuda_gemv.group_quant_matmul(xs[0], packed, r, g).double()
                    err = ((got - ref).norm() / ref.norm()).item()
                    if err >= 4e-3:
                        raise SystemExit(f"{shape} int{bits} rows {r} team {g}: relative error {err:.1e}")
                record[f"r{r}g{g}"] = round(time_op(lambda x, p, r=r, g=g: cuda_gemv.group_quant_matmul(x, p, r, g), calls, reps=15), 2)
            best_us, best = min((v, k) for k, v in record.items() if k[0] == "r" and k[1].isdigit())
            record.update(best=best, best_us=best_us, ratio_best_vs_dense=round(dense_us / best_us, 3),
                          ratio_best_vs_triton=round(record["triton_us"] / best_us, 3),
                          ratio_triton_vs_dense=round(dense_us / record["triton_us"], 3), gbps_best=round(nbytes / best_us / 1e3), **env)
            print_and_keep(record, records)
    save_jsonl(args.json, records)


if __name__ == "__main__":
    main()
