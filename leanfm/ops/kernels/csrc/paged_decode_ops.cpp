// Torch operator around the paged decode attention kernel (paged_decode.h): checks, threads, split-K.
//
//   torch.ops.leanfm_kernels.paged_decode(q, q_sink, k_cache, v_cache, k_scale, v_scale, table, lo, hi,
//                                         sinks, scale, softcap, score) -> out
//     q, q_sink: (R, H, D) fp32 or bf16 (q_sink optional); caches (num_blocks, bs, Hkv, D) fp32, bf16 or
//     int8 (then k_scale, v_scale fp32 (num_blocks, bs, Hkv)); table (R, W) int64; lo, hi (R,) int64;
//     softcap <= 0 for none; score: optional fp32 (num_blocks, bs, Hkv), updated in place (H2O).
//     out: (R, H, D) in q's dtype.
//
// Threads: at::parallel_for over (request, kv head) tasks. When there are fewer than 2 tasks per
// thread (few requests, long contexts) each request's key range is split into parts computed in
// parallel and merged by their log-sum-exp (flash-decoding); never with `score`, whose probabilities
// need the final maximum and sum of one unsplit task.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "kernels.h"
#include "paged_decode.h"

namespace leanfm_kernels {
namespace {

constexpr int64_t kKeysPerSplit = 256;  // no part shorter than this

int kv_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kKVFloat32;
    case at::kBFloat16: return kKVBFloat16;
    case at::kChar: return kKVInt8;
    default: TORCH_CHECK(false, "paged_decode: cache dtype must be float32, bfloat16 or int8, got ", t.scalar_type());
  }
  return -1;
}

void check_inputs(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                  const std::optional<at::Tensor>& ks, const std::optional<at::Tensor>& vs,
                  const at::Tensor& table, const at::Tensor& lo, const at::Tensor& hi) {
  TORCH_CHECK(q.dim() == 3, "paged_decode: q must be (R, H, D), got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "paged_decode: q must be fp32 or bf16");
  TORCH_CHECK(kc.dim() == 4 && vc.sizes() == kc.sizes(), "paged_decode: caches must be (num_blocks, bs, Hkv, D)");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous(), "paged_decode: caches must be contiguous");
  TORCH_CHECK(kc.scalar_type() == vc.scalar_type(), "paged_decode: K and V caches must share a dtype");
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2), Hkv = kc.size(2);
  TORCH_CHECK(kc.size(3) == D && D % 8 == 0 && D <= kMaxHeadDim, "paged_decode: head_dim must match, be a multiple "
              "of 8 and at most ", kMaxHeadDim);
  TORCH_CHECK(H % Hkv == 0 && H / Hkv <= kMaxGroup, "paged_decode: H must be a multiple of Hkv, at most ",
              kMaxGroup, " query heads per kv head");
  if (kc.scalar_type() == at::kChar) {
    TORCH_CHECK(ks && vs, "paged_decode: an int8 cache needs k_scale and v_scale");
    for (const at::Tensor* s : {&*ks, &*vs})
      TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->numel() == kc.numel() / D,
                  "paged_decode: scales must be contiguous fp32 (num_blocks, bs, Hkv)");
  }
  TORCH_CHECK(table.dim() == 2 && table.size(0) == R && table.scalar_type() == at::kLong && table.is_contiguous(),
              "paged_decode: table must be contiguous int64 (R, W)");
  for (const at::Tensor* t : {&lo, &hi})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == R && t->scalar_type() == at::kLong && t->is_contiguous(),
                "paged_decode: lo and hi must be contiguous int64 (R,)");
  TORCH_CHECK(q.device().is_cpu() && kc.device().is_cpu() && table.device().is_cpu(), "paged_decode: CPU tensors only");
  TORCH_CHECK(cpu_supported(), "paged_decode: this CPU lacks AVX2/FMA");
}

// out[(r * H + h * G + g) * D + d] = acc[g * D + d] / l[g]
void finish(float* out, int64_t H, int64_t r, int64_t h, int64_t G, int64_t D, const float* l, const float* acc) {
  for (int64_t g = 0; g < G; ++g) {
    const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
    float* y = out + (r * H + h * G + g) * D;
    for (int64_t d = 0; d < D; ++d) y[d] = acc[g * D + d] * inv;
  }
}

// merge the nsplit partial (m, l, acc) records of one (request, kv head) into out
void merge(float* out, int64_t H, const float* parts, int64_t nsplit, int64_t r, int64_t h, int64_t G, int64_t D) {
  const int64_t rec = G * (D + 2);
  std::vector<float> l(G, 0.0f), acc(G * D, 0.0f);
  for (int64_t g = 0; g < G; ++g) {
    float m = -INFINITY;
    for (int64_t s = 0; s < nsplit; ++s) m = std::max(m, parts[s * rec + g]);
    if (m == -INFINITY) continue;
    for (int64_t s = 0; s < nsplit; ++s) {
      const float* p = parts + s * rec;
      const float w = std::exp(p[g] - m);
      l[g] += w * p[G + g];
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] += w * p[2 * G + g * D + d];
    }
  }
  finish(out, H, r, h, G, D, l.data(), acc.data());
}

}  // namespace

void paged_decode_run(const DecodeArgs& a, int64_t R, float* out) {
  const int64_t H = a.H, Hkv = a.Hkv, D = a.D, G = H / Hkv;
  const int64_t tasks = R * Hkv;
  int64_t longest = 0;
  for (int64_t r = 0; r < R; ++r) longest = std::max(longest, a.hi[r] - a.lo[r]);
  const int64_t want = (4 * at::get_num_threads() + tasks - 1) / tasks;
  const int64_t nsplit = a.score || tasks >= 2 * at::get_num_threads()
                             ? 1 : std::max<int64_t>(1, std::min(want, longest / kKeysPerSplit));
  const int64_t rec = G * (D + 2);
  std::vector<float> parts(nsplit > 1 ? tasks * nsplit * rec : 0);
  at::parallel_for(0, tasks * nsplit, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(rec);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rh = t / nsplit, s = t % nsplit, r = rh / Hkv, h = rh % Hkv;
      const int64_t per = (a.hi[r] - a.lo[r] + nsplit - 1) / nsplit;
      const int64_t k0 = std::min(a.hi[r], a.lo[r] + s * per), k1 = std::min(a.hi[r], k0 + per);
      float* p = nsplit > 1 ? parts.data() + t * rec : buf.data();
      paged_decode_task(a, r, h, k0, k1, s == 0, p, p + G, p + 2 * G);
      if (nsplit == 1) finish(out, H, r, h, G, D, p + G, p + 2 * G);
    }
  });
  if (nsplit > 1) {
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) merge(out, H, parts.data() + t * nsplit * rec, nsplit, t / Hkv, t % Hkv, G, D);
    });
  }
}

namespace {

at::Tensor paged_decode(const at::Tensor& q_in, const std::optional<at::Tensor>& q_sink_in, const at::Tensor& kc,
                        const at::Tensor& vc, const std::optional<at::Tensor>& ks, const std::optional<at::Tensor>& vs,
                        const at::Tensor& table, const at::Tensor& lo, const at::Tensor& hi, int64_t sinks,
                        double scale, double softcap, const std::optional<at::Tensor>& score) {
  check_inputs(q_in, kc, vc, ks, vs, table, lo, hi);
  const int64_t R = q_in.size(0), H = q_in.size(1), D = q_in.size(2), Hkv = kc.size(2);
  at::Tensor out = at::empty({R, H, D}, q_in.options());
  if (R == 0) return out;
  const at::Tensor q = (q_in.to(at::kFloat) * scale).contiguous();
  std::optional<at::Tensor> q_sink;
  if (q_sink_in) {
    TORCH_CHECK(q_sink_in->sizes() == q_in.sizes(), "paged_decode: q_sink must have q's shape");
    q_sink = (q_sink_in->to(at::kFloat) * scale).contiguous();
  }
  if (score) {
    TORCH_CHECK(score->scalar_type() == at::kFloat && score->is_contiguous() && score->numel() == kc.numel() / D,
                "paged_decode: score must be contiguous fp32 (num_blocks, bs, Hkv)");
  }
  const bool i8 = kc.scalar_type() == at::kChar;
  DecodeArgs a{q.data_ptr<float>(), q_sink ? q_sink->data_ptr<float>() : nullptr, kc.data_ptr(), vc.data_ptr(),
               i8 ? ks->data_ptr<float>() : nullptr, i8 ? vs->data_ptr<float>() : nullptr, kv_kind(kc),
               table.data_ptr<int64_t>(), table.size(1), lo.data_ptr<int64_t>(), hi.data_ptr<int64_t>(), sinks,
               H, Hkv, D, kc.size(1), softcap > 0 ? static_cast<float>(softcap) : 0.0f,
               score ? score->data_ptr<float>() : nullptr};

  if (q_in.scalar_type() == at::kFloat) {
    paged_decode_run(a, R, out.data_ptr<float>());
    return out;
  }
  at::Tensor out32 = at::empty({R, H, D}, q.options());
  paged_decode_run(a, R, out32.data_ptr<float>());
  out.copy_(out32);
  return out;
}

}  // namespace
}  // namespace leanfm_kernels

TORCH_LIBRARY_FRAGMENT(leanfm_kernels, m) {
  m.def("paged_decode(Tensor q, Tensor? q_sink, Tensor k_cache, Tensor v_cache, Tensor? k_scale, Tensor? v_scale, "
        "Tensor table, Tensor lo, Tensor hi, int sinks, float scale, float softcap, Tensor(a!)? score) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanfm_kernels, CPU, m) { m.impl("paged_decode", &leanfm_kernels::paged_decode); }
