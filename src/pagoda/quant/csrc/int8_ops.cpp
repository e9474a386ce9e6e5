// CPU helpers for int8 linears (`pagoda.quant.int8_ops` documents and tests them).
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
//
// int8_gemv: y = x @ (w * scale[:, None]).T for a few rows of fp32 x and int8 w, in fp32 --
// weight-only int8 for decode, where a GEMM library's fixed cost per call exceeds the time
// it takes to stream the weight once.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

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

std::vector<torch::Tensor> quantize_rows(torch::Tensor x, double outlier_ratio, bool to_int8) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
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

  auto q = torch::empty({m, k}, to_int8 ? x.options().dtype(torch::kChar) : x.options());
  auto scale = torch::empty({m, 1}, x.options());
  auto xcols = torch::empty({m, n}, x.options());
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
  auto cols_t = torch::from_blob(cols.data(), {n}, torch::kLong).clone();
  return {q, scale, cols_t, xcols};
}

namespace {

constexpr int64_t kMaxGemvRows = 4;

// Dot products of one int8 weight row with R fp32 rows of x (R <= kMaxGemvRows).
template <int R>
inline void dot_rows(const int8_t* __restrict w, const float* __restrict x, int64_t k,
                     float* __restrict out) {
  int64_t j = 0;
  float acc[R] = {};
#ifdef __AVX512F__
  __m512 va[R][2];
  for (int r = 0; r < R; ++r) va[r][0] = va[r][1] = _mm512_setzero_ps();
  for (; j + 32 <= k; j += 32) {  // two accumulators per row hide the FMA latency
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j))));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j + 16))));
    for (int r = 0; r < R; ++r) {
      va[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * k + j), va[r][0]);
      va[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + r * k + j + 16), va[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) acc[r] = _mm512_reduce_add_ps(_mm512_add_ps(va[r][0], va[r][1]));
#endif
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t t = j; t < k; ++t) s += x[r * k + t] * static_cast<float>(w[t]);
    out[r] = acc[r] + s;
  }
}

template <int R>
void gemv_rows(const float* x, const int8_t* w, const float* scale, float* y, int64_t n,
               int64_t k) {
  at::parallel_for(0, n, 32, [&](int64_t begin, int64_t end) {
    float dots[R];
    for (int64_t i = begin; i < end; ++i) {
      dot_rows<R>(w + i * k, x, k, dots);
      for (int r = 0; r < R; ++r) y[r * n + i] = dots[r] * scale[i];
    }
  });
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define PAGODA_VNNI 1
// The VNNI form: each row of x is quantized to int8 with its own scale and shifted by 128 into
// uint8, because vpdpbusd multiplies unsigned by signed bytes (summing 4 products per int32 lane,
// no saturation). The shift adds 128 * sum(w[i, :]), which `row_sums` takes back out.
template <int R, int NB>
inline void vnni_block(const uint8_t* xq, const float* xs, const int8_t* w, const float* scale,
                       const int32_t* row_sums, float* y, int64_t n, int64_t k, int64_t i0) {
  __m512i acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_si512();
  for (int64_t j = 0; j < k; j += 64) {
    // The masked tail loads zeros, which add nothing.
    const __mmask64 mask = k - j >= 64 ? ~__mmask64(0) : (__mmask64(1) << (k - j)) - 1;
    __m512i xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_epi8(mask, xq + r * k + j);
    for (int b = 0; b < NB; ++b) {
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, w + (i0 + b) * k + j);
      for (int r = 0; r < R; ++r) acc[b][r] = _mm512_dpbusd_epi32(acc[b][r], xv[r], wv);
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int64_t i = i0 + b;
    for (int r = 0; r < R; ++r) {
      const int32_t dot = _mm512_reduce_add_epi32(acc[b][r]) - 128 * row_sums[i];
      y[r * n + i] = static_cast<float>(dot) * xs[r] * scale[i];
    }
  }
}

template <int R>
void gemv_rows_vnni(const float* x, const int8_t* w, const float* scale, const int32_t* row_sums,
                    float* y, int64_t n, int64_t k) {
  std::vector<uint8_t> xq(R * k);
  float xs[R];
  for (int r = 0; r < R; ++r) {
    const float* row = x + r * k;
    float mx = 1e-30f;
    for (int64_t j = 0; j < k; ++j) mx = std::max(mx, std::fabs(row[j]));
    const float inv = (1.f / mx) * 127.f;
    xs[r] = mx / 127.f;
    for (int64_t j = 0; j < k; ++j)
      xq[r * k + j] = static_cast<uint8_t>(std::nearbyint(row[j] * inv) + 128.f);
  }
  const uint8_t* xqp = xq.data();
  constexpr int NB = R <= 2 ? 4 : 2;  // output rows per pass: independent dpbusd chains
  at::parallel_for(0, n, 32, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + NB <= end; i += NB) vnni_block<R, NB>(xqp, xs, w, scale, row_sums, y, n, k, i);
    for (; i < end; ++i) vnni_block<R, 1>(xqp, xs, w, scale, row_sums, y, n, k, i);
  });
}
#endif

}  // namespace

// x (M <= 4, K) fp32, w (N, K) int8, scale (N,) fp32, row_sums (N,) int32 = w.sum(1).
// Returns (M, N) fp32. With AVX512-VNNI the activations are quantized per row (int8 x int8 in
// int32); without, they stay fp32 (int8 weights widened per element).
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale,
                        torch::Tensor row_sums) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
              "int8_gemv: x must be a 2-D fp32 CPU tensor");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kChar && w.size(1) == x.size(1),
              "int8_gemv: w must be (N, K) int8 with x's K");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.numel() == w.size(0),
              "int8_gemv: scale must be (N,) fp32");
  TORCH_CHECK(row_sums.scalar_type() == torch::kInt && row_sums.numel() == w.size(0),
              "int8_gemv: row_sums must be (N,) int32");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxGemvRows, "int8_gemv: 1 to 4 rows");
  x = x.contiguous();
  w = w.contiguous();
  scale = scale.contiguous();
  row_sums = row_sums.contiguous();
  const int64_t m = x.size(0), n = w.size(0), k = w.size(1);
  auto y = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#ifdef PAGODA_VNNI
  const int32_t* rp = row_sums.data_ptr<int32_t>();
  switch (m) {
    case 1: gemv_rows_vnni<1>(xp, wp, sp, rp, yp, n, k); break;
    case 2: gemv_rows_vnni<2>(xp, wp, sp, rp, yp, n, k); break;
    case 3: gemv_rows_vnni<3>(xp, wp, sp, rp, yp, n, k); break;
    default: gemv_rows_vnni<4>(xp, wp, sp, rp, yp, n, k); break;
  }
#else
  switch (m) {
    case 1: gemv_rows<1>(xp, wp, sp, yp, n, k); break;
    case 2: gemv_rows<2>(xp, wp, sp, yp, n, k); break;
    case 3: gemv_rows<3>(xp, wp, sp, yp, n, k); break;
    default: gemv_rows<4>(xp, wp, sp, yp, n, k); break;
  }
#endif
  return y;
}

bool has_vnni() {
#ifdef PAGODA_VNNI
  return true;
#else
  return false;
#endif
}

// group_gemv.cpp
torch::Tensor group_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                         torch::Tensor offsets, torch::Tensor shift, int64_t bits, int64_t group);
bool group_gemv_available();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_gemv", &group_gemv, "1-4 fp32 rows times 4/8-bit group-quantized weights (VNNI)");
  m.def("group_gemv_available", &group_gemv_available);
  m.def("int8_gemv", &int8_gemv, "fp32 rows (1-4) times an int8 weight with per-row scales");
  m.def("has_vnni", &has_vnni, "whether int8_gemv was built with AVX512-VNNI");
  m.def("quantize_rows", &quantize_rows,
        "per-row int8 quantization (or normalisation) with outlier columns split off");
}
