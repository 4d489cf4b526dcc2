// The parts of a decoder block's decode step that do not depend on the KV cache's layout, shared by
// decode_layer.cpp (contiguous cache) and paged_decode_layer.cpp (paged cache). Baseline ISA: it reads
// the plan and dispatches to the fused kernels (fused.h) and the linear runner (linear_run.h).
//
// A plan (built by leanfm.models.decode_plan) is
//   tensors: [in, post_attn?, pre_ff, post_ff?, q_norm?, k_norm?] then for q, k, v, o, gate, up, down
//            [weight or codes, scales?, zeros?, bias?]                       (6 + 7 * 4 entries)
//   ints:    [kind, group_size] x 7 (linear_run.h kinds), n_heads, n_kv, head_dim, window (-1: none),
//            act (fused.h), int8_act, sandwich (1: Gemma's norms around attention and MLP), offset
//   floats:  [eps, scale, softcap (0: none)]
// and a step of B rows (one new token each) is
//   block_qkv:  n = norm(x; in);  q, k, v = projections of n (one parallel region)
//   (the caller: QK-norm and RoPE (fused::norm_rope_vec), cache write, attention o)
//   block_out:  a = o Wo;  sandwich: h = x + norm(a; post_attn)  else  h = x + a;  n2 = norm(h; pre_ff)
//               g = act(n2 Wg) * (n2 Wu) (one region);  m = g Wd;  y = h + norm(m; post_ff) or h + m.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "fused.h"
#include "linear_run.h"

namespace leanfm_kernels {
namespace block {

struct Plan {
  int64_t hid = 0, H = 0, Hk = 0, D = 0, F = 0, window = -1, act = 0;
  bool int8_act = false, sandwich = false, offset = false;
  float eps = 0.0f, scale = 0.0f, softcap = 0.0f;
  const float *w_in = nullptr, *w_post = nullptr, *w_pre = nullptr, *w_postff = nullptr;
  const float *w_qn = nullptr, *w_kn = nullptr;
  LinearRef refs[7];
};

inline const float* plan_vec(const std::optional<at::Tensor>& t, int64_t D, const char* op, const char* what) {
  if (!t) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                  t->dim() == 1 && t->size(0) == D,
              op, ": ", what, " must be contiguous float32 (", D, ",)");
  return t->data_ptr<float>();
}

// Checks and reads a plan for a model of hidden size `hid`; `op` names the operator in errors.
inline Plan read_plan(const std::vector<std::optional<at::Tensor>>& t, at::IntArrayRef ints,
                      at::ArrayRef<double> floats, int64_t hid, const char* op) {
  static const char* kNames[7] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  TORCH_CHECK(t.size() == 34 && ints.size() == 22 && floats.size() == 3, op, ": bad plan sizes");
  Plan p;
  p.hid = hid;
  p.H = ints[14], p.Hk = ints[15], p.D = ints[16], p.window = ints[17], p.act = ints[18];
  p.int8_act = ints[19] == 1, p.sandwich = ints[20] == 1, p.offset = ints[21] == 1;
  p.eps = static_cast<float>(floats[0]), p.scale = static_cast<float>(floats[1]);
  p.softcap = static_cast<float>(floats[2]);
  TORCH_CHECK(p.Hk > 0 && p.H % p.Hk == 0 && p.D % 2 == 0 && p.D <= 1024, op, ": bad head layout");
  TORCH_CHECK(p.act == fused::kGeluTanh || p.act == fused::kSilu, op, ": act must be 0 or 1");
  p.w_in = plan_vec(t[0], hid, op, "input norm");
  p.w_post = plan_vec(t[1], hid, op, "post-attention norm");
  p.w_pre = plan_vec(t[2], hid, op, "pre-MLP norm");
  p.w_postff = plan_vec(t[3], hid, op, "post-MLP norm");
  p.w_qn = plan_vec(t[4], p.D, op, "q_norm");
  p.w_kn = plan_vec(t[5], p.D, op, "k_norm");
  TORCH_CHECK(p.w_in && p.w_pre && (!p.sandwich || (p.w_post && p.w_postff)), op, ": missing norms");
  for (int i = 0; i < 7; ++i) {
    const auto& w = t[6 + 4 * i];
    TORCH_CHECK(w.has_value(), op, ": no weight for ", kNames[i]);
    const int64_t K = i == 3 ? p.H * p.D : i == 6 ? p.refs[4].N : hid;
    p.refs[i] = make_linear_ref(ints[2 * i], *w, t[7 + 4 * i] ? &*t[7 + 4 * i] : nullptr,
                                t[8 + 4 * i] ? &*t[8 + 4 * i] : nullptr,
                                t[9 + 4 * i] ? &*t[9 + 4 * i] : nullptr, K, ints[2 * i + 1], kNames[i]);
  }
  p.F = p.refs[4].N;
  const LinearRef* r = p.refs;
  TORCH_CHECK(r[0].N == p.H * p.D && r[1].N == p.Hk * p.D && r[2].N == p.Hk * p.D && r[3].N == hid &&
                  r[5].N == p.F && r[6].K == p.F && r[6].N == hid,
              op, ": projection shapes do not match the head layout");
  return p;
}

// ys[i] = x W_i^T for n refs: one parallel region when they share a family, else one each
inline void linears(const float* x, int64_t M, int64_t K, const LinearRef* refs, size_t n, float* const* ys,
                    bool int8_act) {
  if (same_family(refs, n)) {
    run_linears(x, M, K, refs, n, ys, -1, nullptr, int8_act);
  } else {
    for (size_t i = 0; i < n; ++i) run_linears(x, M, K, refs + i, 1, ys + i, -1, nullptr, int8_act);
  }
}

// x (B, hid) -> q (B, H * D), k, v (B, Hk * D); n (B, hid) scratch
inline void qkv(const Plan& p, const float* x, int64_t B, float* n, float* q, float* k, float* v) {
  for (int64_t b = 0; b < B; ++b) fused::rms_norm_row(x + b * p.hid, p.hid, p.w_in, p.offset, p.eps, n + b * p.hid);
  float* ys[3] = {q, k, v};
  linears(n, B, p.hid, p.refs, 3, ys, p.int8_act);
}

// x (B, hid), attention output o (B, H * D) -> y (B, hid)
inline void out(const Plan& p, const float* x, const float* o, int64_t B, float* y) {
  const int64_t hid = p.hid, F = p.F;
  std::vector<float> buf(B * (4 * hid + 3 * F));
  float *a = buf.data(), *h = a + B * hid, *n2 = h + B * hid, *g = n2 + B * hid, *u = g + B * F;
  float *gu = u + B * F, *m = gu + B * F;
  run_linears(o, B, p.H * p.D, p.refs + 3, 1, &a, -1, nullptr, p.int8_act);
  for (int64_t b = 0; b < B; ++b)
    fused::add_rms_norm_row(x + b * hid, a + b * hid, hid, p.sandwich ? p.w_post : nullptr, p.w_pre, p.offset,
                            p.eps, h + b * hid, n2 + b * hid);
  float* gate_up[2] = {g, u};
  if (same_family(p.refs + 4, 2)) {
    run_linears(n2, B, hid, p.refs + 4, 2, gate_up, p.act, gu, p.int8_act);
  } else {
    linears(n2, B, hid, p.refs + 4, 2, gate_up, p.int8_act);
    fused::gated_act(g, u, B * F, p.act, gu);
  }
  run_linears(gu, B, F, p.refs + 6, 1, &m, -1, nullptr, p.int8_act);
  for (int64_t b = 0; b < B; ++b)
    fused::add_rms_norm_row(h + b * hid, m + b * hid, hid, p.sandwich ? p.w_postff : nullptr, nullptr, p.offset,
                            p.eps, y + b * hid, nullptr);
}

}  // namespace block
}  // namespace leanfm_kernels
