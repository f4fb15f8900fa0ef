// AVX2 + FMA + F16C path: 8 fp32 lanes; weights decoded in registers, fp32 FMA accumulation, up to
// 8 activation rows a pass. Compiled for AVX2 by the pragma below (this file only), called only when
// the CPU has it.
#if defined(__x86_64__)
#include <immintrin.h>

#include "common.h"

#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")

namespace ck {
namespace avx2 {
namespace {

#include "unroll.h"  // NOLINT: inside the anonymous namespace on purpose

#define CK_LAMBDA(...) [&](auto set_, int64_t __VA_ARGS__) __attribute__((always_inline))
#define CK_SET constexpr int u_ = decltype(set_)::value

// Lane l of a chunk of 8 fields that starts at field r of its first word: word (r + l) / per, shift
// ((r + l) % per) * bits (a chunk lies in at most 3 consecutive words). Walking a row repeats every P
// chunks (Wp words): chunk j of a period starts at field rj[j] of word wj[j].
struct Tab {
  __m256i wi[32], sh[32];
  __m256i fmask;
  int per, P, Wp, rj[8], wj[8];
  explicit Tab(int bits) : per(32 / bits) {
    for (int r = 0; r < per; ++r) {
      alignas(32) int32_t w[8], s[8];
      for (int l = 0; l < 8; ++l) {
        w[l] = (r + l) / per;
        s[l] = ((r + l) % per) * bits;
      }
      wi[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(w));
      sh[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
    }
    fmask = _mm256_set1_epi32(static_cast<int>((1u << bits) - 1u));
    int fields = 8;
    while (fields % per) fields += 8;  // lcm(8, per)
    P = fields / 8;
    Wp = fields / per;
    for (int j = 0; j < P; ++j) {
      rj[j] = (8 * j) % per;
      wj[j] = (8 * j) / per;
    }
  }
};

inline __m256i decode(const Tab& t, const uint32_t* w, int64_t nw, int64_t w0, int r) {
  const int64_t avail = nw - w0;
  __m256i words;
  if (avail >= 8) {
    words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + w0));
  } else {
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(avail)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    words = _mm256_maskload_epi32(reinterpret_cast<const int*>(w + w0), lanes);
  }
  const __m256i v = _mm256_permutevar8x32_epi32(words, t.wi[r]);
  return _mm256_and_si256(_mm256_srlv_epi32(v, t.sh[r]), t.fmask);
}

struct Seq {
  const Tab& t;
  const uint32_t* w;
  int64_t nw, base = 0;
  int j = 0;
  Seq(const Tab& tab, const uint32_t* words, int64_t n) : t(tab), w(words), nw(n) {}
  __m256i next() {
    const __m256i v = decode(t, w, nw, base + t.wj[j], t.rj[j]);
    if (++j == t.P) {
      j = 0;
      base += t.Wp;
    }
    return v;
  }
};

template <bool FP16>
inline __m256 halves(__m128i h) {
  if (FP16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <bool FP16>
inline __m256 load_halves(const uint16_t* p) { return halves<FP16>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// 8 halves from p, reading none at or past `end`
__attribute__((noinline, cold)) __m128i copy8(const uint16_t* p, const uint16_t* end) {
  alignas(16) uint16_t buf[8] = {};
  for (int i = 0; p + i < end && i < 8; ++i) buf[i] = p[i];
  return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
}

template <bool FP16>
inline __m256 load_halves(const uint16_t* p, const uint16_t* end) {
  if (__builtin_expect(p + 8 <= end, 1)) return load_halves<FP16>(p);
  return halves<FP16>(copy8(p, end));
}

inline __m256i lane_pattern(int n, int m) {  // (l / n) * m
  alignas(32) int32_t v[8];
  for (int l = 0; l < 8; ++l) v[l] = (l / n) * m;
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(v));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int NB, int U>
inline void clear(__m256 (&acc)[U][NB]) {
  for (int u = 0; u < U; ++u)
    for (int b = 0; b < NB; ++b) acc[u][b] = _mm256_setzero_ps();
}

template <int NB, int U>
inline void finish(const Act& a, int64_t r, int64_t b0, __m256 (&acc)[U][NB], const float* tail) {
  for (int b = 0; b < NB; ++b) {
    __m256 sum = acc[0][b];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][b]);
    a.out[(b0 + b) * a.N + r] = hsum(sum) + tail[b];
  }
}

template <int NB>
inline void fma_x(__m256* acc, __m256 w, const float* x, int64_t ld) {
  for (int b = 0; b < NB; ++b) acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * ld), acc[b]);
}

inline __m256i lane_mask(uint32_t mb) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(mb)), bit), bit);
}

inline __m256i expand_index(const Expand& e, uint32_t mb) { return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(e.idx[mb]))); }

// x at 8 columns: inside a window of 16 from c0 (rel = col - c0), or gathered.
template <int NB, bool WINDOW>
inline void fma_cols(__m256* acc, __m256 w, const float* x, int64_t ld, int64_t c0, __m256i rel, __m256i col) {
  const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(rel, _mm256_set1_epi32(7)));
  for (int b = 0; b < NB; ++b) {
    const float* xb = x + b * ld;
    __m256 xv;
    if (WINDOW) {
      xv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xb + c0), rel), _mm256_permutevar8x32_ps(_mm256_loadu_ps(xb + c0 + 8), rel), upper);
    } else {
      xv = _mm256_i32gather_ps(xb, col, 4);
    }
    acc[b] = _mm256_fmadd_ps(w, xv, acc[b]);
  }
}

// MODE 0: x gathered; 1: x permuted from a window of 16 columns; 2: the same with 2-bit indices (half
// an index word a step).
template <int NB, bool FP16, int MODE>
void nm_row(const NMArgs& A, const Tab& t, __m256i pattern, int64_t r, int64_t b0) {
  const Act& a = A.a;
  const float* x = a.x + b0 * a.ld;
  constexpr int U = Sets<NB>::value;
  __m256 acc[U][NB];
  clear(acc);
  const uint16_t* v = A.values + r * A.count;
  Seq d(t, A.indices + r * A.iwords, A.iwords);
  const int64_t full = A.count & ~int64_t(7), step = MODE ? 8 / A.n * A.m : 0;
  const __m256i sh2 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), three = _mm256_set1_epi32(3);
  chunks<U>(0, full, 8, CK_LAMBDA(k0) {
    CK_SET;
    const __m256 w = load_halves<FP16>(v + k0);
    const int64_t c0 = (k0 >> 3) * step;
    if (MODE == 2) {
      const uint32_t word = d.w[k0 >> 4] >> ((k0 & 8) << 1);
      const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), sh2), three);
      fma_cols<NB, true>(acc[u_], w, x, a.ld, c0, _mm256_add_epi32(pattern, idx), idx);
    } else {
      const __m256i idx = d.next();
      if (MODE == 1) fma_cols<NB, true>(acc[u_], w, x, a.ld, c0, _mm256_add_epi32(pattern, idx), idx);
      else fma_cols<NB, false>(acc[u_], w, x, a.ld, 0, idx, _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.colbase + k0)), idx));
    }
  });
  float tail[NB] = {};
  for (int64_t k = full; k < A.count; ++k) {
    const float wk = half_value(v[k], FP16);
    const int64_t col = A.colbase[k] + field(d.w, A.ibits, k);
    for (int b = 0; b < NB; ++b) tail[b] += wk * x[b * a.ld + col];
  }
  finish<NB, U>(a, r, b0, acc, tail);
}

template <int NB, bool UNIFORM>
void gq_row(const GQArgs& A, const Tab& t, int64_t r, int64_t b0, const float* s, const float* z) {
  const Act& a = A.a;
  const Stats& st = A.st;
  const float* x = a.x + b0 * a.ld;
  constexpr int U = Sets<NB>::value;
  __m256 acc[U][NB];
  clear(acc);
  Seq d(t, A.codes + r * A.cwords, A.cwords);
  const int64_t full = a.K & ~int64_t(7);
  if (UNIFORM) {
    for (int64_t g0 = 0, g = 0; g0 < full; g0 += st.gs, ++g) {
      const __m256 sv = _mm256_set1_ps(s[g]), zv = _mm256_set1_ps(z[g]);
      chunks<U>(g0, g0 + st.gs < full ? g0 + st.gs : full, 8, CK_LAMBDA(k0) {
        CK_SET;
        fma_x<NB>(acc[u_], _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(d.next()), zv), sv), x + k0, a.ld);
      });
    }
  } else {
    chunks<U>(0, full, 8, CK_LAMBDA(k0) {
      CK_SET;
      const __m256i gi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(st.gidx + k0));
      const __m256 c = _mm256_cvtepi32_ps(d.next());
      fma_x<NB>(acc[u_], _mm256_mul_ps(_mm256_sub_ps(c, _mm256_i32gather_ps(z, gi, 4)), _mm256_i32gather_ps(s, gi, 4)), x + k0, a.ld);
    });
  }
  float tail[NB] = {};
  for (int64_t k = full; k < a.K; ++k) {
    const int32_t g = st.gidx[k];
    const float wk = (static_cast<float>(field(d.w, A.bits, k)) - z[g]) * s[g];
    for (int b = 0; b < NB; ++b) tail[b] += wk * x[b * a.ld + k];
  }
  finish<NB, U>(a, r, b0, acc, tail);
}

// 2, 4 or 8 bits with a group size that is a multiple of 8 * 8 / BITS: 8 bytes a step widened to 8
// lanes, field j of every byte one vector; x arrives permuted to match (ops.cpp, planar_order). Integer
// zero points: code - zero exactly as (2^23 + code) - (2^23 + zero); up to 4 activation rows: the scale
// once a group (as in avx512.cpp).
template <int NB, int BITS, bool INTZ>
void gq_planar_row(const GQArgs& A, int64_t r, int64_t b0, const float* s, const float* z) {
  constexpr int Q = 8 / BITS, C = 8 * Q;
  constexpr bool FACTOR = NB <= 4;
  const Act& a = A.a;
  const float* x = a.x + b0 * a.ld;
  constexpr int U = Sets<NB>::value;
  __m256 acc[U][NB];
  clear(acc);
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(A.codes + r * A.cwords);
  const __m256i fmask = _mm256_set1_epi32((1 << BITS) - 1), magic = _mm256_set1_epi32(0x4B000000);
  const int64_t full = a.K / C * C;
  auto codes = [&](__m256i by, int j) __attribute__((always_inline)) {
    const __m256i v = BITS == 8 ? by : _mm256_and_si256(j ? _mm256_srli_epi32(by, j * BITS) : by, fmask);
    return INTZ ? _mm256_castsi256_ps(_mm256_or_si256(v, magic)) : _mm256_cvtepi32_ps(v);
  };
  for (int64_t g0 = 0, g = 0; g0 < full; g0 += A.st.gs, ++g) {
    const __m256 sv = _mm256_set1_ps(s[g]), zv = _mm256_set1_ps(INTZ ? 8388608.0f + z[g] : z[g]);
    const int64_t end = g0 + A.st.gs < full ? g0 + A.st.gs : full;
    if (FACTOR) {
      __m256 part[U][NB];
      clear(part);
      chunks<U>(g0, end, C, CK_LAMBDA(k0) {
        CK_SET;
        const __m256i by = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + k0 / Q)));
        for (int j = 0; j < Q; ++j) fma_x<NB>(part[u_], _mm256_sub_ps(codes(by, j), zv), x + k0 + 8 * j, a.ld);
      });
      for (int b = 0; b < NB; ++b) {
        __m256 sum = part[0][b];
        for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, part[u][b]);
        acc[0][b] = _mm256_fmadd_ps(sv, sum, acc[0][b]);
      }
    } else {
      chunks<U>(g0, end, C, CK_LAMBDA(k0) {
        CK_SET;
        const __m256i by = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + k0 / Q)));
        for (int j = 0; j < Q; ++j) fma_x<NB>(acc[u_], _mm256_mul_ps(_mm256_sub_ps(codes(by, j), zv), sv), x + k0 + 8 * j, a.ld);
      });
    }
  }
  float tail[NB] = {};
  const uint32_t* w = A.codes + r * A.cwords;
  for (int64_t k = full; k < a.K; ++k) {
    const int32_t g = A.st.gidx[k];
    const float wk = (static_cast<float>(field(w, A.bits, k)) - z[g]) * s[g];
    for (int b = 0; b < NB; ++b) tail[b] += wk * x[b * a.ld + k];
  }
  finish<NB, U>(a, r, b0, acc, tail);
}

template <int NB, bool FP16>
void bitmap_row(const BitmapArgs& A, const Expand& e, int64_t r, int64_t b0, const uint16_t* p) {
  const Act& a = A.a;
  const float* x = a.x + b0 * a.ld;
  const uint16_t* end = A.values + A.nnz;
  constexpr int U = Sets<NB>::value;
  __m256 acc[U][NB];
  clear(acc);
  const uint32_t* bm = A.bitmask + r * A.bwords;
  chunks<U>(0, A.bwords, 1, CK_LAMBDA(j) {
    CK_SET;
    const uint32_t m = bm[j];
    if (!m) return;
    for (int q = 0; q < 4; ++q) {
      const uint32_t mb = (m >> (8 * q)) & 0xFFu;
      if (!mb) continue;
      const __m256 packed = load_halves<FP16>(p, end);
      p += __builtin_popcount(mb);
      const __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(packed, expand_index(e, mb)), _mm256_castsi256_ps(lane_mask(mb)));
      fma_x<NB>(acc[u_], w, x + 32 * j + 8 * q, a.ld);
    }
  });
  const float tail[NB] = {};
  finish<NB, U>(a, r, b0, acc, tail);
}

template <int NB, bool WINDOW>
void sq_nm_row(const SQArgs& A, const Tab& tc, const Tab& ti, __m256i pattern, int64_t r, int64_t b0, const float* s, const float* z) {
  const Act& a = A.a;
  const Stats& st = A.st;
  const float* x = a.x + b0 * a.ld;
  constexpr int U = Sets<NB>::value;
  __m256 acc[U][NB];
  clear(acc);
  Seq dc(tc, A.codes + r * A.cwords, A.cwords), di(ti, A.indices + r * A.iwords, A.iwords);
  const int64_t full = A.count & ~int64_t(7);
  chunks<U>(0, full, 8, CK_LAMBDA(k0) {
    CK_SET;
    const __m256 c = _mm256_cvtepi32_ps(dc.next());
    const __m256i idx = di.next();
    const int64_t c0 = A.colbase[k0];
    const int32_t g = st.gidx[c0];
    const __m256i col = WINDOW ? _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c0)), _mm256_add_epi32(pattern, idx))
                               : _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.colbase + k0)), idx);
    __m256 w;
    if (g == st.gidx[A.colbase[k0 + 7] + A.m - 1]) {
      w = _mm256_mul_ps(_mm256_sub_ps(c, _mm256_set1_ps(z[g])), _mm256_set1_ps(s[g]));
    } else {
      const __m256i gi = _mm256_i32gather_epi32(st.gidx, col, 4);
      w = _mm256_mul_ps(_mm256_sub_ps(c, _mm256_i32gather_ps(z, gi, 4)), _mm256_i32gather_ps(s, gi, 4));
    }
    if (WINDOW) fma_cols<NB, true>(acc[u_], w, x, a.ld, c0, _mm256_add_epi32(pattern, idx), col);
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

template <int NB, bool UNIFORM>
int64_t sq_bitmap_row(const SQArgs& A, const Tab& t, const Expand& e, int64_t r, int64_t b0, int64_t start, const float* s, const float* z) {
  const Act& a = A.a;
  const Stats& st = A.st;
  const float* x = a.x + b0 * a.ld;
  constexpr int U = Sets<NB>::value;
  __m256 acc[U][NB];
  clear(acc);
  const uint32_t* bm = A.bitmask + r * A.bwords;
  const uint64_t inv = (uint64_t(1) << 32) / t.per + 1;
  int64_t q = 0;
  chunks<U>(0, A.bwords, 1, CK_LAMBDA(j) {
    CK_SET;
    const uint32_t m = bm[j];
    if (!m) return;
    for (int h = 0; h < 4; ++h) {
      const uint32_t mb = (m >> (8 * h)) & 0xFFu;
      if (!mb) continue;
      const int64_t word = static_cast<int64_t>((static_cast<uint64_t>(q) * inv) >> 32);
      const __m256i lanes = lane_mask(mb);
      const __m256i codes = decode(t, A.codes, A.total_words, start + word, static_cast<int>(q - word * t.per));
      const __m256 c = _mm256_cvtepi32_ps(_mm256_permutevar8x32_epi32(codes, expand_index(e, mb)));
      const int64_t k0 = 32 * j + 8 * h;
      __m256 w;
      if (UNIFORM) {
        const int32_t g = st.gidx[k0];
        w = _mm256_mul_ps(_mm256_sub_ps(c, _mm256_set1_ps(z[g])), _mm256_set1_ps(s[g]));
      } else {
        const __m256i gi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(st.gidx + k0));
        w = _mm256_mul_ps(_mm256_sub_ps(c, _mm256_i32gather_ps(z, gi, 4)), _mm256_i32gather_ps(s, gi, 4));
      }
      w = _mm256_and_ps(w, _mm256_castsi256_ps(lanes));
      q += __builtin_popcount(mb);
      fma_x<NB>(acc[u_], w, x + k0, a.ld);
    }
  });
  const float tail[NB] = {};
  finish<NB, U>(a, r, b0, acc, tail);
  return q;
}

#define CK_PASSES(CALL)                                          \
  for (int64_t b0 = 0; b0 < A.a.B;) {                            \
    const int nb = A.a.B - b0 >= 8 ? 8 : static_cast<int>(A.a.B - b0); \
    switch (nb) {                                                \
      case 1: CALL(1); break;                                    \
      case 2: CALL(2); break;                                    \
      case 3: CALL(3); break;                                    \
      case 4: CALL(4); break;                                    \
      case 5: CALL(5); break;                                    \
      case 6: CALL(6); break;                                    \
      case 7: CALL(7); break;                                    \
      default: CALL(8); break;                                   \
    }                                                            \
    b0 += nb;                                                    \
  }

}  // namespace

void nm_rows(const NMArgs& A, int64_t r0, int64_t r1, float*) {
  const Tab t(A.ibits);
  const __m256i pattern = lane_pattern(A.n, A.m);
  const int mode = !A.window ? 0 : A.ibits == 2 ? 2 : 1;
  for (int64_t r = r0; r < r1; ++r) {
#define CK_MODES(NB, FP16) \
  mode == 2 ? nm_row<NB, FP16, 2>(A, t, pattern, r, b0) : mode == 1 ? nm_row<NB, FP16, 1>(A, t, pattern, r, b0) : nm_row<NB, FP16, 0>(A, t, pattern, r, b0)
#define CK_CALL(NB) A.fp16 ? CK_MODES(NB, true) : CK_MODES(NB, false)
    CK_PASSES(CK_CALL)
#undef CK_CALL
#undef CK_MODES
  }
}

void gq_rows(const GQArgs& A, int64_t r0, int64_t r1, float* scratch) {
  const Tab t(A.bits);
  float *s = scratch, *z = scratch + A.st.groups;
  const bool uniform = A.st.gs % 8 == 0, intz = A.st.zint != nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    row_stats(A.st, A.bits, r, s, z);
#define CK_PLANAR(NB, INTZ)                                                                                         \
  A.bits == 4 ? gq_planar_row<NB, 4, INTZ>(A, r, b0, s, z) : A.bits == 2 ? gq_planar_row<NB, 2, INTZ>(A, r, b0, s, z) \
                                                                       : gq_planar_row<NB, 8, INTZ>(A, r, b0, s, z)
#define CK_CALL(NB)                                                                \
  if (A.planar) intz ? CK_PLANAR(NB, true) : CK_PLANAR(NB, false);                 \
  else uniform ? gq_row<NB, true>(A, t, r, b0, s, z) : gq_row<NB, false>(A, t, r, b0, s, z)
    CK_PASSES(CK_CALL)
#undef CK_CALL
#undef CK_PLANAR
  }
}

void bitmap_tiles(const BitmapArgs& A, int64_t t0, int64_t t1, float*) {
  const Expand& e = expand_table();
  for (int64_t tile = t0; tile < t1; ++tile) {
    const uint16_t* p = A.values + tile_offset(A.off32, A.off64, tile);
    const int64_t rend = (tile + 1) * A.tile_rows < A.a.N ? (tile + 1) * A.tile_rows : A.a.N;
    for (int64_t r = tile * A.tile_rows; r < rend; ++r) {
#define CK_CALL(NB) A.fp16 ? bitmap_row<NB, true>(A, e, r, b0, p) : bitmap_row<NB, false>(A, e, r, b0, p)
      CK_PASSES(CK_CALL)
#undef CK_CALL
      const uint32_t* bm = A.bitmask + r * A.bwords;
      for (int64_t j = 0; j < A.bwords; ++j) p += __builtin_popcount(bm[j]);
    }
  }
}

void sq_rows(const SQArgs& A, int64_t u0, int64_t u1, float* scratch) {
  const Tab tc(A.bits);
  float *s = scratch, *z = scratch + A.st.groups;
  if (A.n) {
    const Tab ti(A.ibits);
    const __m256i pattern = lane_pattern(A.n, A.m);
    for (int64_t r = u0; r < u1; ++r) {
      row_stats(A.st, A.bits, r, s, z);
#define CK_CALL(NB) A.window ? sq_nm_row<NB, true>(A, tc, ti, pattern, r, b0, s, z) : sq_nm_row<NB, false>(A, tc, ti, pattern, r, b0, s, z)
      CK_PASSES(CK_CALL)
#undef CK_CALL
    }
    return;
  }
  const Expand& e = expand_table();
  const bool uniform = A.st.gs % 8 == 0;
  for (int64_t tile = u0; tile < u1; ++tile) {
    int64_t start = tile_offset(A.off32, A.off64, tile), kept = 0;
    const int64_t rend = (tile + 1) * A.tile_rows < A.a.N ? (tile + 1) * A.tile_rows : A.a.N;
    for (int64_t r = tile * A.tile_rows; r < rend; ++r) {
      row_stats(A.st, A.bits, r, s, z);
#define CK_CALL(NB) kept = uniform ? sq_bitmap_row<NB, true>(A, tc, e, r, b0, start, s, z) : sq_bitmap_row<NB, false>(A, tc, e, r, b0, start, s, z)
      CK_PASSES(CK_CALL)
#undef CK_CALL
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

// A lut row: 8 codes a step, their weights one vpermps of the row's table (up to 3 bits: 8 entries, one
// register) or gathered from it (4-8 bits).
template <int NB, bool SMALL>
void lut_row(const GQArgs& A, const Tab& t, int64_t r, int64_t b0, const float* table) {
  constexpr int U = Sets<NB>::value;
  const Act& a = A.a;
  const float* x = a.x + b0 * a.ld;
  __m256 acc[U][NB];
  clear(acc);
  Seq d(t, A.codes + r * A.cwords, A.cwords);
  const int64_t full = a.K & ~int64_t(7);
  const __m256 tv = _mm256_loadu_ps(table);
  chunks<U>(0, full, 8, CK_LAMBDA(k0) {
    CK_SET;
    const __m256i c = d.next();
    fma_x<NB>(acc[u_], SMALL ? _mm256_permutevar8x32_ps(tv, c) : _mm256_i32gather_ps(table, c, 4), x + k0, a.ld);
  });
  float tail[NB] = {};
  const uint32_t* w = A.codes + r * A.cwords;
  for (int64_t k = full; k < a.K; ++k) {
    const float wk = table[field(w, A.bits, k)];
    for (int b = 0; b < NB; ++b) tail[b] += wk * x[b * a.ld + k];
  }
  finish<NB, U>(a, r, b0, acc, tail);
}

// A masked lut row (as sq_bitmap_row): the kept codes permuted to their set lanes, looked up, masked.
template <int NB, bool SMALL>
int64_t lut_bitmap_row(const SQArgs& A, const Tab& t, const Expand& e, int64_t r, int64_t b0, int64_t start, const float* table) {
  constexpr int U = Sets<NB>::value;
  const Act& a = A.a;
  const float* x = a.x + b0 * a.ld;
  __m256 acc[U][NB];
  clear(acc);
  const uint32_t* bm = A.bitmask + r * A.bwords;
  const uint64_t inv = (uint64_t(1) << 32) / t.per + 1;
  const __m256 tv = _mm256_loadu_ps(table);
  int64_t q = 0;
  chunks<U>(0, A.bwords, 1, CK_LAMBDA(j) {
    CK_SET;
    const uint32_t m = bm[j];
    if (!m) return;
    for (int h = 0; h < 4; ++h) {
      const uint32_t mb = (m >> (8 * h)) & 0xFFu;
      if (!mb) continue;
      const int64_t word = static_cast<int64_t>((static_cast<uint64_t>(q) * inv) >> 32);
      const __m256i codes = decode(t, A.codes, A.total_words, start + word, static_cast<int>(q - word * t.per));
      const __m256i c = _mm256_permutevar8x32_epi32(codes, expand_index(e, mb));  // every lane a valid code: the table is safe to read
      const __m256 w = SMALL ? _mm256_permutevar8x32_ps(tv, c) : _mm256_i32gather_ps(table, c, 4);
      q += __builtin_popcount(mb);
      fma_x<NB>(acc[u_], _mm256_and_ps(w, _mm256_castsi256_ps(lane_mask(mb))), x + 32 * j + 8 * h, a.ld);
    }
  });
  const float tail[NB] = {};
  finish<NB, U>(a, r, b0, acc, tail);
  return q;
}

void lut_dense_pass(const GQArgs& A, const Tab& t, int64_t r, const float* table) {
#define CK_CALL(NB) A.bits <= 3 ? lut_row<NB, true>(A, t, r, b0, table) : lut_row<NB, false>(A, t, r, b0, table)
  CK_PASSES(CK_CALL)
#undef CK_CALL
}

int64_t lut_sparse_pass(const SQArgs& A, const Tab& t, const Expand& e, int64_t r, int64_t start, const float* table) {
  int64_t kept = 0;
#define CK_CALL(NB) kept = A.bits <= 3 ? lut_bitmap_row<NB, true>(A, t, e, r, b0, start, table) : lut_bitmap_row<NB, false>(A, t, e, r, b0, start, table)
  CK_PASSES(CK_CALL)
#undef CK_CALL
  return kept;
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
  const int64_t groups = A.dense.st.groups, gs = A.dense.st.gs;
  float *s = scratch, *z = scratch + groups;
  const bool uniform = gs % 8 == 0;
  walk_rows(
      A.dense, A.sparse, A.keep, u0, u1, t.per,
      [&](int64_t r) {
        spqr_stat_row(A.scale, groups, r, s);
        spqr_stat_row(A.zero, groups, r, z);
      },
      [&](int64_t r) { spqr_dense_row(A.dense, t, r, s, z, uniform); },
      [&](int64_t r, int64_t start) { return spqr_sparse_row(A.sparse, t, e, r, start, s, z, uniform); },
      [&](int64_t r, const uint32_t* codes, const uint32_t* mask) { fix_outliers(A.dense.a, A.outliers, r, codes, mask, A.dense.bits, nullptr, s, z, gs); });
}

void lut_rows(const LUTArgs& A, int64_t u0, int64_t u1, float* scratch) {
  const Tab t(A.dense.bits);
  const Expand& e = expand_table();
  const int64_t entries = int64_t(1) << A.dense.bits;
  float* table = scratch;
  for (int64_t c = entries; c < 8; ++c) table[c] = 0.0f;
  walk_rows(
      A.dense, A.sparse, A.keep, u0, u1, t.per,
      [&](int64_t r) {
        for (int64_t c = 0; c < entries; ++c) table[c] = fp16_to_float(A.lut[r * entries + c]);
      },
      [&](int64_t r) { lut_dense_pass(A.dense, t, r, table); },
      [&](int64_t r, int64_t start) { return lut_sparse_pass(A.sparse, t, e, r, start, table); },
      [&](int64_t r, const uint32_t* codes, const uint32_t* mask) { fix_outliers(A.dense.a, A.outliers, r, codes, mask, A.dense.bits, table, nullptr, nullptr, 1); });
}

}  // namespace avx2
}  // namespace ck
#else  // not x86-64: never called (isa_support reports scalar only)
#include "common.h"
namespace ck {
namespace avx2 {
void nm_rows(const NMArgs&, int64_t, int64_t, float*) {}
void gq_rows(const GQArgs&, int64_t, int64_t, float*) {}
void bitmap_tiles(const BitmapArgs&, int64_t, int64_t, float*) {}
void sq_rows(const SQArgs&, int64_t, int64_t, float*) {}
void spqr_rows(const SpQRArgs&, int64_t, int64_t, float*) {}
void lut_rows(const LUTArgs&, int64_t, int64_t, float*) {}
}  // namespace avx2
}  // namespace ck
#endif
