// The direct path of wgemm (wgemm.cpp states the arithmetic): a few rows, no panel.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "wgemm.h"

namespace pagoda_wgemm {
namespace {

// Few rows (decode, speculative verification, a few users): no panel. U consecutive vectors of
// outputs (kLanes each: a whole block of 16 with AVX-512, half a block with AVX2) are widened in
// registers and used at once by all R <= kDirectRows rows: R * U independent fma chains (each
// output's group sum P is one chain, in the order the arithmetic fixes). No weight is stored and
// reloaded. As in the panel path, the group sums P live in registers and the running sums in
// registers or in y; the operations per output are the same, so are the bits. (Measured on a
// Zen 4, alternating builds: 8 vectors for one row instead of 4 was 0.9-1.0x; 5-8 rows with
// AVX2 in half blocks instead of the panel, 1.2-1.3x; 9-12 rows with AVX-512, 1.2x.)
#if defined(__AVX2__)
#if defined(__AVX512F__)
constexpr int kDirectRows = 12, kRegisters = 32;
template <int R>
constexpr int direct_vectors() { return R <= 4 ? 4 : 2; }  // <= 24 zmm of P
#else
constexpr int kDirectRows = 8, kRegisters = 16;
template <int R>
constexpr int direct_vectors() { return R <= 2 ? 4 : R <= 4 ? 2 : 1; }  // <= 8 ymm of P
#endif

// Rows [0, R) of the U vectors from v0 on. xt holds the rows transposed, xt[k * R + r], so every
// broadcast of the inner loop is at a constant offset from one pointer.
template <int BITS, int R, int U>
void direct(const Packed& w, int64_t v0, const float* xt, const Rows& rows, float* y,
            int64_t ldy) {
  constexpr int64_t step = BITS == 4 ? 2 : 1;  // k per stored byte
  Vec p[R][U];  // constant indices after unrolling: registers, not stack
  // Registers the inner loop needs: P, then either a broadcast pair per row, reused by every
  // vector (vector by vector), or a widened pair per vector, reused by every row (widen first):
  // the order that fits in the registers, so that P never spills (spilled P: 0.75x).
  constexpr int by_vector = R * U + 2 * R + 3, widen_first = R * U + 2 * U + 3;
  constexpr bool first = by_vector > kRegisters;
  // the running sums: in registers when they fit beside the loop's, else in y
  constexpr bool in_regs = (first ? widen_first : by_vector) + R * U <= kRegisters;
  Vec acc[in_regs ? R : 1][U];
  const uint8_t* src[U];  // vector u's bytes in the first stored row of its block
  int64_t block[U], lane[U];
  for (int u = 0; u < U; ++u) {
    block[u] = (v0 + u) / kVecs;
    lane[u] = (v0 + u) % kVecs * kLanes;
    src[u] = w.q + block[u] * w.block_bytes() + lane[u];
  }
  const int64_t stored_rows = w.g / step;  // stored rows (of kOut bytes) per group
  for (int64_t t = 0; t < w.groups; ++t) {
#pragma GCC unroll 24
    for (int i = 0; i < R * U; ++i) p[i / U][i % U] = vzero();
    const float* xk = xt + t * w.g * R;
    const int64_t i0 = t * stored_rows * kOut;
    for (int64_t i = i0; i < i0 + stored_rows * kOut; i += kOut, xk += step * R) {
      if (i % 64 == 0)  // each streamed block's next lines, once per 64 bytes (its lane 0)
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u)
          if (lane[u] == 0) prefetch_ahead(src[u] + i);
      if constexpr (first) {
        Vec lo[U], hi[U];
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          if constexpr (BITS == 4) widen_pair_vec(src[u] + i, lo[u], hi[u]);
          else widen_one_vec(src[u] + i, lo[u]);
        }
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) {
          const Vec xa = vbcast(xk + r);
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u) p[r][u] = vfma(xa, lo[u], p[r][u]);
          if constexpr (BITS == 4) {
            const Vec xb = vbcast(xk + R + r);
#pragma GCC unroll 8
            for (int u = 0; u < U; ++u) p[r][u] = vfma(xb, hi[u], p[r][u]);
          }
        }
      } else {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          Vec lo, hi;
          if constexpr (BITS == 4) widen_pair_vec(src[u] + i, lo, hi);
          else widen_one_vec(src[u] + i, lo);
#pragma GCC unroll 12
          for (int r = 0; r < R; ++r) {
            p[r][u] = vfma(vbcast(xk + r), lo, p[r][u]);
            if constexpr (BITS == 4) p[r][u] = vfma(vbcast(xk + R + r), hi, p[r][u]);
          }
        }
      }
    }
    // acc = fma(s, P, acc) (acc = 0 before the first group), then fma(o, X, acc)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const Vec s = vscales(w, block[u], t, lane[u]);
      const Vec o = w.o != nullptr ? voffsets(w, block[u], t, lane[u]) : s;
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        float* yr = y + r * ldy + u * kLanes;
        Vec a = t ? (in_regs ? acc[in_regs ? r : 0][u] : vload(yr)) : vzero();
        a = vfma(s, p[r][u], a);
        if (w.o != nullptr) a = vfma(o, vbcast(rows.xs + r * rows.groups + t), a);
        if constexpr (in_regs) acc[r][u] = a; else vstore(yr, a);
      }
    }
  }
  if constexpr (in_regs)
#pragma GCC unroll 8
    for (int i = 0; i < R * U; ++i) vstore(y + (i / U) * ldy + (i % U) * kLanes, acc[i / U][i % U]);
}

// Rows [0, m) (m <= kDirectRows) of vectors [begin, end): units of direct_vectors<m>(), then the
// rest one vector at a time (the same operations per output: the same bits).
template <int BITS, int R = 1>
void direct_rows(const Packed& w, int64_t m, int64_t begin, int64_t end, const float* xt,
                 const Rows& rows, float* y, int64_t ldy) {
  if (m == R) {
    constexpr int U = direct_vectors<R>();
    int64_t v = begin;
    for (; v + U <= end; v += U) direct<BITS, R, U>(w, v, xt, rows, y + v * kLanes, ldy);
    for (; v < end; ++v) direct<BITS, R, 1>(w, v, xt, rows, y + v * kLanes, ldy);
  } else if constexpr (R < kDirectRows) {
    direct_rows<BITS, R + 1>(w, m, begin, end, xt, rows, y, ldy);
  }
}

int64_t direct_vectors_for(int64_t m) {
  int64_t d = 1;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((m == R + 1 ? (d = direct_vectors<R + 1>(), 0) : 0), ...);
  }(std::make_integer_sequence<int, kDirectRows>{});
  return d;
}
#else
constexpr int kDirectRows = 0, kVecs = 1;
template <int BITS>
void direct_rows(const Packed&, int64_t, int64_t, int64_t, const float*, const Rows&, float*,
                 int64_t) {}
int64_t direct_vectors_for(int64_t) { return 1; }
#endif

}  // namespace

bool run_direct(const Packed& w, int64_t m, const Rows& rows, float* y, int64_t ldy) {
  if (m > kDirectRows) return false;
  // the rows transposed (a copy of m * K floats, read by every vector)
  std::vector<float> xt(static_cast<size_t>(w.k * m));
  for (int64_t r = 0; r < m; ++r)
    for (int64_t k = 0; k < w.k; ++k) xt[k * m + r] = rows.x[r * rows.ldx + k];
  // whole units per task, so only the last task has a tail
  const int64_t d = direct_vectors_for(m), vectors = w.blocks * kVecs;
  at::parallel_for(0, (vectors + d - 1) / d, 1, [&](int64_t begin, int64_t end) {
    const int64_t last = std::min(end * d, vectors);
    if (w.bits == 4)
      direct_rows<4>(w, m, begin * d, last, xt.data(), rows, y, ldy);
    else
      direct_rows<8>(w, m, begin * d, last, xt.data(), rows, y, ldy);
  });
  return true;
}

}  // namespace pagoda_wgemm
