// y = x @ W^T (+ bias) for a few rows of x and 8-bit weight-only quantized W, fp32 accumulation;
// AVX2 + FMA. The blocking and the scales/zeros algebra are in quant_tile.h; this file is the
// 32-code step (plus the preparation of x both quantized kernels use).
//
// 32 codes = 32 bytes: four times (8 bytes -> vpmovzxbd -> 8 int32 -> 8 floats -> fma with x).
#include <immintrin.h>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "quant_tile.h"

namespace leanfm_kernels {
namespace {

inline __m256 codes8(const uint8_t* q) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

struct TileQ8 {
  static constexpr int64_t kBytes = 32;

  template <int MB>
  static inline void dot32(const uint8_t* q, const float* x, __m256 (&d)[MB]) {
    const __m256 w0 = codes8(q);
    for (int i = 0; i < MB; ++i) d[i] = _mm256_mul_ps(w0, _mm256_loadu_ps(x + i * 32));
    for (int h = 8; h < 32; h += 8) {
      const __m256 w = codes8(q + h);
      for (int i = 0; i < MB; ++i) d[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i * 32 + h), d[i]);
    }
  }
};

}  // namespace

void quant_prepare_x(const float* x, int64_t M, int64_t K, int64_t group_size, float* xb,
                     float* xsum) {
  const int64_t G = K / group_size;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      __m256 s = _mm256_setzero_ps();
      for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 8) {
        const __m256 v = _mm256_loadu_ps(x + m * K + k);
        _mm256_storeu_ps(xb + (k / 32 * M + m) * 32 + k % 32, v);
        s = _mm256_add_ps(s, v);
      }
      xsum[m * G + g] = blocking::hsum1(s);
    }
}

void skinny_q8(const QuantArgs& a, int64_t n0, int64_t n1) { qblocking::run<TileQ8>(a, n0, n1); }

}  // namespace leanfm_kernels

#pragma GCC pop_options
