"""CUDA C++ of the tensor-core kernel's other weight forms: the scaled one (groups of 16-64, float zero points;
mma_layout.pack_scaled), the table one (LUT codes; mma_lut_layout.py) and the compact ones (3-bit codes read as 3
bits: SpQR's with its statistics decoded in the kernel, mma_spqr_layout.py; the table one's). cuda_mma_source.py puts
it after the helpers it uses."""

FORMS_SOURCE = r"""
// The kernel's weight forms (FORM): EXACT, SCALED_1 and SCALED_2 (the scaled one, groups a lane's columns span), TABLE
// (mma_lut_layout.py; TABLE_COMPACT: its 3-bit codes as 6 words a unit; TABLE_WIDE: 4-bit codes, 16 entries a row),
// QUANTIZED (mma_spqr_layout.py). A lane's
// statistics of a unit: the exact form's uint2 of its lane group, shared by the group's units; the scaled form's words
// of the lane's groups (scale and bias pairs of one group, uint2, or of two, uint4); the table forms have none a unit
// (their tables are loaded once); the quantized form's second-level words of the lane's two groups (uint4; the
// statistic codes come with the codes)
constexpr int EXACT = 0, SCALED_1 = 1, SCALED_2 = 2, TABLE = 3, QUANTIZED = 4, TABLE_COMPACT = 5, TABLE_WIDE = 6;
template <int FORM> struct StatOf { using T = uint2; };
template <> struct StatOf<SCALED_2> { using T = uint4; };
template <> struct StatOf<QUANTIZED> { using T = uint4; };

__device__ __forceinline__ uint2 load_stream(const uint2* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ unsigned load_stream(const unsigned* p) {
  unsigned v;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// uint4 a (tile, unit) block of codes: the quantized form's 56, the compact table form's 48, else 32 a chunk
template <int BITS, int FORM> __host__ __device__ constexpr int block_uint4s() {
  return FORM == QUANTIZED ? 56 : FORM == TABLE_COMPACT ? 48 : 32 * (BITS / 2);
}

// BYTES (a multiple of 16) from p into L2: sm_90's bulk prefetch, one instruction (nothing before sm_90)
template <unsigned BYTES> __device__ __forceinline__ void prefetch_l2(const void* p) {
#if __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "n"(BYTES) : "memory");
#endif
}

// unit u's code blocks of the RT row tiles from tile0 into L2 (none past the warp's units)
template <int BITS, int FORM, int RT>
__device__ __forceinline__ void prefetch_codes(const uint4* __restrict__ codes, int tile0, int u, int u1, int U) {
  if (u >= u1) return;
#pragma unroll
  for (int r = 0; r < RT; r++) prefetch_l2<16 * block_uint4s<BITS, FORM>()>(codes + ((size_t)(tile0 + r) * U + u) * block_uint4s<BITS, FORM>());
}

// code chunks a lane a unit: the quantized and compact table forms' two (6 code words and the quantized form's
// statistic codes, as 4 + 4 words)
template <int BITS, int FORM> __host__ __device__ constexpr int chunks() { return FORM == QUANTIZED || FORM == TABLE_COMPACT ? 2 : BITS / 2; }

// One unit (128 columns) of the block's RT row tiles: their code chunks and statistics
template <int CH, int RT, int FORM = EXACT>
__device__ __forceinline__ void load_codes(uint4 (&w)[RT][CH], typename StatOf<FORM>::T (&s)[RT], const uint4* __restrict__ codes,
    const uint2* __restrict__ stats, int tile0, int u, int U, int GROUPS, int gshift, int lane) {
#pragma unroll
  for (int r = 0; r < RT; r++) {
    if constexpr (FORM == QUANTIZED || FORM == TABLE_COMPACT) {  // a (tile, unit) block: the lanes' 16, 8 (and 4) bytes
      const uint4* block = codes + (size_t)((size_t)(tile0 + r) * U + u) * (FORM == QUANTIZED ? 56 : 48);
      const uint2 more = load_stream((const uint2*)(block + 32) + lane);
      w[r][0] = load_stream(block + lane);
      w[r][CH - 1] = make_uint4(more.x, more.y, FORM == QUANTIZED ? load_stream((const unsigned*)(block + 48) + lane) : 0u, 0u);
      if (FORM == QUANTIZED) s[r] = ((const typename StatOf<FORM>::T*)stats)[((size_t)(tile0 + r) * U + u) * 4 + (lane & 3)];
    } else {
#pragma unroll
      for (int c = 0; c < CH; c++) w[r][c] = load_stream(codes + ((size_t)((size_t)(tile0 + r) * U + u) * CH + c) * 32 + lane);
      if (FORM == EXACT) s[r] = *(const typename StatOf<FORM>::T*)(stats + ((size_t)(tile0 + r) * GROUPS + (u >> gshift)) * 8 + (lane >> 2));
      else if (FORM != TABLE) s[r] = ((const typename StatOf<FORM>::T*)stats)[((size_t)(tile0 + r) * U + u) * 32 + lane];
    }
  }
}

// The scaled form (FORM SCALED_1 or SCALED_2: LG groups a lane): acc += one unit of the RT row tiles, each weight
// scale x code + bias in 16 bits (one rounding) before the mma: code exact as (M + code) - M, then one packed FMA with
// its row's scale and bias
// (FIELD: the bits of each BITS-wide field that are the code, the quantized form's 3 of 4)
template <int BITS, bool BF16, int NB, int RT, int LG, int FIELD = BITS>
__device__ __forceinline__ void unit_dot_scaled(float (&acc)[RT][NB][4], const uint4 (&w)[RT][BITS / 2],
                                                const typename StatOf<LG>::T (&s)[RT], const uint4 (&xv)[NB][4]) {
  constexpr int T = 32 / BITS / 8;
  constexpr unsigned MASK = ((1u << FIELD) - 1u) * 0x10001u, MAGIC = BF16 ? 0x43004300u : 0x64006400u;
  constexpr unsigned NEG_M = BF16 ? 0xC300C300u : 0xE400E400u, ONE = BF16 ? 0x3F803F80u : 0x3C003C00u;
#pragma unroll
  for (int r = 0; r < RT; r++) {
    // [group][rows g, g + 8]: the 16-bit statistic in both halves of a register
    unsigned scale[LG][2], bias[LG][2];
#pragma unroll
    for (int h = 0; h < LG; h++) {
      scale[h][0] = __byte_perm(word_of(s[r], 2 * h), 0u, 0x1010);
      scale[h][1] = __byte_perm(word_of(s[r], 2 * h), 0u, 0x3232);
      bias[h][0] = __byte_perm(word_of(s[r], 2 * h + 1), 0u, 0x1010);
      bias[h][1] = __byte_perm(word_of(s[r], 2 * h + 1), 0u, 0x3232);
    }
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const int wi = j / T, hw = j % T, h = LG == 2 ? j / 4 : 0;
      const unsigned word = word_of(w[r][wi / 4], wi % 4);
      unsigned a[4];
#pragma unroll
      for (int q = 0; q < 4; q++) {
        const unsigned code = fma2<BF16>(and_or<MASK, MAGIC>(word >> ((hw * 4 + q) * BITS)), ONE, NEG_M);
        a[q] = fma2<BF16>(code, scale[h][q & 1], bias[h][q & 1]);
      }
#pragma unroll
      for (int nb = 0; nb < NB; nb++) {
        const uint4 xq = xv[nb][j / 2];
        mma<BF16>(acc[r][nb], a, j & 1 ? xq.z : xq.x, j & 1 ? xq.w : xq.y);
      }
    }
  }
}

// The table form: acc += one unit of the RT row tiles, each weight its row's table entry: per k-tile one word of 8
// 3-bit codes (row g's four in the low half, row g + 8's in the high), two prmt a row give the entries' low and high
// bytes, two more interleave them into the row's two A registers. table[r][h]: the low-byte words then the high-byte
// words of row g + 8h's table.
template <bool BF16, int NB, int RT>
__device__ __forceinline__ void unit_dot_table(float (&acc)[RT][NB][4], const uint4 (&w)[RT][2], const uint4 (&table)[RT][2],
                                               const uint4 (&xv)[NB][4]) {
#pragma unroll
  for (int r = 0; r < RT; r++) {
#pragma unroll
    for (int j = 0; j < 8; j++) {
      unsigned a[4];
#pragma unroll
      for (int h = 0; h < 2; h++) {  // rows g (A registers 0, 2) and g + 8 (1, 3)
        const unsigned select = word_of(w[r][j / 4], j % 4) >> (16 * h);
        // 3-bit codes: no selector nibble has its sign-replicate bit, so prmt needs no masking
        const unsigned low = prmt(table[r][h].x, table[r][h].y, select), high = prmt(table[r][h].z, table[r][h].w, select);
        a[h] = __byte_perm(low, high, 0x5140);
        a[h + 2] = __byte_perm(low, high, 0x7362);
      }
#pragma unroll
      for (int nb = 0; nb < NB; nb++) {
        const uint4 xq = xv[nb][j / 2];
        mma<BF16>(acc[r][nb], a, j & 1 ? xq.z : xq.x, j & 1 ? xq.w : xq.y);
      }
    }
  }
}

// (a & m) | (b & ~m) in one instruction (a constant mask becomes its immediate)
__device__ __forceinline__ unsigned select_by(unsigned m, unsigned a, unsigned b) {
  unsigned d;
  asm("lop3.b32 %0, %1, %2, %3, 0xe4;" : "=r"(d) : "r"(a), "r"(b), "r"(m));
  return d;
}

// The quantized form: the fourth k-tile word of a run from the spare top bits of the first three's nibbles (bit b of
// nibble n is bit 3 of word b's nibble n; bit 3 is left holding another bit, which the decode masks off)
__device__ __forceinline__ unsigned fourth_word(unsigned w0, unsigned w1, unsigned w2) {
  return select_by(0x44444444u, w2 >> 1, select_by(0x22222222u, w1 >> 2, w0 >> 3));
}

// a 4-bit code as an exact float (2^23 + code, less 2^23)
__device__ __forceinline__ float code_float(unsigned code) { return __uint_as_float(0x4B000000u | code) - 8388608.f; }

template <bool BF16> __device__ __forceinline__ unsigned pack_pair(float low, float high) {
  unsigned d;
  if (BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(high), "f"(low));
  else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(high), "f"(low));
  return d;
}

// The quantized form's statistics of a lane's unit as the scaled form's (SCALED_2: for each of its two groups, the
// scales of rows g | g + 8 as one word, then their biases): each low + step x code in fp32 (one rounding), bias =
// -scale x zero, both rounded to the activations' dtype. `codes`: nibble rh * 4 + kind * 2 + h; `second`: words
// 2h (scale low | step << 16) and 2h + 1 (zero point's), float16
template <bool BF16> __device__ __forceinline__ uint4 quantized_statistics(unsigned codes, const uint4& second) {
  unsigned out[4];
#pragma unroll
  for (int h = 0; h < 2; h++) {
    float scale[2], bias[2];
    const unsigned sw = word_of(second, 2 * h), zw = word_of(second, 2 * h + 1);
#pragma unroll
    for (int rh = 0; rh < 2; rh++) {
      scale[rh] = fmaf(to_float_f16((unsigned short)(sw >> 16)), code_float((codes >> (16 * rh + 4 * h)) & 0xfu),
                       to_float_f16((unsigned short)(sw & 0xffffu)));
      const float zero = fmaf(to_float_f16((unsigned short)(zw >> 16)), code_float((codes >> (16 * rh + 8 + 4 * h)) & 0xfu),
                              to_float_f16((unsigned short)(zw & 0xffffu)));
      bias[rh] = -scale[rh] * zero;
    }
    out[2 * h] = pack_pair<BF16>(scale[0], scale[1]);
    out[2 * h + 1] = pack_pair<BF16>(bias[0], bias[1]);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// acc += one unit of the RT row tiles in the quantized form: its 8 k-tile words and statistics rebuilt, then the scaled
// form's decode with 3-bit fields. w[r]: (words 0-3), (words 4, 5, statistic codes, 0)
template <bool BF16, int NB, int RT>
__device__ __forceinline__ void unit_dot_quantized(float (&acc)[RT][NB][4], const uint4 (&w)[RT][2], const uint4 (&s)[RT],
                                                   const uint4 (&xv)[NB][4]) {
  uint4 words[RT][2], stats[RT];
#pragma unroll
  for (int r = 0; r < RT; r++) {
    words[r][0] = make_uint4(w[r][0].x, w[r][0].y, w[r][0].z, fourth_word(w[r][0].x, w[r][0].y, w[r][0].z));
    words[r][1] = make_uint4(w[r][0].w, w[r][1].x, w[r][1].y, fourth_word(w[r][0].w, w[r][1].x, w[r][1].y));
    stats[r] = quantized_statistics<BF16>(w[r][1].z, s[r]);
  }
  unit_dot_scaled<4, BF16, NB, RT, SCALED_2, 3>(acc, words, stats, xv);
}

// The compact table form: the 8 k-tile words rebuilt from 6 and every nibble masked to its 3 code bits (a selector
// nibble's bit 3 would make prmt replicate a sign), then the table form's decode
template <bool BF16, int NB, int RT>
__device__ __forceinline__ void unit_dot_table_compact(float (&acc)[RT][NB][4], const uint4 (&w)[RT][2], const uint4 (&table)[RT][2],
                                                       const uint4 (&xv)[NB][4]) {
  constexpr unsigned M = 0x77777777u;
  uint4 words[RT][2];
#pragma unroll
  for (int r = 0; r < RT; r++) {
    words[r][0] = make_uint4(w[r][0].x & M, w[r][0].y & M, w[r][0].z & M, fourth_word(w[r][0].x, w[r][0].y, w[r][0].z) & M);
    words[r][1] = make_uint4(w[r][0].w & M, w[r][1].x & M, w[r][1].y & M, fourth_word(w[r][0].w, w[r][1].x, w[r][1].y) & M);
  }
  unit_dot_table<BF16, NB, RT>(acc, words, table, xv);
}

// The wide table form (4-bit codes, 16 entries): per k-tile word, the selectors with each nibble's top bit cleared, and
// a mask selector whose nibble is 8 where the code's top bit is set (byte 0 of 0x80 with its sign replicated: 0xFF), 1
// where not (byte 1: 0); per row, two permutes pick each byte from entries 0-7 and from 8-15, the mask keeps one.
// table[r][2h], [2h + 1]: row g + 8h's low-byte words (entries 0-3, 4-7, 8-11, 12-15), then its high-byte words.
template <bool BF16, int NB, int RT>
__device__ __forceinline__ void unit_dot_table_wide(float (&acc)[RT][NB][4], const uint4 (&w)[RT][2], const uint4 (&table)[RT][4],
                                                    const uint4 (&xv)[NB][4]) {
#pragma unroll
  for (int r = 0; r < RT; r++) {
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const unsigned word = word_of(w[r][j / 4], j % 4);
      const unsigned low3 = word & 0x77777777u, top = (word >> 3) & 0x11111111u;
      const unsigned mask_select = (word & 0x88888888u) + 0x11111111u - top;
      unsigned a[4];
#pragma unroll
      for (int h = 0; h < 2; h++) {  // rows g (A registers 0, 2) and g + 8 (1, 3)
        const unsigned select = low3 >> (16 * h), mask = prmt(0x80u, 0u, mask_select >> (16 * h));
        const uint4 lo = table[r][2 * h], hi = table[r][2 * h + 1];
        const unsigned low = select_by(mask, prmt(lo.z, lo.w, select), prmt(lo.x, lo.y, select));
        const unsigned high = select_by(mask, prmt(hi.z, hi.w, select), prmt(hi.x, hi.y, select));
        a[h] = __byte_perm(low, high, 0x5140);
        a[h + 2] = __byte_perm(low, high, 0x7362);
      }
#pragma unroll
      for (int nb = 0; nb < NB; nb++) {
        const uint4 xq = xv[nb][j / 2];
        mma<BF16>(acc[r][nb], a, j & 1 ? xq.z : xq.x, j & 1 ? xq.w : xq.y);
      }
    }
  }
}

"""
