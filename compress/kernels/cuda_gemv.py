"""A CUDA GEMV for group-quantized int2 / int4 / int8 weights at batch 1 (compress.formats.group_quant), compiled at
first use through NVRTC (torch.cuda._compile_kernel). Measured, not dispatched: on the H200 it is 5-35% slower than
the Triton split-K GEMV (triton_splitk.py) on int4, faster only for int2 on 4096x14336 (docs/kernels-gpu.md), and
the tensor-core kernel (cuda_mma.py) that modules now run at batch 1 is faster than both; benchmarks/cuda_gemv_probe.py
times it against the Triton GEMV.

The idea it tests: the Triton GEMV issues ~10 instructions a weight, most of them moving a word's fields between
threads. Here a thread owns whole 16-byte chunks (4 code words, one quantization group) and decodes them in place:
per weight one logic op (the field masked in place and OR-ed with the exponent of 2^(23 - a) is the float
2^(23 - a) + code), one add (minus 2^(23 - a) + zero: code - zero, exact) and one FMA. x sits in shared memory as
its own 16-bit values (fp32 there was measured 0-8% slower), a spare 16 bytes a chunk so a phase's 8 lanes hit 8 bank
groups.
A block copies x once; its warps walk row groups (one wave of blocks). A team of G warps takes R rows at a time, a
lane one chunk of each of the R rows a step (x read once for the R rows), the next step's chunks loaded before this
step's decode; one warp reduction (and one named barrier for G > 1) per row group.

Why it loses (Nsight Compute, int4 14336x4096, R 4, G 1): 128 registers a thread leave 16 warps a multiprocessor
(3.5 a scheduler), 44% of cycles have no eligible warp, a third of the stalls wait on shared memory; its loads alone
(GQ_READ_ONLY, no decode) reach 13.1 us (2.3 TB/s), the full kernel 20-21 us.
"""

from __future__ import annotations

import functools
import warnings

import torch

from compress.formats import group_quant
from compress.formats.words import codes_per_word
from compress.kernels import nvrtc
from compress.kernels.cuda_source import CONVERSIONS

DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}
BITS = (2, 4, 8)
ROWS = (1, 2, 4)  # rows a warp decodes together
TEAMS = (1, 2, 4, 8)  # warps a row group
WARPS, BLOCKS_PER_SM = 8, 2  # as in SOURCE: 16 warps a multiprocessor (at most 128 registers a thread)

SOURCE = CONVERSIONS + r"""
// x's uint4 i (8 values) lives at padded(i) = i + i / C (a spare uint4 every chunk of C): the 8 lanes of a
// shared-memory phase (8 consecutive chunks) start in 8 different bank groups, and a chunk's uint4s stay contiguous
template <int C> __device__ __forceinline__ int padded(int i) { return i + i / C; }

// acc[r] += s[r] * sum over the chunk's 4 words of row r of (code - zero) * x (fp32); xc: the chunk's first uint4 of
// x. Each x uint4 is read once for the R rows. masks[a] / exps[a]: the field mask at bit a and the exponent bits of
// 2^(23 - a), in registers (built from kernel arguments: as immediates the compiler splits the mask-and-OR in two).
template <int BITS, bool ZINT, int R, bool BF16>
__device__ __forceinline__ void chunk_dot(float* acc, const uint4* w4, const float* z, const float* s, const uint4* __restrict__ xc,
                                          const unsigned* masks, const unsigned* exps) {
  constexpr int PER = 32 / BITS;
#ifdef GQ_READ_ONLY  // benchmarks: the same loads, no decode (what the access pattern alone reaches)
#pragma unroll
  for (int r = 0; r < R; r++) acc[r] += __uint_as_float((w4[r].x ^ w4[r].y ^ w4[r].z ^ w4[r].w) & 0x3fffffffu) * s[r];
  return;
#endif
  // minus[r][a]: 2^(23 - a) + zero (integer zero points) or 2^(23 - a) (float zero points: s * (sum c x - z sum x))
  float minus[R][24];
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int a = 0; a < 24; a += BITS) minus[r][a] = __uint_as_float(exps[a]) + (ZINT ? z[r] : 0.f);
  float p[R][2], sx = 0.f;  // two sums a row: two FMA chains
#pragma unroll
  for (int r = 0; r < R; r++) { p[r][0] = 0.f; p[r][1] = 0.f; }
#pragma unroll
  for (int g8 = 0; g8 < PER / 2; g8++) {  // 8 columns at a time: one 16-byte x load
    const uint4 u = xc[g8];
    const unsigned h[4] = {u.x, u.y, u.z, u.w};
    float xe[8];
#pragma unroll
    for (int e = 0; e < 8; e++)
      xe[e] = BF16 ? __uint_as_float(e & 1 ? h[e >> 1] & 0xffff0000u : h[e >> 1] << 16)
                   : to_float_f16((unsigned short)(e & 1 ? h[e >> 1] >> 16 : h[e >> 1] & 0xffffu));
#pragma unroll
    for (int e = 0; e < 8; e++) {
      const int col = g8 * 8 + e, k = col / PER, f = col % PER, a = f * BITS;
      const bool low = a + BITS <= 23;
      const int at = low ? a : a - 16;
      if (!ZINT) sx += xe[e];
#pragma unroll
      for (int r = 0; r < R; r++) {
        const unsigned word = k == 0 ? w4[r].x : (k == 1 ? w4[r].y : (k == 2 ? w4[r].z : w4[r].w));
        const float q = __uint_as_float(((low ? word : word >> 16) & masks[at]) | exps[at]) - minus[r][at];
        p[r][e & 1] = fmaf(q, xe[e], p[r][e & 1]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; r++) acc[r] = fmaf(s[r], ZINT ? p[r][0] + p[r][1] : p[r][0] + p[r][1] - z[r] * sx, acc[r]);
}

// One step of a team: chunk c0 + team lane of rows row0 .. row0 + R - 1, with their group scales and zero points
template <int BITS, bool ZINT, int R>
__device__ __forceinline__ void load_step(uint4* w, float* s, float* z, const uint4* __restrict__ codes,
    const unsigned short* __restrict__ scale, const void* __restrict__ zero, int row0, int c, int N, int chunks,
    int GROUPS, int ZWPR, int gshift) {
  constexpr int PER = 32 / BITS;
  const int g = (c * 4 * PER) >> gshift;
#pragma unroll
  for (int r = 0; r < R; r++) {
    const int row = row0 + r;
    if (c < chunks && row < N) {
      w[r] = codes[(size_t)row * chunks + c];
      s[r] = to_float_f16(scale[(size_t)row * GROUPS + g]);
      if (ZINT) {
        const unsigned zw = ((const unsigned*)zero)[(size_t)row * ZWPR + g / PER];
        z[r] = (float)((zw >> ((g % PER) * BITS)) & ((1u << BITS) - 1u));
      } else {
        z[r] = to_float_f16(((const unsigned short*)zero)[(size_t)row * GROUPS + g]);
      }
    } else {
      w[r] = make_uint4(0u, 0u, 0u, 0u); s[r] = 0.f; z[r] = 0.f;
    }
  }
}

// A team of G warps takes R rows at a time (the block's 8 / G teams, every block's, walk the row groups); a lane one
// chunk of each of the R rows a step, the next step's chunks (these rows', or the team's next rows' first) loaded
// before this step's decode.
template <bool BF16, int BITS, bool ZINT, int R, int G>
__device__ __forceinline__ void gq_rows(const unsigned short* __restrict__ x, const uint4* __restrict__ codes,
    const unsigned short* __restrict__ scale, const void* __restrict__ zero, unsigned short* __restrict__ y,
    int N, int K, int WPR, int GROUPS, int ZWPR, int gshift, unsigned fmask, unsigned magic) {
  constexpr int PER = 32 / BITS;
  unsigned masks[24], exps[24];
#pragma unroll
  for (int a = 0; a < 24; a += BITS) { masks[a] = fmask << a; exps[a] = (magic - a) << 23; }
  // x in shared memory as its own 16-bit values, 8 to a uint4, a spare uint4 every chunk (C uint4s)
  constexpr int C = PER / 2;
  extern __shared__ __align__(16) uint4 xs[];
  __shared__ float partial[2][R][8];  // G > 1: the team's warp sums of a row group (by parity)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
  for (int j = tid; j < (WPR * PER) >> 3; j += blockDim.x) {
    unsigned h[4];
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int col = j * 8 + 2 * e;
      h[e] = (col < K ? (unsigned)x[col] : 0u) | ((col + 1 < K ? (unsigned)x[col + 1] : 0u) << 16);
    }
    xs[padded<C>(j)] = make_uint4(h[0], h[1], h[2], h[3]);
  }
  __syncthreads();
  const int chunks = WPR >> 2, team = warp / G, teams = warps / G, tl = (warp % G) * 32 + lane;
  const int row_groups = (N + R - 1) / R, group_stride = gridDim.x * teams;
  int grp = blockIdx.x * teams + team, c0 = 0, parity = 0;
  uint4 w[R];
  float s[R], z[R], acc[R];
#pragma unroll
  for (int r = 0; r < R; r++) acc[r] = 0.f;
  if (grp < row_groups) load_step<BITS, ZINT, R>(w, s, z, codes, scale, zero, grp * R, tl, N, chunks, GROUPS, ZWPR, gshift);
  while (grp < row_groups) {
    int next_grp = grp, next_c0 = c0 + G * 32;
    if (next_c0 >= chunks) { next_c0 = 0; next_grp = grp + group_stride; }
    uint4 nw[R];
    float ns[R], nz[R];
    if (next_grp < row_groups) load_step<BITS, ZINT, R>(nw, ns, nz, codes, scale, zero, next_grp * R, next_c0 + tl, N, chunks, GROUPS, ZWPR, gshift);
    const int c = c0 + tl;
    if (c < chunks) chunk_dot<BITS, ZINT, R, BF16>(acc, w, z, s, xs + padded<C>(c * C), masks, exps);
    if (next_c0 == 0) {  // the rows are done: reduce over the team, write y
#pragma unroll
      for (int r = 0; r < R; r++) {
        float v = acc[r];
#pragma unroll
        for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        acc[r] = 0.f;
        if (G == 1) {
          if (lane == 0 && grp * R + r < N) y[grp * R + r] = BF16 ? from_float_bf16(v) : from_float_f16(v);
        } else if (lane == 0) {
          partial[parity][r][warp] = v;
        }
      }
      if (G > 1) {
        asm volatile("bar.sync %0, %1;" :: "r"(team + 1), "r"(G * 32) : "memory");
        if (warp % G == 0 && lane < R && grp * R + lane < N) {
          float v = 0.f;
#pragma unroll
          for (int k = 0; k < G; k++) v += partial[parity][lane][team * G + k];
          y[grp * R + lane] = BF16 ? from_float_bf16(v) : from_float_f16(v);
        }
        parity ^= 1;
      }
    }
#pragma unroll
    for (int r = 0; r < R; r++) { w[r] = nw[r]; s[r] = ns[r]; z[r] = nz[r]; }
    grp = next_grp; c0 = next_c0;
  }
}

#define WARPS 8
#define BLOCKS_PER_SM 2
"""


def kernel_name(dtype: torch.dtype, bits: int, integer_zero: bool, rows: int, team: int) -> str:
    return f"gq_{DTYPES[dtype]}_{bits}_{'z' if integer_zero else 'f'}_r{rows}_g{team}"


@functools.cache
def _kernel(name: str, device: int, prefix: str = ""):
    """Compile SOURCE with one entry point, `name` (kernel_name's fields: one template instance a compile); `prefix`:
    source put first, e.g. "#define GQ_READ_ONLY" (benchmarks)."""
    _, dtype, bits, zero, rows, team = name.split("_")
    entry = (f'extern "C" __global__ void __launch_bounds__(32 * WARPS, BLOCKS_PER_SM) {name}(const unsigned short* x, '
             "const uint4* codes, const unsigned short* scale, const void* zero, unsigned short* y, int N, int K, int WPR, "
             "int GROUPS, int ZWPR, int gshift, unsigned fmask, unsigned magic) {\n"
             f"  gq_rows<{'true' if dtype == 'bf16' else 'false'}, {bits}, {'true' if zero == 'z' else 'false'}, {rows[1:]}, "
             f"{team[1:]}>(x, codes, scale, zero, y, N, K, WPR, GROUPS, ZWPR, gshift, fmask, magic);\n}}\n")
    return nvrtc.compile_kernel(prefix + SOURCE + entry, name, device)


@functools.cache
def available() -> bool:
    """CUDA present and the kernel compiles (NVRTC through torch)."""
    if not (torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")):
        return False
    try:
        _kernel(kernel_name(torch.bfloat16, 4, True, 4, 1), torch.cuda.current_device())
    except Exception as error:  # e.g. no CUDA headers for NVRTC
        warnings.warn(f"CUDA GEMV unavailable: {type(error).__name__}: {str(error)[:300]}", stacklevel=2)
        return False
    return True


def _x_bytes(packed: group_quant.GroupQuantWeight) -> int:
    """Shared memory for x: 16-bit values 8 to a uint4, a spare uint4 every chunk (the kernel's `padded`)."""
    per = codes_per_word(packed.bits)
    units = packed.codes.shape[1] * per // 8
    return (units + units // (per // 2)) * 16


def shape_ok(packed) -> bool:
    """The layouts this kernel reads: 2-, 4- or 8-bit codes, rows of whole 16-byte chunks (words a row a multiple of 4),
    a power-of-two group of whole chunks (each chunk's 4 words in one group)."""
    if not isinstance(packed, group_quant.GroupQuantWeight) or packed.bits not in BITS:
        return False
    group, chunk = packed.group_size, 4 * codes_per_word(packed.bits)
    return packed.codes.shape[1] % 4 == 0 and group & (group - 1) == 0 and group % chunk == 0


def supported(x: torch.Tensor, packed) -> bool:
    """CUDA, one row of bf16/fp16 activations, a layout `shape_ok` takes, x in shared memory."""
    if not shape_ok(packed) or x.device.type != "cuda" or x.dtype not in DTYPES or x.numel() != packed.shape[1]:
        return False
    if not available():
        return False
    limit = int(getattr(torch.cuda.get_device_properties(x.device), "shared_memory_per_block_optin", 48 * 1024))
    return _x_bytes(packed) <= limit


def _blocks(device: torch.device, smem: int) -> int:
    """One wave of resident blocks (x is copied once a block)."""
    props = torch.cuda.get_device_properties(device)
    limit = int(getattr(props, "shared_memory_per_multiprocessor", 228 * 1024))
    return props.multi_processor_count * max(1, min(BLOCKS_PER_SM, limit // (smem + 2048)))


def plan(packed: group_quant.GroupQuantWeight) -> tuple[int, int]:
    """(rows, team): rows a warp decodes together and warps a row group, the fastest measured on the H200 (team 1;
    4 rows from 8192 output rows, else 2: fewer rows a warp balance 4096-row weights better)."""
    return (4 if packed.shape[0] >= 8192 else 2), 1


def group_quant_matmul(x: torch.Tensor, packed: group_quant.GroupQuantWeight, rows: int | None = None,
                       team: int | None = None) -> torch.Tensor:
    """x [..., in] with one row (bfloat16 / float16, CUDA) @ W.T -> [..., out] in x's dtype, fp32 accumulation.
    `rows`, `team`: plan's choice unless given (benchmarks). Callers check `supported` first."""
    out_rows, cols = packed.shape
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {cols}")
    if not supported(x, packed):
        raise ValueError("this weight or input is not for the CUDA GEMV (see cuda_gemv.supported)")
    device = x.device
    x1 = x.reshape(cols).contiguous()
    codes = packed.codes.contiguous()
    if codes.data_ptr() % 16:  # the kernel reads 16-byte chunks
        codes = codes.clone()
    zint = packed.zero_kind == "integer"
    y = torch.empty(out_rows, dtype=x.dtype, device=device)
    smem = _x_bytes(packed)
    blocks = _blocks(device, smem)
    chosen = plan(packed)
    rows, team = rows or chosen[0], team or chosen[1]
    kernel = _kernel(kernel_name(x.dtype, packed.bits, zint, rows, team), nvrtc.device_index(device))
    blocks = min(blocks, -(-out_rows // (rows * WARPS // team)))
    if out_rows:
        zero_words = packed.zero.shape[1] if zint else 1
        with nvrtc.on_device(device):
            if smem >= 48 * 1024 and kernel._max_shared_mem_bytes < smem:
                kernel.set_shared_memory_config(smem)
            kernel(grid=(blocks, 1, 1), block=(32 * WARPS, 1, 1), shared_mem=smem,
                   args=[x1, codes, packed.scale.contiguous(), packed.zero.contiguous(), y, out_rows, cols, codes.shape[1], packed.groups,
                         zero_words, packed.group_size.bit_length() - 1, (1 << packed.bits) - 1, 150])
    return y.reshape(*x.shape[:-1], out_rows)

