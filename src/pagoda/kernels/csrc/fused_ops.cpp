// The elementwise steps of a decoder layer, fused: RMSNorm (with the residual add before it),
// RoPE with the K/V cache write, and SiLU(gate) * up. On the CPU a batch-1 decode step of a
// small model is dominated by per-op dispatch rather than arithmetic: the torch expressions
// these replace cost ~25 ops per layer at ~3 us each, as much time as streaming 4-bit weights.
//
// INVARIANT (batch invariance): every output row is computed from its own input row only, by
// the same operations in the same order whatever the number of rows, and the order does not
// depend on the ISA flavour either (lane-wise partial sums combined in a fixed order). The
// file is compiled with -ffp-contract=off semantics for its arithmetic (see the pragma): a
// multiply-add is two roundings, as in torch's separate ops, so RoPE here equals
// `q * cos + roll(q, half) * sin_signed` bit for bit. RMSNorm's sum of squares and SiLU's exp
// differ from torch's in the last bits (torch's reduction order and exp are its own); the
// engine uses these kernels only for models whose linears are quantized, where fp32
// bit-identity to transformers is not the contract (fp32 models keep torch's ops).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "alloc.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

// no-trapping-math: lets the compiler turn exp's clamp into vector min/max (no FP traps are
// enabled in this process, so nothing observable changes)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kRowGrain = 8;  // rows per task: a decode batch of a few rows runs inline

// Sum of x[i]^2 in a fixed order: 16 lane sums (vectorised by the compiler, one lane per
// element modulo 16), the tail into lanes 0.., then the lanes pairwise.
float sum_squares(const float* x, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += x[i + j] * x[i + j];
  }
  for (int64_t j = 0; i < n; ++i, ++j) acc[j] += x[i] * x[i];
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t j = 0; j < width; ++j) acc[j] += acc[j + width];
  return acc[0];
}

// exp(x) by range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial (Cephes' expf
// coefficients): within 2 ulp of expf over the clamped range, and vectorisable (no calls).
inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);  // a NaN stays NaN
  // round to nearest (even) by the 1.5 * 2^23 trick: |x * log2(e)| < 128 here
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;  // p * 2^n: n is within the exponent's range here
  std::memcpy(&p, &bits, sizeof(bits));
  return p;
}

// silu(g) * u for n values: g / (1 + fast_exp(-g)) * u. With AVX2, eight lanes run fast_exp's
// operations one for one (the same roundings: the flavours agree bit for bit), the clamp as
// max/min with the argument second, so a NaN passes through as the conditional lets it. Not left
// to the vectoriser: GCC specialised the whole expression per clamp value and computed
// g / (1 + e^88.7) for every lane, a subnormal quotient whose assists made the loop 3.4x slower.
void silu_row(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__)
  const auto c = [](float v) { return _mm256_set1_ps(v); };
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    __m256 x = _mm256_xor_ps(gv, c(-0.f));  // -g, as the scalar negation (signed zeros too)
    x = _mm256_min_ps(c(88.7f), _mm256_max_ps(c(-87.3f), x));
    const __m256 n_ = _mm256_sub_ps(
        _mm256_add_ps(_mm256_mul_ps(x, c(1.44269504088896341f)), c(12582912.0f)), c(12582912.0f));
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n_, c(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n_, c(-2.12194440e-4f)));
    __m256 p = c(1.9875691500e-4f);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), c(1.3981999507e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), c(8.3334519073e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), c(4.1665795894e-2f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), c(1.6666665459e-1f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), c(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(p, r), r), r), c(1.0f));
    const __m256i bits = _mm256_add_epi32(_mm256_castps_si256(p),
                                          _mm256_slli_epi32(_mm256_cvttps_epi32(n_), 23));
    const __m256 e = _mm256_castsi256_ps(bits);
    const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(c(1.0f), e));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) o[i] = g[i] / (1.0f + fast_exp(-g[i])) * u[i];
}

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              name, ": x must be a contiguous (T, H) fp32 tensor");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == at::kFloat, name, ": weight must be (H,) fp32");
}

// out = weight' * (x * rsqrt(mean(x^2) + eps)), weight' = offset + weight (Gemma's 1 + w).
void norm_row(const float* x, const float* w, float* out, int64_t h, float eps, float offset) {
  const float variance = sum_squares(x, h) / static_cast<float>(h);
  const float inv = 1.0f / std::sqrt(variance + eps);
  for (int64_t i = 0; i < h; ++i) out[i] = (offset + w[i]) * (x[i] * inv);
}

}  // namespace

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps, double offset) {
  check_rows(x, weight, "rms_norm");
  auto out = pagoda_alloc::empty_like(x);
  const int64_t h = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      norm_row(xp + t * h, wp, op + t * h, h, static_cast<float>(eps), static_cast<float>(offset));
  });
  return out;
}

// (x + delta, rms_norm(x + delta)): the residual add of a layer and the norm after it.
std::vector<at::Tensor> add_rms_norm(at::Tensor x, at::Tensor delta, at::Tensor weight,
                                     double eps, double offset) {
  check_rows(x, weight, "add_rms_norm");
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.is_contiguous() &&
                  delta.scalar_type() == at::kFloat, "add_rms_norm: delta must match x");
  auto sum = pagoda_alloc::empty_like(x);
  auto out = pagoda_alloc::empty_like(x);
  const int64_t h = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < h; ++i) sp[t * h + i] = xp[t * h + i] + dp[t * h + i];
      norm_row(sp + t * h, wp, op + t * h, h, static_cast<float>(eps), static_cast<float>(offset));
    }
  });
  return {sum, out};
}

// qkv (T, (H + 2 KVH) * hd), contiguous: q and k rotated in place at their positions, then each
// token's k and v copied to its slot of the caches (S, KVH, hd), slot-major fp32, fp16 or bf16.
void rope_write(at::Tensor qkv, at::Tensor positions, at::Tensor cos, at::Tensor sin_signed,
                int64_t num_heads, int64_t num_kv_heads, at::Tensor k_cache, at::Tensor v_cache,
                at::Tensor slots) {
  const int64_t hd = cos.size(1), half = hd / 2, t_count = qkv.size(0);
  const int64_t width = (num_heads + 2 * num_kv_heads) * hd, kv = num_kv_heads * hd;
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == width && qkv.is_contiguous() &&
                  qkv.scalar_type() == at::kFloat, "rope_write: qkv must be contiguous fp32");
  TORCH_CHECK(cos.is_contiguous() && sin_signed.sizes() == cos.sizes() &&
                  sin_signed.is_contiguous() && cos.scalar_type() == at::kFloat &&
                  hd % 2 == 0, "rope_write: bad cos/sin tables");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
                  positions.numel() == t_count && slots.numel() == t_count &&
                  positions.is_contiguous() && slots.is_contiguous(),
              "rope_write: positions and slots must be (T,) int64");
  const auto kv_type = k_cache.scalar_type();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.scalar_type() == kv_type && v_cache.sizes() == k_cache.sizes() &&
                  (kv_type == at::kFloat || kv_type == at::kHalf || kv_type == at::kBFloat16) &&
                  k_cache.numel() % kv == 0,
              "rope_write: caches must be contiguous fp32, fp16 or bf16");
  const int64_t num_slots = k_cache.numel() / kv, max_pos = cos.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < t_count; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "rope_write: position out of range");
    TORCH_CHECK(sl[t] >= 0 && sl[t] < num_slots, "rope_write: slot out of range");
  }
  float* base = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* snp = sin_signed.data_ptr<float>();
  // k and v rows into the cache, rounded to its dtype as torch's `.to()` rounds (to nearest even)
  void* const kc = k_cache.data_ptr();
  void* const vc = v_cache.data_ptr();
  const auto store = [&](const float* row, int64_t slot) {
    if (kv_type == at::kFloat) {
      std::memcpy(static_cast<float*>(kc) + slot * kv, row, kv * sizeof(float));
      std::memcpy(static_cast<float*>(vc) + slot * kv, row + kv, kv * sizeof(float));
    } else if (kv_type == at::kHalf) {
      std::copy(row, row + kv, static_cast<at::Half*>(kc) + slot * kv);
      std::copy(row + kv, row + 2 * kv, static_cast<at::Half*>(vc) + slot * kv);
    } else {
      std::copy(row, row + kv, static_cast<at::BFloat16*>(kc) + slot * kv);
      std::copy(row + kv, row + 2 * kv, static_cast<at::BFloat16*>(vc) + slot * kv);
    }
  };
  at::parallel_for(0, t_count, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> head(hd);
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + pos[t] * hd;
      const float* s = snp + pos[t] * hd;
      float* row = base + t * width;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {  // q heads, then k heads
        float* x = row + h * hd;
        std::memcpy(head.data(), x, hd * sizeof(float));
        // roll(x, half)[i] = x[(i + half) % hd]
        for (int64_t i = 0; i < half; ++i) x[i] = head[i] * c[i] + head[i + half] * s[i];
        for (int64_t i = half; i < hd; ++i) x[i] = head[i] * c[i] + head[i - half] * s[i];
      }
      store(row + num_heads * hd, sl[t]);
    }
  });
}

// gate_up (T, 2I) = [gate | up] -> (T, I): silu(gate) * up, silu(g) = g / (1 + exp(-g)).
at::Tensor silu_mul(at::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.is_contiguous() &&
                  gate_up.scalar_type() == at::kFloat, "silu_mul: (T, 2I) contiguous fp32");
  const int64_t inner = gate_up.size(1) / 2;
  auto out = pagoda_alloc::empty({gate_up.size(0), inner}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, gate_up.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = gp + t * 2 * inner;
      const float* u = g + inner;
      float* o = op + t * inner;
      silu_row(g, u, o, inner);
    }
  });
  return out;
}
