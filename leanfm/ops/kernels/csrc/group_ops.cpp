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
// x is prepared once (packed, blocked or quantized) for all weights, and one parallel region does the
// work of two or three (linear_run.h): one barrier instead of several.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "fused.h"
#include "kernels.h"
#include "linear_run.h"

namespace leanfm_kernels {
namespace {

std::vector<int64_t> shape_with_last(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end() - 1);
  s.push_back(N);
  return s;
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

// The outputs (and the gated one) for refs, run, and returned as the op's list.
std::vector<at::Tensor> run_group(const at::Tensor& x, const std::vector<LinearRef>& refs,
                                  int64_t epilogue, bool int8_act, const char* op) {
  TORCH_CHECK(same_family(refs.data(), refs.size()), op,
              ": weights must be all float32, all bfloat16, or all quantized alike (bits, group size)");
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(1, K);
  std::vector<at::Tensor> ys;
  std::vector<float*> yp;
  for (const LinearRef& r : refs) {
    ys.push_back(at::empty(shape_with_last(x, r.N), x.options()));
    yp.push_back(ys.back().data_ptr<float>());
  }
  at::Tensor out;
  if (epilogue >= 0) {
    TORCH_CHECK(refs[0].N == refs[1].N, op, ": a gated pair needs two weights of one shape");
    out = at::empty(shape_with_last(x, refs[0].N), x.options());
  }
  run_linears(x.data_ptr<float>(), M, K, refs.data(), refs.size(), yp.data(), epilogue,
              epilogue >= 0 ? out.data_ptr<float>() : nullptr, int8_act);
  return epilogue >= 0 ? std::vector<at::Tensor>{out} : ys;
}

std::vector<at::Tensor> linear_group(const at::Tensor& x_in, at::TensorList ws,
                                     const std::vector<std::optional<at::Tensor>>& biases,
                                     int64_t epilogue) {
  check_group(x_in, ws.size(), biases, epilogue, "linear_group");
  const at::Tensor x = x_in.contiguous();
  std::vector<at::Tensor> keep;
  keep.reserve(ws.size());
  std::vector<LinearRef> refs;
  for (size_t i = 0; i < ws.size(); ++i) {
    if (biases[i]) keep.push_back(biases[i]->to(at::kFloat).contiguous());
    refs.push_back(make_linear_ref(ws[i].scalar_type() == at::kBFloat16 ? kBF16 : kF32, ws[i], nullptr,
                                   nullptr, biases[i] ? &keep.back() : nullptr, x.size(-1), 0,
                                   "linear_group"));
  }
  return run_group(x, refs, epilogue, false, "linear_group");
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
  std::vector<at::Tensor> keep;
  keep.reserve(qws.size());
  std::vector<LinearRef> refs;
  for (size_t i = 0; i < qws.size(); ++i) {
    if (biases[i]) keep.push_back(biases[i]->to(at::kFloat).contiguous());
    refs.push_back(make_linear_ref(bits, qws[i], &scales[i], &zeros[i],
                                   biases[i] ? &keep.back() : nullptr, x.size(-1), group_size,
                                   "linear_group_quant"));
  }
  return run_group(x, refs, epilogue, act == 1, "linear_group_quant");
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
