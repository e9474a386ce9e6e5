// Shared by wgemm.cpp (the entry point, the panel path) and wgemm_direct.cpp (the direct path
// of a few rows): the packed operands, the rows of a call, the flavour's vector type and its
// widening of the stored integers. Every translation unit of a flavour is compiled with that
// flavour's flags (kernels/build.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace pagoda_wgemm {

constexpr int64_t kOut = 16;  // outputs per packed block

// Asks for the weight line 2 KiB past `p` (32 of igemm's octets, 64 of igemm8's pairs, 128 of
// wgemm's stored rows ahead): the hardware prefetcher alone left a batch-1 decode short of the
// weight stream's speed. The 120 4-bit linears of SmolLM2 (GGUF Q4_1, igemm), 2-core Xeon,
// interleaved with the kernel without it: avx2 build 1 row 1.21x, 2 rows 1.17x, 4 rows 1.16x;
// avx512 1.11x, 1.12x, 1.05x (1, 3 and 4 KiB ahead measured; docs/benchmarks.md). The address is formed in integers: past the last
// block it points beyond the weights, which a prefetch (a hint that never faults) may do but C++
// pointer arithmetic may not. Only the tile that streams the weights asks; the others find them
// in cache.
inline void prefetch_ahead(const void* p) {
#if defined(__AVX2__)
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + 2048), _MM_HINT_T0);
#else
  (void)p;
#endif
}

// Scales and offsets are fp32, or fp16 when every one of them is exactly an fp16 (GGUF's own
// block scales): fewer bytes to stream, the same values once widened (exactly) to fp32.
struct Packed {
  const uint8_t* q;
  const void* s;
  const void* o;  // nullptr: no offsets
  bool half;      // s and o hold fp16
  int64_t blocks, k, g, bits, groups;
  int64_t block_bytes() const { return bits == 4 ? k / 2 * kOut : k * kOut; }
  int64_t at(int64_t b, int64_t t) const { return (b * groups + t) * kOut; }
  float value(const void* p, int64_t i) const {
    return half ? c10::detail::fp16_ieee_to_fp32_value(static_cast<const uint16_t*>(p)[i])
                : static_cast<const float*>(p)[i];
  }
  float scale(int64_t b, int64_t t, int64_t i) const { return value(s, at(b, t) + i); }
  float offset(int64_t b, int64_t t, int64_t i) const { return value(o, at(b, t) + i); }
};

// The rows of one call: x (m, k) with row stride ldx; xs (m, groups): X of the header, when the
// weights have offsets.
struct Rows {
  const float* x;
  int64_t ldx;
  const float* xs;
  int64_t groups;
};

#if defined(__AVX512F__)
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vbcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
constexpr int kLanes = 16, kVecs = 1;  // vectors per block of 16 outputs
// kLanes scales or offsets from index i on, widened to fp32 when stored as fp16
inline Vec vload_values(const void* p, bool half, int64_t i) {
  if (half)
    return _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
  return _mm512_loadu_ps(static_cast<const float*>(p) + i);
}
// One vector of outputs' integers from src on (kLanes bytes: the whole block of 16 here), as
// fp32: 4-bit, at k (low nibbles) and k + 1 (high); 8-bit, at k.
inline void widen_pair_vec(const uint8_t* src, Vec& lo, Vec& hi) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
inline void widen_one_vec(const uint8_t* src, Vec& out) {
  out = _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
}
#elif defined(__AVX2__)
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vbcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
constexpr int kLanes = 8, kVecs = 2;
inline Vec vload_values(const void* p, bool half, int64_t i) {
  if (half)
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  return _mm256_loadu_ps(static_cast<const float*>(p) + i);
}
// Half a block (8 bytes: 8 outputs).
inline void widen_pair_vec(const uint8_t* src, Vec& lo, Vec& hi) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x0F)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}
inline void widen_one_vec(const uint8_t* src, Vec& out) {
  out = _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src))));
}
#endif

#if defined(__AVX2__)
// The 16 outputs of a block (kVecs vectors) at k and k + 1 (4-bit: one 16-byte row of a block),
// or at k (8-bit).
inline void widen_pair(const uint8_t* src, Vec* lo, Vec* hi) {
  for (int v = 0; v < kVecs; ++v) widen_pair_vec(src + v * kLanes, lo[v], hi[v]);
}
inline void widen_one(const uint8_t* src, Vec* out) {
  for (int v = 0; v < kVecs; ++v) widen_one_vec(src + v * kLanes, out[v]);
}

// The scales (offsets) of block b, group t, from output lane `lane` of the block on.
inline Vec vscales(const Packed& w, int64_t b, int64_t t, int64_t lane = 0) {
  return vload_values(w.s, w.half, w.at(b, t) + lane);
}
inline Vec voffsets(const Packed& w, int64_t b, int64_t t, int64_t lane = 0) {
  return vload_values(w.o, w.half, w.at(b, t) + lane);
}
#endif

// The packed weights of a call (wgemm's and igemm's entry points, after each checked its own
// integers pq: N/16 blocks): checks n and the scales and offsets (N/16, K/g, 16), fp32 or fp16,
// makes the tensors contiguous in place (the caller keeps them alive) and returns their view.
// `name` starts every error message.
Packed packed_operands(const char* name, at::Tensor& pq, at::Tensor& ps, at::Tensor& po,
                       int64_t n, int64_t k, int64_t group, int64_t bits);

// Rows [0, m) of every block through the direct path when it takes m rows (m <= 8 with AVX2,
// 12 with AVX-512); false otherwise, and then nothing was written.
bool run_direct(const Packed& w, int64_t m, const Rows& rows, float* y, int64_t ldy);

}  // namespace pagoda_wgemm
