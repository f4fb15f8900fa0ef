"""The bytes a weight the GPU kernels read for SpQR and SqueezeLLM weights, against the bytes stored: their views'
grids (tensor-core scaled / table form: codes, statistics or tables) and outliers, counted from the tensors built
(on the CPU; the views are the same on a GPU).

    python3 benchmarks/view_bytes.py [--shape 4096x14336] [--formats spqr3_g16,lut3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels import make, packed_bytes

from compress.kernels import cuda_mma, extras_view


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x14336", help="out x in")
    parser.add_argument("--formats", default="spqr3_g16,lut3")
    args = parser.parse_args(argv)
    rows, cols = map(int, args.shape.split("x"))
    weights = rows * cols
    for fmt in args.formats.split(","):
        packed = make(fmt, rows, cols, "cpu")
        view = extras_view.cached(packed)
        form = cuda_mma.form_view_of(view.dense, packed.bits if fmt.startswith("lut") else None, torch.bfloat16)
        codes, stats = form.codes.numel() * 4, form.stats.numel() * form.stats.element_size()
        outliers = 0 if view.delta is None else view.delta.numel() * 8 + view.row_ptr.numel() * 4
        total = codes + stats + outliers
        print(json.dumps({"format": fmt, "shape": [rows, cols], "stored": round(packed_bytes(packed) / weights, 3),
                          "codes": round(codes / weights, 3), "statistics_or_tables": round(stats / weights, 3),
                          "outliers": round(outliers / weights, 3), "total": round(total / weights, 3),
                          "byte_roofline_vs_dense": round(2 * weights / total, 2)}))


if __name__ == "__main__":
    main()
