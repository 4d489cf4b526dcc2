// The arithmetic of fused.h; AVX2 + FMA. Rows need not be multiples of 8 (scalar tails).
#include <immintrin.h>

#include <cmath>
#include <limits>

#include "fused.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "blocking.h"

namespace leanfm_kernels {
namespace fused {
namespace {

// e^x, Cephes-style: x = n ln2 + r, |r| <= ln2 / 2, degree-5 polynomial for e^r; inputs clamped
// to [-88.38, 88.38] (the results stay finite).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)),
                    _mm256_set1_ps(88.3762626647949f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                                    _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

inline float exp1(float x) {
  alignas(32) float b[8] = {x};
  _mm256_store_ps(b, exp8(_mm256_load_ps(b)));
  return b[0];
}

// act(g): gelu_tanh(g) = g * sigmoid(2 z), z = sqrt(2/pi) (g + 0.044715 g^3); silu(g) = g * sigmoid(g)
inline __m256 act8(__m256 g, int64_t act) {
  __m256 t = g;
  if (act == kGeluTanh) {
    const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
    t = _mm256_mul_ps(_mm256_set1_ps(2.0f * 0.7978845608028654f),
                      _mm256_fmadd_ps(g3, _mm256_set1_ps(0.044715f), g));
  }
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), t));
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

inline float inv_rms(const float* x, int64_t D, float eps) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    s0 = _mm256_fmadd_ps(a, a, s0);
    s1 = _mm256_fmadd_ps(b, b, s1);
  }
  for (; i + 8 <= D; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i);
    s0 = _mm256_fmadd_ps(a, a, s0);
  }
  float ss = blocking::hsum1(_mm256_add_ps(s0, s1));
  for (; i < D; ++i) ss += x[i] * x[i];
  return 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
}

// out = (x * r) * w'
inline void scale_row(const float* x, int64_t D, float r, const float* w, bool offset, float* out) {
  const __m256 rv = _mm256_set1_ps(r), one = _mm256_set1_ps(offset ? 1.0f : 0.0f);
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 wv = _mm256_add_ps(_mm256_loadu_ps(w + i), one);
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), wv));
  }
  for (; i < D; ++i) out[i] = (x[i] * r) * (offset ? 1.0f + w[i] : w[i]);
}

}  // namespace

void rms_norm_row(const float* x, int64_t D, const float* w, bool offset, float eps, float* out) {
  scale_row(x, D, inv_rms(x, D, eps), w, offset, out);
}

void add_rms_norm_row(const float* x, const float* a, int64_t D, const float* w1, const float* w2,
                      bool offset, float eps, float* h, float* n) {
  int64_t i = 0;
  if (!w1) {  // plain residual add
    for (; i + 8 <= D; i += 8)
      _mm256_storeu_ps(h + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(a + i)));
    for (; i < D; ++i) h[i] = x[i] + a[i];
    if (n) rms_norm_row(h, D, w2, offset, eps, n);
    return;
  }
  const float r = inv_rms(a, D, eps);
  const __m256 rv = _mm256_set1_ps(r), one = _mm256_set1_ps(offset ? 1.0f : 0.0f);
  for (; i + 8 <= D; i += 8) {
    const __m256 wv = _mm256_add_ps(_mm256_loadu_ps(w1 + i), one);
    const __m256 na = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(a + i), rv), wv);
    _mm256_storeu_ps(h + i, _mm256_add_ps(_mm256_loadu_ps(x + i), na));
  }
  for (; i < D; ++i) h[i] = x[i] + (a[i] * r) * (offset ? 1.0f + w1[i] : w1[i]);
  if (n) rms_norm_row(h, D, w2, offset, eps, n);
}

void norm_rope_vec(const float* x, int64_t D, const float* w, bool offset, float eps,
                   const float* cos, const float* sin, float* out) {
  float buf[1024];
  float* xn = D <= 1024 ? buf : out;  // D > 1024 never occurs in practice; out is then the buffer
  if (w) {
    rms_norm_row(x, D, w, offset, eps, xn);
  } else {
    for (int64_t i = 0; i < D; ++i) xn[i] = x[i];
  }
  const int64_t h = D / 2;
  if (xn == out) {  // in place: rotate pairs through registers
    for (int64_t i = 0; i < h; ++i) {
      const float a = xn[i], b = xn[i + h];
      out[i] = a * cos[i] - b * sin[i];
      out[i + h] = b * cos[i + h] + a * sin[i + h];
    }
    return;
  }
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    const __m256 a = _mm256_loadu_ps(xn + i), b = _mm256_loadu_ps(xn + i + h);
    _mm256_storeu_ps(out + i, _mm256_fnmadd_ps(b, _mm256_loadu_ps(sin + i),
                                               _mm256_mul_ps(a, _mm256_loadu_ps(cos + i))));
    _mm256_storeu_ps(out + i + h, _mm256_fmadd_ps(a, _mm256_loadu_ps(sin + i + h),
                                                  _mm256_mul_ps(b, _mm256_loadu_ps(cos + i + h))));
  }
  for (; i < h; ++i) {
    const float a = xn[i], b = xn[i + h];
    out[i] = a * cos[i] - b * sin[i];
    out[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

void gated_act(const float* g, const float* u, int64_t n, int64_t act, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(act8(_mm256_loadu_ps(g + i), act),
                                            _mm256_loadu_ps(u + i)));
  if (i < n) {
    alignas(32) float gb[8] = {}, ub[8] = {}, ob[8];
    for (int64_t j = i; j < n; ++j) gb[j - i] = g[j], ub[j - i] = u[j];
    _mm256_store_ps(ob, _mm256_mul_ps(act8(_mm256_load_ps(gb), act), _mm256_load_ps(ub)));
    for (int64_t j = i; j < n; ++j) out[j] = ob[j - i];
  }
}

int64_t argmax(const float* x, int64_t n) {
  if (n <= 0) return 0;
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  __m256i bidx = _mm256_set1_epi32(0), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step = _mm256_set1_epi32(8);
  int64_t i = 0;
  if (n < (int64_t(1) << 31) - 8)
    for (; i + 8 <= n; i += 8, idx = _mm256_add_epi32(idx, step)) {
      const __m256 v = _mm256_loadu_ps(x + i);
      const __m256 gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);  // strictly greater: first index wins
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      best = _mm256_blendv_ps(best, v, gt);
      bidx = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(bidx), _mm256_castsi256_ps(idx), gt));
    }
  if (_mm256_movemask_ps(nan)) {
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(x[j])) return j;
  }
  alignas(32) float bv[8];
  alignas(32) int32_t bi[8];
  _mm256_store_ps(bv, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(bi), bidx);
  float m = bv[0];
  int64_t at = i ? bi[0] : -1;
  for (int j = 1; j < 8 && i; ++j)
    if (bv[j] > m || (bv[j] == m && bi[j] < at)) m = bv[j], at = bi[j];
  for (; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (at < 0 || x[i] > m) m = x[i], at = i;
  }
  return at;
}

void attend_partial(const float* q, int64_t q_stride, int64_t G, const float* k, int64_t k_stride,
                    const float* v, int64_t v_stride, int64_t L, int64_t D, float scale, float softcap,
                    float* scratch, float* mx, float* sum, float* acc) {
  // scores: each key row is read once for all G heads
  for (int64_t j = 0; j < L; ++j) {
    const float* kj = k + j * k_stride;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * q_stride;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d + 16 <= D; d += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(kj + d), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d + 8), _mm256_loadu_ps(kj + d + 8), a1);
      }
      float sc = blocking::hsum1(_mm256_add_ps(a0, a1));
      for (; d < D; ++d) sc += qg[d] * kj[d];
      sc *= scale;
      if (softcap > 0.0f) sc = std::tanh(sc / softcap) * softcap;
      scratch[g * L + j] = sc;
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // exp(score - max) in place, and their sum
    float* p = scratch + g * L;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < L; ++j) m = p[j] > m ? p[j] : m;
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sv = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= L; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
      _mm256_storeu_ps(p + j, e);
      sv = _mm256_add_ps(sv, e);
    }
    float total = blocking::hsum1(sv);
    for (; j < L; ++j) total += (p[j] = exp1(p[j] - m));
    mx[g] = m;
    sum[g] = total;
  }
  // acc[g] = sum_j p[g, j] v[j], in chunks of 32 floats of D kept in registers
  for (int64_t g = 0; g < G; ++g) {
    const float* p = scratch + g * L;
    float* og = acc + g * D;
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t j = 0; j < L; ++j) {
        const float* vj = v + j * v_stride + d;
        const __m256 pj = _mm256_broadcast_ss(p + j);
        a0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj), a0);
        a1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8), a1);
        a2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 16), a2);
        a3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 24), a3);
      }
      _mm256_storeu_ps(og + d, a0);
      _mm256_storeu_ps(og + d + 8, a1);
      _mm256_storeu_ps(og + d + 16, a2);
      _mm256_storeu_ps(og + d + 24, a3);
    }
    for (; d < D; ++d) {
      float a = 0.0f;
      for (int64_t j = 0; j < L; ++j) a += p[j] * v[j * v_stride + d];
      og[d] = a;
    }
  }
}

void attend_merge(int64_t parts, int64_t G, int64_t D, const float* mx, const float* sum,
                  const float* acc, float* out, int64_t out_stride) {
  for (int64_t g = 0; g < G; ++g) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < parts; ++c) m = mx[c * G + g] > m ? mx[c * G + g] : m;
    float total = 0.0f;
    float w[64];
    for (int64_t c = 0; c < parts; ++c) total += sum[c * G + g] * (w[c] = std::exp(mx[c * G + g] - m));
    const float inv = 1.0f / total;
    float* og = out + g * out_stride;
    for (int64_t d = 0; d < D; ++d) {
      float a = 0.0f;
      for (int64_t c = 0; c < parts; ++c) a += w[c] * acc[(c * G + g) * D + d];
      og[d] = a * inv;
    }
  }
}

}  // namespace fused
}  // namespace leanfm_kernels

#pragma GCC pop_options
