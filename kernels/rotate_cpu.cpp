// A rotated layer's transform of a few activation rows (llmbin/packing/rotation.py):
// y = T·x = (H_h/√h ⊗ C_m)·(d ⊙ x), or the inverse x = d ⊙ (H_h/√h ⊗ C_mᵀ)·y, for a row of
// n = h·m features: H_h the Sylvester Hadamard matrix of the power of two h (rotation.py's
// Hadamard factors multiply to it: H_a ⊗ H_b = H_ab in Sylvester order), C_m the dense DCT
// factor of the odd part m (none when m = 1), d the ±1 signs.
//
// At batch 1 the math is tiny, but through torch it is one small matrix product per factor plus
// the copies that move each axis back, 6 or 7 ops a layer at several microseconds each: more than
// the layer's packed bits cost. Here it is one call. The row is held transposed, m rows of h, so
// that the fast Walsh–Hadamard transform (h·log₂h additions, not h² multiply-adds) runs along
// contiguous memory, and so does the DCT's sum over m (vectorized over h).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

// In place, unnormalized: v ← H_h·v for a contiguous v of length h (a power of two).
__attribute__((always_inline)) inline void fwht(float* v, int64_t h) {
  for (int64_t s = 1; s < h; s *= 2)
    for (int64_t i = 0; i < h; i += 2 * s)
      for (int64_t j = i; j < i + s; ++j) {
        const float a = v[j], b = v[j + s];
        v[j] = a + b;
        v[j + s] = a - b;
      }
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// fwht with AVX2, the same additions in the same order (so the same results, bit for bit): the
// first three stages (pairs 1, 2 and 4 apart) inside each 8-float vector, with a lane permute
// and an FMA by ±1 (t ± v, exact); the later stages whole vectors apart. h >= 8.
__attribute__((target("avx2,fma"))) inline void fwht_avx2(float* v, int64_t h) {
  const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1), s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1),
               s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  for (int64_t i = 0; i < h; i += 8) {
    __m256 x = _mm256_loadu_ps(v + i);
    x = _mm256_fmadd_ps(x, s1, _mm256_permute_ps(x, 0xB1));  // lane j: x[j^1] ± x[j]
    x = _mm256_fmadd_ps(x, s2, _mm256_permute_ps(x, 0x4E));  // x[j^2] ± x[j]
    x = _mm256_fmadd_ps(x, s4, _mm256_permute2f128_ps(x, x, 1));  // x[j^4] ± x[j]
    _mm256_storeu_ps(v + i, x);
  }
  for (int64_t s = 8; s < h; s *= 2)
    for (int64_t i = 0; i < h; i += 2 * s)
      for (int64_t j = i; j < i + s; j += 8) {
        const __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + s);
        _mm256_storeu_ps(v + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(v + j + s, _mm256_sub_ps(a, b));
      }
}
#endif

// One row: t (m, h) scratch, u (m, h) scratch. C is (m, m) or null when m == 1.
template <bool Transpose, bool Avx2 = false>
__attribute__((always_inline)) inline void row_transform(const float* __restrict x, const float* __restrict d,
                                                         const float* __restrict C, int64_t h, int64_t m,
                                                         float* __restrict t, float* __restrict u,
                                                         float* __restrict y) {
  const float norm = 1.f / std::sqrt(static_cast<float>(h));
  for (int64_t p = 0; p < h; ++p)  // t[q, p] = z[p·m + q], z = d ⊙ x (the inverse signs at the end)
    for (int64_t q = 0; q < m; ++q) t[q * h + p] = Transpose ? x[p * m + q] : x[p * m + q] * d[p * m + q];
#if defined(__x86_64__) || defined(_M_X64)
  if constexpr (Avx2) {
    for (int64_t q = 0; q < m; ++q) h >= 8 ? fwht_avx2(t + q * h, h) : fwht(t + q * h, h);
  } else
#endif
    for (int64_t q = 0; q < m; ++q) fwht(t + q * h, h);
  const float* src = t;
  if (m > 1) {  // u[j, :] = Σ_q A[j, q]·t[q, :], A = C or Cᵀ
    for (int64_t j = 0; j < m; ++j) {
      float* uj = u + j * h;
      for (int64_t p = 0; p < h; ++p) uj[p] = 0.f;
      for (int64_t q = 0; q < m; ++q) {
        const float a = Transpose ? C[q * m + j] : C[j * m + q];
        const float* tq = t + q * h;
        for (int64_t p = 0; p < h; ++p) uj[p] += a * tq[p];
      }
    }
    src = u;
  }
  for (int64_t p = 0; p < h; ++p)
    for (int64_t q = 0; q < m; ++q) {
      const float v = src[q * h + p] * norm;
      y[p * m + q] = Transpose ? v * d[p * m + q] : v;
    }
}

using RowFn = void (*)(const float*, const float*, const float*, int64_t, int64_t, float*, float*, float*);

template <bool Transpose>
void row_generic(const float* x, const float* d, const float* C, int64_t h, int64_t m, float* t, float* u, float* y) {
  row_transform<Transpose>(x, d, C, h, m, t, u, y);
}

#if defined(__x86_64__) || defined(_M_X64)
template <bool Transpose>
__attribute__((target("avx2,fma"))) void row_avx2(const float* x, const float* d, const float* C, int64_t h, int64_t m,
                                                  float* t, float* u, float* y) {
  row_transform<Transpose, true>(x, d, C, h, m, t, u, y);  // the same loops, vectorized for AVX2
}
#endif

RowFn pick(bool transpose, bool simd) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (simd && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return transpose ? row_avx2<true> : row_avx2<false>;
#endif
  return transpose ? row_generic<true> : row_generic<false>;
}

}  // namespace

// out (B, n) = T·x, or Tᵀ·x with `transpose`, for x (B, n) contiguous float32, signs float32 (n,)
// of ±1, the power of two `hadamard` and `odd` the (m, m) DCT factor (an empty tensor when m = 1),
// n = hadamard·m. simd = false forces the portable loops (tests compare the two).
void kron_transform(const at::Tensor& x, const at::Tensor& signs, int64_t hadamard, const at::Tensor& odd,
                    bool transpose, at::Tensor& out, bool simd) {
  TORCH_CHECK(x.dim() == 2 && x.dtype() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (B, n)");
  const int64_t B = x.size(0), n = x.size(1);
  TORCH_CHECK(out.dtype() == at::kFloat && out.is_contiguous() && out.sizes() == x.sizes(),
              "out must be contiguous float32 shaped like x");
  TORCH_CHECK(signs.dtype() == at::kFloat && signs.is_contiguous() && signs.numel() == n, "signs: float32 (n,)");
  TORCH_CHECK(hadamard >= 1 && (hadamard & (hadamard - 1)) == 0, "hadamard must be a power of two");
  const int64_t m = odd.numel() ? odd.size(0) : 1;
  TORCH_CHECK(!odd.numel() || (odd.dtype() == at::kFloat && odd.is_contiguous() && odd.dim() == 2 && odd.size(1) == m),
              "odd: contiguous float32 (m, m), or empty");
  TORCH_CHECK(hadamard * m == n, "hadamard · m = ", hadamard * m, ", not the ", n, " features of x");
  const float* xp = x.data_ptr<float>();
  const float* d = signs.data_ptr<float>();
  const float* C = m > 1 ? odd.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const RowFn fn = pick(transpose, simd);
  // Rows on threads only when there is work for them: a parallel region costs microseconds.
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / n);
  at::parallel_for(0, B, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(2 * n);
    for (int64_t r = r0; r < r1; ++r) fn(xp + r * n, d, C, hadamard, m, scratch.data(), scratch.data() + n, op + r * n);
  });
}
