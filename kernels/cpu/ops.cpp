// The torch ops (namespace compress_cpu): argument checks, activations to padded fp32, the tables a
// format shares between rows, the ISA chosen by the caller, rows split over threads (at::parallel_for).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "common.h"

namespace ck {
namespace {

// bit 3: the BF16 kernels inside avx512; bit 4: those of them that also need AVX512_VBMI2
enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAvx512Vbmi2 = 4 };

int64_t isa_support() {
  int64_t bits = 1 << kScalar;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2"))
    bits |= 1 << kAvx2;
  if ((bits & (1 << kAvx2)) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    bits |= 1 << kAvx512;
  if ((bits & (1 << kAvx512)) && __builtin_cpu_supports("avx512bf16")) bits |= 1 << kAvx512Bf16;
  if ((bits & (1 << kAvx512Bf16)) && __builtin_cpu_supports("avx512vbmi2")) bits |= 1 << kAvx512Vbmi2;
#endif
  return bits;
}

void check_isa(int64_t isa) {
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512, "unknown kernel ISA ", std::to_string(isa));  // text: see ternary.cpp
  TORCH_CHECK(isa_support() & (1 << isa), "this CPU cannot run the ", isa == kAvx512 ? "avx512" : "avx2", " kernels");
}

constexpr int64_t kMaxBatch = 16, kPad = 64;

struct Input {
  at::Tensor x32, xh, out;
  int64_t B, K, ld;
};

// x as zero-padded fp32 rows, or (bf16) as zero-padded bfloat16 rows for the AVX512-BF16 kernels.
Input prepare(const at::Tensor& x, int64_t N, bool bf16 = false) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.is_floating_point(), "x must be a 2-D floating CPU tensor");
  const int64_t B = x.size(0), K = x.size(1), ld = (K + kPad + 31) / 32 * 32;
  Input in{{}, {}, at::empty({B, N}, x.options().dtype(at::kFloat)), B, K, ld};
  at::Tensor& buf = bf16 ? in.xh : in.x32;
  buf = at::zeros({B, ld}, x.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  buf.narrow(1, 0, K).copy_(x);
  return in;
}

// Runs `body(act, begin, end)` for every slice of at most 16 activation rows, over [0, units) on all threads.
template <typename F>
at::Tensor run(const at::Tensor& x, Input& in, int64_t units, int64_t grain, F body) {
  for (int64_t b0 = 0; b0 < in.B; b0 += kMaxBatch) {
    Act a{in.x32.defined() ? in.x32.data_ptr<float>() + b0 * in.ld : nullptr, in.ld, std::min(kMaxBatch, in.B - b0),
          in.out.data_ptr<float>() + b0 * in.out.size(1), in.out.size(1), in.K,
          in.xh.defined() ? reinterpret_cast<const uint16_t*>(in.xh.data_ptr()) + b0 * in.ld : nullptr, b0};
    // blocks of units handed out as threads ask (not one fixed share each): on a busy machine a thread that
    // was descheduled does less, instead of holding everyone up
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), (units + grain - 1) / std::max<int64_t>(grain, 1));
    if (threads <= 1 || at::in_parallel_region()) {
      body(a, 0, units);
      continue;
    }
    const int64_t block = std::max<int64_t>(grain, units / (threads * 16));
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      for (int64_t begin = next.fetch_add(block); begin < units; begin = next.fetch_add(block)) body(a, begin, std::min(units, begin + block));
    });
  }
  return x.scalar_type() == at::kFloat ? in.out : in.out.to(x.scalar_type());
}

// Whether the bfloat16 kernels take this call: the avx512 path, a CPU with AVX512_BF16, bf16 x and values.
bool use_bf16(int64_t isa, const at::Tensor& x, const at::Tensor& values) {
  return isa == kAvx512 && (isa_support() & (1 << kAvx512Bf16)) && x.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16;
}

// The planar group-quant step (avx2 / avx512): 2, 4 or 8 bits and whole steps in a group. x is then
// permuted inside every whole step of C = V * 8 / bits columns: position j * V + i holds column q * i + j.
int planar_step(int64_t isa, int64_t bits, int64_t gs) {
  const int64_t lanes = isa == kAvx512 ? 16 : isa == kAvx2 ? 8 : 0;
  if (!lanes || (bits != 2 && bits != 4 && bits != 8)) return 0;
  const int64_t step = lanes * 8 / bits;
  return gs % step == 0 ? static_cast<int>(step) : 0;
}

template <typename T>
void planar_order(T* data, int64_t B, int64_t K, int64_t ld, int step, int64_t bits) {
  const int64_t q = 8 / bits, lanes = step / q, full = K / step * step;
  if (q == 1 || full == 0) return;
  std::vector<T> row(full);
  for (int64_t b = 0; b < B; ++b) {
    T* x = data + b * ld;
    std::copy(x, x + full, row.begin());
    for (int64_t c0 = 0; c0 < full; c0 += step)
      for (int64_t j = 0; j < q; ++j)
        for (int64_t i = 0; i < lanes; ++i) x[c0 + j * lanes + i] = row[c0 + q * i + j];
  }
}

void planar_order(Input& in, int step, int64_t bits) {
  if (in.xh.defined()) planar_order(reinterpret_cast<uint16_t*>(in.xh.data_ptr()), in.B, in.K, in.ld, step, bits);
  else planar_order(in.x32.data_ptr<float>(), in.B, in.K, in.ld, step, bits);
}

// The bfloat16 group-quant kernel (avx512bf16::gq_rows): 2, 4 or 8 bits, AVX512_BF16, bf16 x, whole 32-byte
// steps in a group; its x is permuted by 32-lane steps. 0 when it does not apply.
int bf16_planar_step(int64_t isa, const at::Tensor& x, int64_t bits, int64_t gs) {
  if (isa != kAvx512 || !(isa_support() & (1 << kAvx512Bf16)) || x.scalar_type() != at::kBFloat16 || (bits != 2 && bits != 4 && bits != 8))
    return 0;
  const int64_t step = 32 * 8 / bits;
  return gs % step == 0 ? static_cast<int>(step) : 0;
}

// Each group's sum of x (bfloat16 as fp32) over the columns of its whole steps: [B][groups padded to 16].
std::vector<float> group_sums(const Input& in, int64_t gs, int64_t groups, int step) {
  const int64_t gp = (groups + 15) / 16 * 16, full = in.K / step * step;
  std::vector<float> sums(in.B * gp, 0.0f);
  const uint16_t* xh = reinterpret_cast<const uint16_t*>(in.xh.data_ptr());
  for (int64_t b = 0; b < in.B; ++b)
    for (int64_t k = 0; k < full; ++k) sums[b * gp + k / gs] += bf16_to_float(xh[b * in.ld + k]);
  return sums;
}

int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)); }

const uint32_t* words(const at::Tensor& t) { return reinterpret_cast<const uint32_t*>(t.data_ptr<int32_t>()); }

void check(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype, name, " must be a contiguous CPU ", dtype, " tensor");
}

const uint16_t* halves(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf),
              name, " must be a contiguous CPU bfloat16 or float16 tensor");
  return reinterpret_cast<const uint16_t*>(t.data_ptr());
}

int index_bits(int64_t m) {
  int bits = 0;
  while ((int64_t(1) << bits) < m) ++bits;
  return bits;
}

int64_t words_for(int64_t count, int bits) { return (count + 32 / bits - 1) / (32 / bits); }

// (k / n) * m for every stored value k, padded (running counters: a division per entry costs more than
// a small matmul); and whether a chunk's columns fit the permute window.
std::vector<int32_t> column_base(int64_t count, int64_t n, int64_t m) {
  std::vector<int32_t> base(count + 16);
  int32_t col = 0;
  for (int64_t k = 0, i = 0; k < count + 16; ++k) {
    base[k] = col;
    if (++i == n && k + 1 < count) {
      i = 0;
      col += static_cast<int32_t>(m);
    }
  }
  return base;
}
bool window(int64_t n, int64_t m) { return (n == 1 || n == 2 || n == 4 || n == 8) && m <= 2 * n; }

std::vector<int32_t> group_index(int64_t K, int64_t gs) {
  std::vector<int32_t> g(K + kPad);
  int32_t group = 0;
  for (int64_t k = 0, i = 0; k < K + kPad; ++k) {
    g[k] = group;
    if (++i == gs && k + 1 < K) {
      i = 0;
      ++group;
    }
  }
  return g;
}

Stats stats(const at::Tensor& scale, const at::Tensor& zero, int64_t rows, int64_t groups, int bits, int64_t gs, const int32_t* gidx) {
  TORCH_CHECK(scale.sizes() == at::IntArrayRef({rows, groups}), "scale must be [out, groups]");
  check(scale, at::kHalf, "scale");
  Stats st{reinterpret_cast<const uint16_t*>(scale.data_ptr()), nullptr, nullptr, groups, 0, gs, gidx};
  if (zero.scalar_type() == at::kInt) {
    check(zero, at::kInt, "zero");
    TORCH_CHECK(zero.sizes() == at::IntArrayRef({rows, words_for(groups, bits)}), "integer zero must be [out, words]");
    st.zint = words(zero);
    st.zwords = zero.size(1);
  } else {
    check(zero, at::kHalf, "zero");
    TORCH_CHECK(zero.sizes() == at::IntArrayRef({rows, groups}), "float16 zero must be [out, groups]");
    st.zhalf = reinterpret_cast<const uint16_t*>(zero.data_ptr());
  }
  return st;
}

#define CK_ISA_CALL(isa, fn, ...)                      \
  do {                                                 \
    if ((isa) == kAvx512) avx512::fn(__VA_ARGS__);     \
    else if ((isa) == kAvx2) avx2::fn(__VA_ARGS__);    \
    else scalar::fn(__VA_ARGS__);                      \
  } while (0)

at::Tensor nm_matmul(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices, int64_t n, int64_t m, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(0 < n && n < m && m <= 16, "N:M needs 0 < N < M <= 16");
  const int64_t N = values.size(0), K = x.size(1), count = K / m * n;
  TORCH_CHECK(K % m == 0 && values.dim() == 2 && values.size(1) == count, "values must be [out, in * N / M]");
  const int ibits = index_bits(m);
  check(indices, at::kInt, "indices");
  TORCH_CHECK(indices.sizes() == at::IntArrayRef({N, words_for(count, ibits)}), "indices must be [out, words]");
  const std::vector<int32_t> base = column_base(count, n, m);
  NMArgs A{{}, static_cast<int>(n), static_cast<int>(m), ibits, count, indices.size(1), halves(values, "values"), words(indices),
           values.scalar_type() == at::kHalf, base.data(), window(n, m)};
  const bool bf16 = A.window && use_bf16(isa, x, values);
  Input in = prepare(x, N, bf16);
  return run(x, in, N, row_grain(K), [&](const Act& a, int64_t r0, int64_t r1) {
    NMArgs args = A;
    args.a = a;
    std::unique_ptr<float[]> scratch(new float[scratch_floats(0)]);
    if (bf16) avx512bf16::nm_rows(args, r0, r1, scratch.get());
    else CK_ISA_CALL(isa, nm_rows, args, r0, r1, scratch.get());
  });
}

at::Tensor group_quant_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                              int64_t group_size, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  TORCH_CHECK(group_size > 0, "group_size must be positive");
  const int64_t N = codes.size(0), K = x.size(1), groups = (K + group_size - 1) / group_size;
  check(codes, at::kInt, "codes");
  TORCH_CHECK(codes.dim() == 2 && codes.size(1) == words_for(K, static_cast<int>(bits)), "codes must be [out, words]");
  const std::vector<int32_t> gidx = group_index(K, group_size);
  const int bf16_step = bf16_planar_step(isa, x, bits, group_size);
  Input in = prepare(x, N, bf16_step != 0);
  const int step = bf16_step ? bf16_step : planar_step(isa, bits, group_size);
  if (step) planar_order(in, step, bits);
  GQArgs A{{}, static_cast<int>(bits), codes.size(1), words(codes), stats(scale, zero, N, groups, static_cast<int>(bits), group_size, gidx.data()),
           step != 0};
  std::vector<float> sums;
  if (bf16_step) {
    sums = group_sums(in, group_size, groups, bf16_step);
    A.xsum = sums.data();
    A.xsum_ld = (groups + 15) / 16 * 16;
  }
  return run(x, in, N, row_grain(K), [&](const Act& a, int64_t r0, int64_t r1) {
    GQArgs args = A;
    args.a = a;
    std::unique_ptr<float[]> scratch(new float[scratch_floats(groups)]);
    if (bf16_step) avx512bf16::gq_rows(args, r0, r1, scratch.get());
    else CK_ISA_CALL(isa, gq_rows, args, r0, r1, scratch.get());
  });
}

void offsets(const at::Tensor& t, int64_t tiles, const int32_t*& o32, const int64_t*& o64) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == tiles + 1 && t.is_contiguous(), "tile offsets must be [tiles + 1]");
  if (t.scalar_type() == at::kInt) o32 = t.data_ptr<int32_t>();
  else {
    check(t, at::kLong, "tile offsets");
    o64 = t.data_ptr<int64_t>();
  }
}

at::Tensor bitmap_matmul(const at::Tensor& x, const at::Tensor& bitmask, const at::Tensor& values, const at::Tensor& tile_offsets,
                         int64_t tile_rows, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(tile_rows > 0, "tile_rows must be positive");
  const int64_t N = bitmask.size(0), K = x.size(1), tiles = (N + tile_rows - 1) / tile_rows;
  check(bitmask, at::kInt, "bitmask");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.size(1) == (K + 31) / 32 && values.dim() == 1, "bitmask must be [out, ceil(in / 32)]");
  BitmapArgs A{{}, bitmask.size(1), tile_rows, values.numel(), words(bitmask), halves(values, "values"), nullptr, nullptr,
               values.scalar_type() == at::kHalf};
  offsets(tile_offsets, tiles, A.off32, A.off64);
  const bool bf16 = use_bf16(isa, x, values) && (isa_support() & (1 << kAvx512Vbmi2));
  Input in = prepare(x, N, bf16);
  return run(x, in, tiles, std::max<int64_t>(1, row_grain(K) / tile_rows), [&](const Act& a, int64_t t0, int64_t t1) {
    BitmapArgs args = A;
    args.a = a;
    if (bf16) return avx512bf16::bitmap_tiles(args, t0, t1);
    std::unique_ptr<float[]> scratch(new float[scratch_floats(0)]);
    CK_ISA_CALL(isa, bitmap_tiles, args, t0, t1, scratch.get());
  });
}

// pattern n:m (n > 0, indices given) or unstructured (n == 0, bitmask and code offsets given)
at::Tensor sparse_quant_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero,
                               const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& bitmask,
                               const std::optional<at::Tensor>& code_offsets, int64_t n, int64_t m, int64_t bits, int64_t group_size,
                               int64_t tile_rows, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  TORCH_CHECK(group_size > 0 && tile_rows > 0, "group_size and tile_rows must be positive");
  check(codes, at::kInt, "codes");
  const int64_t N = scale.size(0), K = x.size(1), groups = (K + group_size - 1) / group_size;
  const std::vector<int32_t> gidx = group_index(K, group_size);
  SQArgs A{};
  A.bits = static_cast<int>(bits);
  A.st = stats(scale, zero, N, groups, A.bits, group_size, gidx.data());
  A.codes = words(codes);
  std::vector<int32_t> base;
  int64_t units = N, grain = row_grain(K);
  if (n > 0) {
    TORCH_CHECK(n < m && m <= 16 && K % m == 0 && indices.has_value(), "N:M needs 0 < N < M <= 16 dividing the input size, and indices");
    A.n = static_cast<int>(n);
    A.m = static_cast<int>(m);
    A.ibits = index_bits(m);
    A.count = K / m * n;
    check(*indices, at::kInt, "indices");
    TORCH_CHECK(indices->sizes() == at::IntArrayRef({N, words_for(A.count, A.ibits)}), "indices must be [out, words]");
    TORCH_CHECK(codes.sizes() == at::IntArrayRef({N, words_for(A.count, A.bits)}), "codes must be [out, words]");
    A.iwords = indices->size(1);
    A.cwords = codes.size(1);
    A.indices = words(*indices);
    base = column_base(A.count, n, m);
    A.colbase = base.data();
    A.window = window(n, m);
  } else {
    TORCH_CHECK(bitmask.has_value() && code_offsets.has_value(), "the unstructured form needs a bitmask and code offsets");
    check(*bitmask, at::kInt, "bitmask");
    TORCH_CHECK(bitmask->sizes() == at::IntArrayRef({N, (K + 31) / 32}), "bitmask must be [out, ceil(in / 32)]");
    A.bwords = bitmask->size(1);
    A.tile_rows = tile_rows;
    A.total_words = codes.numel();
    A.bitmask = words(*bitmask);
    units = (N + tile_rows - 1) / tile_rows;
    grain = std::max<int64_t>(1, grain / tile_rows);
    offsets(*code_offsets, units, A.off32, A.off64);
  }
  // the bfloat16 kernel: N:M in a permute window, 4-bit codes, integer zero points, whole 32-value steps a group
  const bool bf16 = n > 0 && A.window && bits == 4 && A.st.zint && group_size % (32 / n * m) == 0 && isa == kAvx512 &&
                    (isa_support() & (1 << kAvx512Bf16)) && x.scalar_type() == at::kBFloat16;
  Input in = prepare(x, N, bf16);
  return run(x, in, units, grain, [&](const Act& a, int64_t u0, int64_t u1) {
    SQArgs args = A;
    args.a = a;
    std::unique_ptr<float[]> scratch(new float[scratch_floats(groups)]);
    if (bf16) avx512bf16::sq_nm_rows(args, u0, u1, scratch.get());
    else CK_ISA_CALL(isa, sq_rows, args, u0, u1, scratch.get());
  });
}

// -- spqr and lut: the code stream (dense or under a keep mask), outliers and permutation they share ------

// x's columns in the stored order: stored column k is column perm[k] (uint16) of the layer.
void permute_columns(Input& in, const std::optional<at::Tensor>& perm) {
  if (!perm.has_value()) return;
  check(*perm, at::kShort, "perm");
  TORCH_CHECK(perm->numel() == in.K, "perm must be [in]");
  const uint16_t* p = reinterpret_cast<const uint16_t*>(perm->data_ptr());
  uint16_t top = 0;  // branch-free first (vectorized), the message from the loop only when it fails
  for (int64_t k = 0; k < in.K; ++k) top = std::max(top, p[k]);
  if (top >= in.K)
    for (int64_t k = 0; k < in.K; ++k) TORCH_CHECK(p[k] < in.K, "perm entry ", p[k], " out of range");
  std::vector<float> row(in.K);
  for (int64_t b = 0; b < in.B; ++b) {
    float* x = in.x32.data_ptr<float>() + b * in.ld;
    std::copy(x, x + in.K, row.begin());
    for (int64_t k = 0; k < in.K; ++k) x[k] = row[p[k]];
  }
}

OutlierCSR outlier_csr(int64_t N, int64_t K, const std::optional<at::Tensor>& row_ptr, const std::optional<at::Tensor>& cols,
                       const std::optional<at::Tensor>& values) {
  if (!row_ptr.has_value()) return {nullptr, nullptr, nullptr};
  TORCH_CHECK(cols.has_value() && values.has_value(), "outliers need row pointers, columns and values");
  check(*row_ptr, at::kInt, "outlier_row_ptr");
  check(*cols, at::kShort, "outlier_cols");
  check(*values, at::kHalf, "outlier_values");
  TORCH_CHECK(row_ptr->numel() == N + 1 && cols->numel() == values->numel(), "outliers must be CSR: row_ptr [out + 1], cols and values [nnz]");
  const int32_t* ptr = row_ptr->data_ptr<int32_t>();
  const uint16_t* c = reinterpret_cast<const uint16_t*>(cols->data_ptr());
  TORCH_CHECK(ptr[0] == 0 && ptr[N] == cols->numel(), "outlier row pointers must run from 0 to nnz");
  // the same checks branch-free (vectorized; this runs every call), the loop below only to say what failed:
  // pointers that do not decrease, columns below K, and no descent inside a row (a descent only at row starts)
  const int64_t nnz = cols->numel();
  bool ok = true;
  for (int64_t r = 0; r < N; ++r) ok &= ptr[r] <= ptr[r + 1];
  if (ok) {
    uint16_t top = 0;
    int64_t descents = 0, at_starts = 0;
    for (int64_t i = 0; i < nnz; ++i) top = std::max(top, c[i]);
    for (int64_t i = 1; i < nnz; ++i) descents += c[i] <= c[i - 1];
    for (int64_t r = 0; r < N; ++r) {
      const int32_t p = ptr[r];
      at_starts += p > 0 && p < ptr[r + 1] && c[p] <= c[p - 1];
    }
    if (nnz == 0 || (top < K && descents == at_starts)) return {ptr, c, reinterpret_cast<const uint16_t*>(values->data_ptr())};
  }
  for (int64_t r = 0; r < N; ++r) {
    TORCH_CHECK(ptr[r] <= ptr[r + 1], "outlier row pointers must not decrease");
    for (int32_t i = ptr[r]; i < ptr[r + 1]; ++i) TORCH_CHECK(c[i] < K && (i == ptr[r] || c[i] > c[i - 1]), "outlier columns must ascend within a row, below in");
  }
  return {ptr, c, reinterpret_cast<const uint16_t*>(values->data_ptr())};
}

// The dense (GQArgs) or masked (SQArgs) code stream of a spqr / lut weight; the units the threads share.
struct Stream {
  GQArgs dense{};
  SQArgs sparse{};
  bool keep = false;
  int64_t units = 0, grain = 0;
};

Stream code_stream(const at::Tensor& codes, const std::optional<at::Tensor>& bitmask, const std::optional<at::Tensor>& code_offsets, int64_t N,
                   int64_t K, int64_t bits, int64_t tile_rows) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be 2..8");
  check(codes, at::kInt, "codes");
  Stream s;
  s.dense.bits = s.sparse.bits = static_cast<int>(bits);
  s.units = N;
  s.grain = row_grain(K);
  if (!bitmask.has_value()) {
    TORCH_CHECK(codes.dim() == 2 && codes.size(0) == N && codes.size(1) == words_for(K, static_cast<int>(bits)), "codes must be [out, words]");
    s.dense.cwords = codes.size(1);
    s.dense.codes = words(codes);
    return s;
  }
  TORCH_CHECK(tile_rows > 0 && code_offsets.has_value(), "a keep mask needs code offsets and a positive tile_rows");
  check(*bitmask, at::kInt, "bitmask");
  TORCH_CHECK(bitmask->sizes() == at::IntArrayRef({N, (K + 31) / 32}), "bitmask must be [out, ceil(in / 32)]");
  s.keep = true;
  s.sparse.bwords = bitmask->size(1);
  s.sparse.tile_rows = tile_rows;
  s.sparse.total_words = codes.numel();
  s.sparse.bitmask = words(*bitmask);
  s.sparse.codes = words(codes);
  s.units = (N + tile_rows - 1) / tile_rows;
  s.grain = std::max<int64_t>(1, s.grain / tile_rows);
  offsets(*code_offsets, s.units, s.sparse.off32, s.sparse.off64);
  return s;
}

SpQRStat spqr_stat(const char* name, int64_t N, int64_t groups, int64_t bits, const std::optional<at::Tensor>& plain,
                   const std::optional<at::Tensor>& qcodes, const std::optional<at::Tensor>& step, const std::optional<at::Tensor>& low,
                   int64_t qbits, int64_t qgs) {
  SpQRStat st{};
  if (plain.has_value()) {
    if (plain->scalar_type() == at::kInt) {
      check(*plain, at::kInt, name);
      TORCH_CHECK(plain->sizes() == at::IntArrayRef({N, words_for(groups, static_cast<int>(bits))}), name, " (integer) must be [out, words]");
      st.ints = words(*plain);
      st.ibits = static_cast<int>(bits);
      st.iwords = plain->size(1);
    } else {
      check(*plain, at::kHalf, name);
      TORCH_CHECK(plain->sizes() == at::IntArrayRef({N, groups}), name, " must be [out, groups]");
      st.half = reinterpret_cast<const uint16_t*>(plain->data_ptr());
    }
    return st;
  }
  TORCH_CHECK(qcodes.has_value() && step.has_value() && low.has_value(), name, ": plain or quantized (codes, step, low) needed");
  TORCH_CHECK(qbits >= 2 && qbits <= 8 && qgs > 0 && N % qgs == 0, name, ": second-level bits 2..8 and a group size dividing out");
  check(*qcodes, at::kInt, name);
  check(*step, at::kHalf, name);
  check(*low, at::kHalf, name);
  TORCH_CHECK(qcodes->sizes() == at::IntArrayRef({N, words_for(groups, static_cast<int>(qbits))}), name, " codes must be [out, words]");
  TORCH_CHECK(step->sizes() == at::IntArrayRef({N / qgs, groups}) && low->sizes() == step->sizes(), name, " step and low must be [out / qgs, groups]");
  st.qcodes = words(*qcodes);
  st.step = reinterpret_cast<const uint16_t*>(step->data_ptr());
  st.low = reinterpret_cast<const uint16_t*>(low->data_ptr());
  st.qbits = static_cast<int>(qbits);
  st.qgs = qgs;
  st.qwords = qcodes->size(1);
  return st;
}

using Opt = std::optional<at::Tensor>;

at::Tensor spqr_matmul(const at::Tensor& x, const at::Tensor& codes, const Opt& scale, const Opt& scale_codes, const Opt& scale_step,
                       const Opt& scale_low, const Opt& zero, const Opt& zero_codes, const Opt& zero_step, const Opt& zero_low,
                       const Opt& bitmask, const Opt& code_offsets, const Opt& outlier_row_ptr, const Opt& outlier_cols,
                       const Opt& outlier_values, const Opt& perm, int64_t N, int64_t bits, int64_t group_size, int64_t scale_bits,
                       int64_t scale_group_size, int64_t zero_bits, int64_t zero_group_size, int64_t tile_rows, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(group_size > 0, "group_size must be positive");
  const int64_t K = x.size(1), groups = (K + group_size - 1) / group_size;
  const std::vector<int32_t> gidx = group_index(K, group_size);
  Stream s = code_stream(codes, bitmask, code_offsets, N, K, bits, tile_rows);
  s.dense.st.groups = s.sparse.st.groups = groups;
  s.dense.st.gs = s.sparse.st.gs = group_size;
  s.dense.st.gidx = s.sparse.st.gidx = gidx.data();
  SpQRArgs A{s.dense, s.sparse, s.keep, outlier_csr(N, K, outlier_row_ptr, outlier_cols, outlier_values),
             spqr_stat("scale", N, groups, bits, scale, scale_codes, scale_step, scale_low, scale_bits, scale_group_size),
             spqr_stat("zero", N, groups, bits, zero, zero_codes, zero_step, zero_low, zero_bits, zero_group_size)};
  TORCH_CHECK(!A.scale.ints, "scale must be float16 or quantized");
  Input in = prepare(x, N);
  permute_columns(in, perm);
  return run(x, in, s.units, s.grain, [&](const Act& a, int64_t u0, int64_t u1) {
    SpQRArgs args = A;
    args.dense.a = args.sparse.a = a;
    std::unique_ptr<float[]> scratch(new float[scratch_floats(groups + 256)]);
    CK_ISA_CALL(isa, spqr_rows, args, u0, u1, scratch.get());
  });
}

at::Tensor lut_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut, const Opt& bitmask, const Opt& code_offsets,
                      const Opt& outlier_row_ptr, const Opt& outlier_cols, const Opt& outlier_values, const Opt& perm, int64_t bits,
                      int64_t tile_rows, int64_t isa) {
  check_isa(isa);
  const int64_t N = lut.size(0), K = x.size(1);
  check(lut, at::kHalf, "lut");
  TORCH_CHECK(lut.dim() == 2 && lut.size(1) == (int64_t(1) << bits), "lut must be [out, 2^bits]");
  const std::vector<int32_t> gidx(K + kPad, 0);  // one group: the row's table
  Stream s = code_stream(codes, bitmask, code_offsets, N, K, bits, tile_rows);
  s.dense.st.groups = s.sparse.st.groups = 1;
  s.dense.st.gs = s.sparse.st.gs = K;
  s.dense.st.gidx = s.sparse.st.gidx = gidx.data();
  LUTArgs A{s.dense, s.sparse, s.keep, outlier_csr(N, K, outlier_row_ptr, outlier_cols, outlier_values),
            reinterpret_cast<const uint16_t*>(lut.data_ptr())};
  Input in = prepare(x, N);
  permute_columns(in, perm);
  return run(x, in, s.units, s.grain, [&](const Act& a, int64_t u0, int64_t u1) {
    LUTArgs args = A;
    args.dense.a = args.sparse.a = a;
    std::unique_ptr<float[]> scratch(new float[scratch_floats(256)]);
    CK_ISA_CALL(isa, lut_rows, args, u0, u1, scratch.get());
  });
}

}  // namespace

// ternary.cpp: the dictionary-coded ternary (QMoE) kernels, their own argument checks
namespace ternary {
at::Tensor ternary_dict_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& row_offsets, const at::Tensor& minmax,
                               const at::Tensor& kernel_table, int64_t isa);
}  // namespace ternary

namespace {
at::Tensor ternary_dict_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& row_offsets, const at::Tensor& minmax,
                               const at::Tensor& kernel_table, int64_t isa) {
  check_isa(isa);
  return ternary::ternary_dict_matmul(x, codes, row_offsets, minmax, kernel_table, isa);
}
}  // namespace
}  // namespace ck

TORCH_LIBRARY(compress_cpu, lib) {
  lib.def("isa_support() -> int", &ck::isa_support);
  lib.def("nm_matmul(Tensor x, Tensor values, Tensor indices, int n, int m, int isa) -> Tensor", &ck::nm_matmul);
  lib.def("group_quant_matmul(Tensor x, Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, int isa) -> Tensor",
          &ck::group_quant_matmul);
  lib.def("bitmap_matmul(Tensor x, Tensor bitmask, Tensor values, Tensor tile_offsets, int tile_rows, int isa) -> Tensor", &ck::bitmap_matmul);
  lib.def("sparse_quant_matmul(Tensor x, Tensor codes, Tensor scale, Tensor zero, Tensor? indices, Tensor? bitmask, Tensor? code_offsets, "
          "int n, int m, int bits, int group_size, int tile_rows, int isa) -> Tensor",
          &ck::sparse_quant_matmul);
  lib.def("spqr_matmul(Tensor x, Tensor codes, Tensor? scale, Tensor? scale_codes, Tensor? scale_step, Tensor? scale_low, Tensor? zero, "
          "Tensor? zero_codes, Tensor? zero_step, Tensor? zero_low, Tensor? bitmask, Tensor? code_offsets, Tensor? outlier_row_ptr, "
          "Tensor? outlier_cols, Tensor? outlier_values, Tensor? perm, int out, int bits, int group_size, int scale_bits, "
          "int scale_group_size, int zero_bits, int zero_group_size, int tile_rows, int isa) -> Tensor",
          &ck::spqr_matmul);
  lib.def("lut_matmul(Tensor x, Tensor codes, Tensor lut, Tensor? bitmask, Tensor? code_offsets, Tensor? outlier_row_ptr, "
          "Tensor? outlier_cols, Tensor? outlier_values, Tensor? perm, int bits, int tile_rows, int isa) -> Tensor",
          &ck::lut_matmul);
  lib.def("ternary_dict_matmul(Tensor x, Tensor codes, Tensor row_offsets, Tensor minmax, Tensor kernel_table, int isa) -> Tensor",
          &ck::ternary_dict_matmul);
}
