// One decoder block for one new token per sequence, in one operator call (leanfm.models.decode_plan):
//
//   torch.ops.leanfm_kernels.decode_layer(x, cos, sin, kc, vc, start, tensors, ints, floats) -> y
//
// x (B, 1, hidden) fp32; cos, sin (B, 1, D); kc, vc (B, Hkv, max_len, D) fp32 caches, unit stride over
// D; the new key / value go to position `start`, attention reads [first, start] with first = max(0,
// start - window + 1) for a sliding window (as leanfm.models.interface.KVCacheMeta does).
// tensors, ints, floats: the block's plan (block_step.h). The steps (each as the PyTorch path computes
// it, to fp32 rounding): block::qkv;  QK-norm, RoPE;  cache write;  o = attention;  block::out.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "attend.h"
#include "block_step.h"
#include "fused.h"
#include "kernels.h"
#include "parallel.h"

namespace leanfm_kernels {
namespace {

at::Tensor decode_layer(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& kc, const at::Tensor& vc, int64_t start,
                        const std::vector<std::optional<at::Tensor>>& t, at::IntArrayRef ints,
                        at::ArrayRef<double> floats) {
  TORCH_CHECK(cpu_supported(), "decode_layer: this CPU lacks AVX2/FMA");
  for (const at::Tensor* a : {&x_in, &cos, &sin, &kc, &vc})
    TORCH_CHECK(a->device().is_cpu() && a->scalar_type() == at::kFloat && a->stride(-1) == 1,
                "decode_layer: x, cos, sin and the caches must be float32 CPU tensors, unit last stride");
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(1) == 1, "decode_layer: x must be (B, 1, hidden)");
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), hid = x.size(2);
  const block::Plan p = block::read_plan(t, ints, floats, hid, "decode_layer");
  const int64_t H = p.H, Hk = p.Hk, D = p.D, window = p.window;
  TORCH_CHECK(kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.size(0) == B && kc.size(1) == Hk &&
                  kc.size(3) == D && start >= 0 && start < kc.size(2),
              "decode_layer: caches must be (B, Hkv, max_len, D) with room at position ", start);
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == B && cos.size(1) == 1 && cos.size(2) == D &&
                  sin.sizes() == cos.sizes(),
              "decode_layer: cos and sin must be (B, 1, head_dim)");

  // scratch: n, q, k, v, qr, o
  const int64_t first = window > 0 ? std::max<int64_t>(0, start - window + 1) : 0, L = start + 1 - first;
  std::vector<float> buf(B * (hid + 3 * H * D + 2 * Hk * D));
  float *n = buf.data(), *q = n + B * hid, *k = q + B * H * D, *v = k + B * Hk * D;
  float *qr = v + B * Hk * D, *o = qr + B * H * D;
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();

  block::qkv(p, xp, B, n, q, k, v);
  float *kcp = kc.data_ptr<float>(), *vcp = vc.data_ptr<float>();
  const int64_t ks0 = kc.stride(0), ks1 = kc.stride(1), ks2 = kc.stride(2);
  const int64_t vs0 = vc.stride(0), vs1 = vc.stride(1), vs2 = vc.stride(2);
  for (int64_t b = 0; b < B; ++b) {
    const float *cb = cos.data_ptr<float>() + b * cos.stride(0), *sb = sin.data_ptr<float>() + b * sin.stride(0);
    for (int64_t hh = 0; hh < H; ++hh)
      fused::norm_rope_vec(q + (b * H + hh) * D, D, p.w_qn, p.offset, p.eps, cb, sb, qr + (b * H + hh) * D);
    for (int64_t hh = 0; hh < Hk; ++hh) {
      fused::norm_rope_vec(k + (b * Hk + hh) * D, D, p.w_kn, p.offset, p.eps, cb, sb,
                           kcp + b * ks0 + hh * ks1 + start * ks2);
      const float* vs = v + (b * Hk + hh) * D;
      std::copy(vs, vs + D, vcp + b * vs0 + hh * vs1 + start * vs2);
    }
  }
  attend_all({qr, H * D, D, kcp + first * ks2, vcp + first * vs2, ks0, ks1, ks2, vs0, vs1, vs2, o, B, H,
              Hk, L, D, p.scale, p.softcap});
  block::out(p, xp, o, B, y.data_ptr<float>());
  return y;
}

}  // namespace
}  // namespace leanfm_kernels

TORCH_LIBRARY_FRAGMENT(leanfm_kernels, m) {
  m.def("decode_layer(Tensor x, Tensor cos, Tensor sin, Tensor(a!) kc, Tensor(b!) vc, int start, "
        "Tensor?[] tensors, int[] ints, float[] floats) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanfm_kernels, CPU, m) { m.impl("decode_layer", &leanfm_kernels::decode_layer); }
