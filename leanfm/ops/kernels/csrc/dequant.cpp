// The prefill side of the weight-only quantized layers (leanfm/ops/kernels/quant.py): past the
// decode kernels' row limit a quantized linear dequantizes W and runs the BLAS GEMM, and with int8
// activations it first rounds x to int8 per block of 32. In Python both were several passes over
// fresh tensors (W dequantized at ~60% of the GEMM's speed at 512 rows); here each is one pass.
//
//   torch.ops.leanfm_kernels.dequantize_weight(qweight, scales, zeros, bits, group_size) -> W fp32 (N, K)
//       W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g] exactly as quant.dequantize computes it
//       (q - z is exact in fp32; one rounding in the product); bits 4 (Q4_0-style nibbles) or 8.
//   torch.ops.leanfm_kernels.quantize_act_q8(x) -> x' fp32, same shape, K % 32 == 0
//       x' = round(x * (1 / d)) * d per block of 32 along K, d = max|block| / 127: bit-identical to
//       quant.quantize_activations_q8 and to what the int8-activation decode kernels multiply W with.
#include <ATen/ATen.h>
#include <immintrin.h>
#include <torch/library.h>

#include "kernels.h"
#include "parallel.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "q8_block.h"

namespace leanfm_kernels {
namespace {

inline void put8(float* w, __m256i codes32, __m256 z, __m256 s) {
  _mm256_storeu_ps(w, _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(codes32), z), s));
}

void dequant_rows(const uint8_t* q, const float* scales, const float* zeros, int64_t bits, int64_t K,
                  int64_t group_size, float* w, int64_t n0, int64_t n1) {
  const int64_t G = K / group_size, row_bytes = K * bits / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = q + n * row_bytes;
    float* wr = w + n * K;
    for (int64_t g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(scales[n * G + g]), z = _mm256_set1_ps(zeros[n * G + g]);
      for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 32) {
        if (bits == 8) {
          for (int h = 0; h < 32; h += 8) {
            const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qr + k + h));
            put8(wr + k + h, _mm256_cvtepu8_epi32(b), z, s);
          }
        } else {  // 16 bytes: low nibbles are codes k..k+15, high nibbles k+16..k+31
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + k / 2));
          const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
          const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
          put8(wr + k, _mm256_cvtepu8_epi32(lo), z, s);
          put8(wr + k + 8, _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), z, s);
          put8(wr + k + 16, _mm256_cvtepu8_epi32(hi), z, s);
          put8(wr + k + 24, _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), z, s);
        }
      }
    }
  }
}

void quantize_rows(const float* x, float* y, int64_t blocks0, int64_t blocks1) {
  const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  for (int64_t b = blocks0; b < blocks1; ++b) {
    __m256 v[4];
    const float d = q8_block_load(x + b * 32, v);
    const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f), dv = _mm256_set1_ps(d);
    for (int j = 0; j < 4; ++j) {  // round half to even, like torch.round
      const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_storeu_ps(y + b * 32 + 8 * j, _mm256_mul_ps(_mm256_max_ps(_mm256_min_ps(r, hi), lo), dv));
    }
  }
}

}  // namespace
}  // namespace leanfm_kernels

#pragma GCC pop_options

namespace leanfm_kernels {
namespace {

constexpr int64_t kMinWeightsPerTask = 1 << 16;

at::Tensor dequantize_weight(const at::Tensor& qweight, const at::Tensor& scales_in, const at::Tensor& zeros_in,
                             int64_t bits, int64_t group_size) {
  TORCH_CHECK(cpu_supported(), "dequantize_weight: this CPU lacks AVX2/FMA");
  TORCH_CHECK(bits == 4 || bits == 8, "dequantize_weight: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kByte && qweight.dim() == 2,
              "dequantize_weight: qweight must be a 2-D uint8 CPU tensor");
  const at::Tensor q = qweight.contiguous();
  const at::Tensor scales = scales_in.to(at::kFloat).contiguous(), zeros = zeros_in.to(at::kFloat).contiguous();
  const int64_t N = q.size(0), K = q.size(1) * 8 / bits;
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && K % group_size == 0,
              "dequantize_weight: group_size must be a multiple of 32 dividing K=", K, ", got ", group_size);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / group_size &&
                  zeros.sizes() == scales.sizes(),
              "dequantize_weight: scales and zeros must be (", N, ", ", K / group_size, ")");
  at::Tensor w = at::empty({N, K}, scales.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *sp = scales.data_ptr<float>(), *zp = zeros.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  par::for_ranges(N, std::max<int64_t>(1, kMinWeightsPerTask / std::max<int64_t>(1, K)),
                  [&](int64_t n0, int64_t n1) { dequant_rows(qp, sp, zp, bits, K, group_size, wp, n0, n1); });
  return w;
}

at::Tensor quantize_act_q8(const at::Tensor& x_in) {
  TORCH_CHECK(cpu_supported(), "quantize_act_q8: this CPU lacks AVX2/FMA");
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() >= 1 && x_in.size(-1) % 32 == 0,
              "quantize_act_q8: x must be a CPU tensor whose last dimension is a multiple of 32");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  par::for_ranges(x.numel() / 32, 2048, [&](int64_t b0, int64_t b1) { quantize_rows(xp, yp, b0, b1); });
  return y;
}

}  // namespace
}  // namespace leanfm_kernels

TORCH_LIBRARY_FRAGMENT(leanfm_kernels, m) {
  m.def("dequantize_weight(Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size) -> Tensor");
  m.def("quantize_act_q8(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(leanfm_kernels, CPU, m) {
  m.impl("dequantize_weight", &leanfm_kernels::dequantize_weight);
  m.impl("quantize_act_q8", &leanfm_kernels::quantize_act_q8);
}
