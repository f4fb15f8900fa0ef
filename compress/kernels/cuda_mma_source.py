"""CUDA C++ of the tensor-core group-quant kernel (cuda_mma.py compiles one template instance a launch layout)."""

from compress.kernels.cuda_mma_async_source import ASYNC_SOURCE
from compress.kernels.cuda_mma_extras_source import EXTRAS_CALL_SOURCE, EXTRAS_SOURCE
from compress.kernels.cuda_mma_forms_source import FORMS_SOURCE
from compress.kernels.cuda_source import CONVERSIONS

SOURCE = CONVERSIONS + r"""
#ifndef GQ_LOAD  // benchmarks may define another form of the code load
#define GQ_LOAD "ld.global.nc.L1::no_allocate.v4.u32"
#endif
__device__ __forceinline__ uint4 load_stream(const uint4* p) {  // read once: keep it out of L1
  uint4 v;
  asm(GQ_LOAD " {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// word i of a vector (i a compile-time constant after unrolling)
__device__ __forceinline__ unsigned word_of(const uint2& v, int i) { return i == 0 ? v.x : v.y; }
__device__ __forceinline__ unsigned word_of(const uint4& v, int i) { return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w)); }

// bytes of b:a picked by `select` (PTX prmt: the compiler's __byte_perm masks a run-time selector first, two more
// instructions, where ours never has a nibble's sign-replicate bit set)
__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned select) {
  unsigned d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(select));
  return d;
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

template <int A, int B> __device__ __forceinline__ void zero(float (&v)[A][B][4]) {
#pragma unroll
  for (int a = 0; a < A; a++)
#pragma unroll
    for (int b = 0; b < B; b++)
#pragma unroll
      for (int i = 0; i < 4; i++) v[a][b][i] = 0.f;
}

// acc += the group's scales x its fp32 sums (rows g: elements 0, 1; rows g + 8: elements 2, 3); `scales`: the float16
// scales of rows g (low half) and g + 8
template <int NB>
__device__ __forceinline__ void add_scaled(float (&acc)[NB][4], const float (&sums)[NB][4], unsigned scales) {
  const float s_lo = to_float_f16((unsigned short)(scales & 0xffffu)), s_hi = to_float_f16((unsigned short)(scales >> 16));
#pragma unroll
  for (int nb = 0; nb < NB; nb++) {
    acc[nb][0] = fmaf(s_lo, sums[nb][0], acc[nb][0]);
    acc[nb][1] = fmaf(s_lo, sums[nb][1], acc[nb][1]);
    acc[nb][2] = fmaf(s_hi, sums[nb][2], acc[nb][2]);
    acc[nb][3] = fmaf(s_hi, sums[nb][3], acc[nb][3]);
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
// into the A fragment, the mma against the activations' B fragment (b_of(nb, j, b0, b1) gives n-tile nb's two words of
// k-tile j); each group's fp32 sums scaled once.
template <int BITS, bool BF16, int NB, int RT, class BOf>
__device__ __forceinline__ void unit_dot_with(float (&acc)[RT][NB][4], const uint4 (&w)[RT][BITS / 2], const uint2 (&s)[RT], const BOf& b_of) {
  constexpr int T = 32 / BITS / 8;  // k-tiles a word (field pair i: bits i * BITS and + 16)
  constexpr unsigned MASK = ((1u << BITS) - 1u) * 0x10001u, MAGIC = BF16 ? 0x43004300u : 0x64006400u;
  constexpr unsigned NEG = BF16 ? 0xC300C300u : 0xE400E400u, ONE = BF16 ? 0x3F803F80u : 0x3C003C00u;
#pragma unroll
  for (int r = 0; r < RT; r++) {
    // -(M + zero) for rows g (A registers 0, 2) and g + 8 (registers 1, 3), both halves
    const unsigned neg[2] = {__byte_perm(s[r].y, 0u, 0x4040) | NEG, __byte_perm(s[r].y, 0u, 0x4141) | NEG};
    float part_sum[1][NB][4];
    zero(part_sum);
#pragma unroll
    for (int j = 0; j < 8; j++) {  // the unit's 8 k-tiles of 16 columns
      const int wi = j / T, h = j % T;
      const unsigned word = word_of(w[r][wi / 4], wi % 4);
      unsigned a[4];
#pragma unroll
      for (int q = 0; q < 4; q++) a[q] = fma2<BF16>(and_or<MASK, MAGIC>(word >> ((h * 4 + q) * BITS)), ONE, neg[q & 1]);
#pragma unroll
      for (int nb = 0; nb < NB; nb++) {
        unsigned b0, b1;
        b_of(nb, j, b0, b1);
        mma<BF16>(part_sum[0][nb], a, b0, b1);
      }
    }
    add_scaled<NB>(acc[r], part_sum[0], s[r].x);
  }
}

// n-tile nb's B words of k-tile j (columns t * 32 + 4 j .. + 3 of the unit): from the unit's activations in registers
// (load_x: up to 16 rows), or, above, loaded where used (batch row nb * 8 + g; x_unit: the unit's columns of the
// lane's quad position t)
template <int NB>
__device__ __forceinline__ void b_in_registers(const uint4 (&xv)[NB][4], int nb, int j, unsigned& b0, unsigned& b1) {
  const uint4 xq = xv[nb][j / 2];
  b0 = j & 1 ? xq.z : xq.x;
  b1 = j & 1 ? xq.w : xq.y;
}

__device__ __forceinline__ void b_in_memory(const unsigned short* __restrict__ x_unit, int ldx, int B, int lane, int nb, int j,
                                            unsigned& b0, unsigned& b1) {
  const uint2 b = *(const uint2*)(x_unit + (size_t)min(nb * 8 + (lane >> 2), B - 1) * ldx + 4 * j);
  b0 = b.x;
  b1 = b.y;
}

template <int BITS, bool BF16, int NB, int RT>
__device__ __forceinline__ void unit_dot(float (&acc)[RT][NB][4], const uint4 (&w)[RT][BITS / 2], const uint2 (&s)[RT],
                                         const uint4 (&xv)[NB][4]) {
  unit_dot_with<BITS, BF16, NB, RT>(acc, w, s, [&](int nb, int j, unsigned& b0, unsigned& b1) { b_in_registers<NB>(xv, nb, j, b0, b1); });
}

// 17-64 rows (4 or 8 n-tiles)
template <int BITS, bool BF16, int NB, int RT>
__device__ __forceinline__ void unit_dot_wide(float (&acc)[RT][NB][4], const uint4 (&w)[RT][BITS / 2], const uint2 (&s)[RT],
                                              const unsigned short* __restrict__ x_unit, int ldx, int B, int lane) {
  unit_dot_with<BITS, BF16, NB, RT>(acc, w, s, [&](int nb, int j, unsigned& b0, unsigned& b1) { b_in_memory(x_unit, ldx, B, lane, nb, j, b0, b1); });
}

// n-tiles whose activations a lane keeps in registers a unit (above 2, each k-tile's B words are loaded where used)
template <int NB> __host__ __device__ constexpr int x_tiles() { return NB <= 2 ? NB : 1; }

""" + FORMS_SOURCE + EXTRAS_SOURCE + r"""
// element e of a block's sums (lane l's accumulator i of n-tile nb, row tile r): its output row and batch column
template <int NB> __device__ __forceinline__ void sum_position(int e, int tile0, int& row, int& b) {
  const int i = e & 3, l = (e >> 2) & 31, nb = (e >> 7) % NB, r = (e >> 7) / NB;
  row = (tile0 + r) * 16 + (l >> 2) + 8 * (i >> 1);
  b = nb * 8 + 2 * (l & 3) + (i & 1);
}

// The warps' sums through shared memory (part: [W][RT * NB * 128]); lane (g, t) holds rows g, g + 8 and batch columns
// 2t, 2t + 1 of each row tile and n-tile. Every thread of the block calls it once. SPLIT (the columns split over
// gridDim.y slices): each slice's block sums go to work [slices, B, N] and the last slice of these row tiles to arrive
// adds them all, in slice order (the same sum whatever the order of arrival), stores y and zeroes its counter again.
template <bool BF16, int NB, int RT, int W, bool SPLIT = false>
__device__ __forceinline__ void store_sums(const float (&acc)[RT][NB][4], float (*part)[RT * NB * 128], unsigned short* __restrict__ y,
                                           int ldy, int N, int B, int tile0, float* __restrict__ work = nullptr,
                                           unsigned* __restrict__ counters = nullptr) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < RT; r++)
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int i = 0; i < 4; i++) part[warp][((r * NB + nb) * 32 + lane) * 4 + i] = acc[r][nb][i];
  __syncthreads();
  for (int e = threadIdx.x; e < RT * NB * 128; e += 32 * W) {
    int row, b;
    sum_position<NB>(e, tile0, row, b);
    if (row < N && b < B) {
      float v = 0.f;
#pragma unroll
      for (int k = 0; k < W; k++) v += part[k][e];
      if (SPLIT) work[((size_t)blockIdx.y * B + b) * N + row] = v;
      else y[(size_t)b * ldy + row] = BF16 ? from_float_bf16(v) : from_float_f16(v);
    }
  }
  if (!SPLIT) return;
  __shared__ unsigned last;
  __threadfence();  // this thread's sums are visible to every block before the count below says so
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.x, 1u) == gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int e = threadIdx.x; e < RT * NB * 128; e += 32 * W) {
    int row, b;
    sum_position<NB>(e, tile0, row, b);
    if (row < N && b < B) {
      float v = 0.f;
      for (int k = 0; k < (int)gridDim.y; k++) v += __ldcg(work + ((size_t)k * B + b) * N + row);  // through L2: other blocks wrote them
      y[(size_t)b * ldy + row] = BF16 ? from_float_bf16(v) : from_float_f16(v);
    }
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0u;  // for the next launch (a CUDA graph replays the same counters)
}

// The units [u0, u1) warp `warp` of W takes: the block's slice of the U units (blockIdx.y of gridDim.y when SPLIT, else
// all) split evenly over the warps
template <int W, bool SPLIT> __device__ __forceinline__ void warp_units(int U, int warp, int& u0, int& u1) {
  const int a = SPLIT ? (int)((long long)U * blockIdx.y / gridDim.y) : 0, n = (SPLIT ? (int)((long long)U * (blockIdx.y + 1) / gridDim.y) : U) - a;
  u0 = a + warp * n / W;
  u1 = a + (warp + 1) * n / W;
}

// PERM: the activations gathered through ex.perm; OB > 0: ex's outliers added for up to OB activation rows (XT: their
// activations read from ex.xt above 8 rows); PF > 0: each unit's codes prefetched into L2 PF units ahead (lane 0, one
// bulk prefetch a row tile)
template <int BITS, bool BF16, int NB, int RT, int W, int S, bool XA, bool SPLIT = false, int FORM = EXACT, bool PERM = false, int OB = 0,
          int PF = 0, bool XT = false>
__device__ __forceinline__ void gq_mma(const unsigned short* __restrict__ x, int ldx, int B, const uint4* __restrict__ codes,
    const uint2* __restrict__ stats, unsigned short* __restrict__ y, int ldy, int N, int U, int GROUPS, int gshift,
    float* __restrict__ work = nullptr, unsigned* __restrict__ counters = nullptr, Extras ex = Extras{}) {
  constexpr int CH = chunks<BITS, FORM>();  // 16-byte chunks a lane a unit
  __shared__ float part[W][RT * NB * 128];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tile0 = blockIdx.x * RT;
  int u0, u1;
  warp_units<W, SPLIT>(U, warp, u0, u1);
  float acc[RT][NB][4];
  zero(acc);
  // a ring of S register buffers: unit u's code loads are issued S - 1 units ahead of its decode (the ring unrolled,
  // so every buffer index is a constant: no register copies); its activations with them (XA) or just before use
  static_assert(NB <= 2 || FORM == EXACT, "17-64 rows: the exact form only");
  static_assert((!PERM || NB <= 2) && (OB == 0 || (OB <= 8 * NB && NB <= 2 && !SPLIT)), "extras: up to 16 rows, unsplit");
  constexpr bool WIDE = NB > 2;
  OutlierWalk<BF16, RT, OB ? OB : 1, XT> walk;
  if (OB) walk.start(ex, tile0, warp, W, u1 - u0, lane);
  if (PF > 0 && lane == 0)
    for (int k = 1; k < PF; k++) prefetch_codes<BITS, FORM, RT>(codes, tile0, u0 + k, u1, U);
  uint4 w[S][RT][CH], xr[XA && !WIDE ? S : 1][x_tiles<NB>()][4];
  typename StatOf<FORM>::T s[S][RT];
  constexpr bool TABLES = FORM == TABLE || FORM == TABLE_COMPACT || FORM == TABLE_WIDE;
  constexpr int TW = FORM == TABLE_WIDE ? 4 : 2;  // uint4 of a lane's two rows' tables
  uint4 table[TABLES ? RT : 1][TW];  // the table forms: rows g and g + 8 of each row tile, for the whole call
  if (TABLES)
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
      for (int h = 0; h < TW; h++) table[r][h] = ((const uint4*)stats)[((size_t)(tile0 + r) * 8 + (lane >> 2)) * TW + h];
#pragma unroll
  for (int i = 0; i < S - 1; i++)
    if (u0 + i < u1) {
      load_codes<CH, RT, FORM>(w[i], s[i], codes, stats, tile0, u0 + i, U, GROUPS, gshift, lane);
      if (XA && !WIDE) load_x_as<x_tiles<NB>(), PERM>(xr[XA && !WIDE ? i : 0], x, ldx, B, u0 + i, lane, ex.perm);
    }
  for (int u = u0; u < u1; u += S) {
#pragma unroll
    for (int i = 0; i < S; i++) {
      if (u + i < u1) {
        const int ahead = u + i + S - 1;
        if (ahead < u1) {
          load_codes<CH, RT, FORM>(w[(i + S - 1) % S], s[(i + S - 1) % S], codes, stats, tile0, ahead, U, GROUPS, gshift, lane);
          if (XA && !WIDE) load_x_as<x_tiles<NB>(), PERM>(xr[XA && !WIDE ? (i + S - 1) % S : 0], x, ldx, B, ahead, lane, ex.perm);
        }
        if (PF > 0 && lane == 0) prefetch_codes<BITS, FORM, RT>(codes, tile0, u + i + PF, u1, U);
        if (!XA && !WIDE) load_x_as<x_tiles<NB>(), PERM>(xr[0], x, ldx, B, u + i, lane, ex.perm);
        if (OB) walk.issue(ex, x, ldx, B, lane);
        if constexpr (WIDE) unit_dot_wide<BITS, BF16, NB, RT>(acc, w[i], s[i], x + (u + i) * 128 + (lane & 3) * 32, ldx, B, lane);
        else if constexpr (FORM == EXACT) unit_dot<BITS, BF16, NB, RT>(acc, w[i], s[i], xr[XA ? i : 0]);
        else if constexpr (FORM == TABLE) unit_dot_table<BF16, NB, RT>(acc, w[i], table, xr[XA ? i : 0]);
        else if constexpr (FORM == QUANTIZED) unit_dot_quantized<BF16, NB, RT>(acc, w[i], s[i], xr[XA ? i : 0]);
        else if constexpr (FORM == TABLE_COMPACT) unit_dot_table_compact<BF16, NB, RT>(acc, w[i], table, xr[XA ? i : 0]);
        else if constexpr (FORM == TABLE_WIDE) unit_dot_table_wide<BF16, NB, RT>(acc, w[i], table, xr[XA ? i : 0]);
        else unit_dot_scaled<BITS, BF16, NB, RT, FORM>(acc, w[i], s[i], xr[XA ? i : 0]);
        if (OB) walk.add();
      }
    }
  }
  if (OB) {
    walk.finish(ex, x, ldx, B, lane);
    walk.deposit(acc, part[warp], lane);
  }
  store_sums<BF16, NB, RT, W, SPLIT>(acc, part, y, ldy, N, B, tile0, work, counters);
}
""" + ASYNC_SOURCE + EXTRAS_CALL_SOURCE
