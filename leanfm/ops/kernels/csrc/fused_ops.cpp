// Torch operators around fused.h (fp32, CPU; checks and layout here, arithmetic in fused_math.cpp):
//
//   rms_norm(x, w, eps, offset) -> y                        (..., D)
//   add_rms_norm(x, a, w1?, w2?, eps, offset) -> (h, n)     h = x + norm(a; w1) (x + a if w1 is
//                                                           None), n = norm(h; w2) (empty if None)
//   qk_norm_rope(q, k, wq?, wk?, cos, sin, eps, offset) -> (q', k')
//       q (B, T, Hq, D), k (B, T, Hk, D) with unit stride over D, cos / sin (B, T, D);
//       per head optional RMSNorm, then RoPE; outputs (B, Hq, T, D), (B, Hk, T, D) contiguous
//   rope_cos_sin(positions, inv_freq) -> (cos, sin)          positions int64 (B, T) -> (B, T, D)
//   gated_act(g, u, act) -> act(g) * u                      act 0 gelu (tanh approx.), 1 silu
//   argmax_last(x) -> int64 (...,)                          x (..., V)
//   decode_attention(q, k, v, scale, softcap) -> out        q (B, Hq, 1, D), k / v (B, Hk, L, D)
//       with unit stride over D; softcap <= 0 means none; out (B, Hq, 1, D) contiguous
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "attend.h"
#include "fused.h"
#include "kernels.h"
#include "parallel.h"

namespace leanfm_kernels {
namespace {

void check_f32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor");
}

void check_norm_weight(const at::Tensor& w, int64_t D, const char* op) {
  check_f32(w, op, "weight");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == D && w.is_contiguous(), op, ": weight must be (", D,
              ",) contiguous, got ", w.sizes());
}

// rows of D: inline for decode-sized inputs, threads for prefill-sized ones
template <typename Fn>
void over_rows(int64_t rows, int64_t D, const Fn& fn) {
  par::for_ranges(rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, D)), fn);
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w, double eps, bool offset) {
  check_f32(x_in, "rms_norm", "x");
  TORCH_CHECK(cpu_supported(), "rms_norm: this CPU lacks AVX2/FMA");
  const int64_t D = x_in.size(-1);
  check_norm_weight(w, D, "rms_norm");
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_rows(D ? x.numel() / D : 0, D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      fused::rms_norm_row(xp + r * D, D, wp, offset, static_cast<float>(eps), yp + r * D);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& a_in,
                                                const std::optional<at::Tensor>& w1,
                                                const std::optional<at::Tensor>& w2, double eps,
                                                bool offset) {
  check_f32(x_in, "add_rms_norm", "x");
  check_f32(a_in, "add_rms_norm", "a");
  TORCH_CHECK(cpu_supported(), "add_rms_norm: this CPU lacks AVX2/FMA");
  TORCH_CHECK(x_in.sizes() == a_in.sizes(), "add_rms_norm: x and a must have one shape");
  const int64_t D = x_in.size(-1);
  if (w1) check_norm_weight(*w1, D, "add_rms_norm");
  if (w2) check_norm_weight(*w2, D, "add_rms_norm");
  const at::Tensor x = x_in.contiguous(), a = a_in.contiguous();
  at::Tensor h = at::empty_like(x);
  at::Tensor n = w2 ? at::empty_like(x) : at::empty({0}, x.options());
  const float *xp = x.data_ptr<float>(), *ap = a.data_ptr<float>();
  const float* w1p = w1 ? w1->data_ptr<float>() : nullptr;
  const float* w2p = w2 ? w2->data_ptr<float>() : nullptr;
  float *hp = h.data_ptr<float>(), *np = w2 ? n.data_ptr<float>() : nullptr;
  over_rows(D ? x.numel() / D : 0, D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      fused::add_rms_norm_row(xp + r * D, ap + r * D, D, w1p, w2p, offset, static_cast<float>(eps),
                              hp + r * D, np ? np + r * D : nullptr);
  });
  return {h, n};
}

at::Tensor norm_rope_one(const at::Tensor& x, const std::optional<at::Tensor>& w,
                         const at::Tensor& cos, const at::Tensor& sin, double eps, bool offset) {
  check_f32(x, "qk_norm_rope", "q/k");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "qk_norm_rope: q and k must be (B, T, H, D) with "
              "unit stride over D");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0 && D <= 1024, "qk_norm_rope: head_dim must be even and <= 1024");
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == B && cos.size(1) == T && cos.size(2) == D &&
                  cos.sizes() == sin.sizes(),
              "qk_norm_rope: cos and sin must be (B, T, D) = (", B, ", ", T, ", ", D, ")");
  if (w) check_norm_weight(*w, D, "qk_norm_rope");
  at::Tensor out = at::empty({B, H, T, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const float* wp = w ? w->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t cs0 = cos.stride(0), cs1 = cos.stride(1), ss0 = sin.stride(0), ss1 = sin.stride(1);
  over_rows(B * T * H, D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (T * H), t = r / H % T, h = r % H;
      fused::norm_rope_vec(xp + b * xs0 + t * xs1 + h * xs2, D, wp, offset, static_cast<float>(eps),
                           cp + b * cs0 + t * cs1, sp + b * ss0 + t * ss1,
                           op + ((b * H + h) * T + t) * D);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> qk_norm_rope(const at::Tensor& q, const at::Tensor& k,
                                                const std::optional<at::Tensor>& wq,
                                                const std::optional<at::Tensor>& wk,
                                                const at::Tensor& cos_in, const at::Tensor& sin_in,
                                                double eps, bool offset) {
  TORCH_CHECK(cpu_supported(), "qk_norm_rope: this CPU lacks AVX2/FMA");
  check_f32(cos_in, "qk_norm_rope", "cos");
  check_f32(sin_in, "qk_norm_rope", "sin");
  const at::Tensor cos = cos_in.stride(-1) == 1 ? cos_in : cos_in.contiguous();
  const at::Tensor sin = sin_in.stride(-1) == 1 ? sin_in : sin_in.contiguous();
  return {norm_rope_one(q, wq, cos, sin, eps, offset), norm_rope_one(k, wk, cos, sin, eps, offset)};
}

std::tuple<at::Tensor, at::Tensor> rope_cos_sin(const at::Tensor& positions_in,
                                                const at::Tensor& inv_freq_in) {
  TORCH_CHECK(positions_in.device().is_cpu() && inv_freq_in.dim() == 1,
              "rope_cos_sin: CPU positions and a 1-D inv_freq");
  const at::Tensor pos = positions_in.to(at::kLong).contiguous();
  const at::Tensor inv = inv_freq_in.to(at::kFloat).contiguous();
  const int64_t half = inv.size(0), D = 2 * half, P = pos.numel();
  std::vector<int64_t> shape(pos.sizes().begin(), pos.sizes().end());
  shape.push_back(D);
  at::Tensor c = at::empty(shape, inv.options()), s = at::empty(shape, inv.options());
  const int64_t* pp = pos.data_ptr<int64_t>();
  const float* ip = inv.data_ptr<float>();
  float *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const float f = static_cast<float>(pp[p]) * ip[i];  // as torch: float32 product
      const float cv = static_cast<float>(std::cos(static_cast<double>(f)));
      const float sv = static_cast<float>(std::sin(static_cast<double>(f)));
      cp[p * D + i] = cp[p * D + half + i] = cv;
      sp[p * D + i] = sp[p * D + half + i] = sv;
    }
  return {c, s};
}

at::Tensor gated_act(const at::Tensor& g_in, const at::Tensor& u_in, int64_t act) {
  check_f32(g_in, "gated_act", "g");
  check_f32(u_in, "gated_act", "u");
  TORCH_CHECK(cpu_supported(), "gated_act: this CPU lacks AVX2/FMA");
  TORCH_CHECK(g_in.sizes() == u_in.sizes(), "gated_act: g and u must have one shape");
  TORCH_CHECK(act == fused::kGeluTanh || act == fused::kSilu, "gated_act: act must be 0 or 1");
  const at::Tensor g = g_in.contiguous(), u = u_in.contiguous();
  at::Tensor out = at::empty_like(g);
  const float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  float* op = out.data_ptr<float>();
  par::for_ranges(g.numel(), 65536, [&](int64_t i0, int64_t i1) {
    fused::gated_act(gp + i0, up + i0, i1 - i0, act, op + i0);
  });
  return out;
}

at::Tensor argmax_last(const at::Tensor& x_in) {
  check_f32(x_in, "argmax_last", "x");
  TORCH_CHECK(cpu_supported(), "argmax_last: this CPU lacks AVX2/FMA");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) > 0, "argmax_last: x must have a non-empty last dim");
  const at::Tensor x = x_in.contiguous();
  const int64_t V = x.size(-1), R = x.numel() / V;
  at::Tensor out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) op[r] = fused::argmax(xp + r * V, V);
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            double scale, double softcap) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    check_f32(*t, "decode_attention", "q/k/v");
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1, "decode_attention: q, k and v must be 4-D "
                "with unit stride over D");
  }
  TORCH_CHECK(cpu_supported(), "decode_attention: this CPU lacks AVX2/FMA");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hk = k.size(1), L = k.size(2);
  TORCH_CHECK(q.size(2) == 1, "decode_attention: one query position");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hk > 0 && Hq % Hk == 0 &&
                  L > 0,
              "decode_attention: k and v must be (B, Hkv, L, D) with Hq a multiple of Hkv");
  at::Tensor out = at::empty({B, Hq, 1, D}, q.options());
  attend_all({q.data_ptr<float>(), q.stride(0), q.stride(1), k.data_ptr<float>(), v.data_ptr<float>(),
              k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
              out.data_ptr<float>(), B, Hq, Hk, L, D, static_cast<float>(scale),
              static_cast<float>(softcap)});
  return out;
}

}  // namespace
}  // namespace leanfm_kernels

TORCH_LIBRARY_FRAGMENT(leanfm_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps, bool offset) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor a, Tensor? w1, Tensor? w2, float eps, bool offset) "
        "-> (Tensor, Tensor)");
  m.def("qk_norm_rope(Tensor q, Tensor k, Tensor? wq, Tensor? wk, Tensor cos, Tensor sin, "
        "float eps, bool offset) -> (Tensor, Tensor)");
  m.def("rope_cos_sin(Tensor positions, Tensor inv_freq) -> (Tensor, Tensor)");
  m.def("gated_act(Tensor g, Tensor u, int act) -> Tensor");
  m.def("argmax_last(Tensor x) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanfm_kernels, CPU, m) {
  m.impl("rms_norm", &leanfm_kernels::rms_norm);
  m.impl("add_rms_norm", &leanfm_kernels::add_rms_norm);
  m.impl("qk_norm_rope", &leanfm_kernels::qk_norm_rope);
  m.impl("rope_cos_sin", &leanfm_kernels::rope_cos_sin);
  m.impl("gated_act", &leanfm_kernels::gated_act);
  m.impl("argmax_last", &leanfm_kernels::argmax_last);
  m.impl("decode_attention", &leanfm_kernels::decode_attention);
}
