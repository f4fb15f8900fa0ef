"""CUDA kernel for QMoE's dictionary-coded ternary weights at batch 1 (compress.formats.ternary_dict), compiled at
first use through NVRTC (torch.cuda._compile_kernel: no nvcc needed), with the activations in shared memory.

Why not Triton alone: decoding is a gather per code (the codeword's entry in a 65536-word dictionary) and one per
nonzero weight (x at its column). From global memory each gathered lane costs an L1 wavefront; the Triton kernel
(triton_ternary.py) is bound there (Nsight Compute on the H200: L1 75% busy, 14336x4096 in 26 us). Triton has no
shared memory a program can keep, and its gather stores the source to shared memory at every call. Here x is
copied into shared memory once a block (about one wave of blocks, each warp walking rows), so the x gathers are bank
accesses, and each codeword is one 4-byte entry (256 KiB for 65536 codewords, mostly L1/L2 hits).
The whole dictionary in shared memory too (3 bytes a codeword, 192 KiB) was measured: copying it into every block
cost more than it saved (docs/qmoe.md).

Layout of the work: a warp takes one row at a time, 32 * C codes a step. Lane l decodes codes C*l .. C*l + C - 1 of
the step one after another (their runs placed by a running sum inside the lane); one warp prefix sum of the lanes'
run totals places the lanes. x at each code's at most 3 nonzero weights goes to the lane's min or max sum; a warp
reduction gives y[r] = min_r * sum_min + max_r * sum_max (fp32). The next step's codes (this row's, or the next
row's first) are loaded before this step's work. Codewords of more than 3 nonzero weights (rare, except in less
sparse experts' dictionaries) are read whole from the int32 kernel table. Batches above 1, float32 activations and
widths whose x does not fit in shared memory go to the Triton kernel (`supported`).

Dictionary entry (`packed_entries`): bits 0-14 three 5-bit column offsets in the run (31 = no weight), bits 15-17
whether each of those weights is the row's max, bits 18-21 the run's length in pairs, bit 22 set when the codeword
holds more nonzero weights than 3 (its masks are then read from the kernel table).
"""

from __future__ import annotations

import functools
import warnings

import torch

from compress.formats import ternary_dict
from compress.kernels import nvrtc, views
from compress.kernels.cuda_source import CONVERSIONS

MAX_NONZEROS = 3  # nonzero weights an entry holds; a codeword with more is flagged (OVERFLOW)
OVERFLOW = 1 << 22
EMPTY_SLOT = 31
X_PAD = 48  # as in SOURCE
CODES_PER_LANE = (1, 2, 4, 8)  # the kernels SOURCE instantiates
MIN_CODES_PER_ROW = 48  # shorter rows run faster on the Triton kernel (benchmarks/qmoe_kernels.py on the H200)
DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}

SOURCE = CONVERSIONS + r"""
// Copy `words` 16-byte words with 8 loads in flight a thread (one at a time pays the memory latency each time).
__device__ __forceinline__ void copy_words(uint4* __restrict__ dst, const uint4* __restrict__ src, int words) {
  for (int i0 = threadIdx.x; i0 < words; i0 += 8 * blockDim.x) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; u++) { const int i = i0 + u * blockDim.x; if (i < words) v[u] = src[i]; }
#pragma unroll
    for (int u = 0; u < 8; u++) { const int i = i0 + u * blockDim.x; if (i < words) dst[i] = v[u]; }
  }
}

#define X_PAD 48  // halves after x: a row's last code may cover one padding column, an empty slot reads up to 31 past a run

// A warp takes a row at a time, 32 * C codes a step: lane l decodes codes C*l .. C*l + C - 1 of the step one after
// another (their runs placed by a running sum inside the lane), and one warp prefix sum of the lanes' run totals
// places the lanes. The next step's codes (this row's or the next row's first) are loaded before this step's work.
template <bool BF16, int C>
__device__ __forceinline__ void ternary_rows(const unsigned short* __restrict__ x, const unsigned short* __restrict__ codes,
    const int* __restrict__ offsets, const unsigned short* __restrict__ minmax, const unsigned* __restrict__ entries,
    const int* __restrict__ masks, unsigned short* __restrict__ y, int N, int K) {
  extern __shared__ __align__(16) unsigned short xs[];  // x, then X_PAD zeros
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
  copy_words((uint4*)xs, (const uint4*)x, K >> 3);  // x is 16-byte aligned (the caller checks)
  for (int i = (K & ~7) + tid; i < K + X_PAD; i += blockDim.x) xs[i] = i < K ? x[i] : (unsigned short)0;
  __syncthreads();
  const unsigned FULL = 0xffffffffu;
  const int stride = gridDim.x * warps;
  int row = blockIdx.x * warps + warp;
  int start = 0, count = 0;
  if (row < N) { start = offsets[row]; count = offsets[row + 1] - start; }
  unsigned cur[C];
#pragma unroll
  for (int c = 0; c < C; c++) cur[c] = C * lane + c < count ? codes[start + C * lane + c] : 0u;
  while (row < N) {
    const int next_row = row + stride;
    int next_start = 0, next_count = 0;
    if (next_row < N) { next_start = offsets[next_row]; next_count = offsets[next_row + 1] - next_start; }
    const unsigned lo_hi = lane == 0 ? *(const unsigned*)(minmax + 2 * row) : 0u;  // loaded now, used at the row's end
    float sum_min = 0.f, sum_max = 0.f;
    int base = 0;
    for (int j = 0;; j += 32 * C) {
      int following = j + 32 * C, from = start, upto = count;
      if (following >= count) { following = 0; from = next_start; upto = next_count; }
      unsigned nxt[C], entry[C];
      int before[C];
#pragma unroll
      for (int c = 0; c < C; c++) nxt[c] = following + C * lane + c < upto ? codes[from + following + C * lane + c] : 0u;
      int lane_total = 0;
#pragma unroll
      for (int c = 0; c < C; c++) {
        const unsigned code = cur[c];
        entry[c] = 0x7fffu;  // past the row's end: no weights, length 0
        if (j + C * lane + c < count) entry[c] = entries[code];
        before[c] = lane_total;
        lane_total += ((entry[c] >> 18) & 15) * 2;
      }
      int inclusive = lane_total;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int t = __shfl_up_sync(FULL, inclusive, d);
        if (lane >= d) inclusive += t;
      }
      const int lane_first = base + inclusive - lane_total;
      base += __shfl_sync(FULL, inclusive, 31);
      unsigned overflow = 0;
#pragma unroll
      for (int c = 0; c < C; c++) {
        const int first = lane_first + before[c];
#pragma unroll
        for (int s = 0; s < 3; s++) {  // branch-free: an empty slot (31) reads x inside the padding and adds 0
          const unsigned offset = (entry[c] >> (5 * s)) & 31;
          const unsigned short raw = xs[first + offset];
          const float v = offset != 31 ? (BF16 ? to_float_bf16(raw) : to_float_f16(raw)) : 0.f;
          const bool at_max = (entry[c] >> (15 + s)) & 1;
          sum_max += at_max ? v : 0.f;
          sum_min += at_max ? 0.f : v;
        }
        overflow |= entry[c] & (1u << 22);
      }
      if (__any_sync(FULL, overflow)) {  // codewords of more than 3 nonzero weights: their masks from the kernel table
#pragma unroll
        for (int c = 0; c < C; c++) {
          if (!(entry[c] & (1u << 22))) continue;
          const unsigned at_max = (unsigned)masks[3 * cur[c] + 1];
          for (unsigned m = (unsigned)masks[3 * cur[c]] | at_max; m; m &= m - 1) {
            const int bit = __ffs(m) - 1;
            const float v = BF16 ? to_float_bf16(xs[lane_first + before[c] + bit]) : to_float_f16(xs[lane_first + before[c] + bit]);
            if ((at_max >> bit) & 1) sum_max += v; else sum_min += v;
          }
        }
      }
#pragma unroll
      for (int c = 0; c < C; c++) cur[c] = nxt[c];
      if (following == 0) break;  // the next row's codes are in cur
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
      sum_min += __shfl_xor_sync(FULL, sum_min, d);
      sum_max += __shfl_xor_sync(FULL, sum_max, d);
    }
    if (lane == 0) {
      const float out = to_float_f16((unsigned short)(lo_hi & 0xffffu)) * sum_min + to_float_f16((unsigned short)(lo_hi >> 16)) * sum_max;
      y[row] = BF16 ? from_float_bf16(out) : from_float_f16(out);
    }
    row = next_row; start = next_start; count = next_count;
  }
}

#define TERNARY_KERNEL(NAME, IS_BF16, CODES) \
extern "C" __global__ void __launch_bounds__(1024) NAME(const unsigned short* x, const unsigned short* codes, const int* offsets, \
    const unsigned short* minmax, const unsigned* entries, const int* masks, unsigned short* y, int N, int K) { \
  ternary_rows<IS_BF16, CODES>(x, codes, offsets, minmax, entries, masks, y, N, K); }
#define TERNARY_KERNELS(CODES) TERNARY_KERNEL(ternary_bf16_##CODES, true, CODES) TERNARY_KERNEL(ternary_f16_##CODES, false, CODES)
TERNARY_KERNELS(1)
TERNARY_KERNELS(2)
TERNARY_KERNELS(4)
TERNARY_KERNELS(8)
"""


def packed_entries(kernel_table: torch.Tensor) -> torch.Tensor:
    """Each codeword of the dictionary (int32 [codewords, 3] = min_mask, max_mask, length in weights) as one 23-bit
    entry (int64 [codewords]); a codeword of more than MAX_NONZEROS nonzero weights gets OVERFLOW and no slots."""
    order, is_max, count = ternary_dict.codeword_nonzeros(kernel_table)
    overflow = count > MAX_NONZEROS
    present = (torch.arange(MAX_NONZEROS) < count[:, None]) & ~overflow[:, None]
    offsets = torch.where(present, order[:, :MAX_NONZEROS], EMPTY_SLOT)
    maxes = is_max[:, :MAX_NONZEROS] & present
    return (offsets[:, 0] | offsets[:, 1] << 5 | offsets[:, 2] << 10 | maxes[:, 0] << 15 | maxes[:, 1] << 16 | maxes[:, 2] << 17
            | (kernel_table[:, 2].to(torch.int64) // 2) << 18 | overflow.to(torch.int64) * OVERFLOW)


def unpack_entries(entry: torch.Tensor) -> torch.Tensor:
    """packed_entries' inverse, for tests: int32 [codewords, 4] (min_mask, max_mask, length, overflow); an overflow
    codeword's masks are 0 (the kernel reads them from the kernel table)."""
    entry = entry.to(torch.int64)
    min_mask, max_mask = torch.zeros_like(entry), torch.zeros_like(entry)
    for slot in range(MAX_NONZEROS):
        offset = (entry >> (5 * slot)) & 31
        bit = torch.where(offset == EMPTY_SLOT, 0, 1 << offset.clamp(max=30))
        is_max = (entry >> (15 + slot)) & 1
        max_mask |= bit * is_max
        min_mask |= bit * (1 - is_max)
    return torch.stack([min_mask, max_mask, ((entry >> 18) & 15) * 2, (entry >> 22) & 1], 1).to(torch.int32)


@functools.cache
def _kernel(name: str, device: int):
    return nvrtc.compile_kernel(SOURCE, name, device)


@functools.cache
def available() -> bool:
    """CUDA present and the kernel compiles (NVRTC through torch); else the Triton kernel takes every call."""
    if not (torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")):
        return False
    try:
        _kernel("ternary_bf16_2", torch.cuda.current_device())
    except Exception as error:  # e.g. no CUDA headers for NVRTC: the Triton kernel still works
        warnings.warn(f"QMoE CUDA kernel unavailable, using the Triton kernel: {type(error).__name__}: {str(error)[:300]}", stacklevel=2)
        return False
    return True


def device_tables(packed: ternary_dict.TernaryDictWeight, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed_entries as int32, the int32 kernel table) of the weight's dictionary on `device`, built once per
    dictionary and device (views.cached, keyed by the dictionary's kernel table); the kernel reads the second only
    for codewords of more than MAX_NONZEROS weights."""
    host = ternary_dict.dictionary_of(packed).kernel_table
    return views.cached(host, f"cuda_ternary_entries:{device}", lambda: (packed_entries(host.cpu()).to(device, torch.int32),
                                                                          host.to(device, torch.int32).contiguous()))


def _x_bytes(cols: int) -> int:
    return -(-2 * (cols + X_PAD) // 16) * 16


def supported(x: torch.Tensor, packed: ternary_dict.TernaryDictWeight) -> bool:
    """Batch 1, bf16/fp16 activations on CUDA, x fits in shared memory."""
    cols = packed.shape[1]
    if not available() or x.device.type != "cuda" or x.dtype not in DTYPES or x.numel() != cols:
        return False
    limit = int(getattr(torch.cuda.get_device_properties(x.device), "shared_memory_per_block_optin", 48 * 1024))
    return _x_bytes(cols) <= limit


def preferred(x: torch.Tensor, packed: ternary_dict.TernaryDictWeight) -> bool:
    """`supported`, and rows long enough for this kernel to beat the Triton one (MIN_CODES_PER_ROW)."""
    return supported(x, packed) and packed.codes.numel() >= MIN_CODES_PER_ROW * packed.shape[0]


def ternary_matmul(x: torch.Tensor, packed: ternary_dict.TernaryDictWeight, warps: int | None = None,
                   per_lane: int = 2) -> torch.Tensor:
    """x [..., in] with one row of activations (bfloat16 / float16, CUDA) @ W.T -> [..., out] in x's dtype, fp32
    accumulation. `warps` a block (None: 8 up to 4096 columns, else 16); `per_lane`: codes a lane decodes a step (2
    was the fastest on every expert shape measured). Callers check `supported` first."""
    rows, cols = packed.shape
    device = x.device
    if not supported(x, packed):
        raise ValueError("this weight or input is not for the CUDA ternary kernel (see cuda_ternary.supported)")
    if per_lane not in CODES_PER_LANE:
        raise ValueError(f"per_lane must be one of {CODES_PER_LANE}, got {per_lane}")
    warps = (8 if cols <= 4096 else 16) if warps is None else warps
    entries, masks = device_tables(packed, device)
    codes, offsets, minmax = (t.to(device).contiguous() for t in (packed.codes, packed.row_offsets, packed.minmax))
    x1 = x.reshape(cols).contiguous()
    if x1.data_ptr() % 16:  # the kernel copies x in 16-byte words
        x1 = x1.clone()
    y = torch.empty(rows, dtype=x.dtype, device=device)
    smem = _x_bytes(cols)
    kernel = _kernel(f"ternary_{DTYPES[x.dtype]}_{per_lane}", nvrtc.device_index(device))
    # about one wave of blocks (up to 64 warps a multiprocessor; 40 fit at 44 registers a thread, and an exact one-wave
    # grid timed no faster), each warp walking rows until they are done: x is copied once a block
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks = min(-(-rows // warps), sms * max(1, 64 // warps))
    if rows:
        with nvrtc.on_device(device):
            if smem >= 48 * 1024 and kernel._max_shared_mem_bytes < smem:
                kernel.set_shared_memory_config(smem)
            kernel(grid=(blocks, 1, 1), block=(32 * warps, 1, 1), shared_mem=smem, args=[x1, codes, offsets, minmax, entries, masks, y, rows, cols])
    return y.reshape(*x.shape[:-1], rows)
