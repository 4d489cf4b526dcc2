// The blocking of the weight-only quantized kernels (included by skinny_q8.cpp and skinny_q4.cpp
// after their `#pragma GCC target`, so it is compiled for AVX2 + FMA too).
//
// Like blocking.h, per thread over blocks of 8 weight rows, and within a block x rows in register
// tiles: 4 x rows x 2 weight rows, then 2 x 4, then 1 x 4 (leftover weight rows one at a time).
// A row is walked in sub-blocks of 32 codes:
//
//   for each sub-block kb (group g = 32 * kb / group_size):
//     for each weight row r of the tile:
//       d[m] = codes(q[r, 32kb : 32kb + 32]) * x[m, 32kb : 32kb + 32]   (8 lanes, Tile::dot32)
//       acc[m][r] += scales[r, g] * d[m]                               (one fma per x row)
//   y[m, r] = sum(acc[m][r]) - sum_g scales[r, g] * zeros[r, g] * xsum[m, g] + bias[r]
//
// The zero term uses the per-group sums of x (computed once per call), so the inner loop converts
// codes straight to floats and never subtracts a zero point. Scaling per sub-block rather than per
// group costs the same for 32-code groups and keeps dependency chains short for larger ones.
// x is laid out once per call (quant_prepare_x) so that the 32-float blocks of all M rows for one
// sub-block are adjacent: a tile reads them at constant offsets from one pointer.
//
// The tiles are smaller than the fp32 kernel's (4 weight rows at M = 1, not 8): converting codes
// needs registers too, and at 8 rows gcc spilled the accumulators and the kernel ran 2x slower.
// Measured on the 2-core Zen 3 dev box, one thread, weights in L2: ~5 weights per cycle at M = 1
// for both bit widths (~16 instructions per 32 codes and weight row). Streaming from DRAM with 2
// threads: 12-18 GB/s of codes + scales + zeros against 17-24 GB/s for the fp32 kernel (compute
// and memory stalls do not fully overlap), so 4-bit runs ~3-3.7x and 8-bit ~1.9x the fp32 kernel.
//
// Prefetch: while the first x-row tile streams a block in, the codes of the block kPrefetchBlocks
// ahead are prefetched (one line per row every 64 code bytes), and that block's scales and zeros
// when the block starts. Without it the 8-bit kernel lost ~1/3 of its speed on the LM head; the
// scales/zeros prefetch removes the stall of the zero term (which reads `zeros` for the first time
// at the end of each tile). Distances 1 to 8 blocks and T0/T1/T2 hints measured the same, within
// the noise of the shared machine.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "blocking.h"
#include "kernels.h"

namespace leanfm_kernels {
namespace qblocking {

constexpr int64_t kPrefetchBlocks = 2;

// Tile: `static constexpr int64_t kBytes` (code bytes per 32 codes) and
//   template <int MB> static void dot32(const uint8_t* q, const float* x, __m256 (&d)[MB])
// setting d[i] to 8-lane partial sums of codes(q[0 : kBytes]) * x[32 * i : 32 * i + 32].
template <class Tile, int R, int MB>
inline void tile(const QuantArgs& a, int64_t n, int64_t m, const uint8_t* next) {
  constexpr int64_t kB = Tile::kBytes;
  const int64_t G = a.G, rb = a.K / 32 * kB, nkb = a.K / 32, subs = a.group_size / 32;
  const int64_t xstep = a.M * 32;
  const uint8_t* q = a.q + n * rb;
  const float* s = a.scales + n * G;
  const float* z = a.zeros + n * G;
  const float* xb = a.x + m * 32;  // block kb of x row m at a.x + (kb * M + m) * 32

  __m256 acc[MB][R];
  for (int i = 0; i < MB; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  const float* sg = s;
  int64_t left = subs;
  for (int64_t kb = 0; kb < nkb; ++kb, q += kB, xb += xstep) {
    if (next && (kb * kB) % 64 == 0)
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(next + r * rb + kb * kB), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      __m256 d[MB];
      Tile::template dot32<MB>(q + r * rb, xb, d);
      const __m256 sv = _mm256_broadcast_ss(sg + r * G);
      for (int i = 0; i < MB; ++i) acc[i][r] = _mm256_fmadd_ps(d[i], sv, acc[i][r]);
    }
    if (--left == 0) {
      left = subs;
      ++sg;
    }
  }

  // zero term: tail[i][r] = -sum_g s[r, g] * z[r, g] * xsum[m + i, g]
  const float* xs = a.xsum + m * G;
  float tail[MB][R];
  for (int r = 0; r < R; ++r) {
    __m256 t[MB];
    for (int i = 0; i < MB; ++i) t[i] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
      const __m256 sz =
          _mm256_mul_ps(_mm256_loadu_ps(s + r * G + g), _mm256_loadu_ps(z + r * G + g));
      for (int i = 0; i < MB; ++i)
        t[i] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xs + i * G + g), t[i]);
    }
    for (int i = 0; i < MB; ++i) {
      float v = blocking::hsum1(t[i]);
      for (int64_t h = g; h < G; ++h) v += s[r * G + h] * z[r * G + h] * xs[i * G + h];
      tail[i][r] = -v;
    }
  }
  blocking::store_tile<R, MB>(acc, tail, a.bias ? a.bias + n : nullptr, a.y + m * a.N + n, a.N);
}

template <class Tile>
inline void run(const QuantArgs& a, int64_t n0, int64_t n1) {
  constexpr int B = blocking::kBlock;
  const int64_t M = a.M, rb = a.K / 32 * Tile::kBytes;
  int64_t n = n0;
  for (; n + B <= n1; n += B) {
    const int64_t ahead = n + B * kPrefetchBlocks;
    const uint8_t* next = ahead + B <= n1 ? a.q + ahead * rb : nullptr;
    if (next)  // the scales and zeros of that block: B * G floats each, contiguous
      for (int64_t i = 0; i < B * a.G; i += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(a.scales + ahead * a.G + i), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(a.zeros + ahead * a.G + i), _MM_HINT_T0);
      }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4, next = nullptr)
      for (int h = 0; h < B; h += 2) tile<Tile, 2, 4>(a, n + h, m, next ? next + h * rb : nullptr);
    for (; m + 2 <= M; m += 2, next = nullptr)
      for (int h = 0; h < B; h += 4) tile<Tile, 4, 2>(a, n + h, m, next ? next + h * rb : nullptr);
    if (m < M)
      for (int h = 0; h < B; h += 4) tile<Tile, 4, 1>(a, n + h, m, next ? next + h * rb : nullptr);
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) tile<Tile, 1, 1>(a, n, m, nullptr);
}

}  // namespace qblocking
}  // namespace leanfm_kernels
