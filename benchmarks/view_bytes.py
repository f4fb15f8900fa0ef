"""The bytes a weight the GPU kernels read for SpQR and SqueezeLLM weights, against the bytes stored, counted from the
tensors the kernels read (built on the CPU; the forms are the same on a GPU), for both ways a layer runs:
- "three launches": the view's grid (the tensor-core scaled / table form: codes, statistics or tables), the
  permutation gather and the outlier kernel (8 bytes an outlier and the row pointers);
- "one launch" (cuda_mma_extras.py): the grid's form (SpQR: the compact form, 3-bit codes with their statistics decoded
  in the kernel), the permutation's 16-bit indices and the outliers' ELL slices (4 bytes an entry, padding included).

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

from compress.kernels import cuda_mma, cuda_mma_extras, extras_view


def _bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


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
        scaled = cuda_mma.form_view_of(view.dense, packed.bits if fmt.startswith("lut") else None, torch.bfloat16)
        one = cuda_mma_extras.form_of(packed, torch.bfloat16)
        extras = cuda_mma_extras.extras_of(view, one.tiles)
        ways = {"three launches": (scaled, _bytes(view.delta) * 2 + _bytes(view.row_ptr), _bytes(view.perm)),
                "one launch": (one, _bytes(extras.slices) + _bytes(extras.tile_ptr), _bytes(extras.perm))}
        for way, (form, outliers, perm) in ways.items():
            codes, stats = _bytes(form.codes), _bytes(form.stats)
            total = codes + stats + outliers + perm
            print(json.dumps({"format": fmt, "way": way, "form": form.form, "shape": [rows, cols],
                              "stored": round(packed_bytes(packed) / weights, 3), "codes": round(codes / weights, 3),
                              "statistics_or_tables": round(stats / weights, 3), "outliers": round(outliers / weights, 3),
                              "permutation": round(perm / weights, 4), "total": round(total / weights, 3),
                              "byte_roofline_vs_dense": round(2 * weights / total, 2)}))


if __name__ == "__main__":
    main()
