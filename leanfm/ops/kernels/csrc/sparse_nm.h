// 2:4-sparse skinny GEMM: y (M, N) = x (M, K) @ W^T (+ bias) with W stored compressed (leanfm.ops.sparsity):
// values (N, K/2) - the two kept weights of every group of 4 inputs, in input order - and indices
// (N, K/8) bytes, four 2-bit in-group positions per byte, lowest bits first. K % 32 == 0.
//
// Plain C++ (no torch headers), compiled for AVX2 + FMA via #pragma GCC target like the dense kernels.
// Computes output columns [n0, n1) for all M rows.
#pragma once

#include <cstdint>

namespace leanfm_kernels {

// x (M, K) fp32 -> xr (M, K): the input order the kernels read (per 16 inputs, the middle two groups
// of 4 swap places). The sparse24_* functions take xr.
void sparse24_pack_x(const float* x, int64_t M, int64_t K, float* xr);

void sparse24_fp32(const float* x, int64_t M, int64_t K, const float* values, const uint8_t* indices,
                   const float* bias, float* y, int64_t N, int64_t n0, int64_t n1);

// values as raw bf16 bit patterns; fp32 accumulation
void sparse24_bf16(const float* x, int64_t M, int64_t K, const uint16_t* values, const uint8_t* indices,
                   const float* bias, float* y, int64_t N, int64_t n0, int64_t n1);

}  // namespace leanfm_kernels
