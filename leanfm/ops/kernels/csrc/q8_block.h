// One block of 32 fp32 values loaded for Q8_0 rounding (llama.cpp's activation quantization), shared
// by the int8-activation decode kernels (skinny_qx.cpp) and the prefill rounding (dequant.cpp), so
// both take the same scale. Include after `#pragma GCC target("avx2,fma")`.
#pragma once

#include <immintrin.h>

namespace leanfm_kernels {

// v = the 32 values at xb; returns the block's scale d = max|x| / 127 (0 for an all-zero block).
inline float q8_block_load(const float* xb, __m256 (&v)[4]) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 amax = _mm256_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_loadu_ps(xb + 8 * j);
    amax = _mm256_max_ps(amax, _mm256_and_ps(v[j], abs_mask));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h) / 127.0f;
}

}  // namespace leanfm_kernels
