// igemm8: igemm (csrc/igemm.cpp) for signed 8-bit weights (GGUF Q8_0, int8 groups of 32k):
// y = x @ w.T with each row of x rounded to int8 per 32-block (pagoda_q8, as igemm), every
// (row, output, block) dot product of those int8s with the weights' int8s exact in int32, and
// the same fp32 chain per output:
//
//     w[n, k]    = scales[n, t] * q[n, k] + offsets[n, t]          (t = k / g; offsets optional)
//     I[r, n, b] = sum over the 32 k of block b of xq[r, k] * q[n, k]          (exact, int32)
//     y[r, n]    = for b = 0 .. K/32-1:  acc = fma(scales[n, t(b)] * d[r, b], I, acc)
//                  and after the last block of each group t:  acc = fma(offsets[n, t], X, acc)
//
//   INVARIANT (batch invariance, one result for every flavour): as igemm's. Integer sums are
//   exact in any order, the fp32 chain is fixed, so a row's bits depend neither on its batch or
//   tile nor on the ISA flavour.
//
// Why: an LM head of 8-bit blocks (SmolLM2's Q8_0 token embedding, 49152 x 576) was a fifth of
// an AVX2 decode step of 32 rows through wgemm's fp32 fma (8 products per instruction). Both
// operands are signed here, which vpmaddubsw (unsigned x signed, saturating pair sums) cannot take
// without a sign trick per pair; widened to int16 instead, one vpmaddwd does 16 exact products
// (pair sums of at most 2 * 128 * 127 in int32), and AVX512-VNNI's vpdpwssd 32 with the add.
//
// Layout (pagoda.kernels.igemm.pack, 8 bits): outputs in blocks of 16; per block, per pair p of
// k (k = 2p, 2p + 1), 32 bytes: output i's two int8 at bytes 2i and 2i + 1. Widened to int16
// (vpmovsxbw), a 32-bit lane is one output's pair, as vpmaddwd reads it against the row's pair
// of int16 activations broadcast to every lane. Scales and offsets are wgemm's.
//
// The per-block fp32 chain is written out in each tile, as in igemm.cpp, not shared as an inline
// function: that measured 1.5-2% slower in igemm's AVX2 tile (its broadcasts were re-issued).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "igemm_call.h"
#include "q8_block.h"
#include "wgemm.h"

namespace {

constexpr int64_t kOut = pagoda_wgemm::kOut, kBlock = pagoda_q8::kBlock, kPairBytes = 32;
using Weights = pagoda_wgemm::Packed;
using Acts = pagoda_q8::RoundedRows;
#if defined(__AVX2__)
using pagoda_wgemm::vload_values;
#endif

// Block b's 32 bytes of pair p (k = 2p, 2p + 1).
inline const int8_t* pair(const Weights& w, int64_t b, int64_t p) {
  return reinterpret_cast<const int8_t*>(w.q) + (b * (w.k / 2) + p) * kPairBytes;
}

inline int32_t pair_of(const int16_t* x) {  // two int16 activations as one lane
  int32_t v;
  std::memcpy(&v, x, 4);
  return v;
}

#define PAGODA_REPEAT8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
constexpr int kRows = 8;

// R rows x one block of 16 outputs: one zmm of int32 per row, reset per 32-block.
template <int R, bool kPrefetch>
void tile(const Weights& w, int64_t b0, const Acts& a, int64_t r0, float* y, int64_t ldy) {
#define PAGODA_DECL(N) __m512i a##N;
  PAGODA_REPEAT8(PAGODA_DECL)
#undef PAGODA_DECL
  for (int64_t blk = 0; blk < a.nb; ++blk) {
#define PAGODA_ZERO(N) a##N = _mm512_setzero_si512();
    PAGODA_REPEAT8(PAGODA_ZERO)
#undef PAGODA_ZERO
    for (int64_t p = blk * 16; p < blk * 16 + 16; ++p) {
      if constexpr (kPrefetch) if (p % 2 == 0) pagoda_wgemm::prefetch_ahead(pair(w, b0, p));
      const __m512i v = _mm512_cvtepi8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair(w, b0, p))));
#define PAGODA_DOT(N)                                                                    \
      if constexpr (R > N)                                                               \
        a##N = _mm512_dpwssd_epi32(a##N, v,                                              \
                                   _mm512_set1_epi32(pair_of(a.row16(r0 + N) + 2 * p)));
      PAGODA_REPEAT8(PAGODA_DOT)
#undef PAGODA_DOT
    }
    const int64_t t = blk * kBlock / w.g;
    const bool group_end = ((blk + 1) * kBlock) % w.g == 0 && w.o != nullptr;
    const __m512 s = vload_values(w.s, w.half, w.at(b0, t));
    const __m512 o = group_end ? vload_values(w.o, w.half, w.at(b0, t)) : s;
#define PAGODA_EPILOGUE(N)                                                                 \
    if constexpr (R > N) {                                                                 \
      float* yr = y + N * ldy;                                                             \
      const __m512 d = _mm512_set1_ps(a.d[(r0 + N) * a.nb + blk]);                        \
      __m512 acc = _mm512_fmadd_ps(_mm512_mul_ps(s, d), _mm512_cvtepi32_ps(a##N),          \
                                   blk ? _mm512_loadu_ps(yr) : _mm512_setzero_ps());       \
      if (group_end)                                                                       \
        acc = _mm512_fmadd_ps(o, _mm512_set1_ps(a.xs[(r0 + N) * a.groups + t]), acc);      \
      _mm512_storeu_ps(yr, acc);                                                           \
    }
    PAGODA_REPEAT8(PAGODA_EPILOGUE)
#undef PAGODA_EPILOGUE
  }
}
#elif defined(__AVX2__)
constexpr int kRows = 4;  // 6 measured slower (spills)

// R rows x one block of 16 outputs as two halves of 8 (the pair's bytes 0-15 and 16-31): two ymm
// of int32 per row (8 accumulators, 2 weight vectors and a broadcast: no spills).
template <int R, bool kPrefetch>
void tile(const Weights& w, int64_t b0, const Acts& a, int64_t r0, float* y, int64_t ldy) {
#define PAGODA_DECL(N) __m256i a##N##0, a##N##1;
  PAGODA_REPEAT8(PAGODA_DECL)
#undef PAGODA_DECL
  for (int64_t blk = 0; blk < a.nb; ++blk) {
#define PAGODA_ZERO(N) a##N##0 = _mm256_setzero_si256(); a##N##1 = a##N##0;
    PAGODA_REPEAT8(PAGODA_ZERO)
#undef PAGODA_ZERO
    for (int64_t p = blk * 16; p < blk * 16 + 16; ++p) {
      if constexpr (kPrefetch) if (p % 2 == 0) pagoda_wgemm::prefetch_ahead(pair(w, b0, p));
      const int8_t* wp = pair(w, b0, p);
      const __m256i v0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp)));
      const __m256i v1 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + 16)));
#define PAGODA_DOT(N)                                                                      \
      if constexpr (R > N) {                                                               \
        const __m256i xp = _mm256_set1_epi32(pair_of(a.row16(r0 + N) + 2 * p));           \
        a##N##0 = _mm256_add_epi32(a##N##0, _mm256_madd_epi16(v0, xp));                    \
        a##N##1 = _mm256_add_epi32(a##N##1, _mm256_madd_epi16(v1, xp));                    \
      }
      PAGODA_REPEAT8(PAGODA_DOT)
#undef PAGODA_DOT
    }
    const int64_t t = blk * kBlock / w.g;
    const bool group_end = ((blk + 1) * kBlock) % w.g == 0 && w.o != nullptr;
    const __m256 s0 = vload_values(w.s, w.half, w.at(b0, t));
    const __m256 s1 = vload_values(w.s, w.half, w.at(b0, t) + 8);
    const __m256 o0 = group_end ? vload_values(w.o, w.half, w.at(b0, t)) : s0;
    const __m256 o1 = group_end ? vload_values(w.o, w.half, w.at(b0, t) + 8) : s1;
#define PAGODA_EPILOGUE_HALF(N, H)                                                           \
      {                                                                                      \
        __m256 acc = _mm256_fmadd_ps(_mm256_mul_ps(s##H, d), _mm256_cvtepi32_ps(a##N##H),    \
                                     blk ? _mm256_loadu_ps(yr + 8 * H) : _mm256_setzero_ps()); \
        if (group_end) acc = _mm256_fmadd_ps(o##H, xs, acc);                                 \
        _mm256_storeu_ps(yr + 8 * H, acc);                                                   \
      }
#define PAGODA_EPILOGUE(N)                                                                 \
    if constexpr (R > N) {                                                                 \
      float* yr = y + N * ldy;                                                             \
      const __m256 d = _mm256_set1_ps(a.d[(r0 + N) * a.nb + blk]);                        \
      const __m256 xs = group_end ? _mm256_set1_ps(a.xs[(r0 + N) * a.groups + t]) : d;   \
      PAGODA_EPILOGUE_HALF(N, 0)                                                           \
      PAGODA_EPILOGUE_HALF(N, 1)                                                           \
    }
    PAGODA_REPEAT8(PAGODA_EPILOGUE)
#undef PAGODA_EPILOGUE
#undef PAGODA_EPILOGUE_HALF
  }
}
#else
constexpr int kRows = 4;

// The portable flavour: the same integers and the same fp32 chain, one output at a time.
template <int R, bool kPrefetch>
void tile(const Weights& w, int64_t b0, const Acts& a, int64_t r0, float* y, int64_t ldy) {
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kOut; ++i) {
      const int8_t* xr = a.row(r0 + r);
      float acc = 0.f;
      for (int64_t blk = 0; blk < a.nb; ++blk) {
        int32_t sum = 0;
        for (int64_t p = blk * 16; p < blk * 16 + 16; ++p)
          for (int j = 0; j < 2; ++j) sum += pair(w, b0, p)[2 * i + j] * xr[2 * p + j];
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
#undef PAGODA_REPEAT8

// Rows [0, m) of one block: full tiles of kRows, then the rest as one tile of its own size. The
// first tile streams the weights from memory, prefetching ahead; the others find them in cache.
void block_rows(const Weights& w, int64_t b0, const Acts& a, int64_t m, float* y, int64_t ldy) {
  int64_t r = 0;
  if (m >= kRows) {
    tile<kRows, true>(w, b0, a, r, y, ldy);
    r += kRows;
  }
  for (; r + kRows <= m; r += kRows) tile<kRows, false>(w, b0, a, r, y + r * ldy, ldy);
  switch (m - r) {
#define PAGODA_CASE(n)                                                                 \
    case n:                                                                          \
      if constexpr (n < kRows) {                                                     \
        if (r == 0) tile<n, true>(w, b0, a, r, y, ldy);                              \
        else tile<n, false>(w, b0, a, r, y + r * ldy, ldy);                          \
      }                                                                              \
      break;
    PAGODA_CASE(1) PAGODA_CASE(2) PAGODA_CASE(3) PAGODA_CASE(4) PAGODA_CASE(5)
    PAGODA_CASE(6) PAGODA_CASE(7)
#undef PAGODA_CASE
    default: break;
  }
}

}  // namespace

// x (M, K) fp32; pq (N/16, K/2, 32) int8, ps/po (N/16, K/g, 16) as wgemm's; n the true output
// count (<= 16 * blocks).
at::Tensor igemm8(at::Tensor x, at::Tensor pq, at::Tensor ps, at::Tensor po, int64_t n,
                  int64_t group) {
#if defined(__AVX2__)
  constexpr bool wide = true;  // the vector tiles read int16 pairs
#else
  constexpr bool wide = false;
#endif
  auto c = pagoda_igemm::prepare("igemm8", x, pq, ps, po, n, group, 8, 2, kPairBytes, wide);
  if (c.m == 0) return c.unpadded();
  float* yp = c.y.data_ptr<float>();
  at::parallel_for(0, c.w.blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) block_rows(c.w, b, c.a, c.m, yp + b * kOut, c.padded);
  });
  return c.unpadded();
}
