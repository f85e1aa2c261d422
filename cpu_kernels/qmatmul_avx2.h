// Quantized matmul, the AVX2 path (included by qmatmul.cc only): the weight layouts,
// their steps and the register-blocked micro kernels.
#pragma once

#include "qmatmul_common.h"

namespace pallax_qmatmul {

// ------------------------------------------------------------------ AVX2 dot
#if defined(__AVX2__)
inline float HorizontalSum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// The weight layouts. A step reads a row's bytes at `wofs` and multiplies them with
// activation blocks b0 (and b1). A lane of the int32 dot covers 4 consecutive bytes, so
// the per-lane scales can differ between the two 128-bit halves of a vector.
//
// int4 (g 32 or a multiple of 64) goes two blocks per step: 32 bytes whose low nibbles
// are block b0's features 0..15 | block b1's features 0..15 (g32: two groups; g64k: the
// 16+16 bytes hold the same features of the group's two halves, after a 128-bit lane
// swap) and whose high nibbles are features 16..31 of both. The activations of a pair
// are stored in that order too (PairActivations), so both products share per-lane
// scales and add up in int16 before one widening: 7 operations per 64 weights and row.
// int8 goes one block per step, with the sign trick: |w| x sign(x, w).
enum class Layout { kQ4G16, kQ4G32Pair, kQ4G64kPair, kQ8Uniform, kQ8G32k, kQ8G16k };

struct Step {
  int64_t wofs, s0, s1, b0, b1;
};

template <Layout L>
constexpr bool kSigned =
    L == Layout::kQ8Uniform || L == Layout::kQ8G32k || L == Layout::kQ8G16k;
template <Layout L>
constexpr bool kPaired = L == Layout::kQ4G32Pair || L == Layout::kQ4G64kPair;

// Visits the steps of a row in order; whole 32-blocks only (the rest is the scalar tail).
template <Layout L, typename F>
inline void ForEachStep(const Problem& p, F&& f) {
  const int64_t g = p.gsize;
  if constexpr (L == Layout::kQ4G16) {
    for (int64_t b = 0; b < p.nfull; ++b) f(Step{16 * b, 2 * b, 2 * b + 1, b, 0});
  } else if constexpr (L == Layout::kQ4G32Pair) {
    for (int64_t b = 0; b + 1 < p.nfull; b += 2) f(Step{16 * b, b, b + 1, b, b + 1});
  } else if constexpr (L == Layout::kQ4G64kPair) {
    // Step k covers bytes 32k.. of the row: group gi, 32-byte part j of its g/64.
    const int64_t half = g / 64;  // blocks in half a group
    for (int64_t k = 0, gi = 0, j = 0; k < p.nfull / 2; ++k) {
      const int64_t b = gi * 2 * half + j;
      f(Step{32 * k, gi, gi, b, b + half});
      if (++j == half) j = 0, ++gi;
    }
  } else if constexpr (L == Layout::kQ8G32k) {
    const int64_t per = g / kBlock;
    for (int64_t b = 0, gi = 0, j = 0; b < p.nfull; ++b) {
      f(Step{32 * b, gi, gi, b, 0});
      if (++j == per) j = 0, ++gi;
    }
  } else if constexpr (L == Layout::kQ8G16k) {
    // Groups of 16, 48, 80, ...: each half block lies in one group.
    for (int64_t b = 0, g0 = 0, g1 = 16 / g; b < p.nfull; ++b) {
      f(Step{32 * b, g0, g1, b, 0});
      while ((g0 + 1) * g <= 32 * (b + 1)) ++g0;
      while ((g1 + 1) * g <= 32 * (b + 1) + 16) ++g1;
    }
  } else {
    for (int64_t b = 0; b < p.nfull; ++b) f(Step{32 * b, 0, 0, b, 0});
  }
}

// Blocks [first, nblocks) of a row that no step covers: the scalar tail.
template <Layout L>
int64_t FirstTailBlock(const Problem& p) {
  return L == Layout::kQ4G32Pair ? p.nfull & ~int64_t{1} : p.nfull;
}

// Reorders each pair of quantized activation blocks (b0, b1) of a paired layout to
// b0 <- [b0 0..15 | b1 0..15], b1 <- [b0 16..31 | b1 16..31], the weights' order, and
// stores the step's activation scales [d[b0] x 4 | d[b1] x 4] at xdv[b0]: every weight
// row then loads them instead of building them (3 instructions a step).
template <Layout L>
void PairActivations(const Problem& p, int64_t r) {
  int8_t* q = p.xq + r * p.nblocks * kBlock;
  const float* d = p.xd + r * p.nblocks;
  float* dv = p.xdv + r * p.nblocks * 8;
  ForEachStep<L>(p, [&](const Step& st) {
    __m256i* a = reinterpret_cast<__m256i*>(q + st.b0 * kBlock);
    __m256i* b = reinterpret_cast<__m256i*>(q + st.b1 * kBlock);
    const __m256i x0 = _mm256_loadu_si256(a), x1 = _mm256_loadu_si256(b);
    _mm256_storeu_si256(a, _mm256_permute2x128_si256(x0, x1, 0x20));
    _mm256_storeu_si256(b, _mm256_permute2x128_si256(x0, x1, 0x31));
    _mm256_storeu_ps(dv + st.b0 * 8,
                     _mm256_set_m128(_mm_broadcast_ss(d + st.b1), _mm_broadcast_ss(d + st.b0)));
  });
}

// The weight vectors of a step: v[0] (and v[1] for a pair).
template <Layout L>
inline void Decode(const uint8_t* w, __m256i* v) {
  const __m256i low4 = _mm256_set1_epi8(15);
  if constexpr (L == Layout::kQ4G16) {
    // 16 bytes = two groups of 16: [lo 0..7, hi 0..7 | lo 8..15, hi 8..15].
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    const __m128i lo = _mm_and_si128(t, _mm256_castsi256_si128(low4));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(t, 4), _mm256_castsi256_si128(low4));
    v[0] = _mm256_set_m128i(_mm_unpackhi_epi64(lo, hi), _mm_unpacklo_epi64(lo, hi));
  } else if constexpr (kPaired<L>) {
    const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i lo = _mm256_and_si256(t, low4);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), low4);
    if constexpr (L == Layout::kQ4G32Pair) {
      v[0] = lo;
      v[1] = hi;
    } else {
      v[0] = _mm256_permute2x128_si256(lo, hi, 0x20);
      v[1] = _mm256_permute2x128_si256(lo, hi, 0x31);
    }
  } else {
    v[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  }
}

// Per-lane weight scales of a step: group s0 in lanes 0..3, s1 in lanes 4..7.
template <Layout L>
inline __m256 Scale(const float* s, const Step& st) {
  if constexpr (L == Layout::kQ4G16 || L == Layout::kQ4G32Pair || L == Layout::kQ8G16k) {
    return _mm256_set_m128(_mm_broadcast_ss(s + st.s1), _mm_broadcast_ss(s + st.s0));
  } else if constexpr (L == Layout::kQ8Uniform) {
    return _mm256_setzero_ps();  // the row's one scale is applied at the end
  } else {
    return _mm256_broadcast_ss(s + st.s0);
  }
}

// The int32 lane sums of a step's products: weights v (unsigned 4-bit, or signed int8)
// times the activation bytes y0 (and y1 for a pair). AVX512-VNNI's dpbusd multiplies
// and adds 4 byte pairs per lane in one instruction; AVX2 takes maddubs (to int16)
// then madd. Both are exact: an int16 lane of maddubs sums at most 2 + 2 products of
// 15 x 127, or 2 of 128 x 127.
template <Layout L>
inline __m256i IntDot(const __m256i* v, __m256i y0, __m256i y1, __m256i ones) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  (void)ones;
  const __m256i zero = _mm256_setzero_si256();
  if constexpr (kPaired<L>) {
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(zero, v[0], y0), v[1], y1);
  } else if constexpr (kSigned<L>) {
    return _mm256_dpbusd_epi32(zero, _mm256_abs_epi8(v[0]), _mm256_sign_epi8(y0, v[0]));
  } else {
    return _mm256_dpbusd_epi32(zero, v[0], y0);
  }
#else
  __m256i prod;
  if constexpr (kPaired<L>) {
    prod = _mm256_add_epi16(_mm256_maddubs_epi16(v[0], y0), _mm256_maddubs_epi16(v[1], y1));
  } else if constexpr (kSigned<L>) {
    prod = _mm256_maddubs_epi16(_mm256_abs_epi8(v[0]), _mm256_sign_epi8(y0, v[0]));
  } else {
    prod = _mm256_maddubs_epi16(v[0], y0);
  }
  return _mm256_madd_epi16(prod, ones);
#endif
}

// How many weight rows ahead Micro prefetches: the next tile's, and 4 rows for a single
// row (measured on the 2-core EPYC: 2 and 8 slower, none 5-15% slower).
template <int NW>
constexpr int kPrefetchRows = NW == 1 ? 4 : NW;

// NW weight rows o.. against NR activation rows r0..: y[r, o] (offset term included).
template <Layout L, int NW, int NR>
void Micro(const Problem& p, int64_t o, int64_t r0) {
  constexpr int kVecs = kPaired<L> ? 2 : 1;
  const int64_t qstride = p.nblocks * kBlock;
  const int8_t* q = p.xq + r0 * qstride;
  const float* d = p.xd + r0 * p.nblocks;
  const uint8_t* w = p.w + o * p.wstride;
  const float* s = p.scale + o * p.groups;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[NW][NR];
  for (int i = 0; i < NW; ++i) {
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  }
  ForEachStep<L>(p, [&](const Step& st) {
    __m256i v[NW][kVecs];
    __m256 ws[NW];
    for (int i = 0; i < NW; ++i) {
      // The same bytes kPrefetchRows rows on: streaming from memory, the hardware
      // prefetcher alone leaves int8 per channel at 60% of this speed.
      _mm_prefetch(reinterpret_cast<const char*>(w + (i + kPrefetchRows<NW>) * p.wstride + st.wofs),
                   _MM_HINT_T0);
      Decode<L>(w + i * p.wstride + st.wofs, v[i]);
      ws[i] = Scale<L>(s + i * p.groups, st);
    }
    for (int r = 0; r < NR; ++r) {
      const int8_t* qr = q + r * qstride;
      const float* dr = d + r * p.nblocks;
      const __m256i y0 =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + st.b0 * kBlock));
      __m256 dx;
      __m256i y1 = y0;
      if constexpr (kPaired<L>) {
        y1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qr + st.b1 * kBlock));
        dx = _mm256_loadu_ps(p.xdv + ((r0 + r) * p.nblocks + st.b0) * 8);
      } else {
        dx = _mm256_broadcast_ss(dr + st.b0);
      }
      for (int i = 0; i < NW; ++i) {
        const __m256i dot = IntDot<L>(v[i], y0, y1, ones);
        const __m256 sc = L == Layout::kQ8Uniform ? dx : _mm256_mul_ps(ws[i], dx);
        acc[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc[i][r]);
      }
    }
  });
  const int64_t tail = FirstTailBlock<L>(p);
  for (int i = 0; i < NW; ++i) {
    float offs[NR];
    if (p.offset != nullptr) OffsetTerms<NR>(p, o + i, r0, offs);
    for (int r = 0; r < NR; ++r) {
      float total = HorizontalSum(acc[i][r]);
      if (L == Layout::kQ8Uniform) total *= s[i * p.groups];
      if (tail < p.nblocks) total += DotBlocksScalar(p, o + i, r0 + r, tail, p.nblocks);
      if (p.offset != nullptr) total += offs[r];
      p.y[(r0 + r) * p.out + o + i] = total;
    }
  }
}

template <Layout L, int NW, int NR>
void MicroRows(const Problem& p, int64_t o, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + NR <= r1; r += NR) Micro<L, NW, NR>(p, o, r);
  if constexpr (NR > 1) {
    if (r < r1) MicroRows<L, NW, NR / 2>(p, o, r, r1);
  }
}

template <Layout L>
void DotTileAvx2(const Problem& p, int64_t o0, int64_t o1, int64_t r0, int64_t r1) {
  if (r1 - r0 == 1) {
    // One activation row: one weight row at a time, read in order. Four rows in lockstep
    // (four independent sums) measured 10-17% slower for int4 and 30% for int8: the
    // single stream is what the memory system serves best.
    for (int64_t o = o0; o < o1; ++o) Micro<L, 1, 1>(p, o, r0);
    return;
  }
  constexpr int NW = 2, NR = 4;  // 8 sums; measured faster than 4 x 2, 1 x 4 and 2 x 2
  int64_t o = o0;
  for (; o + NW <= o1; o += NW) MicroRows<L, NW, NR>(p, o, r0, r1);
  for (; o < o1; ++o) MicroRows<L, 1, NR>(p, o, r0, r1);
}
#endif  // __AVX2__

}  // namespace pallax_qmatmul
