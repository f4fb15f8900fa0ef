"""Tensor-core GEMM for group-quantized int2 / int4 weights at batch 1 to 16 (int3 through its 4-bit widened view),
CUDA C++ compiled at first use through NVRTC (torch.cuda._compile_kernel). The exact form also takes 17-64 rows (4 or
8 n-tiles, the activations loaded a k-tile at a time); the dispatcher sends those rows here only with DISPATCH_WIDE
(off until measured against the Triton kernels there).

The Triton split-K GEMV multiplies on the FMA pipe and spends ~3 instructions a weight decoding and multiplying in
fp32; it is bound by instruction issue (docs/kernels-gpu.md). Here, as in Marlin-class kernels, a warp decodes
a 16x16 tile of weights straight into the A fragment of one `mma.sync.m16n8k16` and lets the tensor core multiply:
- each lane's fragment (8 weights) is one 32-bit word of the re-packed codes, its field pairs placed so that one
  shift-and-mask OR-ed with the exponent of 128 (bf16) or 1024 (fp16) gives two 16-bit floats M + code at once, and
  one packed FMA (x 1 - (M + zero)) gives code - zero exactly: ~1.4 instructions a weight, no multiply;
- the activations (batch up to 8 in one n-tile, 16 in two) are the B fragment; within a 128-column unit the columns
  are permuted so a lane's B values are 32 consecutive activations (four 16-byte loads a unit);
- each quantization group's fp32 partial sums are scaled once (4 FMAs a lane a 16x128 tile), so the weights the
  tensor core multiplies are exact integers and the result equals scale x (code - zero) x x summed in fp32;
- a block owns RT 16-row tiles, its W warps split the columns and add their sums in shared memory;
- each warp's codes come through a ring of registers (the plan: 2 buffers) or, `Launch.async_copy`, of shared-memory
  stages filled by cp.async (measured on an H200: no faster than the register ring, so the plan does not use it);
- `Launch.slices` > 1 splits the columns over that many blocks of the same row tiles (more, smaller blocks to even
  out the multiprocessors' shares); the last of them to finish adds the slices' fp32 sums (measured: slower than or
  as fast as the plan's unsplit launches, so the plan does not use it).

The re-packed form (mma_layout.py) is built once per weight on its device and cached with it (views.cached).
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import torch

from compress.formats import group_quant
from compress.kernels import nvrtc
from compress.kernels.cuda_mma_launch import Launch
from compress.kernels.cuda_mma_source import SOURCE
from compress.kernels.mma_layout import UNIT, MmaWeight, pack, pack_scaled, scaled_shape_ok, shape_ok

DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}
# the parameters every tensor-core kernel's entry point starts and ends its weight's with
ACTIVATIONS = ["const unsigned short* x", "int ldx", "int B"]
OUTPUT = ["unsigned short* y", "int ldy", "int N", "int U"]
MAX_BATCH = 16
WIDE_BATCH = 64  # the exact form's register-ring launches take up to this many rows (above 16: 4 or 8 n-tiles)
DISPATCH_WIDE = False  # whether `supported` takes 17 to WIDE_BATCH rows (not until measured against the Triton kernels)
PLAN_PREFETCH = 0  # units ahead `plan` has the codes prefetched into L2 at batch 1-16 (Launch.prefetch; 0 until measured)


def kernel_name(dtype: torch.dtype, bits: int, n_tiles: int, launch: Launch, form: str = "", extras: str = "") -> str:
    """The entry point's name; `form` (MmaWeight.form): "" exact, "s1" / "s2" the scaled form (mma_layout.pack_scaled),
    "t" / "tc" / "tw" the table form (mma_lut_layout.py; compact, wide), "q" the compact SpQR form (mma_spqr_layout.py); `extras`
    (mma_extras_layout.MmaExtras.tag): a permutation ("p") and outliers for up to n activation rows ("o<n>"; "o<n>x": their
    activations read from a transposed copy)."""
    return f"gqmma{form}{extras}_{DTYPES[dtype]}_{bits}_n{n_tiles}_{launch.form()}"


def entry_source(name: str) -> str:
    """SOURCE plus one extern "C" entry point for kernel_name's fields (one template instance a compile); a split
    launch's entry also takes the slices' fp32 sums and the row-tile groups' arrival counters, one with extras their
    pointers."""
    kind, dtype, bits, n_tiles, form = name.split("_")
    launch = Launch.parse(form + ("2" if form.endswith("k") else ""))
    letters, groups, perm, outlier_rows, transposed = re.fullmatch(r"gqmma(tc|tw|t|q)?(?:s(\d))?(p?)(?:o(\d+)(x?))?", kind).groups()
    form = {"t": 3, "q": 4, "tc": 5, "tw": 6}.get(letters, int(groups or 0))  # FORM: EXACT 0, SCALED_1 / _2, TABLE 3, QUANTIZED 4, ...
    bf16, split = ("true" if dtype == "bf16" else "false"), "true" if launch.slices > 1 else "false"
    extras = bool(perm or outlier_rows)
    if (launch.async_copy and (form or extras)) or (extras and launch.slices > 1):
        raise ValueError(f"{name}: the scaled and table forms and extras run the register ring only, extras unsplit")
    args = f"{bits}, {bf16}, {n_tiles[1:]}, {launch.row_tiles}, {launch.warps}, {launch.stages}"
    prefetch = f", {launch.prefetch}" if launch.prefetch else ""  # PF, the template's last argument (0 by default)
    if launch.async_copy:
        body = f"gq_mma_async<{args}, {split}>"
    elif extras:
        xt = f", {launch.prefetch}, true" if transposed else prefetch  # XT follows PF
        body = f"gq_mma_extras<{args}, {'true' if launch.x_ahead else 'false'}, {form}, {'true' if perm else 'false'}, {outlier_rows or 0}{xt}>"
    else:
        body = f"gq_mma<{args}, {'true' if launch.x_ahead else 'false'}, {split}, {form}{', false, 0' if prefetch else ''}{prefetch}>"
    split_params = ["float* work", "unsigned* counters"] if launch.slices > 1 else []
    extras_params = (["const unsigned short* perm", "const unsigned* slices", "const int* tile_ptr"] if extras else []) + (
        ["const unsigned short* xt"] if transposed else [])
    params = [*ACTIVATIONS, "const uint4* codes", "const uint2* stats", *OUTPUT, "int GROUPS", "int gshift", *split_params, *extras_params]
    return SOURCE + nvrtc.entry_point(name, 32 * launch.warps, params, body)


@functools.cache
def _kernel(name: str, device: int, prefix: str = ""):
    """The entry point `name` compiled for CUDA device `device`; `prefix`: source put first, e.g. another GQ_LOAD
    (benchmarks)."""
    return nvrtc.compile_kernel(prefix + entry_source(name), name, device)


@functools.cache
def available() -> bool:
    """CUDA with tensor cores of compute capability 8.0 or later, and the kernel compiles (NVRTC through torch)."""
    if not (torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")) or torch.cuda.get_device_capability()[0] < 8:
        return False
    try:
        _kernel(kernel_name(torch.bfloat16, 4, 1, Launch()), torch.cuda.current_device())
    except Exception as error:  # e.g. no CUDA headers for NVRTC
        warnings.warn(f"tensor-core group-quant kernel unavailable: {type(error).__name__}: {str(error)[:300]}", stacklevel=2)
        return False
    return True


def call_ok(x: torch.Tensor, cols: int, max_batch: int | None = MAX_BATCH) -> bool:
    """What every tensor-core kernel here takes: CUDA bf16/fp16 activations of `cols` features, 1 to `max_batch` rows
    (None: any number), on a GPU where the kernels compile (compute capability 8.0+)."""
    if x.device.type != "cuda" or x.dtype not in DTYPES or x.shape[-1] != cols:
        return False
    rows = x.numel() // max(1, x.shape[-1])
    return rows >= 1 and (max_batch is None or rows <= max_batch) and available()


def supported(x: torch.Tensor, packed) -> bool:
    """A call `call_ok` takes with a weight `shape_ok` takes (with DISPATCH_WIDE, up to WIDE_BATCH rows)."""
    return shape_ok(packed) and call_ok(x, packed.shape[1], WIDE_BATCH if DISPATCH_WIDE else MAX_BATCH)


def form_supported(x: torch.Tensor, weight, bits: int | None = None) -> bool:
    """Whether another form than the exact one takes this call: the scaled one for a group-quant weight the exact one
    does not take (groups of 16-64, float zero points, SpQR's grid), the table one for a LUT codes view
    (views.LUTCodes) of `bits` <= 3-bit codes."""
    from compress.kernels import mma_lut_layout, views

    if isinstance(weight, views.LUTCodes):
        return bits is not None and mma_lut_layout.shape_ok(weight, bits) and call_ok(x, weight.shape[1])
    return not shape_ok(weight) and scaled_shape_ok(weight) and call_ok(x, weight.shape[1])


def form_view_of(weight, bits: int | None, dtype: torch.dtype) -> MmaWeight:
    """The cached form `form_supported` names, for `dtype` activations: the table form of a LUT codes view, else the
    scaled form."""
    from compress.kernels import views

    return table_view_of(weight, bits, dtype) if isinstance(weight, views.LUTCodes) else view_of(weight, dtype)


def form_matmul(x: torch.Tensor, weight, bits: int | None = None) -> torch.Tensor:
    """x @ W.T through the form `form_supported` names."""
    return matmul(x, form_view_of(weight, bits, x.dtype))


def n_tiles(batch: int) -> int:
    """The mma n-tiles (8 activation rows each) a launch of `batch` rows compiles for: 1, 2, 4 or 8."""
    return 1 << max(0, (batch - 1).bit_length() - 3)


def fits(launch: Launch, batch: int) -> bool:
    """Whether `launch` takes `batch` rows: above 16 only on the register ring, with the warps' sums (warps x row tiles
    x n-tiles x 512 bytes) in 48 KB of shared memory."""
    tiles = n_tiles(batch)
    return tiles <= 2 or (not launch.async_copy and launch.warps * launch.row_tiles * tiles * 512 <= 48 * 1024)


def fewer_warps(warps: int, units: int) -> int:
    """`warps` halved until each gets at least 2 of the `units` 128-column units."""
    while warps > 1 and units // warps < 2:
        warps //= 2
    return warps


def plan(view: MmaWeight, batch: int, device: torch.device) -> Launch:
    """2 row tiles a block (each activation load serves both), and the power of two of warps a block nearest to about
    16 warps a multiprocessor at batch <= 8 and 8 at batch 9-16 (two n-tiles: more registers), at least 2 units a warp
    (the fastest of the first grid measured on the H200); 2 buffers with the activations loaded ahead: deeper rings and
    activations loaded at use were slower on every measured shape and batch (docs/kernels-gpu.md)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    units = view.shape[1] // UNIT
    if batch > MAX_BATCH:  # the exact form at 17-64 rows: 8 warps, one row tile at 8 n-tiles (the warps' sums in 32 KB)
        return Launch(1 if batch > 32 else 2, fewer_warps(8, units), stages=2, x_ahead=True)
    row_tiles = 2
    target = sms * (16 if batch <= 8 else 8) / (view.tiles // row_tiles)
    warps = fewer_warps(1 << max(0, min(4, round(math.log2(max(target, 1.0))))), units)
    return Launch(row_tiles, warps, stages=2, x_ahead=True, prefetch=PLAN_PREFETCH)


def view_of(packed: group_quant.GroupQuantWeight, dtype: torch.dtype | None = None) -> MmaWeight:
    """The cached re-packed form of a weight (3-bit codes through their 4-bit widened view): the exact form where
    `shape_ok`, else the scaled form for `dtype` activations (groups of 16-64, float zero points)."""
    from compress.kernels import views

    # 3-bit codes widened for the packing only: the Triton kernels cache their own widened view when they need it
    source = (lambda: views.widen(packed)) if packed.bits == 3 else (lambda: packed)
    if shape_ok(packed):
        return views.cached(packed.codes, "mma", lambda: pack(source()))
    if dtype not in DTYPES or not scaled_shape_ok(packed):
        raise ValueError(f"no tensor-core form of a {packed.bits}-bit weight with groups of {packed.group_size}, {packed.zero_kind} zero "
                         f"points and {dtype} activations")
    return views.cached(packed.codes, f"mma-scaled-{DTYPES[dtype]}", lambda: pack_scaled(source(), dtype))


def counters(codes: torch.Tensor, tiles: int) -> torch.Tensor:
    """The split launches' arrival counters of a weight (one a block of row tiles, at most `tiles`), zero between
    launches: each launch's last block zeroes its own again. Shared by the weight's launches, which run in stream order
    (two streams running the same weight's split launches at once would share them)."""
    from compress.kernels import views

    return views.cached(codes, "mma-counters", lambda: torch.zeros(tiles, dtype=torch.int32, device=codes.device))


def table_view_of(codes_view, bits: int, dtype: torch.dtype) -> MmaWeight:
    """The cached table form (mma_lut_layout.py) of a LUT weight's codes view (views.LUTCodes) of `bits`-bit codes, for
    `dtype` activations."""
    from compress.kernels import mma_lut_layout, views

    if dtype not in DTYPES or not mma_lut_layout.shape_ok(codes_view, bits):
        raise ValueError(f"no tensor-core table form of {bits}-bit LUT codes of shape {codes_view.shape} for {dtype} activations")
    return views.cached(codes_view.codes, f"mma-table-{DTYPES[dtype]}", lambda: mma_lut_layout.pack_table(codes_view, bits, dtype))


def activations(x: torch.Tensor, cols: int, max_batch: int = MAX_BATCH) -> torch.Tensor:
    """x [..., cols] as the [batch, cols] rows the tensor-core kernels read (16-byte aligned rows), or a ValueError
    saying what they take (1 to `max_batch` rows)."""
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {cols}")
    x2 = x.reshape(-1, cols)
    if not 1 <= x2.shape[0] <= max_batch or x.dtype not in DTYPES or x.device.type != "cuda":
        raise ValueError(f"the tensor-core kernels take 1 to {max_batch} rows of CUDA bf16/fp16 activations, got {tuple(x.shape)} {x.dtype}")
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:  # 16-byte activation loads
        x2 = x2.contiguous().clone()
    return x2


def matmul(x: torch.Tensor, packed, launch: Launch | None = None, extras=None, transposed: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] (bfloat16 / float16, CUDA, 1 to MAX_BATCH rows; the exact form up to WIDE_BATCH) @ W.T -> [..., out]
    in x's dtype, fp32 accumulation.
    `packed`: a group-quant weight (`supported`) or its MmaWeight; `launch`: plan's unless given; `extras`: a SpQR / LUT
    weight's permutation and outliers for the kernel to apply (mma_extras_layout.MmaExtras; outliers up to 16 rows);
    `transposed`: x transposed, [in, 16] (mma_extras_layout.transposed), where the outliers' walk reads 9-16 rows."""
    view = packed if isinstance(packed, MmaWeight) else view_of(packed, x.dtype)
    rows, cols = view.shape
    exact = not view.form
    x2 = activations(x, cols, WIDE_BATCH if exact else MAX_BATCH)
    if not exact and (view.dtype not in (None, x.dtype) or launch and launch.async_copy):
        raise ValueError(f"a scaled or table form for {view.dtype} activations takes those on the register ring, got {x.dtype}, {launch}")
    batch = x2.shape[0]
    launch = launch or plan(view, batch, x.device)
    launch.check(view.tiles, cols // UNIT)
    if not fits(launch, batch):
        raise ValueError(f"{launch} at {batch} rows: above 16 rows the register ring with warps x row tiles x n-tiles x 512 bytes "
                         "of sums in 48 KB")
    y = torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    tag = "" if extras is None else extras.tag(batch)
    if transposed is not None:
        if not (extras is not None and extras.outliers and extras.perm is None and batch > 8 and transposed.shape == (cols, 16)
                and transposed.dtype == x.dtype and transposed.is_contiguous()):
            raise ValueError(f"transposed activations [{cols}, 16] serve outliers at 9-16 rows, unpermuted, not {tuple(transposed.shape)}")
        tag += "x"
    if tag and (launch.slices > 1 or launch.async_copy):
        raise ValueError(f"extras take the register ring unsplit, not {launch}")
    kernel = _kernel(kernel_name(x.dtype, view.bits, n_tiles(batch), launch, view.form, tag), nvrtc.device_index(x.device))
    shared = launch.shared_bytes(view.bits)
    # the exact form's statistics are per group (groups of 2^gshift units); the scaled form's per unit (GROUPS unused)
    args = [x2, x2.stride(0), batch, view.codes, view.stats, y, rows, rows, cols // UNIT, view.stats.shape[1],
            max(0, (view.group_size // UNIT).bit_length() - 1)]
    if launch.slices > 1:  # the slices' sums, and one arrival counter a block of row tiles (left zero by each launch)
        args += [torch.empty(launch.slices, batch, rows, dtype=torch.float32, device=x.device), counters(view.codes, view.tiles)]
    if tag:  # unused pointers: any tensor (the kernel does not read them)
        args += [extras.perm if extras.perm is not None else y] + ([extras.slices, extras.tile_ptr] if extras.outliers else [y, y])
        args += [transposed] if transposed is not None else []
    with nvrtc.on_device(x.device):
        if shared >= 48 * 1024 and kernel._max_shared_mem_bytes < shared:
            kernel.set_shared_memory_config(shared)
        kernel(grid=(view.tiles // launch.row_tiles, launch.slices, 1), block=(32 * launch.warps, 1, 1), shared_mem=shared, args=args)
    return y.reshape(*x.shape[:-1], rows)
