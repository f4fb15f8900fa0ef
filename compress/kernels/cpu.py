"""y = x @ W.T straight from a packed weight (compress.formats: nm, group_quant, bitmap, sparse_quant, spqr, lut, ternary_dict) on
the CPU: the compiled kernels decode the weights in registers and accumulate in fp32, threads over the
output rows; x is [..., in] in float32, bfloat16 or float16 and y comes back in x's dtype. A CUDA
tensor, another dtype or path "torch" takes the format's reference_matmul (build.py picks the path)."""

from __future__ import annotations

import torch

from compress.formats import bitmap, group_quant, lut, nm, sparse_quant, spqr, ternary_dict
from compress.kernels.build import ISA_CODE, resolve_path

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Packed = (nm.NMWeight | group_quant.GroupQuantWeight | bitmap.BitmapWeight | sparse_quant.SparseQuantWeight | spqr.SpQRWeight | lut.LUTWeight
          | ternary_dict.TernaryDictWeight)
REFERENCE = {nm.NMWeight: nm.reference_matmul, group_quant.GroupQuantWeight: group_quant.reference_matmul,
             bitmap.BitmapWeight: bitmap.reference_matmul, sparse_quant.SparseQuantWeight: sparse_quant.reference_matmul,
             spqr.SpQRWeight: spqr.reference_matmul, lut.LUTWeight: lut.reference_matmul,
             ternary_dict.TernaryDictWeight: ternary_dict.reference_matmul}


def _flat(x: torch.Tensor, cols: int) -> torch.Tensor:
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {cols}")
    return x.reshape(-1, cols).contiguous()


def _path(x: torch.Tensor, path: str | None, packed=None) -> str:
    if packed is not None and x.shape[-1] != packed.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {packed.shape[1]}")
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES:
        return "torch"
    return resolve_path(path)


def _call(op, x: torch.Tensor, packed, *args) -> torch.Tensor:
    rows = packed.shape[0]
    return op(_flat(x, packed.shape[1]), *args).reshape(*x.shape[:-1], rows)


def nm_matmul(x: torch.Tensor, packed: nm.NMWeight, path: str | None = None) -> torch.Tensor:
    """N:M (any 0 < N < M <= 16): 16 kept values a step (8 on AVX2), their x gathered by a permute of
    two loaded vectors when N divides 8 and M <= 2N (2:4, 4:8, 1:2, 8:16), else by a vector gather."""
    chosen = _path(x, path, packed)
    if chosen == "torch":
        return nm.reference_matmul(x, packed)
    op = torch.ops.compress_cpu.nm_matmul
    return _call(op, x, packed, packed.values, packed.indices, packed.n, packed.m, ISA_CODE[chosen])


def group_quant_matmul(x: torch.Tensor, packed: group_quant.GroupQuantWeight, path: str | None = None) -> torch.Tensor:
    """int2/3/4/8 codes, w = scale * (code - zero) per (row, group), dequantized 16 (8) codes a step."""
    chosen = _path(x, path, packed)
    if chosen == "torch":
        return group_quant.reference_matmul(x, packed)
    op = torch.ops.compress_cpu.group_quant_matmul
    return _call(op, x, packed, packed.codes, packed.scale, packed.zero, packed.bits, packed.group_size, ISA_CODE[chosen])


def bitmap_matmul(x: torch.Tensor, packed: bitmap.BitmapWeight, path: str | None = None) -> torch.Tensor:
    """Unstructured: 16 (8) columns a step, the packed values expanded under the bitmask's bits; all-zero
    mask words are skipped; threads take whole tiles (tile_offsets gives each tile's first value)."""
    chosen = _path(x, path, packed)
    if chosen == "torch":
        return bitmap.reference_matmul(x, packed)
    op = torch.ops.compress_cpu.bitmap_matmul
    return _call(op, x, packed, packed.bitmask, packed.values, packed.tile_offsets, packed.tile_rows, ISA_CODE[chosen])


def sparse_quant_matmul(x: torch.Tensor, packed: sparse_quant.SparseQuantWeight, path: str | None = None) -> torch.Tensor:
    """N:M or bitmask positions with group-quantized codes of the kept weights: the N:M kernel's column
    logic and the group_quant dequantization (statistics gathered per lane when a step crosses a group)."""
    chosen = _path(x, path, packed)
    if chosen == "torch":
        return sparse_quant.reference_matmul(x, packed)
    pattern = sparse_quant.parse_pattern(packed.pattern)
    n, m = pattern or (0, 0)
    op = torch.ops.compress_cpu.sparse_quant_matmul
    return _call(op, x, packed, packed.codes, packed.scale, packed.zero, packed.indices, packed.bitmask, packed.code_offsets, n, m,
                 packed.bits, packed.group_size, packed.tile_rows, ISA_CODE[chosen])


def _op(name: str):
    """The compiled op, or None when this build lacks it (sources older than the format: use the reference)."""
    try:
        return getattr(torch.ops.compress_cpu, name)
    except (AttributeError, RuntimeError):
        return None


def spqr_matmul(x: torch.Tensor, packed: spqr.SpQRWeight, path: str | None = None) -> torch.Tensor:
    """SpQR: x gathered by perm once, each row's scales and zero points decoded from their second-level codes
    once, then the group_quant row kernels (dense, or the masked sparse_quant one), then the row's outliers
    added as (value - grid weight) * x."""
    chosen = _path(x, path, packed)
    op = None if chosen == "torch" else _op("spqr_matmul")
    if op is None:
        return spqr.reference_matmul(x, packed)
    return _call(op, x, packed, packed.codes, packed.scale, packed.scale_codes, packed.scale_step, packed.scale_low, packed.zero,
                 packed.zero_codes, packed.zero_step, packed.zero_low, packed.bitmask, packed.code_offsets, packed.outlier_row_ptr,
                 packed.outlier_cols, packed.outlier_values, packed.perm, packed.shape[0], packed.bits, packed.group_size, packed.scale_bits,
                 packed.scale_group_size, packed.zero_bits, packed.zero_group_size, packed.tile_rows, ISA_CODE[chosen])


def lut_matmul(x: torch.Tensor, packed: lut.LUTWeight, path: str | None = None) -> torch.Tensor:
    """Per-row tables (SqueezeLLM): codes looked up by one vector permute while the table fits a register
    (up to 4 bits on AVX-512, 3 on AVX2), else gathered; keep mask, perm and outliers as spqr_matmul."""
    chosen = _path(x, path, packed)
    op = None if chosen == "torch" else _op("lut_matmul")
    if op is None:
        return lut.reference_matmul(x, packed)
    return _call(op, x, packed, packed.codes, packed.lut, packed.bitmask, packed.code_offsets, packed.outlier_row_ptr, packed.outlier_cols,
                 packed.outlier_values, packed.perm, packed.bits, packed.tile_rows, ISA_CODE[chosen])


def ternary_dict_matmul(x: torch.Tensor, packed: ternary_dict.TernaryDictWeight, path: str | None = None,
                        table: torch.Tensor | None = None) -> torch.Tensor:
    """QMoE's dictionary-coded ternary weights: every codeword's run (up to 28 weights, its min / max masks from
    the dictionary's kernel table) taken as 32 lanes of weights built from the masks, one FMA per 16 (avx512)
    or 8 (avx2, scalar) columns, no branch per weight. `table` is that kernel table, int32 [codewords, 3] on
    x's device: pass it when calling often (TernaryDictLinear keeps it), else it is looked up per call.
    A non-CPU x goes to dispatch.py (Triton on CUDA)."""
    if x.device.type != "cpu":
        from compress.kernels.dispatch import device_matmul

        return device_matmul(x, packed, table)
    chosen = _path(x, path, packed)
    op = None if chosen == "torch" else _op("ternary_dict_matmul")
    if op is None:
        return ternary_dict.reference_matmul(x, packed)
    table = ternary_dict.dictionary_of(packed).kernel_table if table is None else table
    return _call(op, x, packed, packed.codes, packed.row_offsets, packed.minmax, table, ISA_CODE[chosen])


KERNELS = {nm.NMWeight: nm_matmul, group_quant.GroupQuantWeight: group_quant_matmul, bitmap.BitmapWeight: bitmap_matmul,
           sparse_quant.SparseQuantWeight: sparse_quant_matmul, spqr.SpQRWeight: spqr_matmul, lut.LUTWeight: lut_matmul,
           ternary_dict.TernaryDictWeight: ternary_dict_matmul}


def packed_matmul(x: torch.Tensor, packed: Packed, path: str | None = None) -> torch.Tensor:
    """x @ W.T for any of the packed formats (a non-CPU x goes to dispatch.py: Triton on CUDA, else the reference)."""
    if x.device.type != "cpu" and type(packed) in KERNELS:
        from compress.kernels.dispatch import device_matmul

        return device_matmul(x, packed)
    try:
        kernel = KERNELS[type(packed)]
    except KeyError:
        raise TypeError(f"no CPU kernel for {type(packed).__name__}") from None
    return kernel(x, packed, path)


def reference_matmul(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """The format's own plain-torch reference."""
    return REFERENCE[type(packed)](x, packed)
