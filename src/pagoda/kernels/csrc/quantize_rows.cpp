// The activation quantizer of the fbgemm/oneDNN int8 paths (`--quant-kernel fbgemm|onednn`;
// `pagoda.quant.int8_ops` documents and tests it).
//
// quantize_rows: dynamic int8 quantization of a linear layer's input, one scale per row (token),
// with the LLM.int8()-style outlier columns split off -- in one pass instead of a dozen small
// torch ops. x (M, K) fp32. A column is an outlier when its largest |x| exceeds `outlier_ratio` times the
// median column's (the lower median, as torch.median); outlier_ratio <= 0 disables the split.
// Returns
//   q      (M, K) int8   round-half-even(x / scale) in [-127, 127], outlier columns set to 0
//   scale  (M, 1) fp32   max |x| over the row's non-outlier columns / 127 (tiny, never 0)
//   cols   (n,)   int64  the outlier columns, ascending
//   xcols  (M, n) fp32   x[:, cols], for the exact fp32 product of those columns
// so that x ~= q * scale + scatter(xcols, cols). With to_int8 false, q is instead the fp32
// x * keep / max|x| (rows normalised to max 1 for a per-tensor quantizing kernel such as
// fbgemm's) and scale is max|x|. The reference semantics live in
// `pagoda.quant.int8_ops.quantize_rows_torch`, and the tests compare the two.

// ATen headers only (not torch/extension.h): this file then compiles in seconds; the
// Python bindings live in bindings.cpp.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "alloc.h"

namespace {

// out[j] = round-half-even(clamp(row[j] * keep[j] * inv, -127, 127)).
inline void quantize_row(const float* __restrict row, const float* __restrict keep, float inv,
                         int8_t* __restrict out, int64_t k) {
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (; j + 16 <= k; j += 16) {
    __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(row + j), _mm512_loadu_ps(keep + j)),
                             vinv);
    v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
    // cvtps rounds with the default mode (to nearest, ties to even), like torch.round.
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
#endif
  for (; j < k; ++j) {
    const float v = std::min(127.f, std::max(-127.f, row[j] * keep[j] * inv));
    out[j] = static_cast<int8_t>(std::nearbyint(v));
  }
}

// Column maxima of |x|: a running maximum over rows, parallel over column blocks.
std::vector<float> column_abs_max(const float* x, int64_t m, int64_t k) {
  std::vector<float> col_max(k, 0.f);
  float* cm = col_max.data();
  const int64_t grain = std::max<int64_t>(64, (1 << 16) / std::max<int64_t>(m, 1));
  at::parallel_for(0, k, grain, [&](int64_t begin, int64_t end) {
    float* __restrict out = cm + begin;
    const int64_t width = end - begin;
    for (int64_t i = 0; i < m; ++i) {
      const float* __restrict row = x + i * k + begin;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const float a = std::fabs(row[j]), b = out[j];
        out[j] = a > b ? a : b;  // an unconditional store, so the loop vectorizes
      }
    }
  });
  return col_max;
}

}  // namespace

std::vector<at::Tensor> quantize_rows(at::Tensor x, double outlier_ratio, bool to_int8) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "quantize_rows: x must be a 2-D fp32 CPU tensor");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  const float* xp = x.data_ptr<float>();

  // keep[j] is 1 for ordinary columns and 0 for outliers; a multiplier keeps the loops branch-free.
  std::vector<float> keep(k, 1.f);
  std::vector<int64_t> cols;
  if (outlier_ratio > 0 && m > 0 && k > 0) {
    std::vector<float> col_max = column_abs_max(xp, m, k);
    std::vector<float> sorted(col_max);
    auto mid = sorted.begin() + (k - 1) / 2;
    std::nth_element(sorted.begin(), mid, sorted.end());
    const float threshold = static_cast<float>(outlier_ratio) * *mid;
    for (int64_t j = 0; j < k; ++j) {
      if (col_max[j] > threshold) {
        keep[j] = 0.f;
        cols.push_back(j);
      }
    }
  }
  const int64_t n = static_cast<int64_t>(cols.size());

  auto q = pagoda_alloc::empty({m, k}, to_int8 ? x.options().dtype(at::kChar) : x.options());
  auto scale = pagoda_alloc::empty({m, 1}, x.options());
  auto xcols = pagoda_alloc::empty({m, n}, x.options());
  int8_t* qp = to_int8 ? q.data_ptr<int8_t>() : nullptr;
  float* fp = to_int8 ? nullptr : q.data_ptr<float>();
  float* sp = scale.data_ptr<float>();
  float* cp = xcols.data_ptr<float>();
  const float* kp = keep.data();

  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    // Local restrict copies: stores through int8_t (a char type) may alias anything, and would
    // otherwise force every captured pointer to be reloaded per element (no vectorization).
    const float* __restrict keep_p = kp;
    for (int64_t i = begin; i < end; ++i) {
      const float* __restrict row = xp + i * k;
      float row_max = 0.f;
#pragma omp simd reduction(max : row_max)
      for (int64_t j = 0; j < k; ++j) row_max = std::max(row_max, std::fabs(row[j]) * keep_p[j]);
      row_max = std::max(row_max, 1e-30f);
      if (to_int8) {
        sp[i] = row_max / 127.f;
        // (1 / max) * 127, not 127 / max: torch evaluates `127.0 / t` as t.reciprocal() * 127,
        // and the twin must round identically.
        quantize_row(row, keep_p, (1.f / row_max) * 127.f, qp + i * k, k);
      } else {
        sp[i] = row_max;
        const float inv = 1.f / row_max;
        float* __restrict out = fp + i * k;
#pragma omp simd
        for (int64_t j = 0; j < k; ++j) out[j] = row[j] * keep_p[j] * inv;
      }
      for (int64_t c = 0; c < n; ++c) cp[i * n + c] = row[cols[c]];
    }
  });
  auto cols_t = pagoda_alloc::copy_of(cols.data(), {n}, at::kLong);
  return {q, scale, cols_t, xcols};
}
