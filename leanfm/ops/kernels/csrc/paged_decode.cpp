// Paged decode attention (see paged_decode.h): AVX2 + FMA, fp32 online softmax.
//
// A task walks its keys in chunks of at most 16 that never cross a block: for each key it reads the
// K row once for all G query heads of the kv head (GQA), then updates the G running maxima, sums and
// accumulators with the chunk's probabilities (the flash-decoding recurrence), reading each V row once.
// bf16 rows widen by a shift, int8 rows by a sign extension; the int8 scales multiply the dot product
// (K) and the probability (V), so no row is ever dequantized into memory.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "paged_decode.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace leanfm_kernels {
namespace {

constexpr int kChunk = 16;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp for 8 floats (Cephes polynomial, ~1 ulp); inputs below -88.4 give 0.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// 8 consecutive cache values from element index i, as fp32.
template <int KIND>
inline __m256 load8(const void* base, int64_t i) {
  if constexpr (KIND == kKVFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else if constexpr (KIND == kKVBFloat16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  } else {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + i));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  }
}

template <int KIND, int G>
struct Task {
  const DecodeArgs& a;
  int64_t h;
  float* m;    // (G,)
  float* l;    // (G,)
  float* acc;  // (G, D)
  std::vector<float>* logits;  // H2O: the scores of every visited key, G per key (nullptr: not kept)
  std::vector<int64_t>* slots;  // H2O: the cache slot of every visited key

  // keys at offsets [off, off + n) of `block` (n <= kChunk), queried with q (G x D, pre-scaled)
  void chunk(const float* q, int64_t block, int64_t off, int n) {
    const int64_t D = a.D, Hkv = a.Hkv;
    const int64_t slot0 = block * a.block_size + off;
    alignas(32) float s[G][kChunk];
    alignas(32) float p[G][kChunk];
    float vscale[kChunk];
    for (int j = 0; j < n; ++j) {
      const int64_t row = (slot0 + j) * Hkv + h;
      __m256 dot[G];
      for (int g = 0; g < G; ++g) dot[g] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 kv = load8<KIND>(a.k, row * D + d);
        for (int g = 0; g < G; ++g) dot[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), kv, dot[g]);
      }
      const float ks = KIND == kKVInt8 ? a.k_scale[row] : 1.0f;
      vscale[j] = KIND == kKVInt8 ? a.v_scale[row] : 1.0f;
      for (int g = 0; g < G; ++g) {
        float x = hsum(dot[g]) * ks;
        if (a.softcap > 0.0f) x = a.softcap * std::tanh(x / a.softcap);
        s[g][j] = x;
      }
      if (logits) {
        for (int g = 0; g < G; ++g) logits->push_back(s[g][j]);
        slots->push_back(slot0 + j);
      }
    }
    for (int g = 0; g < G; ++g) {
      for (int j = n; j < kChunk; ++j) s[g][j] = kNegInf;
      float mb = kNegInf;
      for (int j = 0; j < n; ++j) mb = std::max(mb, s[g][j]);
      const float mn = std::max(m[g], mb);
      if (m[g] != mn) {  // rescale what was accumulated under the old maximum
        const float alpha = std::exp(m[g] - mn);
        l[g] *= alpha;
        const __m256 av = _mm256_set1_ps(alpha);
        for (int64_t d = 0; d < D; d += 8)
          _mm256_storeu_ps(acc + g * D + d, _mm256_mul_ps(av, _mm256_loadu_ps(acc + g * D + d)));
        m[g] = mn;
      }
      const __m256 mv = _mm256_set1_ps(mn);
      const __m256 p0 = exp256(_mm256_sub_ps(_mm256_load_ps(s[g]), mv));
      const __m256 p1 = exp256(_mm256_sub_ps(_mm256_load_ps(s[g] + 8), mv));
      _mm256_store_ps(p[g], p0);
      _mm256_store_ps(p[g] + 8, p1);
      float sum = 0.0f;
      for (int j = 0; j < n; ++j) {
        sum += p[g][j];
        p[g][j] *= vscale[j];
      }
      l[g] += sum;
    }
    for (int64_t d = 0; d < D; d += 8) {
      __m256 o[G];
      for (int g = 0; g < G; ++g) o[g] = _mm256_loadu_ps(acc + g * D + d);
      for (int j = 0; j < n; ++j) {
        const __m256 vv = load8<KIND>(a.v, ((slot0 + j) * Hkv + h) * D + d);
        for (int g = 0; g < G; ++g) o[g] = _mm256_fmadd_ps(_mm256_set1_ps(p[g][j]), vv, o[g]);
      }
      for (int g = 0; g < G; ++g) _mm256_storeu_ps(acc + g * D + d, o[g]);
    }
  }

  void range(const float* q, int64_t r, int64_t j, int64_t end) {
    const int64_t bs = a.block_size;
    const int64_t* table = a.table + r * a.table_width;
    while (j < end) {
      const int64_t off = j % bs;
      const int n = static_cast<int>(std::min<int64_t>({end - j, bs - off, kChunk}));
      chunk(q, table[j / bs], off, n);
      j += n;
    }
  }

  // H2O: every visited key's probability, summed over the G query heads, into a.score
  void add_scores() {
    const size_t n = slots->size();
    float inv[G];
    for (int g = 0; g < G; ++g) inv[g] = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
    for (size_t i = 0; i < n; ++i) {
      float total = 0.0f;
      for (int g = 0; g < G; ++g) total += std::exp((*logits)[i * G + g] - m[g]) * inv[g];
      a.score[(*slots)[i] * a.Hkv + h] += total;
    }
  }
};

template <int KIND, int G>
void run_task(const DecodeArgs& a, int64_t r, int64_t h, int64_t k0, int64_t k1, bool with_sinks,
              float* m, float* l, float* acc) {
  for (int g = 0; g < G; ++g) {
    m[g] = kNegInf;
    l[g] = 0.0f;
  }
  for (int64_t i = 0; i < G * a.D; ++i) acc[i] = 0.0f;
  thread_local std::vector<float> logits;
  thread_local std::vector<int64_t> slots;
  logits.clear();
  slots.clear();
  Task<KIND, G> t{a, h, m, l, acc, a.score ? &logits : nullptr, a.score ? &slots : nullptr};
  const int64_t qoff = (r * a.H + h * G) * a.D;
  const int64_t ns = with_sinks ? std::min(a.sinks, a.lo[r]) : 0;
  if (ns > 0) t.range((a.q_sink ? a.q_sink : a.q) + qoff, r, 0, ns);
  t.range(a.q + qoff, r, k0, k1);
  if (a.score) t.add_scores();
}

template <int KIND>
void dispatch_group(const DecodeArgs& a, int64_t r, int64_t h, int64_t k0, int64_t k1, bool with_sinks,
                    float* m, float* l, float* acc) {
  switch (a.H / a.Hkv) {
    case 1: return run_task<KIND, 1>(a, r, h, k0, k1, with_sinks, m, l, acc);
    case 2: return run_task<KIND, 2>(a, r, h, k0, k1, with_sinks, m, l, acc);
    case 3: return run_task<KIND, 3>(a, r, h, k0, k1, with_sinks, m, l, acc);
    case 4: return run_task<KIND, 4>(a, r, h, k0, k1, with_sinks, m, l, acc);
    case 5: return run_task<KIND, 5>(a, r, h, k0, k1, with_sinks, m, l, acc);
    case 6: return run_task<KIND, 6>(a, r, h, k0, k1, with_sinks, m, l, acc);
    case 7: return run_task<KIND, 7>(a, r, h, k0, k1, with_sinks, m, l, acc);
    default: return run_task<KIND, 8>(a, r, h, k0, k1, with_sinks, m, l, acc);
  }
}

}  // namespace

void paged_decode_task(const DecodeArgs& a, int64_t r, int64_t h, int64_t k0, int64_t k1, bool with_sinks,
                       float* m, float* l, float* acc) {
  switch (a.kind) {
    case kKVFloat32: return dispatch_group<kKVFloat32>(a, r, h, k0, k1, with_sinks, m, l, acc);
    case kKVBFloat16: return dispatch_group<kKVBFloat16>(a, r, h, k0, k1, with_sinks, m, l, acc);
    default: return dispatch_group<kKVInt8>(a, r, h, k0, k1, with_sinks, m, l, acc);
  }
}

}  // namespace leanfm_kernels

#pragma GCC pop_options
