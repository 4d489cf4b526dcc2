// Small fused kernels of the decoder's per-token work besides the linear layers (plain C++, no torch
// headers; compiled for AVX2 + FMA in fused_math.cpp, called from fused_ops.cpp). All fp32.
//
// RMSNorm:  out = (x * rsqrt(mean(x^2) + eps)) * w'    with w' = 1 + w (Gemma, offset) or w (Llama)
// RoPE:     rotate-half (NeoX) convention: out = x * cos + [-x2, x1] * sin over the head dimension
// Gated activations: out = act(g) * u with act = gelu (tanh approximation, as x * sigmoid(2 z)) or
//           silu; both through a vectorized exp (Cephes polynomial, ~1 ulp).
#pragma once

#include <cstdint>

namespace leanfm_kernels {
namespace fused {

enum Act : int64_t { kGeluTanh = 0, kSilu = 1 };

// One row of D values: out = rmsnorm(x) (out may equal x).
void rms_norm_row(const float* x, int64_t D, const float* w, bool offset, float eps, float* out);

// h = x + rmsnorm(a; w1) (w1 null: h = x + a); then n = rmsnorm(h; w2) when w2 is not null.
void add_rms_norm_row(const float* x, const float* a, int64_t D, const float* w1, const float* w2,
                      bool offset, float eps, float* h, float* n);

// One head vector: optional rmsnorm (w null: none), then RoPE with cos/sin of D values.
void norm_rope_vec(const float* x, int64_t D, const float* w, bool offset, float eps,
                   const float* cos, const float* sin, float* out);

// out[i] = act(g[i]) * u[i]
void gated_act(const float* g, const float* u, int64_t n, int64_t act, float* out);

// Index of the largest value (the first one on ties; the first NaN if there is a NaN).
int64_t argmax(const float* x, int64_t n);

// Attention of G query heads sharing one kv head, one query position each, over L keys:
//   scores[g, j] = scale * q[g] . k[j] (soft-capped: tanh(s / softcap) * softcap, if softcap > 0)
//   mx[g] = max_j scores, sum[g] = sum_j exp(scores - mx), acc[g] (D) = sum_j exp(scores - mx) v[j]
// q: G rows of D at stride q_stride; k, v: L rows of D at strides k_stride, v_stride; scratch >= G * L.
// A range of keys gives a partial result; attend_merge combines `parts` of them (at most 64):
//   out[g] = sum_c e^(mx_c - M) acc_c / sum_c e^(mx_c - M) sum_c,  M = max_c mx_c
// (partial c's mx, sum at [c * G + g], acc at [(c * G + g) * D]).
void attend_partial(const float* q, int64_t q_stride, int64_t G, const float* k, int64_t k_stride,
                    const float* v, int64_t v_stride, int64_t L, int64_t D, float scale, float softcap,
                    float* scratch, float* mx, float* sum, float* acc);
void attend_merge(int64_t parts, int64_t G, int64_t D, const float* mx, const float* sum,
                  const float* acc, float* out, int64_t out_stride);

}  // namespace fused
}  // namespace leanfm_kernels
