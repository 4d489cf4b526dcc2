// One decoder block for one new token per request over a paged KV cache, in one operator call
// (leanfm.models.paged_decode_plan; the engine's decode-only steps):
//
//   torch.ops.leanfm_kernels.paged_decode_layer(x, cos, sin, k_cache, v_cache, slots, table, lo, hi,
//                                               tensors, ints, floats) -> y
//
// x (1, R, hidden) fp32 (or (R, 1, hidden): R rows, one new token each); cos, sin: R rows of head_dim
// (contiguous); k_cache, v_cache (num_blocks, block_size, Hkv, D) fp32, contiguous; slots (R,) int64:
// the flat slot (block * block_size + offset) where each row's new key / value go; table (R, W), lo,
// hi (R,) int64: each row attends over its keys [lo, hi) read through its block table (the new one
// included), as leanfm.ops.paged_attention's PagedAttentionPlan describes them (a sliding window is
// in lo). tensors, ints, floats: the block's plan (block_step.h; the plan's window is not read).
// The steps (each as the engine's module path computes it, to fp32 rounding): block::qkv;  QK-norm,
// RoPE;  cache write at the slots (write_kv);  o = paged attention (paged_decode.h, the kernel of the
// paged_decode operator, q pre-scaled and soft-capped as there);  block::out.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "block_step.h"
#include "fused.h"
#include "kernels.h"
#include "paged_decode.h"

namespace leanfm_kernels {
namespace {

at::Tensor paged_decode_layer(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin,
                              const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& slots,
                              const at::Tensor& table, const at::Tensor& lo, const at::Tensor& hi,
                              const std::vector<std::optional<at::Tensor>>& t, at::IntArrayRef ints,
                              at::ArrayRef<double> floats) {
  constexpr const char* op = "paged_decode_layer";
  TORCH_CHECK(cpu_supported(), op, ": this CPU lacks AVX2/FMA");
  for (const at::Tensor* a : {&x_in, &cos, &sin, &kc, &vc})
    TORCH_CHECK(a->device().is_cpu() && a->scalar_type() == at::kFloat, op,
                ": x, cos, sin and the caches must be float32 CPU tensors");
  TORCH_CHECK(x_in.dim() == 3 && (x_in.size(0) == 1 || x_in.size(1) == 1), op,
              ": x must be (1, R, hidden) or (R, 1, hidden)");
  const at::Tensor x = x_in.contiguous();
  const int64_t R = x.size(0) * x.size(1), hid = x.size(2);
  const block::Plan p = block::read_plan(t, ints, floats, hid, op);
  const int64_t H = p.H, Hk = p.Hk, D = p.D;
  TORCH_CHECK(kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.size(2) == Hk && kc.size(3) == D &&
                  kc.is_contiguous() && vc.is_contiguous(),
              op, ": caches must be contiguous (num_blocks, block_size, Hkv, D)");
  TORCH_CHECK(D % 8 == 0 && D <= kMaxHeadDim && H / Hk <= kMaxGroup, op,
              ": head_dim must be a multiple of 8 up to ", kMaxHeadDim, ", at most ", kMaxGroup,
              " query heads per kv head");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == R * D && sin.numel() == R * D, op,
              ": cos and sin must be contiguous, R rows of head_dim");
  TORCH_CHECK(table.dim() == 2 && table.size(0) == R && table.scalar_type() == at::kLong &&
                  table.is_contiguous() && table.device().is_cpu(),
              op, ": table must be contiguous int64 (R, W)");
  for (const at::Tensor* a : {&slots, &lo, &hi})
    TORCH_CHECK(a->dim() == 1 && a->size(0) == R && a->scalar_type() == at::kLong && a->is_contiguous() &&
                    a->device().is_cpu(),
                op, ": slots, lo and hi must be contiguous int64 (R,)");
  const int64_t nslots = kc.size(0) * kc.size(1), bs = kc.size(1), W = table.size(1);
  const int64_t *sp = slots.data_ptr<int64_t>(), *lp = lo.data_ptr<int64_t>(), *hp = hi.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(sp[r] >= 0 && sp[r] < nslots && lp[r] >= 0 && lp[r] < hp[r] && hp[r] <= W * bs, op,
                ": row ", r, " has slot ", sp[r], " and keys [", lp[r], ", ", hp[r], ") outside the cache");

  // scratch: n, q, k, v, qs (q normed, rotated and scaled), o
  std::vector<float> buf(R * (hid + 3 * H * D + 2 * Hk * D));
  float *n = buf.data(), *q = n + R * hid, *k = q + R * H * D, *v = k + R * Hk * D;
  float *qs = v + R * Hk * D, *o = qs + R * H * D;
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();

  block::qkv(p, xp, R, n, q, k, v);
  float *kcp = kc.data_ptr<float>(), *vcp = vc.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *snp = sin.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float *cb = cp + r * D, *sb = snp + r * D;
    float* qr = qs + r * H * D;
    for (int64_t hh = 0; hh < H; ++hh)
      fused::norm_rope_vec(q + (r * H + hh) * D, D, p.w_qn, p.offset, p.eps, cb, sb, qr + hh * D);
    for (int64_t i = 0; i < H * D; ++i) qr[i] *= p.scale;  // as paged_decode scales q
    for (int64_t hh = 0; hh < Hk; ++hh) {
      const int64_t at_slot = (sp[r] * Hk + hh) * D;
      fused::norm_rope_vec(k + (r * Hk + hh) * D, D, p.w_kn, p.offset, p.eps, cb, sb, kcp + at_slot);
      const float* vs = v + (r * Hk + hh) * D;
      std::copy(vs, vs + D, vcp + at_slot);
    }
  }
  const DecodeArgs a{qs, nullptr, kcp, vcp, nullptr, nullptr, kKVFloat32, table.data_ptr<int64_t>(), W, lp, hp,
                     0, H, Hk, D, bs, p.softcap > 0.0f ? p.softcap : 0.0f, nullptr};
  paged_decode_run(a, R, o);
  block::out(p, xp, o, R, y.data_ptr<float>());
  return y;
}

}  // namespace
}  // namespace leanfm_kernels

TORCH_LIBRARY_FRAGMENT(leanfm_kernels, m) {
  m.def("paged_decode_layer(Tensor x, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, Tensor table, Tensor lo, Tensor hi, Tensor?[] tensors, int[] ints, float[] floats) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanfm_kernels, CPU, m) {
  m.impl("paged_decode_layer", &leanfm_kernels::paged_decode_layer);
}
