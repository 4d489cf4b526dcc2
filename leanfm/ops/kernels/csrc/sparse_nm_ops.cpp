// Torch operator around the 2:4-sparse kernel (sparse_nm.h); registered as a fragment of the
// leanfm_kernels library that ops.cpp defines, so this file adds an operator without editing ops.cpp.
//
//   torch.ops.leanfm_kernels.linear_sparse24(x, values, indices, bias=None)
//       x fp32 or bf16 (..., K); values fp32 or bf16 (N, K/2); indices uint8 (N, K/8); K % 32 == 0.
//       fp32 accumulation; output dtype = x dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

#include "kernels.h"
#include "parallel.h"
#include "sparse_nm.h"

namespace leanfm_kernels {
namespace {

std::vector<int64_t> sparse_out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(N);
  return shape;
}

void check_sparse_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "linear_sparse24: x must have at least 1 dimension");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % 32 == 0, "linear_sparse24: K must be a multiple of 32, got ", K);
  TORCH_CHECK(values.dim() == 2 && values.size(1) * 2 == K, "linear_sparse24: values must be (N, K/2), got ",
              values.sizes(), " for K=", K);
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == values.size(0) && indices.size(1) * 8 == K,
              "linear_sparse24: indices must be (N, K/8), got ", indices.sizes());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == values.size(0), "linear_sparse24: bias must be (N,)");
  }
}

at::Tensor linear_sparse24(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& indices,
                           const std::optional<at::Tensor>& bias_in) {
  check_sparse_args(x_in, values, indices, bias_in);
  TORCH_CHECK(x_in.device().is_cpu() && values.device().is_cpu() && indices.device().is_cpu(),
              "linear_sparse24: CPU tensors only");
  TORCH_CHECK(values.is_contiguous() && indices.is_contiguous(), "linear_sparse24: values/indices must be contiguous");
  TORCH_CHECK(indices.scalar_type() == at::kByte, "linear_sparse24: indices must be uint8");
  TORCH_CHECK(cpu_supported(), "linear_sparse24: this CPU lacks AVX2/FMA");
  const bool v16 = values.scalar_type() == at::kBFloat16;
  TORCH_CHECK(v16 || values.scalar_type() == at::kFloat, "linear_sparse24: values must be float32 or bfloat16");
  const auto xdt = x_in.scalar_type();
  TORCH_CHECK(xdt == at::kFloat || xdt == at::kBFloat16, "linear_sparse24: x must be float32 or bfloat16");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  std::optional<at::Tensor> bias;
  if (bias_in) bias = bias_in->to(at::kFloat).contiguous();
  const int64_t K = x.size(-1), N = values.size(0), M = K ? x.numel() / K : 0;
  at::Tensor y = at::empty(sparse_out_shape(x, N), x.options());
  if (M == 0 || N == 0) return y.to(xdt);
  at::Tensor xr = at::empty({M, K}, x.options());
  sparse24_pack_x(x.data_ptr<float>(), M, K, xr.data_ptr<float>());
  const float* xp = xr.data_ptr<float>();
  const uint8_t* ip = indices.data_ptr<uint8_t>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = K / 2 * values.element_size() + K / 8;
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, row_bytes));
  par::for_ranges(N, grain, [&](int64_t n0, int64_t n1) {
    if (v16)
      sparse24_bf16(xp, M, K, reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()), ip, bp, yp, N,
                    n0, n1);
    else
      sparse24_fp32(xp, M, K, values.data_ptr<float>(), ip, bp, yp, N, n0, n1);
  });
  return xdt == at::kFloat ? y : y.to(xdt);
}

at::Tensor linear_sparse24_meta(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                                const std::optional<at::Tensor>& bias) {
  check_sparse_args(x, values, indices, bias);
  return at::empty(sparse_out_shape(x, values.size(0)), x.options());
}

}  // namespace
}  // namespace leanfm_kernels

TORCH_LIBRARY_FRAGMENT(leanfm_kernels, m) {
  m.def("linear_sparse24(Tensor x, Tensor values, Tensor indices, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanfm_kernels, CPU, m) { m.impl("linear_sparse24", &leanfm_kernels::linear_sparse24); }

TORCH_LIBRARY_IMPL(leanfm_kernels, Meta, m) { m.impl("linear_sparse24", &leanfm_kernels::linear_sparse24_meta); }
