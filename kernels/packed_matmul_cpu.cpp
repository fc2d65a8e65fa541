// Packed-bit matmul on x86-64 CPUs: y = x @ Ŵᵀ for a KernelPlan (see kernels/plan.py).
//
// Ŵ is a sum of bit products: y[b, r] = Σ_k Σ_g coef[k, r, g] · Σ_{c∈g} xv[var_k, c] · bits_k[r, c]
// plus constant products (row-independent group sums) and salient corrections (salient weight
// minus the formula there): a CSR list of fp32 deltas, or, in PB-LLM's layout, uint8 magnitudes
// with a (scale, base) per row and bit (3 bytes per salient weight, not 6), or that layout read
// straight from the checkpoint's own streams (nibble-gap positions, magnitude bit planes) through
// a per-row index: slower per entry, but no copy of the salient part at all.
// Bits are read as little-endian uint64 words (bit i of word w is column 64·w + i), the
// checkpoint's own layout, so planes are used in place.
//
// Paths, chosen at run time:
// * AVX2 table lookup (the default; batch-1 decode is what it is for). Per group of 4 columns
//   the 16 possible partial sums of the activations are tabulated as int16, split into a low
//   and a high byte table, so that one vpshufb looks up 32 rows' nibbles at once (the T-MAC /
//   bitnet.cpp idea). The bits are re-laid out in 16-row tiles (plan.tiles) for it. Tables are
//   scaled per 64 columns to ±4095 and summed in int16 over a word, in int32 beyond, so the
//   result is exact up to the table rounding: about 1e-4 of Σ|x·w|, well inside bf16 rounding.
// * AVX2 float (one FMA per 8 weights with a 0/1 mask from a byte table): exact fp32.
// * portable scalar (walks the set bits), and AVX-512 (masked adds driven by 16-bit masks;
//   opt-in until verified on AVX-512 hardware).
// decode_rows() expands a band of rows to fp32 for the large-batch path (bands + GEMM).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMBIN_X86 1
#endif

namespace {

// AUTO: the fastest path; EXACT: the fastest exact-fp32 path (no table rounding).
enum Isa : int64_t { AUTO = 0, SCALAR = 1, AVX2 = 2, AVX512 = 3, AVX2_LUT = 4, EXACT = 5 };
constexpr int MAX_PLANES = 16;
constexpr int MAX_FAST_PRODUCTS = 8;

struct Plan {
  int64_t N, K, Kpad, W64, P, G, gs, V, NP, NB, gwords;
  bool word_groups;  // every group is whole words (group_size % 64 == 0, or one group per row)
  const uint64_t* planes;  // (P, N, W64)
  const uint8_t* tiles;    // (P, NT, W64, 128) 16-row nibble tiles, or null
  int64_t NT;
  const float* colw;       // (V, Kpad)
  const float* coef;       // (NP, NT, G, 16) tile-major: a 16-row tile's coefficients of one group are adjacent
  const int64_t* rowptr;   // (N + 1) or null
  const void* scol;        // int16 or int32 (S)
  const float* sval;       // (S) fp32 deltas, or null for codes
  const uint8_t* scode;    // (S) magnitudes (codes form), or null
  const float* srow;       // (N, 4) codes and stream forms: (scale, base) of each row's b = 1 part, then b = 0 part
  const uint8_t* sstream;  // stream form: nibble-gap codes, two per byte (low first); rowptr is (N, 3)
  int64_t ncodes;
  const uint8_t* smag;     // stream form: magnitude bit planes (mbits, mbytes)
  int64_t mbits, mbytes;
  float (*salient_sum)(const struct Plan&, const float*, int64_t);
  void (*salient_write)(const struct Plan&, int64_t, float*);
  int nplanes[MAX_FAST_PRODUCTS];  // plane lists of the bit products the SIMD paths serve
  int plist[MAX_FAST_PRODUCTS][MAX_PLANES];
  std::vector<int32_t> var, mono;
};

// Row r's coefficients of product k: group g's is at [16 * g] (tile-major; rows past N are zero).
inline const float* coef_row(const Plan& p, int64_t k, int64_t r) {
  return p.coef + (k * p.NT + (r >> 4)) * p.G * 16 + (r & 15);
}

// A product's planes for one row: most products have one or two, so those are unrolled.
struct RowPlanes {
  const uint64_t* rows[MAX_PLANES];
  int n = 0;
  void init(const Plan& p, int k, int64_t r) {
    n = p.nplanes[k];
    for (int i = 0; i < n; ++i) rows[i] = p.planes + (p.plist[k][i] * p.N + r) * p.W64;
  }
  inline uint64_t word(int64_t w) const {
    if (n == 1) return rows[0][w];
    if (n == 2) return rows[0][w] & rows[1][w];
    uint64_t m = rows[0][w];
    for (int i = 1; i < n; ++i) m &= rows[i][w];
    return m;
  }
};

// Each bit product's activations and plane rows for one output row (shared by the SIMD paths).
template <int NB>
struct RowProducts {
  const float* x[NB];
  RowPlanes planes[NB];
  RowProducts(const Plan& p, const float* xv, int64_t r) {
    for (int k = 0; k < NB; ++k) {
      x[k] = xv + p.var[k] * p.Kpad;
      planes[k].init(p, k, r);
    }
  }
};

inline uint64_t product_word_generic(const Plan& p, int k, int64_t r, int64_t w) {
  uint64_t m = ~uint64_t(0);
  for (int64_t q = 0; q < p.P; ++q)
    if (p.mono[k] >> q & 1) m &= p.planes[(q * p.N + r) * p.W64 + w];
  return m;
}

template <typename C>
float salient_sum(const Plan& p, const float* x, int64_t r) {
  const C* col = static_cast<const C*>(p.scol);
  float t[4] = {0.f, 0.f, 0.f, 0.f};  // four chains: the adds do not wait on each other
  int64_t e = p.rowptr[r];
  const int64_t end = p.rowptr[r + 1];
  for (; e + 4 <= end; e += 4)
    for (int i = 0; i < 4; ++i) t[i] += p.sval[e + i] * x[col[e + i]];
  for (; e < end; ++e) t[0] += p.sval[e] * x[col[e]];
  return (t[0] + t[1]) + (t[2] + t[3]);
}

template <typename C>
void salient_write(const Plan& p, int64_t r, float* row) {
  const C* col = static_cast<const C*>(p.scol);
  for (int64_t e = p.rowptr[r]; e < p.rowptr[r + 1]; ++e) row[col[e]] += p.sval[e];
}

// Codes form: per part (b = 1, then b = 0) delta = scale · m + base, so the part adds
// scale · Σ m·x + base · Σ x.
template <typename C>
float salient_sum_codes(const Plan& p, const float* x, int64_t r) {
  const C* col = static_cast<const C*>(p.scol);
  const float* rc = p.srow + 4 * r;
  float total = 0.f;
  for (int part = 0; part < 2; ++part) {
    float a[2] = {0.f, 0.f}, t[2] = {0.f, 0.f};  // two chains each
    int64_t e = p.rowptr[2 * r + part];
    const int64_t end = p.rowptr[2 * r + part + 1];
    for (; e + 2 <= end; e += 2)
      for (int i = 0; i < 2; ++i) {
        const float xe = x[col[e + i]];
        a[i] += (float)p.scode[e + i] * xe;
        t[i] += xe;
      }
    if (e < end) {
      const float xe = x[col[e]];
      a[0] += (float)p.scode[e] * xe;
      t[0] += xe;
    }
    total += rc[2 * part] * (a[0] + a[1]) + rc[2 * part + 1] * (t[0] + t[1]);
  }
  return total;
}

template <typename C>
void salient_write_codes(const Plan& p, int64_t r, float* row) {
  const C* col = static_cast<const C*>(p.scol);
  for (int part = 0; part < 2; ++part) {
    const float scale = p.srow[4 * r + 2 * part], base = p.srow[4 * r + 2 * part + 1];
    for (int64_t e = p.rowptr[2 * r + part]; e < p.rowptr[2 * r + part + 1]; ++e)
      row[col[e]] += scale * (float)p.scode[e] + base;
  }
}

// Stream form: row r's salient weights decoded from the checkpoint's streams. rowptr holds, per
// row, the first code whose position reaches the row, the position before it and the number of
// marks before it (the row's first magnitude). Code c in 1..15 advances c and marks; 0 advances 15.
template <typename Visit>
inline void for_each_stream_entry(const Plan& p, int64_t r, Visit visit) {
  const int64_t* ix = p.rowptr + 3 * r;
  int64_t i = ix[0], pos = ix[1], s = ix[2];
  const int64_t start = r * p.K, end = start + p.K;
  const uint64_t* bits = p.planes + r * p.W64;  // plane 0: the salient sign
  const float* rc = p.srow + 4 * r;
  for (; i < p.ncodes; ++i) {
    const int code = (p.sstream[i >> 1] >> ((i & 1) * 4)) & 15;
    pos += code ? code : 15;
    if (pos >= end) break;
    if (!code) continue;
    const int64_t c = pos - start;
    int m = 0;
    for (int64_t q = 0; q < p.mbits; ++q) m |= ((p.smag[q * p.mbytes + (s >> 3)] >> (s & 7)) & 1) << q;
    ++s;
    const int part = (bits[c >> 6] >> (c & 63) & 1) ? 0 : 2;
    visit(c, rc[part] * (float)m + rc[part + 1]);
  }
}

float salient_sum_stream(const Plan& p, const float* x, int64_t r) {
  float total = 0.f;
  for_each_stream_entry(p, r, [&](int64_t c, float delta) { total += delta * x[c]; });
  return total;
}

void salient_write_stream(const Plan& p, int64_t r, float* row) {
  for_each_stream_entry(p, r, [&](int64_t c, float delta) { row[c] += delta; });
}

// Row-independent part of one row: constant products and salient corrections.
inline float row_tail(const Plan& p, const float* x, const float* sums, int64_t r) {
  float total = 0.f;
  for (int64_t k = p.NB; k < p.NP; ++k) {
    const float* c = coef_row(p, k, r);
    const float* s = sums + p.var[k] * p.G;
    for (int64_t g = 0; g < p.G; ++g) total += c[16 * g] * s[g];
  }
  if (p.rowptr) total += p.salient_sum(p, x, r);
  return total;
}

// ---------------------------------------------------------------- scalar (any group size)
float row_scalar(const Plan& p, const float* x, const float* xv, const float* sums, int64_t r,
                 std::vector<float>& partial) {
  float total = 0.f;
  for (int64_t k = 0; k < p.NB; ++k) {
    std::fill(partial.begin(), partial.end(), 0.f);
    const float* xk = xv + p.var[k] * p.Kpad;
    for (int64_t w = 0; w < p.W64; ++w) {
      uint64_t m = product_word_generic(p, (int)k, r, w);
      while (m) {
        int64_t c = w * 64 + __builtin_ctzll(m);
        partial[c / p.gs] += xk[c];
        m &= m - 1;
      }
    }
    const float* c = coef_row(p, k, r);
    for (int64_t g = 0; g < p.G; ++g) total += c[16 * g] * partial[g];
  }
  return total + row_tail(p, x, sums, r);
}

#ifdef LLMBIN_X86
// ---------------------------------------------------------------- AVX2
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The codes form's salient sums, eight entries at a time: x gathered by column (a row of x is a
// few KB, so the gathers hit L1), magnitudes widened from bytes. PB-LLM at 10 % has as many salient
// entries per row as a quarter of its columns, and the scalar loop cost more than all the bits.
template <typename C>
__attribute__((target("avx2,fma"))) float salient_sum_codes_avx2(const Plan& p, const float* x, int64_t r) {
  const C* col = static_cast<const C*>(p.scol);
  const float* rc = p.srow + 4 * r;
  float total = 0.f;
  for (int part = 0; part < 2; ++part) {
    __m256 a = _mm256_setzero_ps(), t = _mm256_setzero_ps();
    int64_t e = p.rowptr[2 * r + part];
    const int64_t end = p.rowptr[2 * r + part + 1];
    for (; e + 8 <= end; e += 8) {
      __m256i idx;
      if constexpr (sizeof(C) == 2)
        idx = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(col + e)));
      else
        idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + e));
      const __m256 xe = _mm256_i32gather_ps(x, idx, 4);
      const __m128i m8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.scode + e));
      a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(m8)), xe, a);
      t = _mm256_add_ps(t, xe);
    }
    float as = hsum256(a), ts = hsum256(t);
    for (; e < end; ++e) {
      const float xe = x[col[e]];
      as += (float)p.scode[e] * xe;
      ts += xe;
    }
    total += rc[2 * part] * as + rc[2 * part + 1] * ts;
  }
  return total;
}

// 0/1 float masks for every byte value: row j is bit i of j in lane i. One 8 KiB table turns a
// byte of bits into a multiplier with a single load, so each 8 weights cost one FMA.
struct ByteMasks {
  alignas(32) float m[256][8];
  ByteMasks() {
    for (int j = 0; j < 256; ++j)
      for (int i = 0; i < 8; ++i) m[j][i] = (j >> i) & 1 ? 1.f : 0.f;
  }
};
const ByteMasks kByteMasks;

// NB bit products, NACC independent accumulators each (FMA latency needs about 8 in flight).
template <int NB, int NACC>
__attribute__((target("avx2,fma"))) float row_avx2(const Plan& p, const float* x, const float* xv,
                                                   const float* sums, int64_t r) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 out = zero;
  const RowProducts<NB> rows(p, xv, r);
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t w0 = g * p.gwords, w1 = std::min(p.W64, w0 + p.gwords);
    __m256 acc[NB][NACC];
    for (int k = 0; k < NB; ++k)
      for (int a = 0; a < NACC; ++a) acc[k][a] = zero;
    for (int64_t w = w0; w < w1; ++w) {
#pragma GCC unroll 8
      for (int k = 0; k < NB; ++k) {
        const uint64_t m = rows.planes[k].word(w);
        const float* xs = rows.x[k] + w * 64;
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          const __m256 mask = _mm256_load_ps(kByteMasks.m[(m >> (8 * j)) & 0xFF]);
          acc[k][j % NACC] = _mm256_fmadd_ps(_mm256_loadu_ps(xs + 8 * j), mask, acc[k][j % NACC]);
        }
      }
    }
    for (int k = 0; k < NB; ++k) {
      __m256 s = acc[k][0];
      for (int a = 1; a < NACC; ++a) s = _mm256_add_ps(s, acc[k][a]);
      out = _mm256_fmadd_ps(_mm256_set1_ps(coef_row(p, k, r)[16 * g]), s, out);
    }
  }
  return hsum256(out) + row_tail(p, x, sums, r);
}

// ---------------------------------------------------------------- AVX-512
__attribute__((target("avx512f"))) inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

template <int NB, int NACC>
__attribute__((target("avx512f"))) float row_avx512(const Plan& p, const float* x, const float* xv,
                                                   const float* sums, int64_t r) {
  __m512 out = _mm512_setzero_ps();
  const RowProducts<NB> rows(p, xv, r);
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t w0 = g * p.gwords, w1 = std::min(p.W64, w0 + p.gwords);
    __m512 acc[NB][NACC];
    for (int k = 0; k < NB; ++k)
      for (int a = 0; a < NACC; ++a) acc[k][a] = _mm512_setzero_ps();
    for (int64_t w = w0; w < w1; ++w) {
#pragma GCC unroll 8
      for (int k = 0; k < NB; ++k) {
        const uint64_t m = rows.planes[k].word(w);
        const float* xs = rows.x[k] + w * 64;
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const int a = j % NACC;
          acc[k][a] = _mm512_mask_add_ps(acc[k][a], (__mmask16)(m >> (16 * j)), acc[k][a], _mm512_loadu_ps(xs + 16 * j));
        }
      }
    }
    for (int k = 0; k < NB; ++k) {
      __m512 s = acc[k][0];
      for (int a = 1; a < NACC; ++a) s = _mm512_add_ps(s, acc[k][a]);
      out = _mm512_fmadd_ps(_mm512_set1_ps(coef_row(p, k, r)[16 * g]), s, out);
    }
  }
  return hsum512(out) + row_tail(p, x, sums, r);
}

// ---------------------------------------------------------------- AVX2 table lookup
constexpr int LUT_LIMIT = 4095;  // |entry| bound: eight entries (a word's sum per lane, lookup_word) fit int16
constexpr int64_t LUT_WORD_BYTES = 512;  // tables per 64 columns: 4 steps × (lo a, hi a, lo b, hi b)

__attribute__((target("avx2,fma"))) inline float hmax256(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Tables of one activation vector for words [w0, w1). Group g of a word (columns 4g..4g+3) has
// T_g[n] = Σ_{i<4} bit_i(n)·x[4g+i] for n < 16, rounded to int16 after scaling by
// LUT_LIMIT / max|T| over the word. Step s of a word covers groups 4s..4s+3 in 128 bytes:
// [lo bytes of g=4s | of 4s+1], [hi bytes of 4s | 4s+1], then the same for 4s+2 and 4s+3, i.e.
// the two 16-byte lanes of each vpshufb table serve the two groups one tile byte holds.
// A non-finite activation makes the word's scale NaN, so the output is NaN as with floats.
__attribute__((target("avx2,fma"))) void build_tables(const float* x, int64_t w0, int64_t w1, uint8_t* tab,
                                                      float* scale) {
  const __m256 b0 = _mm256_setr_ps(0, 1, 0, 1, 0, 1, 0, 1), b1 = _mm256_setr_ps(0, 0, 1, 1, 0, 0, 1, 1),
               b2 = _mm256_setr_ps(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t w = w0; w < w1; ++w) {
    __m256 lo[16], hi[16], mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int g = 0; g < 16; ++g) {
      const float* xg = x + w * 64 + 4 * g;
      __m256 t = _mm256_mul_ps(b0, _mm256_set1_ps(xg[0]));
      t = _mm256_fmadd_ps(b1, _mm256_set1_ps(xg[1]), t);
      lo[g] = _mm256_fmadd_ps(b2, _mm256_set1_ps(xg[2]), t);  // n = 0..7
      hi[g] = _mm256_add_ps(lo[g], _mm256_set1_ps(xg[3]));     // n = 8..15
      mx = _mm256_max_ps(mx, _mm256_max_ps(_mm256_and_ps(lo[g], abs_mask), _mm256_and_ps(hi[g], abs_mask)));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(hi[g], hi[g], _CMP_UNORD_Q));
    }
    const float m = hmax256(mx);
    const bool finite = !_mm256_movemask_ps(bad) && m < INFINITY;
    scale[w] = !finite ? NAN : m > 0.f ? m / LUT_LIMIT : 0.f;
    const __m256 inv = _mm256_set1_ps(finite && m > 0.f ? LUT_LIMIT / m : 0.f);
    uint8_t* word = tab + w * LUT_WORD_BYTES;
    for (int g = 0; g < 16; ++g) {
      const __m256i qa = _mm256_cvtps_epi32(_mm256_mul_ps(lo[g], inv)), qb = _mm256_cvtps_epi32(_mm256_mul_ps(hi[g], inv));
      // packs interleaves lanes (n 0-3, 8-11 | 4-7, 12-15); the permutes restore n order and then
      // move the low bytes to the first 16 bytes and the high bytes to the last 16.
      __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi32(qa, qb), 0xD8);
      q = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(q, split), 0xD8);
      uint8_t* dst = word + (g / 4) * 128 + ((g % 4) / 2) * 64 + (g % 2) * 16;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(q));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32), _mm256_extracti128_si256(q, 1));
    }
  }
}

// One product's 16-row tile nibbles for one word (its planes ANDed), 4 steps of 32 bytes.
struct TilePlanes {
  const uint8_t* tiles[MAX_PLANES];
  int n = 0;
  void init(const Plan& p, int k, int64_t t) {
    n = p.nplanes[k];
    for (int i = 0; i < n; ++i) tiles[i] = p.tiles + (p.plist[k][i] * p.NT + t) * p.W64 * 128;
  }
  __attribute__((target("avx2"))) inline __m256i step(int64_t w, int s) const {
    const int64_t off = w * 128 + 32 * s;
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tiles[0] + off));
    for (int i = 1; i < n; ++i) v = _mm256_and_si256(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tiles[i] + off)));
    return v;
  }
};

// Sum over one word of 16 rows' table entries, as int32 for rows 0-7 and 8-15. The four steps add
// in int16 (each lane element sums 8 entries of at most LUT_LIMIT), and the two lanes (groups
// 4s, 4s+2 | 4s+1, 4s+3) are added once per word in int32: about a quarter fewer instructions per
// step than widening every step, and the instruction count, not memory, bounds this loop.
__attribute__((target("avx2"))) inline void lookup_word(const TilePlanes& tp, const uint8_t* tab, int64_t w,
                                                        __m256i& acc0, __m256i& acc1) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const uint8_t* tw = tab + w * LUT_WORD_BYTES;
  __m256i r0 = _mm256_setzero_si256(), r1 = _mm256_setzero_si256();
  for (int s = 0; s < 4; ++s) {
    const __m256i v = tp.step(w, s);
    const __m256i i0 = _mm256_and_si256(v, low4), i1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    const __m256i* t = reinterpret_cast<const __m256i*>(tw + 128 * s);
    const __m256i la = _mm256_shuffle_epi8(_mm256_loadu_si256(t), i0),
                  ha = _mm256_shuffle_epi8(_mm256_loadu_si256(t + 1), i0),
                  lb = _mm256_shuffle_epi8(_mm256_loadu_si256(t + 2), i1),
                  hb = _mm256_shuffle_epi8(_mm256_loadu_si256(t + 3), i1);
    // int16 per row: lane 0 holds groups 4s and 4s+2, lane 1 groups 4s+1 and 4s+3.
    r0 = _mm256_add_epi16(r0, _mm256_add_epi16(_mm256_unpacklo_epi8(la, ha), _mm256_unpacklo_epi8(lb, hb)));  // rows 0-7
    r1 = _mm256_add_epi16(r1, _mm256_add_epi16(_mm256_unpackhi_epi8(la, ha), _mm256_unpackhi_epi8(lb, hb)));  // rows 8-15
  }
  acc0 = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(r0)),
                          _mm256_cvtepi16_epi32(_mm256_extracti128_si256(r0, 1)));
  acc1 = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(r1)),
                          _mm256_cvtepi16_epi32(_mm256_extracti128_si256(r1, 1)));
}

// Rows 16t .. 16t+15 (those below N) of one batch row's output.
// tab/scale: per activation variant, (V, W64 * LUT_WORD_BYTES) and (V, W64).
template <int NB>
__attribute__((target("avx2,fma"))) void tile_lut(const Plan& p, const float* x, const uint8_t* tab,
                                                  const float* scale, const float* sums, int64_t t, float* out) {
  TilePlanes tp[NB];
  for (int k = 0; k < NB; ++k) tp[k].init(p, k, t);
  const int64_t r0 = 16 * t, rows = std::min<int64_t>(16, p.N - r0);
  // The tile's 16 coefficients of a (product, group) are adjacent, so each scales its group sums
  // with two vector FMAs; a constant product's group sum is shared by the rows: one broadcast each.
  __m256 y0 = _mm256_setzero_ps(), y1 = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t w0 = g * p.gwords, w1 = std::min(p.W64, w0 + p.gwords);
    for (int k = 0; k < NB; ++k) {
      const uint8_t* tk = tab + p.var[k] * p.W64 * LUT_WORD_BYTES;
      const float* sk = scale + p.var[k] * p.W64;
      __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
      for (int64_t w = w0; w < w1; ++w) {
        __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
        lookup_word(tp[k], tk, w, a0, a1);
        const __m256 sw = _mm256_set1_ps(sk[w]);
        s0 = _mm256_fmadd_ps(sw, _mm256_cvtepi32_ps(a0), s0);
        s1 = _mm256_fmadd_ps(sw, _mm256_cvtepi32_ps(a1), s1);
      }
      const float* c = coef_row(p, k, r0) + 16 * g;
      y0 = _mm256_fmadd_ps(_mm256_loadu_ps(c), s0, y0);
      y1 = _mm256_fmadd_ps(_mm256_loadu_ps(c + 8), s1, y1);
    }
  }
  for (int64_t k = NB; k < p.NP; ++k) {
    const float* c = coef_row(p, k, r0);
    const float* s = sums + p.var[k] * p.G;
    for (int64_t g = 0; g < p.G; ++g) {
      const __m256 sg = _mm256_set1_ps(s[g]);
      y0 = _mm256_fmadd_ps(_mm256_loadu_ps(c + 16 * g), sg, y0);
      y1 = _mm256_fmadd_ps(_mm256_loadu_ps(c + 16 * g + 8), sg, y1);
    }
  }
  alignas(32) float y[16];
  _mm256_store_ps(y, y0);
  _mm256_store_ps(y + 8, y1);
  for (int64_t i = 0; i < rows; ++i) out[r0 + i] = p.rowptr ? y[i] + p.salient_sum(p, x, r0 + i) : y[i];
}

using TileFn = void (*)(const Plan&, const float*, const uint8_t*, const float*, const float*, int64_t, float*);
// NACC only fits pick_by_products: a tile keeps its own two accumulators per product.
template <int NB, int NACC> struct PickLut { static constexpr TileFn fn = tile_lut<NB>; };
#endif

using RowFn = float (*)(const Plan&, const float*, const float*, const float*, int64_t);

template <template <int, int> class Pick>
auto pick_by_products(int64_t nb) -> decltype(Pick<1, 8>::fn) {
  switch (nb) {  // more accumulators when there are few products, to hide add latency
    case 1: return Pick<1, 8>::fn;
    case 2: return Pick<2, 4>::fn;
    case 3: return Pick<3, 2>::fn;
    case 4: return Pick<4, 2>::fn;
    case 5: return Pick<5, 2>::fn;
    case 6: return Pick<6, 1>::fn;
    case 7: return Pick<7, 1>::fn;
    case 8: return Pick<8, 1>::fn;
    default: return nullptr;
  }
}
#ifdef LLMBIN_X86
template <int NB, int NACC> struct PickAvx2 { static constexpr RowFn fn = row_avx2<NB, NACC>; };
template <int NB, int NACC> struct PickAvx512 { static constexpr RowFn fn = row_avx512<NB, NACC>; };
#endif

bool cpu_has(Isa isa) {
#ifdef LLMBIN_X86
  __builtin_cpu_init();
  if (isa == AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == AVX512) return __builtin_cpu_supports("avx512f");
#endif
  return isa == SCALAR;
}

// ---------------------------------------------------------------- the plan's fields
// Every entry point takes a KernelPlan (llmbin/kernels/plan.py) as two lists in its field order:
// its tensors, then its integers (KernelPlan.op_args()). The names are listed here once, in the
// same order; the module exports them (plan_fields) and cpu.extension() refuses a build whose
// lists differ from KernelPlan's, so the two languages cannot drift apart.
#define LLMBIN_PLAN_TENSORS(X) \
  X(planes) X(tiles) X(colw) X(prod_var) X(prod_mono) X(coef) X(sal_rowptr) X(sal_col) X(sal_val) X(sal_row)
#define LLMBIN_PLAN_INTS(X) X(out_features) X(in_features) X(group_size) X(n_bit_products)

#define LLMBIN_TENSOR_MEMBER(name) const at::Tensor& name;
#define LLMBIN_INT_MEMBER(name) int64_t name;
#define LLMBIN_COUNT(name) +1
#define LLMBIN_NAME(name) #name,
struct PlanArgs {
  LLMBIN_PLAN_TENSORS(LLMBIN_TENSOR_MEMBER)
  LLMBIN_PLAN_INTS(LLMBIN_INT_MEMBER)
};
constexpr size_t kPlanTensors = 0 LLMBIN_PLAN_TENSORS(LLMBIN_COUNT), kPlanInts = 0 LLMBIN_PLAN_INTS(LLMBIN_COUNT);

// A plan list as the entry points receive it: a Python tuple or list (KernelPlan.op_args() gives
// tuples, the operator lists), read in place. Its items are borrowed: the caller's list keeps them
// alive for the call, so the tensors are neither copied nor reference-counted. This runs per layer
// per token, and copying them into a std::vector measured slower than the named arguments it replaced.
struct PlanList {
  PyObject* seq;
  PlanList(const py::object& list, const char* what) : seq(list.ptr()) {
    TORCH_CHECK(PyTuple_Check(seq) || PyList_Check(seq), what, " must be a tuple or list (KernelPlan.op_args())");
  }
  size_t size() const { return PySequence_Fast_GET_SIZE(seq); }
  PyObject* operator[](size_t i) const { return PySequence_Fast_GET_ITEM(seq, i); }
};
using PlanTensors = py::object;
using PlanInts = py::object;

const at::Tensor& plan_tensor(const PlanList& tensors, size_t i) {
  TORCH_CHECK(THPVariable_Check(tensors[i]), "plan tensor ", i, " is not a tensor");
  return THPVariable_Unpack(tensors[i]);
}

// The two lists as named fields.
PlanArgs plan_args(const PlanTensors& tensor_list, const PlanInts& int_list) {
  const PlanList tensors(tensor_list, "the plan's tensors"), ints(int_list, "the plan's integers");
  TORCH_CHECK(tensors.size() == kPlanTensors && ints.size() == kPlanInts, "a plan is ", kPlanTensors, " tensors and ",
              kPlanInts, " integers (KernelPlan.op_args()), not ", tensors.size(), " and ", ints.size());
  size_t t = 0, i = 0;  // a braced list is evaluated left to right
#define LLMBIN_NEXT_TENSOR(name) plan_tensor(tensors, t++),
#define LLMBIN_NEXT_INT(name) py::handle(ints[i++]).cast<int64_t>(),
  return PlanArgs{LLMBIN_PLAN_TENSORS(LLMBIN_NEXT_TENSOR) LLMBIN_PLAN_INTS(LLMBIN_NEXT_INT)};
}

// The field names this build expects, (tensors, integers), for the check against KernelPlan.
std::pair<std::vector<std::string>, std::vector<std::string>> plan_fields() {
  return {{LLMBIN_PLAN_TENSORS(LLMBIN_NAME)}, {LLMBIN_PLAN_INTS(LLMBIN_NAME)}};
}

// The two lists as the dispatcher passes them (torch.ops.llmbin_cpu.linear).
PlanArgs plan_args(at::TensorList tensors, at::IntArrayRef ints) {
  TORCH_CHECK(tensors.size() == kPlanTensors && ints.size() == kPlanInts, "a plan is ", kPlanTensors, " tensors and ",
              kPlanInts, " integers (KernelPlan.op_args()), not ", tensors.size(), " and ", ints.size());
  size_t t = 0, i = 0;
#define LLMBIN_LIST_TENSOR(name) tensors[t++],
#define LLMBIN_LIST_INT(name) ints[i++],
  return PlanArgs{LLMBIN_PLAN_TENSORS(LLMBIN_LIST_TENSOR) LLMBIN_PLAN_INTS(LLMBIN_LIST_INT)};
}

Plan make_plan(const PlanArgs& a);

Plan make_plan(const PlanTensors& tensors, const PlanInts& ints) { return make_plan(plan_args(tensors, ints)); }

Plan make_plan(const PlanArgs& a) {
  TORCH_CHECK(a.planes.dtype() == at::kByte && a.planes.dim() == 3 && a.planes.is_contiguous(),
              "planes: contiguous uint8 (P, N, B)");
  TORCH_CHECK(a.planes.size(2) % 8 == 0, "planes rows must be whole 64-bit words");
  TORCH_CHECK(a.out_features == a.planes.size(1) && a.in_features >= 0 && a.in_features <= a.planes.size(2) * 8,
              "out_features and in_features do not match the planes");
  TORCH_CHECK(a.colw.dtype() == at::kFloat && a.colw.is_contiguous() && a.colw.size(1) == a.planes.size(2) * 8,
              "colw: float32 (V, Kpad)");
  TORCH_CHECK(a.coef.dtype() == at::kFloat && a.coef.is_contiguous() && a.coef.dim() == 4 &&
              a.coef.size(1) == (a.planes.size(1) + 15) / 16 && a.coef.size(3) == 16,
              "coef: contiguous float32 (NP, ceil(N / 16), G, 16)");
  TORCH_CHECK(a.prod_var.dtype() == at::kInt && a.prod_mono.dtype() == at::kInt && a.prod_var.numel() == a.coef.size(0),
              "products");
  TORCH_CHECK(a.planes.size(0) <= MAX_PLANES, "at most 16 planes");
  Plan p;
  p.P = a.planes.size(0); p.N = a.planes.size(1); p.W64 = a.planes.size(2) / 8; p.Kpad = p.W64 * 64;
  p.K = a.in_features;
  p.V = a.colw.size(0); p.NP = a.coef.size(0); p.NB = a.n_bit_products; p.G = a.coef.size(2); p.gs = a.group_size;
  TORCH_CHECK(p.G == (p.K + p.gs - 1) / p.gs, "coef groups do not match the group size");
  p.word_groups = p.G == 1 || p.gs % 64 == 0;
  p.gwords = p.G == 1 ? p.W64 : p.gs / 64;
  p.planes = reinterpret_cast<const uint64_t*>(a.planes.data_ptr<uint8_t>());
  p.NT = (p.N + 15) / 16;
  p.tiles = nullptr;
  if (a.tiles.numel()) {
    TORCH_CHECK(a.tiles.dtype() == at::kByte && a.tiles.is_contiguous() && a.tiles.dim() == 4 &&
                a.tiles.size(0) == p.P && a.tiles.size(1) == p.NT && a.tiles.size(2) == p.W64 && a.tiles.size(3) == 128,
                "tiles: contiguous uint8 (P, ceil(N / 16), words, 128)");
    p.tiles = a.tiles.data_ptr<uint8_t>();
  }
  p.colw = a.colw.data_ptr<float>();
  p.coef = a.coef.data_ptr<float>();
  p.var.assign(a.prod_var.data_ptr<int32_t>(), a.prod_var.data_ptr<int32_t>() + p.NP);
  p.mono.assign(a.prod_mono.data_ptr<int32_t>(), a.prod_mono.data_ptr<int32_t>() + p.NP);
  for (int64_t k = 0; k < std::min<int64_t>(p.NB, MAX_FAST_PRODUCTS); ++k) {
    p.nplanes[k] = 0;
    for (int q = 0; q < p.P; ++q)
      if (p.mono[k] >> q & 1) p.plist[k][p.nplanes[k]++] = q;
  }
  p.rowptr = nullptr;
  p.sval = nullptr;
  p.scode = nullptr;
  p.srow = nullptr;
  p.sstream = nullptr;
  p.smag = nullptr;
  if (a.sal_rowptr.dim() == 2) {  // stream form: sal_col is the nibble stream, sal_val the magnitude planes
    TORCH_CHECK(a.sal_rowptr.dtype() == at::kLong && a.sal_rowptr.is_contiguous() && a.sal_rowptr.size(0) == p.N &&
                a.sal_rowptr.size(1) == 3,
                "sal_rowptr: int64 (N, 3) row index in the stream form");
    TORCH_CHECK(a.sal_col.dtype() == at::kByte && a.sal_col.dim() == 1 && a.sal_col.is_contiguous(),
                "sal_col: uint8 nibble stream");
    TORCH_CHECK(a.sal_val.dtype() == at::kByte && a.sal_val.dim() == 2 && a.sal_val.is_contiguous() &&
                a.sal_val.size(0) <= 8,
                "sal_val: uint8 magnitude planes (bits, bytes)");
    TORCH_CHECK(a.sal_row.dtype() == at::kFloat && a.sal_row.is_contiguous() && a.sal_row.dim() == 2 &&
                a.sal_row.size(0) == p.N && a.sal_row.size(1) == 4, "sal_row: contiguous float32 (N, 4)");
    TORCH_CHECK(p.P >= 1 && p.K <= p.Kpad, "the stream form needs plane 0");
    p.rowptr = a.sal_rowptr.data_ptr<int64_t>();
    p.sstream = a.sal_col.data_ptr<uint8_t>();
    p.ncodes = 2 * a.sal_col.numel();
    p.smag = a.sal_val.data_ptr<uint8_t>();
    p.mbits = a.sal_val.size(0);
    p.mbytes = a.sal_val.size(1);
    p.srow = a.sal_row.data_ptr<float>();
    // The index is trusted like the list columns below, but must stay inside the streams.
    for (int64_t r = 0; r < p.N; ++r)
      TORCH_CHECK(p.rowptr[3 * r] >= 0 && p.rowptr[3 * r] <= p.ncodes && p.rowptr[3 * r + 2] >= 0 &&
                  p.rowptr[3 * r + 2] <= p.mbytes * 8, "sal_rowptr points outside the salient streams");
    p.salient_sum = salient_sum_stream;
    p.salient_write = salient_write_stream;
  } else if (a.sal_rowptr.numel()) {
    const bool codes = a.sal_row.numel() > 0, c16 = a.sal_col.dtype() == at::kShort;
    const int64_t lists = codes ? 2 * p.N : p.N;
    TORCH_CHECK(a.sal_rowptr.dtype() == at::kLong && a.sal_rowptr.is_contiguous() &&
                a.sal_rowptr.numel() == lists + 1,
                codes ? "sal_rowptr: int64 (2N + 1) with codes" : "sal_rowptr: int64 (N + 1)");
    TORCH_CHECK((c16 || a.sal_col.dtype() == at::kInt) && a.sal_col.is_contiguous(),
                "sal_col: contiguous int16 or int32");
    TORCH_CHECK(a.sal_val.is_contiguous() && a.sal_val.dtype() == (codes ? at::kByte : at::kFloat),
                codes ? "sal_val: uint8 magnitudes with sal_row" : "sal_val: float32 deltas");
    TORCH_CHECK(!codes || (a.sal_row.dtype() == at::kFloat && a.sal_row.is_contiguous() && a.sal_row.dim() == 2 &&
                           a.sal_row.size(0) == p.N && a.sal_row.size(1) == 4),
                "sal_row: contiguous float32 (N, 4)");
    // Columns are trusted (build_plan takes them from validated positions): a per-call scan
    // would cost as much as the product itself.
    p.rowptr = a.sal_rowptr.data_ptr<int64_t>();
    TORCH_CHECK(p.rowptr[0] == 0 && a.sal_col.numel() == p.rowptr[lists] && a.sal_val.numel() == p.rowptr[lists],
                "salient lists do not match sal_rowptr");
    p.scol = a.sal_col.data_ptr();
    if (codes) {
      p.scode = a.sal_val.data_ptr<uint8_t>();
      p.srow = a.sal_row.data_ptr<float>();
      p.salient_sum = c16 ? salient_sum_codes<int16_t> : salient_sum_codes<int32_t>;
#ifdef LLMBIN_X86
      static const bool avx2 = cpu_has(AVX2);
      if (avx2) p.salient_sum = c16 ? salient_sum_codes_avx2<int16_t> : salient_sum_codes_avx2<int32_t>;
#endif
      p.salient_write = c16 ? salient_write_codes<int16_t> : salient_write_codes<int32_t>;
    } else {
      p.sval = a.sal_val.data_ptr<float>();
      p.salient_sum = c16 ? salient_sum<int16_t> : salient_sum<int32_t>;
      p.salient_write = c16 ? salient_write<int16_t> : salient_write<int32_t>;
    }
  }
  return p;
}

// The path for a call: a tile function (table lookup) or a row function; neither means scalar.
struct Path {
  TileFn tile = nullptr;
  RowFn row = nullptr;
};

Path choose(const Plan& p, int64_t isa) {
  // AVX-512 is opt-in (isa=3) until it has run on hardware with AVX-512: the development and CI
  // machines have none, so `auto` stays on the AVX2 paths that the tests exercise.
  if (isa == AUTO) isa = cpu_has(AVX2) ? (p.tiles ? AVX2_LUT : AVX2) : SCALAR;
  if (isa == EXACT) isa = cpu_has(AVX2) ? AVX2 : SCALAR;
  TORCH_CHECK(cpu_has(isa == AVX2_LUT ? AVX2 : (Isa)isa), "this CPU does not support the requested instruction set");
  TORCH_CHECK(isa != AVX2_LUT || p.tiles, "the table-lookup path needs the plan's tiles");
  Path path;
  if (!p.word_groups || isa == SCALAR) return path;
#ifdef LLMBIN_X86
  if (isa == AVX2_LUT) path.tile = pick_by_products<PickLut>(p.NB);
  if (isa == AVX512) path.row = pick_by_products<PickAvx512>(p.NB);
  if (isa == AVX2 || (isa == AVX2_LUT && !path.tile)) path.row = pick_by_products<PickAvx2>(p.NB);
#endif
  return path;
}

// ---------------------------------------------------------------- entry points
// out (B, N) = x (B, K) @ Ŵᵀ, both contiguous float32. Called per layer per token, so the setup
// stays in plain loops (a tensor op costs about a microsecond) and small work stays on one thread.
void run(const Plan& p, const float* xp, int64_t B, int64_t isa, float* op) {
  const int64_t K = p.K, group_size = p.gs;
  // Activations times each column weight, zero-padded to whole words, and their group sums.
  std::vector<float> xv(B * p.V * p.Kpad, 0.f), sums(B * p.V * p.G, 0.f);
  at::parallel_for(0, B * p.V, std::max<int64_t>(1, (1 << 15) / p.Kpad), [&](int64_t begin, int64_t end) {
    for (int64_t bv = begin; bv < end; ++bv) {
      const float* xb = xp + bv / p.V * K;
      const float* cw = p.colw + bv % p.V * p.Kpad;
      float* dst = xv.data() + bv * p.Kpad;
      for (int64_t g = 0; g < p.G; ++g) {  // by group: a division per element costs more than the product
        float s = 0.f;
        for (int64_t c = g * group_size, e = std::min(K, c + group_size); c < e; ++c) s += dst[c] = xb[c] * cw[c];
        sums[bv * p.G + g] = s;
      }
    }
  });
  const Path path = choose(p, isa);
  const float* xvp = xv.data();
  const float* sp = sums.data();
#ifdef LLMBIN_X86
  if (path.tile) {
    // Tables for every (batch row, activation variant), then 16-row tiles in parallel.
    std::vector<uint8_t> tab(B * p.V * p.W64 * LUT_WORD_BYTES);
    std::vector<float> scale(B * p.V * p.W64);
    const int64_t chunks = (p.W64 + 7) / 8;
    // A chunk's tables take well under a microsecond: threads only pay off for many of them.
    at::parallel_for(0, B * p.V * chunks, 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bv = i / chunks, w0 = i % chunks * 8;
        build_tables(xvp + bv * p.Kpad, w0, std::min(p.W64, w0 + 8), tab.data() + bv * p.W64 * LUT_WORD_BYTES,
                     scale.data() + bv * p.W64);
      }
    });
    at::parallel_for(0, p.NT, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t b = 0; b < B; ++b)
          path.tile(p, xp + b * K, tab.data() + b * p.V * p.W64 * LUT_WORD_BYTES, scale.data() + b * p.V * p.W64,
                    sp + b * p.V * p.G, t, op + b * p.N);
    });
    return;
  }
#endif
  const RowFn fn = path.row;
  at::parallel_for(0, p.N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> partial(fn ? 0 : p.G);
    for (int64_t r = begin; r < end; ++r)
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = xp + b * K;
        const float* xvb = xvp + b * p.V * p.Kpad;
        const float* sb = sp + b * p.V * p.G;
        op[b * p.N + r] = fn ? fn(p, xb, xvb, sb, r) : row_scalar(p, xb, xvb, sb, r, partial);
      }
  });
}

void packed_linear(const at::Tensor& x, const PlanTensors& plan_tensors, const PlanInts& plan_ints, int64_t isa,
                   at::Tensor& out) {
  const Plan p = make_plan(plan_tensors, plan_ints);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == p.K && x.dtype() == at::kFloat && x.is_contiguous(),
              "x must be contiguous float32 (B, K)");
  TORCH_CHECK(out.dtype() == at::kFloat && out.is_contiguous() && out.size(0) == x.size(0) && out.size(1) == p.N,
              "out must be contiguous float32 (B, N)");
  run(p, x.data_ptr<float>(), x.size(0), isa, out.data_ptr<float>());
}

// One dense fp32 row of Ŵ (Kpad wide; zero past K). Scalar: any group size.
void decode_row_scalar(const Plan& p, int64_t r, float* row) {
  std::fill(row, row + p.Kpad, 0.f);
  for (int64_t k = 0; k < p.NP; ++k) {
    const float* cw = p.colw + p.var[k] * p.Kpad;
    const float* c = coef_row(p, k, r);
    for (int64_t w = 0; w < p.W64; ++w) {
      const uint64_t m = k >= p.NB ? ~uint64_t(0) : product_word_generic(p, (int)k, r, w);
      const int64_t cend = std::min<int64_t>(64, p.K - w * 64);
      for (int64_t i = 0; i < cend; ++i)
        if (m >> i & 1) row[w * 64 + i] += c[16 * ((w * 64 + i) / p.gs)] * cw[w * 64 + i];
    }
  }
}

#ifdef LLMBIN_X86
// AVX2, groups of whole words: each product adds coef · colw where its bits are set.
__attribute__((target("avx2,fma"))) void decode_row_avx2(const Plan& p, int64_t r, float* row) {
  const __m256i shifts[4] = {
      _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24), _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
      _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8), _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)};
  const __m256 zero = _mm256_setzero_ps();
  std::fill(row, row + p.Kpad, 0.f);
  for (int64_t k = 0; k < p.NP; ++k) {
    const float* cw = p.colw + p.var[k] * p.Kpad;
    const float* c = coef_row(p, k, r);
    const bool constant = k >= p.NB;
    for (int64_t w = 0; w < p.W64; ++w) {
      const __m256 cb = _mm256_set1_ps(c[16 * (w / p.gwords)]);
      const uint64_t m = constant ? ~uint64_t(0) : product_word_generic(p, (int)k, r, w);
      for (int half = 0; half < 2; ++half) {
        const __m256i b = _mm256_set1_epi32((int32_t)(uint32_t)(m >> (32 * half)));
        for (int j = 0; j < 4; ++j) {
          float* dst = row + w * 64 + 32 * half + 8 * j;
          const __m256 sel = _mm256_castsi256_ps(_mm256_sllv_epi32(b, shifts[j]));
          const __m256 v = _mm256_blendv_ps(zero, _mm256_loadu_ps(cw + w * 64 + 32 * half + 8 * j), sel);
          _mm256_storeu_ps(dst, _mm256_fmadd_ps(cb, v, _mm256_loadu_ps(dst)));
        }
      }
    }
  }
}
#endif

// Dense fp32 rows [r0, r1) of Ŵ into out (r1 - r0, Kpad), for the large-batch path.
void decode_rows(const PlanTensors& plan_tensors, const PlanInts& plan_ints, int64_t r0, int64_t r1, at::Tensor& out,
                 int64_t isa) {
  const Plan p = make_plan(plan_tensors, plan_ints);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= p.N, "row range out of bounds");
  TORCH_CHECK(out.dtype() == at::kFloat && out.is_contiguous() && out.size(0) == r1 - r0 && out.size(1) == p.Kpad,
              "out must be contiguous float32 (rows, Kpad)");
  if (isa == AUTO || isa == AVX2_LUT || isa == EXACT) isa = cpu_has(AVX2) ? AVX2 : SCALAR;  // one AVX2 decoder serves them all
  TORCH_CHECK(cpu_has((Isa)isa), "this CPU does not support the requested instruction set");
  void (*fn)(const Plan&, int64_t, float*) = decode_row_scalar;
#ifdef LLMBIN_X86
  if (isa != SCALAR && p.word_groups) fn = decode_row_avx2;
#endif
  float* op = out.data_ptr<float>();
  at::parallel_for(r0, r1, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = op + (r - r0) * p.Kpad;
      fn(p, r, row);
      if (p.rowptr) p.salient_write(p, r, row);
    }
  });
}

// The whole small-batch layer call in one crossing from Python: any leading shape and float
// dtype in, the same out (per-call Python work would otherwise cost more than a small layer).
at::Tensor linear_with(const at::Tensor& x, const Plan& p, int64_t isa) {
  const int64_t K = p.K;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "x must end in K features");
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = p.N;
  if (x.dtype() == at::kFloat && x.is_contiguous()) {  // the usual case: no tensor ops but the output
    at::Tensor out = at::empty(sizes, x.options());
    run(p, x.data_ptr<float>(), x.numel() / K, isa, out.data_ptr<float>());
    return out;
  }
  const at::Tensor x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  at::Tensor out = at::empty({x2.size(0), p.N}, x2.options());
  run(p, x2.data_ptr<float>(), x2.size(0), isa, out.data_ptr<float>());
  return out.view(sizes).to(x.scalar_type());
}

at::Tensor linear(const at::Tensor& x, const PlanTensors& plan_tensors, const PlanInts& plan_ints, int64_t isa) {
  return linear_with(x, make_plan(plan_tensors, plan_ints), isa);
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out{"scalar"};
  if (cpu_has(AVX2)) out.push_back("avx2");
  if (cpu_has(AVX2)) out.push_back("avx2-lut");
  if (cpu_has(AVX512)) out.push_back("avx512");
  return out;
}

}  // namespace

void half_linear(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, bool simd);  // half_matvec_cpu.cpp
void table_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t bits, int64_t group,
                  at::Tensor& out, bool simd);  // table_matvec_cpu.cpp
void kron_transform(const at::Tensor& x, const at::Tensor& signs, int64_t hadamard, const at::Tensor& odd,
                    bool transpose, at::Tensor& out, bool simd);  // rotate_cpu.cpp

// The small-batch kernels as dispatcher operators, torch.ops.llmbin_cpu.* (their schemas and fake
// implementations are defined in Python, beside the torch.ops.llmbin operators they shortcut). A
// compiled decode step calls these from its graph with no Python in between: the torch.ops.llmbin
// operators are implemented in Python, to choose a path per call, and each of a step's hundreds of
// calls paid about 10 us for the round trip.
namespace {

at::Tensor linear_op(const at::Tensor& x, at::TensorList plan_tensors, at::IntArrayRef plan_ints, int64_t isa) {
  return linear_with(x, make_plan(plan_args(plan_tensors, plan_ints)), isa);
}

at::Tensor rotate_op(const at::Tensor& x, const at::Tensor& signs, int64_t hadamard, const at::Tensor& odd,
                     bool transpose) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  kron_transform(x.contiguous(), signs, hadamard, odd, transpose, out, true);
  return out;
}

at::Tensor table_linear_op(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t bits,
                           int64_t group) {
  at::Tensor out = at::empty({x.size(0), scale.size(0)}, x.options());
  table_linear(x.contiguous(), codes, scale, bits, group, out, true);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmbin_cpu, CPU, m) {
  m.impl("linear", &linear_op);
  m.impl("rotate", &rotate_op);
  m.impl("table_linear", &table_linear_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x @ W^T for any leading shape and float dtype (small batches)");
  m.def("packed_linear", &packed_linear, "out (B, N) = x @ W^T for a packed-bit plan (fp32)");
  m.def("decode_rows", &decode_rows, "out (rows, Kpad) = dense fp32 rows [r0, r1) of a packed-bit plan");
  m.def("available_isas", &available_isas, "instruction sets this CPU can run");
  m.def("plan_fields", &plan_fields, "the KernelPlan fields the entry points take: (tensor names, integer names)");
  m.def("half_linear", &half_linear, "out (B, N) = x (B, K) fp32 @ w (N, K) bf16/fp16, widened exactly",
        py::arg("x"), py::arg("w"), py::arg("out"), py::arg("simd") = true);
  m.def("table_linear", &table_linear, "out (B, N) = x (B, K) fp32 @ an 8- or 4-bit table with fp16 group scales",
        py::arg("x"), py::arg("codes"), py::arg("scale"), py::arg("bits"), py::arg("group"), py::arg("out"),
        py::arg("simd") = true);
  m.def("kron_transform", &kron_transform, "out (B, n) = T x (or T^T x) for T = (H_h / sqrt(h) (x) C_m) diag(signs)",
        py::arg("x"), py::arg("signs"), py::arg("hadamard"), py::arg("odd"), py::arg("transpose"), py::arg("out"),
        py::arg("simd") = true);
}
