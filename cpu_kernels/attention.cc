// Single-token (decode) attention for XLA:CPU through the FFI, with the KV write in place.
//
//   out [B, N, H] = attention of q [B, N, H] at position pos[b] over the cache after
//                   writing k, v [B, K, H] into slot pos[b] of k_cache, v_cache [B, K, S, H]
//
// The caches are float32 or bfloat16 and are aliased to the call's second and third
// results (input_output_aliases), so the write happens in the buffer the decode loop
// carries. This is why the kernel exists: in XLA the write and the dots over the written
// cache make XLA:CPU copy every cache array several times a step to keep the loop's
// buffers (ir/primitives/attention.decode_attention_split), a cost that grows with the context.
//
// The semantics are primitives.attention_reference's for T = 1: the new k, v are rounded
// to the cache dtype and written at slot min(pos, S - 1); query b sees slots
// max(0, pos - window + 1) .. min(pos, S - 1), all of them when there is no window; an
// optional softcap c maps a logit l to c * tanh(l / c).
//
// Per (row b, KV head) the G = N / K query heads of the group share each key and value
// row read: logits for a block of keys, then an online softmax (running max, rescaled
// sums) over the blocks, accumulated in float32. Key ranges are cut into chunks of 512
// (FlashDecoding's split-K) that the threads share (parallel.h), and the chunks'
// partial results are merged in order at the end.

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

constexpr int64_t kKeyBlock = 64;        // keys whose logits are held at once
constexpr int64_t kChunkKeys = 512;      // keys per task (FlashDecoding's split)

struct AttnProblem {
  int64_t b = 0, n = 0, kv = 0, s = 0, h = 0, g = 0;
  int64_t window = 0;  // 0: none
  float scale = 1.0f, softcap = 0.0f;  // softcap 0: none
  const float* q = nullptr;   // [B, N, H]
  const float* k = nullptr;   // [B, K, H]
  const float* v = nullptr;   // [B, K, H]
  void* kc = nullptr;         // [B, K, S, H]
  void* vc = nullptr;
  const int32_t* pos = nullptr;
  float* out = nullptr;       // [B, N, H]
};

// ----------------------------------------------------------------- element types
using pallax_cpu::Widen;

// float32 -> bfloat16, rounding to nearest even (as XLA's convert); NaN stays NaN.
inline uint16_t Narrow(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline void Store(float* p, int64_t i, float x) { p[i] = x; }
inline void Store(uint16_t* p, int64_t i, float x) { p[i] = Narrow(x); }

#if defined(__AVX2__) && defined(__FMA__)
using pallax_cpu::Exp8;
using pallax_cpu::HSum;
#endif

// ------------------------------------------------------------------ the partials
// Softmax state of one query head over a key range: running max, sum of e^(l - max)
// and the e^(l - max)-weighted sum of values [H].
struct Partial {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.0f;
  float* acc = nullptr;  // [H]
};

inline float Capped(const AttnProblem& p, float logit) {
  return p.softcap > 0.0f ? p.softcap * std::tanh(logit / p.softcap) : logit;
}

// Query heads [g0, g0 + G) of row b (scaled by `scale`, in qs [G, H]) over keys
// [j0, j1) of KV head kvh: updates parts[0..G).
template <typename T>
void AttendRange(const AttnProblem& p, int64_t b, int64_t kvh, int64_t j0, int64_t j1,
                 const float* qs, Partial* parts) {
  const int64_t h = p.h, g = p.g;
  const T* kc = static_cast<const T*>(p.kc) + ((b * p.kv + kvh) * p.s) * h;
  const T* vc = static_cast<const T*>(p.vc) + ((b * p.kv + kvh) * p.s) * h;
  float stack[16 * kKeyBlock];
  std::vector<float> heap;
  if (g > 16) heap.resize(g * kKeyBlock);
  float* logits = g > 16 ? heap.data() : stack;  // [G, block]
  for (int64_t jb = j0; jb < j1; jb += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, j1 - jb);
    // Logits of the block.
    for (int64_t jj = 0; jj < nb; ++jj) {
      const T* krow = kc + (jb + jj) * h;
      for (int64_t gi = 0; gi < g; ++gi) {
        logits[gi * kKeyBlock + jj] = Capped(p, pallax_cpu::Dot(qs + gi * h, krow, h));
      }
    }
    // Online softmax: rescale the running sums to the new max, add the block.
    for (int64_t gi = 0; gi < g; ++gi) {
      float* lg = logits + gi * kKeyBlock;
      Partial& part = parts[gi];
      float top = part.max;
      for (int64_t jj = 0; jj < nb; ++jj) top = std::max(top, lg[jj]);
      const float rescale = std::exp(part.max - top);  // 0 on the first block
      part.max = top;
      int64_t jj = 0;
      float block_sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
      __m256 bs = _mm256_setzero_ps();
      const __m256 t8 = _mm256_set1_ps(top);
      for (; jj + 8 <= nb; jj += 8) {
        const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(lg + jj), t8));
        _mm256_storeu_ps(lg + jj, e);
        bs = _mm256_add_ps(bs, e);
      }
      block_sum = HSum(bs);
#endif
      for (; jj < nb; ++jj) {
        lg[jj] = std::exp(lg[jj] - top);
        block_sum += lg[jj];
      }
      part.sum = part.sum * rescale + block_sum;
      for (int64_t i = 0; i < h; ++i) part.acc[i] *= rescale;
    }
    // Values: acc[g] += sum_j e_j * v_j.
    for (int64_t jj = 0; jj < nb; ++jj) {
      const T* vrow = vc + (jb + jj) * h;
      for (int64_t gi = 0; gi < g; ++gi) {
        pallax_cpu::Axpy(logits[gi * kKeyBlock + jj], vrow, parts[gi].acc, h);
      }
    }
  }
}

// The keys query row b sees: [lo, hi] (hi < lo: none).
inline void KeyRange(const AttnProblem& p, int64_t b, int64_t* lo, int64_t* hi) {
  const int64_t pos = p.pos[b];
  *hi = std::min<int64_t>(pos, p.s - 1);
  *lo = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
}

template <typename T>
void WriteToken(const AttnProblem& p, int64_t b) {
  const int64_t slot = std::min<int64_t>(std::max<int64_t>(p.pos[b], 0), p.s - 1);
  for (int64_t kvh = 0; kvh < p.kv; ++kvh) {
    const int64_t at = ((b * p.kv + kvh) * p.s + slot) * p.h;
    const float* kn = p.k + (b * p.kv + kvh) * p.h;
    const float* vn = p.v + (b * p.kv + kvh) * p.h;
    for (int64_t i = 0; i < p.h; ++i) {
      Store(static_cast<T*>(p.kc), at + i, kn[i]);
      Store(static_cast<T*>(p.vc), at + i, vn[i]);
    }
  }
}

template <typename T>
void Run(const AttnProblem& p) {
  for (int64_t b = 0; b < p.b; ++b) WriteToken<T>(p, b);
  // Tasks: (row, KV head, chunk of kChunkKeys keys). The chunks depend on the row's own
  // key range only, so a row's output is the same whatever the thread count and
  // whatever other rows share the batch.
  const int64_t pairs = p.b * p.kv;
  std::vector<int64_t> first(pairs + 1, 0);  // first task of each (row, head)
  int64_t keys = 0;
  for (int64_t pair = 0; pair < pairs; ++pair) {
    int64_t lo, hi;
    KeyRange(p, pair / p.kv, &lo, &hi);
    const int64_t len = std::max<int64_t>(0, hi - lo + 1);
    keys += len;
    first[pair + 1] = first[pair] + std::max<int64_t>(1, (len + kChunkKeys - 1) / kChunkKeys);
  }
  const int64_t tasks = first[pairs];
  const int64_t threads = pallax_cpu::ThreadsFor(keys * p.g * p.h * 2);
  const int64_t hg = p.g * p.h;
  // Per task: G partials (max, sum, acc [H]); the scaled queries [B, N, H].
  std::vector<float> acc(tasks * hg, 0.0f), qs(p.b * p.n * p.h);
  std::vector<float> maxes(tasks * p.g), sums(tasks * p.g);
  for (int64_t i = 0; i < p.b * p.n * p.h; ++i) qs[i] = p.q[i] * p.scale;
  pallax_cpu::ParallelForSpin(threads, tasks, [&](int64_t t) {
    const int64_t pair = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
    const int64_t b = pair / p.kv, kvh = pair % p.kv, chunk = t - first[pair];
    int64_t lo, hi;
    KeyRange(p, b, &lo, &hi);
    const int64_t j0 = lo + chunk * kChunkKeys, j1 = std::min(hi + 1, j0 + kChunkKeys);
    Partial parts[64];
    std::vector<Partial> many;
    Partial* pp = parts;
    if (p.g > 64) {
      many.resize(p.g);
      pp = many.data();
    }
    for (int64_t gi = 0; gi < p.g; ++gi) pp[gi].acc = acc.data() + t * hg + gi * p.h;
    if (j0 < j1) {
      AttendRange<T>(p, b, kvh, j0, j1, qs.data() + (b * p.n + kvh * p.g) * p.h, pp);
    }
    for (int64_t gi = 0; gi < p.g; ++gi) {
      maxes[t * p.g + gi] = pp[gi].max;
      sums[t * p.g + gi] = pp[gi].sum;
    }
  });
  // Merge the chunks of each (row, head), in order:
  // out = sum_c e^(m_c - m) acc_c / sum_c e^(m_c - m) l_c.
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t b = pair / p.kv, kvh = pair % p.kv;
    for (int64_t gi = 0; gi < p.g; ++gi) {
      float* o = p.out + (b * p.n + kvh * p.g + gi) * p.h;
      float top = kNone;
      for (int64_t t = first[pair]; t < first[pair + 1]; ++t) top = std::max(top, maxes[t * p.g + gi]);
      std::fill(o, o + p.h, 0.0f);
      if (top == kNone) continue;  // no key: zeros
      float total = 0.0f;
      for (int64_t t = first[pair]; t < first[pair + 1]; ++t) {
        const float m = maxes[t * p.g + gi];
        if (m == kNone) continue;
        const float w = std::exp(m - top);
        total += w * sums[t * p.g + gi];
        const float* a = acc.data() + t * hg + gi * p.h;
        for (int64_t i = 0; i < p.h; ++i) o[i] += w * a[i];
      }
      const float inv = 1.0f / total;
      for (int64_t i = 0; i < p.h; ++i) o[i] *= inv;
    }
  }
}

ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::AnyBuffer k_cache,
                           ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> pos,
                           ffi::ResultBuffer<ffi::F32> out, ffi::Result<ffi::AnyBuffer> k_out,
                           ffi::Result<ffi::AnyBuffer> v_out, float scale, int64_t window,
                           float softcap) {
  const auto qd = q.dimensions(), kd = k.dimensions(), cd = k_cache.dimensions();
  const auto same = [](auto a, auto b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
  };
  if (qd.size() != 3 || kd.size() != 3 || cd.size() != 4 || !same(v.dimensions(), kd) ||
      !same(v_cache.dimensions(), cd) || pos.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument(
        "pallax_decode_attention: need q [B, N, H], k, v [B, K, H], caches [B, K, S, H], "
        "pos [B]");
  }
  AttnProblem p;
  p.b = qd[0];
  p.n = qd[1];
  p.h = qd[2];
  p.kv = kd[1];
  p.s = cd[2];
  if (kd[0] != p.b || kd[2] != p.h || cd[0] != p.b || cd[1] != p.kv || cd[3] != p.h ||
      pos.dimensions()[0] != p.b || p.kv == 0 || p.n % p.kv != 0 || p.s == 0) {
    return ffi::Error::InvalidArgument(
        "pallax_decode_attention: shapes disagree: q [" + std::to_string(p.b) + ", " +
        std::to_string(p.n) + ", " + std::to_string(p.h) + "], cache [" +
        std::to_string(cd[0]) + ", " + std::to_string(cd[1]) + ", " + std::to_string(cd[2]) +
        ", " + std::to_string(cd[3]) + "]");
  }
  const auto dt = k_cache.element_type();
  if ((dt != ffi::DataType::F32 && dt != ffi::DataType::BF16) || v_cache.element_type() != dt) {
    return ffi::Error::InvalidArgument("pallax_decode_attention: caches must be f32 or bf16");
  }
  p.g = p.n / p.kv;
  p.window = window;
  p.scale = scale;
  p.softcap = softcap;
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.pos = pos.typed_data();
  p.out = out->typed_data();
  p.kc = k_out->untyped_data();
  p.vc = v_out->untyped_data();
  // The caches are aliased to the results; should XLA ever pass separate buffers, the
  // results start as copies of the inputs.
  const size_t bytes = k_cache.size_bytes();
  if (p.kc != k_cache.untyped_data()) std::memcpy(p.kc, k_cache.untyped_data(), bytes);
  if (p.vc != v_cache.untyped_data()) std::memcpy(p.vc, v_cache.untyped_data(), bytes);
  if (p.b == 0 || p.n == 0 || p.h == 0) return ffi::Error::Success();
  if (dt == ffi::DataType::F32) {
    Run<float>(p);
  } else {
    Run<uint16_t>(p);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PallaxDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, N, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [B, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [B, K, H]
                                  .Arg<ffi::AnyBuffer>()         // k_cache [B, K, S, H]
                                  .Arg<ffi::AnyBuffer>()         // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pos [B]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, N, H]
                                  .Ret<ffi::AnyBuffer>()         // k_cache (aliased)
                                  .Ret<ffi::AnyBuffer>()         // v_cache (aliased)
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap"));
