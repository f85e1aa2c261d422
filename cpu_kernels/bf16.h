// bfloat16 helpers shared by the CPU kernels: widening to float32 (exact: a bf16 is the
// top half of a float32) and, with AVX2, 8 at a time, plus a horizontal sum.

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

#if defined(__AVX2__) && defined(__FMA__)
// 8 bfloat16 -> 8 float32: zero-extend to 32 bits, shift left by 16.
inline __m256 Load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float HSum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

}  // namespace pallax_cpu

#endif  // PALLAX_CPU_KERNELS_BF16_H_
