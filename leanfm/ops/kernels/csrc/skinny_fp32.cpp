// y = x @ w^T (+ bias) for a few rows of x and fp32 weights; AVX2 + FMA.
// The blocking over rows of w and x is in blocking.h; this file is the register tile.
//
// Tile (R weight rows x MB x rows): for k in steps of 16 floats (one 64-byte line per weight row)
//     acc[m][r] += w[r][k:k+8] * x[m][k:k+8];  acc[m][r] += w[r][k+8:k+16] * x[m][k+8:k+16]
// then one 8-wide step if K % 16 >= 8, then a masked load for the last K % 8 elements (masked
// lanes load as 0.0f and add nothing).
#include <immintrin.h>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "blocking.h"

namespace leanfm_kernels {
namespace {

// Lanes [0, r) set, r in [0, 8].
inline __m256i tail_mask(int64_t r) {
  static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - r));
}

struct TileF32 {
  template <int R, int MB>
  static inline void run(const float* x, int64_t K, const float* w, const float* next,
                         const float* bias, float* y, int64_t N) {
    __m256 acc[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();

    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      if (next)
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(next + r * K + k), _MM_HINT_T0);
      // both 8-float halves of the line, half-major: at most MB x vectors live (no spills at 2x4)
      for (int h = 0; h < 16; h += 8)
        for (int r = 0; r < R; ++r) {
          const __m256 wv = _mm256_loadu_ps(w + r * K + k + h);
          for (int m = 0; m < MB; ++m)
            acc[m][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + h), acc[m][r]);
        }
    }
    if (k + 8 <= K) {
      for (int r = 0; r < R; ++r) {
        const __m256 w0 = _mm256_loadu_ps(w + r * K + k);
        for (int m = 0; m < MB; ++m)
          acc[m][r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][r]);
      }
      k += 8;
    }
    if (k < K) {
      const __m256i mask = tail_mask(K - k);
      for (int r = 0; r < R; ++r) {
        const __m256 w0 = _mm256_maskload_ps(w + r * K + k, mask);
        for (int m = 0; m < MB; ++m)
          acc[m][r] = _mm256_fmadd_ps(w0, _mm256_maskload_ps(x + m * K + k, mask), acc[m][r]);
      }
    }
    const float zero[MB][R] = {};
    blocking::store_tile<R, MB>(acc, zero, bias, y, N);
  }
};

}  // namespace

void skinny_fp32(const float* x, int64_t M, int64_t K, const float* w, const float* bias,
                 float* y, int64_t N, int64_t n0, int64_t n1) {
  blocking::run<TileF32>(x, M, K, w, bias, y, N, n0, n1);
}

}  // namespace leanfm_kernels

#pragma GCC pop_options
