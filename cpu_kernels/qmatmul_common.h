// Quantized matmul, the parts every path shares (included by qmatmul.cc only): the
// problem, the weight values, activation quantization and the scalar dot.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "parallel.h"

namespace pallax_qmatmul {

using pallax_cpu::ParallelForSpin;

constexpr int64_t kBlock = 32;  // activation quantization block
constexpr int64_t kRowTile = 64;  // activation rows per task (keeps them in L2)

// ------------------------------------------------------------------ the problem
struct Problem {
  int64_t rows = 0, out = 0, ip = 0, groups = 0, gsize = 0, bits = 0;
  int64_t nblocks = 0;  // ceil(ip / 32): activation blocks per row (last one zero-padded)
  int64_t nfull = 0;    // ip / 32: whole blocks
  int64_t wstride = 0;  // bytes per weight row
  const float* x = nullptr;       // [rows, ip]
  const uint8_t* w = nullptr;     // [out, wstride]
  const float* scale = nullptr;   // [out, groups]
  const float* offset = nullptr;  // [out, groups] or null
  float* y = nullptr;             // [rows, out]
  int8_t* xq = nullptr;           // [rows, nblocks * 32]
  float* xd = nullptr;            // [rows, nblocks]
  float* xsum = nullptr;          // [rows, groups] when offset
  float* xdv = nullptr;           // [rows, nblocks, 8]: paired layouts' per-step scales
};

// The integer value of weight (o, i): int8, or a nibble of the group-halves layout.
inline int32_t WeightValue(const Problem& p, const uint8_t* wrow, int64_t i) {
  if (p.bits == 8) return static_cast<int8_t>(wrow[i]);
  const int64_t g = p.gsize, half = g / 2, gi = i / g, k = i % g;
  const uint8_t byte = wrow[gi * half + (k < half ? k : k - half)];
  return k < half ? (byte & 15) : (byte >> 4);
}

// ---------------------------------------------------------- activation quantization
void QuantizeBlockScalar(const float* x, int64_t n, int8_t* q, float* d) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float dd = amax / 127.0f;
  const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
  *d = dd;
  for (int64_t i = 0; i < kBlock; ++i) {
    const float v = i < n ? std::nearbyint(x[i] * id) : 0.0f;
    q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
  }
}

#if defined(__AVX2__)
void QuantizeBlockAvx2(const float* x, int8_t* q, float* d) {
  __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8);
  __m256 v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1));
  m = _mm256_max_ps(m, _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
  __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  const float dd = amax / 127.0f;
  const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
  *d = dd;
  const __m256 mul = _mm256_set1_ps(id);
  // Rounds to nearest even, as std::nearbyint does in the default mode.
  __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, mul));
  __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, mul));
  __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, mul));
  __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, mul));
  i0 = _mm256_packs_epi32(i0, i1);
  i2 = _mm256_packs_epi32(i2, i3);
  i0 = _mm256_packs_epi16(i0, i2);
  i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), i0);
}
#endif

// Quantizes activation row r (and its group sums); `prepare` then reorders it for the
// layout when not null.
void QuantizeRow(const Problem& p, int64_t r, void (*prepare)(const Problem&, int64_t)) {
  const float* x = p.x + r * p.ip;
  int8_t* q = p.xq + r * p.nblocks * kBlock;
  float* d = p.xd + r * p.nblocks;
  for (int64_t b = 0; b < p.nblocks; ++b) {
    const int64_t n = std::min(kBlock, p.ip - b * kBlock);
#if defined(__AVX2__)
    if (n == kBlock) {
      QuantizeBlockAvx2(x + b * kBlock, q + b * kBlock, d + b);
      continue;
    }
#endif
    QuantizeBlockScalar(x + b * kBlock, n, q + b * kBlock, d + b);
  }
  if (p.offset != nullptr) {
    // Sums of the quantized activations: the offset term then uses the same x as the
    // integer dot, so its error is sum_i w[i] * (xq[i] - x[i]) with the centred weight
    // rather than with value * scale (RTN int4 g128: 0.55% of the output's scale (rms)
    // instead of 1.9%).
    for (int64_t gi = 0; gi < p.groups; ++gi) {
      float total = 0.0f;
      for (int64_t i = gi * p.gsize, end = (gi + 1) * p.gsize; i < end;) {
        const int64_t b = i / kBlock, stop = std::min(end, (b + 1) * kBlock);
        int32_t isum = 0;
        for (; i < stop; ++i) isum += q[i];
        total += static_cast<float>(isum) * d[b];
      }
      p.xsum[r * p.groups + gi] = total;
    }
  }
  if (prepare != nullptr) prepare(p, r);
}

// ---------------------------------------------------------------- scalar dot
// Blocks [b0, b1) of weight row o against activation row r, in float (no offset term).
float DotBlocksScalar(const Problem& p, int64_t o, int64_t r, int64_t b0, int64_t b1) {
  const uint8_t* wrow = p.w + o * p.wstride;
  const float* srow = p.scale + o * p.groups;
  const int8_t* q = p.xq + r * p.nblocks * kBlock;
  const float* d = p.xd + r * p.nblocks;
  float acc = 0.0f;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t end = std::min(p.ip, (b + 1) * kBlock);
    for (int64_t i = b * kBlock; i < end;) {
      const int64_t gi = i / p.gsize;
      const int64_t stop = std::min(end, (gi + 1) * p.gsize);
      int32_t isum = 0;
      for (; i < stop; ++i) isum += WeightValue(p, wrow, i) * q[i];
      acc += static_cast<float>(isum) * d[b] * srow[gi];
    }
  }
  return acc;
}

// The offset terms sum_g offset[o, g] * xsum[r, g] of weight row o and activation rows
// r0 .. r0 + NR - 1, into out[NR]. With AVX2: group gi in lane gi % 8 of an FMA chain,
// the 8 lanes summed ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)) (an hadd tree: for 4 rows
// at once, one tree serves all four), then the groups past the last 8 in order. The rows
// share only the offsets' loads, so a row's term is the same bits for every NR: alone or
// in a batch. (With g32 this term is 1/32 of the multiply-adds but, one row at a time
// with a horizontal sum each, it took 40% of a batch-16 call.)
template <int NR>
inline void OffsetTerms(const Problem& p, int64_t o, int64_t r0, float* out) {
  const float* off = p.offset + o * p.groups;
  const float* xs = p.xsum + r0 * p.groups;
  int64_t gi = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a[NR];
  for (int r = 0; r < NR; ++r) a[r] = _mm256_setzero_ps();
  for (; gi + 8 <= p.groups; gi += 8) {
    const __m256 w = _mm256_loadu_ps(off + gi);
    for (int r = 0; r < NR; ++r) {
      a[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs + r * p.groups + gi), a[r]);
    }
  }
  if constexpr (NR == 4) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  } else {
    for (int r = 0; r < NR; ++r) {
      __m256 h = _mm256_hadd_ps(a[r], a[r]);
      h = _mm256_hadd_ps(h, h);
      out[r] = _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    }
  }
#else
  for (int r = 0; r < NR; ++r) out[r] = 0.0f;
#endif
  for (int r = 0; r < NR; ++r) {
    const float* x = xs + r * p.groups;
    for (int64_t g = gi; g < p.groups; ++g) out[r] = std::fma(off[g], x[g], out[r]);
  }
}

}  // namespace pallax_qmatmul
