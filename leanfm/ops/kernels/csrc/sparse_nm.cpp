// 2:4-sparse skinny GEMM kernel (see sparse_nm.h); AVX2 + FMA.
//
// One step covers 16 kept values = 32 inputs: the 4 index bytes, read as one little-endian uint32 u,
// hold value j's in-group position in bits [2j, 2j + 2). Broadcast u and shift lane j right by 2j
// (2j + 16 for values 8..15): vpermilps reads only the low 2 bits of each lane, so that is already its
// index. vpermilps picks within 128-bit lanes, so x is first reordered per 16 inputs (groups a b c d
// of 4) to [a | c] [b | d] (sparse24_pack_x): values [a a b b | c c d d] then pair with
// blend(permilps([a | c], idx), permilps([b | d], idx)) - no gathers, no lane-crossing shuffles in
// the loop. Per 4 inputs the weights take 8.5 bytes (fp32 values + 2-bit indices) against 16 dense
// fp32 bytes; bf16 values: 4.5 against 8 dense bf16 bytes. R weight rows share each x load, and each
// tile prefetches the next tile's weights (rows of K/2 values are short streams for the prefetchers).
// At M = 1 each weight row keeps one accumulator instead of two: ~6-10% faster from DRAM and from L3
// on gemma-3-270m's shapes (fewer live registers; 4 rows still give 4 independent FMA chains).
#include <immintrin.h>

#include <cstring>

#include "sparse_nm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace leanfm_kernels {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// x rows [0, MB) (reordered, see top) against weight rows [0, R) of one block; y[m * N + r]
template <int R, int MB, typename V>
inline void tile(const float* x, int64_t K, const V* v, const uint8_t* p, const float* bias, float* y,
                 int64_t N, bool prefetch) {
  const __m256i sh0 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i sh1 = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  const int64_t L = K / 2, P = K / 8;  // values and index bytes per weight row
  constexpr int A = MB == 1 ? 1 : 2;     // accumulators per (x row, weight row): one at M = 1 (faster)
  __m256 acc[MB][R][A];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < A; ++a) acc[m][r][a] = _mm256_setzero_ps();
  for (int64_t c = 0; c < K / 32; ++c) {
    if (prefetch) {  // the next tile's weights: one 64-byte line of values per row and step (fp32)
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(v + (R + r) * L + 16 * c), _MM_HINT_T0);
        if ((c & 15) == 0)  // and one line of indices per 16 steps
          _mm_prefetch(reinterpret_cast<const char*>(p + (R + r) * P + 4 * c), _MM_HINT_T0);
      }
    }
    for (int r = 0; r < R; ++r) {
      uint32_t u;
      std::memcpy(&u, p + r * P + 4 * c, 4);
      const __m256i vu = _mm256_set1_epi32(static_cast<int32_t>(u));
      const __m256i i0 = _mm256_srlv_epi32(vu, sh0), i1 = _mm256_srlv_epi32(vu, sh1);
      const __m256 v0 = load8(v + r * L + 16 * c), v1 = load8(v + r * L + 16 * c + 8);
      for (int m = 0; m < MB; ++m) {  // x reloads hit L1
        const float* xm = x + m * K + 32 * c;
        const __m256 g0 = _mm256_blend_ps(_mm256_permutevar_ps(_mm256_loadu_ps(xm), i0),
                                          _mm256_permutevar_ps(_mm256_loadu_ps(xm + 8), i0), 0xCC);
        const __m256 g1 = _mm256_blend_ps(_mm256_permutevar_ps(_mm256_loadu_ps(xm + 16), i1),
                                          _mm256_permutevar_ps(_mm256_loadu_ps(xm + 24), i1), 0xCC);
        acc[m][r][0] = _mm256_fmadd_ps(v0, g0, acc[m][r][0]);
        acc[m][r][A - 1] = _mm256_fmadd_ps(v1, g1, acc[m][r][A - 1]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r)
      y[m * N + r] = hsum(A == 1 ? acc[m][r][0] : _mm256_add_ps(acc[m][r][0], acc[m][r][A - 1])) +
                     (bias ? bias[r] : 0.0f);
}

template <int R, int MB, typename V>
void rows(const float* x, int64_t K, const V* values, const uint8_t* indices, const float* bias, float* y,
          int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R)
    tile<R, MB>(x, K, values + n * (K / 2), indices + n * (K / 8), bias ? bias + n : nullptr, y + n, N,
                n + 2 * R <= n1);
  for (; n < n1; ++n)
    tile<1, MB>(x, K, values + n * (K / 2), indices + n * (K / 8), bias ? bias + n : nullptr, y + n, N, false);
}

template <typename V>
void run(const float* x, int64_t M, int64_t K, const V* values, const uint8_t* indices, const float* bias,
         float* y, int64_t N, int64_t n0, int64_t n1) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) rows<2, 2>(x + m * K, K, values, indices, bias, y + m * N, N, n0, n1);
  if (m < M) rows<4, 1>(x + m * K, K, values, indices, bias, y + m * N, N, n0, n1);
}

}  // namespace

void sparse24_pack_x(const float* x, int64_t M, int64_t K, float* xr) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K; b += 16) {
      const float* s = x + m * K + b;
      float* d = xr + m * K + b;
      for (int j = 0; j < 4; ++j) {
        d[j] = s[j];            // group a
        d[4 + j] = s[8 + j];    // group c
        d[8 + j] = s[4 + j];    // group b
        d[12 + j] = s[12 + j];  // group d
      }
    }
}

void sparse24_fp32(const float* x, int64_t M, int64_t K, const float* values, const uint8_t* indices,
                   const float* bias, float* y, int64_t N, int64_t n0, int64_t n1) {
  run(x, M, K, values, indices, bias, y, N, n0, n1);
}

void sparse24_bf16(const float* x, int64_t M, int64_t K, const uint16_t* values, const uint8_t* indices,
                   const float* bias, float* y, int64_t N, int64_t n0, int64_t n1) {
  run(x, M, K, values, indices, bias, y, N, n0, n1);
}

}  // namespace leanfm_kernels

#pragma GCC pop_options
