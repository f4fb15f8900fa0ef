"""Tensor-core GEMM for bitmap (unstructured sparse) weights at batch 1 to 16: "load as sparse, compute as dense".

Each warp fills the A fragments of `mma.sync.m16n8k16` from the re-packed form (mma_bitmap_layout.py): a lane's keep
bits of a 128-column unit are one 8-byte load; per k-tile it takes its kept values one after the other from where
its lane's run starts (a 16-bit load only where a bit is set), zeros elsewhere, and the tensor core multiplies by the
activations' B fragment (the group-quant kernel's activation loads, its block layout and its sum of the warps' partial
sums: cuda_mma_source.py). Where each lane's run starts is one popcount a lane a k-tile and a scan across the warp,
four k-tiles at a time (byte-wide sums in one word).

The value loads of a unit depend on its keep bits, so the next unit's values are prefetched (PF 1: into L1, 2: into
L2, 0: none) while this unit is multiplied; the keep bits, run starts and activations come one unit ahead in
registers. A block owns RT row tiles and W warps splitting the columns (`plan`).

Measured on an H200 at 70% sparsity: 0.75-0.86x dense bf16 at batch 1, 6-23x the Triton bitmap kernel; bound by
integer instructions (about 7 a weight slot, kept or not), not bytes (docs/kernels-gpu.md). PAIRS decodes an A
register (two weights) at a time in fewer instructions: 3-11% faster at batch 1 on an H100, not the default.
Superseded by the shared-memory scatter kernel (cuda_mma_scatter.py: faster on every shape and batch measured), which
the dispatcher runs instead; this one stays for the probe's comparison (benchmarks/cuda_mma_probe.py --bitmap).
"""

from __future__ import annotations

import functools

import torch

from compress.formats import bitmap
from compress.kernels import cuda_mma, nvrtc
from compress.kernels.cuda_mma_source import SOURCE
from compress.kernels.mma_bitmap_layout import UNIT, BitmapMmaWeight, pack, shape_ok

PREFETCH = 1  # the default: the next unit's values into L1
PAIRS = False  # the default: one weight at a time (the measured form)

BITMAP_SOURCE = SOURCE + r"""
__device__ __forceinline__ uint2 load_stream2(const uint2* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// the number of set bits of each byte of v, in that byte
__device__ __forceinline__ unsigned byte_popcounts(unsigned v) {
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  return (v + (v >> 4)) & 0x0F0F0F0Fu;
}

// for each byte: the sum of that byte over lanes 0 .. lane - 1 (at most 31 x 8 = 248: no carry into the next byte)
__device__ __forceinline__ unsigned exclusive_byte_scan(unsigned v, int lane) {
  unsigned s = __shfl_up_sync(0xffffffffu, v, 1);
  if (lane == 0) s = 0u;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const unsigned t = __shfl_up_sync(0xffffffffu, s, d);
    if (lane >= d) s += t;
  }
  return s;
}

// one unit of the RT row tiles: the lane's keep bits (byte j: k-tile j), the k-tiles' first value indices
template <int RT>
__device__ __forceinline__ void load_bits(uint2 (&m)[RT], int4 (&st)[RT][2], const uint2* __restrict__ masks, const int4* __restrict__ starts,
                                          int tile0, int u, int U, int lane) {
#pragma unroll
  for (int r = 0; r < RT; r++) {
    const size_t tu = (size_t)(tile0 + r) * U + u;
    m[r] = load_stream2(masks + tu * 32 + lane);
    st[r][0] = starts[tu * 2];
    st[r][1] = starts[tu * 2 + 1];
  }
}

template <int PF> __device__ __forceinline__ void prefetch_values(const unsigned short* p) {
  if constexpr (PF == 1) asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
  if constexpr (PF == 2) asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// the next unit's values (at most 2048, 4 KB: a 128-byte line a lane), from its first k-tile's start to its last's + 256
// (and not past the last value)
template <int PF, int RT>
__device__ __forceinline__ void prefetch_unit(const int4 (&st)[RT][2], const unsigned short* __restrict__ values, int total, int lane) {
  if constexpr (PF != 0) {
#pragma unroll
    for (int r = 0; r < RT; r++) {
      const int at = st[r][0].x + lane * 64;
      if (at < min(st[r][1].w + 256, total)) prefetch_values<PF>(values + at);
    }
  }
}

// A register from two weights' keep bits f (bit 0: the low half) and the lane's next two run values at p (both loaded,
// the second at an immediate offset): a byte permute whose selector a table picks by f, then p moves past what was
// taken. About 5.5 instructions a weight slot against 7 one at a time.
__device__ __forceinline__ unsigned take_pair(const unsigned short*& p, unsigned f) {
  const unsigned v0 = __ldg(p), v1 = __ldg(p + 1);
  // selectors by f: 0 -> zero, 1 -> (v0, 0), 2 -> (0, v0), 3 -> (v0, v1) (byte 2 of v0 is zero); the table's bytes
  // have no sign-replicate bit, so only the low 16 bits of `select` matter
  const unsigned select = prmt(0x22102222u, 0x54101022u, 0x10u + 0x22u * f);
  p += (f + 1u) >> 1;
  return prmt(v0, v1, select);
}

template <bool BF16, int NB, int RT, bool PAIRS>
__device__ __forceinline__ void unit_dot_bitmap(float (&acc)[RT][NB][4], const uint2 (&m)[RT], const int4 (&st)[RT][2],
                                                const uint4 (&xv)[NB][4], const unsigned short* __restrict__ values, int lane) {
#pragma unroll
  for (int r = 0; r < RT; r++) {
    const unsigned before[2] = {exclusive_byte_scan(byte_popcounts(m[r].x), lane), exclusive_byte_scan(byte_popcounts(m[r].y), lane)};
    const int first[8] = {st[r][0].x, st[r][0].y, st[r][0].z, st[r][0].w, st[r][1].x, st[r][1].y, st[r][1].z, st[r][1].w};
#pragma unroll
    for (int j = 0; j < 8; j++) {  // the unit's 8 k-tiles of 16 columns
      const unsigned bits = ((j < 4 ? m[r].x : m[r].y) >> (8 * (j % 4))) & 0xFFu;
      const unsigned short* p = values + first[j] + (((j < 4 ? before[0] : before[1]) >> (8 * (j % 4))) & 0xFFu);
      unsigned a[4];
#pragma unroll
      for (int q = 0; q < 4; q++) {  // register q: elements 2q, 2q + 1
        if constexpr (PAIRS) {
          a[q] = take_pair(p, (bits >> (2 * q)) & 3u);
          continue;
        }
        unsigned short lo = 0, hi = 0;
        if (bits >> (2 * q) & 1u) lo = __ldg(p);
        p += bits >> (2 * q) & 1u;
        if (bits >> (2 * q + 1) & 1u) hi = __ldg(p);
        p += bits >> (2 * q + 1) & 1u;
        a[q] = (unsigned)lo | ((unsigned)hi << 16);
      }
#pragma unroll
      for (int nb = 0; nb < NB; nb++) {
        const uint4 xq = xv[nb][j / 2];
        mma<BF16>(acc[r][nb], a, j & 1 ? xq.z : xq.x, j & 1 ? xq.w : xq.y);
      }
    }
  }
}

template <bool BF16, int NB, int RT, int W, int PF, bool PAIRS>
__device__ __forceinline__ void bitmap_mma(const unsigned short* __restrict__ x, int ldx, int B, const uint2* __restrict__ masks,
    const int4* __restrict__ starts, const unsigned short* __restrict__ values, int total, unsigned short* __restrict__ y, int ldy, int N,
    int U) {
  __shared__ float part[W][RT * NB * 128];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tile0 = blockIdx.x * RT;
  int u0, u1;
  warp_units<W, false>(U, warp, u0, u1);
  float acc[RT][NB][4];
  zero(acc);
  uint2 m0[RT], m1[RT];  // ping-pong: each unit's bits, starts and activations loaded one unit ahead
  int4 st0[RT][2], st1[RT][2];
  uint4 x0[NB][4], x1[NB][4];
  if (u0 < u1) {
    load_bits<RT>(m0, st0, masks, starts, tile0, u0, U, lane);
    load_x<NB>(x0, x, ldx, B, u0, lane);
  }
  for (int u = u0; u < u1; u += 2) {
    if (u + 1 < u1) {
      load_bits<RT>(m1, st1, masks, starts, tile0, u + 1, U, lane);
      load_x<NB>(x1, x, ldx, B, u + 1, lane);
      prefetch_unit<PF, RT>(st1, values, total, lane);
    }
    unit_dot_bitmap<BF16, NB, RT, PAIRS>(acc, m0, st0, x0, values, lane);
    if (u + 1 >= u1) break;
    if (u + 2 < u1) {
      load_bits<RT>(m0, st0, masks, starts, tile0, u + 2, U, lane);
      load_x<NB>(x0, x, ldx, B, u + 2, lane);
      prefetch_unit<PF, RT>(st0, values, total, lane);
    }
    unit_dot_bitmap<BF16, NB, RT, PAIRS>(acc, m1, st1, x1, values, lane);
  }
  store_sums<BF16, NB, RT, W>(acc, part, y, ldy, N, B, tile0);
}
"""


def kernel_name(dtype: torch.dtype, n_tiles: int, row_tiles: int, warps: int, prefetch: int = PREFETCH, pairs: bool = PAIRS) -> str:
    return f"bmma_{cuda_mma.DTYPES[dtype]}_n{n_tiles}_r{row_tiles}_w{warps}_p{prefetch}_d{int(pairs)}"


def entry_source(name: str) -> str:
    _, dtype, n_tiles, row_tiles, warps, prefetch, pairs = name.split("_")
    template = (f"{'true' if dtype == 'bf16' else 'false'}, {n_tiles[1:]}, {row_tiles[1:]}, {warps[1:]}, {prefetch[1:]}, "
                f"{'true' if pairs == 'd1' else 'false'}")
    params = [*cuda_mma.ACTIVATIONS, "const uint2* masks", "const int4* starts", "const unsigned short* values", "int total", *cuda_mma.OUTPUT]
    return BITMAP_SOURCE + nvrtc.entry_point(name, 32 * int(warps[1:]), params, f"bitmap_mma<{template}>")


@functools.cache
def _kernel(name: str, device: int):
    return nvrtc.compile_kernel(entry_source(name), name, device)


def supported(x: torch.Tensor, packed) -> bool:
    """A call cuda_mma.call_ok takes with a bitmap weight `shape_ok` takes."""
    return shape_ok(packed) and cuda_mma.call_ok(x, packed.shape[1])


def view_of(packed: bitmap.BitmapWeight, dtype: torch.dtype) -> BitmapMmaWeight:
    """The cached re-packed form for `dtype` activations (built on the first call, e.g. before a CUDA-graph capture)."""
    from compress.kernels import views

    return views.cached(packed.bitmask, f"mma-bitmap-{cuda_mma.DTYPES[dtype]}", lambda: pack(packed, dtype))


def plan(view: BitmapMmaWeight, batch: int, device: torch.device) -> cuda_mma.Launch:
    """The group-quant kernel's plan at batch 1-8; at 9-16 (two n-tiles, 176 registers at 2 row tiles) one row tile and
    8 warps a block, which was the fastest measured there on both large shapes (52.5 and 47.1 us against the plan's
    67.8 and 50.3 on 14336x4096 and 4096x14336: docs/kernels-gpu.md)."""
    if batch > 8 and view.shape[1] // UNIT >= 8:
        return cuda_mma.Launch(1, 8)
    return cuda_mma.plan(view, batch, device)


def matmul(x: torch.Tensor, packed, row_tiles: int | None = None, warps: int | None = None, prefetch: int = PREFETCH,
           pairs: bool = PAIRS) -> torch.Tensor:
    """x [..., in] (bfloat16 / float16, CUDA, 1 to 16 rows) @ W.T -> [..., out] in x's dtype, fp32 accumulation.
    `packed`: a bitmap weight (`supported`) or its BitmapMmaWeight for x's dtype; `row_tiles`, `warps`: as the
    group-quant kernel's plan unless given; `prefetch`: 0 none, 1 L1, 2 L2; `pairs`: decode two weights at a time."""
    view = packed if isinstance(packed, BitmapMmaWeight) else view_of(packed, x.dtype)
    rows, cols = view.shape
    x2 = cuda_mma.activations(x, cols)
    if view.dtype != x.dtype:
        raise ValueError(f"a bitmap form for {view.dtype} activations got {x.dtype}")
    batch = x2.shape[0]
    chosen = plan(view, batch, x.device)
    launch = cuda_mma.Launch(row_tiles or chosen.row_tiles, warps or chosen.warps)
    launch.check(view.tiles, cols // UNIT)
    if prefetch not in (0, 1, 2):
        raise ValueError(f"prefetch must be 0 (none), 1 (L1) or 2 (L2), got {prefetch}")
    y = torch.empty(batch, rows, dtype=x.dtype, device=x.device)
    kernel = _kernel(kernel_name(x.dtype, cuda_mma.n_tiles(batch), launch.row_tiles, launch.warps, prefetch, pairs), nvrtc.device_index(x.device))
    with nvrtc.on_device(x.device):
        kernel(grid=(view.tiles // launch.row_tiles, 1, 1), block=(32 * launch.warps, 1, 1),
               args=[x2, x2.stride(0), batch, view.masks, view.starts, view.values, view.values.numel(), y, rows, rows, cols // UNIT])
    return y.reshape(*x.shape[:-1], rows)
