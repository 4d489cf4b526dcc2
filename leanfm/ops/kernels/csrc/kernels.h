// Skinny GEMM kernels for the decode regime: y (M, N) = x (M, K) @ w (N, K)^T (+ bias), M small.
//
// These functions are plain C++ (no torch headers): the kernel files are compiled for AVX2 + FMA
// through `#pragma GCC target`, while ops.cpp (threading, checks, torch registration) is compiled
// for the baseline ISA, so loading the library on an older CPU cannot hit an illegal instruction
// before `cpu_supported()` has been asked.
//
// Every kernel computes the output columns [n0, n1) for all M rows; the caller splits N across
// threads in contiguous ranges, so each thread streams one contiguous slab of the weight matrix.
#pragma once

#include <cstdint>

namespace leanfm_kernels {

// Weight rows (output columns) per block; threads get whole blocks (see blocking.h).
constexpr int64_t kRowBlock = 8;

// True when the running CPU has what the kernels were compiled for (AVX2 + FMA).
bool cpu_supported();

// fp32 weights. x: (M, K) row-major, w: (N, K) row-major, bias: (N,) or nullptr, y: (M, N).
void skinny_fp32(const float* x, int64_t M, int64_t K, const float* w, const float* bias,
                 float* y, int64_t N, int64_t n0, int64_t n1);

// bf16 weights (raw uint16 bit patterns), fp32 accumulation.
// xp must come from bf16_pack_x (x as fp32, reordered to match the bf16 unpacking; same size M*K);
// x itself may be fp32 or bf16 (raw uint16).
void bf16_pack_x(const float* x, int64_t M, int64_t K, float* xp);
void bf16_pack_x(const uint16_t* x, int64_t M, int64_t K, float* xp);
void skinny_bf16(const float* xp, int64_t M, int64_t K, const uint16_t* w, const float* bias,
                 float* y, int64_t N, int64_t n0, int64_t n1);

// Weight-only quantized weights (format: leanfm/ops/kernels/quant.py), fp32 accumulation:
//   W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g],  g = k / group_size
// computed as  y[m, n] = sum_g scales[n, g] * (dot_g(q[n], x[m]) - zeros[n, g] * xsum[m, g]).
// Both kernels need K % 32 == 0 and group_size % 32 == 0.
struct QuantArgs {
  const float* x;       // x blocked by quant_prepare_x: x[m, 32b + j] at x[(b * M + m) * 32 + j]
  const float* xsum;    // (M, G) sums of x over each group (quant_prepare_x)
  int64_t M, K, G, group_size;
  const uint8_t* q;     // (N, K) codes (8 bit) or (N, K / 2) Q4_0-style nibble pairs (4 bit)
  const float* scales;  // (N, G)
  const float* zeros;   // (N, G)
  const float* bias;    // (N,) or nullptr
  float* y;             // (M, N)
  int64_t N;
};
// x (M, K) fp32 row-major -> xb (M * K) in the blocked order above and xsum (M, G).
void quant_prepare_x(const float* x, int64_t M, int64_t K, int64_t group_size, float* xb,
                     float* xsum);
void skinny_q8(const QuantArgs& a, int64_t n0, int64_t n1);
void skinny_q4(const QuantArgs& a, int64_t n0, int64_t n1);

}  // namespace leanfm_kernels
