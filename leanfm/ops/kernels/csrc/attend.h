// Decode attention for all (sequence, kv head) pairs, threads over pairs and, for long contexts with
// few pairs, over ranges of keys too (each range a partial softmax, merged per pair: fused.h).
// Baseline ISA (included by the operator files).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "fused.h"
#include "parallel.h"

namespace leanfm_kernels {

struct AttendArgs {
  const float* q;  // head h of sequence b at q + b * q_b + h * q_h (D contiguous)
  int64_t q_b, q_h;
  const float *k, *v;  // key j of kv head h of sequence b at k + b * k_b + h * k_h + j * k_j
  int64_t k_b, k_h, k_j, v_b, v_h, v_j;
  float* out;  // (B, Hq, D) contiguous
  int64_t B, Hq, Hk, L, D;
  float scale, softcap;
};

inline void attend_all(const AttendArgs& a) {
  const int64_t G = a.Hq / a.Hk, pairs = a.B * a.Hk, work = G * a.L * a.D;
  constexpr int64_t kMinWork = 1 << 17;  // per range of keys
  const int64_t threads = at::get_num_threads();
  int64_t parts = 1;
  if (pairs < threads && work >= 2 * kMinWork)
    parts = std::min<int64_t>({64, (threads + pairs - 1) / pairs, work / kMinWork, a.L});
  const int64_t span = (a.L + parts - 1) / parts;
  parts = (a.L + span - 1) / span;
  std::vector<float> stats(pairs * parts * G * (a.D + 2));  // per (pair, part): mx G, sum G, acc G x D
  float* st = stats.data();
  const int64_t stride = G * (a.D + 2);
  const int64_t grain = parts > 1 ? 1 : std::max<int64_t>(1, 2 * kMinWork / std::max<int64_t>(1, work));
  par::for_ranges(pairs * parts, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> scratch(G * span);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t pr = i / parts, c = i % parts, b = pr / a.Hk, h = pr % a.Hk;
      const int64_t j0 = c * span, n = std::min(a.L, j0 + span) - j0;
      float* s = st + i * stride;
      fused::attend_partial(a.q + b * a.q_b + h * G * a.q_h, a.q_h, G,
                            a.k + b * a.k_b + h * a.k_h + j0 * a.k_j, a.k_j,
                            a.v + b * a.v_b + h * a.v_h + j0 * a.v_j, a.v_j, n, a.D, a.scale, a.softcap,
                            scratch.data(), s, s + G, s + 2 * G);
    }
  });
  std::vector<float> mx(parts * G), sum(parts * G), acc(parts * G * a.D);
  for (int64_t pr = 0; pr < pairs; ++pr) {
    for (int64_t c = 0; c < parts; ++c) {
      const float* s = st + (pr * parts + c) * stride;
      std::copy(s, s + G, mx.data() + c * G);
      std::copy(s + G, s + 2 * G, sum.data() + c * G);
      std::copy(s + 2 * G, s + stride, acc.data() + c * G * a.D);
    }
    const int64_t b = pr / a.Hk, h = pr % a.Hk;
    fused::attend_merge(parts, G, a.D, mx.data(), sum.data(), acc.data(),
                        a.out + (b * a.Hq + h * G) * a.D, a.D);
  }
}

}  // namespace leanfm_kernels
