// Single-token (decode) attention for XLA:CPU through the FFI, with the KV write in place.
//
//   out [B, N, H] = attention of q [B, N, H] at position pos[b] over the cache after
//                   writing k, v [B, K, H] into slot pos[b] of k_cache, v_cache [B, K, S, H]
//
// The caches are float32 or bfloat16 and are aliased to the call's second and third
// results (input_output_aliases), so the write happens in the buffer the decode loop
// carries. A second entry point takes the int8 KV format (ir/kvcache/int8.py): int8 rows
// with one float32 scale per row and head, the new token arriving already quantized (by
// the format's own `encode`, in XLA) and written only where valid[b] > 0, as the
// reference writes it. Its logits are scale_j * (q . k_j) and its value weights
// e_j * vscale_j: the products the reference forms in another order, so equal to it up to
// float rounding, and, as for the float caches, each row's result depends on that row
// alone (not on the batch, the cache length or the thread count). This is why the kernel exists: in XLA the write and the dots over the written
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
//
// The paged entries (pallax_paged_decode_attention[_int8], runtime/kv_pages.py) take the
// same problem over a pool of pages [P, K, page, H] (scales [P, K, page]) and a block
// table [B, n]: position j of row b is row j % page of page table[b, j / page], read and
// written where it lies. A row attends only positions in the pages its table holds (its
// leading entries in [0, P)); a token whose page it does not hold is not written.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
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
  const void* k = nullptr;    // [B, K, H]: float32, or int8 for the int8 caches
  const void* v = nullptr;
  void* kc = nullptr;         // [B, K, S, H]
  void* vc = nullptr;
  // The int8 caches' scales: of the new token [B, K] and of the rows [B, K, S].
  const float* k_new_scale = nullptr;
  const float* v_new_scale = nullptr;
  float* k_scale = nullptr;
  float* v_scale = nullptr;
  const int32_t* valid = nullptr;  // [B] (int8 caches): write the token where > 0
  const int32_t* pos = nullptr;
  float* out = nullptr;       // [B, N, H]
  // A paged cache: kc, vc (and the scales) are pools of `pages` pages of `page` rows,
  // table [B, per_row] their ids per row; s = per_row * page. nullptr: [B, K, S, H].
  const int32_t* table = nullptr;
  int64_t pages = 0, page = 0, per_row = 0;
};

// The cache row holding position j of (row b, KV head kvh), or -1 when b's table holds
// no page there: the row index into [B, K, S, (H)] or into the pool [P, K, page, (H)].
inline int64_t Row(const AttnProblem& p, int64_t b, int64_t kvh, int64_t j) {
  if (p.table == nullptr) return (b * p.kv + kvh) * p.s + j;
  const int64_t id = p.table[b * p.per_row + j / p.page];
  if (id < 0 || id >= p.pages) return -1;
  return (id * p.kv + kvh) * p.page + j % p.page;
}

// Positions [0, Held) of row b have their pages (all S without a table).
inline int64_t Held(const AttnProblem& p, int64_t b) {
  if (p.table == nullptr) return p.s;
  int64_t n = 0;
  while (n < p.per_row && p.table[b * p.per_row + n] >= 0 && p.table[b * p.per_row + n] < p.pages)
    ++n;
  return n * p.page;
}

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
  const T* kc = static_cast<const T*>(p.kc);
  const T* vc = static_cast<const T*>(p.vc);
  constexpr bool kInt8 = std::is_same_v<T, int8_t>;
  float stack[16 * kKeyBlock];
  std::vector<float> heap;
  if (g > 16) heap.resize(g * kKeyBlock);
  float* logits = g > 16 ? heap.data() : stack;  // [G, block]
  for (int64_t jb = j0; jb < j1; jb += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, j1 - jb);
    // Logits of the block.
    for (int64_t jj = 0; jj < nb; ++jj) {
      const int64_t row = Row(p, b, kvh, jb + jj);  // held: KeyRange stops at Held
      const T* krow = kc + row * h;
      for (int64_t gi = 0; gi < g; ++gi) {
        float logit = pallax_cpu::Dot(qs + gi * h, krow, h);
        if constexpr (kInt8) logit *= p.k_scale[row];
        logits[gi * kKeyBlock + jj] = Capped(p, logit);
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
      const int64_t row = Row(p, b, kvh, jb + jj);
      const T* vrow = vc + row * h;
      const float row_scale = kInt8 ? p.v_scale[row] : 1.0f;
      for (int64_t gi = 0; gi < g; ++gi) {
        const float e = logits[gi * kKeyBlock + jj];
        pallax_cpu::Axpy(kInt8 ? e * row_scale : e, vrow, parts[gi].acc, h);
      }
    }
  }
}

// The keys query row b sees: [lo, hi] (hi < lo: none). An int8 row whose token is not
// real (valid 0: not written) sees the slots before it, as in the reference. (Positions
// past the cache, pos >= S, never reach a kernel: the runtimes size the cache to the
// request. The float caches would overwrite slot S - 1; the int8 entry writes nothing
// and attends the S rows without the token.)
inline void KeyRange(const AttnProblem& p, int64_t b, int64_t* lo, int64_t* hi) {
  const int64_t pos = p.pos[b];
  const bool own = p.valid == nullptr || p.valid[b] > 0;
  *hi = std::min<int64_t>(own ? pos : pos - 1, std::min(p.s, Held(p, b)) - 1);
  *lo = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
}

template <typename T>
void WriteToken(const AttnProblem& p, int64_t b) {
  const int64_t slot = std::min<int64_t>(std::max<int64_t>(p.pos[b], 0), p.s - 1);
  for (int64_t kvh = 0; kvh < p.kv; ++kvh) {
    const int64_t row = Row(p, b, kvh, slot);
    if (row < 0) return;  // a page the row does not hold: dropped
    const int64_t at = row * p.h;
    const float* kn = static_cast<const float*>(p.k) + (b * p.kv + kvh) * p.h;
    const float* vn = static_cast<const float*>(p.v) + (b * p.kv + kvh) * p.h;
    for (int64_t i = 0; i < p.h; ++i) {
      Store(static_cast<T*>(p.kc), at + i, kn[i]);
      Store(static_cast<T*>(p.vc), at + i, vn[i]);
    }
  }
}

// The int8 caches: the quantized token and its scales, at slot pos[b] when valid[b] > 0
// and pos[b] is a slot (the reference's scatter drops the rest).
template <>
void WriteToken<int8_t>(const AttnProblem& p, int64_t b) {
  const int64_t slot = p.pos[b];
  if (p.valid[b] <= 0 || slot < 0 || slot >= p.s) return;
  for (int64_t kvh = 0; kvh < p.kv; ++kvh) {
    const int64_t row = Row(p, b, kvh, slot), token = b * p.kv + kvh;
    if (row < 0) return;
    std::memcpy(static_cast<int8_t*>(p.kc) + row * p.h,
                static_cast<const int8_t*>(p.k) + token * p.h, p.h);
    std::memcpy(static_cast<int8_t*>(p.vc) + row * p.h,
                static_cast<const int8_t*>(p.v) + token * p.h, p.h);
    p.k_scale[row] = p.k_new_scale[token];
    p.v_scale[row] = p.v_new_scale[token];
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

// Shapes: q [B, N, H], k, v [B, K, H], caches [B, K, S, H], pos [B] -> p's sizes, or an
// error naming the call.
template <typename Dims>
ffi::Error Sizes(const char* name, Dims qd, Dims kd, Dims vd, Dims kcd, Dims vcd, Dims posd,
                 AttnProblem* p) {
  const auto same = [](auto a, auto b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
  };
  if (qd.size() != 3 || kd.size() != 3 || kcd.size() != 4 || !same(vd, kd) ||
      !same(vcd, kcd) || posd.size() != 1) {
    return ffi::Error::InvalidArgument(
        std::string(name) + ": need q [B, N, H], k, v [B, K, H], caches [B, K, S, H], pos [B]");
  }
  p->b = qd[0];
  p->n = qd[1];
  p->h = qd[2];
  p->kv = kd[1];
  p->s = kcd[2];
  if (kd[0] != p->b || kd[2] != p->h || kcd[0] != p->b || kcd[1] != p->kv || kcd[3] != p->h ||
      posd[0] != p->b || p->kv == 0 || p->n % p->kv != 0 || p->s == 0) {
    return ffi::Error::InvalidArgument(
        std::string(name) + ": shapes disagree: q [" + std::to_string(p->b) + ", " +
        std::to_string(p->n) + ", " + std::to_string(p->h) + "], cache [" +
        std::to_string(kcd[0]) + ", " + std::to_string(kcd[1]) + ", " +
        std::to_string(kcd[2]) + ", " + std::to_string(kcd[3]) + "]");
  }
  p->g = p->n / p->kv;
  return ffi::Error::Success();
}

// The caches are aliased to the results; should XLA ever pass separate buffers, the
// results start as copies of the inputs.
inline void Adopt(ffi::AnyBuffer in, void* out) {
  if (out != in.untyped_data()) std::memcpy(out, in.untyped_data(), in.size_bytes());
}

// Pools [P, K, page, H] and a block table [B, n] (q [B, N, H], k, v [B, K, H], pos [B])
// -> p's sizes and paging fields (S = n * page), or an error naming the call.
template <typename Dims>
ffi::Error PagedSizes(const char* name, Dims qd, Dims kd, Dims vd, Dims kpd, Dims vpd, Dims td,
                      Dims posd, AttnProblem* p) {
  const auto same = [](auto a, auto b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
  };
  if (qd.size() != 3 || kd.size() != 3 || kpd.size() != 4 || !same(vd, kd) ||
      !same(vpd, kpd) || td.size() != 2 || posd.size() != 1) {
    return ffi::Error::InvalidArgument(std::string(name) +
        ": need q [B, N, H], k, v [B, K, H], pools [P, K, page, H], table [B, n], pos [B]");
  }
  p->b = qd[0];
  p->n = qd[1];
  p->h = qd[2];
  p->kv = kd[1];
  p->pages = kpd[0];
  p->page = kpd[2];
  p->per_row = td[1];
  p->s = p->per_row * p->page;
  if (kd[0] != p->b || kd[2] != p->h || kpd[1] != p->kv || kpd[3] != p->h || td[0] != p->b ||
      posd[0] != p->b || p->kv == 0 || p->n % p->kv != 0 || p->s == 0) {
    return ffi::Error::InvalidArgument(std::string(name) + ": shapes disagree: q [" +
        std::to_string(p->b) + ", " + std::to_string(p->n) + ", " + std::to_string(p->h) +
        "], pool [" + std::to_string(kpd[0]) + ", " + std::to_string(kpd[1]) + ", " +
        std::to_string(kpd[2]) + ", " + std::to_string(kpd[3]) + "], table [" +
        std::to_string(td[0]) + ", " + std::to_string(td[1]) + "]");
  }
  p->g = p->n / p->kv;
  return ffi::Error::Success();
}

// The float caches' call once p's sizes are known (slot caches or pools).
ffi::Error FloatCall(const char* name, AttnProblem& p, ffi::Buffer<ffi::F32> q,
                     ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::AnyBuffer k_cache,
                     ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> pos,
                     ffi::ResultBuffer<ffi::F32> out, ffi::Result<ffi::AnyBuffer> k_out,
                     ffi::Result<ffi::AnyBuffer> v_out, float scale, int64_t window,
                     float softcap) {
  const auto dt = k_cache.element_type();
  if ((dt != ffi::DataType::F32 && dt != ffi::DataType::BF16) || v_cache.element_type() != dt) {
    return ffi::Error::InvalidArgument(std::string(name) + ": caches must be f32 or bf16");
  }
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
  Adopt(k_cache, p.kc);
  Adopt(v_cache, p.vc);
  if (p.b == 0 || p.n == 0 || p.h == 0) return ffi::Error::Success();
  if (dt == ffi::DataType::F32) {
    Run<float>(p);
  } else {
    Run<uint16_t>(p);
  }
  return ffi::Error::Success();
}

ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::AnyBuffer k_cache,
                           ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> pos,
                           ffi::ResultBuffer<ffi::F32> out, ffi::Result<ffi::AnyBuffer> k_out,
                           ffi::Result<ffi::AnyBuffer> v_out, float scale, int64_t window,
                           float softcap) {
  constexpr const char* kName = "pallax_decode_attention";
  AttnProblem p;
  ffi::Error err = Sizes(kName, q.dimensions(), k.dimensions(), v.dimensions(),
                         k_cache.dimensions(), v_cache.dimensions(), pos.dimensions(), &p);
  if (err.failure()) return err;
  return FloatCall(kName, p, q, k, v, k_cache, v_cache, pos, out, k_out, v_out, scale, window,
                   softcap);
}

ffi::Error PagedDecodeAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v, ffi::AnyBuffer k_pool,
                                ffi::AnyBuffer v_pool, ffi::Buffer<ffi::S32> table,
                                ffi::Buffer<ffi::S32> pos, ffi::ResultBuffer<ffi::F32> out,
                                ffi::Result<ffi::AnyBuffer> k_out,
                                ffi::Result<ffi::AnyBuffer> v_out, float scale, int64_t window,
                                float softcap) {
  constexpr const char* kName = "pallax_paged_decode_attention";
  AttnProblem p;
  ffi::Error err = PagedSizes(kName, q.dimensions(), k.dimensions(), v.dimensions(),
                              k_pool.dimensions(), v_pool.dimensions(), table.dimensions(),
                              pos.dimensions(), &p);
  if (err.failure()) return err;
  p.table = table.typed_data();
  return FloatCall(kName, p, q, k, v, k_pool, v_pool, pos, out, k_out, v_out, scale, window,
                   softcap);
}

// The int8 caches' call once p's sizes are known (slot caches or pools).
ffi::Error Int8Call(
    const char* kName, AttnProblem& p, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S8> k,
    ffi::Buffer<ffi::F32> k_new_scale, ffi::Buffer<ffi::S8> v, ffi::Buffer<ffi::F32> v_new_scale,
    ffi::AnyBuffer k_data, ffi::AnyBuffer k_scale, ffi::AnyBuffer v_data, ffi::AnyBuffer v_scale,
    ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> valid, ffi::ResultBuffer<ffi::F32> out,
    ffi::Result<ffi::AnyBuffer> k_data_out, ffi::Result<ffi::AnyBuffer> k_scale_out,
    ffi::Result<ffi::AnyBuffer> v_data_out, ffi::Result<ffi::AnyBuffer> v_scale_out,
    float scale, int64_t window, float softcap) {
  const bool paged = p.table != nullptr;
  const auto rows = [&](auto d, int64_t rank) {  // [B, K, S] ([P, K, page]) or [B, K]
    if (d.size() != static_cast<size_t>(rank) || d[1] != p.kv) return false;
    if (rank == 2) return d[0] == p.b;
    return paged ? d[0] == p.pages && d[2] == p.page : d[0] == p.b && d[2] == p.s;
  };
  const auto f32 = [](ffi::AnyBuffer a) { return a.element_type() == ffi::DataType::F32; };
  if (k_data.element_type() != ffi::DataType::S8 || v_data.element_type() != ffi::DataType::S8 ||
      !f32(k_scale) || !f32(v_scale) || !rows(k_scale.dimensions(), 3) ||
      !rows(v_scale.dimensions(), 3) || !rows(k_new_scale.dimensions(), 2) ||
      !rows(v_new_scale.dimensions(), 2) || valid.dimensions().size() != 1 ||
      valid.dimensions()[0] != p.b) {
    return ffi::Error::InvalidArgument(
        std::string(kName) + ": need int8 caches [B, K, S, H] with float32 scales [B, K, S] "
        "(pools [P, K, page, H], [P, K, page]), the token's float32 scales [B, K], valid [B]");
  }
  p.window = window;
  p.scale = scale;
  p.softcap = softcap;
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.k_new_scale = k_new_scale.typed_data();
  p.v_new_scale = v_new_scale.typed_data();
  p.pos = pos.typed_data();
  p.valid = valid.typed_data();
  p.out = out->typed_data();
  p.kc = k_data_out->untyped_data();
  p.vc = v_data_out->untyped_data();
  p.k_scale = static_cast<float*>(k_scale_out->untyped_data());
  p.v_scale = static_cast<float*>(v_scale_out->untyped_data());
  Adopt(k_data, p.kc);
  Adopt(v_data, p.vc);
  Adopt(k_scale, p.k_scale);
  Adopt(v_scale, p.v_scale);
  if (p.b == 0 || p.n == 0 || p.h == 0) return ffi::Error::Success();
  Run<int8_t>(p);
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionInt8(
    ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S8> k, ffi::Buffer<ffi::F32> k_new_scale,
    ffi::Buffer<ffi::S8> v, ffi::Buffer<ffi::F32> v_new_scale, ffi::AnyBuffer k_data,
    ffi::AnyBuffer k_scale, ffi::AnyBuffer v_data, ffi::AnyBuffer v_scale,
    ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> valid, ffi::ResultBuffer<ffi::F32> out,
    ffi::Result<ffi::AnyBuffer> k_data_out, ffi::Result<ffi::AnyBuffer> k_scale_out,
    ffi::Result<ffi::AnyBuffer> v_data_out, ffi::Result<ffi::AnyBuffer> v_scale_out,
    float scale, int64_t window, float softcap) {
  constexpr const char* kName = "pallax_decode_attention_int8";
  AttnProblem p;
  ffi::Error err = Sizes(kName, q.dimensions(), k.dimensions(), v.dimensions(),
                         k_data.dimensions(), v_data.dimensions(), pos.dimensions(), &p);
  if (err.failure()) return err;
  return Int8Call(kName, p, q, k, k_new_scale, v, v_new_scale, k_data, k_scale, v_data, v_scale,
                  pos, valid, out, k_data_out, k_scale_out, v_data_out, v_scale_out, scale,
                  window, softcap);
}

ffi::Error PagedDecodeAttentionInt8(
    ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S8> k, ffi::Buffer<ffi::F32> k_new_scale,
    ffi::Buffer<ffi::S8> v, ffi::Buffer<ffi::F32> v_new_scale, ffi::AnyBuffer k_data,
    ffi::AnyBuffer k_scale, ffi::AnyBuffer v_data, ffi::AnyBuffer v_scale,
    ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> valid,
    ffi::ResultBuffer<ffi::F32> out, ffi::Result<ffi::AnyBuffer> k_data_out,
    ffi::Result<ffi::AnyBuffer> k_scale_out, ffi::Result<ffi::AnyBuffer> v_data_out,
    ffi::Result<ffi::AnyBuffer> v_scale_out, float scale, int64_t window, float softcap) {
  constexpr const char* kName = "pallax_paged_decode_attention_int8";
  AttnProblem p;
  ffi::Error err = PagedSizes(kName, q.dimensions(), k.dimensions(), v.dimensions(),
                              k_data.dimensions(), v_data.dimensions(), table.dimensions(),
                              pos.dimensions(), &p);
  if (err.failure()) return err;
  p.table = table.typed_data();
  return Int8Call(kName, p, q, k, k_new_scale, v, v_new_scale, k_data, k_scale, v_data, v_scale,
                  pos, valid, out, k_data_out, k_scale_out, v_data_out, v_scale_out, scale,
                  window, softcap);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(PallaxDecodeAttentionInt8, DecodeAttentionInt8,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, N, H]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // k [B, K, H] quantized
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its scales [B, K]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // v [B, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its scales [B, K]
                                  .Arg<ffi::AnyBuffer>()         // k.data [B, K, S, H] int8
                                  .Arg<ffi::AnyBuffer>()         // k.scale [B, K, S] f32
                                  .Arg<ffi::AnyBuffer>()         // v.data
                                  .Arg<ffi::AnyBuffer>()         // v.scale
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pos [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // valid [B]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, N, H]
                                  .Ret<ffi::AnyBuffer>()         // k.data (aliased)
                                  .Ret<ffi::AnyBuffer>()         // k.scale (aliased)
                                  .Ret<ffi::AnyBuffer>()         // v.data (aliased)
                                  .Ret<ffi::AnyBuffer>()         // v.scale (aliased)
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PallaxPagedDecodeAttention, PagedDecodeAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, N, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k [B, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v [B, K, H]
                                  .Arg<ffi::AnyBuffer>()         // k pool [P, K, page, H]
                                  .Arg<ffi::AnyBuffer>()         // v pool
                                  .Arg<ffi::Buffer<ffi::S32>>()  // table [B, n]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pos [B]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, N, H]
                                  .Ret<ffi::AnyBuffer>()         // k pool (aliased)
                                  .Ret<ffi::AnyBuffer>()         // v pool (aliased)
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PallaxPagedDecodeAttentionInt8, PagedDecodeAttentionInt8,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, N, H]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // k [B, K, H] quantized
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its scales [B, K]
                                  .Arg<ffi::Buffer<ffi::S8>>()   // v [B, K, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its scales [B, K]
                                  .Arg<ffi::AnyBuffer>()         // k.data pool [P, K, page, H]
                                  .Arg<ffi::AnyBuffer>()         // k.scale pool [P, K, page]
                                  .Arg<ffi::AnyBuffer>()         // v.data pool
                                  .Arg<ffi::AnyBuffer>()         // v.scale pool
                                  .Arg<ffi::Buffer<ffi::S32>>()  // table [B, n]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pos [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // valid [B]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, N, H]
                                  .Ret<ffi::AnyBuffer>()         // k.data (aliased)
                                  .Ret<ffi::AnyBuffer>()         // k.scale (aliased)
                                  .Ret<ffi::AnyBuffer>()         // v.data (aliased)
                                  .Ret<ffi::AnyBuffer>()         // v.scale (aliased)
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap"));
