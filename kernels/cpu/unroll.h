// Unrolling with a compile-time lane of accumulators: chunks<U>(begin, end, stride, f) calls
// f(Int<u>{}, k) for k = begin, begin + stride, ... < end with u = 0, 1, ..., U - 1, 0, ... (the
// remainder with u = 0), so a kernel can keep U independent accumulator sets in registers and hide
// the FMA latency when it has few activation rows. Included after an ISA file's pragma, inside its
// anonymous namespace.

template <int V>
struct Int {
  static constexpr int value = V;
};

template <int I, int U>
struct Unroll {
  template <typename F>
  static inline __attribute__((always_inline)) void run(F& f, int64_t k, int64_t stride) {
    f(Int<I>{}, k + I * stride);
    Unroll<I + 1, U>::run(f, k, stride);
  }
};

template <int U>
struct Unroll<U, U> {
  template <typename F>
  static inline __attribute__((always_inline)) void run(F&, int64_t, int64_t) {}
};

template <int U, typename F>
inline __attribute__((always_inline)) void chunks(int64_t begin, int64_t end, int64_t stride, F&& f) {
  int64_t k = begin;
  for (; k + U * stride <= end; k += U * stride) Unroll<0, U>::run(f, k, stride);
  for (; k < end; k += stride) f(Int<0>{}, k);
}

// Accumulator sets for NB activation rows: enough independent FMA chains for small batches.
template <int NB>
struct Sets {
  static constexpr int value = NB == 1 ? 4 : NB <= 3 ? 2 : 1;
};
