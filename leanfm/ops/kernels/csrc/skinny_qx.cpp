// Weight-only int8 / packed int4 GEMM for a few rows of x, with x quantized to int8 per block of 32
// (kernels.h: quant_prepare_xq); AVX2 integer dot products. Same blocking as quant_tile.h (blocks of
// 8 weight rows per thread, register tiles of R weight rows x MB x rows, prefetch 2 blocks ahead).
//
// Per 32 codes of weight row r and x row i (s = scales[r, g], xd = the x block's scale):
//   p = vpmaddwd(vpmaddubsw(u8 operand, s8 operand), 1)     8 int32 partial dot products
//   acc[i][r] += float(p) * (s * xd)                          one fma
// and at the end y = sum(acc) - sum_g s * z' * xsum[g] + bias, as in quant_tile.h.
//   * 4 bit: codes 0..15 are the u8 operand, xq the s8 one (|pair sums| <= 2 * 15 * 127).
//   * 8 bit: codes c in 0..255 do not fit vpmaddubsw's u8 x s8 without saturating, so the kernel
//     uses w = c - 128 (s8, xor 0x80) and llama.cpp's sign trick: |w| (u8, <= 128) times
//     sign(w) * xq (s8), pair sums <= 2 * 128 * 127 < 32767. The zero term uses z' = z - 128.
// The integer part is exact; the result equals the fp32 product of W with x' = xq * xd up to fp32
// rounding of the per-block sums.
//
// At M = 1 the 8-bit kernel walks one weight row at a time (a single sequential stream), the 4-bit
// one 4 rows at a time. Measured streaming from DRAM, one thread, CPU time, interleaved (Zen 3, busy
// machine): q8 per channel 7.1 GB/s with 4 rows vs 12.9 with 1 (K = 640; 10.6 vs 12.0 at K = 2048);
// q4 g32 / g128 8.9 / 11.1 GB/s with 4 rows vs 6.6 / 8.9 with 1. In L2 the 4-row tile is faster.
#include <immintrin.h>

#include <cmath>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "blocking.h"
#include "q8_block.h"

namespace leanfm_kernels {
namespace {

constexpr int64_t kPrefetchBlocks = 2;

inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

struct TileQ8x {
  static constexpr int64_t kBytes = 32;
  static constexpr int kRowsM1 = 1;  // weight rows per tile at M = 1 (see run)
  static constexpr float kZeroShift = 128.0f;
  template <int MB>
  static inline void idot(const uint8_t* q, const __m256i (&x)[MB], __m256i (&p)[MB]) {
    const __m256i w = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)),
                                       _mm256_set1_epi8(static_cast<char>(0x80)));
    const __m256i aw = _mm256_sign_epi8(w, w);
    for (int i = 0; i < MB; ++i) p[i] = dot_u8s8(aw, _mm256_sign_epi8(x[i], w));
  }
};

struct TileQ4x {
  static constexpr int64_t kBytes = 16;
  static constexpr int kRowsM1 = 4;
  static constexpr float kZeroShift = 0.0f;
  template <int MB>
  static inline void idot(const uint8_t* q, const __m256i (&x)[MB], __m256i (&p)[MB]) {
    // the 16 bytes in both lanes; the high lane shifted by 4 bits (per 64-bit word: each byte's
    // high nibble lands in its low nibble), then & 0x0F: k 0..15 | k 16..31
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    const __m256i codes = _mm256_and_si256(_mm256_srlv_epi64(b, _mm256_setr_epi64x(0, 0, 4, 4)),
                                           _mm256_set1_epi8(0x0F));
    for (int i = 0; i < MB; ++i) p[i] = dot_u8s8(codes, x[i]);
  }
};

// One block of 32 codes for R weight rows x MB x rows. Mode 0: acc += float(p) * (s * xd) (groups of
// one block); 1: part = float(p) * xd (first block of a group); 2: part += float(p) * xd.
template <class Tile, int R, int MB, int Mode>
inline void block32(const uint8_t* q, int64_t rb, const int8_t* xq, const float* xd, const float* s,
                    int64_t G, __m256 (&acc)[MB][R], __m256 (&part)[MB][R]) {
  __m256i xv[MB];
  __m256 dv[MB];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * 32));
    dv[i] = _mm256_broadcast_ss(xd + i);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    __m256i p[MB];
    Tile::template idot<MB>(q + r * rb, xv, p);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const __m256 f = _mm256_cvtepi32_ps(p[i]);
      if constexpr (Mode == 0)
        acc[i][r] = _mm256_fmadd_ps(f, _mm256_mul_ps(dv[i], _mm256_broadcast_ss(s + r * G)), acc[i][r]);
      else if constexpr (Mode == 1)
        part[i][r] = _mm256_mul_ps(f, dv[i]);
      else
        part[i][r] = _mm256_fmadd_ps(f, dv[i], part[i][r]);
    }
  }
}

template <class Tile, int R, int MB>
inline void tile(const QuantArgs& a, int64_t n, int64_t m, const uint8_t* next) {
  constexpr int64_t kB = Tile::kBytes;
  const int64_t G = a.G, M = a.M, rb = a.K / 32 * kB, subs = a.group_size / 32;
  const uint8_t* q = a.q + n * rb;
  const float* s = a.scales + n * G;
  const float* z = a.zeros + n * G;
  const int8_t* xq = a.xq + m * 32;  // block kb of x row m at a.xq + (kb * M + m) * 32
  const float* xd = a.xd + m;        // its scale at a.xd[kb * M + m]

  __m256 acc[MB][R], part[MB][R];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  int64_t kb = 0;
  auto prefetch = [&] {
    if (next && (kb * kB) % 64 == 0)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(next + r * rb + kb * kB), _MM_HINT_T0);
  };
  for (int64_t g = 0; g < G; ++g) {
    // sum over the group's blocks of float(idot) * xd, then one fma with the group's scale per row;
    // with one block per group, straight into acc with the product of the scales
    if (subs == 1) {
      prefetch();
      block32<Tile, R, MB, 0>(q, rb, xq, xd, s + g, G, acc, part);
      ++kb, q += kB, xq += 32 * M, xd += M;
      continue;
    }
    prefetch();
    block32<Tile, R, MB, 1>(q, rb, xq, xd, s + g, G, acc, part);
    ++kb, q += kB, xq += 32 * M, xd += M;
    for (int64_t sb = 1; sb < subs; ++sb, ++kb, q += kB, xq += 32 * M, xd += M) {
      prefetch();
      block32<Tile, R, MB, 2>(q, rb, xq, xd, s + g, G, acc, part);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 sv = _mm256_broadcast_ss(s + r * G + g);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) acc[i][r] = _mm256_fmadd_ps(part[i][r], sv, acc[i][r]);
    }
  }

  // zero term: tail[i][r] = -sum_g s[r, g] * (z[r, g] - shift) * xsum[m + i, g]
  const float* xs = a.xsum + m * G;
  float tail[MB][R];
  for (int r = 0; r < R; ++r) {
    __m256 t[MB];
    for (int i = 0; i < MB; ++i) t[i] = _mm256_setzero_ps();
    const __m256 shift = _mm256_set1_ps(Tile::kZeroShift);
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
      const __m256 sz = _mm256_mul_ps(_mm256_loadu_ps(s + r * G + g),
                                      _mm256_sub_ps(_mm256_loadu_ps(z + r * G + g), shift));
      for (int i = 0; i < MB; ++i)
        t[i] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xs + i * G + g), t[i]);
    }
    for (int i = 0; i < MB; ++i) {
      float v = blocking::hsum1(t[i]);
      for (int64_t h = g; h < G; ++h)
        v += s[r * G + h] * (z[r * G + h] - Tile::kZeroShift) * xs[i * G + h];
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
    if (next)
      for (int64_t i = 0; i < B * a.G; i += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(a.scales + ahead * a.G + i), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(a.zeros + ahead * a.G + i), _MM_HINT_T0);
      }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4, next = nullptr)
      for (int h = 0; h < B; h += 2) tile<Tile, 2, 4>(a, n + h, m, next ? next + h * rb : nullptr);
    for (; m + 2 <= M; m += 2, next = nullptr)
      for (int h = 0; h < B; h += 4) tile<Tile, 4, 2>(a, n + h, m, next ? next + h * rb : nullptr);
    if (m < M)  // one x row: kRowsM1 weight rows at a time
      for (int h = 0; h < B; h += Tile::kRowsM1)
        tile<Tile, Tile::kRowsM1, 1>(a, n + h, m, next ? next + h * rb : nullptr);
  }
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) tile<Tile, 1, 1>(a, n, m, nullptr);
}

}  // namespace

void quant_prepare_xq(const float* x, int64_t M, int64_t K, int64_t group_size, int8_t* xq,
                      float* xd, float* xsum) {
  const int64_t G = K / group_size, subs = group_size / 32;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float gsum = 0.0f;
      for (int64_t sb = 0; sb < subs; ++sb) {
        const int64_t kb = g * subs + sb;
        __m256 v[4];
        const float d = q8_block_load(x + m * K + kb * 32, v);
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        __m256i qi[4], isum = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {  // round half to even (MXCSR default), |q| <= 127
          qi[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(id)));
          qi[j] = _mm256_max_epi32(_mm256_min_epi32(qi[j], _mm256_set1_epi32(127)),
                                   _mm256_set1_epi32(-127));
          isum = _mm256_add_epi32(isum, qi[j]);
        }
        // int32 -> int8, in order: packs interleave 128-bit lanes, the permute puts them back
        const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
        const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + (kb * M + m) * 32), p8);
        alignas(32) int32_t s8[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(s8), isum);
        const int32_t qs = s8[0] + s8[1] + s8[2] + s8[3] + s8[4] + s8[5] + s8[6] + s8[7];
        xd[kb * M + m] = d;
        gsum += d * static_cast<float>(qs);
      }
      xsum[m * G + g] = gsum;
    }
}

void skinny_q8x(const QuantArgs& a, int64_t n0, int64_t n1) { run<TileQ8x>(a, n0, n1); }
void skinny_q4x(const QuantArgs& a, int64_t n0, int64_t n1) { run<TileQ4x>(a, n0, n1); }

}  // namespace leanfm_kernels

#pragma GCC pop_options
