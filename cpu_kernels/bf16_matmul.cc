// Float-weight matmuls for XLA:CPU through the FFI: y [R, O] = x [R, I] @ w.T, with
// x float32 [R, I], w bfloat16 or float32 [O, I] (output-major, as pallax stores weights)
// and y float32, accumulated in float32.
//
// XLA:CPU runs a bfloat16 dot by converting the whole weight to float32 first (written
// to memory and read back: 10 bytes moved per weight instead of 2), so bf16 weights
// decode slower than float32 ones (scripts/bench_matvec.py). Here each weight row is
// read once as bfloat16 and widened in registers (a bf16 is the top half of a float32:
// zero-extend to 32 bits, shift left by 16), exactly, then multiplied in float32 FMAs.
// The float32 build serves decode steps of float32 weights (XLA's matrix-vector product
// at one row and its matrix product at two and more sum in different orders).
//
// Batch invariance: every output y[r, o] is reduced in one order, fixed by the row alone:
// one 8-lane accumulator over i in steps of 8, its lanes summed by HSum, then the
// remainder in order. Tiles only decide how many such accumulators run side by side
// (3 weight rows x 4 activation rows: 12 in registers; one activation row, as in decode
// at batch 1: 4 weight rows, 4 independent FMA chains), never how a sum is ordered, so a
// row's result is the same bits whatever rows share the call.
// Threading as in qmatmul.cc: from 64K multiply-adds a call, chunks of output rows go
// to the calling thread and the spinning workers (parallel.h); an output is computed by
// one thread whole.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

constexpr int kNW = 3;   // weight rows per tile (3 x 4 rows: 12 accumulators)
constexpr int kNW1 = 4;  // weight rows per tile for one activation row
constexpr int64_t kAhead = 2;  // tiles of kNW1 rows the batch-1 prefetch runs ahead

template <typename W>
struct Problem {
  int64_t rows = 0, out = 0, in = 0;
  const float* x = nullptr;  // [rows, in]
  const W* w = nullptr;      // [out, in]: bfloat16 bits (uint16_t) or float
  float* y = nullptr;        // [rows, out]
};

inline float ToF32(uint16_t b) { return pallax_cpu::Widen(b); }
inline float ToF32(float f) { return f; }

#if defined(__AVX2__) && defined(__FMA__)
using pallax_cpu::HSum;

inline __m256 Load(const uint16_t* p) { return pallax_cpu::Load8(p); }
inline __m256 Load(const float* p) { return _mm256_loadu_ps(p); }

// NW weight rows (o .. o + NW) x NR activation rows (r .. r + NR).
template <int NW, int NR, typename W>
void Micro(const Problem<W>& p, int64_t o, int64_t r) {
  __m256 acc[NW][NR];
  for (int a = 0; a < NW; ++a)
    for (int b = 0; b < NR; ++b) acc[a][b] = _mm256_setzero_ps();
  const int64_t n8 = p.in / 8 * 8;
  for (int64_t i = 0; i < n8; i += 8) {
    if constexpr (NR == 1 && std::is_same_v<W, uint16_t>) {
      // Decode at batch 1 streams the weights from memory: each 64-byte line of bf16
      // rows is requested kAhead tiles ahead (the hardware prefetcher alone follows NW
      // interleaved streams poorly). A/B on 30 SmolLM2 layers, 2-core EPYC: 2 tiles
      // ahead 0.82x the time, 1 tile 0.86x; float32 rows, already near the bandwidth,
      // got 1.10-1.14x slower with it, so they go without.
      if ((i * sizeof(W)) % 64 == 0) {
        for (int a = 0; a < NW; ++a) {
          _mm_prefetch(reinterpret_cast<const char*>(p.w + (o + a + kAhead * NW) * p.in + i),
                       _MM_HINT_T0);
        }
      }
    }
    __m256 wv[NW];
    for (int a = 0; a < NW; ++a) wv[a] = Load(p.w + (o + a) * p.in + i);
    for (int b = 0; b < NR; ++b) {
      const __m256 xv = _mm256_loadu_ps(p.x + (r + b) * p.in + i);
      for (int a = 0; a < NW; ++a) acc[a][b] = _mm256_fmadd_ps(wv[a], xv, acc[a][b]);
    }
  }
  for (int a = 0; a < NW; ++a) {
    for (int b = 0; b < NR; ++b) {
      float s = HSum(acc[a][b]);
      for (int64_t i = n8; i < p.in; ++i) {
        s = std::fma(ToF32(p.w[(o + a) * p.in + i]), p.x[(r + b) * p.in + i], s);
      }
      p.y[(r + b) * p.out + o + a] = s;
    }
  }
}

// NR activation rows at a time over NW weight rows: rows r .. r + NR, with remainders.
template <int NW, typename W>
void Rows(const Problem<W>& p, int64_t o) {
  int64_t r = 0;
  for (; r + 4 <= p.rows; r += 4) Micro<NW, 4>(p, o, r);
  if (p.rows - r == 3) Micro<NW, 3>(p, o, r);
  if (p.rows - r == 2) Micro<NW, 2>(p, o, r);
  if (p.rows - r == 1) Micro<NW, 1>(p, o, r);
}

template <typename W>
void Tile(const Problem<W>& p, int64_t o0, int64_t o1) {
  int64_t o = o0;
  if (p.rows == 1) {
    for (; o + kNW1 <= o1; o += kNW1) Micro<kNW1, 1>(p, o, 0);
  } else {
    for (; o + kNW <= o1; o += kNW) Rows<kNW>(p, o);
  }
  for (; o < o1; ++o) Rows<1>(p, o);
}
#else
// Without AVX2 the same order in scalar code: 8 lane sums, summed as HSum does.
template <typename W>
void Tile(const Problem<W>& p, int64_t o0, int64_t o1) {
  const int64_t n8 = p.in / 8 * 8;
  for (int64_t r = 0; r < p.rows; ++r) {
    for (int64_t o = o0; o < o1; ++o) {
      float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = 0; i < n8; i += 8) {
        for (int l = 0; l < 8; ++l) {
          lane[l] = std::fma(ToF32(p.w[o * p.in + i + l]), p.x[r * p.in + i + l], lane[l]);
        }
      }
      const float s4[4] = {lane[0] + lane[4], lane[1] + lane[5], lane[2] + lane[6],
                           lane[3] + lane[7]};
      const float t0 = s4[0] + s4[2], t1 = s4[1] + s4[3];
      float s = t0 + t1;
      for (int64_t i = n8; i < p.in; ++i) s = std::fma(ToF32(p.w[o * p.in + i]), p.x[r * p.in + i], s);
      p.y[r * p.out + o] = s;
    }
  }
}
#endif

// Output rows per task: about 8 tasks per thread (multiples of 12, the weight-row tiles)
// balance a slowed thread. An output is computed by one task whole, so how rows are
// split never changes a bit.
inline int64_t ChunkRows(int64_t out, int64_t threads) {
  const int64_t want = std::max<int64_t>(1, threads * 8);
  return std::max<int64_t>(12, ((out + want - 1) / want + 11) / 12 * 12);
}

inline ffi::Error Check(const char* name, ffi::Span<const int64_t> xd,
                        ffi::Span<const int64_t> wd) {
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": x [R, I] and w [O, I] must be 2-D with the same I");
  }
  return ffi::Error::Success();
}

template <typename W>
Problem<W> Make(const float* x, ffi::Span<const int64_t> xd, const void* w_data,
                ffi::Span<const int64_t> wd, float* y) {
  Problem<W> p;
  p.rows = xd[0];
  p.in = xd[1];
  p.out = wd[0];
  p.x = x;
  p.w = reinterpret_cast<const W*>(w_data);
  p.y = y;
  return p;
}

// Whether a problem has work for the tiles (an empty input sum is zeros, written here).
template <typename W>
bool Ready(const Problem<W>& p) {
  if (p.rows == 0 || p.out == 0) return false;
  if (p.in == 0) {
    std::fill(p.y, p.y + p.rows * p.out, 0.0f);
    return false;
  }
  return true;
}

template <typename W>
ffi::Error Run(const char* name, ffi::Buffer<ffi::F32> x, const void* w_data,
               ffi::Span<const int64_t> wd, ffi::ResultBuffer<ffi::F32> y) {
  ffi::Error err = Check(name, x.dimensions(), wd);
  if (err.failure()) return err;
  const Problem<W> p = Make<W>(x.typed_data(), x.dimensions(), w_data, wd, y->typed_data());
  if (!Ready(p)) return ffi::Error::Success();
  const int64_t threads = pallax_cpu::ThreadsFor(p.rows * p.out * p.in);
  const int64_t chunk = ChunkRows(p.out, threads);
  const int64_t chunks = (p.out + chunk - 1) / chunk;
  pallax_cpu::ParallelForSpin(threads, chunks, [&](int64_t c) {
    Tile(p, c * chunk, std::min(p.out, (c + 1) * chunk));
  });
  return ffi::Error::Success();
}

// Several weights against one x (the fused projections of one activation: q / k / v,
// gate / up) in one call: per member i a weight w_i [O_i, I], bfloat16 or float32, and its
// result y_i [R, O_i]. Each member's outputs are the bits of its own call (an output's sum
// order is fixed by its row alone); the call has one parallel region for all members'
// tasks where separate calls had a fork and a join each.
ffi::Error FloatMatmulMulti(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs ws,
                            ffi::RemainingRets ys) {
  const size_t n = ws.size();
  if (ys.size() != n) {
    return ffi::Error::InvalidArgument("pallax_float_matmul_multi: weights and results differ");
  }
  std::vector<Problem<uint16_t>> half(n);
  std::vector<Problem<float>> full(n);
  std::vector<char> is_half(n, 0), ready(n, 0);
  int64_t macs = 0;
  for (size_t i = 0; i < n; ++i) {
    auto w = ws.get<ffi::AnyBuffer>(i);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(i);
    if (w.has_error() || y.has_error()) {
      return ffi::Error::InvalidArgument("pallax_float_matmul_multi: member " +
                                         std::to_string(i) + ": y must be float32");
    }
    const auto wd = w->dimensions();
    ffi::Error err = Check("pallax_float_matmul_multi", x.dimensions(), wd);
    if (err.failure()) return err;
    float* out = (*y)->typed_data();
    if (w->element_type() == ffi::DataType::BF16) {
      is_half[i] = 1;
      half[i] = Make<uint16_t>(x.typed_data(), x.dimensions(), w->untyped_data(), wd, out);
      ready[i] = Ready(half[i]);
    } else if (w->element_type() == ffi::DataType::F32) {
      full[i] = Make<float>(x.typed_data(), x.dimensions(), w->untyped_data(), wd, out);
      ready[i] = Ready(full[i]);
    } else {
      return ffi::Error::InvalidArgument("pallax_float_matmul_multi: member " +
                                         std::to_string(i) + ": w must be bf16 or float32");
    }
    macs += x.dimensions()[0] * wd[0] * wd[1];
  }
  const int64_t threads = pallax_cpu::ThreadsFor(macs);
  std::vector<int64_t> chunk(n, 1), first(n + 1, 0);  // each member's rows per task, first task
  for (size_t i = 0; i < n; ++i) {
    const int64_t out = is_half[i] ? half[i].out : full[i].out;
    int64_t count = 0;
    if (ready[i]) {
      chunk[i] = ChunkRows(out, threads);
      count = (out + chunk[i] - 1) / chunk[i];
    }
    first[i + 1] = first[i] + count;
  }
  pallax_cpu::ParallelForSpin(threads, first[n], [&](int64_t t) {
    size_t i = 0;
    while (t >= first[i + 1]) ++i;
    const int64_t c = t - first[i];
    if (is_half[i]) {
      Tile(half[i], c * chunk[i], std::min(half[i].out, (c + 1) * chunk[i]));
    } else {
      Tile(full[i], c * chunk[i], std::min(full[i].out, (c + 1) * chunk[i]));
    }
  });
  return ffi::Error::Success();
}

ffi::Error Bf16Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  return Run<uint16_t>("pallax_bf16_matmul", x, w.untyped_data(), w.dimensions(), y);
}

ffi::Error F32Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  return Run<float>("pallax_f32_matmul", x, w.untyped_data(), w.dimensions(), y);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PallaxBf16Matmul, Bf16Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [R, I]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [O, I]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [R, O]

XLA_FFI_DEFINE_HANDLER_SYMBOL(PallaxF32Matmul, F32Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, I]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [O, I]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [R, O]

XLA_FFI_DEFINE_HANDLER_SYMBOL(PallaxFloatMatmulMulti, FloatMatmulMulti,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [R, I]
                                  .RemainingArgs()   // per member: w [O_i, I], bf16 or float32
                                  .RemainingRets());  // per member: y [R, O_i]
