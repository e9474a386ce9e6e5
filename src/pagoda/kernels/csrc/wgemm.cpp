// wgemm: y = x @ w.T for fp32 activations x (M, K) and group-quantized weights w (N, K) stored as
// 4- or 8-bit integers, computed in fp32: the integers are widened in registers, the activations
// are never rounded (weight-only quantization, as GPU W4A16 kernels do it).
//
//     w[n, k] = scales[n, t] * q[n, k] + offsets[n, t]         (t = k / g; offsets may be absent)
//     P[r, n, t] = fma chain over the k of group t, in increasing order, of x[r, k] * q[n, k]
//     X[r, t]    = x[r, k] summed over the k of group t, in increasing order (offsets only)
//     y[r, n]    = for t = 0 .. K/g-1:  acc = fma(scales[n, t], P, acc);
//                                       acc = fma(offsets[n, t], X[r, t], acc)
//
// Scale and offset once per group, not per weight: widening is one conversion per weight.
//
//   INVARIANT (batch invariance, and one result for every flavour): every output is computed by
//   exactly the operations above in exactly that order, whatever M is, wherever row r sits,
//   whichever path (direct or panel), tile shape or ISA flavour computes it. Only independence
//   between outputs is exploited, never a reassociation within one: a token's output does not
//   depend on its batch, and the generic, avx2 and avx512 flavours return the same bits.
//
// Why not qgemm's int8 dot products (a conversion per 32-block of every row and output, 0.3-0.5x
// oneDNN's fp32 at 512 rows on AVX2): docs/quantization.md.
//
// Few rows take the direct path (wgemm_direct.cpp), more the panel path here.
//
// Layout (packed once at load, pagoda.kernels.wgemm.pack): outputs in blocks of 16, each block's
// weights transposed so the 16 outputs of one k sit side by side.
//   4-bit: pq[b][p][i] = byte p of output row 16b + i (low nibble k = 2p, high nibble k = 2p + 1)
//   8-bit: pq[b][k][i] = q[16b + i][k] (int8)
//   ps[b][t][i] = scales[16b + i][t], po likewise (or empty); fp16 when all are exact in fp16
// N is padded to a multiple of 16 with zero weights by the packer.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "alloc.h"
#include "wgemm.h"

namespace pagoda_wgemm {
namespace {

// Block b's integers as fp32, (K, 16): the panel every row tile of the block then reads.
void widen_block(const Packed& w, int64_t b, float* panel) {
  const uint8_t* base = w.q + b * w.block_bytes();
#if defined(__AVX2__)
  // the direct path's widening (wgemm.h), stored: the same values either way
  Vec lo[kVecs], hi[kVecs];
  for (int64_t k = 0; k < w.k; k += w.bits == 4 ? 2 : 1) {
    float* out = panel + k * kOut;
    if (w.bits == 4) {
      widen_pair(base + k / 2 * kOut, lo, hi);
      for (int v = 0; v < kVecs; ++v) {
        vstore(out + v * kLanes, lo[v]);
        vstore(out + kOut + v * kLanes, hi[v]);
      }
    } else {
      widen_one(base + k * kOut, lo);
      for (int v = 0; v < kVecs; ++v) vstore(out + v * kLanes, lo[v]);
    }
  }
#else
  for (int64_t k = 0; k < w.k; ++k)
    for (int i = 0; i < kOut; ++i) {
      const uint8_t byte = base[(w.bits == 4 ? k / 2 : k) * kOut + i];
      panel[k * kOut + i] = static_cast<float>(
          w.bits == 4 ? ((k % 2) ? (byte >> 4) : (byte & 0x0F)) : static_cast<int8_t>(byte));
    }
#endif
}

// R rows x B blocks (b0, b0 + 1) over their panels. The group sums P are named variables, two
// per row, because GCC keeps an array of vectors indexed in loops on the stack and stores every
// accumulator on every k (0.6x the fp32 GEMM's speed); the running sums live in y itself (L1),
// read and written once per group, which leaves the registers to P and doubles the tile.
#define PAGODA_REPEAT12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#if defined(__AVX512F__)
constexpr int kRows = 12, kBlocks = 2;  // 24 of 32 zmm hold P
#elif defined(__AVX2__)
constexpr int kRows = 6, kBlocks = 1;  // 12 of 16 ymm hold P
#endif

#if defined(__AVX2__)
// Two vectors per row: AVX-512, one per block (B <= 2); AVX2, the two halves of one block.
template <int R, int B>
void tile(const Packed& w, int64_t b0, const float* panel, const Rows& rows, float* y,
          int64_t ldy) {
  static_assert(R <= kRows && B * kOut <= 2 * kLanes);
  constexpr bool two = B * kOut == 2 * kLanes;  // the second vector of each row is used
  const int64_t k = w.k, g = w.g;
  // where the second vector sits: in the panel (per k), in the scales, in y
  const int64_t pan1 = kLanes == kOut ? k * kOut : kLanes;
  const int64_t b1 = kLanes == kOut ? b0 + 1 : b0, lane1 = kLanes == kOut ? 0 : kLanes;
  const int64_t y1 = kLanes == kOut ? kOut : kLanes;
#define PAGODA_DECL(N) Vec p##N##0, p##N##1;
  PAGODA_REPEAT12(PAGODA_DECL)
#undef PAGODA_DECL
  for (int64_t t = 0; t < w.groups; ++t) {
#define PAGODA_ZERO(N) p##N##0 = vzero(); p##N##1 = vzero();
    PAGODA_REPEAT12(PAGODA_ZERO)
#undef PAGODA_ZERO
    for (int64_t kk = t * g; kk < (t + 1) * g; ++kk) {
      const Vec w0 = vload(panel + kk * kOut);
      const Vec w1 = two ? vload(panel + pan1 + kk * kOut) : w0;
#define PAGODA_FMA(N)                                       \
      if constexpr (R > N) {                                \
        const Vec xv = vbcast(rows.x + N * rows.ldx + kk);  \
        p##N##0 = vfma(xv, w0, p##N##0);                    \
        if constexpr (two) p##N##1 = vfma(xv, w1, p##N##1); \
      }
      PAGODA_REPEAT12(PAGODA_FMA)
#undef PAGODA_FMA
    }
    // acc = fma(s, P, acc) (acc = 0 before the first group), then fma(o, X, acc)
    const Vec s0 = vscales(w, b0, t), s1 = two ? vscales(w, b1, t, lane1) : s0;
    const bool off = w.o != nullptr;
    const Vec o0 = off ? voffsets(w, b0, t) : s0;
    const Vec o1 = off && two ? voffsets(w, b1, t, lane1) : o0;
#define PAGODA_EPILOGUE(N)                                                       \
    if constexpr (R > N) {                                                       \
      float* yr = y + N * ldy;                                                   \
      const Vec xs = off ? vbcast(rows.xs + N * rows.groups + t) : s0;           \
      Vec a0 = vfma(s0, p##N##0, t ? vload(yr) : vzero());                       \
      if (off) a0 = vfma(o0, xs, a0);                                            \
      vstore(yr, a0);                                                            \
      if constexpr (two) {                                                       \
        Vec a1 = vfma(s1, p##N##1, t ? vload(yr + y1) : vzero());                \
        if (off) a1 = vfma(o1, xs, a1);                                          \
        vstore(yr + y1, a1);                                                     \
      }                                                                          \
    }
    PAGODA_REPEAT12(PAGODA_EPILOGUE)
#undef PAGODA_EPILOGUE
  }
}
#else
template <int R, int B>
void tile(const Packed& w, int64_t b0, const float* panel, const Rows& rows, float* y,
          int64_t ldy) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < B; ++j)
      for (int i = 0; i < kOut; ++i) {
        float acc = 0.f;
        for (int64_t t = 0; t < w.groups; ++t) {
          float p = 0.f;
          for (int64_t kk = t * w.g; kk < (t + 1) * w.g; ++kk)
            p = std::fma(rows.x[r * rows.ldx + kk], panel[(j * w.k + kk) * kOut + i], p);
          acc = std::fma(w.scale(b0 + j, t, i), p, acc);
          if (w.o != nullptr)
            acc = std::fma(w.offset(b0 + j, t, i), rows.xs[r * rows.groups + t], acc);
        }
        y[r * ldy + j * kOut + i] = acc;
      }
}
constexpr int kRows = 4, kBlocks = 1;
#endif
#undef PAGODA_REPEAT12

// Rows [0, m) of B blocks: full tiles of kRows, then the rest one tile of its own size.
template <int B>
void panel_rows(const Packed& w, int64_t b0, const float* panel, Rows rows, int64_t m, float* y,
                int64_t ldy) {
  int64_t r = 0;
  for (; r + kRows <= m; r += kRows) {
    tile<kRows, B>(w, b0, panel, rows, y + r * ldy, ldy);
    rows.x += kRows * rows.ldx;
    if (rows.xs) rows.xs += kRows * rows.groups;
  }
  y += r * ldy;
  switch (m - r) {
#define PAGODA_CASE(n) case n: if constexpr (n < kRows) tile<n, B>(w, b0, panel, rows, y, ldy); break;
    PAGODA_CASE(1) PAGODA_CASE(2) PAGODA_CASE(3) PAGODA_CASE(4) PAGODA_CASE(5)
    PAGODA_CASE(6) PAGODA_CASE(7) PAGODA_CASE(8) PAGODA_CASE(9) PAGODA_CASE(10) PAGODA_CASE(11)
#undef PAGODA_CASE
    default: break;
  }
}

}  // namespace

Packed packed_operands(const char* name, at::Tensor& pq, at::Tensor& ps, at::Tensor& po,
                       int64_t n, int64_t k, int64_t group, int64_t bits) {
  const int64_t blocks = pq.size(0);
  TORCH_CHECK(n > 0 && n <= blocks * kOut, name, ": n exceeds the packed blocks");
  const bool half = ps.scalar_type() == at::kHalf;
  TORCH_CHECK((half || ps.scalar_type() == at::kFloat) &&
                  ps.numel() == blocks * (k / group) * kOut,
              name, ": packed scales must be (N/16, K/g, 16) fp32 or fp16");
  const bool has_o = po.numel() > 0;
  TORCH_CHECK(!has_o || (po.scalar_type() == ps.scalar_type() && po.numel() == ps.numel()),
              name, ": packed offsets must be shaped and typed like the scales");
  pq = pq.contiguous();
  ps = ps.contiguous();
  if (has_o) po = po.contiguous();
  return Packed{reinterpret_cast<const uint8_t*>(pq.data_ptr()), ps.data_ptr(),
                has_o ? po.data_ptr() : nullptr, half, blocks, k, group, bits, k / group};
}

}  // namespace pagoda_wgemm

using namespace pagoda_wgemm;

// x (M, K) fp32; pq/ps/po packed as above; n the true output count (<= 16 * blocks).
at::Tensor wgemm(at::Tensor x, at::Tensor pq, at::Tensor ps, at::Tensor po, int64_t n,
                 int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "wgemm: x must be a 2-D fp32 CPU tensor");
  TORCH_CHECK(bits == 4 || bits == 8, "wgemm: 4 or 8 bits");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(group > 0 && k % group == 0 && (bits == 8 || group % 2 == 0),
              "wgemm: the group must divide K (and be even for 4 bits)");
  TORCH_CHECK(pq.dim() == 3 && pq.size(2) == kOut &&
                  pq.size(1) == (bits == 4 ? k / 2 : k) && pq.element_size() == 1,
              "wgemm: packed weights must be (N/16, K/2 or K, 16) bytes");
  const Packed w = packed_operands("wgemm", pq, ps, po, n, k, group, bits);
  x = x.contiguous();
  const int64_t blocks = w.blocks, groups = w.groups;
  const bool has_o = w.o != nullptr;
  const int64_t padded = blocks * kOut;
  auto y = pagoda_alloc::empty({m, padded}, x.options());
  // the padding outputs dropped (a copy only when N is not a multiple of 16)
  const auto unpadded = [&] { return n == padded ? y : y.narrow(1, 0, n).contiguous(); };
  if (m == 0) return unpadded();
  const float* xp = x.data_ptr<float>();
  // X[r, t] (offsets only): plain sequential adds, the same in every flavour
  std::vector<float> xs(has_o ? static_cast<size_t>(m * groups) : 0);
  for (int64_t r = 0; has_o && r < m; ++r)
    for (int64_t t = 0; t < groups; ++t) {
      float sum = 0.f;
      for (int64_t kk = t * group; kk < (t + 1) * group; ++kk) sum += xp[r * k + kk];
      xs[r * groups + t] = sum;
    }
  const Rows rows{xp, k, has_o ? xs.data() : nullptr, groups};
  float* yp = y.data_ptr<float>();
  if (run_direct(w, m, rows, yp, padded)) return unpadded();
  const int64_t units = (blocks + kBlocks - 1) / kBlocks;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(static_cast<size_t>(kBlocks * k * kOut));
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b0 = u * kBlocks, nb = std::min<int64_t>(kBlocks, blocks - b0);
      for (int64_t j = 0; j < nb; ++j) widen_block(w, b0 + j, panel.data() + j * k * kOut);
      if (nb == kBlocks)
        panel_rows<kBlocks>(w, b0, panel.data(), rows, m, yp + b0 * kOut, padded);
      else
        panel_rows<1>(w, b0, panel.data(), rows, m, yp + b0 * kOut, padded);
    }
  });
  return unpadded();
}
