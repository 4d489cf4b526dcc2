// Torch operators around the skinny GEMM kernels: argument checks, output allocation, threading.
//
//   torch.ops.leanfm_kernels.linear_fp32(x, w, bias=None)  x fp32 (..., K), w fp32 (N, K)
//   torch.ops.leanfm_kernels.linear_bf16(x, w, bias=None)  x fp32 or bf16, w bf16; fp32 accumulate;
//                                                          output dtype = x dtype
//   torch.ops.leanfm_kernels.linear_q8(x, qweight, scales, zeros, group_size, bias=None, act=0)
//   torch.ops.leanfm_kernels.linear_q4(x, qweight, scales, zeros, group_size, bias=None, act=0)
//       weight-only quantized W (format: leanfm/ops/kernels/quant.py): qweight uint8 (N, K) or
//       (N, K / 2), scales and zeros fp32 (N, K / group_size); K and group_size multiples of 32;
//       x fp32 or bf16; fp32 accumulation; output dtype = x dtype. act=0: x as fp32 (skinny_q8 /
//       skinny_q4); act=1: x quantized to int8 per block of 32, integer dot products (skinny_qx.cpp)
//   torch.ops.leanfm_kernels.cpu_supported()               AVX2 + FMA present
//
// Threads: par::for_ranges (parallel.h: torch's intra-op pool, so torch.set_num_threads applies, with
// an adaptive retreat to one thread under contention) over blocks of kRowBlock output columns; each
// thread gets one contiguous range of weight rows.
// Meta implementations make the operators traceable by torch.compile.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "qx.h"

namespace leanfm_kernels {

bool cpu_supported() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

namespace {

// Don't wake a second thread for less than this many weight bytes.
constexpr int64_t kMinBytesPerTask = 64 * 1024;

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(N);
  return shape;
}

void check_args(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "leanfm linear: x must have at least 1 dimension");
  TORCH_CHECK(w.dim() == 2, "leanfm linear: weight must be 2-D (N, K), got ", w.sizes());
  TORCH_CHECK(x.size(-1) == w.size(1), "leanfm linear: x has ", x.size(-1),
              " features but weight expects ", w.size(1));
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0),
                "leanfm linear: bias must have shape (", w.size(0), ",), got ", bias->sizes());
  }
}

void check_cpu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && (!bias || bias->device().is_cpu()),
              "leanfm linear: CPU tensors only");
  TORCH_CHECK(w.is_contiguous(), "leanfm linear: weight must be contiguous");
  TORCH_CHECK(cpu_supported(), "leanfm linear: this CPU lacks AVX2/FMA");
}

int64_t leading_rows(const at::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

// Runs fn(n0, n1) over [0, N) in contiguous, kRowBlock-aligned ranges, one per thread (parallel.h).
template <typename Fn>
void split_columns(int64_t N, int64_t K, int64_t elem_bytes, const Fn& fn) {
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t block_bytes = std::max<int64_t>(1, kRowBlock * K * elem_bytes);
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerTask / block_bytes);
  par::for_ranges(blocks, grain, [&](int64_t b0, int64_t b1) {
    fn(b0 * kRowBlock, std::min(N, b1 * kRowBlock));
  });
}

at::Tensor linear_fp32(const at::Tensor& x_in, const at::Tensor& w,
                       const std::optional<at::Tensor>& bias_in) {
  check_args(x_in, w, bias_in);
  check_cpu(x_in, w, bias_in);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "linear_fp32: x and weight must be float32");
  const at::Tensor x = x_in.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_in) bias = bias_in->to(at::kFloat).contiguous();
  const int64_t M = leading_rows(x), K = w.size(1), N = w.size(0);
  at::Tensor y = at::empty(out_shape(x, N), x.options());
  if (M == 0 || N == 0) return y;

  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (M >= kOuterMinRows) {
    at::Tensor xt = at::empty({fp32_xt_size(M, K)}, x.options());  // 64-byte aligned storage
    float* xtp = xt.data_ptr<float>();
    fp32_pack_xt(xp, M, K, xtp);
    split_columns(N, K, sizeof(float),
                  [&](int64_t n0, int64_t n1) { skinny_fp32_xt(xtp, M, K, wp, bp, yp, N, n0, n1); });
    return y;
  }
  split_columns(N, K, sizeof(float),
                [&](int64_t n0, int64_t n1) { skinny_fp32(xp, M, K, wp, bp, yp, N, n0, n1); });
  return y;
}

at::Tensor linear_bf16(const at::Tensor& x_in, const at::Tensor& w,
                       const std::optional<at::Tensor>& bias_in) {
  check_args(x_in, w, bias_in);
  check_cpu(x_in, w, bias_in);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16, "linear_bf16: weight must be bfloat16");
  const bool x16 = x_in.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x16 || x_in.scalar_type() == at::kFloat, "linear_bf16: x must be float32 or bfloat16");
  const at::Tensor x = x_in.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_in) bias = bias_in->to(at::kFloat).contiguous();
  const int64_t M = leading_rows(x), K = w.size(1), N = w.size(0);
  at::Tensor y = at::empty(out_shape(x, N), x.options());  // dtype of x
  if (M == 0 || N == 0) return y;

  // x as fp32 in the kernel's order; fp32 results go straight to y, or to y32 then y (bf16)
  at::Tensor xp = at::empty({M, K}, x.options().dtype(at::kFloat));
  float* xpp = xp.data_ptr<float>();
  if (x16)
    bf16_pack_x(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K, xpp);
  else
    bf16_pack_x(x.data_ptr<float>(), M, K, xpp);
  at::Tensor y32 = x16 ? at::empty({M, N}, xp.options()) : y;
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y32.data_ptr<float>();
  at::BFloat16* y16 = x16 ? y.data_ptr<at::BFloat16>() : nullptr;
  split_columns(N, K, 2, [&](int64_t n0, int64_t n1) {
    skinny_bf16(xpp, M, K, wp, bp, yp, N, n0, n1);
    if (y16)  // round to nearest even, in the thread that just wrote these columns
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) y16[m * N + n] = at::BFloat16(yp[m * N + n]);
  });
  return y;
}

at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& w,
                       const std::optional<at::Tensor>& bias) {
  check_args(x, w, bias);
  return at::empty(out_shape(x, w.size(0)), x.options());
}

void check_quant_args(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t group_size,
                      const std::optional<at::Tensor>& bias, int bits) {
  const std::string op = "leanfm linear_q" + std::to_string(bits) + ": ";
  TORCH_CHECK(x.dim() >= 1, op, "x must have at least 1 dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              op, "x must be float32 or bfloat16");
  TORCH_CHECK(qw.dim() == 2 && qw.scalar_type() == at::kByte, op, "qweight must be 2-D uint8");
  const int64_t K = x.size(-1), N = qw.size(0);
  TORCH_CHECK(K > 0 && K % 32 == 0, op, "in_features must be a positive multiple of 32, got ", K);
  TORCH_CHECK(qw.size(1) * 8 == K * bits, op, "x has ", K, " features but qweight has shape ",
              qw.sizes());
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              op, "group_size must be a multiple of 32 dividing ", K, ", got ", group_size);
  const int64_t G = K / group_size;
  for (const at::Tensor* t : {&scales, &zeros})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == N && t->size(1) == G &&
                    t->scalar_type() == at::kFloat,
                op, "scales and zeros must be float32 of shape (", N, ", ", G, "), got ",
                t->scalar_type(), " ", t->sizes());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N,
                op, "bias must have shape (", N, ",), got ", bias->sizes());
  }
}

template <int bits>
at::Tensor linear_quant(const at::Tensor& x_in, const at::Tensor& qw, const at::Tensor& scales_in,
                        const at::Tensor& zeros_in, int64_t group_size,
                        const std::optional<at::Tensor>& bias_in, int64_t act) {
  check_quant_args(x_in, qw, scales_in, zeros_in, group_size, bias_in, bits);
  check_cpu(x_in, qw, bias_in);
  TORCH_CHECK(scales_in.device().is_cpu() && zeros_in.device().is_cpu(),
              "leanfm linear: CPU tensors only");
  TORCH_CHECK(act == 0 || act == 1, "leanfm linear_q", bits, ": act must be 0 (fp32) or 1 (int8)");
  const bool x16 = x_in.scalar_type() == at::kBFloat16;
  const at::Tensor x = x_in.to(at::kFloat).contiguous();  // no copy for contiguous fp32
  const at::Tensor scales = scales_in.contiguous(), zeros = zeros_in.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_in) bias = bias_in->to(at::kFloat).contiguous();
  const int64_t M = leading_rows(x), K = x.size(-1), N = qw.size(0), G = K / group_size;
  at::Tensor y = at::empty(out_shape(x_in, N), x_in.options());  // dtype of x
  if (M == 0 || N == 0) return y;

  const PreparedX px = prepare_x(x.data_ptr<float>(), M, K, group_size, act == 1);
  at::Tensor y32 = x16 ? at::empty({M, N}, x.options()) : y;
  QuantArgs a = px.args(M, K, G, group_size);
  a.q = qw.data_ptr<uint8_t>();
  a.scales = scales.data_ptr<float>();
  a.zeros = zeros.data_ptr<float>();
  a.bias = bias ? bias->data_ptr<float>() : nullptr;
  a.y = y32.data_ptr<float>();
  a.N = N;
  float* yp = a.y;
  at::BFloat16* y16 = x16 ? y.data_ptr<at::BFloat16>() : nullptr;
  split_columns(N, qw.size(1) + 8 * G, 1, [&](int64_t n0, int64_t n1) {
    run_quant(a, bits, act == 1, n0, n1);
    if (y16)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) y16[m * N + n] = at::BFloat16(yp[m * N + n]);
  });
  return y;
}

template <int bits>
at::Tensor linear_quant_meta(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t group_size,
                             const std::optional<at::Tensor>& bias, int64_t act) {
  check_quant_args(x, qw, scales, zeros, group_size, bias, bits);
  return at::empty(out_shape(x, qw.size(0)), x.options());
}

}  // namespace
}  // namespace leanfm_kernels

TORCH_LIBRARY(leanfm_kernels, m) {
  m.def("linear_fp32(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("linear_q8(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, "
        "Tensor? bias=None, int act=0) -> Tensor");
  m.def("linear_q4(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, "
        "Tensor? bias=None, int act=0) -> Tensor");
  m.def("cpu_supported() -> bool", &leanfm_kernels::cpu_supported);
}

TORCH_LIBRARY_IMPL(leanfm_kernels, CPU, m) {
  m.impl("linear_fp32", &leanfm_kernels::linear_fp32);
  m.impl("linear_bf16", &leanfm_kernels::linear_bf16);
  m.impl("linear_q8", &leanfm_kernels::linear_quant<8>);
  m.impl("linear_q4", &leanfm_kernels::linear_quant<4>);
}

TORCH_LIBRARY_IMPL(leanfm_kernels, Meta, m) {
  m.impl("linear_fp32", &leanfm_kernels::linear_meta);
  m.impl("linear_bf16", &leanfm_kernels::linear_meta);
  m.impl("linear_q8", &leanfm_kernels::linear_quant_meta<8>);
  m.impl("linear_q4", &leanfm_kernels::linear_quant_meta<4>);
}
