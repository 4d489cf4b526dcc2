// The adaptive thread controller's single instance (parallel.h) and its torch operators:
//
//   torch.ops.leanfm_kernels.thread_stats() -> [regions, strikes, serial_calls, backoff_ns, enabled]
//   torch.ops.leanfm_kernels.set_adaptive_threads(bool enabled) -> bool   (the previous setting)
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "parallel.h"

namespace leanfm_kernels {
namespace par {

Controller& controller() {
  static Controller* c = [] {
    auto* p = new Controller();  // never destroyed: OpenMP threads may outlive static destructors
    const char* env = std::getenv("LEANFM_ADAPTIVE_THREADS");
    p->enabled = !(env && std::strcmp(env, "0") == 0);
    return p;
  }();
  return *c;
}

namespace {

std::vector<int64_t> thread_stats() {
  Controller& c = controller();
  return {c.regions.load(), c.strikes.load(), c.serial_calls.load(), c.backoff.load(),
          c.enabled ? 1 : 0};
}

bool set_adaptive_threads(bool enabled) {
  Controller& c = controller();
  const bool old = c.enabled;
  c.enabled = enabled;
  c.serial_until.store(0);
  c.backoff.store(0);
  return old;
}

}  // namespace
}  // namespace par
}  // namespace leanfm_kernels

TORCH_LIBRARY_FRAGMENT(leanfm_kernels, m) {
  m.def("thread_stats() -> int[]", &leanfm_kernels::par::thread_stats);
  m.def("set_adaptive_threads(bool enabled) -> bool", &leanfm_kernels::par::set_adaptive_threads);
}
