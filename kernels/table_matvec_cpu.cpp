// y = x @ Ŵᵀ for a quantized table (the output matrix, or a tied embedding), for small batches.
//
// Ŵ[r, c] = scale[r, c / G] · q[r, c] with q a symmetric 8-bit integer (int8, −127…127) or a
// 4-bit one (two per byte, low nibble first, stored as q + 8 in 0…15), and one fp16 scale per
// row and group of G columns (``llmbin/packing/table.py``). Decode reads the table once per
// token: this kernel widens the codes in registers, sums each group's x·q in fp32 and scales the
// sum, so a row costs 1 (or ½) byte per weight read, against 2 for the fp16 table.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMBIN_X86 1
#endif

namespace {

template <int BITS>
inline float code_at(const uint8_t* row, int64_t c) {
  if (BITS == 8) return static_cast<float>(static_cast<int8_t>(row[c]));
  const uint8_t byte = row[c >> 1];
  return static_cast<float>(int((c & 1) ? (byte >> 4) : (byte & 15)) - 8);
}

// Σ x[c]·q[c] over columns [c0, c1) of one row.
template <int BITS>
float group_dot_scalar(const float* x, const uint8_t* row, int64_t c0, int64_t c1) {
  float s = 0.f;
  for (int64_t c = c0; c < c1; ++c) s += x[c] * code_at<BITS>(row, c);
  return s;
}

#ifdef LLMBIN_X86
__attribute__((target("avx2,fma"))) inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 codes from column c (c even for 4 bits), as two vectors of 8 floats.
template <int BITS>
__attribute__((target("avx2,fma"))) inline void widen16(const uint8_t* row, int64_t c, __m256& lo, __m256& hi) {
  __m128i q;
  if (BITS == 8) {
    q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c));
  } else {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (c >> 1)));
    const __m128i m = _mm_set1_epi8(15);
    const __m128i l = _mm_and_si128(b, m), h = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    q = _mm_sub_epi8(_mm_unpacklo_epi8(l, h), _mm_set1_epi8(8));  // columns c, c+1, ... in order
  }
  lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
  hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
}

// 8 int8 codes from column c as 8 floats. The load folds into the widening instruction, so each
// 8 codes cost a widen, a convert and an FMA (a 16-byte load and a byte shift per 16 cost more).
__attribute__((target("avx2,fma"))) inline __m256 widen8_i8(const uint8_t* row, int64_t c) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c))));
}

// One row: each group's x·q summed in vectors, scaled by the group's scale into a row vector;
// one horizontal sum per row (not per group). The scale is widened with F16C (c10::Half's own
// conversion is a software one, outside this function's target). 8-bit groups run 32 columns a
// step in four accumulators, so that no FMA waits on the one before it.
template <int BITS>
__attribute__((target("avx2,fma,f16c"))) float row_dot_avx2(const float* x, const uint8_t* row, const at::Half* scale,
                                                             int64_t K, int64_t group) {
  __m256 acc = _mm256_setzero_ps();
  float tail = 0.f;
  for (int64_t c0 = 0; c0 < K; c0 += group) {
    const int64_t c1 = std::min(K, c0 + group);
    const float s = _cvtsh_ss(scale[c0 / group].x);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t c = c0;
    if (BITS == 8) {
      for (; c + 32 <= c1; c += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), widen8_i8(row, c), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 8), widen8_i8(row, c + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 16), widen8_i8(row, c + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 24), widen8_i8(row, c + 24), a3);
      }
      for (; c + 8 <= c1; c += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), widen8_i8(row, c), a0);
    } else {
      for (; c + 16 <= c1; c += 16) {
        __m256 lo, hi;
        widen16<BITS>(row, c, lo, hi);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), lo, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 8), hi, a1);
      }
    }
    acc = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)), _mm256_set1_ps(s), acc);
    if (c < c1) tail += s * group_dot_scalar<BITS>(x, row, c, c1);
  }
  return hsum(acc) + tail;
}
#endif

template <int BITS>
float row_dot_scalar(const float* x, const uint8_t* row, const at::Half* scale, int64_t K, int64_t group) {
  float s = 0.f;
  for (int64_t c0 = 0; c0 < K; c0 += group)
    s += static_cast<float>(scale[c0 / group]) * group_dot_scalar<BITS>(x, row, c0, std::min(K, c0 + group));
  return s;
}

using RowDot = float (*)(const float*, const uint8_t*, const at::Half*, int64_t, int64_t);

RowDot pick(int bits, bool simd) {
#ifdef LLMBIN_X86
  __builtin_cpu_init();
  if (simd && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return bits == 8 ? row_dot_avx2<8> : row_dot_avx2<4>;
#endif
  return bits == 8 ? row_dot_scalar<8> : row_dot_scalar<4>;
}

}  // namespace

// out (B, N) = x (B, K) @ Ŵᵀ; codes (N, K) int8 for 8 bits or (N, K/2) uint8 for 4 bits, scale
// (N, ceil(K / group)) float16; x and out float32; all contiguous. simd = false forces the
// portable loop (tests compare the two).
void table_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, int64_t bits, int64_t group,
                  at::Tensor& out, bool simd) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(x.dim() == 2 && x.dtype() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (B, K)");
  const int64_t B = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(group > 0 && (bits == 8 || group % 2 == 0), "group must be positive (and even for 4 bits)");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() &&
              codes.dtype() == (bits == 8 ? at::kChar : at::kByte) && codes.size(1) == (bits == 8 ? K : (K + 1) / 2),
              "codes must be contiguous int8 (N, K) for 8 bits or uint8 (N, K/2) for 4 bits");
  const int64_t G = (K + group - 1) / group;
  TORCH_CHECK(scale.dim() == 2 && scale.dtype() == at::kHalf && scale.is_contiguous() && scale.size(0) == N &&
              scale.size(1) == G, "scale must be contiguous float16 (N, ceil(K / group))");
  TORCH_CHECK(out.dtype() == at::kFloat && out.is_contiguous() && out.size(0) == B && out.size(1) == N,
              "out must be contiguous float32 (B, N)");
  const RowDot dot = pick(int(bits), simd);
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  const at::Half* sp = scale.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  const int64_t row_bytes = codes.size(1);
  // By rows, every batch row per table row: a table row is read from memory once.
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = qp + r * row_bytes;
      for (int64_t b = 0; b < B; ++b) op[b * N + r] = dot(xp + b * K, row, sp + r * G, K, group);
    }
  });
}
