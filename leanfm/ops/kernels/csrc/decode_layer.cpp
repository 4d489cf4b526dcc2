// One decoder block for one new token per sequence, in one operator call (leanfm.models.decode_plan):
//
//   torch.ops.leanfm_kernels.decode_layer(x, cos, sin, kc, vc, start, tensors, ints, floats) -> y
//
// x (B, 1, hidden) fp32; cos, sin (B, 1, D); kc, vc (B, Hkv, max_len, D) fp32 caches, unit stride over
// D; the new key / value go to position `start`, attention reads [first, start] with first = max(0,
// start - window + 1) for a sliding window (as leanfm.models.interface.KVCacheMeta does).
//   tensors: [in, post_attn?, pre_ff, post_ff?, q_norm?, k_norm?] then for q, k, v, o, gate, up, down
//            [weight or codes, scales?, zeros?, bias?]                       (6 + 7 * 4 entries)
//   ints:    [kind, group_size] x 7 (linear_run.h kinds), n_heads, n_kv, head_dim, window (-1: none),
//            act (fused.h), int8_act, sandwich (1: Gemma's norms around attention and MLP), offset
//   floats:  [eps, scale, softcap (0: none)]
// The steps (each as the PyTorch path computes it, to fp32 rounding):
//   n = norm(x; in);  q, k, v = projections of n (one parallel region);  QK-norm, RoPE;  cache write;
//   o = attention;  a = o Wo;  sandwich: h = x + norm(a; post_attn)  else  h = x + a;  n2 = norm(h; pre_ff)
//   g = act(n2 Wg) * (n2 Wu) (one region);  m = g Wd;  y = h + norm(m; post_ff) (sandwich) or h + m.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "attend.h"
#include "fused.h"
#include "kernels.h"
#include "linear_run.h"
#include "parallel.h"

namespace leanfm_kernels {
namespace {

const char* kNames[7] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

const float* vec(const std::optional<at::Tensor>& t, int64_t D, const char* what) {
  if (!t) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                  t->dim() == 1 && t->size(0) == D,
              "decode_layer: ", what, " must be contiguous float32 (", D, ",)");
  return t->data_ptr<float>();
}

void linears(const float* x, int64_t M, int64_t K, const LinearRef* refs, size_t n, float* const* ys,
             bool int8_act) {
  if (same_family(refs, n)) {
    run_linears(x, M, K, refs, n, ys, -1, nullptr, int8_act);
  } else {
    for (size_t i = 0; i < n; ++i) run_linears(x, M, K, refs + i, 1, ys + i, -1, nullptr, int8_act);
  }
}

at::Tensor decode_layer(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& kc, const at::Tensor& vc, int64_t start,
                        const std::vector<std::optional<at::Tensor>>& t, at::IntArrayRef ints,
                        at::ArrayRef<double> floats) {
  TORCH_CHECK(cpu_supported(), "decode_layer: this CPU lacks AVX2/FMA");
  TORCH_CHECK(t.size() == 34 && ints.size() == 22 && floats.size() == 3, "decode_layer: bad plan sizes");
  for (const at::Tensor* a : {&x_in, &cos, &sin, &kc, &vc})
    TORCH_CHECK(a->device().is_cpu() && a->scalar_type() == at::kFloat && a->stride(-1) == 1,
                "decode_layer: x, cos, sin and the caches must be float32 CPU tensors, unit last stride");
  const int64_t H = ints[14], Hk = ints[15], D = ints[16], window = ints[17], act = ints[18];
  const bool int8_act = ints[19] == 1, sandwich = ints[20] == 1, offset = ints[21] == 1;
  const float eps = static_cast<float>(floats[0]), scale = static_cast<float>(floats[1]);
  const float softcap = static_cast<float>(floats[2]);
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(1) == 1, "decode_layer: x must be (B, 1, hidden)");
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), hid = x.size(2);
  TORCH_CHECK(Hk > 0 && H % Hk == 0 && D % 2 == 0 && D <= 1024, "decode_layer: bad head layout");
  TORCH_CHECK(kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.size(0) == B && kc.size(1) == Hk &&
                  kc.size(3) == D && start >= 0 && start < kc.size(2),
              "decode_layer: caches must be (B, Hkv, max_len, D) with room at position ", start);
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == B && cos.size(1) == 1 && cos.size(2) == D &&
                  sin.sizes() == cos.sizes(),
              "decode_layer: cos and sin must be (B, 1, head_dim)");
  TORCH_CHECK(act == fused::kGeluTanh || act == fused::kSilu, "decode_layer: act must be 0 or 1");
  const float* w_in = vec(t[0], hid, "input norm");
  const float* w_post = vec(t[1], hid, "post-attention norm");
  const float* w_pre = vec(t[2], hid, "pre-MLP norm");
  const float* w_postff = vec(t[3], hid, "post-MLP norm");
  const float* w_qn = vec(t[4], D, "q_norm");
  const float* w_kn = vec(t[5], D, "k_norm");
  TORCH_CHECK(w_in && w_pre && (!sandwich || (w_post && w_postff)), "decode_layer: missing norms");

  LinearRef refs[7];
  for (int i = 0; i < 7; ++i) {
    const auto& w = t[6 + 4 * i];
    TORCH_CHECK(w.has_value(), "decode_layer: no weight for ", kNames[i]);
    const int64_t K = i == 3 ? H * D : i == 6 ? refs[4].N : hid;
    refs[i] = make_linear_ref(ints[2 * i], *w, t[7 + 4 * i] ? &*t[7 + 4 * i] : nullptr,
                              t[8 + 4 * i] ? &*t[8 + 4 * i] : nullptr,
                              t[9 + 4 * i] ? &*t[9 + 4 * i] : nullptr, K, ints[2 * i + 1], kNames[i]);
  }
  const int64_t F = refs[4].N;
  TORCH_CHECK(refs[0].N == H * D && refs[1].N == Hk * D && refs[2].N == Hk * D && refs[3].N == hid &&
                  refs[5].N == F && refs[6].K == F && refs[6].N == hid,
              "decode_layer: projection shapes do not match the head layout");

  // scratch: n, q, k, v, qr, o, a, h, n2, g, u, gu, m, attention scores
  const int64_t first = window > 0 ? std::max<int64_t>(0, start - window + 1) : 0, L = start + 1 - first;
  std::vector<float> buf(B * (5 * hid + 3 * H * D + 2 * Hk * D + 3 * F));
  float *n = buf.data(), *q = n + B * hid, *k = q + B * H * D, *v = k + B * Hk * D;
  float *qr = v + B * Hk * D, *o = qr + B * H * D, *a = o + B * H * D, *h = a + B * hid;
  float *n2 = h + B * hid, *g = n2 + B * hid, *u = g + B * F, *gu = u + B * F, *m = gu + B * F;
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();

  for (int64_t b = 0; b < B; ++b) fused::rms_norm_row(xp + b * hid, hid, w_in, offset, eps, n + b * hid);
  float* qkv[3] = {q, k, v};
  linears(n, B, hid, refs, 3, qkv, int8_act);

  float *kcp = kc.data_ptr<float>(), *vcp = vc.data_ptr<float>();
  const int64_t ks0 = kc.stride(0), ks1 = kc.stride(1), ks2 = kc.stride(2);
  const int64_t vs0 = vc.stride(0), vs1 = vc.stride(1), vs2 = vc.stride(2);
  for (int64_t b = 0; b < B; ++b) {
    const float *cb = cos.data_ptr<float>() + b * cos.stride(0), *sb = sin.data_ptr<float>() + b * sin.stride(0);
    for (int64_t hh = 0; hh < H; ++hh)
      fused::norm_rope_vec(q + (b * H + hh) * D, D, w_qn, offset, eps, cb, sb, qr + (b * H + hh) * D);
    for (int64_t hh = 0; hh < Hk; ++hh) {
      fused::norm_rope_vec(k + (b * Hk + hh) * D, D, w_kn, offset, eps, cb, sb,
                           kcp + b * ks0 + hh * ks1 + start * ks2);
      const float* vs = v + (b * Hk + hh) * D;
      std::copy(vs, vs + D, vcp + b * vs0 + hh * vs1 + start * vs2);
    }
  }
  attend_all({qr, H * D, D, kcp + first * ks2, vcp + first * vs2, ks0, ks1, ks2, vs0, vs1, vs2, o, B, H,
              Hk, L, D, scale, softcap});
  run_linears(o, B, H * D, refs + 3, 1, &a, -1, nullptr, int8_act);
  for (int64_t b = 0; b < B; ++b)
    fused::add_rms_norm_row(xp + b * hid, a + b * hid, hid, sandwich ? w_post : nullptr, w_pre, offset,
                            eps, h + b * hid, n2 + b * hid);
  float* gate_up[2] = {g, u};
  if (same_family(refs + 4, 2)) {
    run_linears(n2, B, hid, refs + 4, 2, gate_up, act, gu, int8_act);
  } else {
    linears(n2, B, hid, refs + 4, 2, gate_up, int8_act);
    fused::gated_act(g, u, B * F, act, gu);
  }
  run_linears(gu, B, F, refs + 6, 1, &m, -1, nullptr, int8_act);
  for (int64_t b = 0; b < B; ++b)
    fused::add_rms_norm_row(h + b * hid, m + b * hid, hid, sandwich ? w_postff : nullptr, nullptr, offset,
                            eps, yp + b * hid, nullptr);
  return y;
}

}  // namespace
}  // namespace leanfm_kernels

TORCH_LIBRARY_FRAGMENT(leanfm_kernels, m) {
  m.def("decode_layer(Tensor x, Tensor cos, Tensor sin, Tensor(a!) kc, Tensor(b!) vc, int start, "
        "Tensor?[] tensors, int[] ints, float[] floats) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanfm_kernels, CPU, m) { m.impl("decode_layer", &leanfm_kernels::decode_layer); }
