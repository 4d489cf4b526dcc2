// y = x @ W^T (+ bias) for a few rows of x and 4-bit weight-only quantized W, fp32 accumulation;
// AVX2 + FMA. The blocking and the scales/zeros algebra are in quant_tile.h; this file is the
// 32-code step.
//
// Q4_0-style layout: the 16 bytes of a 32-code block hold codes 0..15 in their low nibbles and
// codes 16..31 in their high nibbles, so each nibble half is 16 consecutive k's and x is used as
// is. Bytes 0..7 and 8..15 are widened to int32 lanes (vpmovzxbd); `& 0xF` gives codes 0..7 and
// 8..15, `>> 4` codes 16..23 and 24..31; then int -> float and fma with x.
#include <immintrin.h>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "quant_tile.h"

namespace leanfm_kernels {
namespace {

struct TileQ4 {
  static constexpr int64_t kBytes = 16;

  template <int MB>
  static inline void dot32(const uint8_t* q, const float* x, __m256 (&d)[MB]) {
    const __m256i lo =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));  // bytes 0..7
    const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
        reinterpret_cast<const __m128i*>(q + 8)));  // bytes 8..15
    const __m256i mask = _mm256_set1_epi32(0x0F);
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(lo, mask));   // k 0..7
    for (int i = 0; i < MB; ++i) d[i] = _mm256_mul_ps(w0, _mm256_loadu_ps(x + i * 32));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(hi, mask));   // k 8..15
    for (int i = 0; i < MB; ++i) d[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i * 32 + 8), d[i]);
    const __m256 w2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));     // k 16..23
    for (int i = 0; i < MB; ++i) d[i] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x + i * 32 + 16), d[i]);
    const __m256 w3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));     // k 24..31
    for (int i = 0; i < MB; ++i) d[i] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x + i * 32 + 24), d[i]);
  }
};

}  // namespace

void skinny_q4(const QuantArgs& a, int64_t n0, int64_t n1) { qblocking::run<TileQ4>(a, n0, n1); }

}  // namespace leanfm_kernels

#pragma GCC pop_options
