// igemm: y = x @ w.T for fp32 activations x (M, K) and 4-bit group-quantized weights w (N, K) as
// an integer GEMM: each row of x is rounded to int8 per 32-element block (llama.cpp's Q8_0
// rounding: d = max|x| / 127, q = round(x / d); q8_block.h), and every (row, output, block) dot product of
// those int8s with the 4-bit integers is exact. Per output:
//
//     w[n, k]    = scales[n, t] * q[n, k] + offsets[n, t]          (t = k / g; offsets optional)
//     I[r, n, b] = sum over the 32 k of block b of xq[r, k] * q[n, k]          (exact, int32)
//     X[r, t]    = x[r, k] summed over the k of group t (pagoda_q8::group_sum's order)
//     y[r, n]    = for b = 0 .. K/32-1:  acc = fma(scales[n, t(b)] * d[r, b], I, acc)
//                  and after the last block of each group t:  acc = fma(offsets[n, t], X, acc)
//
//   INVARIANT (batch invariance, one result for every flavour): every output is computed by
//   exactly these operations in this order, whatever M is, wherever row r sits, whichever tile
//   or ISA flavour computes it. Integer sums are exact in any order; the fp32 chain is fixed.
//
// Why an integer GEMM: wgemm (csrc/wgemm.cpp) widens every weight to fp32 and runs one fma per
// product; here one vpdpbusd (AVX512-VNNI) does 64 products and, on AVX2, one vpmaddubsw does 32
// (then a 16-bit add), and only each (row, output, 32-block) pays a conversion and an fma.
//
// Exactness without saturation: weights are unsigned 0..15 and activations -127..127, so a pair
// sum of vpmaddubsw is at most 2 * 15 * 127 = 3810 and the 8 pairs of one block that share an
// int16 lane sum to at most 30480 < 32767.
//
// Layout (pagoda.kernels.igemm.pack, once at load): outputs in blocks of 16; per block, per octet
// c of k (k = 8c .. 8c + 7), 64 bytes: output i's 4 bytes j = 0..3 hold q[16b + i][8c + j] in the
// low nibble and q[16b + i][8c + 4 + j] in the high one. A 32-bit lane is then one output's four
// consecutive k (low nibbles) or the next four (high), as vpdpbusd and vpmaddubsw + vpmaddwd read
// them against four consecutive activation bytes broadcast to every lane. Scales and offsets are
// wgemm's: (N/16, K/g, 16), fp16 when all are exact in fp16.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "igemm_call.h"  // the checks, output and rounded rows of a call
#include "q8_block.h"
#include "wgemm.h"  // the packed scales and offsets are wgemm's: its Packed and their loads

#if defined(__AVX512F__) && !defined(__AVX512VNNI__)
#error "igemm: an AVX-512 flavour must have VNNI (pagoda.kernels.build.FLAVOURS)"
#endif

namespace {

// outputs per packed block (wgemm's), activations per rounded block (pagoda_q8's)
constexpr int64_t kOut = pagoda_wgemm::kOut, kBlock = pagoda_q8::kBlock, kOctetBytes = 64;

// wgemm's operands (bits 4); only the integers' layout is igemm's own.
using Weights = pagoda_wgemm::Packed;
#if defined(__AVX2__)
using pagoda_wgemm::vload_values;  // a vector of scales or offsets, widened to fp32
#endif

// Block b's 64 bytes of octet c (k = 8c .. 8c + 7).
inline const uint8_t* octet(const Weights& w, int64_t b, int64_t c) {
  return w.q + (b * (w.k / 8) + c) * kOctetBytes;
}

using Acts = pagoda_q8::RoundedRows;  // the rounded rows of a call

#define PAGODA_REPEAT12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
// 16 of 32 zmm accumulate: 12 rows (24) measured 0.75x as fast (spills), 6 and 10 no better
constexpr int kRows = 8, kBlocks = 2;

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// R rows x B blocks of 16 outputs (b0, b0 + 1): one zmm of int32 per (row, block), reset per
// 32-block; the fp32 chain runs in y itself (L1), read and written once per block.
template <int R, int B, bool kPrefetch>
void tile(const Weights& w, int64_t b0, const Acts& a, int64_t r0, float* y, int64_t ldy) {
  static_assert(R <= kRows && B <= kBlocks);
  const __m512i mask = _mm512_set1_epi8(0x0F);
#define PAGODA_DECL(N) __m512i a##N##0, a##N##1;
  PAGODA_REPEAT12(PAGODA_DECL)
#undef PAGODA_DECL
  for (int64_t blk = 0; blk < a.nb; ++blk) {
#define PAGODA_ZERO(N) a##N##0 = _mm512_setzero_si512(); a##N##1 = a##N##0;
    PAGODA_REPEAT12(PAGODA_ZERO)
#undef PAGODA_ZERO
    for (int64_t c = blk * 4; c < blk * 4 + 4; ++c) {
      if constexpr (kPrefetch) {
        pagoda_wgemm::prefetch_ahead(octet(w, b0, c));
        if constexpr (B == 2) pagoda_wgemm::prefetch_ahead(octet(w, b0 + 1, c));
      }
      const __m512i v0 = _mm512_loadu_si512(octet(w, b0, c));
      const __m512i lo0 = _mm512_and_si512(v0, mask);
      const __m512i hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), mask);
      __m512i lo1 = lo0, hi1 = hi0;
      if constexpr (B == 2) {
        const __m512i v1 = _mm512_loadu_si512(octet(w, b0 + 1, c));
        lo1 = _mm512_and_si512(v1, mask);
        hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), mask);
      }
#define PAGODA_DOT(N)                                                  \
      if constexpr (R > N) {                                           \
        const int8_t* xr = a.row(r0 + N) + c * 8;                      \
        const __m512i xl = bcast4(xr), xh = bcast4(xr + 4);            \
        a##N##0 = _mm512_dpbusd_epi32(a##N##0, lo0, xl);               \
        a##N##0 = _mm512_dpbusd_epi32(a##N##0, hi0, xh);               \
        if constexpr (B == 2) {                                        \
          a##N##1 = _mm512_dpbusd_epi32(a##N##1, lo1, xl);             \
          a##N##1 = _mm512_dpbusd_epi32(a##N##1, hi1, xh);             \
        }                                                              \
      }
      PAGODA_REPEAT12(PAGODA_DOT)
#undef PAGODA_DOT
    }
    const int64_t t = blk * kBlock / w.g;
    const bool group_end = ((blk + 1) * kBlock) % w.g == 0 && w.o != nullptr;
    const __m512 s0 = vload_values(w.s, w.half, w.at(b0, t));
    const __m512 s1 = B == 2 ? vload_values(w.s, w.half, w.at(b0 + 1, t)) : s0;
    const __m512 o0 = group_end ? vload_values(w.o, w.half, w.at(b0, t)) : s0;
    const __m512 o1 = group_end && B == 2 ? vload_values(w.o, w.half, w.at(b0 + 1, t)) : o0;
#define PAGODA_EPILOGUE(N)                                                              \
    if constexpr (R > N) {                                                              \
      float* yr = y + N * ldy;                                                          \
      const __m512 d = _mm512_set1_ps(a.d[(r0 + N) * a.nb + blk]);                      \
      __m512 y0 = _mm512_fmadd_ps(_mm512_mul_ps(s0, d), _mm512_cvtepi32_ps(a##N##0),    \
                                  blk ? _mm512_loadu_ps(yr) : _mm512_setzero_ps());     \
      if (group_end)                                                                    \
        y0 = _mm512_fmadd_ps(o0, _mm512_set1_ps(a.xs[(r0 + N) * a.groups + t]), y0);    \
      _mm512_storeu_ps(yr, y0);                                                         \
      if constexpr (B == 2) {                                                           \
        __m512 y1 = _mm512_fmadd_ps(_mm512_mul_ps(s1, d), _mm512_cvtepi32_ps(a##N##1),  \
                                    blk ? _mm512_loadu_ps(yr + kOut) : _mm512_setzero_ps()); \
        if (group_end)                                                                  \
          y1 = _mm512_fmadd_ps(o1, _mm512_set1_ps(a.xs[(r0 + N) * a.groups + t]), y1);  \
        _mm512_storeu_ps(yr + kOut, y1);                                                \
      }                                                                                 \
    }
    PAGODA_REPEAT12(PAGODA_EPILOGUE)
#undef PAGODA_EPILOGUE
  }
}
#elif defined(__AVX2__)
// 8 ymm of int16 accumulate (two per row); 3, 5 and 6 rows measured no faster
constexpr int kRows = 4, kBlocks = 1;

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// R rows x one block of 16 outputs as two halves of 8 (the octet's bytes 0-31 and 32-63): int16
// accumulators (a block's 8 pair sums per lane cannot saturate, see the top), widened to int32
// by vpmaddwd once per block.
template <int R, int B, bool kPrefetch>
void tile(const Weights& w, int64_t b0, const Acts& a, int64_t r0, float* y, int64_t ldy) {
  static_assert(R <= kRows && B == 1);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
#define PAGODA_DECL(N) __m256i a##N##0, a##N##1;
  PAGODA_REPEAT12(PAGODA_DECL)
#undef PAGODA_DECL
  for (int64_t blk = 0; blk < a.nb; ++blk) {
#define PAGODA_ZERO(N) a##N##0 = _mm256_setzero_si256(); a##N##1 = a##N##0;
    PAGODA_REPEAT12(PAGODA_ZERO)
#undef PAGODA_ZERO
    for (int64_t c = blk * 4; c < blk * 4 + 4; ++c) {
      if constexpr (kPrefetch) pagoda_wgemm::prefetch_ahead(octet(w, b0, c));
      // both halves' weights unpacked once; each row's two broadcasts serve both halves
      const uint8_t* wo = octet(w, b0, c);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wo));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wo + 32));
      const __m256i lo0 = _mm256_and_si256(v0, mask);
      const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask);
      const __m256i lo1 = _mm256_and_si256(v1, mask);
      const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask);
#define PAGODA_DOT(N)                                                              \
      if constexpr (R > N) {                                                       \
        const int8_t* xr = a.row(r0 + N) + c * 8;                                  \
        const __m256i xl = bcast4(xr), xh = bcast4(xr + 4);                        \
        a##N##0 = _mm256_add_epi16(a##N##0, _mm256_maddubs_epi16(lo0, xl));       \
        a##N##1 = _mm256_add_epi16(a##N##1, _mm256_maddubs_epi16(lo1, xl));       \
        a##N##0 = _mm256_add_epi16(a##N##0, _mm256_maddubs_epi16(hi0, xh));       \
        a##N##1 = _mm256_add_epi16(a##N##1, _mm256_maddubs_epi16(hi1, xh));       \
      }
      PAGODA_REPEAT12(PAGODA_DOT)
#undef PAGODA_DOT
    }
    const int64_t t = blk * kBlock / w.g;
    const bool group_end = ((blk + 1) * kBlock) % w.g == 0 && w.o != nullptr;
    const __m256 s0 = vload_values(w.s, w.half, w.at(b0, t));
    const __m256 s1 = vload_values(w.s, w.half, w.at(b0, t) + 8);
    const __m256 o0 = group_end ? vload_values(w.o, w.half, w.at(b0, t)) : s0;
    const __m256 o1 = group_end ? vload_values(w.o, w.half, w.at(b0, t) + 8) : s1;
#define PAGODA_EPILOGUE_HALF(N, H)                                                         \
      {                                                                                    \
        const __m256 i = _mm256_cvtepi32_ps(_mm256_madd_epi16(a##N##H, ones));             \
        __m256 acc = _mm256_fmadd_ps(_mm256_mul_ps(s##H, d), i,                            \
                                     blk ? _mm256_loadu_ps(yr + 8 * H) : _mm256_setzero_ps()); \
        if (group_end) acc = _mm256_fmadd_ps(o##H, xs, acc);                               \
        _mm256_storeu_ps(yr + 8 * H, acc);                                                 \
      }
#define PAGODA_EPILOGUE(N)                                                               \
    if constexpr (R > N) {                                                               \
      float* yr = y + N * ldy;                                                           \
      const __m256 d = _mm256_set1_ps(a.d[(r0 + N) * a.nb + blk]);                      \
      const __m256 xs = group_end ? _mm256_set1_ps(a.xs[(r0 + N) * a.groups + t]) : d;   \
      PAGODA_EPILOGUE_HALF(N, 0)                                                         \
      PAGODA_EPILOGUE_HALF(N, 1)                                                         \
    }
    PAGODA_REPEAT12(PAGODA_EPILOGUE)
#undef PAGODA_EPILOGUE
#undef PAGODA_EPILOGUE_HALF
  }
}
#else
constexpr int kRows = 4, kBlocks = 1;

// The portable flavour: the same integers and the same fp32 chain, one output at a time.
template <int R, int B, bool kPrefetch>
void tile(const Weights& w, int64_t b0, const Acts& a, int64_t r0, float* y, int64_t ldy) {
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kOut; ++i) {
      const int8_t* xr = a.row(r0 + r);
      float acc = 0.f;
      for (int64_t blk = 0; blk < a.nb; ++blk) {
        int32_t sum = 0;
        for (int64_t c = blk * 4; c < blk * 4 + 4; ++c)
          for (int j = 0; j < 4; ++j) {
            const uint8_t byte = octet(w, b0, c)[i * 4 + j];
            sum += (byte & 0x0F) * xr[c * 8 + j] + (byte >> 4) * xr[c * 8 + 4 + j];
          }
        const int64_t t = blk * kBlock / w.g;
        acc = std::fma(w.value(w.s, w.at(b0, t) + i) * a.d[(r0 + r) * a.nb + blk],
                       static_cast<float>(sum), acc);
        if (w.o != nullptr && ((blk + 1) * kBlock) % w.g == 0)
          acc = std::fma(w.value(w.o, w.at(b0, t) + i), a.xs[(r0 + r) * a.groups + t], acc);
      }
      y[r * ldy + i] = acc;
    }
}
#endif
#undef PAGODA_REPEAT12

// Rows [0, m) of B blocks: full tiles of kRows, then the rest as one tile of its own size. The
// first tile streams the weights from memory, prefetching ahead; the others find them in cache.
template <int B>
void block_rows(const Weights& w, int64_t b0, const Acts& a, int64_t m, float* y, int64_t ldy) {
  int64_t r = 0;
  if (m >= kRows) {
    tile<kRows, B, true>(w, b0, a, r, y, ldy);
    r += kRows;
  }
  for (; r + kRows <= m; r += kRows) tile<kRows, B, false>(w, b0, a, r, y + r * ldy, ldy);
  switch (m - r) {
#define PAGODA_CASE(n) \
    case n:                                                                          \
      if constexpr (n < kRows) {                                                     \
        if (r == 0) tile<n, B, true>(w, b0, a, r, y, ldy);                           \
        else tile<n, B, false>(w, b0, a, r, y + r * ldy, ldy);                       \
      }                                                                              \
      break;
    PAGODA_CASE(1) PAGODA_CASE(2) PAGODA_CASE(3) PAGODA_CASE(4) PAGODA_CASE(5)
    PAGODA_CASE(6) PAGODA_CASE(7) PAGODA_CASE(8) PAGODA_CASE(9) PAGODA_CASE(10) PAGODA_CASE(11)
#undef PAGODA_CASE
    default: break;
  }
}

}  // namespace

// x (M, K) fp32; pq (N/16, K/8, 64) uint8, ps/po (N/16, K/g, 16) as above; n the true output
// count (<= 16 * blocks).
at::Tensor igemm(at::Tensor x, at::Tensor pq, at::Tensor ps, at::Tensor po, int64_t n,
                 int64_t group) {
  auto c = pagoda_igemm::prepare("igemm", x, pq, ps, po, n, group, 4, 8, kOctetBytes, false);
  if (c.m == 0) return c.unpadded();
  const int64_t blocks = c.w.blocks, units = (blocks + kBlocks - 1) / kBlocks;
  float* yp = c.y.data_ptr<float>();
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b0 = u * kBlocks;
      if (blocks - b0 >= kBlocks)
        block_rows<kBlocks>(c.w, b0, c.a, c.m, yp + b0 * kOut, c.padded);
      else
        block_rows<1>(c.w, b0, c.a, c.m, yp + b0 * kOut, c.padded);
    }
  });
  return c.unpadded();
}
