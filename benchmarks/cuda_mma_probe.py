"""The tensor-core group-quant kernel (compress/kernels/cuda_mma.py) against dense bf16 F.linear, the Triton kernels
the modules ran before it and humming-kernels at the same bits, on the issue's shapes and batches; every (row tiles
a block, warps a block, register ring depth, activations ahead or at use) in --grid, the plan's choice marked.

    python benchmarks/cuda_mma_probe.py [--shapes 14336x4096,...] [--bits 4,2] [--batches 1,4,16] [--json out.jsonl]
    python benchmarks/cuda_mma_probe.py --sparse ...   # 2:4 + int4 g128 on the sparse tensor-core kernel
    python benchmarks/cuda_mma_probe.py --sparse bf16 ...   # 2:4 bf16 values on the sparse tensor-core kernel
    python benchmarks/cuda_mma_probe.py --bitmap 70 [--prefetch 0,1,2] ...   # 70% bitmap bf16 on the bitmap kernel
    python benchmarks/cuda_mma_probe.py --bitmap 70 --scatter 4,8 ...   # and on the scatter kernel at 4 and 8 warps

Timing as benchmarks/gpu_kernels.py (a CUDA graph over R copies of the weight, R copies > 3x the L2, median replay
/ R). Every configuration is checked against the format's reference first (relative error < 4e-3 with bf16 x).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import copies_for, print_and_keep, save_jsonl, time_op, unpack, weight_copies

from compress.formats import bitmap, group_quant, nm, sparse_quant
from compress.kernels import cuda_mma, cuda_mma_bitmap, cuda_mma_scatter, cuda_mma_sparse, triton_bitmap, views
from compress.kernels import triton_kernels as tk

SHAPES = "14336x4096,4096x14336,4096x4096,8192x8192,11008x4096"
GRID = "r1w8s2a,r2w2s2a,r2w4s2a,r2w8s2a,r2w16s2a"  # the first run's full grid: 1-2 row tiles x 1-16 warps; 1 warp never won


@dataclasses.dataclass
class Kernel:
    view_of: Callable
    reference: Callable
    run: Callable  # (x, packed, launch)
    triton: Callable = tk.packed_matmul  # what the modules ran before


DENSE = Kernel(lambda p: cuda_mma.view_of(p, torch.bfloat16), group_quant.reference_matmul, cuda_mma.matmul)
SPARSE = Kernel(cuda_mma_sparse.view_of, sparse_quant.reference_matmul,
                lambda x, p, launch: cuda_mma_sparse.matmul(x, p, launch.row_tiles, launch.warps, launch.prefetch))
SPARSE_VALUES = dataclasses.replace(SPARSE, view_of=lambda p: cuda_mma_sparse.view_of(p, torch.bfloat16), reference=nm.reference_matmul)


def bitmap_kernel(prefetch: int, pairs: bool) -> Kernel:
    return Kernel(lambda p: cuda_mma_bitmap.view_of(p, torch.bfloat16), bitmap.reference_matmul,
                  lambda x, p, launch: cuda_mma_bitmap.matmul(x, p, launch.row_tiles, launch.warps, prefetch, pairs), triton_bitmap.matmul)


def humming_op(dense_w: torch.Tensor, bits: int):
    """(op, layers) of humming-kernels at these bits, or None where it is not installed."""
    try:
        from gpu_peers import humming_sized

        op, layers, _ = humming_sized(dense_w, bits, copies_for)
    except Exception as error:  # not installed here
        print(f"humming int{bits} unavailable: {type(error).__name__}: {str(error)[:200]}", flush=True)
        return None
    return op, layers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES, help="out x in, comma-separated")
    parser.add_argument("--bits", default="4,2")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--grid", default=GRID, help="launches: r<row tiles>w<warps>s<stages><a: activations ahead | u: at use>"
                        "[c: cp.async ring][k<n>: columns split over n blocks]")
    parser.add_argument("--group", type=int, default=128, help="group size; 16-64 (or --float-zero) run the scaled form")
    parser.add_argument("--float-zero", action="store_true", help="float16 zero points (the scaled form)")
    parser.add_argument("--no-humming", action="store_true")
    parser.add_argument("--sparse", nargs="?", const="int4", choices=("int4", "bf16"),
                        help="2:4 weights on the sparse tensor-core kernel: int4 g128 codes (the default) or bf16 values (--bits ignored)")
    parser.add_argument("--bitmap", type=int, help="a bitmap bf16 weight with this %% pruned at random, on the bitmap kernel (--bits ignored)")
    parser.add_argument("--prefetch", default="1", help="--bitmap: the next unit's values prefetched: 0 none, 1 L1, 2 L2 (each a launch "
                        "named <launch>p<n>)")
    parser.add_argument("--decode", default="0", help="--bitmap: 0 one weight at a time, 1 two (each a launch named <launch>p<n>d<n>)")
    parser.add_argument("--scatter", default="", help="--bitmap: also the scatter kernel (cuda_mma_scatter.py) at these warps a block, "
                        "each with the plan's chunk rounds and one more (launches named r1w<warps>scatter<rounds>)")
    parser.add_argument("--scatter-rounds", default="", help="--scatter: these chunk rounds in registers (default: the plan's and one more)")
    parser.add_argument("--scatter-prefetch", default="0", help="--scatter: each launch also with its chunks prefetched into L2 this "
                        "many units ahead (0: none; launches named r1w<warps>scatter<rounds>p<units>)")
    parser.add_argument("--json", help="write one JSON record per (shape, bits, batch) to this file")
    args = parser.parse_args(argv)
    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "command": " ".join(sys.argv)}
    batches = [int(b) for b in args.batches.split(",")]
    records = []
    for shape in args.shapes.split(","):
        rows, cols = map(int, shape.split("x"))
        dense_w = [torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(rows * cols * 2))]
        xs = {b: [torch.randn(b, cols, device="cuda", dtype=torch.bfloat16) for _ in range(4)] for b in batches}
        dense_us = {b: time_op(F.linear, [(xs[b][i % 4], w) for i, w in enumerate(dense_w)], reps=15) for b in batches}
        del dense_w
        for bits in [4] if args.sparse or args.bitmap is not None else map(int, args.bits.split(",")):
            kernels = {"": {"int4": SPARSE, "bf16": SPARSE_VALUES}[args.sparse] if args.sparse else DENSE}
            fmt = {"int4": "2:4+int4_g128", "bf16": "nm_2:4_bf16"}.get(args.sparse, f"int{bits}_g{args.group}{'f' if args.float_zero else ''}")
            if args.bitmap is not None:
                kernels = {f"p{pf}d{d}": bitmap_kernel(int(pf), d == "1") for pf in args.prefetch.split(",") for d in args.decode.split(",")}
                fmt = f"bitmap{args.bitmap}_bf16"
            kernel = next(iter(kernels.values()))
            copies, nbytes = weight_copies(fmt, rows, cols, checked=False)
            for copy in copies:
                kernel.view_of(copy)  # built outside the capture
                if args.bitmap is not None and args.scatter:
                    cuda_mma_scatter.view_of(copy, torch.bfloat16)
            packed = copies[0]
            device = next(v for v in vars(packed).values() if isinstance(v, torch.Tensor)).device
            peer = None if args.no_humming or fmt[0] != "i" else humming_op(unpack(views.kernel_form(packed)).bfloat16(), bits)
            for b in batches:
                calls = [(xs[b][i % 4], p) for i, p in enumerate(copies)]
                ref = kernel.reference(xs[b][0].float(), packed).double()
                record = {"shape": [rows, cols], "format": fmt, "bits": bits, "sparse": args.sparse, "batch": b, "dense_us": round(dense_us[b], 2),
                          "triton_us": round(time_op(kernel.triton, calls, reps=15), 2),
                          "plan": (f"{cuda_mma_bitmap.plan(kernel.view_of(packed), b, device)}p1d0" if args.bitmap is not None
                                   else str(cuda_mma.plan(kernel.view_of(packed), b, device))),
                          "bytes": nbytes}
                if peer:
                    op, layers = peer
                    record["humming_us"] = round(time_op(op, [(xs[b][i % 4], layer) for i, layer in enumerate(layers)], reps=15), 2)
                for name in args.grid.split(","):
                    launch = cuda_mma.Launch.parse(name)
                    if (kernel.view_of(packed).tiles % launch.row_tiles or cols // cuda_mma.UNIT < launch.warps * launch.slices
                            or ((args.sparse or args.bitmap is not None) and launch.form()[-3:] != "s2a")):
                        continue  # the sparse and bitmap kernels: 2 register buffers, activations ahead, not split
                    if not cuda_mma.fits(launch, b):
                        continue  # above 16 rows: the register ring, the warps' sums in 48 KB
                    for suffix, kernel in kernels.items():
                        got = kernel.run(xs[b][0], packed, launch).double()
                        err = ((got - ref).norm() / ref.norm()).item()
                        if err >= 4e-3:
                            raise SystemExit(f"{shape} {fmt} batch {b} {launch}{suffix}: relative error {err:.1e}")
                        record[f"{launch}{suffix}"] = round(time_op(lambda x, p, launch=launch, run=kernel.run: run(x, p, launch), calls, reps=15), 2)
                if args.bitmap is not None and args.scatter:
                    scatter_view = cuda_mma_scatter.view_of(packed, torch.bfloat16)
                    planned = cuda_mma_scatter.plan(scatter_view, b, device)
                    record["scatter_plan"] = f"r1w{planned[0]}scatter{planned[1]}"
                    for warps in map(int, args.scatter.split(",")):
                        rounds_list = ({planned[1], min(planned[1] + 1, cuda_mma_scatter.ROUNDS[-1])} if not args.scatter_rounds
                                       else set(map(int, args.scatter_rounds.split(","))))
                        for rounds in sorted(rounds_list):
                            for ahead in map(int, args.scatter_prefetch.split(",")):
                                got = cuda_mma_scatter.matmul(xs[b][0], packed, warps, rounds, ahead).double()
                                err = ((got - ref).norm() / ref.norm()).item()
                                if err >= 4e-3:
                                    raise SystemExit(f"{shape} {fmt} batch {b} scatter w{warps} c{rounds} p{ahead}: relative error {err:.1e}")
                                run = lambda x, p, w=warps, r=rounds, a=ahead: cuda_mma_scatter.matmul(x, p, w, r, a)  # noqa: E731
                                record[f"r1w{warps}scatter{rounds}" + (f"p{ahead}" if ahead else "")] = round(time_op(run, calls, reps=15), 2)
                best_us, best = min((v, k) for k, v in record.items() if k[0] == "r" and k[1].isdigit())
                plan_key = record["plan"]
                record.update(best=best, best_us=best_us, plan_us=record.get(plan_key), ratio_best_vs_dense=round(dense_us[b] / best_us, 3),
                              ratio_best_vs_triton=round(record["triton_us"] / best_us, 3),
                              ratio_triton_vs_dense=round(dense_us[b] / record["triton_us"], 3), gbps_best=round(nbytes / best_us / 1e3), **env)
                if record.get("humming_us"):
                    record.update(ratio_best_vs_humming=round(record["humming_us"] / best_us, 3),
                                  ratio_humming_vs_dense=round(dense_us[b] / record["humming_us"], 3))
                print_and_keep(record, records)
    save_jsonl(args.json, records)


if __name__ == "__main__":
    main()
