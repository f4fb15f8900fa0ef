// AVX-512 (F, BW, VL, DQ) path: 16 fp32 lanes; weights decoded in registers, fp32 FMA accumulation,
// up to 16 activation rows a pass (several accumulator sets for 1-3 rows, to hide the FMA latency).
// Compiled for AVX-512 by the pragma below (this file only), called only when the CPU has it.
#if defined(__x86_64__)
#include <immintrin.h>

#include "common.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")

namespace ck {
namespace avx512 {
namespace {

#include "avx512_decode.h"  // NOLINT: inside the anonymous namespace on purpose
#include "unroll.h"         // NOLINT: likewise

#define CK_LAMBDA(...) [&](auto set_, int64_t __VA_ARGS__) __attribute__((always_inline))
#define CK_SET constexpr int u_ = decltype(set_)::value

template <bool FP16>
inline __m512 halves(__m256i h) {
  if (FP16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <bool FP16>
inline __m512 load_halves(const uint16_t* p) { return halves<FP16>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

// 16 halves from p, reading none at or past `end` (a masked load is slow on some CPUs: copy instead)
__attribute__((noinline, cold)) __m256i copy16(const uint16_t* p, const uint16_t* end) {
  alignas(32) uint16_t buf[16] = {};
  for (int i = 0; p + i < end && i < 16; ++i) buf[i] = p[i];
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}

template <bool FP16>
inline __m512 load_halves(const uint16_t* p, const uint16_t* end) {
  if (__builtin_expect(p + 16 <= end, 1)) return load_halves<FP16>(p);
  return halves<FP16>(copy16(p, end));
}

inline __m512i lane_pattern(int n, int m) {  // (l / n) * m
  alignas(64) int32_t v[16];
  for (int l = 0; l < 16; ++l) v[l] = (l / n) * m;
  return _mm512_load_si512(v);
}

// Lane l of a 16-bit mask: the index of its value among the packed values of the set lanes.
inline __m512i expand_index(const Expand& e, uint32_t mh) {
  const uint64_t lo = e.idx[mh & 0xFFu], hi = e.idx[mh >> 8] + 0x0101010101010101ull * static_cast<uint64_t>(__builtin_popcount(mh & 0xFFu));
  return _mm512_cvtepu8_epi32(_mm_set_epi64x(static_cast<long long>(hi), static_cast<long long>(lo)));
}

template <int NB, int U>
inline void clear(__m512 (&acc)[U][NB]) {
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_setzero_ps();
}

template <int NB, int U>
inline void finish(const Act& a, int64_t r, int64_t b0, __m512 (&acc)[U][NB], const float* tail) {
  for (int b = 0; b < NB; ++b) {
    __m512 sum = acc[0][b];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][b]);
    a.out[(b0 + b) * a.N + r] = _mm512_reduce_add_ps(sum) + tail[b];
  }
}

// x at 16 columns col (absolute): within a window of 32 from c0 (rel = col - c0), or gathered.
template <int NB, bool WINDOW>
inline void fma_cols(__m512* acc, __m512 w, const float* x, int64_t ld, int64_t c0, __m512i rel, __m512i col) {
  for (int b = 0; b < NB; ++b) {
    const float* xb = x + b * ld;
    __m512 xv;
    if (WINDOW) xv = _mm512_permutex2var_ps(_mm512_loadu_ps(xb + c0), rel, _mm512_loadu_ps(xb + c0 + 16));
    else xv = _mm512_i32gather_ps(col, xb, 4);
    acc[b] = _mm512_fmadd_ps(w, xv, acc[b]);
  }
}

template <int NB>
inline void fma_x(__m512* acc, __m512 w, const float* x, int64_t ld) {
  for (int b = 0; b < NB; ++b) acc[b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + b * ld), acc[b]);
}

// -- N:M -----------------------------------------------------------------------------------------------

// MODE 0: x gathered; 1: x permuted from a window of 32 columns; 2: the same with 2-bit indices (one
// index word a step: 2:4, 1:4, 2:3, ...). Values [v0, v1) of row r (multiples of 16 * t.P) into acc.
template <int NB, bool FP16, int MODE, int U>
inline void nm_span(const NMArgs& A, const Tab& t, __m512i pattern, int64_t r, const float* x, int64_t v0, int64_t v1, __m512 (&acc)[U][NB]) {
  const uint16_t* v = A.values + r * A.count;
  Seq d(t, A.indices + r * A.iwords, A.iwords, v0);
  const int64_t step = MODE ? 16 / A.n * A.m : 0, ld = A.a.ld;
  const __m512i sh2 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), three = _mm512_set1_epi32(3);
  chunks<U>(v0, v1, 16, CK_LAMBDA(k0) {
    CK_SET;
    const __m512 w = load_halves<FP16>(v + k0);
    const int64_t c0 = (k0 >> 4) * step;
    if (MODE == 2) {
      const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(d.w[k0 >> 4])), sh2), three);
      fma_cols<NB, true>(acc[u_], w, x, ld, c0, _mm512_add_epi32(pattern, idx), idx);
    } else {
      const __m512i idx = d.next();
      if (MODE == 1) fma_cols<NB, true>(acc[u_], w, x, ld, c0, _mm512_add_epi32(pattern, idx), idx);
      else fma_cols<NB, false>(acc[u_], w, x, ld, 0, idx, _mm512_add_epi32(_mm512_loadu_si512(A.colbase + k0), idx));
    }
  });
}

template <int NB, bool FP16>
inline void nm_tail(const NMArgs& A, int64_t r, const float* x, float* tail) {
  const uint16_t* v = A.values + r * A.count;
  const uint32_t* iw = A.indices + r * A.iwords;
  for (int64_t k = A.count & ~int64_t(15); k < A.count; ++k) {
    const float wk = half_value(v[k], FP16);
    const int64_t col = A.colbase[k] + field(iw, A.ibits, k);
    for (int b = 0; b < NB; ++b) tail[b] += wk * x[b * A.a.ld + col];
  }
}

template <int NB, bool FP16, int MODE>
void nm_row(const NMArgs& A, const Tab& t, __m512i pattern, int64_t r, int64_t b0) {
  constexpr int U = Sets<NB>::value;
  const float* x = A.a.x + b0 * A.a.ld;
  __m512 acc[U][NB];
  clear(acc);
  nm_span<NB, FP16, MODE, U>(A, t, pattern, r, x, 0, A.count & ~int64_t(15), acc);
  float tail[NB] = {};
  nm_tail<NB, FP16>(A, r, x, tail);
  finish<NB, U>(A.a, r, b0, acc, tail);
}

// Rows [r0, r1) (at most kRowBlock) K-blocked: each block of values whose x columns fit kXBytes runs over
// all the rows before the next, so x comes from L1; partial sums wait in `buf` (NB vectors a row).
template <int NB, bool FP16, int MODE>
void nm_block(const NMArgs& A, const Tab& t, __m512i pattern, int64_t r0, int64_t r1, int64_t b0, float* buf) {
  const float* x = A.a.x + b0 * A.a.ld;
  const int64_t full = A.count & ~int64_t(15), unit = 16 * t.P;
  const int64_t span = (kXBytes / (NB * 4) * A.n / A.m) / unit * unit, vb = span > unit ? span : unit;
  for (int64_t i = 0; i < (r1 - r0) * NB * 16; ++i) buf[i] = 0.0f;
  for (int64_t v0 = 0; v0 < full; v0 += vb) {
    for (int64_t r = r0; r < r1; ++r) {
      float* rb = buf + (r - r0) * NB * 16;
      __m512 acc[1][NB];
      for (int b = 0; b < NB; ++b) acc[0][b] = _mm512_loadu_ps(rb + 16 * b);
      nm_span<NB, FP16, MODE, 1>(A, t, pattern, r, x, v0, v0 + vb < full ? v0 + vb : full, acc);
      for (int b = 0; b < NB; ++b) _mm512_storeu_ps(rb + 16 * b, acc[0][b]);
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const float* rb = buf + (r - r0) * NB * 16;
    __m512 acc[1][NB];
    for (int b = 0; b < NB; ++b) acc[0][b] = _mm512_loadu_ps(rb + 16 * b);
    float tail[NB] = {};
    nm_tail<NB, FP16>(A, r, x, tail);
    finish<NB, 1>(A.a, r, b0, acc, tail);
  }
}

// -- group quant ---------------------------------------------------------------------------------------

template <int NB>
inline void gq_tail(const GQArgs& A, int64_t r, int64_t full, const float* x, const float* s, const float* z, float* tail) {
  const uint32_t* w = A.codes + r * A.cwords;
  for (int64_t k = full; k < A.a.K; ++k) {
    const int32_t g = A.st.gidx[k];
    const float wk = (static_cast<float>(field(w, A.bits, k)) - z[g]) * s[g];
    for (int b = 0; b < NB; ++b) tail[b] += wk * x[b * A.a.ld + k];
  }
}

// Any width and group size: 16 codes a step; a group's statistics broadcast when the group size is a
// multiple of 16 (UNIFORM), else gathered per lane.
template <int NB, bool UNIFORM>
void gq_row(const GQArgs& A, const Tab& t, int64_t r, int64_t b0, const float* s, const float* z) {
  constexpr int U = Sets<NB>::value;
  const Act& a = A.a;
  const Stats& st = A.st;
  const float* x = a.x + b0 * a.ld;
  __m512 acc[U][NB];
  clear(acc);
  Seq d(t, A.codes + r * A.cwords, A.cwords);
  const int64_t full = a.K & ~int64_t(15);
  if (UNIFORM) {
    const __m512 lanes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t g0 = 0, g = 0; g0 < full; g0 += st.gs, ++g) {
      const __m512 sv = _mm512_set1_ps(s[g]), zv = _mm512_set1_ps(z[g]);
      const __m512 table = _mm512_mul_ps(_mm512_sub_ps(lanes, zv), sv);  // up to 4 bits: the group's weights by code
      chunks<U>(g0, g0 + st.gs < full ? g0 + st.gs : full, 16, CK_LAMBDA(k0) {
        CK_SET;
        const __m512i c = d.next();
        fma_x<NB>(acc[u_], A.bits <= 4 ? _mm512_permutexvar_ps(c, table) : _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c), zv), sv), x + k0,
                  a.ld);
      });
    }
  } else {
    chunks<U>(0, full, 16, CK_LAMBDA(k0) {
      CK_SET;
      const __m512i gi = _mm512_loadu_si512(st.gidx + k0);
      const __m512 c = _mm512_cvtepi32_ps(d.next());
      fma_x<NB>(acc[u_], _mm512_mul_ps(_mm512_sub_ps(c, _mm512_i32gather_ps(gi, z, 4)), _mm512_i32gather_ps(gi, s, 4)), x + k0, a.ld);
    });
  }
  float tail[NB] = {};
  gq_tail<NB>(A, r, full, x, s, z, tail);
  finish<NB, U>(a, r, b0, acc, tail);
}

// 2, 4 or 8 bits with a group size that is a multiple of 16 * 8 / BITS: 16 bytes a step widened to 16
// lanes, field j of every byte one vector; x arrives permuted to match (ops.cpp, planar_order).
// Integer zero points (INTZ): code - zero exactly as (2^23 + code) - (2^23 + zero), the code OR-ed into
// the bits of 2^23 (one vpternlogd instead of a mask and a conversion). For up to 4 activation rows the
// scale is applied once a group (sum of (code - zero) * x, then times the scale: fewer operations a
// weight, the same fp32 accuracy); above that a weight's (code - zero) * scale is shared by all rows.
template <int NB, int BITS, bool INTZ, int U>
inline void gq_planar_span(const GQArgs& A, int64_t r, const float* x, int64_t c0, int64_t c1, const float* s, const float* z,
                           __m512 (&acc)[U][NB]) {
  constexpr int Q = 8 / BITS, C = 16 * Q;
  constexpr bool FACTOR = NB <= 4;
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(A.codes + r * A.cwords);
  const __m512i fmask = _mm512_set1_epi32((1 << BITS) - 1), magic = _mm512_set1_epi32(0x4B000000);
  const int64_t ld = A.a.ld;
  auto codes = [&](__m512i by, int j) __attribute__((always_inline)) {
    const __m512i v = j ? _mm512_srli_epi32(by, j * BITS) : by;
    if (INTZ) return _mm512_castsi512_ps(BITS == 8 ? _mm512_or_si512(v, magic) : _mm512_ternarylogic_epi32(v, fmask, magic, 0xEA));
    return _mm512_cvtepi32_ps(BITS == 8 ? v : _mm512_and_si512(v, fmask));
  };
  const __m512 lanes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g0 = c0, g = c0 / A.st.gs; g0 < c1; g0 += A.st.gs, ++g) {
    const __m512 sv = _mm512_set1_ps(s[g]), zv = _mm512_set1_ps(INTZ ? 8388608.0f + z[g] : z[g]);
    const int64_t end = g0 + A.st.gs < c1 ? g0 + A.st.gs : c1;
    if (BITS <= 4) {
      // every weight of the group is one of 2^BITS values: a table of scale * (code - zero), computed as the
      // reference computes a weight, looked up by vpermps (it reads the low 4 bits of a lane: the code; for
      // 2 bits the table repeats every 4 entries, so the next code in bits 2-3 does not matter)
      const __m512 codes16 = BITS == 4 ? lanes : _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_cvttps_epi32(lanes), fmask));
      const __m512 table = _mm512_mul_ps(_mm512_sub_ps(codes16, _mm512_set1_ps(z[g])), sv);
      chunks<U>(g0, end, C, CK_LAMBDA(k0) {
        CK_SET;
        const __m512i by = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + k0 / Q)));
        for (int j = 0; j < Q; ++j)
          fma_x<NB>(acc[u_], _mm512_permutexvar_ps(j ? _mm512_srli_epi32(by, j * BITS) : by, table), x + k0 + 16 * j, ld);
      });
    } else if (FACTOR) {
      __m512 part[U][NB];
      clear(part);
      chunks<U>(g0, end, C, CK_LAMBDA(k0) {
        CK_SET;
        const __m512i by = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + k0 / Q)));
        for (int j = 0; j < Q; ++j) fma_x<NB>(part[u_], _mm512_sub_ps(codes(by, j), zv), x + k0 + 16 * j, ld);
      });
      for (int b = 0; b < NB; ++b) {
        __m512 sum = part[0][b];
        for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, part[u][b]);
        acc[0][b] = _mm512_fmadd_ps(sv, sum, acc[0][b]);
      }
    } else {
      chunks<U>(g0, end, C, CK_LAMBDA(k0) {
        CK_SET;
        const __m512i by = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + k0 / Q)));
        for (int j = 0; j < Q; ++j) fma_x<NB>(acc[u_], _mm512_mul_ps(_mm512_sub_ps(codes(by, j), zv), sv), x + k0 + 16 * j, ld);
      });
    }
  }
}

template <int NB, int BITS, bool INTZ>
void gq_planar_row(const GQArgs& A, int64_t r, int64_t b0, const float* s, const float* z) {
  constexpr int U = Sets<NB>::value;
  const float* x = A.a.x + b0 * A.a.ld;
  __m512 acc[U][NB];
  clear(acc);
  const int64_t full = A.a.K / (128 / BITS) * (128 / BITS);
  gq_planar_span<NB, BITS, INTZ, U>(A, r, x, 0, full, s, z, acc);
  float tail[NB] = {};
  gq_tail<NB>(A, r, full, x, s, z, tail);
  finish<NB, U>(A.a, r, b0, acc, tail);
}

// One activation row, R weight rows at once (R accumulator chains, x loaded once for all R: a long row's x
// read from L1 / L2 a quarter as often; short rows stay one at a time, one sequential code stream being
// faster there), the codes prefetched 4 groups ahead; s, z: [R][groups]. The same
// arithmetic as gq_planar_span with NB = 1 (a table up to 4 bits; 8 bits: (code - zero) summed, times the
// scale once a group).
template <int BITS, bool INTZ, int R>
void gq_planar_rows1(const GQArgs& A, int64_t r, const float* s, const float* z) {
  constexpr int Q = 8 / BITS, C = 16 * Q;
  const int64_t groups = A.st.groups, gs = A.st.gs, full = A.a.K / (128 / BITS) * (128 / BITS);
  const float* x = A.a.x;
  const uint8_t* by[R];
  for (int i = 0; i < R; ++i) by[i] = reinterpret_cast<const uint8_t*>(A.codes + (r + i) * A.cwords);
  const __m512i fmask = _mm512_set1_epi32((1 << BITS) - 1), magic = _mm512_set1_epi32(0x4B000000);
  const __m512 lanes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 codes16 = BITS == 4 ? lanes : _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_cvttps_epi32(lanes), fmask));
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t gbytes = gs / Q;
  for (int64_t g0 = 0, g = 0; g0 < full; g0 += gs, ++g) {
    const int64_t end = g0 + gs < full ? g0 + gs : full;
    for (int i = 0; i < R; ++i)
      for (int64_t off = 0; off < gbytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(by[i] + g0 / Q + off) + 4 * gbytes, _MM_HINT_T0);
    if (BITS <= 4) {
      __m512 table[R];
      for (int i = 0; i < R; ++i) table[i] = _mm512_mul_ps(_mm512_sub_ps(codes16, _mm512_set1_ps(z[i * groups + g])), _mm512_set1_ps(s[i * groups + g]));
      for (int64_t k0 = g0; k0 < end; k0 += C) {
        __m512 xv[Q];
        for (int j = 0; j < Q; ++j) xv[j] = _mm512_loadu_ps(x + k0 + 16 * j);
        for (int i = 0; i < R; ++i) {
          const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(by[i] + k0 / Q)));
          for (int j = 0; j < Q; ++j) acc[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(j ? _mm512_srli_epi32(b, j * BITS) : b, table[i]), xv[j], acc[i]);
        }
      }
    } else {
      __m512 part[R], zv[R];
      for (int i = 0; i < R; ++i) {
        part[i] = _mm512_setzero_ps();
        zv[i] = _mm512_set1_ps(INTZ ? 8388608.0f + z[i * groups + g] : z[i * groups + g]);
      }
      for (int64_t k0 = g0; k0 < end; k0 += C) {
        const __m512 xv = _mm512_loadu_ps(x + k0);
        for (int i = 0; i < R; ++i) {
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(by[i] + k0)));
          const __m512 c = INTZ ? _mm512_castsi512_ps(_mm512_or_si512(v, magic)) : _mm512_cvtepi32_ps(v);
          part[i] = _mm512_fmadd_ps(_mm512_sub_ps(c, zv[i]), xv, part[i]);
        }
      }
      for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(s[i * groups + g]), part[i], acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    float tail[1] = {};
    gq_tail<1>(A, r + i, full, x, s + i * groups, z + i * groups, tail);
    A.a.out[r + i] = _mm512_reduce_add_ps(acc[i]) + tail[0];
  }
}

// Rows [r0, r1) (at most kRowBlock) K-blocked in whole groups (as nm_block); their statistics first.
template <int NB, int BITS, bool INTZ>
void gq_planar_block(const GQArgs& A, int64_t r0, int64_t r1, int64_t b0, float* scratch) {
  const float* x = A.a.x + b0 * A.a.ld;
  const int64_t groups = A.st.groups, gs = A.st.gs, full = A.a.K / (128 / BITS) * (128 / BITS);
  float *s = scratch, *z = scratch + groups * kRowBlock, *buf = scratch + 2 * groups * kRowBlock;
  for (int64_t r = r0; r < r1; ++r) row_stats(A.st, A.bits, r, s + (r - r0) * groups, z + (r - r0) * groups);
  const int64_t span = kXBytes / (NB * 4) / gs * gs, kb = span > gs ? span : gs;
  for (int64_t i = 0; i < (r1 - r0) * NB * 16; ++i) buf[i] = 0.0f;
  for (int64_t c0 = 0; c0 < full; c0 += kb) {
    for (int64_t r = r0; r < r1; ++r) {
      float* rb = buf + (r - r0) * NB * 16;
      __m512 acc[1][NB];
      for (int b = 0; b < NB; ++b) acc[0][b] = _mm512_loadu_ps(rb + 16 * b);
      gq_planar_span<NB, BITS, INTZ, 1>(A, r, x, c0, c0 + kb < full ? c0 + kb : full, s + (r - r0) * groups, z + (r - r0) * groups, acc);
      for (int b = 0; b < NB; ++b) _mm512_storeu_ps(rb + 16 * b, acc[0][b]);
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const float* rb = buf + (r - r0) * NB * 16;
    __m512 acc[1][NB];
    for (int b = 0; b < NB; ++b) acc[0][b] = _mm512_loadu_ps(rb + 16 * b);
    float tail[NB] = {};
    gq_tail<NB>(A, r, full, x, s + (r - r0) * groups, z + (r - r0) * groups, tail);
    finish<NB, 1>(A.a, r, b0, acc, tail);
  }
}

// -- a row of 2/3/4-bit codes in register-resident super-steps ------------------------------------------

// 8 code words (256 bits) hold S = 4 * per / 2... = 8 * (32 / BITS) / 16 chunks of 16 codes (3 bits: 80 codes,
// 5 chunks); the permute and shift of each chunk are constants held in registers, so a step is one load and,
// a chunk, vpermd + vpsrlvd + vpermps (no mask: the tables repeat every 2^BITS of their 16 entries).
// MODE 0: weights = table[code] (lut). MODE 1 (one activation row): sum of ctab[code] * (x * s[group]),
// the caller subtracting sum of s * z * (group sums of x) (spqr_row1 / gq3_row1). Columns [0, full) with
// full a multiple of 16; acc gets the NB row sums (S accumulator chains for one row).
template <int BITS, int MODE, int NB>
inline void stream_row(const uint32_t* w, int64_t nw, int64_t full, const float* x, int64_t ld, __m512 table, const float* s, const int32_t* gidx,
                       __m512 (&out)[NB]) {
  constexpr int PER = 32 / BITS, S = 8 * PER / 16, STEP = 16 * S;
  static_assert(8 * PER % 16 == 0, "whole chunks a step");
  __m512i idx[S], sh[S];
  for (int j = 0; j < S; ++j) {
    alignas(64) int32_t wi[16], si[16];
    for (int l = 0; l < 16; ++l) {
      wi[l] = (16 * j + l) / PER;
      si[l] = ((16 * j + l) % PER) * BITS;
    }
    idx[j] = _mm512_load_si512(wi);
    sh[j] = _mm512_load_si512(si);
  }
  constexpr int C = NB == 1 ? S : 1;  // accumulator chains
  __m512 acc[C][NB];
  for (int u = 0; u < C; ++u)
    for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_setzero_ps();
  auto chunk = [&](__m256i words, int j, int64_t k0) __attribute__((always_inline)) {
    const __m512i c = _mm512_srlv_epi32(_mm512_permutexvar_epi32(idx[j], _mm512_castsi256_si512(words)), sh[j]);
    const __m512 v = _mm512_permutexvar_ps(c, table);
    const int u = C == 1 ? 0 : j;
    if (MODE == 0) {
      for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + b * ld + k0), acc[u][b]);
    } else {
      acc[u][0] = _mm512_fmadd_ps(v, _mm512_mul_ps(_mm512_loadu_ps(x + k0), _mm512_set1_ps(s[gidx[k0]])), acc[u][0]);
    }
  };
  const int64_t steps = full / STEP;
  const int64_t safe = nw / 8 < steps ? nw / 8 : steps;  // steps with 8 whole words readable
  int64_t k0 = 0;
  for (int64_t i = 0; i < safe; ++i, k0 += STEP) {
    _mm_prefetch(reinterpret_cast<const char*>(w + 8 * i) + 2048, _MM_HINT_T0);  // ahead of the code stream (past the row: the next row's)
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8 * i));
#pragma GCC unroll 8
    for (int j = 0; j < S; ++j) chunk(words, j, k0 + 16 * j);
  }
  for (int64_t i = safe; k0 < full; ++i, k0 += STEP) {  // the last (partial) steps: words past the row not read
    const __m256i words = load_words_end(w + 8 * i, nw - 8 * i);
    for (int j = 0; j < S && k0 + 16 * j < full; ++j) chunk(words, j, k0 + 16 * j);
  }
  for (int b = 0; b < NB; ++b) {
    __m512 sum = acc[0][b];
    for (int u = 1; u < C; ++u) sum = _mm512_add_ps(sum, acc[u][b]);
    out[b] = sum;
  }
}

// sum over the groups with columns below `full` of s * z * xg (masked loads: no reads past them)
inline float group_correction(const float* s, const float* z, const float* xg, int64_t used) {
  __m512 corr = _mm512_setzero_ps();
  for (int64_t g = 0; g < used; g += 16) {
    const __mmask16 m = used - g >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (used - g)) - 1u);
    corr = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + g), _mm512_maskz_loadu_ps(m, z + g)), _mm512_maskz_loadu_ps(m, xg + g), corr);
  }
  return _mm512_reduce_add_ps(corr);
}

// x's sums over every group's columns below `full`, for each of the B activation rows: xg [B][gp]
inline void group_sums(const Act& a, const int32_t* gidx, int64_t gp, float* xg) {
  const int64_t full = a.K & ~int64_t(15);
  for (int64_t b = 0; b < a.B; ++b) {
    float* xb = xg + b * gp;
    for (int64_t g = 0; g < gp; ++g) xb[g] = 0.0f;
    for (int64_t k = 0; k < full; ++k) xb[gidx[k]] += a.x[b * a.ld + k];
  }
}

inline __m512 code_floats(int bits) {  // ctab: float(c mod 2^bits) at lane c
  alignas(64) float c16[16];
  for (int c = 0; c < 16; ++c) c16[c] = static_cast<float>(c & ((1 << bits) - 1));
  return _mm512_load_ps(c16);
}

// One activation row of a 2/3/4-bit row with a group size a multiple of 16 (as spqr_row1's sum).
template <int BITS>
void scaled_row1(const GQArgs& A, __m512 ctab, int64_t r, int64_t b0, const float* s, const float* z, const float* xg) {
  const Act& a = A.a;
  const float* x = a.x + b0 * a.ld;
  const int64_t full = a.K & ~int64_t(15);
  __m512 sum[1];
  stream_row<BITS, 1, 1>(A.codes + r * A.cwords, A.cwords, full, x, a.ld, ctab, s, A.st.gidx, sum);
  float tail[1] = {-group_correction(s, z, xg, (full + A.st.gs - 1) / A.st.gs)};
  gq_tail<1>(A, r, full, x, s, z, tail);
  a.out[b0 * a.N + r] = _mm512_reduce_add_ps(sum[0]) + tail[0];
}

// -- bitmap --------------------------------------------------------------------------------------------

// The hardware prefetchers fall behind the two streams of a bitmap row (bitmask words and the values or
// codes, which advance at the data's own pace): ask for both ahead (this alone made the bitmap kernel
// ~2x faster with the weights coming from memory). Used by every row kernel that walks a bitmask.
inline void prefetch_ahead(const void* data, int64_t ahead_bytes, const uint32_t* words) {
  _mm_prefetch(static_cast<const char*>(data) + ahead_bytes, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(words + 256), _MM_HINT_T0);
}

// 32 columns (one bitmask word) a step, two halves of 16: each half's packed values loaded as 16 and
// expanded to their set lanes (vexpandps; a permute through an index table was 1.6x slower on Zen 5).
// Words [j0, j1) of row r's bitmask, its values from p on (p advances past them). Loads read 16
// values from where a half's start; while a whole span's worth lies before the end of the values no
// load needs its bounds checked.
template <int NB, bool FP16, int U>
inline void bitmap_span(const BitmapArgs& A, int64_t r, const float* x, int64_t j0, int64_t j1, const uint16_t*& p,
                        __m512 (&acc)[U][NB]) {
  const uint16_t* end = A.values + A.nnz;
  const uint32_t* bm = A.bitmask + r * A.bwords;
  const int64_t ld = A.a.ld;
  const uint16_t* q = p;  // a local: the compiler keeps it in a register
  if (q + 32 * (j1 - j0) + 16 <= end) {
    chunks<U>(j0, j1, 1, CK_LAMBDA(j) {
      CK_SET;
      if (u_ == 0) prefetch_ahead(q, 1536, bm + j);
      const uint32_t m = bm[j];
      const uint16_t* q1 = q + __builtin_popcount(m & 0xFFFFu);
      const __m512 w0 = _mm512_maskz_expand_ps(static_cast<__mmask16>(m), load_halves<FP16>(q));
      const __m512 w1 = _mm512_maskz_expand_ps(static_cast<__mmask16>(m >> 16), load_halves<FP16>(q1));
      q += __builtin_popcount(m);
      fma_x<NB>(acc[u_], w0, x + 32 * j, ld);
      fma_x<NB>(acc[u_], w1, x + 32 * j + 16, ld);
    });
  } else {  // near the end of the values: every load checked
    chunks<U>(j0, j1, 1, CK_LAMBDA(j) {
      CK_SET;
      const uint32_t m = bm[j];
      for (int h = 0; h < 2; ++h) {
        const uint32_t mh = (m >> (16 * h)) & 0xFFFFu;
        const __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(mh), load_halves<FP16>(q, end));
        q += __builtin_popcount(mh);
        fma_x<NB>(acc[u_], w, x + 32 * j + 16 * h, ld);
      }
    });
  }
  p = q;
}

template <int NB, bool FP16>
void bitmap_row(const BitmapArgs& A, int64_t r, int64_t b0, const uint16_t* p) {
  constexpr int U = Sets<NB>::value;
  __m512 acc[U][NB];
  clear(acc);
  bitmap_span<NB, FP16, U>(A, r, A.a.x + b0 * A.a.ld, 0, A.bwords, p, acc);
  const float tail[NB] = {};
  finish<NB, U>(A.a, r, b0, acc, tail);
}

// K-blocked rows [r0, r1) (as nm_block), row r's values from starts[r - r0].
template <int NB, bool FP16>
void bitmap_block(const BitmapArgs& A, int64_t r0, int64_t r1, int64_t b0, const uint16_t** starts, float* buf) {
  const float* x = A.a.x + b0 * A.a.ld;
  const int64_t span = kXBytes / (NB * 4) / 32, wb = span > 1 ? span : 1;
  const uint16_t* p[kRowBlock];
  for (int64_t r = r0; r < r1; ++r) p[r - r0] = starts[r - r0];
  for (int64_t i = 0; i < (r1 - r0) * NB * 16; ++i) buf[i] = 0.0f;
  for (int64_t j0 = 0; j0 < A.bwords; j0 += wb) {
    for (int64_t r = r0; r < r1; ++r) {
      float* rb = buf + (r - r0) * NB * 16;
      __m512 acc[1][NB];
      for (int b = 0; b < NB; ++b) acc[0][b] = _mm512_loadu_ps(rb + 16 * b);
      bitmap_span<NB, FP16, 1>(A, r, x, j0, j0 + wb < A.bwords ? j0 + wb : A.bwords, p[r - r0], acc);
      for (int b = 0; b < NB; ++b) _mm512_storeu_ps(rb + 16 * b, acc[0][b]);
    }
  }
  const float tail[NB] = {};
  for (int64_t r = r0; r < r1; ++r) {
    const float* rb = buf + (r - r0) * NB * 16;
    __m512 acc[1][NB];
    for (int b = 0; b < NB; ++b) acc[0][b] = _mm512_loadu_ps(rb + 16 * b);
    finish<NB, 1>(A.a, r, b0, acc, tail);
  }
}

// -- sparse + quant ------------------------------------------------------------------------------------

template <int NB, bool WINDOW>
void sq_nm_row(const SQArgs& A, const Tab& tc, const Tab& ti, __m512i pattern, int64_t r, int64_t b0, const float* s, const float* z) {
  constexpr int U = Sets<NB>::value;
  const Act& a = A.a;
  const Stats& st = A.st;
  const float* x = a.x + b0 * a.ld;
  __m512 acc[U][NB];
  clear(acc);
  Seq dc(tc, A.codes + r * A.cwords, A.cwords), di(ti, A.indices + r * A.iwords, A.iwords);
  const int64_t full = A.count & ~int64_t(15);
  chunks<U>(0, full, 16, CK_LAMBDA(k0) {
    CK_SET;
    const __m512 c = _mm512_cvtepi32_ps(dc.next());
    const __m512i idx = di.next();
    const int64_t c0 = A.colbase[k0];
    const int32_t g = st.gidx[c0];
    const __m512i col = WINDOW ? _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c0)), _mm512_add_epi32(pattern, idx))
                               : _mm512_add_epi32(_mm512_loadu_si512(A.colbase + k0), idx);
    __m512 w;
    if (g == st.gidx[A.colbase[k0 + 15] + A.m - 1]) {
      w = _mm512_mul_ps(_mm512_sub_ps(c, _mm512_set1_ps(z[g])), _mm512_set1_ps(s[g]));
    } else {
      const __m512i gi = _mm512_i32gather_epi32(col, st.gidx, 4);
      w = _mm512_mul_ps(_mm512_sub_ps(c, _mm512_i32gather_ps(gi, z, 4)), _mm512_i32gather_ps(gi, s, 4));
    }
    if (WINDOW) fma_cols<NB, true>(acc[u_], w, x, a.ld, c0, _mm512_add_epi32(pattern, idx), col);
    else fma_cols<NB, false>(acc[u_], w, x, a.ld, 0, idx, col);
  });
  float tail[NB] = {};
  for (int64_t k = full; k < A.count; ++k) {
    const int64_t col = A.colbase[k] + field(di.w, A.ibits, k);
    const int32_t g = st.gidx[col];
    const float wk = (static_cast<float>(field(dc.w, A.bits, k)) - z[g]) * s[g];
    for (int b = 0; b < NB; ++b) tail[b] += wk * x[b * a.ld + col];
  }
  finish<NB, U>(a, r, b0, acc, tail);
}

// The common case of sparse + quant N:M: a permute window, codes of at most 4 bits and groups made of
// whole steps (the group size a multiple of the 16 / N * M columns a step covers: 2:4 with group 128).
// Each group's 2^bits weights are a table (scale * (code - zero), as the reference computes them) and
// a step's weights one vpermps of its codes; 2-bit indices are read a word a step (TWO_BIT).
template <int NB, bool TWO_BIT>
void sq_nm_table_row(const SQArgs& A, const Tab& tc, const Tab& ti, __m512i pattern, int64_t r, int64_t b0, const float* s, const float* z) {
  constexpr int U = Sets<NB>::value;
  const Act& a = A.a;
  const float* x = a.x + b0 * a.ld;
  __m512 acc[U][NB];
  clear(acc);
  Seq dc(tc, A.codes + r * A.cwords, A.cwords), di(ti, A.indices + r * A.iwords, A.iwords);
  const int64_t full = A.count & ~int64_t(15), step = 16 / A.n * A.m, per_group = A.st.gs / step * 16;
  const __m512i sh2 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), three = _mm512_set1_epi32(3);
  const __m512 lanes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g0 = 0, g = 0; g0 < full; g0 += per_group, ++g) {
    const __m512 table = _mm512_mul_ps(_mm512_sub_ps(lanes, _mm512_set1_ps(z[g])), _mm512_set1_ps(s[g]));
    chunks<U>(g0, g0 + per_group < full ? g0 + per_group : full, 16, CK_LAMBDA(k0) {
      CK_SET;
      const __m512 w = _mm512_permutexvar_ps(dc.next(), table);
      const __m512i idx = TWO_BIT ? _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(di.w[k0 >> 4])), sh2), three)
                                  : di.next();
      fma_cols<NB, true>(acc[u_], w, x, a.ld, (k0 >> 4) * step, _mm512_add_epi32(pattern, idx), idx);
    });
  }
  float tail[NB] = {};
  for (int64_t k = full; k < A.count; ++k) {
    const int64_t col = A.colbase[k] + field(di.w, A.ibits, k);
    const int32_t g = A.st.gidx[col];
    const float wk = (static_cast<float>(field(dc.w, A.bits, k)) - z[g]) * s[g];
    for (int b = 0; b < NB; ++b) tail[b] += wk * x[b * a.ld + col];
  }
  finish<NB, U>(a, r, b0, acc, tail);
}

// One row of the unstructured form, its codes from word `start`; returns the codes it holds.
template <int NB, bool UNIFORM>
int64_t sq_bitmap_row(const SQArgs& A, const Tab& t, const Expand& e, int64_t r, int64_t b0, int64_t start, const float* s, const float* z) {
  constexpr int U = Sets<NB>::value;
  const Act& a = A.a;
  const Stats& st = A.st;
  const float* x = a.x + b0 * a.ld;
  __m512 acc[U][NB];
  clear(acc);
  const uint32_t* bm = A.bitmask + r * A.bwords;
  const uint64_t inv = (uint64_t(1) << 32) / t.per + 1;  // q / per = (q * inv) >> 32 for q < 2^27
  int64_t q = 0;
  const __m512 lanes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 table = lanes;
  int32_t table_group = -1;
  chunks<U>(0, A.bwords, 1, CK_LAMBDA(j) {
    CK_SET;
    if (u_ == 0) prefetch_ahead(A.codes + start + static_cast<int64_t>((static_cast<uint64_t>(q) * inv) >> 32), 768, bm + j);
    const uint32_t m = bm[j];
    if (!m) return;
    for (int h = 0; h < 2; ++h) {
      const uint32_t mh = (m >> (16 * h)) & 0xFFFFu;
      if (!mh) continue;
      const int64_t word = static_cast<int64_t>((static_cast<uint64_t>(q) * inv) >> 32);
      const __mmask16 mk = static_cast<__mmask16>(mh);
      const __m512i codes = decode(t, A.codes, A.total_words, start + word, static_cast<int>(q - word * t.per));
      const __m512i expanded = _mm512_maskz_permutexvar_epi32(mk, expand_index(e, mh), codes);
      const int64_t k0 = 32 * j + 16 * h;
      __m512 w;
      if (UNIFORM && A.bits <= 4) {  // the group's weights as a table (see sq_nm_table_row)
        const int32_t g = st.gidx[k0];
        if (g != table_group) {
          table = _mm512_mul_ps(_mm512_sub_ps(lanes, _mm512_set1_ps(z[g])), _mm512_set1_ps(s[g]));
          table_group = g;
        }
        w = _mm512_maskz_permutexvar_ps(mk, expanded, table);
      } else if (UNIFORM) {
        const int32_t g = st.gidx[k0];
        w = _mm512_maskz_mul_ps(mk, _mm512_sub_ps(_mm512_cvtepi32_ps(expanded), _mm512_set1_ps(z[g])), _mm512_set1_ps(s[g]));
      } else {
        const __m512i gi = _mm512_loadu_si512(st.gidx + k0);
        w = _mm512_maskz_mul_ps(mk, _mm512_sub_ps(_mm512_cvtepi32_ps(expanded), _mm512_i32gather_ps(gi, z, 4)), _mm512_i32gather_ps(gi, s, 4));
      }
      q += __builtin_popcount(mh);
      fma_x<NB>(acc[u_], w, x + k0, a.ld);
    }
  });
  const float tail[NB] = {};
  finish<NB, U>(a, r, b0, acc, tail);
  return q;
}

// 8-bit codes of the unstructured form, groups of whole bitmask words (gs % 32 == 0), on a CPU with
// AVX512_VBMI2: 32 columns a step, the row's next codes (bytes) expanded to their set lanes by one
// vpexpandb, widened to floats and multiplied by x as they are; the group's zero point and scale are
// applied once per group: s * (sum c x - z * sum_kept x). A third of the generic row's instructions.
// No lambdas here: the target attribute does not reach into them.
__attribute__((noinline, cold)) __m256i copy32b(const uint8_t* p, const uint8_t* end) {
  alignas(32) uint8_t buf[32] = {};
  for (int i = 0; p + i < end && i < 32; ++i) buf[i] = p[i];
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}

template <int NB>
__attribute__((target("avx512vbmi2"))) int64_t sq_bitmap_row8(const SQArgs& A, int64_t r, int64_t b0, int64_t start, const float* s,
                                                               const float* z) {
  const Act& a = A.a;
  const float* x = a.x + b0 * a.ld;
  const uint32_t* bm = A.bitmask + r * A.bwords;
  const uint8_t* codes = reinterpret_cast<const uint8_t*>(A.codes + start);
  const uint8_t* end = reinterpret_cast<const uint8_t*>(A.codes + A.total_words);
  const int64_t per_group = A.st.gs / 32;
  __m512 acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
  int64_t q = 0;
  for (int64_t g0 = 0, g = 0; g0 < A.bwords; g0 += per_group, ++g) {
    __m512 cx[2][NB], xs[NB];  // sum c * x (two chains: low and high half of a word) and sum of the kept x
    for (int b = 0; b < NB; ++b) cx[0][b] = cx[1][b] = xs[b] = _mm512_setzero_ps();
    const int64_t g1 = g0 + per_group < A.bwords ? g0 + per_group : A.bwords;
    for (int64_t j = g0; j < g1; ++j) {
      const uint32_t m = bm[j];
      const uint8_t* c = codes + q;
      const __m256i packed = c + 32 <= end ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c)) : copy32b(c, end);
      const __m256i expanded = _mm256_maskz_expand_epi8(m, packed);
      q += __builtin_popcount(m);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(expanded)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(expanded, 1)));
      for (int b = 0; b < NB; ++b) {
        const __m512 xl = _mm512_loadu_ps(x + b * a.ld + 32 * j), xh = _mm512_loadu_ps(x + b * a.ld + 32 * j + 16);
        cx[0][b] = _mm512_fmadd_ps(lo, xl, cx[0][b]);
        cx[1][b] = _mm512_fmadd_ps(hi, xh, cx[1][b]);
        xs[b] = _mm512_mask_add_ps(xs[b], static_cast<__mmask16>(m), xs[b], xl);
        xs[b] = _mm512_mask_add_ps(xs[b], static_cast<__mmask16>(m >> 16), xs[b], xh);
      }
    }
    const __m512 sv = _mm512_set1_ps(s[g]), zv = _mm512_set1_ps(z[g]);
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_fmadd_ps(sv, _mm512_fnmadd_ps(zv, xs[b], _mm512_add_ps(cx[0][b], cx[1][b])), acc[b]);
  }
  for (int b = 0; b < NB; ++b) a.out[(b0 + b) * a.N + r] = _mm512_reduce_add_ps(acc[b]);
  return q;
}

inline bool has_vbmi2() {
  static const bool yes = __builtin_cpu_supports("avx512vbmi2");
  return yes;
}

// A pass covers NB activation rows: 1..8 or 16 (16 fp32 accumulators fit in the 32 registers).
inline int pass_rows(int64_t left) { return left >= 16 ? 16 : left >= 8 ? 8 : static_cast<int>(left); }

#define CK_NB_SWITCH(nb, CALL)      \
  switch (nb) {                     \
    case 1: CALL(1) break;          \
    case 2: CALL(2) break;          \
    case 3: CALL(3) break;          \
    case 4: CALL(4) break;          \
    case 5: CALL(5) break;          \
    case 6: CALL(6) break;          \
    case 7: CALL(7) break;          \
    case 8: CALL(8) break;          \
    default: CALL(16) break;        \
  }

#define CK_PASSES(CALL)                                \
  for (int64_t b0 = 0; b0 < A.a.B;) {                  \
    const int nb = pass_rows(A.a.B - b0);              \
    switch (nb) {                                      \
      case 1: CALL(1); break;                          \
      case 2: CALL(2); break;                          \
      case 3: CALL(3); break;                          \
      case 4: CALL(4); break;                          \
      case 5: CALL(5); break;                          \
      case 6: CALL(6); break;                          \
      case 7: CALL(7); break;                          \
      case 8: CALL(8); break;                          \
      default: CALL(16); break;                        \
    }                                                  \
    b0 += nb;                                          \
  }

}  // namespace

// Whether a pass of nb activation rows over K columns runs K-blocked (its x does not fit L1).
inline bool blocked(int nb, int64_t K) { return nb >= 4 && nb * K * 4 > kXBytes; }

void nm_rows(const NMArgs& A, int64_t r0, int64_t r1, float* scratch) {
  const Tab t(A.ibits);
  const __m512i pattern = lane_pattern(A.n, A.m);
  const int mode = !A.window ? 0 : A.ibits == 2 ? 2 : 1;
  for (int64_t b0 = 0; b0 < A.a.B;) {
    const int nb = pass_rows(A.a.B - b0);
    const bool kblocks = blocked(nb, A.a.K);
#define CK_RUN(NB, FP16, MODE)                                                                                         \
  if (kblocks)                                                                                                         \
    for (int64_t rb = r0; rb < r1; rb += kRowBlock) nm_block<NB, FP16, MODE>(A, t, pattern, rb, rb + kRowBlock < r1 ? rb + kRowBlock : r1, b0, scratch); \
  else                                                                                                                 \
    for (int64_t r = r0; r < r1; ++r) nm_row<NB, FP16, MODE>(A, t, pattern, r, b0)
#define CK_MODES(NB, FP16)       \
  if (mode == 2) {               \
    CK_RUN(NB, FP16, 2);         \
  } else if (mode == 1) {        \
    CK_RUN(NB, FP16, 1);         \
  } else {                       \
    CK_RUN(NB, FP16, 0);         \
  }
#define CK_CALL(NB)              \
  if (A.fp16) {                  \
    CK_MODES(NB, true)           \
  } else {                       \
    CK_MODES(NB, false)          \
  }
    CK_NB_SWITCH(nb, CK_CALL)
#undef CK_CALL
#undef CK_MODES
#undef CK_RUN
    b0 += nb;
  }
}

void gq_rows(const GQArgs& A, int64_t r0, int64_t r1, float* scratch) {
  const Tab t(A.bits);
  float *s = scratch, *z = scratch + A.st.groups;
  const bool uniform = A.st.gs % 16 == 0, intz = A.st.zint != nullptr;
  if (A.planar) {
    for (int64_t b0 = 0; b0 < A.a.B;) {
      const int nb = pass_rows(A.a.B - b0);
      const bool kblocks = blocked(nb, A.a.K);
#define CK_RUN(NB, BITS, INTZ)                                                                                          \
  if (kblocks)                                                                                                          \
    for (int64_t rb = r0; rb < r1; rb += kRowBlock) gq_planar_block<NB, BITS, INTZ>(A, rb, rb + kRowBlock < r1 ? rb + kRowBlock : r1, b0, scratch); \
  else {                                                                                                                \
    int64_t r = r0;                                                                                                     \
    if (NB == 1 && b0 == 0 && A.a.B == 1 && A.a.K * 4 > kXBytes) /* x past L1 with the codes: shared by 4 rows */    \
      for (; r + 4 <= r1; r += 4) {                                                                                     \
        for (int i = 0; i < 4; ++i) row_stats(A.st, A.bits, r + i, s + i * A.st.groups, s + (4 + i) * A.st.groups);    \
        gq_planar_rows1<BITS, INTZ, 4>(A, r, s, s + 4 * A.st.groups);                                                   \
      }                                                                                                                 \
    for (; r < r1; ++r) {                                                                                               \
      row_stats(A.st, A.bits, r, s, z);                                                                                 \
      gq_planar_row<NB, BITS, INTZ>(A, r, b0, s, z);                                                                    \
    }                                                                                                                   \
  }
#define CK_BITS(NB, INTZ)        \
  if (A.bits == 4) {             \
    CK_RUN(NB, 4, INTZ);         \
  } else if (A.bits == 2) {      \
    CK_RUN(NB, 2, INTZ);         \
  } else {                       \
    CK_RUN(NB, 8, INTZ);         \
  }
#define CK_CALL(NB)              \
  if (intz) {                    \
    CK_BITS(NB, true)            \
  } else {                       \
    CK_BITS(NB, false)           \
  }
      CK_NB_SWITCH(nb, CK_CALL)
#undef CK_CALL
#undef CK_BITS
#undef CK_RUN
      b0 += nb;
    }
    return;
  }
  // 2/3/4 bits in whole groups of 16s: one activation row in super-steps (scaled_row1), the others as gq_row
  const bool stream = uniform && A.bits >= 2 && A.bits <= 4;
  const int64_t gp = (A.st.groups + 15) & ~int64_t(15);
  float* xg = scratch + 2 * A.st.groups;  // [B][gp]
  const __m512 ctab = code_floats(A.bits);
  if (stream) group_sums(A.a, A.st.gidx, gp, xg);
  for (int64_t r = r0; r < r1; ++r) {
    row_stats(A.st, A.bits, r, s, z);
#define CK_CALL(NB)                                                                                                  \
  if (NB == 1 && stream) {                                                                                           \
    A.bits == 3 ? scaled_row1<3>(A, ctab, r, b0, s, z, xg + b0 * gp) : A.bits == 4 ? scaled_row1<4>(A, ctab, r, b0, s, z, xg + b0 * gp) \
                                                                        : scaled_row1<2>(A, ctab, r, b0, s, z, xg + b0 * gp);           \
  } else if (uniform) gq_row<NB, true>(A, t, r, b0, s, z);                                                           \
  else gq_row<NB, false>(A, t, r, b0, s, z)
    CK_PASSES(CK_CALL)
#undef CK_CALL
  }
}

void bitmap_tiles(const BitmapArgs& A, int64_t t0, int64_t t1, float* scratch) {
  const int64_t rbegin = t0 * A.tile_rows, rend = t1 * A.tile_rows < A.a.N ? t1 * A.tile_rows : A.a.N;
  for (int64_t b0 = 0; b0 < A.a.B;) {
    const int nb = pass_rows(A.a.B - b0);
    const uint16_t* p = A.values;
    const uint16_t* starts[kRowBlock];
    int64_t filled = 0;
    for (int64_t r = rbegin; r < rend; ++r) {
      if (r % A.tile_rows == 0) p = A.values + tile_offset(A.off32, A.off64, r / A.tile_rows);
      starts[filled++] = p;
      if (!blocked(nb, A.a.K)) {
#define CK_CALL(NB) A.fp16 ? bitmap_row<NB, true>(A, r, b0, p) : bitmap_row<NB, false>(A, r, b0, p);
        CK_NB_SWITCH(nb, CK_CALL)
#undef CK_CALL
        filled = 0;
      } else if (filled == kRowBlock || r + 1 == rend) {
#define CK_CALL(NB)                                                                                                          \
  A.fp16 ? bitmap_block<NB, true>(A, r + 1 - filled, r + 1, b0, starts, scratch) : bitmap_block<NB, false>(A, r + 1 - filled, r + 1, b0, starts, scratch);
        CK_NB_SWITCH(nb, CK_CALL)
#undef CK_CALL
        filled = 0;
      }
      const uint32_t* bm = A.bitmask + r * A.bwords;
      for (int64_t j = 0; j < A.bwords; ++j) p += __builtin_popcount(bm[j]);
    }
    b0 += nb;
  }
}

void sq_rows(const SQArgs& A, int64_t u0, int64_t u1, float* scratch) {
  const Tab tc(A.bits);
  float *s = scratch, *z = scratch + A.st.groups;
  if (A.n) {
    const Tab ti(A.ibits);
    const __m512i pattern = lane_pattern(A.n, A.m);
    const bool table = A.window && A.bits <= 4 && A.st.gs % (16 / A.n * A.m) == 0;
    for (int64_t r = u0; r < u1; ++r) {
      row_stats(A.st, A.bits, r, s, z);
#define CK_CALL(NB)                                                                                                     \
  if (table) A.ibits == 2 ? sq_nm_table_row<NB, true>(A, tc, ti, pattern, r, b0, s, z) : sq_nm_table_row<NB, false>(A, tc, ti, pattern, r, b0, s, z); \
  else A.window ? sq_nm_row<NB, true>(A, tc, ti, pattern, r, b0, s, z) : sq_nm_row<NB, false>(A, tc, ti, pattern, r, b0, s, z)
      CK_PASSES(CK_CALL)
#undef CK_CALL
    }
    return;
  }
  const bool uniform = A.st.gs % 16 == 0, bytes = A.bits == 8 && A.st.gs % 32 == 0 && has_vbmi2();
  const Expand& e = expand_table();
  for (int64_t tile = u0; tile < u1; ++tile) {
    int64_t start = tile_offset(A.off32, A.off64, tile), kept = 0;
    const int64_t rend = (tile + 1) * A.tile_rows < A.a.N ? (tile + 1) * A.tile_rows : A.a.N;
    for (int64_t r = tile * A.tile_rows; r < rend; ++r) {
      row_stats(A.st, A.bits, r, s, z);
      if (bytes) {  // up to 4 activation rows a pass (more would spill its accumulators: the generic row then)
#define CK_CALL(NB)                                                                                   \
  kept = NB <= 4 ? sq_bitmap_row8<(NB <= 4 ? NB : 1)>(A, r, b0, start, s, z)                          \
                 : sq_bitmap_row<NB, true>(A, tc, e, r, b0, start, s, z)
        CK_PASSES(CK_CALL)
#undef CK_CALL
      } else {
#define CK_CALL(NB) kept = uniform ? sq_bitmap_row<NB, true>(A, tc, e, r, b0, start, s, z) : sq_bitmap_row<NB, false>(A, tc, e, r, b0, start, s, z)
        CK_PASSES(CK_CALL)
#undef CK_CALL
      }
      start += (kept + tc.per - 1) / tc.per;
    }
  }
}

// -- spqr and lut --------------------------------------------------------------------------------------

namespace {

// SpQR rows are group-quant rows once their statistics are decoded: the same row kernels.
void spqr_dense_row(const GQArgs& A, const Tab& t, int64_t r, const float* s, const float* z, bool uniform) {
#define CK_CALL(NB) uniform ? gq_row<NB, true>(A, t, r, b0, s, z) : gq_row<NB, false>(A, t, r, b0, s, z)
  CK_PASSES(CK_CALL)
#undef CK_CALL
}

int64_t spqr_sparse_row(const SQArgs& A, const Tab& t, const Expand& e, int64_t r, int64_t start, const float* s, const float* z, bool uniform) {
  int64_t kept = 0;
#define CK_CALL(NB) kept = uniform ? sq_bitmap_row<NB, true>(A, t, e, r, b0, start, s, z) : sq_bitmap_row<NB, false>(A, t, e, r, b0, start, s, z)
  CK_PASSES(CK_CALL)
#undef CK_CALL
  return kept;
}

// Row r's values of a SpQR statistic (as spqr_stat_row), 16 groups a step into v[0, groups rounded up to 16)
// (lanes past `groups` finite junk); `t` decodes its integer codes. low + step * code is rounded twice
// (vmulps, vaddps with explicit rounding: never fused), as the reference computes it.
void spqr_stat_vec(const SpQRStat& st, const Tab& t, int64_t groups, int64_t r, float* v) {
  if (st.half) {
    const uint16_t* h = st.half + r * groups;
    for (int64_t g = 0; g < groups; g += 16) _mm512_storeu_ps(v + g, load_halves<true>(h + g, h + groups));
    return;
  }
  Seq d(t, st.ints ? st.ints + r * st.iwords : st.qcodes + r * st.qwords, st.ints ? st.iwords : st.qwords);
  if (st.ints) {
    for (int64_t g = 0; g < groups; g += 16) _mm512_storeu_ps(v + g, _mm512_cvtepi32_ps(d.next()));
    return;
  }
  const uint16_t* step = st.step + (r / st.qgs) * groups;
  const uint16_t* low = st.low + (r / st.qgs) * groups;
  constexpr int RN = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t g = 0; g < groups; g += 16) {
    const __m512 c = _mm512_cvtepi32_ps(d.next());
    const __m512 sc = _mm512_mul_round_ps(load_halves<true>(step + g, step + groups), c, RN);
    _mm512_storeu_ps(v + g, _mm512_add_round_ps(load_halves<true>(low + g, low + groups), sc, RN));
  }
}

// A lut row: 16 codes a step, their weights one vpermps of the row's table (up to 4 bits: 16 entries, one
// register) or gathered from it (5-8 bits).
template <int NB, bool SMALL>
void lut_row(const GQArgs& A, const Tab& t, int64_t r, int64_t b0, const float* table) {
  constexpr int U = Sets<NB>::value;
  const Act& a = A.a;
  const float* x = a.x + b0 * a.ld;
  __m512 acc[U][NB];
  clear(acc);
  Seq d(t, A.codes + r * A.cwords, A.cwords);
  const int64_t full = a.K & ~int64_t(15);
  const __m512 tv = _mm512_loadu_ps(table);
  chunks<U>(0, full, 16, CK_LAMBDA(k0) {
    CK_SET;
    // up to 4 bits the table repeats every 2^bits of its 16 entries (lut_rows): no mask before vpermps
    fma_x<NB>(acc[u_], SMALL ? _mm512_permutexvar_ps(d.next_raw(), tv) : _mm512_i32gather_ps(d.next(), table, 4), x + k0, a.ld);
  });
  float tail[NB] = {};
  const uint32_t* w = A.codes + r * A.cwords;
  for (int64_t k = full; k < a.K; ++k) {
    const float wk = table[field(w, A.bits, k)];
    for (int b = 0; b < NB; ++b) tail[b] += wk * x[b * a.ld + k];
  }
  finish<NB, U>(a, r, b0, acc, tail);
}

// A masked lut row (as sq_bitmap_row): the kept codes permuted to their set lanes, then looked up.
template <int NB, bool SMALL>
int64_t lut_bitmap_row(const SQArgs& A, const Tab& t, const Expand& e, int64_t r, int64_t b0, int64_t start, const float* table) {
  constexpr int U = Sets<NB>::value;
  const Act& a = A.a;
  const float* x = a.x + b0 * a.ld;
  __m512 acc[U][NB];
  clear(acc);
  const uint32_t* bm = A.bitmask + r * A.bwords;
  const uint64_t inv = (uint64_t(1) << 32) / t.per + 1;  // q / per = (q * inv) >> 32 for q < 2^27
  const __m512 tv = _mm512_loadu_ps(table);
  int64_t q = 0;
  chunks<U>(0, A.bwords, 1, CK_LAMBDA(j) {
    CK_SET;
    if (u_ == 0) prefetch_ahead(A.codes + start + static_cast<int64_t>((static_cast<uint64_t>(q) * inv) >> 32), 768, bm + j);
    const uint32_t m = bm[j];
    if (!m) return;
    for (int h = 0; h < 2; ++h) {
      const uint32_t mh = (m >> (16 * h)) & 0xFFFFu;
      if (!mh) continue;
      const int64_t word = static_cast<int64_t>((static_cast<uint64_t>(q) * inv) >> 32);
      const __mmask16 mk = static_cast<__mmask16>(mh);
      const __m512i codes = decode(t, A.codes, A.total_words, start + word, static_cast<int>(q - word * t.per));
      const __m512i expanded = _mm512_maskz_permutexvar_epi32(mk, expand_index(e, mh), codes);
      const __m512 w = SMALL ? _mm512_maskz_permutexvar_ps(mk, expanded, tv) : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, expanded, table, 4);
      q += __builtin_popcount(mh);
      fma_x<NB>(acc[u_], w, x + 32 * j + 16 * h, a.ld);
    }
  });
  const float tail[NB] = {};
  finish<NB, U>(a, r, b0, acc, tail);
  return q;
}

// A 2/3/4-bit lut row in super-steps (stream_row).
template <int NB, int BITS>
void lut_stream_row(const GQArgs& A, int64_t r, int64_t b0, const float* table) {
  const Act& a = A.a;
  const float* x = a.x + b0 * a.ld;
  const int64_t full = a.K & ~int64_t(15);
  __m512 sum[NB];
  stream_row<BITS, 0, NB>(A.codes + r * A.cwords, A.cwords, full, x, a.ld, _mm512_loadu_ps(table), nullptr, nullptr, sum);
  float tail[NB] = {};
  const uint32_t* w = A.codes + r * A.cwords;
  for (int64_t k = full; k < a.K; ++k) {
    const float wk = table[field(w, A.bits, k)];
    for (int b = 0; b < NB; ++b) tail[b] += wk * x[b * a.ld + k];
  }
  for (int b = 0; b < NB; ++b) a.out[(b0 + b) * a.N + r] = _mm512_reduce_add_ps(sum[b]) + tail[b];
}

void lut_dense_pass(const GQArgs& A, const Tab& t, int64_t r, const float* table) {
#define CK_CALL(NB)                                                                                                        \
  A.bits == 3 ? lut_stream_row<NB, 3>(A, r, b0, table) : A.bits == 4 ? lut_stream_row<NB, 4>(A, r, b0, table) :            \
  A.bits == 2 ? lut_stream_row<NB, 2>(A, r, b0, table) : A.bits <= 4 ? lut_row<NB, true>(A, t, r, b0, table) : lut_row<NB, false>(A, t, r, b0, table)
  CK_PASSES(CK_CALL)
#undef CK_CALL
}

int64_t lut_sparse_pass(const SQArgs& A, const Tab& t, const Expand& e, int64_t r, int64_t start, const float* table) {
  int64_t kept = 0;
#define CK_CALL(NB) kept = A.bits <= 4 ? lut_bitmap_row<NB, true>(A, t, e, r, b0, start, table) : lut_bitmap_row<NB, false>(A, t, e, r, b0, start, table)
  CK_PASSES(CK_CALL)
#undef CK_CALL
  return kept;
}

// fix_outliers (common.h) for dense codes, 16 outliers a step: the code words, x and (spqr) the statistics
// gathered; a column's word and group come from fp32 (col + 0.5) / d, exact for the uint16 columns. The
// grid weight is computed as fix_outliers computes it (lut: table[code]; spqr: (code - z[g]) * s[g]).
template <bool LUT>
void fix_outliers_vec(const Act& a, const OutlierCSR& o, int64_t r, const uint32_t* codes, int bits, const float* table, const float* s,
                      const float* z, int64_t gs) {
  if (!o.ptr) return;
  const int32_t i0 = o.ptr[r], i1 = o.ptr[r + 1];
  if (i0 == i1) return;
  const int per = 32 / bits;
  const __m512 inv_per = _mm512_set1_ps(1.0f / static_cast<float>(per)), inv_gs = _mm512_set1_ps(1.0f / static_cast<float>(gs)),
               half = _mm512_set1_ps(0.5f);
  const __m512i perv = _mm512_set1_epi32(per), bitsv = _mm512_set1_epi32(bits), maskv = _mm512_set1_epi32((1 << bits) - 1);
  const __m512 tv = LUT && bits <= 4 ? _mm512_loadu_ps(table) : _mm512_setzero_ps();
  __m512 acc[16];
  const int64_t B = a.B;
  for (int64_t b = 0; b < B; ++b) acc[b] = _mm512_setzero_ps();
  for (int32_t i = i0; i < i1; i += 16) {
    const __mmask16 k = i1 - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (i1 - i)) - 1u);
    const __m512i col = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, o.cols + i));
    const __m512 colf = _mm512_add_ps(_mm512_cvtepi32_ps(col), half);
    const __m512i word = _mm512_cvttps_epi32(_mm512_mul_ps(colf, inv_per));
    const __m512i sh = _mm512_mullo_epi32(_mm512_sub_epi32(col, _mm512_mullo_epi32(word, perv)), bitsv);
    const __m512i cw = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, word, codes, 4);
    const __m512i code = _mm512_and_si512(_mm512_srlv_epi32(cw, sh), maskv);
    __m512 grid;
    if (LUT) {
      grid = bits <= 4 ? _mm512_permutexvar_ps(code, tv) : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, code, table, 4);
    } else {
      const __m512i g = _mm512_cvttps_epi32(_mm512_mul_ps(colf, inv_gs));
      const __m512 sg = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, g, s, 4), zg = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, g, z, 4);
      grid = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(code), zg), sg);
    }
    const __m512 delta = _mm512_maskz_sub_ps(k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, o.vals + i)), grid);
    for (int64_t b = 0; b < B; ++b)
      acc[b] = _mm512_fmadd_ps(delta, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, col, a.x + b * a.ld, 4), acc[b]);
  }
  for (int64_t b = 0; b < B; ++b) a.out[b * a.N + r] += _mm512_reduce_add_ps(acc[b]);
}

// Rows [u0, u1), or tiles [u0, u1) under a keep mask: prepare(r), the row's dot product (dense(r) or
// sparse(r, first word) -> codes read), then fix(r, code words, mask row) for its outliers.
template <typename P, typename D, typename S, typename F>
void walk_rows(const GQArgs& G, const SQArgs& Q, bool keep, int64_t u0, int64_t u1, int per, P prepare, D dense, S sparse, F fix) {
  if (!keep) {
    for (int64_t r = u0; r < u1; ++r) {
      prepare(r);
      dense(r);
      fix(r, G.codes + r * G.cwords, static_cast<const uint32_t*>(nullptr));
    }
    return;
  }
  for (int64_t tile = u0; tile < u1; ++tile) {
    int64_t start = tile_offset(Q.off32, Q.off64, tile);
    const int64_t rend = (tile + 1) * Q.tile_rows < Q.a.N ? (tile + 1) * Q.tile_rows : Q.a.N;
    for (int64_t r = tile * Q.tile_rows; r < rend; ++r) {
      prepare(r);
      const int64_t kept = sparse(r, start);
      fix(r, Q.codes + start, Q.bitmask + r * Q.bwords);
      start += (kept + per - 1) / per;
    }
  }
}

}  // namespace

void spqr_rows(const SpQRArgs& A, int64_t u0, int64_t u1, float* scratch) {
  const Tab t(A.dense.bits);
  const Expand& e = expand_table();
  const int64_t groups = A.dense.st.groups, gs = A.dense.st.gs, gp = (groups + 15) & ~int64_t(15);
  const auto stat_bits = [](const SpQRStat& st) { return st.half ? 8 : st.ints ? st.ibits : st.qbits; };
  const Tab ts(stat_bits(A.scale)), tz(stat_bits(A.zero));
  float *s = scratch, *z = scratch + gp, *xg = scratch + 2 * gp;  // xg: [B][gp] (scratch_floats(groups + 256) holds it)
  const bool uniform = gs % 16 == 0, fast = !A.keep && uniform && A.dense.bits >= 2 && A.dense.bits <= 4;
  const Act& a = A.dense.a;
  const __m512 ctab = code_floats(A.dense.bits);
  if (fast) group_sums(a, A.dense.st.gidx, gp, xg);
  walk_rows(
      A.dense, A.sparse, A.keep, u0, u1, t.per,
      [&](int64_t r) {
        spqr_stat_vec(A.scale, ts, groups, r, s);
        spqr_stat_vec(A.zero, tz, groups, r, z);
      },
      [&](int64_t r) {
        if (!fast) return spqr_dense_row(A.dense, t, r, s, z, uniform);
        for (int64_t b0 = 0; b0 < a.B;) {
          const int nb = pass_rows(a.B - b0);
          if (nb == 1) {
            const float* xb = xg + b0 * gp;
            A.dense.bits == 3 ? scaled_row1<3>(A.dense, ctab, r, b0, s, z, xb) : A.dense.bits == 4 ? scaled_row1<4>(A.dense, ctab, r, b0, s, z, xb)
                                                                                 : scaled_row1<2>(A.dense, ctab, r, b0, s, z, xb);
          }
          else {
#define CK_CALL(NB) gq_row<NB, true>(A.dense, t, r, b0, s, z);
            CK_NB_SWITCH(nb, CK_CALL)
#undef CK_CALL
          }
          b0 += nb;
        }
      },
      [&](int64_t r, int64_t start) { return spqr_sparse_row(A.sparse, t, e, r, start, s, z, uniform); },
      [&](int64_t r, const uint32_t* codes, const uint32_t* mask) {
        if (mask) fix_outliers(A.dense.a, A.outliers, r, codes, mask, A.dense.bits, nullptr, s, z, gs);
        else fix_outliers_vec<false>(A.dense.a, A.outliers, r, codes, A.dense.bits, nullptr, s, z, gs);
      });
}

void lut_rows(const LUTArgs& A, int64_t u0, int64_t u1, float* scratch) {
  const Tab t(A.dense.bits);
  const Expand& e = expand_table();
  const int64_t entries = int64_t(1) << A.dense.bits;
  float* table = scratch;
  walk_rows(
      A.dense, A.sparse, A.keep, u0, u1, t.per,
      [&](int64_t r) {
        for (int64_t c = 0; c < entries; ++c) table[c] = fp16_to_float(A.lut[r * entries + c]);
        for (int64_t c = entries; c < 16; ++c) table[c] = table[c & (entries - 1)];  // repeated (lut_row reads 4 bits)
      },
      [&](int64_t r) { lut_dense_pass(A.dense, t, r, table); },
      [&](int64_t r, int64_t start) { return lut_sparse_pass(A.sparse, t, e, r, start, table); },
      [&](int64_t r, const uint32_t* codes, const uint32_t* mask) {
        if (mask) fix_outliers(A.dense.a, A.outliers, r, codes, mask, A.dense.bits, table, nullptr, nullptr, 1);
        else fix_outliers_vec<true>(A.dense.a, A.outliers, r, codes, A.dense.bits, table, nullptr, nullptr, 1);
      });
}

}  // namespace avx512
}  // namespace ck
#else  // not x86-64: never called (isa_support reports scalar only)
#include "common.h"
namespace ck {
namespace avx512 {
void nm_rows(const NMArgs&, int64_t, int64_t, float*) {}
void gq_rows(const GQArgs&, int64_t, int64_t, float*) {}
void bitmap_tiles(const BitmapArgs&, int64_t, int64_t, float*) {}
void sq_rows(const SQArgs&, int64_t, int64_t, float*) {}
void spqr_rows(const SpQRArgs&, int64_t, int64_t, float*) {}
void lut_rows(const LUTArgs&, int64_t, int64_t, float*) {}
}  // namespace avx512
}  // namespace ck
#endif
