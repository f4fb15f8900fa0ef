"""Tensor-core GEMM for bitmap (unstructured sparse) weights through shared memory, fast at batch 1 to 16: each warp
writes a unit's kept values at their places in a zeroed 16 x 128 tile (mma_scatter_layout.py: a value and a one-byte
place each, 8 to a lane's load), loads the mma A fragments from it with ldmatrix and multiplies them by the
activations' B fragments (the group-quant kernel's activation loads, block layout and sum of the warps' partial sums:
cuda_mma_source.py), then zeroes the tile again.

A lane spends about 4 instructions a kept weight (a place byte, an address, a store; odd halves a shift) and 3 a
k-tile of 256 slots (ldmatrix, mma, zeroing), against the register-decode bitmap kernel's (cuda_mma_bitmap.py) 7 a
slot, kept or not, which bound it to 0.75-0.86x dense bf16 on an H200. It reads about 3 bytes a kept weight against
that kernel's 2 and a bit a slot. Units are software-pipelined: the next unit's chunks and activations are loaded
while this one is written and multiplied; a warp's unit descriptors are loaded 32 at a time, one a lane, and
broadcast by shuffles.

Measured on an H200 at 70% sparsity: 0.96-1.04x dense bf16 at batch 1, 0.67-0.75x at 16, faster than the register
kernel on every shape and batch measured, so the dispatcher runs it at batch 1-16 (docs/kernels-gpu.md). Its reads
(about 0.94 bytes a weight) would allow 2.1x; what holds it back is not profiled yet. Built since and not yet run on a
GPU: more than 16 rows (ALL_BATCHES) and the L2 prefetch (PREFETCH).
"""

from __future__ import annotations

import functools

import torch

from compress.formats import bitmap
from compress.kernels import cuda_mma, nvrtc
from compress.kernels.cuda_mma_source import SOURCE
from compress.kernels.mma_scatter_layout import UNIT, ScatterMmaWeight, pack, shape_ok

SLICE = 64  # activation rows a launch
ALL_BATCHES = False  # whether `supported` (the dispatcher) takes more than 16 rows: not until they run on a GPU
PREFETCH = 0  # units ahead whose chunks are prefetched into L2 (0: none, the measured form)
ROUNDS = (1, 2, 3, 4)  # chunks a lane keeps in registers a unit (4 lanes a k-tile); more are loaded when written

SCATTER_SOURCE = SOURCE + r"""
__device__ __forceinline__ uint2 load_stream_u2(const uint2* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&a)[4], unsigned address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(address) : "memory");
}

// A unit's descriptor: its first chunk, its chunk count, the chunks before each k-tile (bytes 0-7 of low, high)
struct UnitMeta { int first, count; unsigned low, high; };

__device__ __forceinline__ UnitMeta broadcast_meta(const int4& mine, int from) {
  return {__shfl_sync(0xffffffffu, mine.x, from), __shfl_sync(0xffffffffu, mine.y, from),
          (unsigned)__shfl_sync(0xffffffffu, mine.z, from), (unsigned)__shfl_sync(0xffffffffu, mine.w, from)};
}

// Lane 4 k + i writes k-tile k: its chunks are [from, to) of the unit's, from = b_k + i, every 4th
struct LaneChunks { int from, to; };

__device__ __forceinline__ LaneChunks lane_chunks(const UnitMeta& m, int lane) {
  const int k = lane >> 2;
  const int from = (int)(prmt(m.low, m.high, (unsigned)k) & 0xFFu);
  const int to = k == 7 ? m.count : (int)(prmt(m.low, m.high, (unsigned)k + 1u) & 0xFFu);
  return {m.first + from + (lane & 3), m.first + to};
}

template <int R> struct Chunks { uint4 v[R]; uint2 p[R]; };

// this lane's first R chunks
template <int R>
__device__ __forceinline__ void load_chunks(Chunks<R>& ch, const LaneChunks& lc, const uint4* __restrict__ values,
                                            const uint2* __restrict__ places) {
#pragma unroll
  for (int r = 0; r < R; r++) {
    if (lc.from + 4 * r < lc.to) {
      ch.v[r] = load_stream(values + lc.from + 4 * r);
      ch.p[r] = load_stream_u2(places + lc.from + 4 * r);
    }
  }
}

// one chunk's 8 values at their places of the lane's k-tile (`base`: its byte address in shared memory)
__device__ __forceinline__ void write_chunk(unsigned base, const uint4& v, const uint2& p) {
  const unsigned words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 8; i++) {
    const unsigned place = prmt(i < 4 ? p.x : p.y, 0u, 0x4440u + (i % 4));  // byte i, zero-extended
    const unsigned value = words[i / 2] >> (16 * (i % 2));
    asm volatile("st.shared.u16 [%0], %1;" ::"r"(base + place * 2), "h"((unsigned short)value) : "memory");
  }
}

// k-tile k's 256 slots start at byte k * KTILE_BYTES of a warp's tile: 16 bytes past 512 so the lanes of different
// k-tiles, whose places run alike, fall in different banks
constexpr int KTILE_BYTES = 528;

template <bool BF16, int NB, int R>
__device__ __forceinline__ void unit_dot_scatter(float (&acc)[1][NB][4], const Chunks<R>& ch, const LaneChunks& lc,
    const uint4 (&xv)[x_tiles<NB>()][4], const unsigned short* __restrict__ x_unit, int ldx, int B, unsigned tile,
    const uint4* __restrict__ values, const uint2* __restrict__ places, int lane) {
  const unsigned mine = tile + (lane >> 2) * KTILE_BYTES;
#pragma unroll
  for (int r = 0; r < R; r++)
    if (lc.from + 4 * r < lc.to) write_chunk(mine, ch.v[r], ch.p[r]);
  for (int c = lc.from + 4 * R; c < lc.to; c += 4)  // a dense k-tile: its chunks past the registers, loaded here
    write_chunk(mine, load_stream(values + c), load_stream_u2(places + c));
  __syncwarp();
#pragma unroll
  for (int j = 0; j < 8; j++) {
    unsigned a[4];
    ldmatrix_x4(a, tile + j * KTILE_BYTES + lane * 16);
#pragma unroll
    for (int nb = 0; nb < NB; nb++) {
      unsigned b0, b1;
      if constexpr (NB <= 2) b_in_registers<NB>(xv, nb, j, b0, b1);
      else b_in_memory(x_unit, ldx, B, lane, nb, j, b0, b1);
      mma<BF16>(acc[0][nb], a, b0, b1);
    }
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < 8; j++) asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(tile + j * KTILE_BYTES + lane * 16), "r"(0u) : "memory");
  __syncwarp();
}

// unit u's first R chunks of this lane into L2 (PF: how many units ahead of the one being multiplied; 0: none)
template <int R>
__device__ __forceinline__ void prefetch_chunks(const LaneChunks& lc, const uint4* __restrict__ values, const uint2* __restrict__ places) {
#pragma unroll
  for (int r = 0; r < R; r++) {
    if (lc.from + 4 * r < lc.to) {
      asm volatile("prefetch.global.L2 [%0];" ::"l"(values + lc.from + 4 * r));
      asm volatile("prefetch.global.L2 [%0];" ::"l"(places + lc.from + 4 * r));
    }
  }
}

template <bool BF16, int NB, int W, int R, int PF>
__device__ __forceinline__ void scatter_mma(const unsigned short* __restrict__ x, int ldx, int B, const int4* __restrict__ meta,
    const uint4* __restrict__ values, const uint2* __restrict__ places, unsigned short* __restrict__ y, int ldy, int N, int U) {
  __shared__ __align__(16) unsigned char tiles[W][8 * KTILE_BYTES];
  __shared__ float part[W][NB * 128];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tile0 = blockIdx.x;
  int u0, u1;
  warp_units<W, false>(U, warp, u0, u1);
  const unsigned tile = (unsigned)__cvta_generic_to_shared(tiles[warp]);
#pragma unroll
  for (int j = 0; j < 8; j++) asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};" ::"r"(tile + j * KTILE_BYTES + lane * 16), "r"(0u) : "memory");
  __syncwarp();
  float acc[1][NB][4];
  zero(acc);
  const int4* unit_meta = meta + (size_t)tile0 * U;
  int base = u0;  // lane i holds unit base + i's descriptor
  int4 metas = u0 + lane < u1 ? unit_meta[u0 + lane] : make_int4(0, 0, 0, 0);
  auto chunks_of = [&](int u) {
    if (u - base >= 32) {
      base += 32;
      metas = base + lane < u1 ? unit_meta[base + lane] : make_int4(0, 0, 0, 0);
    }
    return lane_chunks(broadcast_meta(metas, u - base), lane);
  };
  auto prefetch_unit = [&](int u) {  // where its descriptor is in the lanes' window already (a warp-uniform test)
    if (PF > 0 && u < u1 && u - base < 32) prefetch_chunks<R>(lane_chunks(broadcast_meta(metas, u - base), lane), values, places);
  };
  Chunks<R> c0, c1;  // ping-pong: each unit's chunks (and at batch <= 16 its activations) loaded one unit ahead
  constexpr int XT = x_tiles<NB>();
  uint4 x0[XT][4], x1[XT][4];
  LaneChunks l0, l1;
  const unsigned short* x_lane = x + (lane & 3) * 32;
  if (u0 < u1) {
    l0 = chunks_of(u0);
    load_chunks<R>(c0, l0, values, places);
    if (NB <= 2) load_x<XT>(x0, x, ldx, B, u0, lane);
  }
  for (int u = u0; u < u1; u += 2) {
    if (u + 1 < u1) {
      l1 = chunks_of(u + 1);
      load_chunks<R>(c1, l1, values, places);
      prefetch_unit(u + PF);
      if (NB <= 2) load_x<XT>(x1, x, ldx, B, u + 1, lane);
    }
    unit_dot_scatter<BF16, NB, R>(acc, c0, l0, x0, x_lane + u * 128, ldx, B, tile, values, places, lane);
    if (u + 1 >= u1) break;
    if (u + 2 < u1) {
      l0 = chunks_of(u + 2);
      load_chunks<R>(c0, l0, values, places);
      prefetch_unit(u + 1 + PF);
      if (NB <= 2) load_x<XT>(x0, x, ldx, B, u + 2, lane);
    }
    unit_dot_scatter<BF16, NB, R>(acc, c1, l1, x1, x_lane + (u + 1) * 128, ldx, B, tile, values, places, lane);
  }
  store_sums<BF16, NB, 1, W>(acc, part, y, ldy, N, B, tile0);
}
"""


def kernel_name(dtype: torch.dtype, n_tiles: int, warps: int, rounds: int, prefetch: int = 0) -> str:
    return f"scmma_{cuda_mma.DTYPES[dtype]}_n{n_tiles}_w{warps}_c{rounds}_p{prefetch}"


def entry_source(name: str) -> str:
    _, dtype, n_tiles, warps, rounds, prefetch = name.split("_")
    template = f"{'true' if dtype == 'bf16' else 'false'}, {n_tiles[1:]}, {warps[1:]}, {rounds[1:]}, {prefetch[1:]}"
    params = [*cuda_mma.ACTIVATIONS, "const int4* meta", "const uint4* values", "const uint2* places", *cuda_mma.OUTPUT]
    return SCATTER_SOURCE + nvrtc.entry_point(name, 32 * int(warps[1:]), params, f"scatter_mma<{template}>")


@functools.cache
def _kernel(name: str, device: int):
    return nvrtc.compile_kernel(entry_source(name), name, device)


def supported(x: torch.Tensor, packed) -> bool:
    """CUDA bf16/fp16 activations with a bitmap weight `shape_ok` takes, on a GPU where the kernels compile: 1 to 16 rows,
    any number with ALL_BATCHES (`matmul` takes any number either way)."""
    return shape_ok(packed) and cuda_mma.call_ok(x, packed.shape[1], None if ALL_BATCHES else cuda_mma.MAX_BATCH)


def view_of(packed: bitmap.BitmapWeight, dtype: torch.dtype) -> ScatterMmaWeight:
    """The cached scatter form for `dtype` activations (built on the first call, e.g. before a CUDA-graph capture)."""
    from compress.kernels import views

    return views.cached(packed.bitmask, f"mma-scatter-{cuda_mma.DTYPES[dtype]}", lambda: pack(packed, dtype))


def plan(view: ScatterMmaWeight, batch: int, device: torch.device) -> tuple[int, int]:
    """(warps a block, chunk rounds kept in registers): a block a row tile; 8 warps where the blocks number under 6 a
    multiprocessor's 16 warps (batch <= 8; 8 at 9-16) as the group-quant plan counts them, else 4 (the faster of 4 and 8
    on the H200 on 14336x4096 and 4096x14336 at batch 1, within 10% at 16: docs/kernels-gpu.md), fewer where a warp
    would get under 2 units; 4 above 16 rows (untimed there); rounds to hold 95% of the k-tiles' chunks (a denser
    k-tile's lanes load the rest when they write them)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    units = view.shape[1] // UNIT
    warps = 8 if batch <= 16 and sms * (16 if batch <= 8 else 8) / view.tiles >= 6 else 4
    return cuda_mma.fewer_warps(warps, units), min(ROUNDS[-1], view.rounds)


def matmul(x: torch.Tensor, packed, warps: int | None = None, rounds: int | None = None, prefetch: int = PREFETCH) -> torch.Tensor:
    """x [..., in] (bfloat16 / float16, CUDA) @ W.T -> [..., out] in x's dtype, fp32 accumulation: a launch a
    SLICE rows (each writes the weight's tiles again; the activations of up to 16 rows stay in registers a unit, more
    are loaded a k-tile at a time). `packed`: a bitmap weight (`supported`) or its ScatterMmaWeight for x's dtype;
    `warps`, `rounds`: `plan`'s unless given (at most 4 warps above 16 rows: the warps' sums share memory); `prefetch`:
    0, or how many units ahead each lane asks L2 for its chunks (2-4)."""
    view = packed if isinstance(packed, ScatterMmaWeight) else view_of(packed, x.dtype)
    rows, cols = view.shape
    if view.dtype != x.dtype:
        raise ValueError(f"a scatter form for {view.dtype} activations got {x.dtype}")
    x2 = x.reshape(-1, cols)
    y = torch.empty(x2.shape[0], rows, dtype=x.dtype, device=x.device)
    for start in range(0, x2.shape[0], SLICE):
        _launch(cuda_mma.activations(x2[start : start + SLICE], cols, SLICE), view, y[start : start + SLICE], warps, rounds, prefetch)
    return y.reshape(*x.shape[:-1], rows)


def _launch(x2: torch.Tensor, view: ScatterMmaWeight, y: torch.Tensor, warps: int | None, rounds: int | None, prefetch: int) -> None:
    rows, cols = view.shape
    batch = x2.shape[0]
    n_tiles = cuda_mma.n_tiles(batch)
    planned = plan(view, batch, x2.device)
    warps, rounds = warps or planned[0], rounds or planned[1]
    if warps not in (1, 2, 4, 8) or rounds not in ROUNDS or (n_tiles > 2 and warps > 4) or prefetch not in (0, 2, 3, 4):
        raise ValueError(f"warps must be 1, 2, 4 or 8 (at most 4 above 16 rows), rounds one of {ROUNDS} and prefetch 0, 2, 3 or 4, "
                         f"got {warps}, {rounds}, {prefetch}")
    kernel = _kernel(kernel_name(x2.dtype, n_tiles, warps, rounds, prefetch), nvrtc.device_index(x2.device))
    values = view.values if view.values.numel() else view.values.new_zeros(1, 8)  # a valid pointer, never read
    places = view.places if view.places.numel() else view.places.new_zeros(1, 8)
    with nvrtc.on_device(x2.device):
        kernel(grid=(view.tiles, 1, 1), block=(32 * warps, 1, 1),
               args=[x2, x2.stride(0), batch, view.meta, values, places, y, y.stride(0), rows, cols // UNIT])
