// y = x @ w^T (+ bias) for 8 to ~32 rows of x and fp32 weights; AVX2 + FMA.
//
// At these row counts skinny_fp32.cpp's dot-product tiles (blocking.h) reach ~75 GFLOP/s on two Zen 3
// cores: each fma needs a weight vector and an x vector, and with 8 accumulators the tile is short of
// independent fmas. Here x is transposed once (fp32_pack_xt: 8 or 16 floats per k) and the tile is an
// outer product: per k, one weight value per weight row is broadcast and multiplied into the 1 or 2
// x vectors (12 weight rows x 8 x rows, or 6 x 16: 12 accumulators, 3-4 loads per 12 fmas).
//
// Measured (2 threads, fp32 GFLOP/s, dot-product tiles -> this file): gemma's 640 -> 262144 head
// (streamed from DRAM) 65 -> 130 at 16 rows, 57 -> 67 at 8; 640 -> 2048 73-78 -> 127-140 at 16 rows;
// benchmarks/bench_gemv.py --rows 16 --dtypes fp32 --quant "": a decode step's linears 85 ms against
// torch's 255. At 4 rows and fewer both tiles are equal, so those stay with the dot-product tiles.
//
// Each output is one fma chain over k in order (the dot-product tiles sum 8 lanes, then across them),
// so results differ from the few-row path by fp32 rounding.
#include <immintrin.h>

#include <algorithm>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace leanfm_kernels {
namespace {

// NR weight rows x (8 * MV) x rows: xt holds 8 * MV floats per k (rows past M are zeros).
template <int NR, int MV>
inline void tile(const float* xt, int64_t K, const float* w, const float* bias, float* y, int64_t N,
                 int64_t rows, const float* next) {
  __m256 acc[NR][MV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_setzero_ps();
  auto step = [&](int64_t k) __attribute__((always_inline)) {
    __m256 xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = _mm256_load_ps(xt + (k * MV + v) * 8);
    for (int r = 0; r < NR; ++r) {
      const __m256 b = _mm256_broadcast_ss(w + r * K + k);
      for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_fmadd_ps(b, xv[v], acc[r][v]);
    }
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {  // the prefetch outside the unrolled steps keeps acc in registers
    if (next)
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * K + k), _MM_HINT_T0);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) step(k + j);
  }
  for (; k < K; ++k) step(k);
  alignas(32) float t[8 * MV];
  for (int r = 0; r < NR; ++r) {
    for (int v = 0; v < MV; ++v) _mm256_store_ps(t + 8 * v, acc[r][v]);
    const float b = bias ? bias[r] : 0.0f;
    for (int64_t m = 0; m < rows; ++m) y[m * N + r] = t[m] + b;
  }
}

// Weight rows [n0, n1) for every group of x rows; a tile of weight rows is reused from L1 by the
// groups after the first, which prefetches the next tile.
template <int NR, int MV>
void run(const float* xt, int64_t M, int64_t K, const float* w, const float* bias, float* y, int64_t N,
         int64_t n0, int64_t n1) {
  constexpr int64_t kWidth = 8 * MV;
  const int64_t groups = (M + kWidth - 1) / kWidth;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    const float* next = n + 2 * NR <= n1 ? w + (n + NR) * K : nullptr;
    for (int64_t g = 0; g < groups; ++g)
      tile<NR, MV>(xt + g * K * kWidth, K, w + n * K, bias ? bias + n : nullptr, y + g * kWidth * N + n, N,
                   std::min(kWidth, M - g * kWidth), g == 0 ? next : nullptr);
  }
  for (; n < n1; ++n)
    for (int64_t g = 0; g < groups; ++g)
      tile<1, MV>(xt + g * K * kWidth, K, w + n * K, bias ? bias + n : nullptr, y + g * kWidth * N + n, N,
                  std::min(kWidth, M - g * kWidth), nullptr);
}

}  // namespace

int64_t fp32_xt_width(int64_t M) { return M <= 8 ? 8 : 16; }

int64_t fp32_xt_size(int64_t M, int64_t K) {
  const int64_t width = fp32_xt_width(M);
  return (M + width - 1) / width * width * K;
}

void fp32_pack_xt(const float* x, int64_t M, int64_t K, float* xt) {
  const int64_t width = fp32_xt_width(M);
  for (int64_t m0 = 0; m0 < M; m0 += width) {
    float* g = xt + m0 * K;  // group m0 / width starts at (m0 / width) * K * width
    const int64_t rows = std::min(width, M - m0);
    for (int64_t k = 0; k < K; ++k) {
      float* col = g + k * width;
      for (int64_t m = 0; m < rows; ++m) col[m] = x[(m0 + m) * K + k];
      for (int64_t m = rows; m < width; ++m) col[m] = 0.0f;
    }
  }
}

void skinny_fp32_xt(const float* xt, int64_t M, int64_t K, const float* w, const float* bias, float* y,
                    int64_t N, int64_t n0, int64_t n1) {
  if (fp32_xt_width(M) == 8)
    run<12, 1>(xt, M, K, w, bias, y, N, n0, n1);
  else
    run<6, 2>(xt, M, K, w, bias, y, N, n0, n1);
}

}  // namespace leanfm_kernels

#pragma GCC pop_options
