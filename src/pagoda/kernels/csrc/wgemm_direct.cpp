// The direct path of wgemm (wgemm.cpp states the arithmetic): a few rows, no panel.

#include <ATen/Parallel.h>

#include <cstdint>
#include <utility>

#include "wgemm.h"

namespace pagoda_wgemm {
namespace {

// Few rows (decode, speculative verification, a few users): no panel. D consecutive blocks are
// widened in registers and used at once by all R <= kDirectRows rows: R * D independent chains
// hide the fma latency and no weight is stored and reloaded. As in the panel path, the group
// sums P live in registers and the running sums in y; the operations per output are the same,
// so are the bits.
#if defined(__AVX2__)
#if defined(__AVX512F__)
constexpr int kDirectRows = 8;
template <int R>
constexpr int direct_blocks() { return R <= 4 ? 4 : 2; }  // at most 16 zmm of P
#else
constexpr int kDirectRows = 4;
template <int R>
constexpr int direct_blocks() { return R <= 2 ? 2 : 1; }  // at most 8 ymm of P
#endif

template <int BITS, int R>
void direct(const Packed& w, int64_t b0, const Rows& rows, float* y, int64_t ldy) {
  constexpr int D = direct_blocks<R>(), V = kVecs, C = D * V;
  constexpr int64_t step = BITS == 4 ? 2 : 1;  // k per stored byte
  Vec p[R][C];  // constant indices after unrolling: registers, not stack
  // the running sums: in registers while few (one row: 5-10% faster), else in y
  constexpr bool in_regs = R * C <= 8;
  Vec acc[in_regs ? R : 1][C];
  const uint8_t* base = w.q + b0 * w.block_bytes();
  for (int64_t t = 0; t < w.groups; ++t) {
#pragma GCC unroll 16
    for (int i = 0; i < R * C; ++i) p[i / C][i % C] = vzero();
    for (int64_t k = t * w.g; k < (t + 1) * w.g; k += step) {
#pragma GCC unroll 4
      for (int j = 0; j < D; ++j) {
        const uint8_t* src = base + j * w.block_bytes() + (k / step) * kOut;
        Vec lo[V], hi[V];
        if constexpr (BITS == 4) widen_pair(src, lo, hi); else widen_one(src, lo);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const Vec xa = vbcast(rows.x + r * rows.ldx + k);
#pragma GCC unroll 2
          for (int v = 0; v < V; ++v) p[r][j * V + v] = vfma(xa, lo[v], p[r][j * V + v]);
          if constexpr (BITS == 4) {
            const Vec xb = vbcast(rows.x + r * rows.ldx + k + 1);
#pragma GCC unroll 2
            for (int v = 0; v < V; ++v) p[r][j * V + v] = vfma(xb, hi[v], p[r][j * V + v]);
          }
        }
      }
    }
    // acc = fma(s, P, acc) (acc = 0 before the first group), then fma(o, X, acc), in y
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const int64_t b = b0 + c / V, lane = (c % V) * kLanes;
      const Vec s = vscales(w, b, t, lane);
      const Vec o = w.o != nullptr ? voffsets(w, b, t, lane) : s;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        float* yr = y + r * ldy + c * kLanes;
        Vec a = t ? (in_regs ? acc[in_regs ? r : 0][c] : vload(yr)) : vzero();
        a = vfma(s, p[r][c], a);
        if (w.o != nullptr) a = vfma(o, vbcast(rows.xs + r * rows.groups + t), a);
        if constexpr (in_regs) acc[r][c] = a; else vstore(yr, a);
      }
    }
  }
  if constexpr (in_regs)
#pragma GCC unroll 8
    for (int i = 0; i < R * C; ++i) vstore(y + (i / C) * ldy + (i % C) * kLanes, acc[i / C][i % C]);
}

// Rows [0, m) (m <= kDirectRows) of direct_blocks<m>() blocks from b0 on.
template <int BITS, int R = 1>
void direct_rows(const Packed& w, int64_t m, int64_t b0, const Rows& rows, float* y,
                 int64_t ldy) {
  if (m == R) {
    direct<BITS, R>(w, b0, rows, y, ldy);
  } else if constexpr (R < kDirectRows) {
    direct_rows<BITS, R + 1>(w, m, b0, rows, y, ldy);
  }
}

int64_t direct_blocks_for(int64_t m) {
  int64_t d = 1;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((m == R + 1 ? (d = direct_blocks<R + 1>(), 0) : 0), ...);
  }(std::make_integer_sequence<int, kDirectRows>{});
  return d;
}
#else
constexpr int kDirectRows = 0;
template <int BITS>
void direct_rows(const Packed&, int64_t, int64_t, const Rows&, float*, int64_t) {}
int64_t direct_blocks_for(int64_t) { return 1; }
#endif

}  // namespace

bool run_direct(const Packed& w, int64_t m, const Rows& rows, float* y, int64_t ldy) {
  const int64_t d = direct_blocks_for(m);
  if (m > kDirectRows || w.blocks % d != 0) return false;
  at::parallel_for(0, w.blocks / d, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      if (w.bits == 4)
        direct_rows<4>(w, m, u * d, rows, y + u * d * kOut, ldy);
      else
        direct_rows<8>(w, m, u * d, rows, y + u * d * kOut, ldy);
    }
  });
  return true;
}

}  // namespace pagoda_wgemm
