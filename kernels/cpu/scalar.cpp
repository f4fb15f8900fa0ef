// The portable path: plain C++ loops, compiled for the baseline ISA, any batch size up to 16.
#include "common.h"

namespace ck {
namespace scalar {
namespace {

constexpr int kMaxB = 16;

// Reads consecutive `bits`-bit fields of a row of words from field `k` on.
struct Reader {
  const uint32_t* w;
  int bits, per, pos;
  uint32_t mask;
  Reader(const uint32_t* words, int bits_, int64_t k) : bits(bits_), per(32 / bits_), mask((1u << bits_) - 1u) {
    w = words + k / per;
    pos = static_cast<int>(k % per);
  }
  uint32_t next() {
    const uint32_t v = (*w >> (pos * bits)) & mask;
    if (++pos == per) {
      pos = 0;
      ++w;
    }
    return v;
  }
};

inline int popcount32(uint32_t v) { return __builtin_popcount(v); }

void store(const Act& a, int64_t r, const float* acc) {
  for (int64_t b = 0; b < a.B; ++b) a.out[b * a.N + r] = acc[b];
}

inline void axpy(const Act& a, float* acc, float w, int64_t col) {
  const float* x = a.x + col;
  for (int64_t b = 0; b < a.B; ++b) acc[b] += w * x[b * a.ld];
}

}  // namespace

void nm_rows(const NMArgs& A, int64_t r0, int64_t r1, float*) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc[kMaxB] = {};
    const uint16_t* v = A.values + r * A.count;
    Reader idx(A.indices + r * A.iwords, A.ibits, 0);
    for (int64_t k = 0; k < A.count; ++k) axpy(A.a, acc, half_value(v[k], A.fp16), A.colbase[k] + idx.next());
    store(A.a, r, acc);
  }
}

void gq_rows(const GQArgs& A, int64_t r0, int64_t r1, float* scratch) {
  const Stats& st = A.st;
  float *s = scratch, *z = scratch + st.groups;
  for (int64_t r = r0; r < r1; ++r) {
    float acc[kMaxB] = {};
    row_stats(st, A.bits, r, s, z);
    Reader codes(A.codes + r * A.cwords, A.bits, 0);
    for (int64_t g = 0, k = 0; g < st.groups; ++g) {
      const int64_t end = k + st.gs < A.a.K ? k + st.gs : A.a.K;
      for (; k < end; ++k) axpy(A.a, acc, (static_cast<float>(codes.next()) - z[g]) * s[g], k);
    }
    store(A.a, r, acc);
  }
}

void bitmap_tiles(const BitmapArgs& A, int64_t t0, int64_t t1, float*) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint16_t* p = A.values + tile_offset(A.off32, A.off64, t);
    const int64_t rend = (t + 1) * A.tile_rows < A.a.N ? (t + 1) * A.tile_rows : A.a.N;
    for (int64_t r = t * A.tile_rows; r < rend; ++r) {
      float acc[kMaxB] = {};
      const uint32_t* bm = A.bitmask + r * A.bwords;
      for (int64_t j = 0; j < A.bwords; ++j) {
        for (uint32_t m = bm[j]; m; m &= m - 1) axpy(A.a, acc, half_value(*p++, A.fp16), 32 * j + __builtin_ctz(m));
      }
      store(A.a, r, acc);
    }
  }
}

// N:M: rows [u0, u1); unstructured: tiles [u0, u1).
void sq_rows(const SQArgs& A, int64_t u0, int64_t u1, float* scratch) {
  const Stats& st = A.st;
  float *s = scratch, *z = scratch + st.groups;
  if (A.n) {
    for (int64_t r = u0; r < u1; ++r) {
      float acc[kMaxB] = {};
      row_stats(st, A.bits, r, s, z);
      Reader idx(A.indices + r * A.iwords, A.ibits, 0), codes(A.codes + r * A.cwords, A.bits, 0);
      for (int64_t k = 0; k < A.count; ++k) {
        const int64_t col = A.colbase[k] + idx.next();
        const int32_t g = st.gidx[col];
        axpy(A.a, acc, (static_cast<float>(codes.next()) - z[g]) * s[g], col);
      }
      store(A.a, r, acc);
    }
    return;
  }
  const int per = per_word(A.bits);
  for (int64_t t = u0; t < u1; ++t) {
    int64_t start = tile_offset(A.off32, A.off64, t);
    const int64_t rend = (t + 1) * A.tile_rows < A.a.N ? (t + 1) * A.tile_rows : A.a.N;
    for (int64_t r = t * A.tile_rows; r < rend; ++r) {
      float acc[kMaxB] = {};
      row_stats(st, A.bits, r, s, z);
      Reader codes(A.codes + start, A.bits, 0);
      const uint32_t* bm = A.bitmask + r * A.bwords;
      int64_t kept = 0;
      for (int64_t j = 0; j < A.bwords; ++j) {
        kept += popcount32(bm[j]);
        for (uint32_t m = bm[j]; m; m &= m - 1) {
          const int64_t col = 32 * j + __builtin_ctz(m);
          const int32_t g = st.gidx[col];
          axpy(A.a, acc, (static_cast<float>(codes.next()) - z[g]) * s[g], col);
        }
      }
      start += (kept + per - 1) / per;
      store(A.a, r, acc);
    }
  }
}

namespace {

// One row of codes (dense: every column; under a bitmask: its kept columns, codes from `codes` on) into
// out, the weight of a code at column col being weight(code, col); returns the codes it read.
template <typename W>
int64_t code_row(const Act& a, int64_t r, const uint32_t* codes, const uint32_t* mask, int64_t bwords, int bits, W weight) {
  float acc[kMaxB] = {};
  Reader reader(codes, bits, 0);
  int64_t kept = 0;
  if (!mask) {
    for (int64_t k = 0; k < a.K; ++k) axpy(a, acc, weight(reader.next(), k), k);
  } else {
    for (int64_t j = 0; j < bwords; ++j) {
      kept += popcount32(mask[j]);
      for (uint32_t m = mask[j]; m; m &= m - 1) {
        const int64_t col = 32 * j + __builtin_ctz(m);
        axpy(a, acc, weight(reader.next(), col), col);
      }
    }
  }
  store(a, r, acc);
  return kept;
}

// Rows [u0, u1) dense, or tiles [u0, u1) under a bitmask: prepare(r) readies row r's decoding, then
// the row's grid dot product and its outliers.
template <typename P, typename W, typename F>
void code_rows(const GQArgs& D, const SQArgs& S, bool keep, int64_t u0, int64_t u1, P prepare, W weight, F fix) {
  if (!keep) {
    for (int64_t r = u0; r < u1; ++r) {
      prepare(r);
      code_row(D.a, r, D.codes + r * D.cwords, nullptr, 0, D.bits, weight);
      fix(r, D.codes + r * D.cwords, nullptr);
    }
    return;
  }
  const int per = per_word(S.bits);
  for (int64_t t = u0; t < u1; ++t) {
    int64_t start = tile_offset(S.off32, S.off64, t);
    const int64_t rend = (t + 1) * S.tile_rows < S.a.N ? (t + 1) * S.tile_rows : S.a.N;
    for (int64_t r = t * S.tile_rows; r < rend; ++r) {
      prepare(r);
      const uint32_t* mask = S.bitmask + r * S.bwords;
      const int64_t kept = code_row(S.a, r, S.codes + start, mask, S.bwords, S.bits, weight);
      fix(r, S.codes + start, mask);
      start += (kept + per - 1) / per;
    }
  }
}

}  // namespace

void spqr_rows(const SpQRArgs& A, int64_t u0, int64_t u1, float* scratch) {
  const int64_t groups = A.dense.st.groups, gs = A.dense.st.gs;
  float *s = scratch, *z = scratch + groups;
  const int32_t* gidx = A.dense.st.gidx;
  code_rows(
      A.dense, A.sparse, A.keep, u0, u1,
      [&](int64_t r) {
        spqr_stat_row(A.scale, groups, r, s);
        spqr_stat_row(A.zero, groups, r, z);
      },
      [&](uint32_t code, int64_t col) { return (static_cast<float>(code) - z[gidx[col]]) * s[gidx[col]]; },
      [&](int64_t r, const uint32_t* codes, const uint32_t* mask) {
        fix_outliers(A.dense.a, A.outliers, r, codes, mask, A.dense.bits, nullptr, s, z, gs);
      });
}

void lut_rows(const LUTArgs& A, int64_t u0, int64_t u1, float* scratch) {
  const int64_t entries = int64_t(1) << A.dense.bits;
  float* table = scratch;
  code_rows(
      A.dense, A.sparse, A.keep, u0, u1,
      [&](int64_t r) {
        for (int64_t c = 0; c < entries; ++c) table[c] = fp16_to_float(A.lut[r * entries + c]);
      },
      [&](uint32_t code, int64_t) { return table[code]; },
      [&](int64_t r, const uint32_t* codes, const uint32_t* mask) {
        fix_outliers(A.dense.a, A.outliers, r, codes, mask, A.dense.bits, table, nullptr, nullptr, 1);
      });
}

}  // namespace scalar
}  // namespace ck
