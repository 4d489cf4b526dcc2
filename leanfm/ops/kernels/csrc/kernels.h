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

// The same for M >= kOuterMinRows (skinny_fp32_bcast.cpp): x transposed once per call by fp32_pack_xt
// into fp32_xt_size(M, K) floats, 32-byte aligned, then an outer-product tile per thread.
constexpr int64_t kOuterMinRows = 8;
int64_t fp32_xt_width(int64_t M);
int64_t fp32_xt_size(int64_t M, int64_t K);
void fp32_pack_xt(const float* x, int64_t M, int64_t K, float* xt);
void skinny_fp32_xt(const float* xt, int64_t M, int64_t K, const float* w, const float* bias, float* y,
                    int64_t N, int64_t n0, int64_t n1);

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
  // int8 activations (skinny_q8x / skinny_q4x; x and xsum above unused except xsum):
  const int8_t* xq = nullptr;  // x quantized per block of 32, blocked like x: (kb * M + m) * 32 + j
  const float* xd = nullptr;   // the block scales, xd[kb * M + m]: x ~= xq * xd
};
// x (M, K) fp32 row-major -> xb (M * K) in the blocked order above and xsum (M, G).
void quant_prepare_x(const float* x, int64_t M, int64_t K, int64_t group_size, float* xb,
                     float* xsum);
void skinny_q8(const QuantArgs& a, int64_t n0, int64_t n1);
void skinny_q4(const QuantArgs& a, int64_t n0, int64_t n1);

// The same products with x quantized to int8 per block of 32 (llama.cpp's Q8_0 for activations):
//   xd[b] = max|x[32b : 32b + 32]| / 127,  xq = round(x / xd) in [-127, 127] (x * (1 / xd), ties to
//   even), xsum[m, g] = sum over the group's blocks of xd * sum(xq); then integer dot products of
//   codes and xq (vpmaddubsw / vpmaddwd), one float fma per 32 codes. The result is the fp32
//   product of W with x' = xq * xd (tested against that); see skinny_qx.cpp.
void quant_prepare_xq(const float* x, int64_t M, int64_t K, int64_t group_size, int8_t* xq,
                      float* xd, float* xsum);
void skinny_q8x(const QuantArgs& a, int64_t n0, int64_t n1);
void skinny_q4x(const QuantArgs& a, int64_t n0, int64_t n1);

}  // namespace leanfm_kernels
