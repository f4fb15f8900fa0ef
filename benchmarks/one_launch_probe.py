"""SpQR and SqueezeLLM layers in one launch (compress/kernels/cuda_mma_extras.py), timed as benchmarks/gpu_kernels.py
times (a CUDA graph over copies past the L2), beside dense bf16 in the same run:

- at each launch in --launches (is the plan's choice, made for int4, right for the compact forms?);
- with --parts, at the plan's launch: the layer with the activations gathered in the kernel and gathered by a launch
  before it (above 8 rows also with the outliers' walk reading a transposed copy, `TRANSPOSED_WALK`), then the kernel
  without its permutation, without its outliers and without both (those three give wrong results on purpose: they time
  what each part costs).

    python3 benchmarks/one_launch_probe.py --shapes 14336x4096,4096x14336 --batches 1 --launches r2w4s2a,r2w8s2a
    python3 benchmarks/one_launch_probe.py --parts --shapes 4096x14336,14336x4096 --batches 1,4,16 [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import copies_for, print_and_keep, save_jsonl, time_op, weight_copies

from compress.kernels import cuda_mma, cuda_mma_extras
from compress.kernels.cuda_mma_launch import Launch

PARTS = {"no_permutation": lambda e: dataclasses.replace(e, perm=None),
         "no_outliers": lambda e: dataclasses.replace(e, slices=None, tile_ptr=None),
         "grid_only": lambda e: dataclasses.replace(e, perm=None, slices=None, tile_ptr=None)}


def probe(fmt: str, rows: int, cols: int, batch: int, launches: list[str], parts: bool, dense_us: float) -> dict:
    copies, _ = weight_copies(fmt, rows, cols, False)
    forms, extras, _ = zip(*(cuda_mma_extras.prepared(c, torch.bfloat16) for c in copies))  # both extras, before any capture
    xs = [torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16) for _ in copies]
    plan = cuda_mma_extras.launch_for(forms[0], batch, xs[0].device)
    record = {"format": fmt, "shape": [rows, cols], "batch": batch, "form": forms[0].form, "plan": str(plan), "dense_us": dense_us}
    reference = cuda_mma_extras.matmul(xs[0], copies[0]).float()
    if parts:
        for name, in_kernel in (("gather_in_kernel", True), ("gather_first", False)):
            record[name] = round(time_op(lambda x, c, k=in_kernel: cuda_mma_extras.matmul(x, c, gather_in_kernel=k), list(zip(xs, copies))), 2)
        if batch > 8:  # the walk after the units reading a transposed copy of the activations
            previous, cuda_mma_extras.TRANSPOSED_WALK = cuda_mma_extras.TRANSPOSED_WALK, True
            try:
                got = cuda_mma_extras.matmul(xs[0], copies[0], gather_in_kernel=False).float()
                record["transposed_walk_error"] = ((got - reference).norm() / reference.norm()).item()
                record["gather_first_transposed"] = round(time_op(lambda x, c: cuda_mma_extras.matmul(x, c, gather_in_kernel=False),
                                                                  list(zip(xs, copies))), 2)
            finally:
                cuda_mma_extras.TRANSPOSED_WALK = previous
        for name, strip in PARTS.items():
            stripped = [strip(e) for e in extras]
            record[name] = round(time_op(lambda x, f, e: cuda_mma.matmul(x, f, plan, e), list(zip(xs, forms, stripped))), 2)
    for name in launches:
        launch = Launch.parse(name)
        try:
            got = cuda_mma.matmul(xs[0], forms[0], launch, extras[0]).float()
            record[name] = round(time_op(lambda x, f, e, launch=launch: cuda_mma.matmul(x, f, launch, e), list(zip(xs, forms, extras))), 2)
            error = ((got - reference).norm() / reference.norm()).item()
            if error > 1e-2:
                record[f"{name}_error"] = error
        except (ValueError, RuntimeError) as failure:  # a launch the kernel refuses or cannot compile for
            record[name] = f"{type(failure).__name__}: {str(failure)[:100]}"
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", default="spqr3_g16,lut3")
    parser.add_argument("--shapes", default="14336x4096,4096x14336,4096x4096")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--launches", default="", help="launch names, e.g. r2w4s2a,r1w8s2a (cuda_mma_launch.Launch)")
    parser.add_argument("--parts", action="store_true", help="time the gather both ways and the kernel without each extra")
    parser.add_argument("--json", help="write one JSON record per (format, shape, batch) to this file")
    args = parser.parse_args(argv)
    launches = [name for name in args.launches.split(",") if name]
    records = []
    for shape in args.shapes.split(","):
        rows, cols = map(int, shape.split("x"))
        dense = [torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(rows * cols * 2))]
        for batch in map(int, args.batches.split(",")):
            xd = [torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16) for _ in dense]
            dense_us = round(time_op(torch.nn.functional.linear, list(zip(xd, dense))), 2)
            for fmt in args.formats.split(","):
                print_and_keep(probe(fmt, rows, cols, batch, launches, args.parts, dense_us), records)
    save_jsonl(args.json, records)


if __name__ == "__main__":
    main()
