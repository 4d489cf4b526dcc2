// y = x @ w^T (+ bias) for a few rows of x and bf16 weights, fp32 accumulation; AVX2 + FMA.
// The blocking over rows of w and x is in blocking.h; this file is the register tile.
//
// bf16 -> fp32 without a conversion instruction: a bf16 value is the top half of an fp32. Loading
// 16 bf16 weights as eight 32-bit lanes, lane i holds element 2i in its low half and 2i+1 in its
// high half, so
//     even = lane << 16            -> fp32 of elements 0, 2, ..., 14
//     odd  = lane & 0xFFFF0000     -> fp32 of elements 1, 3, ..., 15
// Two integer ops per 16 weights and no shuffles: instead x is reordered once per call
// (bf16_pack_x) so that each 16-chunk of x holds its even elements, then its odd ones. A dot product
// does not care about the order of its terms.
//
// Tile (R weight rows x MB x rows): k in steps of 32 bf16 (one 64-byte line per weight row), then
// one 16-wide step if K % 32 >= 16, then scalar for the last K % 16 (x is not reordered there).
#include <immintrin.h>

#include <cstring>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "blocking.h"

namespace leanfm_kernels {
namespace {

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct TileBF16 {
  // acc[m][r] += dot(16 bf16 weights of row r at w, reordered x chunk of row m at x), m < MB.
  // Even elements of all R rows first, then odd ones (the second load of each row hits L1): at
  // most MB x vectors are live, so the 2x4 tile fits in registers.
  template <int R, int MB>
  static inline void step16(const uint16_t* w, const float* x, int64_t K, __m256 (&acc)[MB][R]) {
    for (int odd = 0; odd < 2; ++odd)
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K));
        const __m256 wv = _mm256_castsi256_ps(odd ? _mm256_and_si256(v, _mm256_set1_epi32(-65536))
                                                  : _mm256_slli_epi32(v, 16));
        for (int m = 0; m < MB; ++m)
          acc[m][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + 8 * odd), acc[m][r]);
      }
  }

  template <int R, int MB>
  static inline void run(const float* xp, int64_t K, const uint16_t* w, const uint16_t* next,
                         const float* bias, float* y, int64_t N) {
    __m256 acc[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();

    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      if (next)
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(next + r * K + k), _MM_HINT_T0);
      step16<R, MB>(w + k, xp + k, K, acc);
      step16<R, MB>(w + k + 16, xp + k + 16, K, acc);
    }
    if (k + 16 <= K) {
      step16<R, MB>(w + k, xp + k, K, acc);
      k += 16;
    }
    float tail[MB][R] = {};
    for (; k < K; ++k)
      for (int r = 0; r < R; ++r) {
        const float wv = bf16_to_float(w[r * K + k]);
        for (int m = 0; m < MB; ++m) tail[m][r] += wv * xp[m * K + k];
      }
    blocking::store_tile<R, MB>(acc, tail, bias, y, N);
  }
};

}  // namespace

namespace {
inline float as_float(float v) { return v; }
inline float as_float(uint16_t v) { return bf16_to_float(v); }

template <typename T>
void pack_x(const T* x, int64_t M, int64_t K, float* xp) {
  const int64_t k16 = K / 16 * 16;
  for (int64_t m = 0; m < M; ++m) {
    const T* src = x + m * K;
    float* dst = xp + m * K;
    for (int64_t k = 0; k < k16; k += 16)
      for (int j = 0; j < 8; ++j) {
        dst[k + j] = as_float(src[k + 2 * j]);
        dst[k + 8 + j] = as_float(src[k + 2 * j + 1]);
      }
    for (int64_t k = k16; k < K; ++k) dst[k] = as_float(src[k]);
  }
}
}  // namespace

void bf16_pack_x(const float* x, int64_t M, int64_t K, float* xp) { pack_x(x, M, K, xp); }
void bf16_pack_x(const uint16_t* x, int64_t M, int64_t K, float* xp) { pack_x(x, M, K, xp); }

void skinny_bf16(const float* xp, int64_t M, int64_t K, const uint16_t* w, const float* bias,
                 float* y, int64_t N, int64_t n0, int64_t n1) {
  blocking::run<TileBF16>(xp, M, K, w, bias, y, N, n0, n1);
}

}  // namespace leanfm_kernels

#pragma GCC pop_options
