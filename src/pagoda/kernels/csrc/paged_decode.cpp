// Decode attention straight over the paged KV cache, on the CPU, in fp32.
//
// One task per (request, KV head): it walks the request's block table and reads the K and V rows
// of its KV head for the query heads of its group (grouped-query attention without copying K/V).
// The gather + SDPA path instead copies each request's blocks into a padded buffer per layer,
// reading K/V three times. Tasks run on ATen's own thread pool (at::parallel_for), so they never
// compete with another runtime's threads for the cores.
//
// Per query head, three passes over the context: scores q.k (eight tokens at a time on AVX2, so
// one horizontal reduction serves eight dot products), the softmax (a vectorised exp), then the
// weighted sum of V with the output row held in registers. Each task's arithmetic depends only
// on its own request, never on the batch around it (batch invariance).
//
// The cache may hold fp32, fp16 or bf16 (read and widened to fp32 in registers: half the bytes
// of fp32, which is what a decode step with long contexts is bound by); q, the scores and the
// sums are fp32.
//
// Shapes: q, out (D, H, hd); k_cache, v_cache (num_blocks, block_size, KVH, hd);
// block_tables (D, max_blocks) int64; context_lens (D,) int64 (the new token included).
// A positive `window` limits each query to its last `window` keys (sliding-window layers).

// ATen headers only (not torch/extension.h): this file then compiles in seconds; the
// Python bindings live in bindings.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PAGED_DECODE_AVX2 1
#endif

namespace {

#if PAGED_DECODE_AVX2

// Eight cache elements widened to fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// e^x for x <= 0 (softmax arguments), ~1 ulp: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, and
// p the degree-7 Taylor polynomial (its remainder, under 6e-9 relative, is far below fp32's
// half-ulp of 6e-8).
// Arguments below -87 give 0, as their e^x is below the smallest normal float.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lower = _mm256_set1_ps(-87.f);
  const __m256 below = _mm256_cmp_ps(x, lower, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lower);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 split in two so n * ln2_hi is exact and r keeps its low bits
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(below, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[j] = q . k[j] for eight rows: eight accumulators, one transposing reduction.
template <typename T>
inline void dot8(const float* q, const T* const* k, int64_t hd, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t i = 0; i < hd; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(qv, load8(k[0] + i), a0);
    a1 = _mm256_fmadd_ps(qv, load8(k[1] + i), a1);
    a2 = _mm256_fmadd_ps(qv, load8(k[2] + i), a2);
    a3 = _mm256_fmadd_ps(qv, load8(k[3] + i), a3);
    a4 = _mm256_fmadd_ps(qv, load8(k[4] + i), a4);
    a5 = _mm256_fmadd_ps(qv, load8(k[5] + i), a5);
    a6 = _mm256_fmadd_ps(qv, load8(k[6] + i), a6);
    a7 = _mm256_fmadd_ps(qv, load8(k[7] + i), a7);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                      _mm256_permute2f128_ps(u0, u1, 0x31)));
}

template <typename T>
inline float dot1(const float* q, const T* k, int64_t hd) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t i = 0; i < hd; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a);
  return hsum(a);
}

template <typename T>
void scores_of(const float* q, const T* const* rows, int64_t n, int64_t hd, float scale,
               float* s) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) dot8(q, rows + t, hd, s + t);
  for (; t < n; ++t) s[t] = dot1(q, rows[t], hd);
  const __m256 sc = _mm256_set1_ps(scale);
  for (t = 0; t + 8 <= n; t += 8) _mm256_storeu_ps(s + t, _mm256_mul_ps(_mm256_loadu_ps(s + t), sc));
  for (; t < n; ++t) s[t] *= scale;
}

// s <- e^(s - max); returns the sum.
float exp_shifted(float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
  const __m256 mv = _mm256_set1_ps(m);
  __m256 total = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
    _mm256_storeu_ps(s + t, e);
    total = _mm256_add_ps(total, e);
  }
  float rest = 0.f;
  for (; t < n; ++t) {
    __m256 e = exp_nonpositive(_mm256_set1_ps(s[t] - m));
    s[t] = _mm256_cvtss_f32(e);
    rest += s[t];
  }
  return hsum(total) + rest;
}

// out = (sum_t p[t] v[t]) * inv, 64 columns at a time held in eight registers.
template <typename T>
void weighted_sum(const float* p, const T* const* rows, int64_t n, int64_t hd, float inv,
                  float* out) {
  for (int64_t c = 0; c < hd; c += 64) {
    const int64_t width = std::min<int64_t>(64, hd - c);
    __m256 acc[8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    if (width == 64) {
      for (int64_t t = 0; t < n; ++t) {
        const __m256 pt = _mm256_set1_ps(p[t]);
        const T* v = rows[t] + c;
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(pt, load8(v + 8 * j), acc[j]);
      }
    } else {
      for (int64_t t = 0; t < n; ++t) {
        const __m256 pt = _mm256_set1_ps(p[t]);
        const T* v = rows[t] + c;
        for (int64_t j = 0; j < width / 8; ++j) acc[j] = _mm256_fmadd_ps(pt, load8(v + 8 * j), acc[j]);
      }
    }
    const __m256 iv = _mm256_set1_ps(inv);
    for (int64_t j = 0; j < width / 8; ++j)
      _mm256_storeu_ps(out + c + 8 * j, _mm256_mul_ps(acc[j], iv));
  }
}

#endif  // PAGED_DECODE_AVX2

// The portable passes (any head_dim; the generic flavour, and head_dims not a multiple of 8).
template <typename T>
void scores_of_plain(const float* __restrict q, const T* const* rows, int64_t n, int64_t hd,
                     float scale, float* __restrict s) {
  for (int64_t t = 0; t < n; ++t) {
    const T* __restrict k = rows[t];
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < hd; ++i) acc += q[i] * static_cast<float>(k[i]);
    s[t] = acc * scale;
  }
}

float exp_shifted_plain(float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
  float total = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    s[t] = std::exp(s[t] - m);
    total += s[t];
  }
  return total;
}

template <typename T>
void weighted_sum_plain(const float* __restrict p, const T* const* rows, int64_t n, int64_t hd,
                        float inv, float* __restrict out) {
  std::fill(out, out + hd, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const float pt = p[t];
    const T* __restrict v = rows[t];
#pragma omp simd
    for (int64_t i = 0; i < hd; ++i) out[i] += pt * static_cast<float>(v[i]);
  }
  for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
}

// One query head over its n context rows (K rows `keys`, V rows `values`).
template <typename T>
void attend(const float* q, const T* const* keys, const T* const* values, int64_t n,
            int64_t hd, float scale, float* s, float* out) {
#if PAGED_DECODE_AVX2
  if (hd % 8 == 0) {
    scores_of(q, keys, n, hd, scale, s);
    weighted_sum(s, values, n, hd, 1.f / exp_shifted(s, n), out);
    return;
  }
#endif
  scores_of_plain(q, keys, n, hd, scale, s);
  weighted_sum_plain(s, values, n, hd, 1.f / exp_shifted_plain(s, n), out);
}

template <typename T>
void run(const float* qp, const T* kp, const T* vp, const int64_t* tables, const int64_t* lens,
         float* op, int64_t num_decode, int64_t num_heads, int64_t head_dim, int64_t block_size,
         int64_t num_kv, int64_t max_blocks, float scale, int64_t window) {
  const int64_t group = num_heads / num_kv;
  const int64_t row = num_kv * head_dim;  // elements between consecutive tokens of one block
  // One task per (request, KV head): a batch-1 step with a long context still uses every thread.
  at::parallel_for(0, num_decode * num_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<const T*> keys, values;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t d = task / num_kv, g = task % num_kv;
      const int64_t length = lens[d];
      const int64_t start = window > 0 ? std::max<int64_t>(0, length - window) : 0;
      const int64_t n = length - start;
      const int64_t* table = tables + d * max_blocks;
      keys.resize(n);
      values.resize(n);
      scores.resize(n);
      for (int64_t t = start; t < length; ++t) {
        const int64_t offset = (table[t / block_size] * block_size + t % block_size) * row +
                               g * head_dim;
        keys[t - start] = kp + offset;
        values[t - start] = vp + offset;
      }
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const int64_t at = (d * num_heads + h) * head_dim;
        attend(qp + at, keys.data(), values.data(), n, head_dim, scale, scores.data(), op + at);
      }
    }
  });
}

}  // namespace

at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                        at::Tensor block_tables, at::Tensor context_lens, double scale,
                        int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode: bad shapes");
  const auto kv_type = k_cache.scalar_type();
  TORCH_CHECK(q.scalar_type() == at::kFloat && v_cache.scalar_type() == kv_type &&
                  (kv_type == at::kFloat || kv_type == at::kHalf || kv_type == at::kBFloat16),
              "paged_decode: fp32 queries over an fp32, fp16 or bf16 cache");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "paged_decode: int64 tables and lengths");
  q = q.contiguous();
  k_cache = k_cache.contiguous();
  v_cache = v_cache.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  auto out = at::empty_like(q);

  const int64_t num_decode = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv = k_cache.size(2);
  TORCH_CHECK(num_heads % num_kv == 0 && k_cache.size(3) == head_dim,
              "paged_decode: heads do not match the cache");
  const float* qp = q.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const auto go = [&](auto* kp, auto* vp) {
    run(qp, kp, vp, tables, lens, op, num_decode, num_heads, head_dim, block_size, num_kv,
        block_tables.size(1), static_cast<float>(scale), window);
  };
  if (kv_type == at::kFloat)
    go(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  else if (kv_type == at::kHalf)
    go(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>());
  else
    go(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
  return out;
}
