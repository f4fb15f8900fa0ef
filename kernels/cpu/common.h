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

// Each ISA implements these four; `scratch` holds scratch_floats(groups) floats.
#define CK_DECLARE_ISA(ns)                                                              \
  namespace ns {                                                                        \
  void nm_rows(const NMArgs& A, int64_t r0, int64_t r1, float* scratch);                \
  void gq_rows(const GQArgs& A, int64_t r0, int64_t r1, float* scratch);                \
  void bitmap_tiles(const BitmapArgs& A, int64_t t0, int64_t t1, float* scratch);       \
  void sq_rows(const SQArgs& A, int64_t r0, int64_t r1, float* scratch);                \
  }

CK_DECLARE_ISA(scalar)
CK_DECLARE_ISA(avx2)
CK_DECLARE_ISA(avx512)

// bfloat16 activations times bfloat16 values on AVX512_BF16 (N:M with a permute window)
namespace avx512bf16 {
void nm_rows(const NMArgs& A, int64_t r0, int64_t r1, float* scratch);
}  // namespace avx512bf16

}  // namespace ck
