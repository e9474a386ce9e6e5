// Decode attention straight over the paged KV cache, on the CPU, in fp32.
//
// One task per request: it walks the request's block table and reads every K and V row of its
// context exactly once, for all query heads together (grouped-query attention without copying
// K/V). The gather + SDPA path instead copies each request's blocks
// into a padded buffer per layer, reading K/V three times. Tasks run on ATen's own thread pool
// (at::parallel_for), so they never compete with another runtime's threads for the cores.
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

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float p, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += p * x[i];
}

}  // namespace

at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                           at::Tensor block_tables, at::Tensor context_lens, double scale,
                           int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode: bad shapes");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat, "paged_decode: fp32 only");
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
  const int64_t max_blocks = block_tables.size(1);
  TORCH_CHECK(num_heads % num_kv == 0 && k_cache.size(3) == head_dim,
              "paged_decode: heads do not match the cache");
  const int64_t group = num_heads / num_kv;
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t row = num_kv * head_dim;  // floats between consecutive tokens of one block

  // One task per request: each token's K (then V) row, all KV heads, is one contiguous read.
  at::parallel_for(0, num_decode, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(num_heads * head_dim);
    for (int64_t d = begin; d < end; ++d) {
      const int64_t length = lens[d];
      const int64_t start = window > 0 ? std::max<int64_t>(0, length - window) : 0;
      const int64_t n = length - start;
      const float* qd = qp + d * num_heads * head_dim;
      const int64_t* table = tables + d * max_blocks;
      scores.resize(num_heads * n);
      for (int64_t t = start; t < length; ++t) {
        const float* k = kp + (table[t / block_size] * block_size + t % block_size) * row;
        for (int64_t h = 0; h < num_heads; ++h)
          scores[h * n + (t - start)] =
              dot(qd + h * head_dim, k + (h / group) * head_dim, head_dim) * fscale;
      }
      for (int64_t h = 0; h < num_heads; ++h) {
        float* s = scores.data() + h * n;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < n; ++t) {
          s[t] = std::exp(s[t] - m);
          total += s[t];
        }
        const float inv = 1.f / total;
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) s[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = start; t < length; ++t) {
        const float* v = vp + (table[t / block_size] * block_size + t % block_size) * row;
        for (int64_t h = 0; h < num_heads; ++h)
          axpy(scores[h * n + (t - start)], v + (h / group) * head_dim,
               acc.data() + h * head_dim, head_dim);
      }
      std::copy(acc.begin(), acc.end(), op + d * num_heads * head_dim);
    }
  });
  return out;
}
