// The AVX-512 field decoder shared by avx512.cpp and avx512bf16.cpp: included after each file's
// `#pragma GCC target`, inside its anonymous namespace (each file gets its own copy, compiled for it).

// Lane l of a chunk of 16 fields that starts at field r of its first word: word (r + l) / per, shift
// ((r + l) % per) * bits. A chunk's fields lie in at most 8 consecutive words for every width here.
// Walking a row chunk by chunk repeats every P chunks (Wp words): chunk j of a period starts at field
// rj[j] of word wj[j], so the walk needs no loop-carried table look-up.
struct Tab {
  __m512i wi[32], sh[32];
  __m512i fmask;
  int per, P, Wp, rj[8], wj[8];
  explicit Tab(int bits) : per(32 / bits) {
    for (int r = 0; r < per; ++r) {
      alignas(64) int32_t w[16], s[16];
      for (int l = 0; l < 16; ++l) {
        w[l] = (r + l) / per;
        s[l] = ((r + l) % per) * bits;
      }
      wi[r] = _mm512_load_si512(w);
      sh[r] = _mm512_load_si512(s);
    }
    fmask = _mm512_set1_epi32(static_cast<int>((1u << bits) - 1u));
    int fields = 16;
    while (fields % per) fields += 16;  // lcm(16, per)
    P = fields / 16;
    Wp = fields / per;
    for (int j = 0; j < P; ++j) {
      rj[j] = (16 * j) % per;
      wj[j] = (16 * j) / per;
    }
  }
};

// Fields from field r of word w0 of `w` (nw words readable).
__attribute__((noinline, cold)) __m256i load_words_end(const uint32_t* w, int64_t avail) {
  return _mm256_maskz_loadu_epi32(static_cast<__mmask8>((1u << (avail > 0 ? avail : 0)) - 1u), w);
}

inline __m512i decode(const Tab& t, const uint32_t* w, int64_t nw, int64_t w0, int r) {
  const int64_t avail = nw - w0;
  const __m256i words = __builtin_expect(avail >= 8, 1) ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + w0)) : load_words_end(w + w0, avail);
  const __m512i v = _mm512_permutexvar_epi32(t.wi[r], _mm512_castsi256_si512(words));
  return _mm512_and_si512(_mm512_srlv_epi32(v, t.sh[r]), t.fmask);
}

// The same without the final mask: lane l holds its field in the low bits, the next fields above it (for a
// vpermps look-up, which reads the low 4 bits of a lane, into a table that repeats every 2^bits entries).
inline __m512i decode_raw(const Tab& t, const uint32_t* w, int64_t nw, int64_t w0, int r) {
  const int64_t avail = nw - w0;
  const __m256i words = __builtin_expect(avail >= 8, 1) ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + w0)) : load_words_end(w + w0, avail);
  return _mm512_srlv_epi32(_mm512_permutexvar_epi32(t.wi[r], _mm512_castsi256_si512(words)), t.sh[r]);
}

// x bytes a K-blocked kernel keeps in L1 (the L1 data cache is 32-48 KiB on AVX-512 CPUs)
constexpr int64_t kXBytes = 24 * 1024;

// A row's fields, 16 at a time.
struct Seq {
  const Tab& t;
  const uint32_t* w;
  int64_t nw, base;
  int j = 0;
  // from field k (a multiple of 16 * t.P: the start of a period)
  Seq(const Tab& tab, const uint32_t* words, int64_t n, int64_t k = 0) : t(tab), w(words), nw(n), base(k / (16 * tab.P) * tab.Wp) {}
  __m512i next() {
    const __m512i v = decode(t, w, nw, base + t.wj[j], t.rj[j]);
    if (++j == t.P) {
      j = 0;
      base += t.Wp;
    }
    return v;
  }
  __m512i next_raw() {
    const __m512i v = decode_raw(t, w, nw, base + t.wj[j], t.rj[j]);
    if (++j == t.P) {
      j = 0;
      base += t.Wp;
    }
    return v;
  }
};

