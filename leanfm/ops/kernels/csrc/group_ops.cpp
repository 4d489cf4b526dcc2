// Several linear layers on one input in a single parallel region (q/k/v; gate/up of a gated MLP):
//
//   linear_group(x, weights, biases, epilogue) -> [y...]
//       x fp32 (..., K); weights all fp32 or all bf16 (N_i, K); biases: one optional per weight.
//   linear_group_quant(x, qweights, scales, zeros, bits, group_size, biases, epilogue, act) -> [y...]
//       weight-only int8 / packed int4 (format: quant.py), one bits / group_size for all; act as in
//       linear_q8 (0: fp32 activations, 1: int8 activations per block of 32, see ops.cpp).
//
// epilogue -1: one output per weight. epilogue 0 (gelu, tanh approximation) or 1 (silu): exactly two
// weights of one shape, and the single output act(x W0^T + b0) * (x W1^T + b1) (fused.h), computed by
// each thread on its own columns right after it produced them.
//
// Every weight row costs the same here (one K), so threads get equal shares of the concatenated rows
// (epilogue -1) or of the shared columns (gated). x is prepared once (packed, blocked or quantized)
// for all weights: one call does the work of two or three, with one barrier instead of several.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "fused.h"
#include "kernels.h"
#include "parallel.h"
#include "qx.h"

namespace leanfm_kernels {
namespace {

constexpr int64_t kMinBytes = 64 * 1024;  // per thread

std::vector<int64_t> shape_with_last(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end() - 1);
  s.push_back(N);
  return s;
}

// Runs seg(i, n0, n1) over the weights' rows in kRowBlock blocks (epilogue -1), or over the shared
// columns with every weight (gated), then the epilogue per range.
template <typename Seg>
void run_group(const std::vector<int64_t>& Ns, int64_t row_bytes, int64_t epilogue,
               std::vector<at::Tensor>& ys, at::Tensor* out, int64_t M, const Seg& seg) {
  const int64_t grain = std::max<int64_t>(1, kMinBytes / std::max<int64_t>(1, kRowBlock * row_bytes));
  if (epilogue >= 0) {
    const int64_t N = Ns[0], blocks = (N + kRowBlock - 1) / kRowBlock;
    const float *g = ys[0].data_ptr<float>(), *u = ys[1].data_ptr<float>();
    float* o = out->data_ptr<float>();
    par::for_ranges(blocks, std::max<int64_t>(1, grain / 2), [&](int64_t b0, int64_t b1) {
      const int64_t n0 = b0 * kRowBlock, n1 = std::min(N, b1 * kRowBlock);
      seg(0, n0, n1);
      seg(1, n0, n1);
      for (int64_t m = 0; m < M; ++m)
        fused::gated_act(g + m * N + n0, u + m * N + n0, n1 - n0, epilogue, o + m * N + n0);
    });
    return;
  }
  std::vector<int64_t> first(Ns.size() + 1, 0);  // first block of each weight
  for (size_t i = 0; i < Ns.size(); ++i) first[i + 1] = first[i] + (Ns[i] + kRowBlock - 1) / kRowBlock;
  par::for_ranges(first.back(), grain, [&](int64_t b0, int64_t b1) {
    for (size_t i = 0; i < Ns.size(); ++i) {
      const int64_t lo = std::max(b0, first[i]), hi = std::min(b1, first[i + 1]);
      if (lo < hi) seg(i, (lo - first[i]) * kRowBlock, std::min(Ns[i], (hi - first[i]) * kRowBlock));
    }
  });
}

void check_group(const at::Tensor& x, size_t n, const std::vector<std::optional<at::Tensor>>& biases,
                 int64_t epilogue, const char* op) {
  TORCH_CHECK(cpu_supported(), op, ": this CPU lacks AVX2/FMA");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1, op,
              ": x must be a float32 CPU tensor");
  TORCH_CHECK(n >= 1 && biases.size() == n, op, ": one bias entry (or None) per weight");
  TORCH_CHECK(epilogue == -1 || ((epilogue == fused::kGeluTanh || epilogue == fused::kSilu) && n == 2),
              op, ": epilogue must be -1, or 0 / 1 with two weights");
}

std::vector<at::Tensor> make_outputs(const at::Tensor& x, const std::vector<int64_t>& Ns,
                                     int64_t epilogue, at::Tensor* out) {
  std::vector<at::Tensor> ys;
  for (int64_t N : Ns) ys.push_back(at::empty(shape_with_last(x, N), x.options()));
  if (epilogue >= 0) {
    TORCH_CHECK(Ns[0] == Ns[1], "gated epilogue: both weights must have one shape");
    *out = at::empty(shape_with_last(x, Ns[0]), x.options());
  }
  return ys;
}

const float* bias_ptr(const std::optional<at::Tensor>& b, int64_t N, std::vector<at::Tensor>& keep) {
  if (!b) return nullptr;
  TORCH_CHECK(b->dim() == 1 && b->size(0) == N && b->device().is_cpu(), "bias must be (", N, ",)");
  keep.push_back(b->to(at::kFloat).contiguous());
  return keep.back().data_ptr<float>();
}

std::vector<at::Tensor> linear_group(const at::Tensor& x_in, at::TensorList ws,
                                     const std::vector<std::optional<at::Tensor>>& biases,
                                     int64_t epilogue) {
  check_group(x_in, ws.size(), biases, epilogue, "linear_group");
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(1, K);
  const bool bf16 = ws[0].scalar_type() == at::kBFloat16;
  std::vector<int64_t> Ns;
  std::vector<at::Tensor> keep;
  std::vector<const float*> bs;
  for (size_t i = 0; i < ws.size(); ++i) {
    const at::Tensor& w = ws[i];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K && w.is_contiguous() && w.device().is_cpu() &&
                    w.scalar_type() == (bf16 ? at::kBFloat16 : at::kFloat),
                "linear_group: weights must be contiguous (N, ", K, "), all float32 or all bfloat16");
    Ns.push_back(w.size(0));
    bs.push_back(bias_ptr(biases[i], w.size(0), keep));
  }
  at::Tensor out;
  std::vector<at::Tensor> ys = make_outputs(x, Ns, epilogue, &out);
  if (M == 0) return epilogue >= 0 ? std::vector<at::Tensor>{out} : ys;
  const float* xp = x.data_ptr<float>();
  at::Tensor xpk;
  if (bf16) {  // x reordered once for every bf16 weight (skinny_bf16.cpp)
    xpk = at::empty({M, K}, x.options());
    bf16_pack_x(xp, M, K, xpk.data_ptr<float>());
  }
  run_group(Ns, K * (bf16 ? 2 : 4), epilogue, ys, &out, M, [&](size_t i, int64_t n0, int64_t n1) {
    float* y = ys[i].data_ptr<float>();
    if (bf16)
      skinny_bf16(xpk.data_ptr<float>(), M, K,
                  reinterpret_cast<const uint16_t*>(ws[i].data_ptr<at::BFloat16>()), bs[i], y, Ns[i],
                  n0, n1);
    else
      skinny_fp32(xp, M, K, ws[i].data_ptr<float>(), bs[i], y, Ns[i], n0, n1);
  });
  return epilogue >= 0 ? std::vector<at::Tensor>{out} : ys;
}

std::vector<at::Tensor> linear_group_quant(const at::Tensor& x_in, at::TensorList qws,
                                           at::TensorList scales, at::TensorList zeros, int64_t bits,
                                           int64_t group_size,
                                           const std::vector<std::optional<at::Tensor>>& biases,
                                           int64_t epilogue, int64_t act) {
  check_group(x_in, qws.size(), biases, epilogue, "linear_group_quant");
  TORCH_CHECK(bits == 4 || bits == 8, "linear_group_quant: bits must be 4 or 8");
  TORCH_CHECK(act == 0 || act == 1, "linear_group_quant: act must be 0 (fp32) or 1 (int8)");
  TORCH_CHECK(scales.size() == qws.size() && zeros.size() == qws.size(),
              "linear_group_quant: one scales and zeros tensor per weight");
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(1, K);
  TORCH_CHECK(K > 0 && K % 32 == 0 && group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "linear_group_quant: K and group_size must be multiples of 32, group_size dividing K");
  const int64_t G = K / group_size;
  std::vector<int64_t> Ns;
  std::vector<at::Tensor> keep;
  std::vector<const float*> bs;
  for (size_t i = 0; i < qws.size(); ++i) {
    const int64_t N = qws[i].size(0);
    TORCH_CHECK(qws[i].dim() == 2 && qws[i].scalar_type() == at::kByte && qws[i].is_contiguous() &&
                    qws[i].size(1) * 8 == K * bits && qws[i].device().is_cpu(),
                "linear_group_quant: qweight ", i, " must be contiguous uint8 of ", K * bits / 8,
                " bytes per row");
    for (const at::Tensor* t : {&scales[i], &zeros[i]})
      TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == G && t->is_contiguous() &&
                      t->scalar_type() == at::kFloat && t->device().is_cpu(),
                  "linear_group_quant: scales and zeros must be contiguous float32 (", N, ", ", G, ")");
    Ns.push_back(N);
    bs.push_back(bias_ptr(biases[i], N, keep));
  }
  at::Tensor out;
  std::vector<at::Tensor> ys = make_outputs(x, Ns, epilogue, &out);
  if (M == 0) return epilogue >= 0 ? std::vector<at::Tensor>{out} : ys;
  PreparedX px = prepare_x(x.data_ptr<float>(), M, K, group_size, act == 1);
  run_group(Ns, K * bits / 8 + 8 * G / group_size, epilogue, ys, &out, M,
            [&](size_t i, int64_t n0, int64_t n1) {
              QuantArgs a = px.args(M, K, G, group_size);
              a.q = qws[i].data_ptr<uint8_t>();
              a.scales = scales[i].data_ptr<float>();
              a.zeros = zeros[i].data_ptr<float>();
              a.bias = bs[i];
              a.y = ys[i].data_ptr<float>();
              a.N = Ns[i];
              run_quant(a, bits, act == 1, n0, n1);
            });
  return epilogue >= 0 ? std::vector<at::Tensor>{out} : ys;
}

}  // namespace
}  // namespace leanfm_kernels

TORCH_LIBRARY_FRAGMENT(leanfm_kernels, m) {
  m.def("linear_group(Tensor x, Tensor[] weights, Tensor?[] biases, int epilogue=-1) -> Tensor[]");
  m.def("linear_group_quant(Tensor x, Tensor[] qweights, Tensor[] scales, Tensor[] zeros, int bits, "
        "int group_size, Tensor?[] biases, int epilogue=-1, int act=0) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(leanfm_kernels, CPU, m) {
  m.impl("linear_group", &leanfm_kernels::linear_group);
  m.impl("linear_group_quant", &leanfm_kernels::linear_group_quant);
}
