// fgemm: y = x @ w.T for fp32 activations x (M, K) and fp32 weights w (N, K), on the layout of
// wgemm (outputs in blocks of 16, each block transposed so the 16 outputs of one k sit side by
// side; N padded to a multiple of 16 with zero weights by the packer):
//
//     y[r, n] = fma chain over k = 0 .. K-1, in increasing order, of x[r, k] * w[n, k], from 0
//
//   INVARIANT (batch invariance, and one result for every flavour): every output is exactly that
//   chain, whatever M is, wherever row r sits, whichever tile or ISA flavour computes it. Only
//   independence between outputs is exploited (rows times vectors of outputs), never a
//   reassociation within one: a token's logits do not depend on its batch, and the generic, avx2
//   and avx512 flavours return the same bits.
//
// Why: a decode step (one row per request) and a speculative verification (a few rows) stream
// every weight once and do little arithmetic per byte. oneDNN's and MKL's fp32 products take
// more time per row the more rows they get well before the arithmetic is the limit (the 121
// linears of SmolLM2 on a 2-core Xeon, benchmarks/dense_kernels.py: oneDNN 34.6 ms at 1 row and
// 39.2 at 9, MKL 21.1 and 52.0; fgemm 19.0 and 24.1), and oneDNN blocks one
// row differently from many (dense_linear.py). Here R <= kTileRows rows share every weight load,
// so up to ten rows cost about what one does. Many rows (prefill) run the same tile over row
// tiles while the tile's weights stay in cache: an fp32 GEMM inner loop, one broadcast fma per
// R * U products.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "alloc.h"
#include "wgemm.h"

namespace {

using pagoda_wgemm::kOut;

#if defined(__AVX2__)
using pagoda_wgemm::kLanes;
using pagoda_wgemm::kVecs;
using pagoda_wgemm::Vec;
using pagoda_wgemm::vbcast;
using pagoda_wgemm::vfma;
using pagoda_wgemm::vload;
using pagoda_wgemm::vstore;
using pagoda_wgemm::vzero;
// tile_vectors<R>: output vectors per tile, as many as the registers hold beside R rows'
// accumulators (the weights are fma memory operands; one register takes the broadcast). More
// vectors are more weight streams in flight: with 2 instead of 4 at 5 rows the 121 linears of
// SmolLM2 took 22.5 instead of 20.4 ms on the Xeon (docs/benchmarks.md, "fgemm tiles").
#if defined(__AVX512F__)
// At most 10 rows a tile: 11 or 12 rows as one tile leave room for only 2 weight streams; as two
// tiles (6 + 5, 6 + 6) each has 4, the second reading the weights from cache (the 121 linears,
// 2-core Xeon, docs/benchmarks.md: 11 rows 24.7-25.0 -> 24.0-24.2 ms, 12 rows 25.1-25.3 ->
// 24.8; 8 rows a tile split 9 and 10 rows too and cost 2 ms there).
constexpr int kTileRows = 10;  // <= 30 of 32 zmm accumulate
template <int R>
constexpr int tile_vectors() { return R <= 7 ? 4 : 3; }
constexpr int kFewTileRows = kTileRows;
#else
constexpr int kTileRows = 6;  // <= 15 of 16 ymm accumulate
template <int R>
constexpr int tile_vectors() { return R <= 3 ? 4 : R <= 5 ? 3 : 2; }
// A step of at most kFewRows rows (decode, verification) runs tiles of at most 3 rows: each has
// 4 weight streams, their weights in registers, where a 4-6 row tile has 2-3 and takes them as
// fma memory operands (4-5 rows: 20-23 load-port uops per 15 fmas); the later tiles find the
// weights in cache. The 121 linears of SmolLM2 streamed, the avx2 build on the 2-core Xeon
// (docs/benchmarks.md): 6 rows 28.1-29.9 -> 25.2-26.3 ms, 9 rows 29.6-31.5 -> 28.5-30.1, 12
// rows 36.1 -> 32.7; from 64 rows (prefill) 6-row tiles stay faster (104.6 vs 108.6 ms).
constexpr int kFewTileRows = 3;
#endif
constexpr int64_t kFewRows = 24;

// Weights prefetched this many k ahead (1 KiB; 32 and 64 measured the same), and K sliced by
// kSliceK when several row tiles reuse a unit's weights.
constexpr int64_t kPrefetchK = 16, kSliceK = 256;

// Rows [0, R) times U consecutive vectors of outputs (kLanes each) from vector v0 on, over
// k in [k0, k1). xt holds the R rows transposed, xt[k * R + r], so every broadcast of the inner
// loop sits at a constant offset from one pointer. Each accumulator is one output's chain: it
// starts at 0 (k0 == 0) or at the running sum stored in y (a later slice of K; fp32 stores and
// loads are exact, so slicing K changes no bit).
template <int R, int U, bool kPrefetch = true>
void tile(const float* w, int64_t k, int64_t v0, const float* xt, float* y, int64_t ldy,
          int64_t k0, int64_t k1) {
  Vec acc[R][U];  // constant indices after unrolling: registers, not stack
  const float* src[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
    src[u] = w + (v0 + u) / kVecs * k * kOut + (v0 + u) % kVecs * kLanes;
#pragma GCC unroll 48
  for (int i = 0; i < R * U; ++i)
    acc[i / U][i % U] = k0 ? vload(y + (i / U) * ldy + (v0 + i % U) * kLanes) : vzero();
  xt += k0 * R;
  for (int64_t kk = k0; kk < k1; ++kk, xt += R) {
    Vec wv[U];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      // the address is formed in integers: near the end of the weights it points past them,
      // which a prefetch (a hint that never faults) may do but C++ pointer arithmetic may not.
      // One prefetch per 64-byte line: AVX2's two vectors of a block share one (asking for it
      // twice took load slots: the avx2 build's 121 linears 5% faster at 1 row, 1-3% at 2-64)
      if constexpr (kPrefetch) if ((v0 + u) % kVecs == 0)
        _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(src[u]) +
                                                   (kk + kPrefetchK) * kOut * sizeof(float)),
                     _MM_HINT_T0);
      wv[u] = vload(src[u] + kk * kOut);
    }
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const Vec xa = vbcast(xt + r);
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) acc[r][u] = vfma(xa, wv[u], acc[r][u]);
    }
  }
#pragma GCC unroll 48
  for (int i = 0; i < R * U; ++i)
    vstore(y + (i / U) * ldy + (v0 + i % U) * kLanes, acc[i / U][i % U]);
}

// Calls f(std::integral_constant<int, R>) for R == m (1 <= m <= kTileRows).
template <int R = 1, typename F>
void with_rows(int64_t m, F&& f) {
  if (m == R) {
    f(std::integral_constant<int, R>{});
  } else if constexpr (R < kTileRows) {
    with_rows<R + 1>(m, f);
  }
}

// Calls f(std::integral_constant<int, U>) for U == width (2 <= width <= 4).
template <typename F>
void with_width(int64_t width, F&& f) {
  if (width == 4) f(std::integral_constant<int, 4>{});
  else if (width == 3) f(std::integral_constant<int, 3>{});
  else f(std::integral_constant<int, 2>{});
}

// Rows of one tile (R rows at xt, their outputs at y) times vectors [begin, end), in units of U
// vectors, the rest one vector at a time (the same chain per output: the same bits).
template <int R, int U, bool kPrefetch>
void tile_span(const float* w, int64_t k, int64_t begin, int64_t end, const float* xt, float* y,
               int64_t ldy, int64_t k0, int64_t k1) {
  int64_t v = begin;
  for (; v + U <= end; v += U) tile<R, U, kPrefetch>(w, k, v, xt, y, ldy, k0, k1);
  for (; v < end; ++v) tile<R, 1, kPrefetch>(w, k, v, xt, y, ldy, k0, k1);
}
#endif

}  // namespace

// x (M, K) fp32; pw (N/16, K, 16) fp32, packed as above; n the true output count.
at::Tensor fgemm(at::Tensor x, at::Tensor pw, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "fgemm: x must be a 2-D fp32 CPU tensor");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(pw.dim() == 3 && pw.size(1) == k && pw.size(2) == kOut &&
                  pw.scalar_type() == at::kFloat,
              "fgemm: packed weights must be (N/16, K, 16) fp32");
  const int64_t blocks = pw.size(0), padded = blocks * kOut;
  TORCH_CHECK(n > 0 && n <= padded, "fgemm: n exceeds the packed blocks");
  x = x.contiguous();
  pw = pw.contiguous();
  auto y = pagoda_alloc::empty({m, padded}, x.options());
  const auto unpadded = [&] { return n == padded ? y : y.narrow(1, 0, n).contiguous(); };
  if (m == 0 || k == 0) return k == 0 ? unpadded().zero_() : unpadded();
  const float* xp = x.data_ptr<float>();
  const float* wp = pw.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if defined(__AVX2__)
  // Row tiles of `tile_rows` (the last may be shorter), each transposed: tile i's rows at
  // xt + i * tile_rows * k, as xt[kk * R + r]. As many tiles as kTileRows-row tiles would need
  // (kFewTileRows for a few rows), their rows balanced: 13 rows on AVX-512 are 7 + 6 (4 output
  // vectors per tile) rather than 10 + 3 (3 vectors).
  const int64_t most = m <= kFewRows ? kFewTileRows : kTileRows;
  const int64_t tiles = (m + most - 1) / most;
  const int64_t tile_rows = (m + tiles - 1) / tiles;
  std::vector<float> xt(static_cast<size_t>(m * k));
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r0 = i * tile_rows, rows = std::min<int64_t>(tile_rows, m - r0);
      float* dst = xt.data() + r0 * k;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t kk = 0; kk < k; ++kk) dst[kk * rows + r] = xp[(r0 + r) * k + kk];
    }
  });
  // Every tile uses the unit width of a full tile (so a unit's weights, K * U * kLanes floats,
  // stay in cache across the tiles; a shorter last tile has room for it); one tile uses its own.
  const int64_t vectors = blocks * kVecs;
  int64_t width = 2;
  with_rows(tile_rows, [&](auto R) { width = tile_vectors<decltype(R)::value>(); });
  // Row tiles in chunks whose transposed rows stay in cache while a unit's weights sweep them,
  // and K in slices whose unit weights (slice * width * kLanes floats, 32 KiB) stay in L1 across
  // the chunk's tiles. One tile (decode, verification) takes all of K at once.
  const int64_t chunk = std::max<int64_t>(1, (256 << 10) / (tile_rows * k * 4));
  const int64_t slice = tiles > 1 ? kSliceK * 2 / width : k;
  with_width(width, [&](auto U) {
    constexpr int kU = decltype(U)::value;
    at::parallel_for(0, (vectors + kU - 1) / kU, 1, [&](int64_t begin, int64_t end) {
      const int64_t v_end = std::min(end * kU, vectors);
      for (int64_t c0 = 0; c0 < tiles; c0 += chunk) {
        const int64_t c1 = std::min(tiles, c0 + chunk);
        for (int64_t v = begin * kU; v < v_end; v += kU) {
          const int64_t v1 = std::min<int64_t>(v + kU, v_end);
          for (int64_t k0 = 0; k0 < k; k0 += slice) {
            const int64_t k1 = std::min(k, k0 + slice);
            for (int64_t i = c0; i < c1; ++i) {
              const int64_t r0 = i * tile_rows, rows = std::min<int64_t>(tile_rows, m - r0);
              const float* xti = xt.data() + r0 * k;
              float* yi = yp + r0 * padded;
              with_rows(rows, [&](auto R) {
                constexpr int kR = decltype(R)::value;
                // kU is the width of a tile of tile_rows >= kR rows, never wider than kR's own
                // (instantiating the rest would compile spilling code no call reaches)
                if constexpr (kU <= tile_vectors<kR>()) {
                  // the first tile of a chunk streams the unit's weights from memory; the
                  // others find them in cache (prefetching there only takes load slots)
                  if (i == c0)
                    tile_span<kR, kU, true>(wp, k, v, v1, xti, yi, padded, k0, k1);
                  else
                    tile_span<kR, kU, false>(wp, k, v, v1, xti, yi, padded, k0, k1);
                } else {
                  TORCH_CHECK(false, "fgemm: a tile wider than its rows allow");
                }
              });
            }
          }
        }
      }
    });
  });
#else
  // Portable: the same chain per output with std::fma (the same bits as the vector flavours).
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t r = 0; r < m; ++r)
        for (int i = 0; i < kOut; ++i) {
          float acc = 0.f;
          for (int64_t kk = 0; kk < k; ++kk)
            acc = std::fma(xp[r * k + kk], wp[(b * k + kk) * kOut + i], acc);
          yp[r * padded + b * kOut + i] = acc;
        }
  });
#endif
  return unpadded();
}
