"""Sparse tensor-core GEMM for 2:4 sparse, group-quantized int4 weights (sparse_quant, pattern 2:4) at batch 1 to 16:
`mma.sp.sync.m16n8k32` takes the kept values and their 2-bit positions (mma_sparse_layout.py), so a warp reads a
quarter byte of codes and an eighth of a byte of positions a weight, decodes only the kept codes (as cuda_mma.py
does, 1.4 instructions a kept weight) and one instruction covers 32 columns of 16 rows.

2:4 weights of 16-bit values (nm) take the same instruction with the kept values as its A registers, nothing to
decode: a warp reads 1.125 bytes a weight against dense bf16's 2 (a byte roofline of 1.78x).

Measured on an H200: the metadata layout it assumes is the instruction's (benchmarks/mma_sp_layout_probe.py), the
kernel equals the format's reference (tests/test_cuda_mma_sparse.py), and it runs 3.1-3.5x dense bf16 at batch 1 and
1.8-2.0x at 16 with int4 codes, 1.74-1.98x and 1.43-1.45x with bf16 values (docs/kernels-gpu.md). The dispatcher sends
both here at batch 1 to 16.
"""

from __future__ import annotations

import functools

import torch

from compress.formats import nm
from compress.kernels import cuda_mma, nvrtc
from compress.kernels.cuda_mma_source import SOURCE
from compress.kernels.mma_layout import UNIT
from compress.kernels.mma_sparse_layout import SparseMmaValues, SparseMmaWeight, pack, pack_values, shape_ok, values_shape_ok

SPARSE_SOURCE = SOURCE + r"""
template <bool BF16> __device__ __forceinline__ void mma_sp(float* c, const unsigned* a, const unsigned* b, unsigned meta) {
  if (BF16)
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, "
        "{%0, %1, %2, %3}, %12, 0x0;"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta));
  else
    asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, "
        "{%0, %1, %2, %3}, %12, 0x0;"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta));
}


// B of instruction j for each n-tile: the even lane of a pair holds columns 0-7 of its 16, the odd one 8-15; each
// needs two words of the other's
template <int NB>
__device__ __forceinline__ void exchange_b(unsigned (&b)[NB][4], const uint4 (&xv)[NB][4], int j, bool odd) {
#pragma unroll
  for (int nb = 0; nb < NB; nb++) {
    const uint4 mine = xv[nb][j];
    const unsigned v1 = __shfl_xor_sync(0xffffffffu, odd ? mine.x : mine.y, 1);
    const unsigned v2 = __shfl_xor_sync(0xffffffffu, odd ? mine.z : mine.w, 1);
    b[nb][0] = odd ? v1 : mine.x;
    b[nb][1] = odd ? v2 : mine.z;
    b[nb][2] = odd ? mine.y : v1;
    b[nb][3] = odd ? mine.w : v2;
  }
}

// The activations of the lane's batch row: pair P = t >> 1, half h = t & 1 reads columns P * 64 + j * 16 + h * 8 .. + 7
// for instruction j
template <int NB>
__device__ __forceinline__ void load_x_sp(uint4 (&xv)[NB][4], const unsigned short* __restrict__ x, int ldx, int B, int u, int lane) {
#pragma unroll
  for (int nb = 0; nb < NB; nb++) {
    const int b = min(nb * 8 + (lane >> 2), B - 1);
    const unsigned short* xp = x + (size_t)b * ldx + u * 128 + ((lane & 3) >> 1) * 64 + (lane & 1) * 8;
#pragma unroll
    for (int j = 0; j < 4; j++) xv[nb][j] = *(const uint4*)(xp + j * 16);
  }
}

// A unit of the RT row tiles: a word of kept codes an instruction (uint4), the positions (lanes t and t ^ 2 read the
// same), the statistics; the activations
template <int NB, int RT>
__device__ __forceinline__ void load_unit_sp(uint4 (&w)[RT], uint4 (&m)[RT], uint2 (&s)[RT], uint4 (&xv)[NB][4],
    const uint4* __restrict__ codes, const uint4* __restrict__ positions, const uint2* __restrict__ stats,
    const unsigned short* __restrict__ x, int ldx, int B, int tile0, int u, int U, int GROUPS, int gshift, int lane) {
#pragma unroll
  for (int r = 0; r < RT; r++) {
    const size_t tu = (size_t)(tile0 + r) * U + u;
    w[r] = load_stream(codes + tu * 32 + lane);
    m[r] = load_stream(positions + (tu * 8 + (lane >> 2)) * 2 + (lane & 1));
    s[r] = stats[((size_t)(tile0 + r) * GROUPS + (u >> gshift)) * 8 + (lane >> 2)];
  }
  load_x_sp<NB>(xv, x, ldx, B, u, lane);
}

template <bool BF16, int NB, int RT>
__device__ __forceinline__ void unit_dot_sp(float (&acc)[RT][NB][4], const uint4 (&w)[RT], const uint4 (&m)[RT], const uint2 (&s)[RT],
                                            const uint4 (&xv)[NB][4], int lane) {
  constexpr unsigned MASK = 0x000F000Fu, MAGIC = BF16 ? 0x43004300u : 0x64006400u;
  constexpr unsigned NEG = BF16 ? 0xC300C300u : 0xE400E400u, ONE = BF16 ? 0x3F803F80u : 0x3C003C00u;
  const bool odd = lane & 1;
  unsigned neg[RT][2];
  float part_sum[RT][NB][4];
  zero(part_sum);
#pragma unroll
  for (int r = 0; r < RT; r++) {
    neg[r][0] = __byte_perm(s[r].y, 0u, 0x4040) | NEG;
    neg[r][1] = __byte_perm(s[r].y, 0u, 0x4141) | NEG;
  }
#pragma unroll
  for (int j = 0; j < 4; j++) {
    unsigned b[NB][4];
    exchange_b<NB>(b, xv, j, odd);
#pragma unroll
    for (int r = 0; r < RT; r++) {
      const unsigned word = word_of(w[r], j);
      unsigned a[4];
#pragma unroll
      for (int q = 0; q < 4; q++) a[q] = fma2<BF16>(and_or<MASK, MAGIC>(word >> (q * 4)), ONE, neg[r][q & 1]);
#pragma unroll
      for (int nb = 0; nb < NB; nb++) mma_sp<BF16>(part_sum[r][nb], a, b[nb], word_of(m[r], j));
    }
  }
#pragma unroll
  for (int r = 0; r < RT; r++) add_scaled<NB>(acc[r], part_sum[r], s[r].x);
}

// 2:4 weights of 16-bit values: a unit of the RT row tiles is each instruction's A registers (one uint4 a lane) and
// the positions; nothing to decode
template <int NB, int RT>
__device__ __forceinline__ void load_unit_values(uint4 (&v)[RT][4], uint4 (&m)[RT], uint4 (&xv)[NB][4], const uint4* __restrict__ values,
    const uint4* __restrict__ positions, const unsigned short* __restrict__ x, int ldx, int B, int tile0, int u, int U, int lane) {
#pragma unroll
  for (int r = 0; r < RT; r++) {
    const size_t tu = (size_t)(tile0 + r) * U + u;
#pragma unroll
    for (int j = 0; j < 4; j++) v[r][j] = load_stream(values + (tu * 4 + j) * 32 + lane);
    m[r] = load_stream(positions + (tu * 8 + (lane >> 2)) * 2 + (lane & 1));
  }
  load_x_sp<NB>(xv, x, ldx, B, u, lane);
}

template <bool BF16, int NB, int RT>
__device__ __forceinline__ void unit_dot_values(float (&acc)[RT][NB][4], const uint4 (&v)[RT][4], const uint4 (&m)[RT],
                                                const uint4 (&xv)[NB][4], int lane) {
#pragma unroll
  for (int j = 0; j < 4; j++) {
    unsigned b[NB][4];
    exchange_b<NB>(b, xv, j, lane & 1);
#pragma unroll
    for (int r = 0; r < RT; r++) {
      const unsigned a[4] = {v[r][j].x, v[r][j].y, v[r][j].z, v[r][j].w};
#pragma unroll
      for (int nb = 0; nb < NB; nb++) mma_sp<BF16>(acc[r][nb], a, b[nb], word_of(m[r], j));
    }
  }
}

// unit u's values (or codes) and positions of the RT row tiles into L2, PF units ahead of use (PF 0: none; lane 0)
template <int PF, int RT, int WEIGHT_BYTES>
__device__ __forceinline__ void prefetch_unit_sp(const uint4* __restrict__ weight, const uint4* __restrict__ positions, int tile0, int u,
                                                 int u1, int U, int lane) {
  if (PF == 0 || lane != 0 || u >= u1) return;
#pragma unroll
  for (int r = 0; r < RT; r++) {
    const size_t tu = (size_t)(tile0 + r) * U + u;
    prefetch_l2<WEIGHT_BYTES>(weight + tu * (WEIGHT_BYTES / 16));
    prefetch_l2<256>(positions + tu * 16);
  }
}

template <bool BF16, int NB, int RT, int W, int PF = 0>
__device__ __forceinline__ void nm_mma_sp(const unsigned short* __restrict__ x, int ldx, int B, const uint4* __restrict__ values,
    const uint4* __restrict__ positions, unsigned short* __restrict__ y, int ldy, int N, int U) {
  __shared__ float part[W][RT * NB * 128];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tile0 = blockIdx.x * RT;
  const int u0 = warp * U / W, u1 = (warp + 1) * U / W;
  float acc[RT][NB][4];
  zero(acc);
  uint4 v0[RT][4], m0[RT], x0[NB][4], v1[RT][4], m1[RT], x1[NB][4];  // ping-pong: each unit loaded one unit ahead
  if (u0 < u1) load_unit_values<NB, RT>(v0, m0, x0, values, positions, x, ldx, B, tile0, u0, U, lane);
  for (int k = 2; k <= PF; k++) prefetch_unit_sp<PF, RT, 2048>(values, positions, tile0, u0 + k, u1, U, lane);
  for (int u = u0; u < u1; u += 2) {
    prefetch_unit_sp<PF, RT, 2048>(values, positions, tile0, u + 1 + PF, u1, U, lane);
    prefetch_unit_sp<PF, RT, 2048>(values, positions, tile0, u + 2 + PF, u1, U, lane);
    if (u + 1 < u1) load_unit_values<NB, RT>(v1, m1, x1, values, positions, x, ldx, B, tile0, u + 1, U, lane);
    unit_dot_values<BF16, NB, RT>(acc, v0, m0, x0, lane);
    if (u + 1 >= u1) break;
    if (u + 2 < u1) load_unit_values<NB, RT>(v0, m0, x0, values, positions, x, ldx, B, tile0, u + 2, U, lane);
    unit_dot_values<BF16, NB, RT>(acc, v1, m1, x1, lane);
  }
  store_sums<BF16, NB, RT, W>(acc, part, y, ldy, N, B, tile0);
}

template <bool BF16, int NB, int RT, int W, int PF = 0>
__device__ __forceinline__ void gq_mma_sp(const unsigned short* __restrict__ x, int ldx, int B, const uint4* __restrict__ codes,
    const uint4* __restrict__ positions, const uint2* __restrict__ stats, unsigned short* __restrict__ y, int ldy, int N, int U,
    int GROUPS, int gshift) {
  __shared__ float part[W][RT * NB * 128];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tile0 = blockIdx.x * RT;
  const int u0 = warp * U / W, u1 = (warp + 1) * U / W;
  float acc[RT][NB][4];
  zero(acc);
  uint4 w0[RT], m0[RT], x0[NB][4], w1[RT], m1[RT], x1[NB][4];  // ping-pong: each unit loaded one unit ahead
  uint2 s0[RT], s1[RT];
  if (u0 < u1) load_unit_sp<NB, RT>(w0, m0, s0, x0, codes, positions, stats, x, ldx, B, tile0, u0, U, GROUPS, gshift, lane);
  for (int k = 2; k <= PF; k++) prefetch_unit_sp<PF, RT, 512>(codes, positions, tile0, u0 + k, u1, U, lane);
  for (int u = u0; u < u1; u += 2) {
    prefetch_unit_sp<PF, RT, 512>(codes, positions, tile0, u + 1 + PF, u1, U, lane);
    prefetch_unit_sp<PF, RT, 512>(codes, positions, tile0, u + 2 + PF, u1, U, lane);
    if (u + 1 < u1) load_unit_sp<NB, RT>(w1, m1, s1, x1, codes, positions, stats, x, ldx, B, tile0, u + 1, U, GROUPS, gshift, lane);
    unit_dot_sp<BF16, NB, RT>(acc, w0, m0, s0, x0, lane);
    if (u + 1 >= u1) break;
    if (u + 2 < u1) load_unit_sp<NB, RT>(w0, m0, s0, x0, codes, positions, stats, x, ldx, B, tile0, u + 2, U, GROUPS, gshift, lane);
    unit_dot_sp<BF16, NB, RT>(acc, w1, m1, s1, x1, lane);
  }
  store_sums<BF16, NB, RT, W>(acc, part, y, ldy, N, B, tile0);
}
"""


def kernel_name(dtype: torch.dtype, n_tiles: int, row_tiles: int, warps: int, values: bool = False, prefetch: int = 0) -> str:
    """The kernel of one launch layout: `values` the 16-bit values one (2:4 nm weights), else the int4 codes one;
    `prefetch`: units ahead whose weight bytes are prefetched into L2 (0: none)."""
    return f"{'nmmmasp' if values else 'gqmmasp'}_{cuda_mma.DTYPES[dtype]}_n{n_tiles}_r{row_tiles}_w{warps}" + (f"_f{prefetch}" if prefetch else "")


def entry_source(name: str) -> str:
    kind, dtype, n_tiles, row_tiles, warps, *prefetch = name.split("_")
    params = f"{'true' if dtype == 'bf16' else 'false'}, {n_tiles[1:]}, {row_tiles[1:]}, {warps[1:]}" + "".join(f", {p[1:]}" for p in prefetch)
    if kind == "nmmmasp":
        weight, call = ["const uint4* values", "const uint4* positions"], f"nm_mma_sp<{params}>"
    else:
        weight, call = ["const uint4* codes", "const uint4* positions", "const uint2* stats"], f"gq_mma_sp<{params}>"
    extra = [] if kind == "nmmmasp" else ["int GROUPS", "int gshift"]
    return SPARSE_SOURCE + nvrtc.entry_point(name, 32 * int(warps[1:]), [*cuda_mma.ACTIVATIONS, *weight, *cuda_mma.OUTPUT, *extra], call)


@functools.cache
def _kernel(name: str, device: int):
    return nvrtc.compile_kernel(entry_source(name), name, device)


def supported(x: torch.Tensor, packed) -> bool:
    """A call cuda_mma.call_ok takes with a 2:4 int4 weight `shape_ok` takes or a 2:4 nm weight `values_shape_ok` takes
    (sparse tensor cores: 8.0+)."""
    return (shape_ok(packed) or values_shape_ok(packed)) and cuda_mma.call_ok(x, packed.shape[1])


def view_of(packed, dtype: torch.dtype = torch.bfloat16) -> SparseMmaWeight | SparseMmaValues:
    """The cached re-packed form: of a 2:4 int4 weight, or of a 2:4 nm weight for `dtype` activations."""
    from compress.kernels import views

    if isinstance(packed, nm.NMWeight):
        return views.cached(packed.values, f"mma-sparse-{cuda_mma.DTYPES.get(dtype, dtype)}", lambda: pack_values(packed, dtype))
    return views.cached(packed.codes, "mma_sparse", lambda: pack(packed))


def values_plan(view: SparseMmaValues, batch: int, device: torch.device) -> cuda_mma.Launch:
    """The 16-bit values kernel's launch: one row tile and 8 warps a block at batch 1-8 (its four loads a unit already
    keep enough bytes in flight), the group-quant plan with at least 4 warps at 9-16: the fastest measured on the H200
    at batch 1 and 16 on 14336x4096, 4096x14336 and 4096x4096 (docs/kernels-gpu.md)."""
    units = view.shape[1] // UNIT
    chosen = cuda_mma.plan(view, batch, device)
    row_tiles, warps = (1, 8) if batch <= 8 else (2, max(4, chosen.warps))
    return cuda_mma.Launch(row_tiles, cuda_mma.fewer_warps(warps, units))


def matmul(x: torch.Tensor, packed, row_tiles: int | None = None, warps: int | None = None, prefetch: int = 0) -> torch.Tensor:
    """x [..., in] (bfloat16 / float16, CUDA, 1 to 16 rows) @ W.T -> [..., out] in x's dtype, fp32 accumulation.
    `packed`: a weight `supported` takes or its view; `row_tiles`, `warps`: as the dense kernel's plan unless given;
    `prefetch`: units ahead whose weight bytes go into L2 first (0-8; 0, the measured form, unless given)."""
    view = packed if isinstance(packed, (SparseMmaWeight, SparseMmaValues)) else view_of(packed, x.dtype)
    values = isinstance(view, SparseMmaValues)
    if values and view.dtype != x.dtype:
        raise ValueError(f"a 2:4 values view for {view.dtype} activations got {x.dtype} ones")
    rows, cols = view.shape
    x2 = cuda_mma.activations(x, cols)
    batch = x2.shape[0]
    chosen = values_plan(view, batch, x.device) if values else cuda_mma.plan(view, batch, x.device)
    launch = cuda_mma.Launch(row_tiles or chosen.row_tiles, warps or chosen.warps, prefetch=prefetch)
    launch.check(view.tiles)
    y = torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    name = kernel_name(x.dtype, cuda_mma.n_tiles(batch), launch.row_tiles, launch.warps, values, launch.prefetch)
    kernel = _kernel(name, nvrtc.device_index(x.device))
    if values:
        args = [x2, x2.stride(0), batch, view.values, view.positions, y, rows, rows, cols // UNIT]
    else:
        args = [x2, x2.stride(0), batch, view.codes, view.positions, view.stats, y, rows, rows, cols // UNIT, view.stats.shape[1],
                (view.group_size // UNIT).bit_length() - 1]
    with nvrtc.on_device(x.device):
        kernel(grid=(view.tiles // launch.row_tiles, 1, 1), block=(32 * launch.warps, 1, 1), args=args)
    return y.reshape(*x.shape[:-1], rows)
