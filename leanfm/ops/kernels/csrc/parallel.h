// How the kernels use threads: one contiguous range of work per thread, in a single parallel region
// per operator call, and an adaptive retreat to the calling thread alone when threads are late.
//
// Why: an OpenMP parallel region ends in a barrier. When another process holds one of the cores, a
// thread of ours is descheduled for a whole scheduler slice (milliseconds) and every region waits
// for it; at ~100 regions per decoded token, 2-thread decode fell from ~18 to ~1.5 tok/s.
//
// The rule (Controller::observe): a region whose wall time exceeds the sum of its threads' busy
// times plus kSlackNs ran slower than one thread would have; that is a "strike". After a strike the
// operators run on the calling thread for `backoff` (20 ms, doubling on repeated strikes up to 1 s),
// then one region probes the threads again. A strike older than kForgetNs is forgotten (the backoff
// restarts at 20 ms). On an idle machine no region strikes (wall ~ busy / threads + a few us), so
// nothing changes there; a persistent hog costs at most one late region per second.
//
// LEANFM_ADAPTIVE_THREADS=0 (read when the library loads) turns the retreat off.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

namespace leanfm_kernels {
namespace par {

constexpr int64_t kSlackNs = 150'000;
constexpr int64_t kMinBackoffNs = 20'000'000;
constexpr int64_t kMaxBackoffNs = 1'000'000'000;
constexpr int64_t kForgetNs = 2'000'000'000;
constexpr int kMaxThreads = 64;

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct Controller {
  bool enabled = true;
  std::atomic<int64_t> serial_until{0}, backoff{0}, last_strike{0};
  std::atomic<int64_t> regions{0}, strikes{0}, serial_calls{0};

  bool parallel_allowed(int64_t now) const {
    return !enabled || now >= serial_until.load(std::memory_order_relaxed);
  }

  // wall: entry to exit of a region; busy: sum over threads of their work time.
  void observe(int64_t wall, int64_t busy, int64_t now) {
    regions.fetch_add(1, std::memory_order_relaxed);
    if (!enabled) return;
    if (wall > busy + kSlackNs) {
      strikes.fetch_add(1, std::memory_order_relaxed);
      const int64_t b = backoff.load(std::memory_order_relaxed);
      const int64_t nb = b ? std::min(2 * b, kMaxBackoffNs) : kMinBackoffNs;
      backoff.store(nb, std::memory_order_relaxed);
      serial_until.store(now + nb, std::memory_order_relaxed);
      last_strike.store(now, std::memory_order_relaxed);
    } else if (backoff.load(std::memory_order_relaxed) &&
               now - last_strike.load(std::memory_order_relaxed) > kForgetNs) {
      backoff.store(0, std::memory_order_relaxed);
    }
  }
};

Controller& controller();  // parallel.cpp

// fn(i0, i1) over [0, n) in contiguous ranges, at most one per thread and each at least `grain`
// items (fewer than 2 * grain items run on the calling thread alone).
template <typename Fn>
void for_ranges(int64_t n, int64_t grain, const Fn& fn) {
  if (n <= 0) return;
  const int64_t nt = std::min<int64_t>(
      {static_cast<int64_t>(at::get_num_threads()), (n + grain - 1) / std::max<int64_t>(1, grain),
       static_cast<int64_t>(kMaxThreads)});
  if (nt <= 1 || at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  Controller& c = controller();
  const int64_t t0 = now_ns();
  if (!c.parallel_allowed(t0)) {
    c.serial_calls.fetch_add(1, std::memory_order_relaxed);
    fn(0, n);
    return;
  }
  int64_t busy[kMaxThreads] = {};
  at::parallel_for(0, nt, 1, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      const int64_t s = now_ns();
      const int64_t i0 = n * t / nt, i1 = n * (t + 1) / nt;
      if (i0 < i1) fn(i0, i1);
      busy[t] = now_ns() - s;
    }
  });
  const int64_t t1 = now_ns();
  int64_t total = 0;
  for (int64_t t = 0; t < nt; ++t) total += busy[t];
  c.observe(t1 - t0, total, t1);
}

}  // namespace par
}  // namespace leanfm_kernels
