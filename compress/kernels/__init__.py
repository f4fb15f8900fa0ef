"""Kernel-backed modules and the CPU ops they call, one per stored format in compress.formats (nm,
group_quant, bitmap, sparse_quant, spqr, lut), each checked against that format's plain-torch reference.

  build.py    the C++ sources in kernels/cpu/ compiled on first use (torch's JIT loader), the vector
              path chosen at run time (avx512, avx2, scalar, or torch when there is no build);
              COMPRESS_CPU_KERNEL forces one
  cpu.py      y = x @ W.T straight from the packed tensors (packed_matmul and one function a format)
  modules.py  NMLinear, GroupQuantLinear, BitmapLinear, SparseQuantLinear, SpQRLinear, LUTLinear (from_packed)

Nothing here may be imported by the layers below it."""

from compress.kernels.build import cpu_features, cpu_paths, resolve_path
from compress.kernels.cpu import (
                                  bitmap_matmul,
                                  group_quant_matmul,
                                  lut_matmul,
                                  nm_matmul,
                                  packed_matmul,
                                  reference_matmul,
                                  sparse_quant_matmul,
                                  spqr_matmul,
)
from compress.kernels.modules import BitmapLinear, GroupQuantLinear, LUTLinear, NMLinear, PackedLinear, SparseQuantLinear, SpQRLinear, from_packed

__all__ = [
    "BitmapLinear", "GroupQuantLinear", "LUTLinear", "NMLinear", "PackedLinear", "SparseQuantLinear", "SpQRLinear", "bitmap_matmul",
    "cpu_features", "cpu_paths", "from_packed", "group_quant_matmul", "lut_matmul", "nm_matmul", "packed_matmul", "reference_matmul",
    "resolve_path", "sparse_quant_matmul", "spqr_matmul",
]
