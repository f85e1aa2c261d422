// Single-token (decode) attention over a KIVI cache for XLA:CPU through the FFI, reading
// the packed rows where they are: no dense copy of the cache is made.
//
//   out [B, N, H]       = attention of q [B, N, H] (times `scale`) over
//     - the packed rows: keys k.data [B, K, S, H*b/8] with per-channel scale and zero
//       k.scale, k.zero [B, K, S/G, H] per granule of G rows; values v.data
//       [B, K, S, H*b/8] with per-token scale and zero v.scale, v.zero [B, K, S, H/G]
//       per group of G channels (ir/kvcache/kivi.py; the strided packing: byte j of a
//       row holds channels j, j + H/m, ... for m = 8 / b values a byte);
//     - C full-precision candidates ck, cv [B, K, C, H] float32 or bfloat16 (the first
//       rows, the new token, the staging ring: whatever the slot policy keeps unencoded);
//   mass_rows [B, K, S], mass_cand [B, K, C] (optional) = the attention each key gets,
//     summed over the G' = N / K query heads of its KV head (H2O's score).
//
// Which keys a query sees is given, not derived: row j of KV head kvh is a key iff
// rpos[b, kvh or 0, j] >= 0, candidate c iff cpos[b, kvh or 0, c] >= 0 (the caller
// applies causality, the window and the slot policy to positions). Granules with no
// visible row are skipped without reading them.
//
// Nothing is dequantized to memory. A granule's key scales fold into the query once
// (logit = sum_h (q_h * scale_h) * level_h + q . zero), and a value row's levels are
// added to the output times (weight * its group's scale), its zero points to one sum
// per group; the query heads of a KV head share each unpacked row (8 channels at a time
// with AVX2, scalar otherwise). Rows are cut into chunks of whole granules that
// the threads share, the candidates form one more chunk, and the chunks' online-softmax
// partials are merged in a fixed order, so a row's result does not depend on the thread
// count or on the other rows of the batch.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "bf16.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunkRows = 512;  // rows per task, rounded up to whole granules
constexpr float kNone = -std::numeric_limits<float>::infinity();

struct KiviProblem {
  int64_t b = 0, n = 0, kv = 0, s = 0, h = 0, g = 0;  // g: query heads per KV head
  int64_t bits = 2, gs = 32, c = 0;                    // gs: group size; c: candidates
  int64_t rheads = 1, cheads = 1;                      // rpos / cpos head dims (1 or K)
  bool bf16_scales = true;
  float scale = 1.0f, softcap = 0.0f;
  const float* q = nullptr;
  const uint8_t* kd = nullptr;
  const void* ks = nullptr;
  const void* kz = nullptr;
  const uint8_t* vd = nullptr;
  const void* vs = nullptr;
  const void* vz = nullptr;
  const int32_t* rpos = nullptr;  // [B, rheads, S]
  const void* ck = nullptr;       // [B, K, C, H] float32 or bfloat16 (bf16_cand)
  const void* cv = nullptr;
  bool bf16_cand = false;
  const int32_t* cpos = nullptr;  // [B, cheads, C]
  float* out = nullptr;           // [B, N, H]
  float* mass_rows = nullptr;     // [B, K, S] or null
  float* mass_cand = nullptr;     // [B, K, C] or null
  float* lg_rows = nullptr;       // scratch logits [B, K, G', S] when mass is wanted
  float* lg_cand = nullptr;       // [B, K, G', C]
};

inline float ScaleAt(const KiviProblem& p, const void* base, int64_t i) {
  return p.bf16_scales ? pallax_cpu::Widen(static_cast<const uint16_t*>(base)[i])
                       : static_cast<const float*>(base)[i];
}

inline float Capped(const KiviProblem& p, float logit) {
  return p.softcap > 0.0f ? p.softcap * std::tanh(logit / p.softcap) : logit;
}

using pallax_cpu::Axpy;
using pallax_cpu::Dot;

// The quantized values of one packed row, in channel order, as float32: f[h]
// (the scalar path: any head dim).
inline void Unpack(const KiviProblem& p, const uint8_t* row, float* f) {
  const int64_t per = 8 / p.bits, hp = p.h / per;
  const int mask = (1 << p.bits) - 1;
  for (int64_t j = 0; j < hp; ++j) {
    for (int64_t m = 0; m < per; ++m) f[m * hp + j] = static_cast<float>((row[j] >> (m * p.bits)) & mask);
  }
}

// Whether the vector paths apply: 8 packed bytes at a time, 8 channels of one value group.
inline bool Vectorized(const KiviProblem& p) {
#if defined(__AVX2__) && defined(__FMA__)
  return (p.h / (8 / p.bits)) % 8 == 0 && p.gs % 8 == 0 && p.g <= 16;
#else
  (void)p;
  return false;
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
// The 8 packed bytes at row[j] widened to 32-bit lanes, and the levels of slot m
// (channels m * H/per + j ..+8) of such a widening as float32.
inline __m256i Bytes8(const uint8_t* row, int64_t j) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j)));
}

inline __m256 Levels8(__m256i x, int64_t m, int64_t bits, __m256i mask) {
  return _mm256_cvtepi32_ps(
      _mm256_and_si256(_mm256_srl_epi32(x, _mm_cvtsi32_si128(static_cast<int>(m * bits))), mask));
}
#endif

// Online softmax state of the G' query heads of one task: running max and sum, the
// weighted sums of the values' quantized levels times their scales acc [G', H] and of
// their zero points accz [G', H/G] (added to acc's channels at the end).
struct Partials {
  std::vector<float> max, sum, acc, accz;
  Partials(int64_t g, int64_t h, int64_t vg)
      : max(g, kNone), sum(g, 0.0f), acc(g * h, 0.0f), accz(g * vg, 0.0f) {}
};

// Fold a block of logits lg [G', stride] (first nb used; kNone: not a key) into the
// partials; lg becomes the weights e^(l - max) (0 for a non-key). Returns false when no
// key of the block is visible.
bool Softmax(Partials& part, float* lg, int64_t nb, int64_t stride, int64_t g, int64_t h) {
  const int64_t vg = static_cast<int64_t>(part.accz.size()) / g;
  bool any = false;
  for (int64_t gi = 0; gi < g; ++gi) {
    float* l = lg + gi * stride;
    float top = part.max[gi];
    for (int64_t j = 0; j < nb; ++j) top = std::max(top, l[j]);
    if (top == kNone) {  // no key for this head (yet): weights 0
      std::fill(l, l + nb, 0.0f);
      continue;
    }
    any = true;
    const float rescale = std::exp(part.max[gi] - top);  // 0 on the first visible key
    part.max[gi] = top;
    float s = 0.0f;
    int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 t8 = _mm256_set1_ps(top), none = _mm256_set1_ps(kNone);
    __m256 s8 = _mm256_setzero_ps();
    for (; j + 8 <= nb; j += 8) {
      const __m256 x = _mm256_loadu_ps(l + j);
      const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, none, _CMP_EQ_OQ),
                                        pallax_cpu::Exp8(_mm256_sub_ps(x, t8)));
      _mm256_storeu_ps(l + j, e);
      s8 = _mm256_add_ps(s8, e);
    }
    s = pallax_cpu::HSum(s8);
#endif
    for (; j < nb; ++j) {
      l[j] = l[j] == kNone ? 0.0f : std::exp(l[j] - top);
      s += l[j];
    }
    part.sum[gi] = part.sum[gi] * rescale + s;
    if (rescale != 1.0f) {
      float* a = part.acc.data() + gi * h;
      for (int64_t i = 0; i < h; ++i) a[i] *= rescale;
      for (int64_t i = 0; i < vg; ++i) part.accz[gi * vg + i] *= rescale;
    }
  }
  return any;
}

// Logits lg[gi * stride] of the G' heads for one packed key row: sum_h qk[gi, h] * level_h
// + cz[gi], with qk = query * scale * the granule's channel scales and cz = the query
// dotted with the zero points.
inline void KeyLogits(const KiviProblem& p, const uint8_t* row, const float* qk, const float* cz,
                      float* lg, int64_t stride, float* tmp) {
  const int64_t h = p.h, g = p.g;
#if defined(__AVX2__) && defined(__FMA__)
  if (Vectorized(p)) {
    const int64_t per = 8 / p.bits, hp = h / per;
    const __m256i mask = _mm256_set1_epi32((1 << p.bits) - 1);
    __m256 acc[16];
    for (int64_t gi = 0; gi < g; ++gi) acc[gi] = _mm256_setzero_ps();
    for (int64_t j = 0; j < hp; j += 8) {
      const __m256i x = Bytes8(row, j);
      for (int64_t m = 0; m < per; ++m) {
        const __m256 f = Levels8(x, m, p.bits, mask);
        const float* qc = qk + m * hp + j;
        for (int64_t gi = 0; gi < g; ++gi) acc[gi] = _mm256_fmadd_ps(_mm256_loadu_ps(qc + gi * h), f, acc[gi]);
      }
    }
    for (int64_t gi = 0; gi < g; ++gi) lg[gi * stride] = Capped(p, pallax_cpu::HSum(acc[gi]) + cz[gi]);
    return;
  }
#endif
  Unpack(p, row, tmp);
  for (int64_t gi = 0; gi < g; ++gi) lg[gi * stride] = Capped(p, Dot(qk + gi * h, tmp, h) + cz[gi]);
}

// acc[gi] += w[gi] * (level * scale) and accz[gi] += w[gi] * zero for one packed value
// row with its per-group scales sc [H/G] and zero points zr [H/G].
inline void ValueAccumulate(const KiviProblem& p, const uint8_t* row, const float* sc,
                            const float* zr, const float* w, int64_t stride, Partials& part,
                            float* tmp) {
  const int64_t h = p.h, g = p.g, gs = p.gs, vg = h / gs;
  float ws[16 * 32];  // w[gi] * sc[c] for the vector path (vg <= 32 there: gs >= 8, h <= 256)
  for (int64_t gi = 0; gi < g; ++gi) {
    const float wi = w[gi * stride];
    for (int64_t c = 0; c < vg; ++c) part.accz[gi * vg + c] += wi * zr[c];
  }
#if defined(__AVX2__) && defined(__FMA__)
  if (Vectorized(p) && vg <= 32) {
    for (int64_t gi = 0; gi < g; ++gi) {
      for (int64_t c = 0; c < vg; ++c) ws[gi * 32 + c] = w[gi * stride] * sc[c];
    }
    const int64_t per = 8 / p.bits, hp = h / per;
    const __m256i mask = _mm256_set1_epi32((1 << p.bits) - 1);
    for (int64_t j = 0; j < hp; j += 8) {
      const __m256i x = Bytes8(row, j);
      for (int64_t m = 0; m < per; ++m) {
        const __m256 f = Levels8(x, m, p.bits, mask);
        const int64_t c0 = m * hp + j, grp = c0 / gs;
        for (int64_t gi = 0; gi < g; ++gi) {
          float* a = part.acc.data() + gi * h + c0;
          _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(ws[gi * 32 + grp]), f, _mm256_loadu_ps(a)));
        }
      }
    }
    return;
  }
#endif
  Unpack(p, row, tmp);
  for (int64_t gi = 0; gi < g; ++gi) {
    const float wi = w[gi * stride];
    float* a = part.acc.data() + gi * h;
    for (int64_t i = 0; i < h; ++i) a[i] += wi * sc[i / gs] * tmp[i];
  }
}

// The granule functions of the vector path (none: the row-by-row path).
struct GranuleFns {
  void (*keys)(const KiviProblem&, int64_t, int64_t, const int32_t*, const float*, const float*,
               float*) = nullptr;
  void (*values)(const KiviProblem&, int64_t, int64_t, const int32_t*, const float*, Partials&,
                 float*) = nullptr;
};

#if defined(__AVX2__) && defined(__FMA__)
// The vector path with the bit width and the query heads per KV head G' known at compile
// time, one granule (gs rows from r) at a time: the accumulators stay in registers. The
// multiply-adds and their order are those of KeyLogits / ValueAccumulate row by row, so
// the results are the same bits.

// Logits lg [G', gs] of the granule's key rows (kNone where not visible).
template <int BITS, int G>
void KeysGranule(const KiviProblem& p, int64_t bk, int64_t r, const int32_t* vis,
                 const float* qk, const float* cz, float* lg) {
  constexpr int64_t kPer = 8 / BITS;
  const int64_t h = p.h, gs = p.gs, hp = h / kPer;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  for (int64_t j = 0; j < gs; ++j) {
    if (vis[r + j] < 0) {
      for (int gi = 0; gi < G; ++gi) lg[gi * gs + j] = kNone;
      continue;
    }
    const uint8_t* row = p.kd + (bk * p.s + r + j) * hp;
    __m256 acc[G];
    for (int gi = 0; gi < G; ++gi) acc[gi] = _mm256_setzero_ps();
    for (int64_t jb = 0; jb < hp; jb += 8) {
      const __m256i x = Bytes8(row, jb);
      for (int64_t m = 0; m < kPer; ++m) {
        const __m256 f = Levels8(x, m, BITS, mask);
        const float* qc = qk + m * hp + jb;
        for (int gi = 0; gi < G; ++gi) {
          acc[gi] = _mm256_fmadd_ps(_mm256_loadu_ps(qc + gi * h), f, acc[gi]);
        }
      }
    }
    for (int gi = 0; gi < G; ++gi) lg[gi * gs + j] = Capped(p, pallax_cpu::HSum(acc[gi]) + cz[gi]);
  }
}

// The granule's value rows weighted by w [G', gs] (0 where not visible): each 8-channel
// block of acc [G', H] is held in registers across the rows; ws [gs, G', H/G] is scratch.
template <int BITS, int G>
void ValuesGranule(const KiviProblem& p, int64_t bk, int64_t r, const int32_t* vis,
                   const float* w, Partials& part, float* ws) {
  constexpr int64_t kPer = 8 / BITS;
  const int64_t h = p.h, gs = p.gs, vg = h / gs, hp = h / kPer;
  for (int64_t j = 0; j < gs; ++j) {
    if (vis[r + j] < 0) continue;
    const int64_t t = bk * p.s + r + j;
    for (int64_t c = 0; c < vg; ++c) {
      const float sc = ScaleAt(p, p.vs, t * vg + c), zr = ScaleAt(p, p.vz, t * vg + c);
      for (int gi = 0; gi < G; ++gi) {
        const float wi = w[gi * gs + j];
        part.accz[gi * vg + c] += wi * zr;
        ws[(j * G + gi) * vg + c] = wi * sc;
      }
    }
  }
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  for (int64_t jb = 0; jb < hp; jb += 8) {
    __m256 acc[kPer][G];
    int64_t grp[kPer];
    for (int64_t m = 0; m < kPer; ++m) {
      grp[m] = (m * hp + jb) / gs;
      for (int gi = 0; gi < G; ++gi) acc[m][gi] = _mm256_loadu_ps(part.acc.data() + gi * h + m * hp + jb);
    }
    for (int64_t j = 0; j < gs; ++j) {
      if (vis[r + j] < 0) continue;
      const __m256i x = Bytes8(p.vd + (bk * p.s + r + j) * hp, jb);
      const float* wj = ws + j * G * vg;
      for (int64_t m = 0; m < kPer; ++m) {
        const __m256 f = Levels8(x, m, BITS, mask);
        for (int gi = 0; gi < G; ++gi) {
          acc[m][gi] = _mm256_fmadd_ps(_mm256_set1_ps(wj[gi * vg + grp[m]]), f, acc[m][gi]);
        }
      }
    }
    for (int64_t m = 0; m < kPer; ++m) {
      for (int gi = 0; gi < G; ++gi) _mm256_storeu_ps(part.acc.data() + gi * h + m * hp + jb, acc[m][gi]);
    }
  }
}

template <int BITS>
GranuleFns GranuleFnsFor(int64_t g) {
  switch (g) {
    case 1: return {&KeysGranule<BITS, 1>, &ValuesGranule<BITS, 1>};
    case 2: return {&KeysGranule<BITS, 2>, &ValuesGranule<BITS, 2>};
    case 3: return {&KeysGranule<BITS, 3>, &ValuesGranule<BITS, 3>};
    case 4: return {&KeysGranule<BITS, 4>, &ValuesGranule<BITS, 4>};
    case 5: return {&KeysGranule<BITS, 5>, &ValuesGranule<BITS, 5>};
    case 6: return {&KeysGranule<BITS, 6>, &ValuesGranule<BITS, 6>};
    case 7: return {&KeysGranule<BITS, 7>, &ValuesGranule<BITS, 7>};
    case 8: return {&KeysGranule<BITS, 8>, &ValuesGranule<BITS, 8>};
    default: return {};
  }
}
#endif

// The compiled granule functions for p's bits and G' (up to 8 query heads per KV head on
// the vector path), or none: then the row-by-row path runs.
GranuleFns SelectGranuleFns(const KiviProblem& p) {
#if defined(__AVX2__) && defined(__FMA__)
  if (!Vectorized(p)) return {};
  switch (p.bits) {
    case 2: return GranuleFnsFor<2>(p.g);
    case 4: return GranuleFnsFor<4>(p.g);
    case 8: return GranuleFnsFor<8>(p.g);
    default: return {};
  }
#else
  (void)p;
  return {};
#endif
}

// Rows [r0, r1) (whole granules) of (b, kvh); qs [G', H] the scaled queries.
void AttendRows(const KiviProblem& p, const GranuleFns& fns, int64_t b, int64_t kvh, int64_t r0,
                int64_t r1, const float* qs, Partials& part) {
  const int64_t h = p.h, g = p.g, gs = p.gs, hb = h * p.bits / 8, vg = h / gs;
  const int64_t bk = b * p.kv + kvh;
  const int32_t* vis = p.rpos + (b * p.rheads + (p.rheads == 1 ? 0 : kvh)) * p.s;
  std::vector<float> ksc(h), kzr(h), qk(g * h), cz(g), vsc(vg), vzr(vg), tmp(h), lg(g * gs);
  std::vector<float> ws(fns.values != nullptr ? gs * g * vg : 0);
  for (int64_t r = r0; r < r1; r += gs) {
    bool any = false;
    for (int64_t j = r; j < r + gs; ++j) any |= vis[j] >= 0;
    if (!any) continue;
    const int64_t gr = bk * (p.s / gs) + r / gs;  // the granule's scale row
    for (int64_t i = 0; i < h; ++i) {
      ksc[i] = ScaleAt(p, p.ks, gr * h + i);
      kzr[i] = ScaleAt(p, p.kz, gr * h + i);
    }
    for (int64_t gi = 0; gi < g; ++gi) {
      for (int64_t i = 0; i < h; ++i) qk[gi * h + i] = qs[gi * h + i] * ksc[i];
      cz[gi] = Dot(qs + gi * h, kzr.data(), h);
    }
    if (fns.keys != nullptr) {
      fns.keys(p, bk, r, vis, qk.data(), cz.data(), lg.data());
    } else {
      for (int64_t j = 0; j < gs; ++j) {
        if (vis[r + j] < 0) {
          for (int64_t gi = 0; gi < g; ++gi) lg[gi * gs + j] = kNone;
        } else {
          KeyLogits(p, p.kd + (bk * p.s + r + j) * hb, qk.data(), cz.data(), lg.data() + j, gs,
                    tmp.data());
        }
      }
    }
    if (p.lg_rows != nullptr) {
      for (int64_t gi = 0; gi < g; ++gi) {
        std::memcpy(p.lg_rows + ((bk * g + gi) * p.s + r), lg.data() + gi * gs, gs * sizeof(float));
      }
    }
    Softmax(part, lg.data(), gs, gs, g, h);
    if (fns.values != nullptr) {
      fns.values(p, bk, r, vis, lg.data(), part, ws.data());
      continue;
    }
    for (int64_t j = 0; j < gs; ++j) {
      if (vis[r + j] < 0) continue;
      const int64_t t = bk * p.s + r + j;
      for (int64_t c = 0; c < vg; ++c) {
        vsc[c] = ScaleAt(p, p.vs, t * vg + c);
        vzr[c] = ScaleAt(p, p.vz, t * vg + c);
      }
      ValueAccumulate(p, p.vd + t * hb, vsc.data(), vzr.data(), lg.data() + j, gs, part,
                      tmp.data());
    }
  }
  // The zero points' share: every channel of a group gets its group's sum.
  for (int64_t gi = 0; gi < g; ++gi) {
    for (int64_t i = 0; i < h; ++i) part.acc[gi * h + i] += part.accz[gi * vg + i / gs];
    std::fill(part.accz.begin() + gi * vg, part.accz.begin() + (gi + 1) * vg, 0.0f);
  }
}

// The full-precision candidates of (b, kvh), stored as T (float, or uint16_t: bfloat16).
template <typename T>
void AttendCandidates(const KiviProblem& p, int64_t b, int64_t kvh, const float* qs,
                      Partials& part) {
  const int64_t h = p.h, g = p.g, c = p.c, bk = b * p.kv + kvh;
  if (c == 0) return;
  const int32_t* vis = p.cpos + (b * p.cheads + (p.cheads == 1 ? 0 : kvh)) * c;
  const T* keys = static_cast<const T*>(p.ck) + bk * c * h;
  const T* vals = static_cast<const T*>(p.cv) + bk * c * h;
  std::vector<float> lg(g * c);
  for (int64_t j = 0; j < c; ++j) {
    for (int64_t gi = 0; gi < g; ++gi) {
      lg[gi * c + j] = vis[j] < 0 ? kNone : Capped(p, Dot(qs + gi * h, keys + j * h, h));
    }
  }
  if (p.lg_cand != nullptr) std::memcpy(p.lg_cand + bk * g * c, lg.data(), g * c * sizeof(float));
  if (!Softmax(part, lg.data(), c, c, g, h)) return;
  for (int64_t j = 0; j < c; ++j) {
    if (vis[j] < 0) continue;
    for (int64_t gi = 0; gi < g; ++gi) Axpy(lg[gi * c + j], vals + j * h, part.acc.data() + gi * h, h);
  }
}

// The attention mass of each key of (b, kvh) from the stored logits and the merged
// max / sum per query head.
void Mass(const KiviProblem& p, int64_t bk, const float* top, const float* total) {
  for (int64_t which = 0; which < 2; ++which) {
    const int64_t len = which == 0 ? p.s : p.c;
    if (len == 0) continue;
    float* mass = (which == 0 ? p.mass_rows : p.mass_cand) + bk * len;
    const float* lg = (which == 0 ? p.lg_rows : p.lg_cand) + bk * p.g * len;
    std::fill(mass, mass + len, 0.0f);
    for (int64_t gi = 0; gi < p.g; ++gi) {
      if (top[gi] == kNone) continue;
      const float inv = 1.0f / total[gi];
      for (int64_t j = 0; j < len; ++j) {
        const float l = lg[gi * len + j];
        if (l != kNone) mass[j] += std::exp(l - top[gi]) * inv;
      }
    }
  }
}

void Run(const KiviProblem& p) {
  const int64_t chunk = ((kChunkRows + p.gs - 1) / p.gs) * p.gs;
  const int64_t row_chunks = (p.s + chunk - 1) / chunk;
  const int64_t per_pair = row_chunks + 1;  // + the candidates
  const int64_t pairs = p.b * p.kv, tasks = pairs * per_pair, g = p.g, h = p.h;
  const GranuleFns fns = SelectGranuleFns(p);
  if (p.lg_rows != nullptr) {
    std::fill(p.lg_rows, p.lg_rows + pairs * g * p.s, kNone);
  }
  std::vector<float> qs(p.b * p.n * h);
  for (int64_t i = 0; i < p.b * p.n * h; ++i) qs[i] = p.q[i] * p.scale;
  std::vector<float> maxes(tasks * g), sums(tasks * g), acc(tasks * g * h);
  const int64_t threads = pallax_cpu::ThreadsFor(pairs * (p.s + p.c) * (g + 2) * h);
  pallax_cpu::ParallelForSpin(threads, tasks, [&](int64_t t) {
    const int64_t pair = t / per_pair, part_i = t % per_pair;
    const int64_t b = pair / p.kv, kvh = pair % p.kv;
    const float* qg = qs.data() + (b * p.n + kvh * g) * h;
    Partials part(g, h, h / p.gs);
    if (part_i < row_chunks) {
      const int64_t r0 = part_i * chunk;
      AttendRows(p, fns, b, kvh, r0, std::min(p.s, r0 + chunk), qg, part);
    } else {
      if (p.bf16_cand) {
        AttendCandidates<uint16_t>(p, b, kvh, qg, part);
      } else {
        AttendCandidates<float>(p, b, kvh, qg, part);
      }
    }
    std::copy(part.max.begin(), part.max.end(), maxes.begin() + t * g);
    std::copy(part.sum.begin(), part.sum.end(), sums.begin() + t * g);
    std::copy(part.acc.begin(), part.acc.end(), acc.begin() + t * g * h);
  });
  // Merge the chunks of each (row, KV head) in order.
  std::vector<float> top(g), total(g);
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t b = pair / p.kv, kvh = pair % p.kv, t0 = pair * per_pair;
    for (int64_t gi = 0; gi < g; ++gi) {
      float* o = p.out + (b * p.n + kvh * g + gi) * h;
      std::fill(o, o + h, 0.0f);
      top[gi] = kNone;
      total[gi] = 0.0f;
      for (int64_t t = t0; t < t0 + per_pair; ++t) top[gi] = std::max(top[gi], maxes[t * g + gi]);
      if (top[gi] == kNone) continue;  // no key: zeros
      for (int64_t t = t0; t < t0 + per_pair; ++t) {
        const float m = maxes[t * g + gi];
        if (m == kNone) continue;
        const float w = std::exp(m - top[gi]);
        total[gi] += w * sums[t * g + gi];
        Axpy(w, acc.data() + (t * g + gi) * h, o, h);
      }
      const float inv = 1.0f / total[gi];
      for (int64_t i = 0; i < h; ++i) o[i] *= inv;
    }
    if (p.mass_rows != nullptr) Mass(p, pair, top.data(), total.data());
  }
}

std::string Dims(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

bool Is(ffi::Span<const int64_t> d, std::initializer_list<int64_t> want) {
  return d.size() == want.size() && std::equal(d.begin(), d.end(), want.begin());
}

ffi::Error KiviAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::U8> kd, ffi::AnyBuffer ks,
                         ffi::AnyBuffer kz, ffi::Buffer<ffi::U8> vd, ffi::AnyBuffer vs,
                         ffi::AnyBuffer vz, ffi::Buffer<ffi::S32> rpos,
                         ffi::AnyBuffer ck, ffi::AnyBuffer cv,
                         ffi::Buffer<ffi::S32> cpos, ffi::ResultBuffer<ffi::F32> out,
                         ffi::ResultBuffer<ffi::F32> mass_rows,
                         ffi::ResultBuffer<ffi::F32> mass_cand, ffi::Result<ffi::AnyBuffer> kd_o,
                         ffi::Result<ffi::AnyBuffer> ks_o, ffi::Result<ffi::AnyBuffer> kz_o,
                         ffi::Result<ffi::AnyBuffer> vd_o, ffi::Result<ffi::AnyBuffer> vs_o,
                         ffi::Result<ffi::AnyBuffer> vz_o, int64_t bits, int64_t group_size,
                         float scale, float softcap) {
  const auto qd = q.dimensions(), kdd = kd.dimensions(), ckd = ck.dimensions();
  const auto bad = [&](const std::string& what) {
    return ffi::Error::InvalidArgument("pallax_kivi_attention: " + what + " (q " + Dims(qd) +
                                       ", k.data " + Dims(kdd) + ", candidates " + Dims(ckd) +
                                       ")");
  };
  if (bits != 2 && bits != 4 && bits != 8) return bad("bits must be 2, 4 or 8");
  if (qd.size() != 3 || kdd.size() != 4 || ckd.size() != 4) return bad("ranks disagree");
  KiviProblem p;
  p.b = qd[0];
  p.n = qd[1];
  p.h = qd[2];
  p.kv = kdd[1];
  p.s = kdd[2];
  p.bits = bits;
  p.gs = group_size;
  p.c = ckd[2];
  const int64_t hb = p.h * bits / 8;
  if (p.kv <= 0 || p.n % p.kv || p.gs <= 0 || p.h % p.gs || p.s % p.gs || (p.h * bits) % 8 ||
      (p.h / (8 / bits)) * (8 / bits) != p.h) {
    return bad("heads, head dim, rows and group size do not fit");
  }
  p.g = p.n / p.kv;
  const int64_t B = p.b, K = p.kv, S = p.s, H = p.h, G = p.gs, C = p.c;
  if (!Is(kdd, {B, K, S, hb}) || !Is(vd.dimensions(), {B, K, S, hb}) ||
      !Is(ks.dimensions(), {B, K, S / G, H}) || !Is(kz.dimensions(), {B, K, S / G, H}) ||
      !Is(vs.dimensions(), {B, K, S, H / G}) || !Is(vz.dimensions(), {B, K, S, H / G}) ||
      !Is(ckd, {B, K, C, H}) || !Is(cv.dimensions(), {B, K, C, H})) {
    return bad("the cache parts' shapes disagree");
  }
  const auto rd = rpos.dimensions(), cd = cpos.dimensions();
  if (rd.size() != 3 || rd[0] != B || (rd[1] != 1 && rd[1] != K) || rd[2] != S || cd.size() != 3 ||
      cd[0] != B || (cd[1] != 1 && cd[1] != K) || cd[2] != C) {
    return bad("rpos must be [B, 1 or K, S] and cpos [B, 1 or K, C]");
  }
  const auto st = ks.element_type();
  if ((st != ffi::DataType::F32 && st != ffi::DataType::BF16) || kz.element_type() != st ||
      vs.element_type() != st || vz.element_type() != st) {
    return bad("scales and zeros must all be f32 or all bf16");
  }
  const auto ct = ck.element_type();
  if ((ct != ffi::DataType::F32 && ct != ffi::DataType::BF16) || cv.element_type() != ct) {
    return bad("candidates must both be f32 or both bf16");
  }
  if (!Is(out->dimensions(), {B, p.n, H})) return bad("out must be [B, N, H]");
  const bool want_mass = mass_rows->dimensions().size() == 3;  // else the [0] placeholders
  if (want_mass ? !Is(mass_rows->dimensions(), {B, K, S}) || !Is(mass_cand->dimensions(), {B, K, C})
                : mass_rows->element_count() != 0 || mass_cand->element_count() != 0) {
    return bad("mass results must be [B, K, S] and [B, K, C], or both [0]");
  }
  p.rheads = rd[1];
  p.cheads = cd[1];
  p.bf16_scales = st == ffi::DataType::BF16;
  p.scale = scale;
  p.softcap = softcap;
  p.q = q.typed_data();
  p.kd = kd.typed_data();
  p.ks = ks.untyped_data();
  p.kz = kz.untyped_data();
  p.vd = vd.typed_data();
  p.vs = vs.untyped_data();
  p.vz = vz.untyped_data();
  p.rpos = rpos.typed_data();
  p.ck = ck.untyped_data();
  p.cv = cv.untyped_data();
  p.bf16_cand = ct == ffi::DataType::BF16;
  p.cpos = cpos.typed_data();
  p.out = out->typed_data();
  std::vector<float> lg_rows, lg_cand;
  if (want_mass) {
    p.mass_rows = mass_rows->typed_data();
    p.mass_cand = mass_cand->typed_data();
    lg_rows.resize(B * K * p.g * S);
    lg_cand.assign(B * K * p.g * C, kNone);
    p.lg_rows = lg_rows.data();
    p.lg_cand = lg_cand.data();
  }
  // The packed rows come back unchanged as results 3..8, aliased to their arguments (the
  // caller's input_output_aliases: no copy); were XLA to give them buffers of their own,
  // they are copied.
  const void* ins[] = {kd.untyped_data(), ks.untyped_data(), kz.untyped_data(),
                       vd.untyped_data(), vs.untyped_data(), vz.untyped_data()};
  const size_t in_bytes[] = {kd.size_bytes(), ks.size_bytes(), kz.size_bytes(),
                             vd.size_bytes(), vs.size_bytes(), vz.size_bytes()};
  ffi::Result<ffi::AnyBuffer>* outs[] = {&kd_o, &ks_o, &kz_o, &vd_o, &vs_o, &vz_o};
  for (int i = 0; i < 6; ++i) {
    if ((*outs[i])->size_bytes() != in_bytes[i]) return bad("a passed-through array resized");
  }
  for (int i = 0; i < 6; ++i) {
    if ((*outs[i])->untyped_data() != ins[i]) {
      std::memcpy((*outs[i])->untyped_data(), ins[i], in_bytes[i]);
    }
  }
  if (B == 0 || p.n == 0 || H == 0) return ffi::Error::Success();
  Run(p);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PallaxKiviAttention, KiviAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, N, H]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // k.data [B, K, S, H*b/8]
                                  .Arg<ffi::AnyBuffer>()         // k.scale [B, K, S/G, H]
                                  .Arg<ffi::AnyBuffer>()         // k.zero
                                  .Arg<ffi::Buffer<ffi::U8>>()   // v.data [B, K, S, H*b/8]
                                  .Arg<ffi::AnyBuffer>()         // v.scale [B, K, S, H/G]
                                  .Arg<ffi::AnyBuffer>()         // v.zero
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rpos [B, 1 or K, S]
                                  .Arg<ffi::AnyBuffer>()         // ck [B, K, C, H] f32 | bf16
                                  .Arg<ffi::AnyBuffer>()         // cv [B, K, C, H] likewise
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cpos [B, 1 or K, C]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, N, H]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mass_rows [B, K, S] or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mass_cand [B, K, C] or [0]
                                  .Ret<ffi::AnyBuffer>()  // k.data, passed through
                                  .Ret<ffi::AnyBuffer>()  // k.scale
                                  .Ret<ffi::AnyBuffer>()  // k.zero
                                  .Ret<ffi::AnyBuffer>()  // v.data
                                  .Ret<ffi::AnyBuffer>()  // v.scale
                                  .Ret<ffi::AnyBuffer>()  // v.zero
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size")
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap"));
