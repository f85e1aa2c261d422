// Quantized matmul for XLA:CPU through the FFI: y [R, O] = x [R, Ip] @ dequant(w).T.
//
// The weight is pallax's packed format (ir/qformat.py): int8 [O, Ip] or two 4-bit
// values per byte [O, Ip / 2] in the group-halves layout, a float scale per group of g
// input features and optionally a float offset per group:
//     w[o, i] = value(o, i) * scale[o, i / g] + offset[o, i / g].
//
// As llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 dot products do, the activations are
// quantized on entry to int8 in blocks of 32 with one float scale per block, and each
// 32-block is an integer dot product (AVX2: maddubs of unsigned weight bytes by signed
// activation bytes, then madd to int32), scaled by weight scale x activation scale and
// accumulated in float32. Signed int8 weights use the sign trick: |w| as the unsigned
// operand and sign(x, w) as the signed one. The offset term is
//     sum_g offset[o, g] * sum_{i in g} xq[r, i],
// with the group sums taken from the quantized activations (see QuantizeRow).
//
// Threading: from 64K multiply-adds a call (one decode row of any SmolLM2 projection),
// the output rows are split into tasks that the calling thread and the library's
// spinning workers claim (parallel.h). Each output is computed by one task, so the
// result does not depend on the thread count.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

float OffsetTerm(const Problem& p, int64_t o, int64_t r) {
  const float* off = p.offset + o * p.groups;
  const float* s = p.xsum + r * p.groups;
  float acc = 0.0f;
  int64_t gi = 0;
#if defined(__AVX2__) && defined(__FMA__)
  // 8 groups per FMA: with g32 the term is 1/32 of the multiply-adds, but scalar it
  // cost about a sixth of a decode row's time.
  __m256 a = _mm256_setzero_ps();
  for (; gi + 8 <= p.groups; gi += 8) {
    a = _mm256_fmadd_ps(_mm256_loadu_ps(off + gi), _mm256_loadu_ps(s + gi), a);
  }
  __m128 h = _mm_add_ps(_mm256_extractf128_ps(a, 1), _mm256_castps256_ps128(a));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  acc = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
  for (; gi < p.groups; ++gi) acc += off[gi] * s[gi];
  return acc;
}

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
    for (int r = 0; r < NR; ++r) {
      float total = HorizontalSum(acc[i][r]);
      if (L == Layout::kQ8Uniform) total *= s[i * p.groups];
      if (tail < p.nblocks) total += DotBlocksScalar(p, o + i, r0 + r, tail, p.nblocks);
      if (p.offset != nullptr) total += OffsetTerm(p, o + i, r0 + r);
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

using TileFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t);
using PrepareFn = void (*)(const Problem&, int64_t);

[[maybe_unused]] void DotTileScalar(const Problem& p, int64_t o0, int64_t o1, int64_t r0,
                                    int64_t r1) {
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t r = r0; r < r1; ++r) {
      float total = DotBlocksScalar(p, o, r, 0, p.nblocks);
      if (p.offset != nullptr) total += OffsetTerm(p, o, r);
      p.y[r * p.out + o] = total;
    }
  }
}

// A layout's tile function and, for paired layouts, its activation reordering.
struct Kernel {
  TileFn tile = nullptr;  // null when the layout is not supported
  PrepareFn prepare = nullptr;
};

Kernel SelectKernel(const Problem& p) {
  const int64_t g = p.gsize;
  const bool q4 = p.bits == 4 && (g == 16 || g == 32 || g % 64 == 0);
  const bool q8 = p.bits == 8 && (p.groups == 1 || g % 16 == 0);
  if (!q4 && !q8) return {};
#if defined(__AVX2__)
  if (p.bits == 4) {
    if (g == 16) return {DotTileAvx2<Layout::kQ4G16>};
    if (g == 32) {
      return {DotTileAvx2<Layout::kQ4G32Pair>, PairActivations<Layout::kQ4G32Pair>};
    }
    return {DotTileAvx2<Layout::kQ4G64kPair>, PairActivations<Layout::kQ4G64kPair>};
  }
  if (p.groups == 1) return {DotTileAvx2<Layout::kQ8Uniform>};
  if (g % 32 == 0) return {DotTileAvx2<Layout::kQ8G32k>};
  return {DotTileAvx2<Layout::kQ8G16k>};
#else
  return {DotTileScalar};
#endif
}

// -------------------------------------------------------------------- handler
struct Scratch {
  std::vector<int8_t> xq;
  std::vector<float> xd, xsum, xdv;
};

ffi::Error Run(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer data,
               ffi::Buffer<ffi::F32> scale, const float* offset,
               ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t group_size) {
  const auto xd = x.dimensions(), wd = data.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2) {
    return ffi::Error::InvalidArgument("pallax_qmatmul: x, data and scale must be 2-D");
  }
  Problem p;
  p.rows = xd[0];
  p.ip = xd[1];
  p.out = wd[0];
  p.groups = sd[1];
  p.gsize = group_size;
  p.bits = bits;
  const auto want_type = bits == 4 ? ffi::DataType::U8 : ffi::DataType::S8;
  if ((bits != 4 && bits != 8) || data.element_type() != want_type) {
    return ffi::Error::InvalidArgument("pallax_qmatmul: bits=" + std::to_string(bits) +
                                       " needs uint8 (4) or int8 (8) data");
  }
  if (group_size <= 0 || p.groups * group_size != p.ip || sd[0] != p.out ||
      wd[1] != (bits == 4 ? p.ip / 2 : p.ip) || (bits == 4 && group_size % 2)) {
    return ffi::Error::InvalidArgument(
        "pallax_qmatmul: shapes disagree: x [" + std::to_string(p.rows) + ", " +
        std::to_string(p.ip) + "], data [" + std::to_string(wd[0]) + ", " +
        std::to_string(wd[1]) + "], scale [" + std::to_string(sd[0]) + ", " +
        std::to_string(sd[1]) + "], group_size=" + std::to_string(group_size));
  }
  p.nblocks = (p.ip + kBlock - 1) / kBlock;
  p.nfull = p.ip / kBlock;
  p.wstride = wd[1];
  p.x = x.typed_data();
  p.w = static_cast<const uint8_t*>(data.untyped_data());
  p.scale = scale.typed_data();
  p.offset = offset;
  p.y = y->typed_data();
  const Kernel kernel = SelectKernel(p);
  if (kernel.tile == nullptr) {
    return ffi::Error::InvalidArgument("pallax_qmatmul: unsupported bits=" +
                                       std::to_string(bits) +
                                       " group_size=" + std::to_string(group_size));
  }
  if (p.rows == 0 || p.out == 0) return ffi::Error::Success();

  thread_local Scratch scratch;
  scratch.xq.resize(p.rows * p.nblocks * kBlock);
  scratch.xd.resize(p.rows * p.nblocks);
  scratch.xsum.resize(offset != nullptr ? p.rows * p.groups : 0);
  scratch.xdv.resize(kernel.prepare != nullptr ? p.rows * p.nblocks * 8 : 0);
  p.xq = scratch.xq.data();
  p.xd = scratch.xd.data();
  p.xsum = scratch.xsum.data();
  p.xdv = scratch.xdv.data();

  // Threads: from kMinSpinMacs up, the library's spinning workers (parallel.h); a decode
  // row (R = 1) of a 576 x 576 int4 weight already splits.
  const int64_t threads = pallax_cpu::ThreadsFor(p.rows * p.out * p.ip);
  // Activation rows: quantized inline when few, across the threads when many.
  constexpr int64_t kRowsPerQuantTask = 16;
  if (p.rows <= kRowsPerQuantTask) {
    for (int64_t r = 0; r < p.rows; ++r) QuantizeRow(p, r, kernel.prepare);
  } else {
    const int64_t n = (p.rows + kRowsPerQuantTask - 1) / kRowsPerQuantTask;
    ParallelForSpin(threads, n, [&](int64_t t) {
      const int64_t r1 = std::min(p.rows, (t + 1) * kRowsPerQuantTask);
      for (int64_t r = t * kRowsPerQuantTask; r < r1; ++r) QuantizeRow(p, r, kernel.prepare);
    });
  }

  // Tasks: row tiles x chunks of output rows (a multiple of the 4-row tiles), about 8
  // per thread so that the claims balance a thread that the OS or another process slows.
  const int64_t row_tiles = (p.rows + kRowTile - 1) / kRowTile;
  const int64_t want_chunks = std::max<int64_t>(1, (threads * 8 + row_tiles - 1) / row_tiles);
  const int64_t per_chunk = ((p.out + want_chunks - 1) / want_chunks + 3) & ~int64_t{3};
  const int64_t chunk = std::max<int64_t>(8, per_chunk);
  const int64_t chunks = (p.out + chunk - 1) / chunk;
  ParallelForSpin(threads, row_tiles * chunks, [&](int64_t t) {
    const int64_t rt = t / chunks, oc = t % chunks;
    kernel.tile(p, oc * chunk, std::min(p.out, (oc + 1) * chunk), rt * kRowTile,
                std::min(p.rows, (rt + 1) * kRowTile));
  });
  return ffi::Error::Success();
}

ffi::Error QMatmul(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer data,
                   ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t bits,
                   int64_t group_size) {
  return Run(x, data, scale, nullptr, y, bits, group_size);
}

ffi::Error QMatmulOffset(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer data,
                         ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset,
                         ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t group_size) {
  const auto od = offset.dimensions(), sd = scale.dimensions();
  if (od.size() != 2 || sd.size() != 2 || od[0] != sd[0] || od[1] != sd[1]) {
    return ffi::Error::InvalidArgument("pallax_qmatmul: offset and scale shapes differ");
  }
  return Run(x, data, scale, offset.typed_data(), y, bits, group_size);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PallaxQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, Ip]
                                  .Arg<ffi::AnyBuffer>()         // data [O, Ip or Ip/2]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [O, G]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [R, O]
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PallaxQMatmulOffset, QMatmulOffset,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, Ip]
                                  .Arg<ffi::AnyBuffer>()         // data [O, Ip or Ip/2]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [O, G]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // offset [O, G]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [R, O]
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size"));
