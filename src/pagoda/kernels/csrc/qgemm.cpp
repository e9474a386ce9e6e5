// qgemm: y = x @ w.T for fp32 activations x (M, K) and group-quantized weights w (N, K), the one
// product every quantized Linear runs on the CPU, for every row count (decode and prefill alike).
//
//     w[n, k] = scales[n, k / g] * q[n, k] + offsets[n, k / g]      (offsets optional)
//
// q is 4-bit unsigned (0..15, element 2i in the low nibble of byte i) or 8-bit signed (-128..127).
// Per-channel int8 is the case g = K. Activations are rounded like llama.cpp's Q8_0: each row is
// cut into blocks of 32, and each block gets its own scale d = max|x| / 127 and int8 values.
// A block's outliers therefore only coarsen that block, which is why no outlier-column split is
// needed, and the rounding of a row never depends on the other rows of the call:
//
//   INVARIANT (batch invariance): y[r, n] is computed by the same operations in the same order
//   whatever M is and wherever row r sits in x, so a token's output does not depend on its batch.
//
// Exactness of the integer part (no saturation anywhere):
// - 8-bit weights: vpmaddubsw multiplies unsigned by signed bytes and sums pairs into int16 with
//   saturation. It gets |w| (0..128, unsigned) and sign(x, w) (-127..127), so a pair sums to at
//   most 2 * 128 * 127 = 32512 < 32767. (fbgemm feeds it u8 activations 0..255 and can saturate.)
// - 4-bit weights: unsigned 0..15 times x in -127..127: at most 2 * 15 * 127 per pair.
// - With AVX512-VNNI, vpdpbusd sums four products straight into int32 (same operands).
// Per 32-block, the eight int32 lanes are converted to fp32 and multiplied by the block's
// activation scale times the lanes' weight-group scale, accumulated in eight fp32 lanes. The
// avx512 flavour takes four blocks per step: their 16-element halves are regrouped so that two
// vpdpbusd put 8 products of one block into each of sixteen int32 lanes (one conversion for four
// blocks), and the blocks left over take pairs and a single block in the same lanes.
//
// 4-bit blocks are read in place: 16 bytes give the 16 even elements (low nibbles) and the 16 odd
// ones (high nibbles); the activations are laid out per block as [evens | odds] to match, so no
// weight shuffle is needed. Lanes 0-3 then cover the evens and 4-7 the odds, i.e. every element
// of the block: 4-bit groups must be multiples of 32. 8-bit blocks keep the natural order, lanes
// 0-3 covering elements 0-15 and 4-7 elements 16-31, so 8-bit groups of 16 (Q6_K) work too.
// The offset term sum_g offsets[n, g] * sum(x over group g) uses exact fp32 sums of x.
//
// Built once per ISA flavour (pagoda.kernels.build): generic (portable C++), avx2 (AVX2+FMA),
// avx512 (AVX512-VNNI/BW/VL). Each flavour computes the same integer dot products; fp32
// accumulation order differs between flavours, never within one.

// ATen headers only (not torch/extension.h): this file then compiles in seconds; the
// Python bindings live in bindings.cpp.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "alloc.h"
#include "q8_block.h"

namespace {

constexpr int64_t kBlock = 32;

struct Weights {
  const uint8_t* q;        // (N, row_bytes)
  const float* scales;     // (N, K / g)
  const float* offsets;    // (N, K / g) or nullptr
  int64_t n, k, g, bits, row_bytes, groups;
  const int32_t* group_of;  // (K / 32): block -> its weight group (g >= 32; no divisions inside)
};

struct Acts {
  std::vector<int8_t> q;   // (M, K): blocks in natural order (8-bit) or [evens | odds] (4-bit)
  std::vector<float> d;    // (M, K / 32) block scales
  std::vector<float> sum;  // (M, K / g) exact group sums of x, when the weights have offsets
};

// Round-half-even like torch.round: nearbyint under the default rounding mode.
void quantize_acts(const float* x, int64_t m, int64_t k, const Weights& w, Acts& a) {
  const int64_t nb = k / kBlock;
  a.q.resize(m * k);
  a.d.resize(m * nb);
  if (w.offsets != nullptr) a.sum.resize(m * w.groups);
  at::parallel_for(0, m, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * k;
      for (int64_t b = 0; b < nb; ++b) {
        // 4-bit: the block laid out as [evens | odds] (see the top)
        a.d[r * nb + b] = pagoda_q8::round_block(
            xr + b * kBlock, a.q.data() + r * k + b * kBlock,
            [&](int j) { return w.bits == 4 ? (j % 2) * 16 + j / 2 : j; });
      }
      if (w.offsets != nullptr)
        for (int64_t t = 0; t < w.groups; ++t) {
          float s = 0.f;
          for (int64_t j = 0; j < w.g; ++j) s += xr[t * w.g + j];
          a.sum[r * w.groups + t] = s;
        }
    }
  });
}

#if defined(__AVX2__)

// Eight int32 lanes of one 32-block's dot product; lanes 0-3 hold the first 16 positions.
template <int BITS>
inline __m256i block_dot(__m256i wv, __m256i xv) {
  __m256i a, b;
  if constexpr (BITS == 4) {
    a = wv;  // unsigned 0..15
    b = xv;
  } else {
    a = _mm256_abs_epi8(wv);  // -128 -> 0x80, read as unsigned 128
    b = _mm256_sign_epi8(xv, wv);
  }
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

template <int BITS>
inline __m256i load_block(const uint8_t* row, int64_t b) {
  if constexpr (BITS == 4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    return _mm256_set_m128i(hi, lo);
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}


#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define PAGODA_QGEMM_512 1
constexpr int kRowsPerPass = 4;  // output rows sharing each activation load (zmm registers)

// Lanes 4j..4j+3 <- v[j]: the layout of a quad's dot products (see quad_halves).
inline __m512 spread4(__m128 v) {
  const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v));
}

// Blocks b..b+3 of 128 bytes (two 64-byte vectors) regrouped as the 16-byte first halves of the
// four blocks and their second halves: one int32 lane of dpbusd(first) + dpbusd(second) then
// holds 8 elements of one block, so a quad needs one int -> float conversion, not two.
inline void quad_halves(__m512i v01, __m512i v23, __m512i& first, __m512i& second) {
  first = _mm512_shuffle_i64x2(v01, v23, _MM_SHUFFLE(2, 0, 2, 0));
  second = _mm512_shuffle_i64x2(v01, v23, _MM_SHUFFLE(3, 1, 3, 1));
}

template <int BITS>
inline void load_quad(const uint8_t* row, int64_t b, __m512i& first, __m512i& second) {
  if constexpr (BITS == 4) {  // 64 bytes: block j's low nibbles are its evens, high its odds
    const __m512i bytes = _mm512_loadu_si512(row + b * 16);
    const __m512i mask = _mm512_set1_epi8(0x0F);
    first = _mm512_and_si512(bytes, mask);
    second = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), mask);
  } else {
    quad_halves(_mm512_loadu_si512(row + b * kBlock), _mm512_loadu_si512(row + b * kBlock + 64),
                first, second);
  }
}

template <int BITS>
inline __m512i dot_acc(__m512i acc, __m512i wv, __m512i xv) {
  if constexpr (BITS == 4) {
    return _mm512_dpbusd_epi32(acc, wv, xv);
  } else {
    const __m512i sx = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv),
                                            _mm512_setzero_si512(), xv);
    return _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(wv), sx);
  }
}

// One step covers STEP blocks: 4 (a quad), 2 (a pair: lanes 0-7 block b, 8-15 block b+1) or 1
// (lanes 8-15 zero). The main loop takes quads, except for 8-bit groups of 16 (whose 16-element
// halves lie in different groups), which take pairs; the last blocks take pairs and a single.
// Every step adds into the same sixteen fp32 lanes, in an order fixed by K alone.
template <int BITS, int STEP, int NB, int R>
inline void step(const Weights& w, const Acts& a, int64_t n0, int64_t r0, int64_t b,
                 __m512 (&acc)[NB][R]) {
  const int64_t nb = w.k / kBlock;
  __m512i x1[R], x2[R];
  __m512 xd[R];
  for (int r = 0; r < R; ++r) {
    const int8_t* xq = a.q.data() + (r0 + r) * w.k + b * kBlock;
    const float* d = a.d.data() + (r0 + r) * nb + b;
    if constexpr (STEP == 4) {
      quad_halves(_mm512_loadu_si512(xq), _mm512_loadu_si512(xq + 64), x1[r], x2[r]);
      xd[r] = spread4(_mm_loadu_ps(d));
    } else if constexpr (STEP == 2) {
      x1[r] = _mm512_loadu_si512(xq);
      xd[r] = _mm512_insertf32x8(_mm512_set1_ps(d[0]), _mm256_set1_ps(d[1]), 1);
    } else {
      x1[r] = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
      xd[r] = _mm512_set1_ps(d[0]);
    }
  }
  for (int i = 0; i < NB; ++i) {
    const int64_t n = n0 + i;
    const uint8_t* row = w.q + n * w.row_bytes;
    const float* sc = w.scales + n * w.groups;
    const bool g16 = w.g == 16;
    __m512i w1, w2;
    __m512 ws;
    if constexpr (STEP == 4) {
      load_quad<BITS>(row, b, w1, w2);
      const int32_t* gi = w.group_of + b;
      ws = spread4(_mm_set_ps(sc[gi[3]], sc[gi[2]], sc[gi[1]], sc[gi[0]]));
    } else if constexpr (STEP == 2) {
      w1 = _mm512_inserti64x4(_mm512_castsi256_si512(load_block<BITS>(row, b)),
                              load_block<BITS>(row, b + 1), 1);
      ws = g16 ? spread4(_mm_loadu_ps(sc + 2 * b))
               : _mm512_insertf32x8(_mm512_set1_ps(sc[w.group_of[b]]),
                                    _mm256_set1_ps(sc[w.group_of[b + 1]]), 1);
    } else {
      w1 = _mm512_zextsi256_si512(load_block<BITS>(row, b));
      ws = g16 ? spread4(_mm_set_ps(0.f, 0.f, sc[2 * b + 1], sc[2 * b]))
               : _mm512_set1_ps(sc[w.group_of[b]]);
    }
    for (int r = 0; r < R; ++r) {
      __m512i dot = dot_acc<BITS>(_mm512_setzero_si512(), w1, x1[r]);
      if constexpr (STEP == 4) dot = dot_acc<BITS>(dot, w2, x2[r]);
      acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, xd[r]), acc[i][r]);
    }
  }
}

template <int BITS, int NB, int R>
void tile(const Weights& w, const Acts& a, int64_t n0, int64_t r0, float* y, int64_t ldy) {
  const int64_t nb = w.k / kBlock;
  __m512 acc[NB][R];
  for (int i = 0; i < NB; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
  int64_t b = 0;
  if (w.g != 16)
    for (; b + 4 <= nb; b += 4) step<BITS, 4, NB, R>(w, a, n0, r0, b, acc);
  for (; b + 2 <= nb; b += 2) step<BITS, 2, NB, R>(w, a, n0, r0, b, acc);
  if (b < nb) step<BITS, 1, NB, R>(w, a, n0, r0, b, acc);
  for (int i = 0; i < NB; ++i)
    for (int r = 0; r < R; ++r) y[(r0 + r) * ldy + n0 + i] = _mm512_reduce_add_ps(acc[i][r]);
}

#elif defined(__AVX2__)
constexpr int kRowsPerPass = 2;  // 16 ymm registers: 2 x 4 accumulators

// NB output rows x R activation rows: NB * R independent accumulator chains.
template <int BITS, int NB, int R>
void tile(const Weights& w, const Acts& a, int64_t n0, int64_t r0, float* y, int64_t ldy) {
  const int64_t nb = w.k / kBlock;
  __m256 acc[NB][R];
  for (int i = 0; i < NB; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
  const bool g16 = w.g == 16;
  for (int64_t b = 0; b < nb; ++b) {
    __m256i xv[R];
    __m256 xd[R];
    for (int r = 0; r < R; ++r) {
      xv[r] = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(a.q.data() + (r0 + r) * w.k + b * kBlock));
      xd[r] = _mm256_set1_ps(a.d[(r0 + r) * nb + b]);
    }
    for (int i = 0; i < NB; ++i) {
      const int64_t n = n0 + i;
      const __m256i wv = load_block<BITS>(w.q + n * w.row_bytes, b);
      const float* sc = w.scales + n * w.groups;
      const __m256 ws = g16 ? _mm256_set_m128(_mm_set1_ps(sc[2 * b + 1]), _mm_set1_ps(sc[2 * b]))
                            : _mm256_set1_ps(sc[w.group_of[b]]);
      for (int r = 0; r < R; ++r) {
        const __m256 dot = _mm256_cvtepi32_ps(block_dot<BITS>(wv, xv[r]));
        acc[i][r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(ws, xd[r]), acc[i][r]);
      }
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int r = 0; r < R; ++r) y[(r0 + r) * ldy + n0 + i] = hsum(acc[i][r]);
}

#endif  // tile flavours

#else  // portable flavour: the same integer dots, fp32 accumulation per block
constexpr int kRowsPerPass = 2;

template <int BITS, int NB, int R>
void tile(const Weights& w, const Acts& a, int64_t n0, int64_t r0, float* y, int64_t ldy) {
  const int64_t nb = w.k / kBlock;
  for (int i = 0; i < NB; ++i) {
    const int64_t n = n0 + i;
    const uint8_t* row = w.q + n * w.row_bytes;
    for (int r = 0; r < R; ++r) {
      const int8_t* xq = a.q.data() + (r0 + r) * w.k;
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t lo = 0, hi = 0;  // positions 0-15 and 16-31 of the block
        for (int j = 0; j < kBlock; ++j) {
          int32_t wq;
          if (BITS == 4) {
            const uint8_t byte = row[b * 16 + (j % 16)];
            wq = j < 16 ? (byte & 0x0F) : (byte >> 4);
          } else {
            wq = static_cast<int8_t>(row[b * kBlock + j]);
          }
          (j < 16 ? lo : hi) += wq * xq[b * kBlock + j];
        }
        const float* sc = w.scales + n * w.groups;
        const float s_lo = w.g == 16 ? sc[2 * b] : sc[w.group_of[b]];
        const float s_hi = w.g == 16 ? sc[2 * b + 1] : s_lo;
        const float xd = a.d[(r0 + r) * nb + b];
        acc += static_cast<float>(lo) * (s_lo * xd) + static_cast<float>(hi) * (s_hi * xd);
      }
      y[(r0 + r) * ldy + n] = acc;
    }
  }
}

#endif

// sum_t o[t] * s[t] in lanes (a fixed order for a given G): a scalar chain of dependent adds
// cost more than the whole 4-bit product at 64 rows.
inline float offset_dot(const float* o, const float* s, int64_t groups) {
#if defined(PAGODA_QGEMM_512)
  __m512 acc = _mm512_setzero_ps();
  for (int64_t t = 0; t < groups; t += 16) {
    const __mmask16 mk = static_cast<__mmask16>((1u << std::min<int64_t>(16, groups - t)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, o + t), _mm512_maskz_loadu_ps(mk, s + t), acc);
  }
  return _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= groups; t += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(o + t), _mm256_loadu_ps(s + t), acc);
  float v = hsum(acc);
  for (; t < groups; ++t) v += o[t] * s[t];
  return v;
#else
  float lanes[8] = {};
  for (int64_t t = 0; t < groups; ++t) lanes[t % 8] += o[t] * s[t];
  float v = 0.f;
  for (float l : lanes) v += l;
  return v;
#endif
}

template <int BITS, int NB>
void rows_of(const Weights& w, const Acts& a, int64_t n0, int64_t m, float* y) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) tile<BITS, NB, 4>(w, a, n0, r, y, w.n);
  switch (m - r) {
    case 3: tile<BITS, NB, 3>(w, a, n0, r, y, w.n); break;
    case 2: tile<BITS, NB, 2>(w, a, n0, r, y, w.n); break;
    case 1: tile<BITS, NB, 1>(w, a, n0, r, y, w.n); break;
    default: break;
  }
}

template <int BITS>
void run(const Weights& w, const Acts& a, int64_t m, float* y) {
  // Tiles of 16 output rows: their weights (16 * K bytes at most) stay in cache while every
  // group of four activation rows passes over them. The offset term is added per tile, in the
  // same parallel region: a second region cost a fork/join per call, ~5% of a decode step.
  constexpr int64_t kTile = 16;
  at::parallel_for(0, (w.n + kTile - 1) / kTile, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t lo = t * kTile, hi = std::min(w.n, lo + kTile);
      int64_t n = lo;
      for (; n + kRowsPerPass <= hi; n += kRowsPerPass) rows_of<BITS, kRowsPerPass>(w, a, n, m, y);
      for (; n < hi; ++n) rows_of<BITS, 1>(w, a, n, m, y);
      if (w.offsets == nullptr) continue;
      for (int64_t r = 0; r < m; ++r)
        for (n = lo; n < hi; ++n)
          y[r * w.n + n] += offset_dot(w.offsets + n * w.groups, a.sum.data() + r * w.groups,
                                       w.groups);
    }
  });
}

}  // namespace

bool shape_supported(int64_t k, int64_t g, int64_t bits) {
  if (k <= 0 || k % kBlock != 0 || g <= 0 || k % g != 0) return false;
  if (bits == 4) return g % kBlock == 0;
  return bits == 8 && (g == 16 || g % kBlock == 0);
}

// x (M, K) fp32; q (N, K/2) uint8 or (N, K) int8; scales (N, K/g) fp32; offsets like scales or
// empty. Returns (M, N) fp32.
at::Tensor qgemm(at::Tensor x, at::Tensor q, at::Tensor scales, at::Tensor offsets,
                    int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "qgemm: x must be a 2-D fp32 CPU tensor");
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0);
  TORCH_CHECK(bits == 4 || bits == 8, "qgemm: 4 or 8 bits");
  TORCH_CHECK(shape_supported(k, group, bits),
              "qgemm: K must be a multiple of 32 and the group a multiple of 32 dividing K "
              "(8-bit weights also take groups of 16)");
  TORCH_CHECK(q.dim() == 2 && q.device().is_cpu() && q.size(1) == (bits == 4 ? k / 2 : k) &&
                  q.scalar_type() == (bits == 4 ? at::kByte : at::kChar),
              "qgemm: q must be (N, K/2) uint8 for 4 bits or (N, K) int8 for 8 bits");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 2 &&
                  scales.size(0) == n && scales.size(1) == k / group,
              "qgemm: scales must be (N, K/g) fp32");
  const bool has_offsets = offsets.numel() > 0;
  TORCH_CHECK(!has_offsets || (offsets.scalar_type() == at::kFloat &&
                               offsets.sizes() == scales.sizes()),
              "qgemm: offsets must be fp32 shaped like scales");
  x = x.contiguous();
  q = q.contiguous();
  scales = scales.contiguous();
  if (has_offsets) offsets = offsets.contiguous();
  std::vector<int32_t> group_of(k / kBlock);
  for (int64_t b = 0; b < k / kBlock; ++b) group_of[b] = static_cast<int32_t>(b * kBlock / group);
  Weights w{reinterpret_cast<const uint8_t*>(q.data_ptr()), scales.data_ptr<float>(),
            has_offsets ? offsets.data_ptr<float>() : nullptr, n, k, group, bits,
            q.size(1), k / group, group_of.data()};
  auto y = pagoda_alloc::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  Acts a;
  quantize_acts(x.data_ptr<float>(), m, k, w, a);
  if (bits == 4)
    run<4>(w, a, m, y.data_ptr<float>());
  else
    run<8>(w, a, m, y.data_ptr<float>());
  return y;
}

// The activation rounding alone, in natural order: (int8 values (M, K), block scales (M, K/32)).
std::vector<at::Tensor> quantize_blocks(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % kBlock == 0,
              "quantize_blocks: x must be (M, K) fp32 with K a multiple of 32");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  Weights w{nullptr, nullptr, nullptr, 0, k, k, 8, k, 1, nullptr};
  Acts a;
  quantize_acts(x.data_ptr<float>(), m, k, w, a);
  auto q = pagoda_alloc::copy_of(a.q.data(), {m, k}, at::kChar);
  auto d = pagoda_alloc::copy_of(a.d.data(), {m, k / kBlock}, at::kFloat);
  return {q, d};
}

std::string flavour() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}
