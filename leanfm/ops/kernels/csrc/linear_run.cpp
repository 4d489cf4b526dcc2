// run_linears (linear_run.h): x prepared once per family, then one parallel region over the rows of
// all weights (epilogue -1: equal shares of the concatenated rows, every row costs the same) or over
// the shared columns of a gated pair (each thread applies act(g) * u to the columns it produced).
#include "linear_run.h"

#include <algorithm>
#include <string>

#include "fused.h"
#include "parallel.h"
#include "qx.h"
#include "sparse_nm.h"

namespace leanfm_kernels {
namespace {

constexpr int64_t kMinBytes = 64 * 1024;  // per thread

int64_t row_bytes(const LinearRef& r) {
  switch (r.kind) {
    case kF32: return r.K * 4;
    case kBF16: return r.K * 2;
    case kQ8: return r.K + 8 * r.K / r.group_size;
    case kS24: return r.K * 2 + r.K / 8;
    case kS24BF16: return r.K + r.K / 8;
    default: return r.K / 2 + 8 * r.K / r.group_size;
  }
}

}  // namespace

LinearRef make_linear_ref(int64_t kind, const at::Tensor& w, const at::Tensor* scales,
                          const at::Tensor* zeros, const at::Tensor* bias, int64_t K,
                          int64_t group_size, const char* what) {
  const std::string name(what);
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(), name,
              ": weight must be a contiguous 2-D CPU tensor");
  LinearRef r;
  r.kind = kind, r.N = w.size(0), r.K = K, r.group_size = group_size;
  if (kind == kF32 || kind == kBF16) {
    TORCH_CHECK(w.size(1) == K && w.scalar_type() == (kind == kF32 ? at::kFloat : at::kBFloat16),
                name, ": weight must be (N, ", K, ") ", kind == kF32 ? "float32" : "bfloat16");
    r.w = w.data_ptr();
  } else if (kind == kS24 || kind == kS24BF16) {
    TORCH_CHECK(K % 32 == 0, name, ": 2:4 weights need K % 32 == 0, got ", K);
    TORCH_CHECK(w.size(1) * 2 == K && w.scalar_type() == (kind == kS24 ? at::kFloat : at::kBFloat16),
                name, ": 2:4 values must be (N, ", K / 2, ") ", kind == kS24 ? "float32" : "bfloat16");
    TORCH_CHECK(scales && scales->device().is_cpu() && scales->scalar_type() == at::kByte &&
                    scales->is_contiguous() && scales->dim() == 2 && scales->size(0) == r.N &&
                    scales->size(1) * 8 == K,
                name, ": 2:4 indices must be contiguous uint8 (", r.N, ", ", K / 8, ")");
    r.w = w.data_ptr();
    r.indices = scales->data_ptr<uint8_t>();
  } else {
    TORCH_CHECK(kind == kQ4 || kind == kQ8, name, ": unknown weight kind ", kind);
    TORCH_CHECK(w.scalar_type() == at::kByte && w.size(1) * 8 == K * kind, name,
                ": quantized weight must be uint8 with ", K * kind / 8, " bytes per row");
    TORCH_CHECK(K % 32 == 0 && group_size > 0 && group_size % 32 == 0 && K % group_size == 0, name,
                ": K and group_size must be multiples of 32, group_size dividing K");
    TORCH_CHECK(scales && zeros, name, ": scales and zeros are needed");
    for (const at::Tensor* t : {scales, zeros})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                      t->dim() == 2 && t->size(0) == r.N && t->size(1) == K / group_size,
                  name, ": scales and zeros must be contiguous float32 (", r.N, ", ", K / group_size,
                  ")");
    r.w = w.data_ptr();
    r.scales = scales->data_ptr<float>();
    r.zeros = zeros->data_ptr<float>();
  }
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous() && bias->dim() == 1 && bias->size(0) == r.N,
                name, ": bias must be contiguous float32 (", r.N, ",)");
    r.bias = bias->data_ptr<float>();
  }
  return r;
}

bool same_family(const LinearRef* refs, size_t n) {
  for (size_t i = 1; i < n; ++i)
    if (refs[i].kind != refs[0].kind || refs[i].K != refs[0].K ||
        ((refs[0].kind == kQ4 || refs[0].kind == kQ8) && refs[i].group_size != refs[0].group_size))
      return false;
  return true;
}

void run_linears(const float* x, int64_t M, int64_t K, const LinearRef* refs, size_t n,
                 float* const* ys, int64_t epilogue, float* out, bool int8_act) {
  if (M <= 0 || n == 0) return;
  const int64_t kind = refs[0].kind;
  const bool quant = kind == kQ4 || kind == kQ8;
  std::vector<float> xpk;
  PreparedX px;
  if (kind == kBF16) {
    xpk.resize(M * K);
    bf16_pack_x(x, M, K, xpk.data());
  } else if (kind == kS24 || kind == kS24BF16) {
    xpk.resize(M * K);
    sparse24_pack_x(x, M, K, xpk.data());
  } else if (quant) {
    px = prepare_x(x, M, K, refs[0].group_size, int8_act);
  }
  const bool outer = kind == kF32 && M >= kOuterMinRows;
  at::Tensor xt;  // outer-product path: x transposed once (64-byte aligned storage)
  if (outer) {
    xt = at::empty({fp32_xt_size(M, K)}, at::TensorOptions().dtype(at::kFloat));
    fp32_pack_xt(x, M, K, xt.data_ptr<float>());
  }
  const float* xtp = outer ? xt.data_ptr<float>() : nullptr;
  const int64_t G = quant ? K / refs[0].group_size : 0;
  auto seg = [&](size_t i, int64_t n0, int64_t n1) {
    const LinearRef& r = refs[i];
    if (outer) {
      skinny_fp32_xt(xtp, M, K, static_cast<const float*>(r.w), r.bias, ys[i], r.N, n0, n1);
    } else if (kind == kF32) {
      skinny_fp32(x, M, K, static_cast<const float*>(r.w), r.bias, ys[i], r.N, n0, n1);
    } else if (kind == kBF16) {
      skinny_bf16(xpk.data(), M, K, static_cast<const uint16_t*>(r.w), r.bias, ys[i], r.N, n0, n1);
    } else if (kind == kS24) {
      sparse24_fp32(xpk.data(), M, K, static_cast<const float*>(r.w), r.indices, r.bias, ys[i], r.N, n0, n1);
    } else if (kind == kS24BF16) {
      sparse24_bf16(xpk.data(), M, K, static_cast<const uint16_t*>(r.w), r.indices, r.bias, ys[i], r.N, n0,
                    n1);
    } else {
      QuantArgs a = px.args(M, K, G, r.group_size);
      a.q = static_cast<const uint8_t*>(r.w);
      a.scales = r.scales, a.zeros = r.zeros, a.bias = r.bias, a.y = ys[i], a.N = r.N;
      run_quant(a, kind, int8_act, n0, n1);
    }
  };
  const int64_t grain =
      std::max<int64_t>(1, kMinBytes / std::max<int64_t>(1, kRowBlock * row_bytes(refs[0])));
  if (epilogue >= 0) {
    const int64_t N = refs[0].N, blocks = (N + kRowBlock - 1) / kRowBlock;
    par::for_ranges(blocks, std::max<int64_t>(1, grain / 2), [&](int64_t b0, int64_t b1) {
      const int64_t n0 = b0 * kRowBlock, n1 = std::min(N, b1 * kRowBlock);
      seg(0, n0, n1);
      seg(1, n0, n1);
      for (int64_t m = 0; m < M; ++m)
        fused::gated_act(ys[0] + m * N + n0, ys[1] + m * N + n0, n1 - n0, epilogue,
                         out + m * N + n0);
    });
    return;
  }
  std::vector<int64_t> first(n + 1, 0);  // first block of each weight
  for (size_t i = 0; i < n; ++i) first[i + 1] = first[i] + (refs[i].N + kRowBlock - 1) / kRowBlock;
  par::for_ranges(first.back(), grain, [&](int64_t b0, int64_t b1) {
    for (size_t i = 0; i < n; ++i) {
      const int64_t lo = std::max(b0, first[i]), hi = std::min(b1, first[i + 1]);
      if (lo < hi) seg(i, (lo - first[i]) * kRowBlock, std::min(refs[i].N, (hi - first[i]) * kRowBlock));
    }
  });
}

}  // namespace leanfm_kernels
