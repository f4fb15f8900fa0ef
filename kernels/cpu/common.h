// Shared by the ISA files (scalar.cpp, avx2.cpp, avx512.cpp) and ops.cpp: the arguments of each
// format's kernel and the plain helpers. Plain C++ only (no ATen, no std templates): the ISA files
// compile everything after their `#pragma GCC target` for that ISA, and an inline function shared
// between translation units must not be compiled with instructions a CPU may lack.
#pragma once
#include <cstdint>
#include <cstring>

namespace ck {

// Activations: fp32 [B][ld], each row zero padded past K by at least 64 floats; out fp32 [B][N].
struct Act {
  const float* x;
  int64_t ld;
  int64_t B;
  float* out;
  int64_t N;
  int64_t K;
  const uint16_t* xh;  // x in bfloat16, same layout (the AVX512-BF16 kernels; null when x is not bfloat16)
  int64_t first = 0;   // the call's activation row that is row 0 here (a call runs in slices of at most 16 rows)
};

// Group statistics, shared by group_quant and sparse_quant: scale fp16 [N][groups]; zero points
// either `bits`-bit fields packed like the codes [N][zwords] (zfp16 == 0) or fp16 [N][groups].
struct Stats {
  const uint16_t* scale;
  const uint32_t* zint;
  const uint16_t* zhalf;
  int64_t groups, zwords;
  int64_t gs;            // group size
  const int32_t* gidx;   // [K + 64]: column -> group (for group sizes that are not a multiple of the vector width)
};

struct NMArgs {
  Act a;
  int n, m, ibits;
  int64_t count, iwords;    // values and index words per row
  const uint16_t* values;   // [N][count] bf16 or fp16
  const uint32_t* indices;  // [N][iwords]
  bool fp16;
  const int32_t* colbase;   // [count + 16]: (k / n) * m
  bool window;              // every chunk of 16 values spans at most 32 columns (8 values: 16 for avx2)
};

struct GQArgs {
  Act a;
  int bits;
  int64_t cwords;           // code words per row
  const uint32_t* codes;    // [N][cwords]
  Stats st;
  bool planar;              // 2/4/8 bits, group size a multiple of the step: x permuted to the byte order (ops.cpp)
  const float* xsum = nullptr;  // the bfloat16 kernel: [call rows][xsum_ld], each group's sum of x over its whole steps
  int64_t xsum_ld = 0;
};

struct BitmapArgs {
  Act a;
  int64_t bwords, tile_rows, nnz;
  const uint32_t* bitmask;  // [N][bwords]
  const uint16_t* values;   // [nnz]
  const int32_t* off32;     // [tiles + 1] (one of the two)
  const int64_t* off64;
  bool fp16;
};

struct SQArgs {
  Act a;
  int bits;
  Stats st;
  // N:M (n > 0)
  int n, m, ibits;
  int64_t count, iwords, cwords;  // kept codes, index words and code words per row
  const uint32_t* indices;
  const int32_t* colbase;
  bool window;
  // unstructured (n == 0)
  int64_t bwords, tile_rows, total_words;
  const uint32_t* bitmask;
  const int32_t* off32;
  const int64_t* off64;
  const uint32_t* codes;    // N:M [N][cwords]; unstructured flat [total_words]
};

// SpQR's first-level statistic (a scale or a zero point per (row, group)), in one of three stored forms:
// fp16 [N][groups]; `ibits`-bit integers packed like the codes [N][iwords]; or quantized along the output
// dimension, low + step * code (fp32) with `qbits`-bit codes [N][qwords] and fp16 step and low
// [N / qgs][groups] (SpQR's second level).
struct SpQRStat {
  const uint16_t* half;
  const uint32_t* ints;
  int ibits;
  int64_t iwords;
  const uint32_t* qcodes;
  const uint16_t* step;
  const uint16_t* low;
  int qbits;
  int64_t qgs, qwords;
};

// Outliers in CSR by output row (ptr null: none): stored column (uint16) and fp16 value of each.
struct OutlierCSR {
  const int32_t* ptr;
  const uint16_t* cols;
  const uint16_t* vals;
};

// spqr and lut: codes dense (GQArgs: codes, cwords, bits, st.gs / st.gidx) or of the kept weights only
// under a bitmask (SQArgs with n == 0), x already gathered by the column permutation (ops.cpp).
struct SpQRArgs {
  GQArgs dense;
  SQArgs sparse;
  bool keep;
  OutlierCSR outliers;
  SpQRStat scale, zero;
};

struct LUTArgs {
  GQArgs dense;
  SQArgs sparse;
  bool keep;
  OutlierCSR outliers;
  const uint16_t* lut;  // fp16 [N][2^bits]
};

// -- scalar helpers (inline, no ISA) -----------------------------------------------------------------

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: man * 2^-24
    float v = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline float half_value(uint16_t h, bool fp16) { return fp16 ? fp16_to_float(h) : bf16_to_float(h); }

inline int per_word(int bits) { return 32 / bits; }

// field k of a row of words (`bits` bits each, 32 / bits to a word, least significant first)
inline uint32_t field(const uint32_t* words, int bits, int64_t k) {
  const int per = 32 / bits;
  return (words[k / per] >> ((k % per) * bits)) & ((1u << bits) - 1u);
}

inline int64_t tile_offset(const int32_t* o32, const int64_t* o64, int64_t t) { return o32 ? o32[t] : o64[t]; }

// The fp32 scale and zero point of every group of row r, into s[groups] and z[groups] (no division:
// this runs once a row).
inline void row_stats(const Stats& st, int bits, int64_t r, float* s, float* z) {
  const uint16_t* sr = st.scale + r * st.groups;
  for (int64_t g = 0; g < st.groups; ++g) s[g] = fp16_to_float(sr[g]);
  if (st.zint) {
    const uint32_t* zr = st.zint + r * st.zwords;
    const int per = 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    for (int64_t g = 0, wd = 0; g < st.groups; ++wd) {
      uint32_t word = zr[wd];
      for (int i = 0; i < per && g < st.groups; ++i, ++g, word >>= bits) z[g] = static_cast<float>(word & mask);
    }
  } else {
    const uint16_t* zr = st.zhalf + r * st.groups;
    for (int64_t g = 0; g < st.groups; ++g) z[g] = fp16_to_float(zr[g]);
  }
}

// Row r's values of a SpQR statistic, into v[groups] (second-level codes decoded once a row).
inline void spqr_stat_row(const SpQRStat& st, int64_t groups, int64_t r, float* v) {
  if (st.half) {
    for (int64_t g = 0; g < groups; ++g) v[g] = fp16_to_float(st.half[r * groups + g]);
    return;
  }
  // the codes word by word (no division a field: this runs for every row)
  const int bits = st.ints ? st.ibits : st.qbits, per = 32 / bits;
  const uint32_t mask = (1u << bits) - 1u;
  const uint32_t* w = st.ints ? st.ints + r * st.iwords : st.qcodes + r * st.qwords;
  for (int64_t g = 0, wd = 0; g < groups; ++wd) {
    uint32_t word = w[wd];
    for (int i = 0; i < per && g < groups; ++i, ++g, word >>= bits) v[g] = static_cast<float>(word & mask);
  }
  if (st.ints) return;
  const uint16_t* step = st.step + (r / st.qgs) * groups;
  const uint16_t* low = st.low + (r / st.qgs) * groups;
  for (int64_t g = 0; g < groups; ++g) v[g] = fp16_to_float(low[g]) + fp16_to_float(step[g]) * v[g];
}

// The outliers of row r after its grid dot product is in a.out: out += (value - grid weight) * x at each.
// `codes` are the row's code words (dense: code k is column k; under a bitmask `row_mask`, code k is the
// k-th kept column, from the row's first word). The grid weight is table[code] (lut), else
// (code - z[g]) * s[g] with g = col / gs (as the kernels compute it).
inline void fix_outliers(const Act& a, const OutlierCSR& o, int64_t r, const uint32_t* codes, const uint32_t* row_mask, int bits,
                         const float* table, const float* s, const float* z, int64_t gs) {
  if (!o.ptr) return;
  int64_t rank = 0, counted = 0;  // kept columns below word `counted` of the mask (outliers ascend)
  const int per = 32 / bits;
  const uint64_t inv = (uint64_t(1) << 32) / per + 1;  // k / per = (k * inv) >> 32 for k < 2^27 (no division an outlier)
  for (int32_t i = o.ptr[r]; i < o.ptr[r + 1]; ++i) {
    const int64_t col = o.cols[i];
    int64_t k = col;
    if (row_mask) {
      for (; counted < col / 32; ++counted) rank += __builtin_popcount(row_mask[counted]);
      k = rank + __builtin_popcount(row_mask[col / 32] & ((1u << (col % 32)) - 1u));
    }
    const int64_t word = static_cast<int64_t>((static_cast<uint64_t>(k) * inv) >> 32);
    const uint32_t code = (codes[word] >> ((k - word * per) * bits)) & ((1u << bits) - 1u);
    const uint32_t g = table ? 0u : static_cast<uint32_t>(col) / static_cast<uint32_t>(gs);  // 32-bit: a faster division
    const float grid = table ? table[code] : (static_cast<float>(code) - z[g]) * s[g];
    const float delta = fp16_to_float(o.vals[i]) - grid;
    for (int64_t b = 0; b < a.B; ++b) a.out[b * a.N + r] += delta * a.x[b * a.ld + col];
  }
}

// For a byte mask mb, byte l of idx[mb] is how many bits of mb lie below bit l: where lane l's value
// sits among the packed values of the set lanes (the bitmap kernels permute with it).
struct Expand {
  uint64_t idx[256];
  Expand() {
    for (int mb = 0; mb < 256; ++mb) {
      uint64_t v = 0;
      for (int l = 0, k = 0; l < 8; ++l) {
        v |= static_cast<uint64_t>(k) << (8 * l);
        k += (mb >> l) & 1;
      }
      idx[mb] = v;
    }
  }
};

inline const Expand& expand_table() {
  static const Expand table;
  return table;
}

// Rows a K-blocked kernel keeps partial sums for, and the scratch floats an ISA function may use: the
// statistics of kRowBlock rows and their partial sums (16 rows of x, 16 lanes each).
constexpr int64_t kRowBlock = 32;
inline int64_t scratch_floats(int64_t groups) { return 2 * groups * kRowBlock + kRowBlock * 16 * 16 + 64; }

// Each ISA implements these six (spqr / lut: rows, or tiles with a keep mask); `scratch` holds scratch_floats(groups) floats.
#define CK_DECLARE_ISA(ns)                                                              \
  namespace ns {                                                                        \
  void nm_rows(const NMArgs& A, int64_t r0, int64_t r1, float* scratch);                \
  void gq_rows(const GQArgs& A, int64_t r0, int64_t r1, float* scratch);                \
  void bitmap_tiles(const BitmapArgs& A, int64_t t0, int64_t t1, float* scratch);       \
  void sq_rows(const SQArgs& A, int64_t r0, int64_t r1, float* scratch);                \
  void spqr_rows(const SpQRArgs& A, int64_t u0, int64_t u1, float* scratch);            \
  void lut_rows(const LUTArgs& A, int64_t u0, int64_t u1, float* scratch);              \
  }

CK_DECLARE_ISA(scalar)
CK_DECLARE_ISA(avx2)
CK_DECLARE_ISA(avx512)

// bfloat16 activations times bfloat16 values on AVX512_BF16 (N:M with a permute window; bitmap with
// AVX512_VBMI2 as well)
namespace avx512bf16 {
void nm_rows(const NMArgs& A, int64_t r0, int64_t r1, float* scratch);
void bitmap_tiles(const BitmapArgs& A, int64_t t0, int64_t t1);
void gq_rows(const GQArgs& A, int64_t r0, int64_t r1, float* scratch);  // 2, 4 or 8 bits, planar, x and xsum in bfloat16 order
void sq_nm_rows(const SQArgs& A, int64_t r0, int64_t r1, float* scratch);  // N:M with a window, 4 bits, integer zeros, whole steps a group
}  // namespace avx512bf16

}  // namespace ck
