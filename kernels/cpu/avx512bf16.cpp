// AVX-512 BF16 path for bfloat16 activations times bfloat16 N:M values with a permute window: 32
// values a step, x kept in bfloat16 and permuted (vpermt2w), then vdpbf16ps: each bf16 x bf16 product
// is exact in fp32 and the sums are fp32, so the result agrees with the fp32 kernels to fp32 rounding.
// Chosen by ops.cpp inside the "avx512" path when the CPU has AVX512_BF16; compiled for it by the
// pragma below alone. Also bitmap rows with bfloat16 values: 32 columns a step, the values expanded to
// their set lanes by one vpexpandw (AVX512_VBMI2, compiled per function: a CPU may have BF16 without
// it) and multiplied by x in bfloat16 by one vdpbf16ps: a third of the fp32 kernel's instructions. And
// 2/4-bit group-quant rows and 4-bit N:M sparse + quant rows: their codes turned into exact bfloat16 in
// registers (see below), then vdpbf16ps: half the fp32 kernels' instructions a weight.
#if defined(__x86_64__)
#include <immintrin.h>

#include <type_traits>

#include "common.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2,popcnt")

namespace ck {
namespace avx512bf16 {
namespace {

#include "avx512_decode.h"  // NOLINT: inside the anonymous namespace on purpose
#include "unroll.h"         // NOLINT: likewise

#define CK_LAMBDA(...) [&](auto set_, int64_t __VA_ARGS__) __attribute__((always_inline))
#define CK_SET constexpr int u_ = decltype(set_)::value

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

inline __m512i pattern32(int n, int m) {  // (l / n) * m for 32 16-bit lanes
  alignas(64) uint16_t v[32];
  for (int l = 0; l < 32; ++l) v[l] = static_cast<uint16_t>((l / n) * m);
  return _mm512_load_si512(v);
}

// The indices of values k0 .. k0 + 31 as two vectors of 16 dwords (values k0 .. k0 + 15, then the next 16): 2-bit
// indices (TWO_BIT) read a word a 16 values straight, wider ones from the row's decoder in order.
template <bool TWO_BIT>
inline void indices32(Seq& d, int64_t k0, __m512i& lo, __m512i& hi) {
  if (TWO_BIT) {
    const __m512i sh2 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30), three = _mm512_set1_epi32(3);
    lo = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(d.w[k0 >> 4])), sh2), three);
    hi = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(d.w[(k0 >> 4) + 1])), sh2), three);
  } else {
    lo = d.next();
    hi = d.next();
  }
}

// Values [v0, v1) of row r (multiples of 32 and of 16 * t.P) into acc.
template <int NB, bool TWO_BIT, int U>
inline void nm_span(const NMArgs& A, const Tab& t, __m512i pattern, int64_t r, const uint16_t* x, int64_t v0, int64_t v1, __m512 (&acc)[U][NB]) {
  const uint16_t* v = A.values + r * A.count;
  Seq d(t, A.indices + r * A.iwords, A.iwords, v0);
  const int64_t step = 32 / A.n * A.m, ld = A.a.ld;
  // the low 16 bits of the 16 dwords of a, then of b
  const __m512i low_halves = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32,
                                              30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  chunks<U>(v0, v1, 32, CK_LAMBDA(k0) {
    CK_SET;
    const int64_t c0 = (k0 >> 5) * step;
    const __m512i w = _mm512_loadu_si512(v + k0);
    __m512i lo, hi;
    indices32<TWO_BIT>(d, k0, lo, hi);
    const __m512i rel = _mm512_add_epi16(pattern, _mm512_permutex2var_epi16(lo, low_halves, hi));
    for (int b = 0; b < NB; ++b) {
      const uint16_t* xb = x + b * ld + c0;
      const __m512i xv = _mm512_permutex2var_epi16(_mm512_loadu_si512(xb), rel, _mm512_loadu_si512(xb + 32));
      acc[u_][b] = _mm512_dpbf16_ps(acc[u_][b], (__m512bh)w, (__m512bh)xv);
    }
  });
}

template <int NB>
inline void nm_tail(const NMArgs& A, int64_t r, const uint16_t* x, float* tail) {
  const uint16_t* v = A.values + r * A.count;
  const uint32_t* iw = A.indices + r * A.iwords;
  for (int64_t k = A.count & ~int64_t(31); k < A.count; ++k) {
    const float wk = bf16_to_float(v[k]);
    const int64_t col = A.colbase[k] + field(iw, A.ibits, k);
    for (int b = 0; b < NB; ++b) tail[b] += wk * bf16_to_float(x[b * A.a.ld + col]);
  }
}

template <int NB, bool TWO_BIT>
void nm_row(const NMArgs& A, const Tab& t, __m512i pattern, int64_t r, int64_t b0) {
  constexpr int U = Sets<NB>::value;
  const uint16_t* x = A.a.xh + b0 * A.a.ld;
  __m512 acc[U][NB];
  clear(acc);
  nm_span<NB, TWO_BIT, U>(A, t, pattern, r, x, 0, A.count & ~int64_t(31), acc);
  float tail[NB] = {};
  nm_tail<NB>(A, r, x, tail);
  finish<NB, U>(A.a, r, b0, acc, tail);
}

// K-blocked rows [r0, r1), as avx512.cpp's nm_block (x in bfloat16: twice the columns fit).
template <int NB, bool TWO_BIT>
void nm_block(const NMArgs& A, const Tab& t, __m512i pattern, int64_t r0, int64_t r1, int64_t b0, float* buf) {
  const uint16_t* x = A.a.xh + b0 * A.a.ld;
  const int64_t full = A.count & ~int64_t(31), unit = t.P % 2 ? 32 * t.P : 16 * t.P;
  const int64_t span = (kXBytes / (NB * 2) * A.n / A.m) / unit * unit, vb = span > unit ? span : unit;
  for (int64_t i = 0; i < (r1 - r0) * NB * 16; ++i) buf[i] = 0.0f;
  for (int64_t v0 = 0; v0 < full; v0 += vb) {
    for (int64_t r = r0; r < r1; ++r) {
      float* rb = buf + (r - r0) * NB * 16;
      __m512 acc[1][NB];
      for (int b = 0; b < NB; ++b) acc[0][b] = _mm512_loadu_ps(rb + 16 * b);
      nm_span<NB, TWO_BIT, 1>(A, t, pattern, r, x, v0, v0 + vb < full ? v0 + vb : full, acc);
      for (int b = 0; b < NB; ++b) _mm512_storeu_ps(rb + 16 * b, acc[0][b]);
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const float* rb = buf + (r - r0) * NB * 16;
    __m512 acc[1][NB];
    for (int b = 0; b < NB; ++b) acc[0][b] = _mm512_loadu_ps(rb + 16 * b);
    float tail[NB] = {};
    nm_tail<NB>(A, r, x, tail);
    finish<NB, 1>(A.a, r, b0, acc, tail);
  }
}

inline int pass_rows(int64_t left) { return left >= 16 ? 16 : left >= 8 ? 8 : static_cast<int>(left); }

// -- bitmap (AVX512_VBMI2 as well) ---------------------------------------------------------------------

// 32 bfloat16 values from p, reading none at or past `end`.
__attribute__((noinline, cold)) __m512i copy32(const uint16_t* p, const uint16_t* end) {
  alignas(64) uint16_t buf[32] = {};
  for (int i = 0; p + i < end && i < 32; ++i) buf[i] = p[i];
  return _mm512_load_si512(buf);
}

// Row r's 32-column words [0, bwords) against NB rows of x (bfloat16); returns where the next row's values start.
template <int NB>
__attribute__((target("avx512vbmi2"))) const uint16_t* bitmap_row(const BitmapArgs& A, int64_t r, int64_t b0, const uint16_t* p) {
  constexpr int U = Sets<NB>::value;
  const uint16_t* x = A.a.xh + b0 * A.a.ld;
  const uint32_t* bm = A.bitmask + r * A.bwords;
  const uint16_t* end = A.values + A.nnz;
  const int64_t ld = A.a.ld, words = A.bwords;
  __m512 acc[U][NB];
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_setzero_ps();
  int64_t j = 0;
  if (p + 32 * words + 32 <= end) {  // no load of this row can pass the end: none checked
    for (; j + U <= words; j += U) {
      // the hardware prefetchers fall behind these two streams: ask for both ahead (~2x from memory)
      _mm_prefetch(reinterpret_cast<const char*>(p + 768), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(bm + j + 256), _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        const uint32_t m = bm[j + u];
        const __m512i w = _mm512_maskz_expand_epi16(m, _mm512_loadu_si512(p));
        p += __builtin_popcount(m);
        for (int b = 0; b < NB; ++b)
          acc[u][b] = _mm512_dpbf16_ps(acc[u][b], (__m512bh)w, (__m512bh)_mm512_loadu_si512(x + b * ld + 32 * (j + u)));
      }
    }
  }
  for (; j < words; ++j) {
    const uint32_t m = bm[j];
    const __m512i w = _mm512_maskz_expand_epi16(m, p + 32 <= end ? _mm512_loadu_si512(p) : copy32(p, end));
    p += __builtin_popcount(m);
    for (int b = 0; b < NB; ++b) acc[0][b] = _mm512_dpbf16_ps(acc[0][b], (__m512bh)w, (__m512bh)_mm512_loadu_si512(x + b * ld + 32 * j));
  }
  const float tail[NB] = {};
  finish<NB, U>(A.a, r, b0, acc, tail);
  return p;
}


// -- group quant, 2, 4 or 8 bits ------------------------------------------------------------------------

// A code c (< 128) as the bfloat16 0x4300 | c, which is exactly 128 + c: one vpternlogd turns 32 codes into
// bfloat16 and one vdpbf16ps multiplies them by x. A group then adds s * (sum (128 + c) x - (128 + z) sum x):
// the sum of x once a call (xsum), the factor s (128 + z) once a row (coef), so the loop does no per-weight
// scale or zero: a 32-byte step (64 codes of 4 bits, 128 of 2) is a load, 2-4 logic ops and 2-4 dot products
// a row of x, half the fp32 kernel's instructions. Products are exact in fp32, the sums fp32. An 8-bit code has
// no such form (128 + c needs 9 bits); as 16 h + l it is two: 0x4300 | l (128 + l) and 0x4500 | h (16 (128 + h)),
// both dotted with the same x, the offset 2176.

// Row r's scales, zero points and s * (offset + z) into s, z, coef [groups padded to 16, zero past them]; the
// offset is what the bfloat16 form adds to each code: 128, or 2176 = 16 * 128 + 128 for 8-bit codes.
inline void row_coef(const Stats& st, int bits, int64_t r, float* s, float* z, float* coef) {
  const int per = 32 / bits;  // a power of two here
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g0 = 0; g0 < st.groups; g0 += 16) {
    const __mmask16 m = st.groups - g0 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (st.groups - g0)) - 1u);
    const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, st.scale + r * st.groups + g0));
    __m512 zv;
    if (st.zint) {
      const __m512i g = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(g0)));
      const __m512i w = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, _mm512_srli_epi32(g, __builtin_ctz(per)), st.zint + r * st.zwords, 4);
      zv = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(w, _mm512_mullo_epi32(_mm512_and_si512(g, _mm512_set1_epi32(per - 1)),
                                                                                          _mm512_set1_epi32(bits))),
                                               _mm512_set1_epi32((1 << bits) - 1)));
    } else {
      zv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, st.zhalf + r * st.groups + g0));
    }
    _mm512_storeu_ps(s + g0, sv);
    _mm512_storeu_ps(z + g0, zv);
    _mm512_storeu_ps(coef + g0, _mm512_maskz_mul_ps(m, sv, _mm512_add_ps(zv, _mm512_set1_ps(bits == 8 ? 2176.0f : 128.0f))));
  }
}

// FAR: rows of x past ~12 KiB. They do not stay in L1 beside the code stream (one row of x: 26 GB/s at
// 8 KiB, 15 GB/s at 22 KiB, 10 at 32, one thread), unless the codes come in by non-temporal prefetches
// (18.6 and 15.5 GB/s there); below that size the prefetches cost a little.
template <int NB, int BITS, bool FAR>
void gq_row(const GQArgs& A, int64_t r, int64_t b0, const float* s, const float* z, const float* coef) {
  constexpr int Q = 8 / BITS, STEP = 32 * Q;
  const Act& a = A.a;
  const uint16_t* x = a.xh + b0 * a.ld;
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(A.codes + r * A.cwords);
  const int64_t ld = a.ld, gs = A.st.gs, full = a.K / STEP * STEP;
  const __m512i bias = _mm512_set1_epi16(0x4300), fmask = _mm512_set1_epi16((1 << BITS) - 1);
  __m512 acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
  for (int64_t g0 = 0, g = 0; g0 < full; g0 += gs, ++g) {
    const int64_t end = g0 + gs < full ? g0 + gs : full;
    __m512 part[2][NB];  // two chains a row (alternate fields): the dot products' latency overlaps
    for (int b = 0; b < NB; ++b) part[0][b] = part[1][b] = _mm512_setzero_ps();
    for (int64_t k0 = g0; k0 < end; k0 += STEP) {
      if (FAR) _mm_prefetch(reinterpret_cast<const char*>(bytes + k0 / Q) + 2048, _MM_HINT_NTA);
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + k0 / Q)));
      if (BITS == 8) {  // c = 16 h + l: bf16 0x4300 | l is 128 + l, 0x4500 | h is 16 (128 + h); both against the same x
        const __m512i lo = _mm512_ternarylogic_epi32(v, _mm512_set1_epi16(15), bias, 0xEA);
        const __m512i hi = _mm512_or_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi16(0x4500));
        for (int b = 0; b < NB; ++b) {
          const __m512i xv = _mm512_loadu_si512(x + b * ld + k0);
          part[0][b] = _mm512_dpbf16_ps(part[0][b], (__m512bh)lo, (__m512bh)xv);
          part[1][b] = _mm512_dpbf16_ps(part[1][b], (__m512bh)hi, (__m512bh)xv);
        }
        continue;
      }
      for (int j = 0; j < Q; ++j) {
        const __m512i c = BITS == 4 && j == 1 ? _mm512_or_si512(_mm512_srli_epi16(v, 4), bias)
                                              : _mm512_ternarylogic_epi32(j ? _mm512_srli_epi16(v, j * BITS) : v, fmask, bias, 0xEA);
        for (int b = 0; b < NB; ++b)
          part[j & 1][b] = _mm512_dpbf16_ps(part[j & 1][b], (__m512bh)c, (__m512bh)_mm512_loadu_si512(x + b * ld + k0 + 32 * j));
      }
    }
    const __m512 sv = _mm512_set1_ps(s[g]);
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_fmadd_ps(sv, _mm512_add_ps(part[0][b], part[1][b]), acc[b]);
  }
  const int64_t gp = (A.st.groups + 15) & ~int64_t(15);
  const uint32_t* w = A.codes + r * A.cwords;
  for (int b = 0; b < NB; ++b) {
    const float* xs = A.xsum + (a.first + b0 + b) * A.xsum_ld;
    __m512 corr = _mm512_setzero_ps();
    for (int64_t g = 0; g < gp; g += 16) corr = _mm512_fmadd_ps(_mm512_loadu_ps(coef + g), _mm512_loadu_ps(xs + g), corr);
    float tail = 0.0f;  // columns past the last whole step, as the reference computes them
    for (int64_t k = full; k < a.K; ++k) {
      const int64_t g = k / gs;
      tail += (static_cast<float>(field(w, BITS, k)) - z[g]) * s[g] * bf16_to_float(x[b * ld + k]);
    }
    a.out[(b0 + b) * a.N + r] = _mm512_reduce_add_ps(acc[b]) - _mm512_reduce_add_ps(corr) + tail;
  }
}


// -- sparse + quant N:M, 4-bit codes with integer zero points ----------------------------------------------

// A step is 32 kept values (16 code bytes, one 64-column permute window). The bytes widened to 16-bit lanes,
// then their high nibbles shifted into lanes 16-31: lane w holds value v(w) = 2w (w < 16) or 2(w - 16) + 1.
// One vpermw turns the 32 codes into bfloat16 (code - zero) from the group's table (32 entries: the low 5 bits
// of a lane index it, the table repeating every 16), exact for integer zero points; the indices are put in
// the same lane order. Then as nm_span: x gathered by vpermt2w, one vdpbf16ps a row of x.
inline int lane_value(int w) { return w < 16 ? 2 * w : 2 * (w - 16) + 1; }

template <int NB, bool TWO_BIT>
void sq_nm_row(const SQArgs& A, const Tab& ti, int64_t r, int64_t b0, const float* s, const float* z) {
  alignas(64) uint16_t sel[32], pat[32];
  for (int w = 0; w < 32; ++w) {
    const int v = lane_value(w);
    sel[w] = static_cast<uint16_t>(v < 16 ? 2 * v : 32 + 2 * (v - 16));
    pat[w] = static_cast<uint16_t>((v / A.n) * A.m);
  }
  const __m512i select = _mm512_load_si512(sel), pattern = _mm512_load_si512(pat);
  const Act& a = A.a;
  const uint16_t* x = a.xh + b0 * a.ld;
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(A.codes + r * A.cwords);
  Seq d(ti, A.indices + r * A.iwords, A.iwords);
  const int64_t ld = a.ld, step = 32 / A.n * A.m, full = A.count & ~int64_t(31), per_group = A.st.gs / step * 32;
  const __m512 lanes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
  for (int64_t v0 = 0, g = 0; v0 < full; v0 += per_group, ++g) {
    const __m256i half = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(lanes, _mm512_set1_ps(z[g])));
    const __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
    __m512 part[2][NB];
    for (int b = 0; b < NB; ++b) part[0][b] = part[1][b] = _mm512_setzero_ps();
    const int64_t end = v0 + per_group < full ? v0 + per_group : full;
    for (int64_t k0 = v0; k0 < end; k0 += 32) {
      const __m256i by = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + k0 / 2)));
      const __m512i w = _mm512_permutexvar_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(by), _mm256_srli_epi16(by, 4), 1), table);
      __m512i lo, hi;
      indices32<TWO_BIT>(d, k0, lo, hi);
      const __m512i rel = _mm512_add_epi16(pattern, _mm512_permutex2var_epi16(lo, select, hi));
      const int64_t c0 = (k0 >> 5) * step;
      const int p = static_cast<int>((k0 >> 5) & 1);
      for (int b = 0; b < NB; ++b) {
        const uint16_t* xb = x + b * ld + c0;
        const __m512i xv = _mm512_permutex2var_epi16(_mm512_loadu_si512(xb), rel, _mm512_loadu_si512(xb + 32));
        part[p][b] = _mm512_dpbf16_ps(part[p][b], (__m512bh)w, (__m512bh)xv);
      }
    }
    const __m512 sv = _mm512_set1_ps(s[g]);
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_fmadd_ps(sv, _mm512_add_ps(part[0][b], part[1][b]), acc[b]);
  }
  for (int b = 0; b < NB; ++b) {
    float tail = 0.0f;  // values past the last whole step, as the reference computes them
    for (int64_t k = full; k < A.count; ++k) {
      const int64_t col = A.colbase[k] + field(A.indices + r * A.iwords, A.ibits, k);
      const int32_t g = A.st.gidx[col];
      tail += (static_cast<float>(field(A.codes + r * A.cwords, 4, k)) - z[g]) * s[g] * bf16_to_float(x[b * ld + col]);
    }
    a.out[(b0 + b) * a.N + r] = _mm512_reduce_add_ps(acc[b]) + tail;
  }
}

}  // namespace

void bitmap_tiles(const BitmapArgs& A, int64_t t0, int64_t t1) {
  const int64_t rend = t1 * A.tile_rows < A.a.N ? t1 * A.tile_rows : A.a.N;
  for (int64_t b0 = 0; b0 < A.a.B;) {
    const int nb = pass_rows(A.a.B - b0);
    for (int64_t tile = t0; tile < t1; ++tile) {
      const uint16_t* p = A.values + tile_offset(A.off32, A.off64, tile);
      const int64_t r1 = (tile + 1) * A.tile_rows < rend ? (tile + 1) * A.tile_rows : rend;
      for (int64_t r = tile * A.tile_rows; r < r1; ++r) {
        switch (nb) {
          case 1: p = bitmap_row<1>(A, r, b0, p); break;
          case 2: p = bitmap_row<2>(A, r, b0, p); break;
          case 3: p = bitmap_row<3>(A, r, b0, p); break;
          case 4: p = bitmap_row<4>(A, r, b0, p); break;
          case 5: p = bitmap_row<5>(A, r, b0, p); break;
          case 6: p = bitmap_row<6>(A, r, b0, p); break;
          case 7: p = bitmap_row<7>(A, r, b0, p); break;
          case 8: p = bitmap_row<8>(A, r, b0, p); break;
          default: p = bitmap_row<16>(A, r, b0, p); break;
        }
      }
    }
    b0 += nb;
  }
}

void nm_rows(const NMArgs& A, int64_t r0, int64_t r1, float* scratch) {
  const Tab t(A.ibits);
  const __m512i pattern = pattern32(A.n, A.m);
  for (int64_t b0 = 0; b0 < A.a.B;) {
    const int nb = pass_rows(A.a.B - b0);
    const bool kblocks = nb >= 4 && nb * A.a.K * 2 > kXBytes;
#define CK_RUN(NB, TWO)                                                                                              \
  if (kblocks)                                                                                                       \
    for (int64_t rb = r0; rb < r1; rb += kRowBlock) nm_block<NB, TWO>(A, t, pattern, rb, rb + kRowBlock < r1 ? rb + kRowBlock : r1, b0, scratch); \
  else                                                                                                               \
    for (int64_t r = r0; r < r1; ++r) nm_row<NB, TWO>(A, t, pattern, r, b0)
#define CK_CALL(NB)              \
  if (A.ibits == 2) {            \
    CK_RUN(NB, true);            \
  } else {                       \
    CK_RUN(NB, false);           \
  }
    switch (nb) {
      case 1: CK_CALL(1) break;
      case 2: CK_CALL(2) break;
      case 3: CK_CALL(3) break;
      case 4: CK_CALL(4) break;
      case 5: CK_CALL(5) break;
      case 6: CK_CALL(6) break;
      case 7: CK_CALL(7) break;
      case 8: CK_CALL(8) break;
      default: CK_CALL(16) break;
    }
#undef CK_CALL
#undef CK_RUN
    b0 += nb;
  }
}


namespace {

// Rows [r0, r1) of a code kernel: each row's statistics (row_coef), then its activation rows in passes of up to
// 8 (two dot chains each: 24 accumulators); pass(std::integral_constant<int, NB>, r, b0, s, z, coef) runs one.
template <typename Args, typename Pass>
void code_rows(const Args& A, int64_t r0, int64_t r1, float* scratch, Pass pass) {
  const int64_t gp = (A.st.groups + 15) & ~int64_t(15);
  float *s = scratch, *z = scratch + gp, *coef = scratch + 2 * gp;
  for (int64_t r = r0; r < r1; ++r) {
    row_coef(A.st, A.bits, r, s, z, coef);
    for (int64_t b0 = 0; b0 < A.a.B;) {
      const int nb = A.a.B - b0 >= 8 ? 8 : static_cast<int>(A.a.B - b0);
      switch (nb) {
        case 1: pass(std::integral_constant<int, 1>(), r, b0, s, z, coef); break;
        case 2: pass(std::integral_constant<int, 2>(), r, b0, s, z, coef); break;
        case 3: pass(std::integral_constant<int, 3>(), r, b0, s, z, coef); break;
        case 4: pass(std::integral_constant<int, 4>(), r, b0, s, z, coef); break;
        case 5: pass(std::integral_constant<int, 5>(), r, b0, s, z, coef); break;
        case 6: pass(std::integral_constant<int, 6>(), r, b0, s, z, coef); break;
        case 7: pass(std::integral_constant<int, 7>(), r, b0, s, z, coef); break;
        default: pass(std::integral_constant<int, 8>(), r, b0, s, z, coef); break;
      }
      b0 += nb;
    }
  }
}

}  // namespace

void gq_rows(const GQArgs& A, int64_t r0, int64_t r1, float* scratch) {
  code_rows(A, r0, r1, scratch, [&](auto n, int64_t r, int64_t b0, const float* s, const float* z, const float* coef) {
    constexpr int NB = decltype(n)::value;
    if (NB * A.a.K * 2 > 12 * 1024) {
      A.bits == 4 ? gq_row<NB, 4, true>(A, r, b0, s, z, coef) : A.bits == 2 ? gq_row<NB, 2, true>(A, r, b0, s, z, coef) : gq_row<NB, 8, true>(A, r, b0, s, z, coef);
    } else {
      A.bits == 4 ? gq_row<NB, 4, false>(A, r, b0, s, z, coef) : A.bits == 2 ? gq_row<NB, 2, false>(A, r, b0, s, z, coef) : gq_row<NB, 8, false>(A, r, b0, s, z, coef);
    }
  });
}

void sq_nm_rows(const SQArgs& A, int64_t r0, int64_t r1, float* scratch) {
  const Tab ti(A.ibits);
  code_rows(A, r0, r1, scratch, [&](auto n, int64_t r, int64_t b0, const float* s, const float* z, const float*) {
    constexpr int NB = decltype(n)::value;
    A.ibits == 2 ? sq_nm_row<NB, true>(A, ti, r, b0, s, z) : sq_nm_row<NB, false>(A, ti, r, b0, s, z);
  });
}

}  // namespace avx512bf16
}  // namespace ck
#else  // not x86-64: never called (isa_support reports scalar only)
#include "common.h"
namespace ck {
namespace avx512bf16 {
void nm_rows(const NMArgs&, int64_t, int64_t, float*) {}
void bitmap_tiles(const BitmapArgs&, int64_t, int64_t) {}
void gq_rows(const GQArgs&, int64_t, int64_t, float*) {}
void sq_nm_rows(const SQArgs&, int64_t, int64_t, float*) {}
}  // namespace avx512bf16
}  // namespace ck
#endif
