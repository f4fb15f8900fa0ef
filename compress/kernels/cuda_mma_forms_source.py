"""CUDA C++ of the tensor-core kernel's other weight forms: the scaled one (groups of 16-64, float zero points;
mma_layout.pack_scaled) and the table one (LUT codes; mma_lut_layout.py). cuda_mma_source.py puts it after the
helpers it uses."""

FORMS_SOURCE = r"""
// The scaled form (FORM SCALED_1 or SCALED_2: LG groups a lane): acc += one unit of the RT row tiles, each weight
// scale x code + bias in 16 bits (one rounding) before the mma: code exact as (M + code) - M, then one packed FMA with
// its row's scale and bias
template <int BITS, bool BF16, int NB, int RT, int LG>
__device__ __forceinline__ void unit_dot_scaled(float (&acc)[RT][NB][4], const uint4 (&w)[RT][BITS / 2],
                                                const typename StatOf<LG>::T (&s)[RT], const uint4 (&xv)[NB][4]) {
  constexpr int T = 32 / BITS / 8;
  constexpr unsigned MASK = ((1u << BITS) - 1u) * 0x10001u, MAGIC = BF16 ? 0x43004300u : 0x64006400u;
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

"""
