// The int8 rounding of activations per 32-element block, shared by qgemm and igemm (and matched
// by pagoda.kernels.qgemm.quantize_blocks_torch): llama.cpp's Q8_0 rule.
//
//     d = max|x| / 127,  q[j] = round_half_even(x[j] * ((1 / max|x|) * 127))
//
// (1 / max) * 127 rather than 127 / max: the torch twin computes it this way, and the two must
// give the same integers. A NaN or infinity in the block makes d NaN and every q 0, so the
// block's products are NaN (as fp32's would be) and no NaN is cast to an integer (UB).
//
// round_block is the rule one value at a time (any layout); round_row applies it to a whole row
// in natural order with AVX2 where the flavour has it: the same integers and scales bit for bit
// (max is exact in any order, the multiply is the same IEEE product, and vcvtps2dq rounds half
// to even under the default rounding mode, as nearbyint does). group_sum fixes one summation
// order that both the vector and the portable code run, so every flavour's sums agree.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace pagoda_q8 {

constexpr int kBlock = 32;

// 1 / max * 127 for a finite, positive max; 0 otherwise (all-zero or non-finite blocks).
inline float inverse_of(float mx) {
  return std::isfinite(mx) && mx > 0.f ? (1.f / mx) * 127.f : 0.f;
}

inline float scale_of(float mx) {
  return std::isfinite(mx) ? mx / 127.f : std::numeric_limits<float>::quiet_NaN();
}

// Block xb's scale d; its 32 integers go to out[at(j)] (the caller's layout).
template <typename At>
inline float round_block(const float* xb, int8_t* out, At at) {
  float mx = 0.f;
  for (int j = 0; j < kBlock; ++j) {
    const float v = std::fabs(xb[j]);
    mx = (v > mx || v != v) ? v : mx;  // a NaN sticks (std::max would skip it)
  }
  const float inv = inverse_of(mx);
  for (int j = 0; j < kBlock; ++j)
    out[at(j)] = inv == 0.f ? 0 : static_cast<int8_t>(std::nearbyint(xb[j] * inv));
  return scale_of(mx);
}

// The sum of g values (g a multiple of 8) in one fixed order: eight running lane sums
// s[j] += x[8i + j] for i = 0, 1, ..., then ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7)),
// the order of an AVX2 register's horizontal sum. Not sequential: a sequential sum is one
// dependent add per value, which made the rounding pass cost as much as a tenth of a decode step.
inline float group_sum(const float* x, int64_t g) {
#if defined(__AVX2__)
  __m256 s = _mm256_loadu_ps(x);
  for (int64_t i = 8; i < g; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + i));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
#else
  float s[8];
  for (int j = 0; j < 8; ++j) s[j] = x[j];
  for (int64_t i = 8; i < g; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += x[i + j];
  return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
#endif
}

// Row x of k values (k a multiple of 32): k integers to q in natural order, k / 32 scales to d.
inline void round_row(const float* x, int64_t k, int8_t* q, float* d) {
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    int8_t* qb = q + b * kBlock;
#if defined(__AVX2__)
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v[4], mx = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xb + 8 * j);
      mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v[j], v[j], _CMP_UNORD_Q));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float m = _mm256_movemask_ps(unordered) ? std::numeric_limits<float>::quiet_NaN()
                                                  : _mm_cvtss_f32(m4);
    const float scalar_inv = inverse_of(m);
    d[b] = scale_of(m);
    if (scalar_inv == 0.f) {  // all zero, or not finite (where x * 0 would be NaN, not 0)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), _mm256_setzero_si256());
      continue;
    }
    const __m256 inv = _mm256_set1_ps(scalar_inv);
    __m256i i[4];
    for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
    // packs interleave the 128-bit halves: dword order 0,4,1,5,2,6,3,7 restores 0..7
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]),
                                             _mm256_packs_epi32(i[2], i[3]));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb),
                        _mm256_permutevar8x32_epi32(bytes, order));
#else
    d[b] = round_block(xb, qb, [](int j) { return j; });
#endif
  }
}

// The rounded rows of one igemm call: q (M, K) int8 (and, for 8-bit weights, the same integers
// widened to int16: AVX2 multiplies signed pairs only as int16), d (M, K/32), xs (M, K/g) the
// group sums when the weights have offsets.
struct RoundedRows {
  std::vector<int8_t> q;
  std::vector<int16_t> q16;
  std::vector<float> d, xs;
  int64_t k = 0, nb = 0, groups = 0;
  const int8_t* row(int64_t r) const { return q.data() + r * k; }
  const int16_t* row16(int64_t r) const { return q16.data() + r * k; }
};

inline void round_rows(const float* x, int64_t m, int64_t k, int64_t g, bool sums, bool wide,
                       RoundedRows& a) {
  a.k = k;
  a.nb = k / kBlock;
  a.groups = k / g;
  a.q.resize(m * k);
  a.d.resize(m * a.nb);
  if (wide) a.q16.resize(m * k);
  if (sums) a.xs.resize(m * a.groups);
  at::parallel_for(0, m, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * k;
      round_row(xr, k, a.q.data() + r * k, a.d.data() + r * a.nb);
      for (int64_t j = 0; wide && j < k; ++j) a.q16[r * k + j] = a.q[r * k + j];
      for (int64_t t = 0; sums && t < a.groups; ++t) a.xs[r * a.groups + t] = group_sum(xr + t * g, g);
    }
  });
}

}  // namespace pagoda_q8
