// Threading shared by the CPU kernels: fn(0..n-1) over the calling thread and XLA's
// intra-op thread pool.
//
// Tasks are claimed from an atomic counter by the calling thread and up to
// (threads - 1) tasks scheduled on the pool. The caller never waits on a task that has
// not started, so a busy pool cannot deadlock it; a task that starts after the work is
// gone returns.

#ifndef PALLAX_CPU_KERNELS_PARALLEL_H_
#define PALLAX_CPU_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace pallax_cpu {

namespace ffi = xla::ffi;

// Runs fn(0..n-1) on the calling thread and on up to (threads - 1) pool tasks.
struct Claims {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  const std::function<void(int64_t)>* fn = nullptr;  // valid while done < total

  void Work() {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < total;) {
      (*fn)(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

inline void ParallelFor(ffi::ThreadPool& pool, int64_t threads, int64_t n,
                 const std::function<void(int64_t)>& fn) {
  threads = std::min(threads, n);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto claims = std::make_shared<Claims>();
  claims->total = n;
  claims->fn = &fn;
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([claims] { claims->Work(); });
  claims->Work();
  // Every index is claimed; wait for the ones pool threads are still running.
  for (int spins = 0; claims->done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < 4096) {
#if defined(__AVX2__)
      _mm_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

inline int64_t PoolThreads(ffi::ThreadPool& pool) {
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t n = pool.num_threads();
  return n > 0 ? std::min(n, hw) : 1;
}

}  // namespace pallax_cpu

#endif  // PALLAX_CPU_KERNELS_PARALLEL_H_
