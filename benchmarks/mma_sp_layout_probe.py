"""Which bits of which lane's metadata register place which kept values in the sparse tensor-core instruction
`mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32` (sparsity selector 0): measured, for a 2:4 kernel's layout.

The compressed A (16 x 16 kept values, the dense m16n8k16 A fragment layout) holds distinct integers; B picks 8
columns of the decompressed A at a time (B[k][n] = 1 where k = base + n), so D shows A as the instruction expanded it.
Every lane's metadata keeps positions (0, 1) of every 4-column chunk (nibble 0b0100) except, in experiment (lane,
nibble), that lane's nibble says (2, 3) (0b1110). The experiments whose result moves tell which (row, chunk) each
(lane, nibble) controls.

    python benchmarks/mma_sp_layout_probe.py [--json out.json]     # needs a CUDA GPU of compute capability 8.0+
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

SOURCE = r"""
extern "C" __global__ void mma_sp_probe(float* out) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  const int experiment = blockIdx.x >> 2, base = (blockIdx.x & 3) * 8;  // experiment 0: the baseline; then (lane, nibble)
  const int e_lane = (experiment - 1) >> 3, e_nibble = (experiment - 1) & 7;
  unsigned a[4];
  for (int i = 0; i < 4; i++) {  // register i: row g + 8 * (i & 1), compressed columns 2t + 8 * (i >> 1) + (0, 1)
    const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
    unsigned short lo, hi;
    const float vlo = row * 16 + col + 1, vhi = row * 16 + col + 2;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(lo) : "f"(vlo));
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hi) : "f"(vhi));
    a[i] = (unsigned)lo | ((unsigned)hi << 16);
  }
  unsigned b[4];
  for (int i = 0; i < 4; i++) {  // register i: k = 2t + 8 * i + (0, 1), column n = g
    unsigned short lo = 0, hi = 0;
    const int k = 2 * t + 8 * i;
    if (k == base + g) lo = 0x3C00;
    if (k + 1 == base + g) hi = 0x3C00;
    b[i] = (unsigned)lo | ((unsigned)hi << 16);
  }
  unsigned meta = 0x44444444u;
  if (experiment > 0 && lane == e_lane) meta = (meta & ~(0xFu << (4 * e_nibble))) | (0xEu << (4 * e_nibble));
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, "
               "{%0, %1, %2, %3}, %12, 0x0;"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta));
  float* o = out + (size_t)blockIdx.x * 128;  // [16 rows][8 columns of this base]
  o[g * 8 + 2 * t] = d[0]; o[g * 8 + 2 * t + 1] = d[1]; o[(g + 8) * 8 + 2 * t] = d[2]; o[(g + 8) * 8 + 2 * t + 1] = d[3];
}
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    kernel = torch.cuda._compile_kernel(SOURCE, "mma_sp_probe")
    experiments = 1 + 32 * 8
    out = torch.zeros(experiments * 4, 128, device="cuda")
    kernel(grid=(experiments * 4, 1, 1), block=(32, 1, 1), args=[out])
    torch.cuda.synchronize()
    dense = out.view(experiments, 4, 16, 8).permute(0, 2, 1, 3).reshape(experiments, 16, 32).cpu()  # [experiment, row, k]
    baseline = dense[0]
    kept = [(row, k, int(baseline[row, k])) for row in range(16) for k in range(32) if baseline[row, k] != 0]
    print("baseline: kept (row, k, value) for rows 0 and 8:", [e for e in kept if e[0] in (0, 8)])
    mapping = {}
    for experiment in range(1, experiments):
        lane, nibble = (experiment - 1) >> 3, (experiment - 1) & 7
        moved = (dense[experiment] != baseline).nonzero().tolist()
        if moved:
            rows = sorted({r for r, _ in moved})
            chunks = sorted({k // 4 for _, k in moved})
            mapping[f"lane {lane} nibble {nibble}"] = {"rows": rows, "chunks": chunks}
    for key, value in mapping.items():
        print(key, value)
    record = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "command": " ".join(sys.argv),
              "baseline_kept": kept, "mapping": mapping}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record, handle)


if __name__ == "__main__":
    main()
