"""CUDA C++ of the tensor-core kernel's cp.async pipeline (`Launch.async_copy`); it uses the helpers of
cuda_mma_source.py, which puts it after them."""

ASYNC_SOURCE = r"""
// -- the cp.async form: a warp's code chunks and statistics go through a private ring of S shared-memory stages, so
// S - 1 units are in flight without holding registers; the activations stay one unit ahead in registers.

__device__ __forceinline__ unsigned shared_address(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

__device__ __forceinline__ void copy_async(unsigned dst, const void* src, int bytes16) {  // 16 or 8 bytes
  if (bytes16) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
  else asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"(dst), "l"(src) : "memory");
}

// One stage of a lane: [RT][CH] 16-byte chunks, then [RT] statistics, lanes interleaved (no bank conflicts)
template <int CH, int RT> __host__ __device__ constexpr int stage_bytes() { return RT * CH * 512 + RT * 256; }

template <int CH, int RT>
__device__ __forceinline__ void copy_codes(unsigned stage, const uint4* __restrict__ codes, const uint2* __restrict__ stats,
    int tile0, int u, int U, int GROUPS, int gshift, int lane) {
#pragma unroll
  for (int r = 0; r < RT; r++) {
#pragma unroll
    for (int c = 0; c < CH; c++)
      copy_async(stage + ((r * CH + c) * 32 + lane) * 16, codes + ((size_t)((size_t)(tile0 + r) * U + u) * CH + c) * 32 + lane, 1);
    copy_async(stage + RT * CH * 512 + (r * 32 + lane) * 8, stats + ((size_t)(tile0 + r) * GROUPS + (u >> gshift)) * 8 + (lane >> 2), 0);
  }
}

template <int CH, int RT>
__device__ __forceinline__ void read_codes(uint4 (&w)[RT][CH], uint2 (&s)[RT], const unsigned char* stage, int lane) {
#pragma unroll
  for (int r = 0; r < RT; r++) {
#pragma unroll
    for (int c = 0; c < CH; c++) w[r][c] = ((const uint4*)stage)[(r * CH + c) * 32 + lane];
    s[r] = ((const uint2*)(stage + RT * CH * 512))[r * 32 + lane];
  }
}

// unit u: start the copy of unit u + S - 1 (one commit group a unit, empty past the end), wait for unit u's group,
// read it, load the next unit's activations into xn, decode and multiply with xc
template <int BITS, bool BF16, int NB, int RT, int S>
__device__ __forceinline__ void async_unit(float (&acc)[RT][NB][4], const uint4 (&xc)[NB][4], uint4 (&xn)[NB][4],
    const unsigned char* ring, unsigned ring_address, const unsigned short* __restrict__ x, int ldx, int B,
    const uint4* __restrict__ codes, const uint2* __restrict__ stats, int tile0, int u, int u0, int u1, int U, int GROUPS,
    int gshift, int lane) {
  constexpr int CH = BITS / 2, STAGE = stage_bytes<CH, RT>();
  if (u + S - 1 < u1) copy_codes<CH, RT>(ring_address + ((u + S - 1 - u0) % S) * STAGE, codes, stats, tile0, u + S - 1, U, GROUPS, gshift, lane);
  asm volatile("cp.async.commit_group;" ::: "memory");
  asm volatile("cp.async.wait_group %0;" :: "n"(S - 1) : "memory");
  uint4 w[RT][CH];
  uint2 s[RT];
  read_codes<CH, RT>(w, s, ring + ((u - u0) % S) * STAGE, lane);
  if (u + 1 < u1) load_x<NB>(xn, x, ldx, B, u + 1, lane);
  unit_dot<BITS, BF16, NB, RT>(acc, w, s, xc);
}

template <int BITS, bool BF16, int NB, int RT, int W, int S, bool SPLIT = false>
__device__ __forceinline__ void gq_mma_async(const unsigned short* __restrict__ x, int ldx, int B, const uint4* __restrict__ codes,
    const uint2* __restrict__ stats, unsigned short* __restrict__ y, int ldy, int N, int U, int GROUPS, int gshift,
    float* __restrict__ work = nullptr, unsigned* __restrict__ counters = nullptr) {
  constexpr int CH = BITS / 2, STAGE = stage_bytes<CH, RT>();
  __shared__ float part[W][RT * NB * 128];
  extern __shared__ __align__(16) unsigned char rings[];  // [W][S][STAGE]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tile0 = blockIdx.x * RT;
  int u0, u1;
  warp_units<W, SPLIT>(U, warp, u0, u1);
  const unsigned char* ring = rings + warp * S * STAGE;
  const unsigned ring_address = shared_address(ring);
  float acc[RT][NB][4];
  zero(acc);
#pragma unroll
  for (int i = 0; i < S - 1; i++) {
    if (u0 + i < u1) copy_codes<CH, RT>(ring_address + i * STAGE, codes, stats, tile0, u0 + i, U, GROUPS, gshift, lane);
    asm volatile("cp.async.commit_group;" ::: "memory");
  }
  uint4 x0[NB][4], x1[NB][4];  // ping-pong: no register copies
  if (u0 < u1) load_x<NB>(x0, x, ldx, B, u0, lane);
  for (int u = u0; u < u1; u += 2) {
    async_unit<BITS, BF16, NB, RT, S>(acc, x0, x1, ring, ring_address, x, ldx, B, codes, stats, tile0, u, u0, u1, U, GROUPS, gshift, lane);
    if (u + 1 >= u1) break;
    async_unit<BITS, BF16, NB, RT, S>(acc, x1, x0, ring, ring_address, x, ldx, B, codes, stats, tile0, u + 1, u0, u1, U, GROUPS, gshift, lane);
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  store_sums<BF16, NB, RT, W, SPLIT>(acc, part, y, ldy, N, B, tile0, work, counters);
}
"""
