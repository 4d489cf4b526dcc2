// x prepared once per call for the weight-only quantized kernels, in either activation mode, and
// the dispatch by bits and mode (included by the operator files; baseline ISA).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.h"

namespace leanfm_kernels {

struct PreparedX {
  bool int8 = false;
  std::vector<float> f;    // fp32 mode: blocked x (M * K), then xsum (M * G)
                           // int8 mode: xd (M * K / 32), then xsum (M * G)
  std::vector<int8_t> q;   // int8 mode: blocked codes (M * K)
  int64_t sum_at = 0;      // offset of xsum in f

  QuantArgs args(int64_t M, int64_t K, int64_t G, int64_t group_size) const {
    QuantArgs a{};
    a.x = int8 ? nullptr : f.data();
    a.xsum = f.data() + sum_at;
    a.M = M, a.K = K, a.G = G, a.group_size = group_size;
    if (int8) a.xq = q.data(), a.xd = f.data();
    return a;
  }
};

inline PreparedX prepare_x(const float* x, int64_t M, int64_t K, int64_t group_size, bool int8) {
  PreparedX p;
  p.int8 = int8;
  const int64_t G = K / group_size;
  if (int8) {
    p.q.resize(M * K);
    p.sum_at = M * K / 32;
    p.f.resize(p.sum_at + M * G);
    quant_prepare_xq(x, M, K, group_size, p.q.data(), p.f.data(), p.f.data() + p.sum_at);
  } else {
    p.sum_at = M * K;
    p.f.resize(p.sum_at + M * G);
    quant_prepare_x(x, M, K, group_size, p.f.data(), p.f.data() + p.sum_at);
  }
  return p;
}

inline void run_quant(const QuantArgs& a, int64_t bits, bool int8, int64_t n0, int64_t n1) {
  if (bits == 8)
    int8 ? skinny_q8x(a, n0, n1) : skinny_q8(a, n0, n1);
  else
    int8 ? skinny_q4x(a, n0, n1) : skinny_q4(a, n0, n1);
}

}  // namespace leanfm_kernels
