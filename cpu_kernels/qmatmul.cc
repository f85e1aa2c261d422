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
#include "qmatmul_avx2.h"
#include "qmatmul_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;


namespace pallax_qmatmul {


using TileFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t);
using PrepareFn = void (*)(const Problem&, int64_t);

[[maybe_unused]] void DotTileScalar(const Problem& p, int64_t o0, int64_t o1, int64_t r0,
                                    int64_t r1) {
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t r = r0; r < r1; ++r) {
      float total = DotBlocksScalar(p, o, r, 0, p.nblocks);
      if (p.offset != nullptr) {
        float off;
        OffsetTerms<1>(p, o, r, &off);
        total += off;
      }
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

using Dims = ffi::Span<const int64_t>;

std::string Shape(Dims d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// The problem and kernel of one product, after checking its operands agree.
ffi::Error Setup(Problem& p, Kernel& kernel, const float* x, Dims xd, const void* data,
                 ffi::DataType data_type, Dims wd, const float* scale, Dims sd,
                 const float* offset, float* y, int64_t bits, int64_t group_size) {
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2) {
    return ffi::Error::InvalidArgument("pallax_qmatmul: x, data and scale must be 2-D");
  }
  p.rows = xd[0];
  p.ip = xd[1];
  p.out = wd[0];
  p.groups = sd[1];
  p.gsize = group_size;
  p.bits = bits;
  const auto want_type = bits == 4 ? ffi::DataType::U8 : ffi::DataType::S8;
  if ((bits != 4 && bits != 8) || data_type != want_type) {
    return ffi::Error::InvalidArgument("pallax_qmatmul: bits=" + std::to_string(bits) +
                                       " needs uint8 (4) or int8 (8) data");
  }
  if (group_size <= 0 || p.groups * group_size != p.ip || sd[0] != p.out ||
      wd[1] != (bits == 4 ? p.ip / 2 : p.ip) || (bits == 4 && group_size % 2)) {
    return ffi::Error::InvalidArgument("pallax_qmatmul: shapes disagree: x " + Shape(xd) +
                                       ", data " + Shape(wd) + ", scale " + Shape(sd) +
                                       ", group_size=" + std::to_string(group_size));
  }
  p.nblocks = (p.ip + kBlock - 1) / kBlock;
  p.nfull = p.ip / kBlock;
  p.wstride = wd[1];
  p.x = x;
  p.w = static_cast<const uint8_t*>(data);
  p.scale = scale;
  p.offset = offset;
  p.y = y;
  kernel = SelectKernel(p);
  if (kernel.tile == nullptr) {
    return ffi::Error::InvalidArgument("pallax_qmatmul: unsupported bits=" +
                                       std::to_string(bits) +
                                       " group_size=" + std::to_string(group_size));
  }
  return ffi::Error::Success();
}

// Quantizes the activations into `scratch` (inline when few rows, across the threads when
// many) and points the problem at them.
void QuantizeActivations(Problem& p, const Kernel& kernel, Scratch& scratch, int64_t threads) {
  scratch.xq.resize(p.rows * p.nblocks * kBlock);
  scratch.xd.resize(p.rows * p.nblocks);
  scratch.xsum.resize(p.offset != nullptr ? p.rows * p.groups : 0);
  scratch.xdv.resize(kernel.prepare != nullptr ? p.rows * p.nblocks * 8 : 0);
  p.xq = scratch.xq.data();
  p.xd = scratch.xd.data();
  p.xsum = scratch.xsum.data();
  p.xdv = scratch.xdv.data();
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
}

// Tasks: row tiles x chunks of output rows (a multiple of the 4-row tiles), about 8 per
// thread so that the claims balance a thread that the OS or another process slows.
struct Tasks {
  int64_t chunk = 0, chunks = 0, row_tiles = 0;
  int64_t count() const { return row_tiles * chunks; }
};

Tasks Split(const Problem& p, int64_t threads) {
  Tasks t;
  t.row_tiles = (p.rows + kRowTile - 1) / kRowTile;
  const int64_t want_chunks = std::max<int64_t>(1, (threads * 8 + t.row_tiles - 1) / t.row_tiles);
  const int64_t per_chunk = ((p.out + want_chunks - 1) / want_chunks + 3) & ~int64_t{3};
  t.chunk = std::max<int64_t>(8, per_chunk);
  t.chunks = (p.out + t.chunk - 1) / t.chunk;
  return t;
}

void RunTask(const Problem& p, const Kernel& kernel, const Tasks& tasks, int64_t t) {
  const int64_t rt = t / tasks.chunks, oc = t % tasks.chunks;
  kernel.tile(p, oc * tasks.chunk, std::min(p.out, (oc + 1) * tasks.chunk), rt * kRowTile,
              std::min(p.rows, (rt + 1) * kRowTile));
}

ffi::Error Run(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer data,
               ffi::Buffer<ffi::F32> scale, const float* offset,
               ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t group_size) {
  Problem p;
  Kernel kernel;
  ffi::Error err = Setup(p, kernel, x.typed_data(), x.dimensions(), data.untyped_data(),
                         data.element_type(), data.dimensions(), scale.typed_data(),
                         scale.dimensions(), offset, y->typed_data(), bits, group_size);
  if (err.failure()) return err;
  if (p.rows == 0 || p.out == 0) return ffi::Error::Success();
  thread_local Scratch scratch;
  // Threads: from kMinSpinMacs up, the library's spinning workers (parallel.h); a decode
  // row (R = 1) of a 576 x 576 int4 weight already splits.
  const int64_t threads = pallax_cpu::ThreadsFor(p.rows * p.out * p.ip);
  QuantizeActivations(p, kernel, scratch, threads);
  const Tasks tasks = Split(p, threads);
  ParallelForSpin(threads, tasks.count(), [&](int64_t t) { RunTask(p, kernel, tasks, t); });
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

// Several products in one call (the fused projections of one activation, e.g. q / k / v):
// per member i the operands x_i, data_i, scale_i and, where offset[i], offset_i, and the
// result y_i. Each member is set up, quantized and tiled exactly as its own call would be,
// so its outputs are bit-equal to that call's; the call has one parallel region for all
// members' tasks where separate calls had one each (a fork and a join per projection).
ffi::Error QMatmulMulti(ffi::RemainingArgs args, ffi::RemainingRets rets, Dims bits,
                        Dims group_size, Dims has_offset) {
  const size_t n = bits.size();
  if (group_size.size() != n || has_offset.size() != n || rets.size() != n) {
    return ffi::Error::InvalidArgument(
        "pallax_qmatmul_multi: bits, group_size, offset and results differ in length");
  }
  thread_local std::vector<Scratch> scratch;
  scratch.resize(n);
  std::vector<Problem> p(n);
  std::vector<Kernel> kernels(n);
  std::vector<Tasks> tasks(n);
  size_t a = 0;
  int64_t macs = 0;
  for (size_t i = 0; i < n; ++i) {
    const size_t need = a + 3 + (has_offset[i] ? 1 : 0);
    if (need > args.size()) {
      return ffi::Error::InvalidArgument("pallax_qmatmul_multi: too few operands");
    }
    auto x = args.get<ffi::Buffer<ffi::F32>>(a);
    auto data = args.get<ffi::AnyBuffer>(a + 1);
    auto scale = args.get<ffi::Buffer<ffi::F32>>(a + 2);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (x.has_error() || data.has_error() || scale.has_error() || y.has_error()) {
      return ffi::Error::InvalidArgument("pallax_qmatmul_multi: member " + std::to_string(i) +
                                         ": x, scale and y must be float32");
    }
    const float* offset = nullptr;
    if (has_offset[i]) {
      auto off = args.get<ffi::Buffer<ffi::F32>>(a + 3);
      if (off.has_error() || off->dimensions().size() != 2 ||
          off->dimensions()[0] != scale->dimensions()[0] ||
          off->dimensions()[1] != scale->dimensions()[1]) {
        return ffi::Error::InvalidArgument("pallax_qmatmul_multi: member " +
                                           std::to_string(i) + ": offset and scale differ");
      }
      offset = off->typed_data();
    }
    a = need;
    ffi::Error err = Setup(p[i], kernels[i], x->typed_data(), x->dimensions(),
                           data->untyped_data(), data->element_type(), data->dimensions(),
                           scale->typed_data(), scale->dimensions(), offset,
                           (*y)->typed_data(), bits[i], group_size[i]);
    if (err.failure()) return err;
    macs += p[i].rows * p[i].out * p[i].ip;
  }
  if (a != args.size()) {
    return ffi::Error::InvalidArgument("pallax_qmatmul_multi: too many operands");
  }
  const int64_t threads = pallax_cpu::ThreadsFor(macs);
  std::vector<int64_t> first(n + 1, 0);  // each member's first task
  for (size_t i = 0; i < n; ++i) {
    if (p[i].rows > 0 && p[i].out > 0) {
      QuantizeActivations(p[i], kernels[i], scratch[i], threads);
      tasks[i] = Split(p[i], threads);
    }
    first[i + 1] = first[i] + tasks[i].count();
  }
  ParallelForSpin(threads, first[n], [&](int64_t t) {
    size_t i = 0;
    while (t >= first[i + 1]) ++i;
    RunTask(p[i], kernels[i], tasks[i], t - first[i]);
  });
  return ffi::Error::Success();
}

}  // namespace pallax_qmatmul

using pallax_qmatmul::QMatmul;
using pallax_qmatmul::QMatmulMulti;
using pallax_qmatmul::QMatmulOffset;

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(PallaxQMatmulMulti, QMatmulMulti,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()  // per member: x, data, scale[, offset]
                                  .RemainingRets()  // per member: y [R, O_i]
                                  .Attr<ffi::Span<const int64_t>>("bits")
                                  .Attr<ffi::Span<const int64_t>>("group_size")
                                  .Attr<ffi::Span<const int64_t>>("offset"));
