// Threading shared by the CPU kernels: fn(0..n-1) over the calling thread and the
// library's own workers (SpinPool), which spin for a while after each job before they
// sleep.
//
// A batch-1 decode step is ~240 kernel calls of 5-30 us each, with the XLA ops between
// them on one thread. Waking a thread of XLA's intra-op pool per call (tens of
// microseconds) cost what the second core saved; a spinning worker starts within a
// microsecond (SmolLM2 Q4_1 decode on 2 cores: 90 -> 115-136 tok/s).
//
// Tasks are claimed from an atomic counter and the caller works too: it never waits on
// a task nobody has started, so a busy or sleeping pool cannot deadlock it, and it
// waits only for tasks a worker is running.

#ifndef PALLAX_CPU_KERNELS_PARALLEL_H_
#define PALLAX_CPU_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace pallax_cpu {

inline void CpuRelax() {
#if defined(__AVX2__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// The tasks of one job: fn(0..total-1), claimed in order.
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

  // Waits for the claimed tasks still running elsewhere (every index is claimed).
  void WaitDone() {
    for (int spins = 0; done.load(std::memory_order_acquire) < total; ++spins) {
      if (spins < 4096) {
        CpuRelax();
      } else {
        std::this_thread::yield();
      }
    }
  }
};

inline int64_t HardwareThreads() {
  return std::max<int64_t>(1, std::thread::hardware_concurrency());
}

// Workers that wait for jobs by spinning for kSpin after their last one, then sleep
// on a condition variable. One job runs at a time; a caller that finds the pool busy
// (another thread's kernel call) runs its tasks alone.
class SpinPool {
 public:
  static constexpr std::chrono::microseconds kSpin{2000};

  static SpinPool& Get() {
    // Leaked on purpose: workers must not be joined from a static destructor while
    // XLA may still be running kernels at exit.
    static SpinPool* pool = new SpinPool(HardwareThreads() - 1);
    return *pool;
  }

  int64_t workers() const { return static_cast<int64_t>(threads_.size()); }

  void Run(int64_t threads, int64_t n, const std::function<void(int64_t)>& fn) {
    threads = std::min({threads, n, workers() + 1});
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (threads <= 1 || !busy.owns_lock()) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    Claims claims;
    claims.total = n;
    claims.fn = &fn;
    wanted_.store(threads - 1, std::memory_order_relaxed);
    job_.store(&claims, std::memory_order_seq_cst);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      sleep_cv_.notify_all();
    }
    claims.Work();
    claims.WaitDone();
    // No worker may touch `claims` after this returns: unpublish it, then wait for the
    // workers that already picked it up.
    job_.store(nullptr, std::memory_order_seq_cst);
    while (inside_.load(std::memory_order_seq_cst) > 0) CpuRelax();
  }

 private:
  explicit SpinPool(int64_t n) {
    for (int64_t i = 0; i < n; ++i) threads_.emplace_back([this] { Loop(); });
    for (auto& t : threads_) t.detach();
  }

  void Loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        CpuRelax();
        if ((spins & 1023) != 1023) continue;
        std::this_thread::yield();  // let a thread that needs this core have it
        if (std::chrono::steady_clock::now() - start < kSpin) continue;
        std::unique_lock<std::mutex> lock(sleep_mu_);
        sleeping_.fetch_add(1, std::memory_order_seq_cst);
        sleep_cv_.wait(lock, [&] { return generation_.load(std::memory_order_seq_cst) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_seq_cst);
        break;
      }
      seen = generation_.load(std::memory_order_acquire);
      inside_.fetch_add(1, std::memory_order_seq_cst);
      Claims* job = job_.load(std::memory_order_seq_cst);
      if (job != nullptr && wanted_.fetch_sub(1, std::memory_order_relaxed) > 0) job->Work();
      inside_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  std::vector<std::thread> threads_;
  std::mutex run_mu_;  // one job at a time
  std::atomic<Claims*> job_{nullptr};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> wanted_{0};   // helpers the job still takes
  std::atomic<int64_t> inside_{0};   // workers between picking up a job and leaving it
  std::atomic<int64_t> sleeping_{0};
  std::mutex sleep_mu_;
  std::condition_variable sleep_cv_;
};

// fn(0..n-1) over the calling thread and up to (threads - 1) spinning workers.
inline void ParallelForSpin(int64_t threads, int64_t n, const std::function<void(int64_t)>& fn) {
  SpinPool::Get().Run(threads, n, fn);
}

// The most threads a kernel call uses: $PALLAX_CPU_THREADS when set (read once), else
// the hardware's.
inline int64_t MaxThreads() {
  static const int64_t n = [] {
    const char* env = std::getenv("PALLAX_CPU_THREADS");
    const int64_t hw = HardwareThreads();
    if (env == nullptr || *env == '\0') return hw;
    const long v = std::strtol(env, nullptr, 10);
    return v >= 1 ? std::min<int64_t>(v, hw) : hw;
  }();
  return n;
}

// From about this many multiply-adds a call is split over the spinning workers (a
// 192 x 576 int4 projection of one row, 110K, takes ~4 us on one core).
constexpr int64_t kMinSpinMacs = int64_t{1} << 16;

inline int64_t ThreadsFor(int64_t macs) { return macs >= kMinSpinMacs ? MaxThreads() : 1; }

}  // namespace pallax_cpu

#endif  // PALLAX_CPU_KERNELS_PARALLEL_H_
