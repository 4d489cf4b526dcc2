// One description of a decode-time linear layer for every weight form the kernels know, and a
// routine that runs several of them on one x in a single parallel region (group_ops.cpp,
// decode_layer.cpp). Baseline ISA: it only prepares x and dispatches to the AVX2 kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "kernels.h"

namespace leanfm_kernels {

// kS24 / kS24BF16: 2:4-sparse weight (sparse_nm.h) with fp32 / bf16 kept values.
enum LinearKind : int64_t { kF32 = 0, kBF16 = 1, kQ4 = 4, kQ8 = 8, kS24 = 24, kS24BF16 = 25 };

struct LinearRef {
  int64_t kind = kF32;
  const void* w = nullptr;        // fp32 / bf16 weight (N, K), the quantized codes, or 2:4 values
  const float* scales = nullptr;  // quantized: (N, K / group_size)
  const float* zeros = nullptr;
  const uint8_t* indices = nullptr;  // 2:4: (N, K / 8) packed in-group positions
  const float* bias = nullptr;    // (N,) fp32 or null
  int64_t N = 0, K = 0, group_size = 0;
};

// Checks the tensors of one layer (w: fp32 or bf16 weight for kF32 / kBF16, uint8 codes for kQ4 /
// kQ8, fp32 / bf16 kept values (N, K / 2) for kS24 / kS24BF16; scales, zeros: fp32 (N, K / group_size)
// for the quantized kinds; for the 2:4 kinds `scales` is the uint8 indices (N, K / 8) and zeros is
// unused; bias: fp32 (N,) or none; everything contiguous on the CPU) and describes it. `what` names
// the layer in errors.
LinearRef make_linear_ref(int64_t kind, const at::Tensor& w, const at::Tensor* scales,
                          const at::Tensor* zeros, const at::Tensor* bias, int64_t K,
                          int64_t group_size, const char* what);

// True when refs can share one prepared x: one kind and K, and for quantized kinds one group size.
bool same_family(const LinearRef* refs, size_t n);

// ys[i] (M, N_i) = x (M, K) @ W_i^T + b_i for the n refs (one family), in one parallel region.
// epilogue -1: as said; 0 (gelu tanh) / 1 (silu): n == 2 with one N, and out (M, N) = act(y0) * y1
// is written by each thread for its columns (ys are still filled, as scratch).
// int8_act: quantized kinds take x quantized per block of 32 (kernels.h: quant_prepare_xq).
// The 2:4 kinds take x reordered once (sparse24_pack_x) for all refs.
void run_linears(const float* x, int64_t M, int64_t K, const LinearRef* refs, size_t n,
                 float* const* ys, int64_t epilogue, float* out, bool int8_act);

}  // namespace leanfm_kernels
