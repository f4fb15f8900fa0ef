"""Tensor-core GEMM for group-quantized int2 / int4 weights at batch 1 to 16 (int3 through its 4-bit widened view),
CUDA C++ compiled at first use through NVRTC (torch.cuda._compile_kernel).

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
- a block owns RT 16-row tiles, its W warps split the columns and add their sums in shared memory.

The re-packed form (mma_layout.py) is built once per weight on its device and cached with it (views.cached).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings

import torch

from compress.formats import group_quant
from compress.kernels.cuda_source import CONVERSIONS
from compress.kernels.mma_layout import UNIT, MmaWeight, pack, shape_ok

DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}
MAX_BATCH = 16

SOURCE = CONVERSIONS + r"""
#ifndef GQ_LOAD  // benchmarks may define another form of the code load
#define GQ_LOAD "ld.global.nc.L1::no_allocate.v4.u32"
#endif
__device__ __forceinline__ uint4 load_stream(const uint4* p) {  // read once: keep it out of L1
  uint4 v;
  asm(GQ_LOAD " {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// (a & b) | c in one instruction (the compiler splits it in two when b and c are immediates)
template <unsigned B, unsigned C> __device__ __forceinline__ unsigned and_or(unsigned a) {
  unsigned d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "n"(B), "n"(C));
  return d;
}

template <bool BF16> __device__ __forceinline__ unsigned fma2(unsigned a, unsigned b, unsigned c) {
  unsigned d;
  if (BF16) asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  else asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <bool BF16> __device__ __forceinline__ void mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  if (BF16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One unit (128 columns) of the block's RT row tiles: their code chunks and statistics
template <int CH, int RT>
__device__ __forceinline__ void load_codes(uint4 (&w)[RT][CH], uint2 (&s)[RT], const uint4* __restrict__ codes,
    const uint2* __restrict__ stats, int tile0, int u, int U, int GROUPS, int gshift, int lane) {
#pragma unroll
  for (int r = 0; r < RT; r++) {
#pragma unroll
    for (int c = 0; c < CH; c++) w[r][c] = load_stream(codes + ((size_t)((size_t)(tile0 + r) * U + u) * CH + c) * 32 + lane);
    s[r] = stats[((size_t)(tile0 + r) * GROUPS + (u >> gshift)) * 8 + (lane >> 2)];
  }
}

// A unit's activations for the lane's batch row in each n-tile (nb * 8 + g; past the batch the last row: an mma's
// result columns are independent and those are not stored). Lane quad position t reads columns t * 32 .. + 31.
template <int NB>
__device__ __forceinline__ void load_x(uint4 (&xv)[NB][4], const unsigned short* __restrict__ x, int ldx, int B, int u, int lane) {
#pragma unroll
  for (int nb = 0; nb < NB; nb++) {
    const int b = min(nb * 8 + (lane >> 2), B - 1);
    const uint4* xp = (const uint4*)(x + (size_t)b * ldx + u * 128 + (lane & 3) * 32);
#pragma unroll
    for (int m = 0; m < 4; m++) xv[nb][m] = xp[m];
  }
}

// acc += one unit of the RT row tiles: per k-tile, the lane's 8 codes decoded to code - zero as 16-bit floats (exact)
// into the A fragment, the mma against the activations' B fragment; each group's fp32 sums scaled once.
template <int BITS, bool BF16, int NB, int RT>
__device__ __forceinline__ void unit_dot(float (&acc)[RT][NB][4], const uint4 (&w)[RT][BITS / 2], const uint2 (&s)[RT],
                                         const uint4 (&xv)[NB][4]) {
  constexpr int T = 32 / BITS / 8;  // k-tiles a word (field pair i: bits i * BITS and + 16)
  constexpr unsigned MASK = ((1u << BITS) - 1u) * 0x10001u, MAGIC = BF16 ? 0x43004300u : 0x64006400u;
  constexpr unsigned NEG = BF16 ? 0xC300C300u : 0xE400E400u, ONE = BF16 ? 0x3F803F80u : 0x3C003C00u;
#pragma unroll
  for (int r = 0; r < RT; r++) {
    // -(M + zero) for rows g (A registers 0, 2) and g + 8 (registers 1, 3), both halves
    const unsigned neg[2] = {__byte_perm(s[r].y, 0u, 0x4040) | NEG, __byte_perm(s[r].y, 0u, 0x4141) | NEG};
    float part_sum[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int i = 0; i < 4; i++) part_sum[nb][i] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; j++) {  // the unit's 8 k-tiles of 16 columns
      const int wi = j / T, h = j % T;
      const uint4 q4 = w[r][wi / 4];
      const unsigned word = wi % 4 == 0 ? q4.x : (wi % 4 == 1 ? q4.y : (wi % 4 == 2 ? q4.z : q4.w));
      unsigned a[4];
#pragma unroll
      for (int q = 0; q < 4; q++) a[q] = fma2<BF16>(and_or<MASK, MAGIC>(word >> ((h * 4 + q) * BITS)), ONE, neg[q & 1]);
#pragma unroll
      for (int nb = 0; nb < NB; nb++) {
        const uint4 xq = xv[nb][j / 2];
        mma<BF16>(part_sum[nb], a, j & 1 ? xq.z : xq.x, j & 1 ? xq.w : xq.y);
      }
    }
    const float s_lo = to_float_f16((unsigned short)(s[r].x & 0xffffu));
    const float s_hi = to_float_f16((unsigned short)(s[r].x >> 16));
#pragma unroll
    for (int nb = 0; nb < NB; nb++) {
      acc[r][nb][0] = fmaf(s_lo, part_sum[nb][0], acc[r][nb][0]);
      acc[r][nb][1] = fmaf(s_lo, part_sum[nb][1], acc[r][nb][1]);
      acc[r][nb][2] = fmaf(s_hi, part_sum[nb][2], acc[r][nb][2]);
      acc[r][nb][3] = fmaf(s_hi, part_sum[nb][3], acc[r][nb][3]);
    }
  }
}

template <int BITS, bool BF16, int NB, int RT, int W, int S, bool XA>
__device__ __forceinline__ void gq_mma(const unsigned short* __restrict__ x, int ldx, int B, const uint4* __restrict__ codes,
    const uint2* __restrict__ stats, unsigned short* __restrict__ y, int ldy, int N, int U, int GROUPS, int gshift) {
  constexpr int CH = BITS / 2;  // 16-byte chunks a lane a unit
  __shared__ float part[W][RT * NB * 128];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tile0 = blockIdx.x * RT;
  const int u0 = warp * U / W, u1 = (warp + 1) * U / W;
  float acc[RT][NB][4];
#pragma unroll
  for (int r = 0; r < RT; r++)
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int i = 0; i < 4; i++) acc[r][nb][i] = 0.f;
  // a ring of S register buffers: unit u's code loads are issued S - 1 units ahead of its decode (the ring unrolled,
  // so every buffer index is a constant: no register copies); its activations with them (XA) or just before use
  uint4 w[S][RT][CH], xr[XA ? S : 1][NB][4];
  uint2 s[S][RT];
#pragma unroll
  for (int i = 0; i < S - 1; i++)
    if (u0 + i < u1) {
      load_codes<CH, RT>(w[i], s[i], codes, stats, tile0, u0 + i, U, GROUPS, gshift, lane);
      if (XA) load_x<NB>(xr[XA ? i : 0], x, ldx, B, u0 + i, lane);
    }
  for (int u = u0; u < u1; u += S) {
#pragma unroll
    for (int i = 0; i < S; i++) {
      if (u + i < u1) {
        const int ahead = u + i + S - 1;
        if (ahead < u1) {
          load_codes<CH, RT>(w[(i + S - 1) % S], s[(i + S - 1) % S], codes, stats, tile0, ahead, U, GROUPS, gshift, lane);
          if (XA) load_x<NB>(xr[XA ? (i + S - 1) % S : 0], x, ldx, B, ahead, lane);
        }
        if (!XA) load_x<NB>(xr[0], x, ldx, B, u + i, lane);
        unit_dot<BITS, BF16, NB, RT>(acc, w[i], s[i], xr[XA ? i : 0]);
      }
    }
  }
  // the warps' sums: through shared memory when W > 1; lane (g, t) holds rows g, g + 8 and batch columns 2t, 2t + 1
#pragma unroll
  for (int r = 0; r < RT; r++)
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int i = 0; i < 4; i++) part[warp][((r * NB + nb) * 32 + lane) * 4 + i] = acc[r][nb][i];
  __syncthreads();
  for (int e = threadIdx.x; e < RT * NB * 128; e += 32 * W) {
    const int i = e & 3, l = (e >> 2) & 31, nb = (e >> 7) % NB, r = (e >> 7) / NB;
    const int row = (tile0 + r) * 16 + (l >> 2) + 8 * (i >> 1), b = nb * 8 + 2 * (l & 3) + (i & 1);
    if (row < N && b < B) {
      float v = 0.f;
#pragma unroll
      for (int k = 0; k < W; k++) v += part[k][e];
      y[(size_t)b * ldy + row] = BF16 ? from_float_bf16(v) : from_float_f16(v);
    }
  }
}
"""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How a call is laid out: row tiles a block, warps a block (splitting the columns), code buffers in the register
    ring (each unit's codes loaded stages - 1 units ahead), and whether the activations come with them (else just
    before use)."""

    row_tiles: int = 2
    warps: int = 4
    stages: int = 2
    x_ahead: bool = True

    def __str__(self) -> str:
        return f"r{self.row_tiles}w{self.warps}s{self.stages}{'a' if self.x_ahead else 'u'}"


def kernel_name(dtype: torch.dtype, bits: int, n_tiles: int, launch: Launch) -> str:
    return f"gqmma_{DTYPES[dtype]}_{bits}_n{n_tiles}_{launch}"


def entry_source(name: str) -> str:
    """SOURCE plus one extern "C" entry point for kernel_name's fields (one template instance a compile)."""
    _, dtype, bits, n_tiles, launch = name.split("_")
    row_tiles, warps, stages = (int(v) for v in re.findall(r"\d+", launch))
    return SOURCE + (
        f'extern "C" __global__ void __launch_bounds__({32 * warps}) {name}(const unsigned short* x, int ldx, int B, '
        "const uint4* codes, const uint2* stats, unsigned short* y, int ldy, int N, int U, int GROUPS, int gshift) {\n"
        f"  gq_mma<{bits}, {'true' if dtype == 'bf16' else 'false'}, {n_tiles[1:]}, {row_tiles}, {warps}, {stages}, "
        f"{'true' if launch.endswith('a') else 'false'}>(x, ldx, B, codes, stats, y, ldy, N, U, GROUPS, gshift);\n}}\n")


@functools.cache
def _kernel(name: str, prefix: str = ""):
    """The compiled entry point `name`; `prefix`: source put first, e.g. another GQ_LOAD (benchmarks)."""
    return torch.cuda._compile_kernel(prefix + entry_source(name), name)


@functools.cache
def available() -> bool:
    """CUDA with tensor cores of compute capability 8.0 or later, and the kernel compiles (NVRTC through torch)."""
    if not (torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")) or torch.cuda.get_device_capability()[0] < 8:
        return False
    try:
        _kernel(kernel_name(torch.bfloat16, 4, 1, Launch()))
    except Exception as error:  # e.g. no CUDA headers for NVRTC
        warnings.warn(f"tensor-core group-quant kernel unavailable: {type(error).__name__}: {str(error)[:300]}", stacklevel=2)
        return False
    return True


def supported(x: torch.Tensor, packed) -> bool:
    """CUDA bf16/fp16 activations, 1 to MAX_BATCH rows, a weight `shape_ok` takes."""
    if not shape_ok(packed) or x.device.type != "cuda" or x.dtype not in DTYPES or x.shape[-1] != packed.shape[1]:
        return False
    batch = x.numel() // max(1, x.shape[-1])
    return 1 <= batch <= MAX_BATCH and available()


def plan(view: MmaWeight, batch: int, device: torch.device) -> Launch:
    """2 row tiles a block (each activation load serves both), and the power of two of warps a block nearest to about
    16 warps a multiprocessor at batch <= 8 and 8 at batch 9-16 (two n-tiles: more registers), at least 2 units a warp
    (the fastest of the first grid measured on the H200); 2 buffers with the activations loaded ahead: deeper rings and
    activations loaded at use were slower on every measured shape and batch (docs/kernels-gpu.md)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_tiles, units = 2, view.shape[1] // UNIT
    target = sms * (16 if batch <= 8 else 8) / (view.tiles // row_tiles)
    warps = 1 << max(0, min(4, round(math.log2(max(target, 1.0)))))
    while warps > 1 and units // warps < 2:
        warps //= 2
    return Launch(row_tiles, warps, stages=2, x_ahead=True)


def view_of(packed: group_quant.GroupQuantWeight) -> MmaWeight:
    """The cached re-packed form of a weight (3-bit codes through their 4-bit widened view)."""
    from compress.kernels import views

    return views.cached(packed.codes, "mma", lambda: pack(views.kernel_form(packed)))


def matmul(x: torch.Tensor, packed, launch: Launch | None = None) -> torch.Tensor:
    """x [..., in] (bfloat16 / float16, CUDA, 1 to MAX_BATCH rows) @ W.T -> [..., out] in x's dtype, fp32 accumulation.
    `packed`: a group-quant weight (`supported`) or its MmaWeight; `launch`: plan's unless given."""
    view = packed if isinstance(packed, MmaWeight) else view_of(packed)
    rows, cols = view.shape
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {cols}")
    x2 = x.reshape(-1, cols)
    batch = x2.shape[0]
    if not 1 <= batch <= MAX_BATCH or x.dtype not in DTYPES or x.device.type != "cuda":
        raise ValueError(f"the tensor-core kernel takes 1 to {MAX_BATCH} rows of CUDA bf16/fp16 activations, got {tuple(x.shape)} {x.dtype}")
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:  # 16-byte activation loads
        x2 = x2.contiguous().clone()
    launch = launch or plan(view, batch, x.device)
    if view.tiles % launch.row_tiles or not 1 <= launch.stages <= 4 or launch.warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"{launch}: row tiles must divide the view's {view.tiles} tiles, 1-4 stages, 1-16 warps (a power of two)")
    y = torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    n_tiles = 1 if batch <= 8 else 2
    kernel = _kernel(kernel_name(x.dtype, view.bits, n_tiles, launch))
    kernel(grid=(view.tiles // launch.row_tiles, 1, 1), block=(32 * launch.warps, 1, 1),
           args=[x2, x2.stride(0), batch, view.codes, view.stats, y, rows, rows, cols // UNIT, view.stats.shape[1],
                 (view.group_size // UNIT).bit_length() - 1])
    return y.reshape(*x.shape[:-1], rows)
