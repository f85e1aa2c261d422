// bfloat16-weight matmul for XLA:CPU through the FFI: y [R, O] = x [R, I] @ w.T, with
// x float32 [R, I], w bfloat16 [O, I] (output-major, as pallax stores weights) and y
// float32, accumulated in float32.
//
// XLA:CPU runs a bfloat16 dot by converting the whole weight to float32 first (written
// to memory and read back: 10 bytes moved per weight instead of 2), so bf16 weights
// decode slower than float32 ones (scripts/bench_matvec.py). Here each weight row is
// read once as bfloat16 and widened in registers (a bf16 is the top half of a float32:
// zero-extend to 32 bits, shift left by 16), exactly, then multiplied in float32 FMAs.
//
// Tiles of 3 weight rows x 4 activation rows keep 12 accumulators in registers; the 3
// weight rows (a few KB) stay in L1 while every activation row passes over them. One
// activation row (decode at batch 1) streams each weight row with 4 accumulators.
// Threading as in qmatmul.cc: from 64K multiply-adds a call, chunks of output rows go
// to the calling thread and the spinning workers (parallel.h).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "bf16.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kNW = 3;  // weight rows per tile (3 x 4 rows: 12 accumulators)

struct Bf16Problem {
  int64_t rows = 0, out = 0, in = 0;
  const float* x = nullptr;     // [rows, in]
  const uint16_t* w = nullptr;  // [out, in] bfloat16 bits
  float* y = nullptr;           // [rows, out]
};

using pallax_cpu::Widen;

#if defined(__AVX2__) && defined(__FMA__)
using pallax_cpu::HSum;
using pallax_cpu::Load8;

// NW weight rows (o .. o + NW) x NR activation rows (r .. r + NR).
template <int NW, int NR>
void Micro(const Bf16Problem& p, int64_t o, int64_t r) {
  __m256 acc[NW][NR];
  for (int a = 0; a < NW; ++a)
    for (int b = 0; b < NR; ++b) acc[a][b] = _mm256_setzero_ps();
  const int64_t n8 = p.in / 8 * 8;
  for (int64_t i = 0; i < n8; i += 8) {
    __m256 wv[NW];
    for (int a = 0; a < NW; ++a) wv[a] = Load8(p.w + (o + a) * p.in + i);
    for (int b = 0; b < NR; ++b) {
      const __m256 xv = _mm256_loadu_ps(p.x + (r + b) * p.in + i);
      for (int a = 0; a < NW; ++a) acc[a][b] = _mm256_fmadd_ps(wv[a], xv, acc[a][b]);
    }
  }
  for (int a = 0; a < NW; ++a) {
    for (int b = 0; b < NR; ++b) {
      float s = HSum(acc[a][b]);
      for (int64_t i = n8; i < p.in; ++i) s += Widen(p.w[(o + a) * p.in + i]) * p.x[(r + b) * p.in + i];
      p.y[(r + b) * p.out + o + a] = s;
    }
  }
}

// One weight row, one activation row: 4 independent accumulators hide FMA latency.
void Row1(const Bf16Problem& p, int64_t o, int64_t r) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  const uint16_t* w = p.w + o * p.in;
  const float* x = p.x + r * p.in;
  const int64_t n32 = p.in / 32 * 32, n8 = p.in / 8 * 8;
  int64_t i = 0;
  for (; i < n32; i += 32) {
    for (int k = 0; k < 4; ++k) {
      acc[k] = _mm256_fmadd_ps(Load8(w + i + 8 * k), _mm256_loadu_ps(x + i + 8 * k), acc[k]);
    }
  }
  for (; i < n8; i += 8) acc[0] = _mm256_fmadd_ps(Load8(w + i), _mm256_loadu_ps(x + i), acc[0]);
  float s = HSum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < p.in; ++i) s += Widen(w[i]) * x[i];
  p.y[r * p.out + o] = s;
}

// NR activation rows at a time over NW weight rows: rows r .. r + NR, with remainders.
template <int NW>
void Rows(const Bf16Problem& p, int64_t o) {
  int64_t r = 0;
  for (; r + 4 <= p.rows; r += 4) Micro<NW, 4>(p, o, r);
  if (p.rows - r == 3) Micro<NW, 3>(p, o, r);
  if (p.rows - r == 2) Micro<NW, 2>(p, o, r);
  if (p.rows - r == 1) Micro<NW, 1>(p, o, r);
}

void Tile(const Bf16Problem& p, int64_t o0, int64_t o1) {
  if (p.rows == 1) {
    for (int64_t o = o0; o < o1; ++o) Row1(p, o, 0);
    return;
  }
  int64_t o = o0;
  for (; o + kNW <= o1; o += kNW) Rows<kNW>(p, o);
  for (; o < o1; ++o) Rows<1>(p, o);
}
#else
void Tile(const Bf16Problem& p, int64_t o0, int64_t o1) {
  for (int64_t r = 0; r < p.rows; ++r) {
    for (int64_t o = o0; o < o1; ++o) {
      float s = 0.0f;
      for (int64_t i = 0; i < p.in; ++i) s += Widen(p.w[o * p.in + i]) * p.x[r * p.in + i];
      p.y[r * p.out + o] = s;
    }
  }
}
#endif

ffi::Error Bf16Matmul(ffi::Buffer<ffi::F32> x,
                      ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument(
        "pallax_bf16_matmul: x [R, I] and w [O, I] must be 2-D with the same I");
  }
  Bf16Problem p;
  p.rows = xd[0];
  p.in = xd[1];
  p.out = wd[0];
  p.x = x.typed_data();
  p.w = reinterpret_cast<const uint16_t*>(w.untyped_data());
  p.y = y->typed_data();
  if (p.rows == 0 || p.out == 0) return ffi::Error::Success();
  if (p.in == 0) {
    std::fill(p.y, p.y + p.rows * p.out, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t threads = pallax_cpu::ThreadsFor(p.rows * p.out * p.in);
  // About 8 chunks per thread (multiples of the 4-row tile) balance a slowed thread.
  const int64_t want = std::max<int64_t>(1, threads * 8);
  const int64_t chunk = std::max<int64_t>(8, ((p.out + want - 1) / want + 3) & ~int64_t{3});
  const int64_t chunks = (p.out + chunk - 1) / chunk;
  pallax_cpu::ParallelForSpin(threads, chunks, [&](int64_t c) {
    Tile(p, c * chunk, std::min(p.out, (c + 1) * chunk));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PallaxBf16Matmul, Bf16Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [R, I]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w [O, I]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [R, O]
