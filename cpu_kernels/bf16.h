// Helpers shared by the CPU kernels: bfloat16 widening to float32 (exact: a bf16 is the
// top half of a float32) and, with AVX2, 8 at a time; a horizontal sum; e^x for 8 lanes;
// the float32 x (float32, bfloat16 or int8) dot product and axpy the attention kernels share.

#ifndef PALLAX_CPU_KERNELS_BF16_H_
#define PALLAX_CPU_KERNELS_BF16_H_

#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace pallax_cpu {

inline float Widen(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) { return Widen(p[i]); }
inline float Load(const int8_t* p, int64_t i) { return static_cast<float>(p[i]); }

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }

// 8 bfloat16 -> 8 float32: zero-extend to 32 bits, shift left by 16.
inline __m256 Load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 8 int8 -> 8 float32 (exact).
inline __m256 Load8(const int8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

inline float HSum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// e^x for 8 lanes, x <= 0 here (logit - running max): Cephes' expf (range reduction
// by ln 2 in two parts, degree-5 polynomial), relative error about 2e-7. Lanes below
// -87 give about 1.6e-38 instead of smaller values, which a softmax cannot tell apart.
inline __m256 Exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// sum_i a[i] * b[i] over h elements, b float32, bfloat16 or int8 (two 8-lane accumulators).
template <typename T>
inline float Dot(const float* a, const T* b, int64_t h) {
  float dot = 0.0f;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; i + 16 <= h; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), Load8(b + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), Load8(b + i + 8), a1);
  }
  for (; i + 8 <= h; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), Load8(b + i), a0);
  dot = HSum(_mm256_add_ps(a0, a1));
#endif
  for (; i < h; ++i) dot += a[i] * Load(b, i);
  return dot;
}

// acc[0..h) += w * x[0..h), x float32, bfloat16 or int8.
template <typename T>
inline void Axpy(float w, const T* x, float* acc, int64_t h) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 w8 = _mm256_set1_ps(w);
  for (; i + 8 <= h; i += 8) {
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(w8, Load8(x + i), _mm256_loadu_ps(acc + i)));
  }
#endif
  for (; i < h; ++i) acc[i] += w * Load(x, i);
}

}  // namespace pallax_cpu

#endif  // PALLAX_CPU_KERNELS_BF16_H_
