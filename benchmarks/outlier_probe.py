"""The outlier-correction kernel of SpQR and SqueezeLLM weights (compress/kernels/triton_outliers.py) alone, at every
tiling in --grid (output rows a program x outliers a row a step x warps), beside the grid kernel it follows (the
tensor-core scaled form) and dense bf16, on SpQR-shaped weights (3-bit g16, 3-bit statistics, 1% outliers:
gpu_decode.spqr_target), timed as benchmarks/gpu_kernels.py times (a CUDA graph over copies past the L2).

    python3 benchmarks/outlier_probe.py [--shapes 4096x14336,14336x4096,4096x4096] [--batches 1,16] [--json out.jsonl]

The grid is timed over copies of its weight past the L2, the corrections over copies of the outlier arrays.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import copies_for, make, print_and_keep, save_jsonl, time_op

from compress.kernels import cuda_mma, extras_view, triton_outliers

GRID = "32x32x4,16x32x4,8x32x2,8x64x2,4x64x1,4x32x1,16x64x4,64x32x8"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x14336,14336x4096,4096x4096", help="out x in, comma-separated")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--grid", default=GRID, help="tilings: <rows a program>x<outliers a step>x<warps>")
    parser.add_argument("--json", help="write one JSON record per (shape, batch)")
    args = parser.parse_args(argv)
    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "command": " ".join(sys.argv)}
    records = []
    for shape in args.shapes.split(","):
        rows, cols = map(int, shape.split("x"))
        packed = make("spqr3_g16", rows, cols, "cuda")
        view = extras_view.cached(packed)
        grid_view = cuda_mma.form_view_of(view.dense, None, torch.bfloat16)
        outliers = view.delta.numel()
        copies = copies_for(outliers * 8)  # the outliers' own copies past the L2 (each tiling reads only them)
        sets = [(view.row_ptr.clone(), view.cols.clone(), view.delta.clone()) for _ in range(copies)]
        grid_copies = copies_for(rows * cols // 2)
        dense_w = [torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(rows * cols * 2))]
        for batch in map(int, args.batches.split(",")):
            xs = [torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
            ys = [torch.randn(batch, rows, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
            record = {"shape": [rows, cols], "batch": batch, "outliers": outliers, **env,
                      "dense_us": round(time_op(F.linear, [(xs[i % 4], w) for i, w in enumerate(dense_w)], reps=15), 2),
                      "grid_us": round(time_op(cuda_mma.matmul, [(xs[i % 4], grid_view) for i in range(grid_copies)], reps=15), 2)}
            ref = extras_view.reference_corrections(ys[0].clone(), xs[0], view).double()
            for name in args.grid.split(","):
                tile_rows, block, warps = map(int, name.split("x"))

                def run(y, x, outlier_set, r=tile_rows, b=block, w=warps):
                    return triton_outliers.add_corrections(y, x, *outlier_set, r, b, w)

                got = run(ys[0].clone(), xs[0], sets[0]).double()
                if not torch.allclose(got, ref, rtol=1e-2, atol=1e-2):
                    raise SystemExit(f"{shape} batch {batch} {name}: corrections differ from the reference")
                record[name] = round(time_op(run, [(ys[i % 4], xs[i % 4], sets[i]) for i in range(copies)], reps=15), 2)
            print_and_keep(record, records)
    save_jsonl(args.json, records)


if __name__ == "__main__":
    main()
