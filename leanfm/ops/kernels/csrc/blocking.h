// The blocking scheme shared by the skinny GEMM kernels (included by skinny_*.cpp only, after their
// `#pragma GCC target`, so these helpers are compiled for AVX2 + FMA too).
//
// Per thread, over its contiguous range of output columns [n0, n1) (= weight rows):
//
//   for each block of 8 weight rows                       (8*K*elem bytes: 20 KB at K = 640 fp32)
//     x rows in groups of 4:  4 sub-blocks of 2 weight rows x 4 x rows  (8 accumulators each)
//     then pairs of x rows:   2 sub-blocks of 4 weight rows x 2 x rows  (8 accumulators each)
//     then a single x row:    the 8 weight rows x 1 x row               (8 accumulators)
//
//   Inside a sub-block, k advances one 64-byte cache line of each weight row per step; each
//   accumulator is an 8-wide fp32 vector, reduced horizontally once at the end (4 rows at a time
//   with 3 hadds). Register tiles are chosen so a weight load feeds several x rows and a step never
//   needs more than ~12 of the 16 ymm registers.
//
//   * Each weight byte comes from DRAM once: the first x-row group streams the block in, later
//     groups re-read it from L1/L2 (x itself, M*K floats, stays in L1/L2 throughout).
//   * While the first group streams a block it prefetches the next block at the same k offset
//     (one block ahead, 8*K*elem bytes), so each thread reads one long contiguous stream.
//   * Leftover rows of N (< 8) go one at a time.
//
// Measured on the 2-core Zen 3 dev box (DRAM ~22-25 GB/s): 8x1 at M = 1 and the 2x4 tile at M = 4
// were the best of the variants tried (4-row blocks, no / NTA / fixed-distance prefetch).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

namespace leanfm_kernels {
namespace blocking {

// [sum(a0), sum(a1), sum(a2), sum(a3)]
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

inline float hsum1(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// y[m * N + r] = sum(acc[m][r]) + tail[m][r] + bias[r] for an MB x R tile.
template <int R, int MB>
inline void store_tile(const __m256 (&acc)[MB][R], const float (&tail)[MB][R], const float* bias,
                       float* y, int64_t N) {
  for (int m = 0; m < MB; ++m) {
    if constexpr (R % 4 == 0) {
      for (int q = 0; q < R; q += 4) {
        __m128 s = hsum4(acc[m][q], acc[m][q + 1], acc[m][q + 2], acc[m][q + 3]);
        s = _mm_add_ps(s, _mm_loadu_ps(tail[m] + q));
        if (bias) s = _mm_add_ps(s, _mm_loadu_ps(bias + q));
        _mm_storeu_ps(y + m * N + q, s);
      }
    } else {
      for (int r = 0; r < R; ++r)
        y[m * N + r] = hsum1(acc[m][r]) + tail[m][r] + (bias ? bias[r] : 0.0f);
    }
  }
}

constexpr int kBlock = static_cast<int>(kRowBlock);  // weight rows per block

// Tile: a struct with `template <int R, int MB> static void run(const float* x, int64_t K,
// const W* w, const W* prefetch_or_null, const float* bias, float* y, int64_t N)` computing
// y[m * N + r] for m < MB, r < R (x rows and w rows have stride K).
template <class Tile, class W>
inline void run(const float* x, int64_t M, int64_t K, const W* w, const float* bias, float* y,
                int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kBlock <= n1; n += kBlock) {
    const W* wb = w + n * K;
    const W* next = n + 2 * kBlock <= n1 ? wb + kBlock * K : nullptr;
    const float* bb = bias ? bias + n : nullptr;
    float* yb = y + n;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4, next = nullptr)
      for (int h = 0; h < kBlock; h += 2)
        Tile::template run<2, 4>(x + m * K, K, wb + h * K, next ? next + h * K : nullptr,
                                 bb ? bb + h : nullptr, yb + m * N + h, N);
    for (; m + 2 <= M; m += 2, next = nullptr)
      for (int h = 0; h < kBlock; h += 4)
        Tile::template run<4, 2>(x + m * K, K, wb + h * K, next ? next + h * K : nullptr,
                                 bb ? bb + h : nullptr, yb + m * N + h, N);
    if (m < M) Tile::template run<kBlock, 1>(x + m * K, K, wb, next, bb, yb + m * N, N);
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m)
      Tile::template run<1, 1>(x + m * K, K, w + n * K, nullptr, bias ? bias + n : nullptr,
                               y + m * N + n, N);
}

}  // namespace blocking
}  // namespace leanfm_kernels
