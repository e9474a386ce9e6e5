// wgemm: y = x @ w.T for fp32 activations x (M, K) and group-quantized weights w (N, K) stored as
// 4- or 8-bit integers, computed in fp32: the weights are widened in registers, the activations
// are never rounded (weight-only quantization, as GPU W4A16 kernels do it).
//
//     w[n, k] = fma(q[n, k], scales[n, k / g], offsets[n, k / g])     (offsets 0 when absent)
//     y[r, n] = fma(x[r, K-1], w[n, K-1], ... fma(x[r, 1], w[n, 1], x[r, 0] * w[n, 0]))
//
//   INVARIANT (batch invariance, and one result for every flavour): each output is one chain of
//   fused multiply-adds over k in increasing order, whatever M is, wherever row r sits, whichever
//   tile shape or ISA flavour computes it. Only independence between outputs is exploited, never
//   a reassociation within one: a token's output does not depend on its batch, and the generic,
//   avx2 and avx512 flavours return the same bits.
//
// Why this and not qgemm's int8 dot products: qgemm converts and scales every 32-element block
// of every (row, output) pair (4-5 vector operations per 32 products), which loses to an fp32
// GEMM once several rows share the weights (0.3-0.5x oneDNN's fp32 at 512 rows on an AVX2
// core). Here the widening is paid once per weight and shared by every row, the inner loop is
// the fp32 GEMM's (one broadcast fma per 8 or 16 products), and the bytes streamed are still 4
// or 8 bits per weight: at one row (decode) memory-bound like qgemm, at many rows compute-bound
// like fp32.
//
// Layout (packed once at load, pagoda.kernels.wgemm.pack): outputs in blocks of 16, each block's
// weights transposed so the 16 outputs of one k sit side by side.
//   4-bit: pq[b][p][i] = byte p of output row 16b + i (low nibble k = 2p, high nibble k = 2p + 1)
//   8-bit: pq[b][k][i] = q[16b + i][k] (int8)
//   ps[b][t][i] = scales[16b + i][t], po likewise (or empty)
// N is padded to a multiple of 16 with zero weights by the packer.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kOut = 16;  // outputs per packed block

struct Packed {
  const uint8_t* q;
  const float* s;
  const float* o;  // nullptr: no offsets
  int64_t blocks, k, g, bits, groups;
  int64_t block_bytes() const { return bits == 4 ? k / 2 * kOut : k * kOut; }
};

// The 16 fp32 weights of block b at position k (the scalar definition every flavour matches).
inline void weights_at(const Packed& w, int64_t b, int64_t k, float* out) {
  const uint8_t* base = w.q + b * w.block_bytes();
  const float* s = w.s + (b * w.groups + k / w.g) * kOut;
  const float* o = w.o ? w.o + (b * w.groups + k / w.g) * kOut : nullptr;
  for (int i = 0; i < kOut; ++i) {
    float q;
    if (w.bits == 4) {
      const uint8_t byte = base[(k / 2) * kOut + i];
      q = static_cast<float>((k % 2) ? (byte >> 4) : (byte & 0x0F));
    } else {
      q = static_cast<float>(static_cast<int8_t>(base[k * kOut + i]));
    }
    out[i] = std::fma(q, s[i], o ? o[i] : 0.f);
  }
}

// Block b's weights for all K, as fp32 (K, 16): the panel every row tile then reads.
void dequantize_block(const Packed& w, int64_t b, float* panel) {
#if defined(__AVX512F__)
  const uint8_t* base = w.q + b * w.block_bytes();
  for (int64_t t = 0; t < w.groups; ++t) {
    const __m512 s = _mm512_loadu_ps(w.s + (b * w.groups + t) * kOut);
    const __m512 o = w.o ? _mm512_loadu_ps(w.o + (b * w.groups + t) * kOut) : _mm512_setzero_ps();
    const int64_t k0 = t * w.g, k1 = k0 + w.g;
    if (w.bits == 4) {
      for (int64_t k = k0; k < k1; k += 2) {
        const __m512i v = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + (k / 2) * kOut)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        _mm512_storeu_ps(panel + k * kOut, _mm512_fmadd_ps(lo, s, o));
        _mm512_storeu_ps(panel + (k + 1) * kOut, _mm512_fmadd_ps(hi, s, o));
      }
    } else {
      for (int64_t k = k0; k < k1; ++k) {
        const __m512i v = _mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + k * kOut)));
        _mm512_storeu_ps(panel + k * kOut, _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), s, o));
      }
    }
  }
#elif defined(__AVX2__)
  const uint8_t* base = w.q + b * w.block_bytes();
  for (int64_t t = 0; t < w.groups; ++t) {
    const float* sp = w.s + (b * w.groups + t) * kOut;
    const float* op = w.o ? w.o + (b * w.groups + t) * kOut : nullptr;
    const __m256 s0 = _mm256_loadu_ps(sp), s1 = _mm256_loadu_ps(sp + 8);
    const __m256 o0 = op ? _mm256_loadu_ps(op) : _mm256_setzero_ps();
    const __m256 o1 = op ? _mm256_loadu_ps(op + 8) : _mm256_setzero_ps();
    const int64_t k0 = t * w.g, k1 = k0 + w.g;
    if (w.bits == 4) {
      const __m256i mask = _mm256_set1_epi32(0x0F);
      for (int64_t k = k0; k < k1; k += 2) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + (k / 2) * kOut));
        const __m256i v0 = _mm256_cvtepu8_epi32(bytes);
        const __m256i v1 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
        float* p = panel + k * kOut;
        _mm256_storeu_ps(p, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, mask)), s0, o0));
        _mm256_storeu_ps(p + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, mask)), s1, o1));
        _mm256_storeu_ps(p + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), s0, o0));
        _mm256_storeu_ps(p + 24, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), s1, o1));
      }
    } else {
      for (int64_t k = k0; k < k1; ++k) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + k * kOut));
        float* p = panel + k * kOut;
        _mm256_storeu_ps(p, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), s0, o0));
        _mm256_storeu_ps(p + 8, _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8))), s1, o1));
      }
    }
  }
#else
  for (int64_t k = 0; k < w.k; ++k) weights_at(w, b, k, panel + k * kOut);
#endif
}

// R rows x (B blocks of 16 outputs) from B consecutive panels laid out (K, 16) each. The
// accumulators are named variables, two per row (AVX2: the two halves of one block; AVX-512: one
// per block), because GCC keeps an array of vectors indexed in loops on the stack and stores
// every accumulator on every k (store-bound: 0.6x the fp32 GEMM's speed).
#define PAGODA_REPEAT12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#if defined(__AVX512F__)
template <int R, int B>
void tile(const float* x, int64_t ldx, const float* panel, int64_t k, float* y, int64_t ldy) {
  static_assert(R <= 12 && B <= 2);
#define PAGODA_DECL(N) __m512 a##N##0 = _mm512_setzero_ps(), a##N##1 = _mm512_setzero_ps();
  PAGODA_REPEAT12(PAGODA_DECL)
#undef PAGODA_DECL
  const float* w1p = panel + (B > 1 ? k * kOut : 0);
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m512 w0 = _mm512_loadu_ps(panel + kk * kOut);
    const __m512 w1 = B > 1 ? _mm512_loadu_ps(w1p + kk * kOut) : w0;
#define PAGODA_FMA(N)                                               \
    if constexpr (R > N) {                                          \
      const __m512 xv = _mm512_set1_ps(x[N * ldx + kk]);            \
      a##N##0 = _mm512_fmadd_ps(xv, w0, a##N##0);                   \
      if constexpr (B > 1) a##N##1 = _mm512_fmadd_ps(xv, w1, a##N##1); \
    }
    PAGODA_REPEAT12(PAGODA_FMA)
#undef PAGODA_FMA
  }
#define PAGODA_STORE(N)                                                     \
  if constexpr (R > N) {                                                    \
    _mm512_storeu_ps(y + N * ldy, a##N##0);                                 \
    if constexpr (B > 1) _mm512_storeu_ps(y + N * ldy + kOut, a##N##1);     \
  }
  PAGODA_REPEAT12(PAGODA_STORE)
#undef PAGODA_STORE
}
constexpr int kRows = 12, kBlocks = 2;  // 24 accumulators of 32 zmm
#elif defined(__AVX2__)
template <int R, int B>
void tile(const float* x, int64_t ldx, const float* panel, int64_t k, float* y, int64_t ldy) {
  static_assert(R <= 6 && B == 1);
#define PAGODA_DECL(N) __m256 a##N##0 = _mm256_setzero_ps(), a##N##1 = _mm256_setzero_ps();
  PAGODA_REPEAT12(PAGODA_DECL)
#undef PAGODA_DECL
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m256 w0 = _mm256_loadu_ps(panel + kk * kOut);
    const __m256 w1 = _mm256_loadu_ps(panel + kk * kOut + 8);
#define PAGODA_FMA(N)                                               \
    if constexpr (R > N) {                                          \
      const __m256 xv = _mm256_broadcast_ss(x + N * ldx + kk);      \
      a##N##0 = _mm256_fmadd_ps(xv, w0, a##N##0);                   \
      a##N##1 = _mm256_fmadd_ps(xv, w1, a##N##1);                   \
    }
    PAGODA_REPEAT12(PAGODA_FMA)
#undef PAGODA_FMA
  }
#define PAGODA_STORE(N)                                 \
  if constexpr (R > N) {                                \
    _mm256_storeu_ps(y + N * ldy, a##N##0);             \
    _mm256_storeu_ps(y + N * ldy + 8, a##N##1);         \
  }
  PAGODA_REPEAT12(PAGODA_STORE)
#undef PAGODA_STORE
}
constexpr int kRows = 6, kBlocks = 1;  // 12 accumulators of 16 ymm
#else
template <int R, int B>
void tile(const float* x, int64_t ldx, const float* panel, int64_t k, float* y, int64_t ldy) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < B; ++j)
      for (int i = 0; i < kOut; ++i) {
        float acc = 0.f;
        for (int64_t kk = 0; kk < k; ++kk)
          acc = std::fma(x[r * ldx + kk], panel[(j * k + kk) * kOut + i], acc);
        y[r * ldy + j * kOut + i] = acc;
      }
}
constexpr int kRows = 4, kBlocks = 1;
#endif
#undef PAGODA_REPEAT12

// Few rows (decode): no panel. D consecutive blocks are widened in registers, pair of k by pair
// of k, and used at once by R <= kDirectRows rows: D * R independent chains hide the fma latency
// (one block at one row would wait on its own chain), and no weight is stored and reloaded.
// The weights and chains are those of the panel path, so the results are the same bits.
#if defined(__AVX512F__)
constexpr int kDirectRows = 4, kDirectBlocks = 4;
template <int BITS, int R>
void direct(const Packed& w, int64_t b0, const float* x, int64_t ldx, float* y, int64_t ldy) {
  constexpr int D = kDirectBlocks;
  __m512 acc[R][D];  // indexed by constants only after unrolling (checked: no stack traffic)
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < D; ++j) acc[r][j] = _mm512_setzero_ps();
  const uint8_t* base = w.q + b0 * w.block_bytes();
  constexpr int64_t step = BITS == 4 ? 2 : 1;  // k per stored byte
  for (int64_t t = 0; t < w.groups; ++t) {
    for (int64_t k = t * w.g; k < (t + 1) * w.g; k += step) {
#pragma GCC unroll 4
      for (int j = 0; j < D; ++j) {
        const float* sp = w.s + ((b0 + j) * w.groups + t) * kOut;
        const __m512 s = _mm512_loadu_ps(sp);
        const __m512 o = w.o ? _mm512_loadu_ps(w.o + ((b0 + j) * w.groups + t) * kOut)
                             : _mm512_setzero_ps();
        const uint8_t* src = base + j * w.block_bytes() + (k / step) * kOut;
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
        if constexpr (BITS == 4) {
          const __m512i v = _mm512_cvtepu8_epi32(bytes);
          const __m512 lo = _mm512_fmadd_ps(
              _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F))), s, o);
          const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), s, o);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            acc[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), lo, acc[r][j]);
            acc[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k + 1]), hi, acc[r][j]);
          }
        } else {
          const __m512 wv = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), s, o);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r)
            acc[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), wv, acc[r][j]);
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < D; ++j) _mm512_storeu_ps(y + r * ldy + j * kOut, acc[r][j]);
}
#elif defined(__AVX2__)
constexpr int kDirectRows = 2, kDirectBlocks = 2;
template <int BITS, int R>
void direct(const Packed& w, int64_t b0, const float* x, int64_t ldx, float* y, int64_t ldy) {
  constexpr int D = kDirectBlocks;
  __m256 acc[R][2 * D];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 2 * D; ++j) acc[r][j] = _mm256_setzero_ps();
  const uint8_t* base = w.q + b0 * w.block_bytes();
  constexpr int64_t step = BITS == 4 ? 2 : 1;  // k per stored byte
  const __m256i mask = _mm256_set1_epi32(0x0F);
  for (int64_t t = 0; t < w.groups; ++t) {
    for (int64_t k = t * w.g; k < (t + 1) * w.g; k += step) {
#pragma GCC unroll 4
      for (int j = 0; j < D; ++j) {
        const float* sp = w.s + ((b0 + j) * w.groups + t) * kOut;
        const float* op = w.o ? w.o + ((b0 + j) * w.groups + t) * kOut : nullptr;
        const __m256 s0 = _mm256_loadu_ps(sp), s1 = _mm256_loadu_ps(sp + 8);
        const __m256 o0 = op ? _mm256_loadu_ps(op) : _mm256_setzero_ps();
        const __m256 o1 = op ? _mm256_loadu_ps(op + 8) : _mm256_setzero_ps();
        const uint8_t* src = base + j * w.block_bytes() + (k / step) * kOut;
        // two 8-byte loads widened straight from memory (no shuffle for the upper half)
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
        const __m128i bytes_hi = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 8));
        if constexpr (BITS == 4) {
          const __m256i v0 = _mm256_cvtepu8_epi32(bytes);
          const __m256i v1 = _mm256_cvtepu8_epi32(bytes_hi);
          const __m256 l0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, mask)), s0, o0);
          const __m256 l1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, mask)), s1, o1);
          const __m256 h0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), s0, o0);
          const __m256 h1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), s1, o1);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const __m256 xa = _mm256_broadcast_ss(x + r * ldx + k);
            const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k + 1);
            acc[r][2 * j] = _mm256_fmadd_ps(xb, h0, _mm256_fmadd_ps(xa, l0, acc[r][2 * j]));
            acc[r][2 * j + 1] = _mm256_fmadd_ps(xb, h1, _mm256_fmadd_ps(xa, l1, acc[r][2 * j + 1]));
          }
        } else {
          const __m256 w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), s0, o0);
          const __m256 w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes_hi)), s1, o1);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const __m256 xa = _mm256_broadcast_ss(x + r * ldx + k);
            acc[r][2 * j] = _mm256_fmadd_ps(xa, w0, acc[r][2 * j]);
            acc[r][2 * j + 1] = _mm256_fmadd_ps(xa, w1, acc[r][2 * j + 1]);
          }
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 2 * D; ++j) _mm256_storeu_ps(y + r * ldy + j * 8, acc[r][j]);
}
#else
constexpr int kDirectRows = 0, kDirectBlocks = 1;
template <int BITS, int R>
void direct(const Packed&, int64_t, const float*, int64_t, float*, int64_t) {}
#endif

template <int BITS>
void direct_rows(const Packed& w, int64_t m, int64_t b0, const float* x, int64_t ldx, float* y,
                 int64_t ldy) {
  switch (m) {
    case 1: direct<BITS, 1>(w, b0, x, ldx, y, ldy); break;
    case 2: direct<BITS, 2>(w, b0, x, ldx, y, ldy); break;
    case 3: if constexpr (kDirectRows >= 3) direct<BITS, 3>(w, b0, x, ldx, y, ldy); break;
    default: if constexpr (kDirectRows >= 4) direct<BITS, 4>(w, b0, x, ldx, y, ldy); break;
  }
}

// Rows [0, m) of B blocks: full tiles of kRows, then the rest one tile of its own size.
template <int B>
void rows(const float* x, int64_t m, int64_t k, const float* panel, float* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + kRows <= m; r += kRows) tile<kRows, B>(x + r * k, k, panel, k, y + r * ldy, ldy);
  const int64_t rest = m - r;
  if (rest == 0) return;
  x += r * k;
  y += r * ldy;
  // A switch over the remainders the widest tile can leave (at most 11).
  switch (rest) {
#define PAGODA_WGEMM_CASE(n) case n: if constexpr (n < kRows) tile<n, B>(x, k, panel, k, y, ldy); break;
    PAGODA_WGEMM_CASE(1) PAGODA_WGEMM_CASE(2) PAGODA_WGEMM_CASE(3) PAGODA_WGEMM_CASE(4)
    PAGODA_WGEMM_CASE(5) PAGODA_WGEMM_CASE(6) PAGODA_WGEMM_CASE(7) PAGODA_WGEMM_CASE(8)
    PAGODA_WGEMM_CASE(9) PAGODA_WGEMM_CASE(10) PAGODA_WGEMM_CASE(11)
#undef PAGODA_WGEMM_CASE
    default: break;
  }
}

}  // namespace

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
  const int64_t blocks = pq.size(0);
  TORCH_CHECK(n > 0 && n <= blocks * kOut, "wgemm: n exceeds the packed blocks");
  TORCH_CHECK(ps.scalar_type() == at::kFloat && ps.numel() == blocks * (k / group) * kOut,
              "wgemm: packed scales must be (N/16, K/g, 16) fp32");
  const bool has_o = po.numel() > 0;
  TORCH_CHECK(!has_o || (po.scalar_type() == at::kFloat && po.numel() == ps.numel()),
              "wgemm: packed offsets must be shaped like the scales");
  x = x.contiguous();
  pq = pq.contiguous();
  ps = ps.contiguous();
  if (has_o) po = po.contiguous();
  Packed w{reinterpret_cast<const uint8_t*>(pq.data_ptr()), ps.data_ptr<float>(),
           has_o ? po.data_ptr<float>() : nullptr, blocks, k, group, bits, k / group};
  const int64_t padded = blocks * kOut;
  auto y = at::empty({m, padded}, x.options());
  if (m == 0) return y.narrow(1, 0, n);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (m <= kDirectRows && blocks % kDirectBlocks == 0) {
    at::parallel_for(0, blocks / kDirectBlocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        float* yu = yp + u * kDirectBlocks * kOut;
        if (bits == 4)
          direct_rows<4>(w, m, u * kDirectBlocks, xp, k, yu, padded);
        else
          direct_rows<8>(w, m, u * kDirectBlocks, xp, k, yu, padded);
      }
    });
    return n == padded ? y : y.narrow(1, 0, n).contiguous();
  }
  const int64_t units = (blocks + kBlocks - 1) / kBlocks;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(static_cast<size_t>(kBlocks * k * kOut));
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b0 = u * kBlocks, nb = std::min<int64_t>(kBlocks, blocks - b0);
      for (int64_t j = 0; j < nb; ++j) dequantize_block(w, b0 + j, panel.data() + j * k * kOut);
      if (nb == kBlocks)
        rows<kBlocks>(xp, m, k, panel.data(), yp + b0 * kOut, padded);
      else
        rows<1>(xp, m, k, panel.data(), yp + b0 * kOut, padded);
    }
  });
  return n == padded ? y : y.narrow(1, 0, n).contiguous();
}
