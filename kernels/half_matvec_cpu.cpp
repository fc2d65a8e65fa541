// y = x @ Wᵀ with fp32 activations and a bf16 or fp16 weight, for small batches (decode).
//
// Layers a checkpoint keeps in float (the lm_head, SmolLM2's tied embedding) are stored in 16
// bits; serving them at fp32 would double the bytes read per token for no change in value,
// since every bf16 and fp16 number is exactly an fp32 number. This kernel reads the 16-bit
// rows and widens them in registers (bf16: a 16-bit shift; fp16: F16C), so the result equals
// the fp32 product with the widened weight up to summation order.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMBIN_X86 1
#endif

namespace {

inline float widen_bf16(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <bool BF16>
float dot_scalar(const float* x, const uint16_t* w, int64_t K) {
  float s = 0.f;
  for (int64_t c = 0; c < K; ++c) {
    const float wc = BF16 ? widen_bf16(w[c]) : static_cast<float>(c10::Half(w[c], c10::Half::from_bits()));
    s += x[c] * wc;
  }
  return s;
}

#ifdef LLMBIN_X86
template <bool BF16>
__attribute__((target("avx2,fma,f16c"))) inline __m256 widen8(const uint16_t* w) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  if (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

// Four accumulators: the FMAs of one row do not wait on each other.
template <bool BF16>
__attribute__((target("avx2,fma,f16c"))) float dot_avx2(const float* x, const uint16_t* w, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t c = 0;
  for (; c + 32 <= K; c += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), widen8<BF16>(w + c), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 8), widen8<BF16>(w + c + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 16), widen8<BF16>(w + c + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c + 24), widen8<BF16>(w + c + 24), a3);
  }
  for (; c + 8 <= K; c += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + c), widen8<BF16>(w + c), a0);
  const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s) + dot_scalar<BF16>(x + c, w + c, K - c);
}
#endif

using DotFn = float (*)(const float*, const uint16_t*, int64_t);

DotFn pick(bool bf16, bool simd) {
#ifdef LLMBIN_X86
  __builtin_cpu_init();
  if (simd && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return bf16 ? dot_avx2<true> : dot_avx2<false>;
#endif
  return bf16 ? dot_scalar<true> : dot_scalar<false>;
}

}  // namespace

// out (B, N) = x (B, K) @ w (N, K)ᵀ; x and out float32, w bfloat16 or float16, all contiguous.
// simd = false forces the portable loop (tests compare the two).
void half_linear(const at::Tensor& x, const at::Tensor& w, at::Tensor& out, bool simd) {
  TORCH_CHECK(x.dim() == 2 && x.dtype() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (B, K)");
  TORCH_CHECK(w.dim() == 2 && (w.dtype() == at::kBFloat16 || w.dtype() == at::kHalf) && w.is_contiguous() &&
              w.size(1) == x.size(1), "w must be contiguous bfloat16 or float16 (N, K)");
  TORCH_CHECK(out.dtype() == at::kFloat && out.is_contiguous() && out.size(0) == x.size(0) && out.size(1) == w.size(0),
              "out must be contiguous float32 (B, N)");
  const int64_t B = x.size(0), N = w.size(0), K = x.size(1);
  const DotFn dot = pick(w.dtype() == at::kBFloat16, simd);
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* op = out.data_ptr<float>();
  // By rows, every batch row per weight row: a weight row is read from memory once.
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t b = 0; b < B; ++b) op[b * N + r] = dot(xp + b * K, wp + r * K, K);
  });
}
