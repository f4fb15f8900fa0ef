"""CUDA C++ of the tensor-core kernel's extras (mma_extras_layout.py): activations gathered through a column
permutation, and outliers walked beside the units. cuda_mma_source.py puts EXTRAS_SOURCE after the helpers it uses,
EXTRAS_CALL_SOURCE after the kernel."""

EXTRAS_SOURCE = r"""
// A SpQR / LUT weight's permutation and outliers (mma_extras_layout.py); a pointer the kernel does not use may be null
struct Extras {
  const unsigned short* perm;  // [in]: stored column j's activation is column perm[j]
  const unsigned* slices;  // 16 entries a slice: activation column | float16 correction << 16 (0: padding)
  const int* tile_ptr;  // [tiles + 1]: row tile t's slices are tile_ptr[t] .. tile_ptr[t + 1] - 1
  const unsigned short* xt = nullptr;  // XT: the activations transposed, [in][OB] (a column's rows in one 32-byte run)
};

// load_x through the permutation: the lane's 32 stored columns of unit u (t * 32 ..) from their activation columns,
// packed two a word in the same order as load_x's 16-byte loads. At batch 1 the 8 lanes of a quad position need the
// same 32: each gathers 4 and 16 shuffles hand every lane all 16 words (a quarter of the loads and their addresses).
template <int NB>
__device__ __forceinline__ void load_x_perm(uint4 (&xv)[NB][4], const unsigned short* __restrict__ x, int ldx, int B, int u, int lane,
                                            const unsigned short* __restrict__ perm) {
  if (NB == 1 && B == 1) {
    const uint2 pair = *(const uint2*)(perm + u * 128 + (lane & 3) * 32 + 4 * (lane >> 2));  // words 2g, 2g + 1 of the quad's 16
    const unsigned mine[2] = {(unsigned)x[pair.x & 0xffffu] | ((unsigned)x[pair.x >> 16] << 16),
                              (unsigned)x[pair.y & 0xffffu] | ((unsigned)x[pair.y >> 16] << 16)};
    unsigned v[16];
#pragma unroll
    for (int k = 0; k < 16; k++) v[k] = __shfl_sync(0xffffffffu, mine[k & 1], (k >> 1) * 4 + (lane & 3));
#pragma unroll
    for (int m = 0; m < 4; m++) xv[0][m] = make_uint4(v[4 * m], v[4 * m + 1], v[4 * m + 2], v[4 * m + 3]);
    return;
  }
  const uint4* pp = (const uint4*)(perm + u * 128 + (lane & 3) * 32);
  uint4 idx[4];
#pragma unroll
  for (int m = 0; m < 4; m++) idx[m] = pp[m];
#pragma unroll
  for (int nb = 0; nb < NB; nb++) {
    const unsigned short* xr = x + (size_t)min(nb * 8 + (lane >> 2), B - 1) * ldx;
#pragma unroll
    for (int m = 0; m < 4; m++) {
      unsigned v[4];
#pragma unroll
      for (int k = 0; k < 4; k++) {
        const unsigned pair = word_of(idx[m], k);
        v[k] = (unsigned)xr[pair & 0xffffu] | ((unsigned)xr[pair >> 16] << 16);
      }
      xv[nb][m] = make_uint4(v[0], v[1], v[2], v[3]);
    }
  }
}

template <int NB, bool PERM>
__device__ __forceinline__ void load_x_as(uint4 (&xv)[NB][4], const unsigned short* __restrict__ x, int ldx, int B, int u, int lane,
                                          const unsigned short* __restrict__ perm) {
  if (PERM) load_x_perm<NB>(xv, x, ldx, B, u, lane, perm);
  else load_x<NB>(xv, x, ldx, B, u, lane);
}

// The block's outliers, walked by each warp beside its units: the block's slices taken two at a time (a half warp
// each, lane & 15 the row of its tile), warp w the pairs w, w + W, ...; each unit step issues the activation loads of
// the PER entries loaded the step before, loads the next entries (both in flight during the unit's mma) and, after
// the mma, adds correction x activation for OB activation rows. Above 8 rows (two n-tiles: the units' registers
// are busy) the whole walk runs after the units instead. Every lane's sums run in a fixed order.
template <bool BF16, int RT, int OB, bool XT = false, int PER = 2>
struct OutlierWalk {
  static constexpr bool BESIDE = OB <= 8;  // walked beside the units (else after them)
  float sum[RT][OB];
  float xo[PER][OB];
  unsigned next[PER], cur[PER];
  int bound[RT], count, k, per, first, stride, base;

  __device__ __forceinline__ void start(const Extras& ex, int tile0, int warp, int W, int units, int lane) {
    const int s0 = ex.tile_ptr[tile0];
#pragma unroll
    for (int r = 0; r < RT; r++) bound[r] = ex.tile_ptr[tile0 + r + 1];
    const int pairs = (bound[RT - 1] - s0 + 1) >> 1;
    count = pairs > warp ? (pairs - warp + W - 1) / W : 0;
    per = BESIDE && units > 0 ? min(PER, (count + units - 1) / units) : 0;
    first = s0 + 2 * warp + (lane >> 4);
    stride = 2 * W;
    k = 0;
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
      for (int b = 0; b < OB; b++) sum[r][b] = 0.f;
    fetch(ex, lane);
  }

  // entries of the warp's pairs k .. k + per - 1 (0 past them)
  __device__ __forceinline__ void fetch(const Extras& ex, int lane) {
#pragma unroll
    for (int i = 0; i < PER; i++) {
      const int s = first + stride * (k + i);
      next[i] = i < per && k + i < count && s < bound[RT - 1] ? __ldg(ex.slices + (size_t)s * 16 + (lane & 15)) : 0u;
    }
  }

  // the fetched entries (of pairs k .. k + per - 1) and their activations: from x (a load an activation row), or with
  // XT after the units from ex.xt (a column's OB rows in OB / 8 16-byte loads: an L1 line a lane where x costs OB)
  __device__ __forceinline__ void take(const Extras& ex, const unsigned short* __restrict__ x, int ldx, int B) {
    base = k;
#pragma unroll
    for (int i = 0; i < PER; i++) {
      cur[i] = next[i];
      if constexpr (XT && !BESIDE) {
        const uint4* xc = (const uint4*)(ex.xt + (size_t)(cur[i] & 0xffffu) * OB);
#pragma unroll
        for (int q = 0; q < OB / 8; q++) {
          const uint4 v = cur[i] >> 16 ? __ldg(xc + q) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
          for (int j = 0; j < 8; j++) {
            const unsigned short h = (unsigned short)(word_of(v, j >> 1) >> (16 * (j & 1)));
            xo[i][q * 8 + j] = BF16 ? to_float_bf16(h) : to_float_f16(h);
          }
        }
      } else {
        const unsigned short* xc = x + (cur[i] & 0xffffu);
#pragma unroll
        for (int b = 0; b < OB; b++)
          xo[i][b] = b < B && cur[i] >> 16 ? (BF16 ? to_float_bf16(xc[(size_t)b * ldx]) : to_float_f16(xc[(size_t)b * ldx])) : 0.f;
      }
    }
    k += per;
  }

  // a unit step's first half: the fetched entries' activations, the next entries' loads
  __device__ __forceinline__ void issue(const Extras& ex, const unsigned short* __restrict__ x, int ldx, int B, int lane) {
    if (!BESIDE) return;
    take(ex, x, ldx, B);
    fetch(ex, lane);
  }

  __device__ __forceinline__ void add() {
    if (!BESIDE) return;
    add_taken();
  }

  __device__ __forceinline__ void add_taken() {
#pragma unroll
    for (int i = 0; i < PER; i++) {
      const int s = first + stride * (base + i);
      int tile = 0;
#pragma unroll
      for (int r = 0; r + 1 < RT; r++) tile += s >= bound[r];
      const float c = to_float_f16((unsigned short)(cur[i] >> 16));
#pragma unroll
      for (int r = 0; r < RT; r++)
#pragma unroll
        for (int b = 0; b < OB; b++)
          if (r == tile) sum[r][b] = fmaf(c, xo[i][b], sum[r][b]);
    }
  }

  // after the units: the entries fetched last, then the pairs left (all of them where the warp had no units)
  __device__ __forceinline__ void finish(const Extras& ex, const unsigned short* __restrict__ x, int ldx, int B, int lane) {
    take(ex, x, ldx, B);
    add_taken();
    per = PER;
    while (k < count) {
      fetch(ex, lane);
      take(ex, x, ldx, B);
      add_taken();
    }
  }

  // the lane's sums into the warp's accumulators (mma layout: lane (g, t) holds rows g, g + 8 and activation rows
  // nb * 8 + 2t, + 1 of n-tile nb), through the warp's own part of the block's shared sums (rows x OB floats a row
  // tile: at most RT x NB x 128, its size)
  template <int NB> __device__ __forceinline__ void deposit(float (&acc)[RT][NB][4], float* part, int lane) {
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
      for (int b = 0; b < OB; b++) sum[r][b] += __shfl_xor_sync(0xffffffffu, sum[r][b], 16);
    if (lane < 16)
#pragma unroll
      for (int r = 0; r < RT; r++)
#pragma unroll
        for (int b = 0; b < OB; b++) part[(r * 16 + lane) * OB + b] = sum[r][b];
    __syncwarp();
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
      for (int nb = 0; nb < NB; nb++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const int row = (lane >> 2) + 8 * (i >> 1), b = nb * 8 + 2 * (lane & 3) + (i & 1);
          if (b < OB) acc[r][nb][i] += part[(r * 16 + row) * OB + b];
        }
    __syncwarp();
  }
};
"""

EXTRAS_CALL_SOURCE = r"""
// gq_mma with a weight's extras (cuda_mma.entry_source: their pointers follow gshift; with XT the transposed activations)
template <int BITS, bool BF16, int NB, int RT, int W, int S, bool XA, int FORM, bool PERM, int OB, int PF = 0, bool XT = false>
__device__ __forceinline__ void gq_mma_extras(const unsigned short* __restrict__ x, int ldx, int B, const uint4* __restrict__ codes,
    const uint2* __restrict__ stats, unsigned short* __restrict__ y, int ldy, int N, int U, int GROUPS, int gshift,
    const unsigned short* perm, const unsigned* slices, const int* tile_ptr, const unsigned short* xt = nullptr) {
  gq_mma<BITS, BF16, NB, RT, W, S, XA, false, FORM, PERM, OB, PF, XT>(x, ldx, B, codes, stats, y, ldy, N, U, GROUPS, gshift, nullptr, nullptr,
                                                                     Extras{perm, slices, tile_ptr, xt});
}
"""
