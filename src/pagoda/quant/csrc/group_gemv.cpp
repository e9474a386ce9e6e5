// Decode-time product of 1-4 fp32 rows with group-quantized weights, read in place (4-bit
// nibbles or 8-bit values with a scale, and optionally an offset, per group of the row):
//
//     w[n, k] = scales[n, k / g] * q[n, k] + offsets[n, k / g]
//     y[r, n] = sum_k x[r, k] * w[n, k]
//
// Each row of x is quantized to int8 with its own scale, and AVX512-VNNI's vpdpbusd multiplies
// 64 weight bytes by 64 activation bytes per instruction into 16 int32 lanes. Every lane lies in
// one group, so one fp32 vector of per-lane group scales turns the lanes into a float partial sum
// (no per-group horizontal reduction). The offset term uses exact fp32 sums of x per group.
//
// 4-bit: unsigned nibbles, element 2i in the low nibble of byte i. A 64-element chunk is 32 bytes;
// its low nibbles (the even elements) fill the first half of the 64-byte weight vector and its
// high nibbles (the odd elements) the second, so x is laid out per chunk as [evens | odds].
// 8-bit: signed values. vpdpbusd needs an unsigned operand, so x goes in as xq + 128, and the
// constant 128 * sum_g scales[n, g] * sum(q[n, group g]) (`shift`, per output row) comes back out.
//
// Requires K % 64 == 0 and 64 % g == 0 or g % 64 == 0; `group_gemv_supported` says so in Python.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

namespace {

constexpr int kMaxRows = 4;

// lane -> group offset within a 64-element chunk, for each layout (see the header comment).
__m512i lane_groups(int bits, int64_t g) {
  alignas(64) int32_t idx[16];
  for (int l = 0; l < 16; ++l) {
    const int64_t first = bits == 4 ? 8 * (l % 8) : 4 * l;  // first element the lane covers
    idx[l] = g >= 64 ? 0 : static_cast<int32_t>(first / g);
  }
  return _mm512_load_si512(idx);
}

// Per-row int8 quantization of x into the byte layout the weights need; returns the row scale.
float prepare_row(const float* x, int64_t k, int bits, uint8_t* out) {
  float mx = 1e-30f;
  for (int64_t j = 0; j < k; ++j) mx = std::max(mx, std::fabs(x[j]));
  const float inv = (1.f / mx) * 127.f;
  for (int64_t c = 0; c < k; c += 64) {
    for (int j = 0; j < 64; ++j) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(x[c + j] * inv));
      if (bits == 4) {  // [evens | odds], signed
        const int pos = (j % 2 == 0) ? j / 2 : 32 + j / 2;
        out[c + pos] = static_cast<uint8_t>(static_cast<int8_t>(v));
      } else {  // natural order, shifted to unsigned
        out[c + j] = static_cast<uint8_t>(v + 128);
      }
    }
  }
  return mx / 127.f;
}

// 64 weights of output row `wi` at chunk c, as bytes in the activation layout.
template <int BITS>
inline __m512i load_chunk(const uint8_t* wi, int64_t c) {
  if constexpr (BITS == 4) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wi + c / 2));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(b, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  } else {
    return _mm512_loadu_si512(wi + c);
  }
}

// NB consecutive output rows at once: NB * R independent accumulator chains hide the latency
// of the dot -> convert -> fma sequence, which bounds a one-row loop at K = 576.
template <int R, int NB, int BITS>
void block(const uint8_t* xq, const float* xs, const float* xsum, const uint8_t* w,
           const float* scales, const float* offsets, const float* shift, float* y, int64_t n,
           int64_t k, int64_t g, __m512i idx, int64_t i0) {
  const int64_t groups = k / g, row_bytes = BITS == 4 ? k / 2 : k;
  __m512 acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 64) {
    const int64_t base = c / g;
    const __mmask16 smask =
        static_cast<__mmask16>((1u << std::min<int64_t>(16, groups - base)) - 1);
    __m512i xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_si512(xq + r * k + c);
    for (int b = 0; b < NB; ++b) {
      const int64_t i = i0 + b;
      const __m512i wv = load_chunk<BITS>(w + i * row_bytes, c);
      const __m512 sv =
          _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(smask, scales + i * groups + base));
      for (int r = 0; r < R; ++r) {
        // 4-bit: unsigned weights x signed activations; 8-bit: the reverse.
        const __m512i dot = BITS == 4
            ? _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[r])
            : _mm512_dpbusd_epi32(_mm512_setzero_si512(), xv[r], wv);
        acc[b][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sv, acc[b][r]);
      }
    }
  }
  for (int b = 0; b < NB; ++b) {
    const int64_t i = i0 + b;
    for (int r = 0; r < R; ++r) {
      float v = _mm512_reduce_add_ps(acc[b][r]);
      if (shift != nullptr) v -= shift[i];
      v *= xs[r];
      if (offsets != nullptr) {  // sum_g offsets[i, g] * xsum[r, g], 16 groups at a time
        const float* oi = offsets + i * groups;
        const float* sr = xsum + r * groups;
        __m512 o = _mm512_setzero_ps();
        for (int64_t t = 0; t < groups; t += 16) {
          const __mmask16 mk =
              static_cast<__mmask16>((1u << std::min<int64_t>(16, groups - t)) - 1);
          o = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, oi + t),
                              _mm512_maskz_loadu_ps(mk, sr + t), o);
        }
        v += _mm512_reduce_add_ps(o);
      }
      y[r * n + i] = v;
    }
  }
}

template <int R, int BITS>
void run(const uint8_t* xq, const float* xs, const float* xsum, const uint8_t* w,
         const float* scales, const float* offsets, const float* shift, float* y, int64_t n,
         int64_t k, int64_t g) {
  constexpr int NB = R <= 2 ? 4 : 2;
  const __m512i idx = lane_groups(BITS, g);
  at::parallel_for(0, n, 32, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + NB <= end; i += NB)
      block<R, NB, BITS>(xq, xs, xsum, w, scales, offsets, shift, y, n, k, g, idx, i);
    for (; i < end; ++i)
      block<R, 1, BITS>(xq, xs, xsum, w, scales, offsets, shift, y, n, k, g, idx, i);
  });
}

template <int R>
void run_bits(int bits, const uint8_t* xq, const float* xs, const float* xsum, const uint8_t* w,
              const float* scales, const float* offsets, const float* shift, float* y,
              int64_t n, int64_t k, int64_t g) {
  if (bits == 4)
    run<R, 4>(xq, xs, xsum, w, scales, offsets, shift, y, n, k, g);
  else
    run<R, 8>(xq, xs, xsum, w, scales, offsets, shift, y, n, k, g);
}

}  // namespace

bool group_gemv_available() { return true; }

torch::Tensor group_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                         torch::Tensor offsets, torch::Tensor shift, int64_t bits,
                         int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "group_gemv: x fp32 (R, K)");
  const int64_t m = x.size(0), k = x.size(1), n = qweight.size(0);
  TORCH_CHECK(m >= 1 && m <= kMaxRows, "group_gemv: 1 to 4 rows");
  TORCH_CHECK(bits == 4 || bits == 8, "group_gemv: 4 or 8 bits");
  // 4-bit lanes hold 8 consecutive elements ([evens | odds] layout), 8-bit lanes 4.
  TORCH_CHECK(k % 64 == 0 && (64 % group == 0 || group % 64 == 0) && group >= (bits == 4 ? 8 : 4),
              "group_gemv: K must be a multiple of 64 and the group divide or be a multiple of 64");
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "group_gemv: CPU tensors");
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == (bits == 4 ? k / 2 : k) &&
              qweight.scalar_type() == (bits == 4 ? torch::kByte : torch::kChar),
              "group_gemv: qweight must be (N, K/2) uint8 (4-bit) or (N, K) int8 (8-bit)");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.size(0) == n &&
              scales.size(1) == k / group, "group_gemv: scales fp32 (N, K/g)");
  const bool has_offsets = offsets.numel() > 0, has_shift = shift.numel() > 0;
  TORCH_CHECK(!has_offsets || offsets.sizes() == scales.sizes(), "group_gemv: offsets shape");
  TORCH_CHECK(!has_offsets || offsets.scalar_type() == torch::kFloat, "group_gemv: fp32 offsets");
  TORCH_CHECK(bits == 4 || has_shift, "group_gemv: 8-bit weights need their shift");
  TORCH_CHECK(!has_shift || (shift.numel() == n && shift.scalar_type() == torch::kFloat),
              "group_gemv: shift must be (N,) fp32");
  x = x.contiguous();
  qweight = qweight.contiguous();
  scales = scales.contiguous();
  if (has_offsets) offsets = offsets.contiguous();
  if (has_shift) shift = shift.contiguous();
  const float* xp = x.data_ptr<float>();
  const int64_t groups = k / group;
  std::vector<uint8_t> xq(m * k);
  std::vector<float> xs(m), xsum(has_offsets ? m * groups : 0);
  for (int64_t r = 0; r < m; ++r) {
    xs[r] = prepare_row(xp + r * k, k, static_cast<int>(bits), xq.data() + r * k);
    if (has_offsets)
      for (int64_t t = 0; t < groups; ++t) {
        float s = 0.f;
        for (int64_t j = 0; j < group; ++j) s += xp[r * k + t * group + j];
        xsum[r * groups + t] = s;
      }
  }
  auto y = torch::empty({m, n}, x.options());
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const float* op = has_offsets ? offsets.data_ptr<float>() : nullptr;
  const float* hp = has_shift ? shift.data_ptr<float>() : nullptr;
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int b = static_cast<int>(bits);
  const uint8_t* xqp = xq.data();
  switch (m) {
    case 1: run_bits<1>(b, xqp, xs.data(), xsum.data(), wp, sp, op, hp, yp, n, k, group); break;
    case 2: run_bits<2>(b, xqp, xs.data(), xsum.data(), wp, sp, op, hp, yp, n, k, group); break;
    case 3: run_bits<3>(b, xqp, xs.data(), xsum.data(), wp, sp, op, hp, yp, n, k, group); break;
    default: run_bits<4>(b, xqp, xs.data(), xsum.data(), wp, sp, op, hp, yp, n, k, group); break;
  }
  return y;
}

#else  // no AVX512-VNNI: Python keeps the GEMM path

bool group_gemv_available() { return false; }

torch::Tensor group_gemv(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                         torch::Tensor, int64_t, int64_t) {
  TORCH_CHECK(false, "group_gemv needs AVX512-VNNI");
}

#endif
