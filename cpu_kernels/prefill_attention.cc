// Prefill attention for XLA:CPU through the FFI: causal grouped-query attention of a
// chunk of T queries per row over a dense cache that already holds the chunk's keys.
//
//   out [B, T, N, H] float32 = attention of q [B, T, N, H] (query t of row b at position
//   pos[b] + t) over k_cache, v_cache [B, K, S, H] (float32 or bfloat16)
//
// The semantics are primitives.attention_core's for T > 1: query head n reads KV head
// n / (N / K); a query at p sees slots max(0, p - window + 1) .. min(p, S - 1) (all of
// them up to p without a window); an optional softcap c maps a logit l to
// c * tanh(l / c); a query that sees no slot gets zeros.
//
// FlashAttention's tiling on a CPU: a task is (row, KV head, tile of kTileQ queries), its
// kTileQ * G query heads the rows of one tile, so every key and value row read serves
// them all. Keys are visited in blocks of kKeyBlock at fixed cache positions, in order,
// with an online softmax (running max, rescaled sums) in float32, and a tile stops at
// the last block its queries see (the causal triangle, not the rectangle). The key block
// is transposed to [H, kKeyBlock] so that a tile's logits are broadcast-FMAs over keys,
// register-blocked by rows, and the values are broadcast-FMAs over the head dim.
//
// Batch and chunk invariance: each (query, key) logit and each output lane is one FMA
// chain in a fixed order (over h, then over the keys of a block in order, then blocks in
// order), whatever other rows share the tile, the tile's position, T, B, S or the thread
// count; a key block wholly past a query (or before its window) leaves its state exactly
// as it was. So a query's output depends on its own position and the cache alone: the
// same bits in a 16-token chunk as in a 512-token one, alone or in a batch.

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

constexpr int64_t kTileQ = 16;      // queries per task
constexpr int64_t kKeyBlock = 128;  // keys per block, at positions [j * 128, (j + 1) * 128)
constexpr float kNone = -std::numeric_limits<float>::infinity();

struct PrefillProblem {
  int64_t b = 0, t = 0, n = 0, kv = 0, s = 0, h = 0, g = 0;
  int64_t window = 0;                  // 0: none
  float scale = 1.0f, softcap = 0.0f;  // softcap 0: none
  const float* q = nullptr;            // [B, T, N, H]
  const void* kc = nullptr;            // [B, K, S, H]
  const void* vc = nullptr;
  const int32_t* pos = nullptr;  // [B]
  float* out = nullptr;          // [B, T, N, H]
};

// The keys of each (row, KV head) transposed block by block, [B, K, blocks, H, kKeyBlock]
// (zeros past S), and the values as float32 [B, K, S, H] for a bfloat16 cache (a float32
// cache is read in place): made once per call, shared by every query tile.
struct Staged {
  std::vector<float> kt, v;
  int64_t blocks = 0;
  // Where block `block` of (row b, KV head kvh) starts in kt.
  int64_t KeysAt(const PrefillProblem& p, int64_t b, int64_t kvh, int64_t block) const {
    return (((b * p.kv + kvh) * blocks + block) * p.h) * kKeyBlock;
  }
};

// Scratch of one task, reused across the tasks a thread runs.
struct Scratch {
  std::vector<float> q, logits, acc, pv, max, sum;
  void Size(int64_t rows, int64_t h) {
    q.resize(rows * h);
    logits.resize(rows * kKeyBlock);
    acc.resize(rows * h);
    pv.resize(rows * h);
    max.resize(rows);
    sum.resize(rows);
  }
};

// logits [rows, kKeyBlock] = q [rows, H] x kt [H, kKeyBlock]: per (row, key) one FMA
// chain over h in order. R rows at a time share each load of kt.
template <int R>
void LogitRows(const float* q, const float* kt, int64_t h, float* logits) {
#if defined(__AVX2__) && defined(__FMA__)
  for (int64_t c = 0; c < kKeyBlock; c += 32) {  // 4 vectors of 8 keys
    __m256 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < h; ++i) {
      const float* krow = kt + i * kKeyBlock + c;
      const __m256 k0 = _mm256_loadu_ps(krow), k1 = _mm256_loadu_ps(krow + 8),
                   k2 = _mm256_loadu_ps(krow + 16), k3 = _mm256_loadu_ps(krow + 24);
      for (int r = 0; r < R; ++r) {
        const __m256 qv = _mm256_broadcast_ss(q + r * h + i);
        acc[r][0] = _mm256_fmadd_ps(qv, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(qv, k1, acc[r][1]);
        acc[r][2] = _mm256_fmadd_ps(qv, k2, acc[r][2]);
        acc[r][3] = _mm256_fmadd_ps(qv, k3, acc[r][3]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(logits + r * kKeyBlock + c + 8 * j, acc[r][j]);
  }
#else
  for (int r = 0; r < R; ++r) {
    float* lg = logits + r * kKeyBlock;
    for (int64_t j = 0; j < kKeyBlock; ++j) lg[j] = 0.0f;
    for (int64_t i = 0; i < h; ++i) {
      const float qv = q[r * h + i];
      const float* krow = kt + i * kKeyBlock;
      for (int64_t j = 0; j < kKeyBlock; ++j) lg[j] = std::fma(qv, krow[j], lg[j]);
    }
  }
#endif
}

// pv [rows, H] = p [rows, kKeyBlock (first nb)] x v [nb, H]: per (row, lane) one FMA chain
// over the keys in order. R rows at a time share each load of v.
template <int R>
void ValueRows(const float* p, const float* v, int64_t nb, int64_t h, float* pv) {
  int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; c + 32 <= h; c += 32) {
    __m256 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nb; ++j) {
      const float* vrow = v + j * h + c;
      const __m256 v0 = _mm256_loadu_ps(vrow), v1 = _mm256_loadu_ps(vrow + 8),
                   v2 = _mm256_loadu_ps(vrow + 16), v3 = _mm256_loadu_ps(vrow + 24);
      for (int r = 0; r < R; ++r) {
        const __m256 e = _mm256_broadcast_ss(p + r * kKeyBlock + j);
        acc[r][0] = _mm256_fmadd_ps(e, v0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(e, v1, acc[r][1]);
        acc[r][2] = _mm256_fmadd_ps(e, v2, acc[r][2]);
        acc[r][3] = _mm256_fmadd_ps(e, v3, acc[r][3]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(pv + r * h + c + 8 * j, acc[r][j]);
  }
#endif
  for (; c < h; ++c) {  // lanes past the last group of 32 (and the portable build)
    for (int r = 0; r < R; ++r) {
      float a = 0.0f;
      for (int64_t j = 0; j < nb; ++j) a = std::fma(p[r * kKeyBlock + j], v[j * h + c], a);
      pv[r * h + c] = a;
    }
  }
}

template <typename Fn3, typename Fn1>
void ByRows(int64_t rows, Fn3 three, Fn1 one) {
  int64_t r = 0;
  for (; r + 3 <= rows; r += 3) three(r);
  for (; r < rows; ++r) one(r);
}

// e^(x - top) for n lanes of x (in place), their sum; lanes outside [lo, hi] become 0.
inline float ExpRow(float* x, int64_t n, float top, int64_t lo, int64_t hi) {
  float total = 0.0f;
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  const __m256 t8 = _mm256_set1_ps(top);
  const __m256i lo8 = _mm256_set1_epi32(static_cast<int32_t>(lo));
  const __m256i hi8 = _mm256_set1_epi32(static_cast<int32_t>(hi));
  const __m256i step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; j + 8 <= n; j += 8) {
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(j)), step);
    const __m256i out = _mm256_or_si256(_mm256_cmpgt_epi32(lo8, idx),
                                        _mm256_cmpgt_epi32(idx, hi8));
    __m256 e = pallax_cpu::Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), t8));
    e = _mm256_andnot_ps(_mm256_castsi256_ps(out), e);
    _mm256_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  total = pallax_cpu::HSum(acc);
#endif
  for (; j < n; ++j) {
    x[j] = (j < lo || j > hi) ? 0.0f : std::exp(x[j] - top);
    total += x[j];
  }
  return total;
}

// The slots any query of row b sees: [lo, hi] (hi < lo: none).
inline void RowRange(const PrefillProblem& p, int64_t b, int64_t* lo, int64_t* hi) {
  *lo = p.window > 0 ? std::max<int64_t>(0, p.pos[b] - p.window + 1) : 0;
  *hi = std::min<int64_t>(p.pos[b] + p.t - 1, p.s - 1);
}

template <typename T>
void StageBlock(const PrefillProblem& p, int64_t b, int64_t kvh, int64_t block, Staged& st) {
  int64_t lo, hi;
  RowRange(p, b, &lo, &hi);
  const int64_t jb = block * kKeyBlock;
  if (jb > hi || jb + kKeyBlock <= lo) return;  // no query of the row sees it
  const int64_t h = p.h, nb = std::min(kKeyBlock, p.s - jb);
  const T* kc = static_cast<const T*>(p.kc) + ((b * p.kv + kvh) * p.s + jb) * h;
  float* kt = st.kt.data() + st.KeysAt(p, b, kvh, block);
  for (int64_t i = 0; i < h; ++i) {
    for (int64_t j = 0; j < nb; ++j) kt[i * kKeyBlock + j] = pallax_cpu::Load(kc, j * h + i);
    for (int64_t j = nb; j < kKeyBlock; ++j) kt[i * kKeyBlock + j] = 0.0f;
  }
  if (!st.v.empty()) {
    const T* vc = static_cast<const T*>(p.vc) + ((b * p.kv + kvh) * p.s + jb) * h;
    float* v = st.v.data() + ((b * p.kv + kvh) * p.s + jb) * h;
    for (int64_t x = 0; x < nb * h; ++x) v[x] = pallax_cpu::Load(vc, x);
  }
}

template <typename T>
void RunTile(const PrefillProblem& p, int64_t b, int64_t kvh, int64_t t0, const Staged& st,
             Scratch& w) {
  const int64_t h = p.h, g = p.g;
  const int64_t tq = std::min(kTileQ, p.t - t0), rows = tq * g;
  w.Size(rows, h);
  // The tile's rows (query, head) scaled; row r is query t0 + r / G, head kvh * G + r % G.
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = p.q + ((b * p.t + t0 + r / g) * p.n + kvh * g + r % g) * h;
    for (int64_t i = 0; i < h; ++i) w.q[r * h + i] = src[i] * p.scale;
  }
  std::fill(w.acc.begin(), w.acc.begin() + rows * h, 0.0f);
  std::fill(w.max.begin(), w.max.begin() + rows, kNone);
  std::fill(w.sum.begin(), w.sum.begin() + rows, 0.0f);
  const int64_t first_pos = p.pos[b] + t0, last_pos = first_pos + tq - 1;
  const int64_t lo = p.window > 0 ? std::max<int64_t>(0, first_pos - p.window + 1) : 0;
  const int64_t hi = std::min<int64_t>(last_pos, p.s - 1);
  const float* values =  // [S, H] float32
      st.v.empty() ? static_cast<const float*>(p.vc) + (b * p.kv + kvh) * p.s * h
                   : st.v.data() + (b * p.kv + kvh) * p.s * h;
  for (int64_t jb = (lo / kKeyBlock) * kKeyBlock; jb <= hi; jb += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, p.s - jb);
    const float* kt = st.kt.data() + st.KeysAt(p, b, kvh, jb / kKeyBlock);  // [H, block]
    const float* v = values + jb * h;                      // [block, H]
    float* logits = w.logits.data();
    ByRows(
        rows, [&](int64_t r) { LogitRows<3>(&w.q[r * h], kt, h, logits + r * kKeyBlock); },
        [&](int64_t r) { LogitRows<1>(&w.q[r * h], kt, h, logits + r * kKeyBlock); });
    for (int64_t r = 0; r < rows; ++r) {
      float* lg = &w.logits[r * kKeyBlock];
      const int64_t qp = first_pos + r / g;
      // The keys of this block the query sees, as offsets in the block: [klo, khi].
      const int64_t khi = std::min<int64_t>(std::min<int64_t>(qp, p.s - 1) - jb, nb - 1);
      const int64_t klo = p.window > 0 ? std::max<int64_t>(0, qp - p.window + 1 - jb) : 0;
      if (khi < klo) {  // none: the state is left exactly as it was
        for (int64_t j = 0; j < kKeyBlock; ++j) lg[j] = 0.0f;
        continue;
      }
      if (p.softcap > 0.0f) {
        for (int64_t j = klo; j <= khi; ++j) lg[j] = p.softcap * std::tanh(lg[j] / p.softcap);
      }
      float top = w.max[r];
      for (int64_t j = klo; j <= khi; ++j) top = std::max(top, lg[j]);
      const float rescale = std::exp(w.max[r] - top);  // 0 on the row's first block
      w.max[r] = top;
      w.sum[r] = w.sum[r] * rescale + ExpRow(lg, kKeyBlock, top, klo, khi);
      for (int64_t i = 0; i < h; ++i) w.acc[r * h + i] *= rescale;
    }
    ByRows(
        rows, [&](int64_t r) { ValueRows<3>(logits + r * kKeyBlock, v, nb, h, &w.pv[r * h]); },
        [&](int64_t r) { ValueRows<1>(logits + r * kKeyBlock, v, nb, h, &w.pv[r * h]); });
    for (int64_t i = 0; i < rows * h; ++i) w.acc[i] += w.pv[i];
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o = p.out + ((b * p.t + t0 + r / g) * p.n + kvh * g + r % g) * h;
    const float inv = w.sum[r] > 0.0f ? 1.0f / w.sum[r] : 0.0f;
    for (int64_t i = 0; i < h; ++i) o[i] = w.acc[r * h + i] * inv;
  }
}

template <typename T>
void Run(const PrefillProblem& p) {
  const int64_t tiles = (p.t + kTileQ - 1) / kTileQ, tasks = p.b * p.kv * tiles;
  const int64_t macs = p.b * p.t * p.n * p.h * std::min<int64_t>(p.s, p.t + 256) * 2;
  const int64_t threads = pallax_cpu::ThreadsFor(macs);
  Staged st;
  st.blocks = (p.s + kKeyBlock - 1) / kKeyBlock;
  st.kt.resize(p.b * p.kv * st.blocks * p.h * kKeyBlock);
  if (!std::is_same_v<T, float>) st.v.resize(p.b * p.kv * p.s * p.h);
  pallax_cpu::ParallelForSpin(threads, p.b * p.kv * st.blocks, [&](int64_t task) {
    const int64_t pair = task / st.blocks;
    StageBlock<T>(p, pair / p.kv, pair % p.kv, task % st.blocks, st);
  });
  pallax_cpu::ParallelForSpin(threads, tasks, [&](int64_t task) {
    thread_local Scratch local;  // a worker's tasks run one after another
    const int64_t b = task / (p.kv * tiles), kvh = (task / tiles) % p.kv;
    RunTile<T>(p, b, kvh, (task % tiles) * kTileQ, st, local);
  });
}

ffi::Error PrefillAttention(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_cache,
                            ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> pos,
                            ffi::ResultBuffer<ffi::F32> out, float scale, int64_t window,
                            float softcap) {
  constexpr const char* kName = "pallax_prefill_attention";
  const auto qd = q.dimensions(), kd = k_cache.dimensions(), vd = v_cache.dimensions();
  const auto same = [](auto a, auto b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
  };
  if (qd.size() != 4 || kd.size() != 4 || !same(kd, vd) || pos.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument(
        std::string(kName) + ": need q [B, T, N, H], caches [B, K, S, H], pos [B]");
  }
  PrefillProblem p;
  p.b = qd[0];
  p.t = qd[1];
  p.n = qd[2];
  p.h = qd[3];
  p.kv = kd[1];
  p.s = kd[2];
  if (kd[0] != p.b || kd[3] != p.h || pos.dimensions()[0] != p.b || p.kv == 0 ||
      p.n % p.kv != 0 || p.s == 0) {
    return ffi::Error::InvalidArgument(std::string(kName) + ": q and the caches disagree");
  }
  const auto dt = k_cache.element_type();
  if ((dt != ffi::DataType::F32 && dt != ffi::DataType::BF16) || v_cache.element_type() != dt) {
    return ffi::Error::InvalidArgument(std::string(kName) + ": caches must be f32 or bf16");
  }
  p.g = p.n / p.kv;
  p.window = window;
  p.scale = scale;
  p.softcap = softcap;
  p.q = q.typed_data();
  p.kc = k_cache.untyped_data();
  p.vc = v_cache.untyped_data();
  p.pos = pos.typed_data();
  p.out = out->typed_data();
  if (p.b == 0 || p.t == 0 || p.n == 0 || p.h == 0) return ffi::Error::Success();
  if (dt == ffi::DataType::F32) {
    Run<float>(p);
  } else {
    Run<uint16_t>(p);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PallaxPrefillAttention, PrefillAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, T, N, H]
                                  .Arg<ffi::AnyBuffer>()         // k_cache [B, K, S, H]
                                  .Arg<ffi::AnyBuffer>()         // v_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pos [B]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, T, N, H]
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<float>("softcap"));
