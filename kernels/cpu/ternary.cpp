// The dictionary-coded ternary (QMoE) matmul: y[b, r] = min_r * S_min[b, r] + max_r * S_max[b, r], S_min /
// S_max the sums of x[b, col] over the columns where row r's weight is the row's min / max, computed as
// sum_col x[b, col] * w[r, col] with w in {0, min_r, max_r} built in registers (W is never materialised).
// A row is a run of 16-bit codewords (codes[row_offsets[r] .. row_offsets[r + 1])), each standing for
// `length` (2..28) weights given by the kernel table (int32 [codewords][3]: min_mask, max_mask, length).
//
// Every codeword is taken branch-free, as 32 weight lanes from its first column (the lanes past its length
// have no mask bit: weight 0): iterating the set bits (a ctz loop, ~3 bits a codeword at 88% zeros) was
// 8-13x slower here, its data-dependent loop exits mispredicting about once a codeword.
//  - avx512: the lanes' weights by two masked moves (min, then max) per 16 lanes, one FMA per 16 columns
//    and activation row; up to 8 activation rows a pass;
//  - avx2 and scalar: the same with 8-lane GCC vectors, a lane's weight picked by a byte of each mask
//    from a 256-entry table of lane masks; up to 4 rows a pass. One template: compiled for the baseline
//    ISA as the "scalar" path (SSE2 on x86-64: plain C++, no intrinsics) and, always_inline into a
//    function with an AVX2 target, for the avx2 path (GCC compiles the inlined body for the caller's ISA).
// A batch of more rows takes several passes over the codes (each decodes them again).
// Bounds: x is copied into zero-padded fp32 rows (at least 64 columns past `in`), a row stops once its
// columns reach `in` (so a padding column past `in` meets a zero of the copy), lengths are read unsigned
// (a corrupt one only ends the row) and a codeword reads 32 columns from a start below `in`: no read
// leaves the copy. Codeword indices are uint16: always inside a 65536-row table (a smaller one is checked).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "common.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define CK_T_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
#define CK_T_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,popcnt")))
#endif

namespace ck {
namespace ternary {
namespace {

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int64_t kPad = 64, kTableRows = 65536;

struct Args {
  const uint16_t* codes;    // [total] codeword indices
  const int32_t* offsets;   // [N + 1]
  const uint16_t* minmax;   // fp16 [N][2]
  const int32_t* table;     // [codewords][3]
  const float* x;           // fp32 [B][ld], zero past column K (this pass's first activation row)
  int64_t ld, B, K;
  float* out;               // fp32 [B][out_ld] (this pass's first row)
  int64_t out_ld;
};

using RowsFn = void (*)(const Args&, int64_t, int64_t);

// -- lut (scalar, avx2): 8 lanes a step, a lane's weight picked by a byte of each mask ----------------

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4)));  // unaligned loads of x

// lane l of lane_masks[byte] is all ones where bit l of byte is set
struct LaneMasks {
  v8i m[256];
  LaneMasks() {
    for (int byte = 0; byte < 256; ++byte)
      for (int l = 0; l < 8; ++l) m[byte][l] = (byte >> l) & 1 ? -1 : 0;
  }
};
const LaneMasks& lane_masks() {
  static const LaneMasks table;
  return table;
}

// NB activation rows, G accumulators a row (independent FMA chains when there are few rows)
template <int NB, int G>
inline __attribute__((always_inline)) void lut_rows(const Args& A, int64_t r0, int64_t r1) {
  const uint64_t K = static_cast<uint64_t>(A.K);
  const v8i* L = lane_masks().m;
  for (int64_t r = r0; r < r1; ++r) {
    const float lo = fp16_to_float(A.minmax[2 * r]), hi = fp16_to_float(A.minmax[2 * r + 1]);
    const v8i lov = (v8i)((v8f){} + lo), hiv = (v8i)((v8f){} + hi);
    v8f acc[NB][G] = {};
    uint64_t p = 0;
    for (int32_t i = A.offsets[r], end = A.offsets[r + 1]; i < end && p < K; ++i) {
      const int32_t* e = A.table + 3 * static_cast<int64_t>(A.codes[i]);
      const uint32_t mn = static_cast<uint32_t>(e[0]), mx = static_cast<uint32_t>(e[1]);
      const float* xp = A.x + p;
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const v8f w = (v8f)((lov & L[(mn >> (8 * g)) & 255]) | (hiv & L[(mx >> (8 * g)) & 255]));
        for (int b = 0; b < NB; ++b) acc[b][g % G] += *reinterpret_cast<const v8fu*>(xp + b * A.ld + 8 * g) * w;
      }
      p += static_cast<uint32_t>(e[2]);
    }
    for (int b = 0; b < NB; ++b) {
      v8f t = acc[b][0];
      for (int g = 1; g < G; ++g) t += acc[b][g];
      float y = 0.f;
      for (int l = 0; l < 8; ++l) y += t[l];
      A.out[b * A.out_ld + r] = y;
    }
  }
}

#define CK_LUT_PICK(name, attr)                                                                        \
  template <int NB, int G>                                                                           \
  attr void name(const Args& A, int64_t r0, int64_t r1) { lut_rows<NB, G>(A, r0, r1); }              \
  RowsFn pick_##name(int64_t nb) {                                                                   \
    return nb == 1 ? name<1, 4> : nb == 2 ? name<2, 2> : nb == 3 ? name<3, 2> : name<4, 2>;         \
  }
CK_LUT_PICK(lut_scalar, )
#if defined(__x86_64__)
CK_LUT_PICK(lut_avx2, CK_T_AVX2)
#endif

// -- fma (avx512): a codeword's 32 weights by masked moves, one FMA per 16 columns ---------------------

#if defined(__x86_64__)
template <int NB>
CK_T_AVX512 void fma_rows(const Args& A, int64_t r0, int64_t r1) {
  const uint64_t K = static_cast<uint64_t>(A.K);
  for (int64_t r = r0; r < r1; ++r) {
    const __m512 lo = _mm512_set1_ps(fp16_to_float(A.minmax[2 * r])), hi = _mm512_set1_ps(fp16_to_float(A.minmax[2 * r + 1]));
    __m512 acc0[NB], acc1[NB];
    for (int b = 0; b < NB; ++b) acc0[b] = acc1[b] = _mm512_setzero_ps();
    uint64_t p = 0;
    for (int32_t i = A.offsets[r], end = A.offsets[r + 1]; i < end && p < K; ++i) {
      const int32_t* e = A.table + 3 * static_cast<int64_t>(A.codes[i]);
      const uint32_t mn = static_cast<uint32_t>(e[0]), mx = static_cast<uint32_t>(e[1]);
      const __m512 w0 = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(static_cast<__mmask16>(mn), lo), static_cast<__mmask16>(mx), hi);
      const __m512 w1 = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(static_cast<__mmask16>(mn >> 16), lo), static_cast<__mmask16>(mx >> 16), hi);
      for (int b = 0; b < NB; ++b) {
        const float* xb = A.x + b * A.ld + p;
        acc0[b] = _mm512_fmadd_ps(_mm512_loadu_ps(xb), w0, acc0[b]);
        acc1[b] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), w1, acc1[b]);
      }
      p += static_cast<uint32_t>(e[2]);
    }
    for (int b = 0; b < NB; ++b) A.out[b * A.out_ld + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[b], acc1[b]));
  }
}

RowsFn pick_fma(int64_t nb) {
  static const RowsFn fns[8] = {fma_rows<1>, fma_rows<2>, fma_rows<3>, fma_rows<4>, fma_rows<5>, fma_rows<6>, fma_rows<7>, fma_rows<8>};
  return fns[nb - 1];
}
#endif

// -- the op -----------------------------------------------------------------------------------------

void check(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype, name, " must be a contiguous CPU ", dtype, " tensor");
}

// Rows [0, N) over all threads in blocks handed out as threads ask (a descheduled thread does less).
template <typename F>
void parallel_rows(int64_t N, int64_t grain, F body) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (N + grain - 1) / grain);
  if (threads <= 1 || at::in_parallel_region()) return body(0, N);
  const int64_t block = std::max<int64_t>(grain, N / (threads * 16));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(block); begin < N; begin = next.fetch_add(block)) body(begin, std::min(N, begin + block));
  });
}

}  // namespace

at::Tensor ternary_dict_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& row_offsets, const at::Tensor& minmax,
                               const at::Tensor& kernel_table, int64_t isa) {
  // Messages take integers as std::to_string text: on one machine (GCC 13.3, Intel Xeon) streaming an int64 into a
  // TORCH_CHECK message from this file crashed in std::ostream::_M_insert<long> instead of raising (2026-12-03, a
  // cuda-gdb backtrace); text is streamed by the library's own instantiation.
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512, "unknown kernel ISA ", std::to_string(isa));
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.is_floating_point(), "x must be a 2-D floating CPU tensor");
  check(codes, at::kShort, "codes");
  check(row_offsets, at::kInt, "row_offsets");
  check(minmax, at::kHalf, "minmax");
  check(kernel_table, at::kInt, "kernel_table");
  const int64_t N = minmax.size(0), K = x.size(1), B = x.size(0);
  TORCH_CHECK(minmax.dim() == 2 && minmax.size(1) == 2, "minmax must be [out, 2]");
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.size(0) == N + 1, "row_offsets must be [out + 1]");
  TORCH_CHECK(kernel_table.dim() == 2 && kernel_table.size(1) == 3, "kernel_table must be [codewords, 3]");
  const int64_t entries = kernel_table.size(0);
  TORCH_CHECK(entries >= 1 && entries <= kTableRows, "kernel_table must have 1 to 65536 codewords, got ", std::to_string(entries));
  const int32_t* off = row_offsets.data_ptr<int32_t>();
  bool ok = off[0] >= 0 && off[N] <= codes.numel();  // branch-free (vectorized), the message below
  for (int64_t r = 0; r < N; ++r) ok &= off[r] <= off[r + 1];
  TORCH_CHECK(ok, "row_offsets must not decrease and must lie in [0, ", std::to_string(codes.numel()), "]");
  if (entries < kTableRows) {  // a smaller dictionary: every code must index it (a 65536-row table takes any uint16)
    const uint16_t* c = reinterpret_cast<const uint16_t*>(codes.data_ptr());
    uint16_t top = 0;
    for (int64_t i = 0; i < codes.numel(); ++i) top = std::max(top, c[i]);
    TORCH_CHECK(codes.numel() == 0 || top < entries, "code ", std::to_string(top), " is outside the dictionary of ",
                std::to_string(entries), " codewords");
  }

  at::Tensor out = at::empty({B, N}, x.options().dtype(at::kFloat));  // every entry is written
  if (B == 0 || N == 0) return out.to(x.scalar_type());
  const int64_t ld = (K + kPad + 31) / 32 * 32, grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(K / 8, 1));
  at::Tensor xp = at::zeros({B, ld}, x.options().dtype(at::kFloat));  // zero-padded fp32 rows
  xp.narrow(1, 0, K).copy_(x);
  const Args base{reinterpret_cast<const uint16_t*>(codes.data_ptr()), off, reinterpret_cast<const uint16_t*>(minmax.data_ptr()),
                  kernel_table.data_ptr<int32_t>(), nullptr, ld, 0, K, nullptr, N};
  const int64_t slice = isa == kAvx512 ? 8 : 4;  // activation rows a pass (each pass decodes the codes again)
  for (int64_t b0 = 0; b0 < B; b0 += slice) {
    Args A = base;
    A.B = std::min(slice, B - b0);
    A.x = xp.data_ptr<float>() + b0 * ld;
    A.out = out.data_ptr<float>() + b0 * N;
    RowsFn fn = pick_lut_scalar(A.B);
#if defined(__x86_64__)
    if (isa == kAvx512) fn = pick_fma(A.B);
    else if (isa == kAvx2) fn = pick_lut_avx2(A.B);
#endif
    parallel_rows(N, grain, [&](int64_t r0, int64_t r1) { fn(A, r0, r1); });
  }
  return out.to(x.scalar_type());
}

}  // namespace ternary
}  // namespace ck
