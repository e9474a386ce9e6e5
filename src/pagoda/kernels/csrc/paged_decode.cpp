// Decode attention straight over the paged KV cache, on the CPU, in fp32.
//
// One task per (request, KV head, chunk of at most kChunk context rows): it walks the request's
// block table and reads the K and V rows of its KV head for the query heads of its group
// (grouped-query attention without copying K/V); a context of several chunks is merged from its
// chunks' softmax statistics, in order (see kChunk).
// The gather + SDPA path instead copies each request's blocks into a padded buffer per layer,
// reading K/V three times. Tasks run on ATen's own thread pool (at::parallel_for), so they never
// compete with another runtime's threads for the cores.
//
// Per group of up to three query heads sharing a KV head, three passes over the context: scores
// q.k (four rows at a time, each K load serving every head of the group, one horizontal
// reduction per four dot products), the softmax (a vectorised exp), then the weighted sum of V
// with the output rows held in registers. Each task's arithmetic depends only on its own
// request and context length, never on the batch around it (batch invariance).
//
// The cache may hold fp32, fp16 or bf16 (read and widened to fp32 in registers: half the bytes
// of fp32, which is what a decode step with long contexts is bound by); q, the scores and the
// sums are fp32.
//
// Shapes: q, out (D, H, hd); k_cache, v_cache (num_blocks, block_size, KVH, hd);
// block_tables (D, max_blocks) int64; context_lens (D,) int64 (the new token included).
// A positive `window` limits each query to its last `window` keys (sliding-window layers).

// ATen headers only (not torch/extension.h): this file then compiles in seconds; the
// Python bindings live in bindings.cpp.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "alloc.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PAGED_DECODE_AVX2 1
#endif

namespace {

#if PAGED_DECODE_AVX2

// Eight cache elements widened to fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// Rows are scattered over the cache's blocks, and a task reads only its KV head's part of each:
// the hardware prefetcher ramps up anew at every block, so the loops ask for the rows 16 ahead
// (a block's worth), into L2 (T1). Into L1 (T0, 8 ahead, as before) the misses in flight were
// too few: a batch of 32 requests over ~192 tokens, 30 layers, fp32 cache read 6.2 GB/s per core
// (2-core Zen 4); with T1 10.9 GB/s (two threads 26.0 -> 18.1 ms per step); 24 or 32 ahead and
// T2 measured the same, 8 ahead less.
constexpr int64_t kAhead = 16;
template <typename T>
inline void prefetch_row(const T* row, int64_t elements) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < elements * static_cast<int64_t>(sizeof(T)); b += 64)
    _mm_prefetch(p + b, _MM_HINT_T1);
}

// e^x for x <= 0 (softmax arguments), ~1 ulp: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, and
// p the degree-7 Taylor polynomial (its remainder, under 6e-9 relative, is far below fp32's
// half-ulp of 6e-8).
// Arguments below -87 give 0, as their e^x is below the smallest normal float.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lower = _mm256_set1_ps(-87.f);
  const __m256 below = _mm256_cmp_ps(x, lower, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lower);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 split in two so n * ln2_hi is exact and r keeps its low bits
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(below, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Four sums of eight lanes each: [sum(a0), sum(a1), sum(a2), sum(a3)].
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

template <typename T>
inline float dot1(const float* q, const T* k, int64_t hd) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t i = 0; i < hd; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a);
  return hsum(a);
}

// s[h][t] = scale * q[h] . k[t] for G query heads of one KV group (G <= 3) and all n rows: four
// rows at a time, each loaded K vector serving the G heads, so the loop issues 4 + G loads per
// 4G multiply-adds.
template <int G, typename T>
void scores_of(const float* const* q, const T* const* rows, int64_t n, int64_t hd, float scale,
               float* const* s) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    __m256 acc[G][4];
#pragma GCC unroll 4
    for (int h = 0; h < G; ++h)
      for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_setzero_ps();
    for (int64_t a = t + kAhead; a < std::min(t + kAhead + 4, n); ++a) prefetch_row(rows[a], hd);
    const T* k[4] = {rows[t], rows[t + 1], rows[t + 2], rows[t + 3]};
    for (int64_t i = 0; i < hd; i += 8) {
      // the G query vectors, then one K vector at a time: 4G accumulators + G + 1 vectors fit
      // the sixteen registers with a widened (bf16, fp16) K too, where the four K vectors held
      // at once (4G + 4 + 1 = 17 for three heads) had GCC keep an accumulator on the stack
      __m256 qv[G];
#pragma GCC unroll 4
      for (int h = 0; h < G; ++h) qv[h] = _mm256_loadu_ps(q[h] + i);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256 kv = load8(k[j] + i);
#pragma GCC unroll 4
        for (int h = 0; h < G; ++h) acc[h][j] = _mm256_fmadd_ps(qv[h], kv, acc[h][j]);
      }
    }
    const __m128 sc = _mm_set1_ps(scale);
#pragma GCC unroll 4
    for (int h = 0; h < G; ++h)
      _mm_storeu_ps(s[h] + t, _mm_mul_ps(hsum4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]), sc));
  }
  for (; t < n; ++t)
    for (int h = 0; h < G; ++h) s[h][t] = dot1(q[h], rows[t], hd) * scale;
}

// The largest of s[0, n) (a maximum is exact, so any order gives the same value).
inline float max_of(const float* s, int64_t n) {
  __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + t));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  float m = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  for (; t < n; ++t) m = std::max(m, s[t]);
  return m;
}

// s <- e^(s - max); returns the sum, and the max in *max_out.
float exp_shifted(float* s, int64_t n, float* max_out) {
  const float m = max_of(s, n);
  *max_out = m;
  const __m256 mv = _mm256_set1_ps(m);
  __m256 total = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
    _mm256_storeu_ps(s + t, e);
    total = _mm256_add_ps(total, e);
  }
  float rest = 0.f;
  for (; t < n; ++t) {
    __m256 e = exp_nonpositive(_mm256_set1_ps(s[t] - m));
    s[t] = _mm256_cvtss_f32(e);
    rest += s[t];
  }
  return hsum(total) + rest;
}

// The W vectors of V columns from v on, widened to fp32. A bf16 pair of vectors comes from one
// 16-value load with one shuffle per eight (a bf16 is the top half of an fp32: interleaved below
// zeros), in the order the unpacks give, columns 0-3 and 8-11, then 4-7 and 12-15: for sums
// over rows of V, whose every column is its own chain, that order changes no bit, and the
// caller's store puts the columns back.
template <int W, typename T>
constexpr bool kPairedColumns = std::is_same_v<T, c10::BFloat16> && W % 2 == 0;

template <int W, typename T>
inline void load_columns(const T* v, __m256* out) {
  if constexpr (kPairedColumns<W, T>) {
    const __m256i zero = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int j = 0; j < W; j += 2) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 8 * j));
      out[j] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, x));
      out[j + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, x));
    }
  } else {
#pragma GCC unroll 4
    for (int j = 0; j < W; ++j) out[j] = load8(v + 8 * j);
  }
}

// 8-lane vectors for weighted_columns: W vectors of V columns loaded (load_columns), and W
// accumulators scaled and stored back in column order.
struct Lanes8 {
  using Vec = __m256;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec set1(float x) { return _mm256_set1_ps(x); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  template <int W, typename T>
  static void load(const T* v, Vec* out) { load_columns<W>(v, out); }
  template <int W, typename T>
  static void store(float* o, const Vec* acc, Vec iv) {
    if constexpr (kPairedColumns<W, T>) {
      for (int j = 0; j < W; j += 2) {  // columns back in order (load_columns)
        const __m256 lo = _mm256_permute2f128_ps(acc[j], acc[j + 1], 0x20);
        const __m256 hi = _mm256_permute2f128_ps(acc[j], acc[j + 1], 0x31);
        _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(lo, iv));
        _mm256_storeu_ps(o + 8 * j + 8, _mm256_mul_ps(hi, iv));
      }
    } else {
      for (int j = 0; j < W; ++j) _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(acc[j], iv));
    }
  }
};

// out[h][c, c + W vectors) = (sum_t p[h][t] v[t][those columns]) * inv[h] for G heads, in the
// vectors of L (Lanes8, or the avx512 flavour's Lanes16): G * W accumulators, each loaded V
// vector serving the G heads. Every column is its own fma chain over t from 0, so how columns
// are grouped into passes and vectors changes no bit. G * W + W + 1 <= 16 keeps the
// accumulators, the V vectors and the broadcast in AVX2's sixteen registers: with 32 columns
// for three heads (17 live vectors) GCC kept the accumulators on the stack, a load and a store
// around every fma, and the weighted sum took 2-3x the time of the scores' as many fmas.
template <class L, int G, int W, typename T>
void weighted_columns(const float* const* p, const T* const* rows, int64_t n, int64_t hd,
                      int64_t c, const float* inv, float* const* out) {
  typename L::Vec acc[G][W];
#pragma GCC unroll 4
  for (int h = 0; h < G; ++h)
#pragma GCC unroll 8
    for (int j = 0; j < W; ++j) acc[h][j] = L::zero();
  for (int64_t t = 0; t < n; ++t) {
    // the first pass brings the whole row (every pass's columns) towards L2
    if (c == 0 && t + kAhead < n) prefetch_row(rows[t + kAhead], hd);
    typename L::Vec v[W];
    L::template load<W>(rows[t] + c, v);
#pragma GCC unroll 4
    for (int h = 0; h < G; ++h) {
      const typename L::Vec pt = L::set1(p[h][t]);
#pragma GCC unroll 8
      for (int j = 0; j < W; ++j) acc[h][j] = L::fma(pt, v[j], acc[h][j]);
    }
  }
  for (int h = 0; h < G; ++h) L::template store<W, T>(out[h] + c, acc[h], L::set1(inv[h]));
}

// out[h] = (sum_t p[h][t] v[t]) * inv[h] for G heads (G <= 3): passes of kWide vectors of
// columns (bf16 in even counts, for its paired loads), then what is left of the head.
template <int G, typename T>
void weighted_sum(const float* const* p, const T* const* rows, int64_t n, int64_t hd,
                  const float* inv, float* const* out) {
  // three vectors for three heads, unless bf16's loads come in pairs
  constexpr int kWide = G == 3 ? (kPairedColumns<2, T> ? 2 : 3) : 4;
  int64_t c = 0;
  for (; c + 8 * kWide <= hd; c += 8 * kWide)
    weighted_columns<Lanes8, G, kWide>(p, rows, n, hd, c, inv, out);
  const int64_t left = (hd - c) / 8;  // vectors, fewer than kWide
  if (left == 3) weighted_columns<Lanes8, G, 3>(p, rows, n, hd, c, inv, out);
  else if (left == 2) weighted_columns<Lanes8, G, 2>(p, rows, n, hd, c, inv, out);
  else if (left == 1) weighted_columns<Lanes8, G, 1>(p, rows, n, hd, c, inv, out);
}

#if defined(__AVX512F__)
// The AVX-512 flavour's weighted sum, for head sizes that are a multiple of 16: the same pass in
// 16-lane vectors, half the multiply-adds of the 8-lane one. Every column is its own fma chain
// over t from 0 in both, so the two flavours return the same bits (tested); scores stay 8-lane,
// whose dot products a 16-lane vector would sum in another order (a different greedy answer of
// the default GGUF model: a flavour must not change what a model says).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const c10::BFloat16* p) {
  const __m512i wide =
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// 16-lane vectors for weighted_columns (the avx512 flavour): each vector of columns loaded and
// stored in order.
struct Lanes16 {
  using Vec = __m512;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec set1(float x) { return _mm512_set1_ps(x); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  template <int W, typename T>
  static void load(const T* v, Vec* out) {
#pragma GCC unroll 8
    for (int j = 0; j < W; ++j) out[j] = load16(v + 16 * j);
  }
  template <int W, typename T>
  static void store(float* o, const Vec* acc, Vec iv) {
    for (int j = 0; j < W; ++j) _mm512_storeu_ps(o + 16 * j, _mm512_mul_ps(acc[j], iv));
  }
};

template <int G, typename T>
void weighted_sum16(const float* const* p, const T* const* rows, int64_t n, int64_t hd,
                    const float* inv, float* const* out) {
  constexpr int kWide = 4;  // 4G + 4 + 1 <= 17 registers: a 64-wide head in one pass
  int64_t c = 0;
  for (; c + 16 * kWide <= hd; c += 16 * kWide)
    weighted_columns<Lanes16, G, kWide>(p, rows, n, hd, c, inv, out);
  for (; c < hd; c += 16) weighted_columns<Lanes16, G, 1>(p, rows, n, hd, c, inv, out);
}
#endif

// G heads of one KV group over the same n rows: scores, softmax, weighted sum of V; each head's
// largest score and sum of exponentials in ms[h], ls[h].
template <int G, typename T>
void attend_group(const float* const* q, const T* const* keys, const T* const* values,
                  int64_t n, int64_t hd, float scale, float* const* s, float* const* out,
                  float* ms, float* ls) {
  scores_of<G>(q, keys, n, hd, scale, s);
#if defined(__AVX512F__)
  const bool wide = hd % 16 == 0;
#endif
  float inv[G];
  for (int h = 0; h < G; ++h) {
    ls[h] = exp_shifted(s[h], n, ms + h);
    inv[h] = 1.f / ls[h];
  }
#if defined(__AVX512F__)
  if (wide) {
    weighted_sum16<G>(s, values, n, hd, inv, out);
    return;
  }
#endif
  weighted_sum<G>(s, values, n, hd, inv, out);
}

#endif  // PAGED_DECODE_AVX2

// The portable path (the generic flavour, and head sizes not a multiple of 8): each K and V row
// read once for the whole group, its head-sized dot products and updates left to the compiler's
// vectoriser.
template <typename T>
void attend_plain(const float* __restrict q, const T* const* keys, const T* const* values,
                  int64_t n, int64_t hd, float scale, float* __restrict s,
                  float* __restrict out, int64_t heads, float* ms, float* ls) {
  for (int64_t t = 0; t < n; ++t) {
    const T* __restrict k = keys[t];
    for (int64_t h = 0; h < heads; ++h) {
      const float* __restrict qh = q + h * hd;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < hd; ++i) acc += qh[i] * static_cast<float>(k[i]);
      s[h * n + t] = acc * scale;
    }
  }
  std::vector<float> inv(heads);
  for (int64_t h = 0; h < heads; ++h) {
    float* sh = s + h * n;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) m = std::max(m, sh[t]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < n; ++t) {
      sh[t] = std::exp(sh[t] - m);
      total += sh[t];
    }
    inv[h] = 1.f / total;
    ms[h] = m;
    ls[h] = total;
  }
  std::fill(out, out + heads * hd, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const T* __restrict v = values[t];
    for (int64_t h = 0; h < heads; ++h) {
      const float p = s[h * n + t];
      float* __restrict o = out + h * hd;
#pragma omp simd
      for (int64_t i = 0; i < hd; ++i) o[i] += p * static_cast<float>(v[i]);
    }
  }
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < hd; ++i) out[h * hd + i] *= inv[h];
}

// The `heads` query heads of one KV group (q and out start at its first head) over its n
// context rows (K rows `keys`, V rows `values`); s holds n scores per head. Heads go three (or
// two) at a time through the vector path, so each K and V row is read once per three heads
// rather than once per head. Each head's largest score and sum of exponentials go to ms, ls.
template <typename T>
void attend(const float* q, const T* const* keys, const T* const* values, int64_t n,
            int64_t hd, float scale, float* s, float* out, int64_t heads, float* ms,
            float* ls) {
#if PAGED_DECODE_AVX2
  if (hd % 8 == 0) {
    for (int64_t h = 0; h < heads;) {
      const int64_t left = heads - h;
      const int take = left == 4 ? 2 : static_cast<int>(std::min<int64_t>(left, 3));
      const float* qs[3];
      float* ss[3];
      float* os[3];
      for (int j = 0; j < take; ++j) {
        qs[j] = q + (h + j) * hd;
        ss[j] = s + (h + j) * n;
        os[j] = out + (h + j) * hd;
      }
      if (take == 3) attend_group<3>(qs, keys, values, n, hd, scale, ss, os, ms + h, ls + h);
      else if (take == 2) attend_group<2>(qs, keys, values, n, hd, scale, ss, os, ms + h, ls + h);
      else attend_group<1>(qs, keys, values, n, hd, scale, ss, os, ms + h, ls + h);
      h += take;
    }
    return;
  }
#endif
  attend_plain(q, keys, values, n, hd, scale, s, out, heads, ms, ls);
}

// The fixed cost of a task (its block-table walk, buffers, calls) in context rows, for splitting
// tasks among threads by cost.
constexpr int64_t kTaskOverhead = 8;

// A context of more than kChunk rows is attended in chunks of kChunk rows (the last one
// shorter), each a task of its own, then merged (below). One request alone has only as many
// (request, KV head) tasks as KV heads: SmolLM2's 3 on 2 threads left one thread 2/3 of the
// work, Gemma 3's single KV head one thread all of it. The chunks depend only on the request's
// own length, never on the batch or the threads, so its bits do not either; a context of at most
// kChunk rows is one task and computes exactly as before chunking.
constexpr int64_t kChunk = 512;

// A task: one chunk of one (request, KV head), whose `chunks` chunks are tasks first .. first +
// chunks - 1; `merge` numbers the multi-chunk (request, KV head)s (-1: a single chunk).
struct Task {
  int64_t d, g, chunk, chunks, merge;
};

// e^x for each x <= 0 of xs[0, n), in place: the vector exp of the softmax where it is built.
inline void exp_in_place(float* xs, int64_t n) {
#if PAGED_DECODE_AVX2
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(xs + i, exp_nonpositive(_mm256_loadu_ps(xs + i)));
  for (; i < n; ++i) xs[i] = _mm256_cvtss_f32(exp_nonpositive(_mm256_set1_ps(xs[i])));
#else
  for (int64_t i = 0; i < n; ++i) xs[i] = std::exp(xs[i]);
#endif
}

// out[h] of a (request, KV head) attended in `chunks` parts: part c holds its softmax-weighted
// sum part[c][h] (normalized within the part), its largest score ms[c][h] and its sum of
// exponentials ls[c][h]. The whole's softmax weighs part c by ls[c] * e^(ms[c] - M) over the
// total of those (M the largest), each output an fma chain over the parts in order (the loop
// over parts outside the loop over columns, which vectorizes; the chain is the same).
void merge_chunks(const float* part, const float* ms, const float* ls, int64_t chunks,
                  int64_t heads, int64_t hd, float* out, std::vector<float>& weight) {
  weight.resize(chunks * heads);  // weight[c * heads + h]
  for (int64_t h = 0; h < heads; ++h) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < chunks; ++c) top = std::max(top, ms[c * heads + h]);
    for (int64_t c = 0; c < chunks; ++c) weight[c * heads + h] = ms[c * heads + h] - top;
  }
  exp_in_place(weight.data(), chunks * heads);
  for (int64_t h = 0; h < heads; ++h) {
    float total = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      weight[c * heads + h] *= ls[c * heads + h];
      total += weight[c * heads + h];
    }
    float* __restrict o = out + h * hd;
    std::fill(o, o + hd, 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float w = weight[c * heads + h] / total;
      const float* __restrict x = part + (c * heads + h) * hd;
      for (int64_t i = 0; i < hd; ++i) o[i] = std::fma(w, x[i], o[i]);
    }
  }
}

template <typename T>
void run(const float* qp, const T* kp, const T* vp, const int64_t* tables, const int64_t* lens,
         float* op, int64_t num_decode, int64_t num_heads, int64_t head_dim, int64_t block_size,
         int64_t num_kv, int64_t max_blocks, float scale, int64_t window) {
  const int64_t group = num_heads / num_kv;
  const int64_t row = num_kv * head_dim;  // elements between consecutive tokens of one block
  const auto first_row = [&](int64_t d) {
    return window > 0 ? std::max<int64_t>(0, lens[d] - window) : int64_t{0};
  };
  // Tasks, request by request, KV head by KV head, chunk by chunk; `merges` lists the first
  // task of each (request, KV head) of several chunks.
  std::vector<Task> tasks;
  std::vector<int64_t> merges;
  int64_t most_chunks = 1;
  for (int64_t d = 0; d < num_decode; ++d) {
    const int64_t chunks = std::max<int64_t>(1, (lens[d] - first_row(d) + kChunk - 1) / kChunk);
    most_chunks = std::max(most_chunks, chunks);
    for (int64_t g = 0; g < num_kv; ++g) {
      const int64_t merge = chunks > 1 ? static_cast<int64_t>(merges.size()) : -1;
      if (chunks > 1) merges.push_back(static_cast<int64_t>(tasks.size()));
      for (int64_t c = 0; c < chunks; ++c) tasks.push_back({d, g, c, chunks, merge});
    }
  }
  const int64_t count = static_cast<int64_t>(tasks.size());
  const auto rows_of = [&](const Task& t) {
    const int64_t begin = first_row(t.d) + t.chunk * kChunk;
    return std::pair<int64_t, int64_t>{begin, std::min(lens[t.d], begin + kChunk)};
  };
  // Tasks cost about their rows, and rows of one prefill (invariant attention) range from 1 to
  // its length: split evenly by count, the thread with the last rows did 3/4 of a 2048-token
  // prefill's work (105 ms a layer at 2 threads against 137 at one, Xeon). So each thread takes
  // a run of tasks of about equal total length. Which thread runs a task changes none of its
  // arithmetic.
  std::vector<int64_t> cost(count + 1, 0);  // cost[i]: the total length of tasks before i
  for (int64_t i = 0; i < count; ++i) {
    const auto [b, e] = rows_of(tasks[i]);
    cost[i + 1] = cost[i] + (e - b) + kTaskOverhead;
  }
  const int64_t threads = std::min<int64_t>(count, at::get_num_threads());
  // A task goes to the part its middle falls in (by its start, a long task just before a
  // boundary would land whole on the earlier part): the first task of `part` is the first whose
  // middle, (cost[i] + cost[i + 1]) / 2, is at or past the part's share.
  std::vector<int64_t> bounds(threads + 1);
  for (int64_t part = 0; part <= threads; ++part) {
    const int64_t target = 2 * (cost[count] * part / threads);
    int64_t lo = 0, hi = count;  // the middles increase with i: binary search
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (cost[mid] + cost[mid + 1] < target) lo = mid + 1;
      else hi = mid;
    }
    bounds[part] = lo;
  }
  // A (request, KV head) whose chunks all fall in one part is merged by that part's thread as
  // soon as its last chunk is done, from the thread's own buffer (still in its cache). The few
  // that a boundary between parts cuts keep their chunks in `shared`, merged after the parallel
  // region, whichever parts one call of the lambda below gets. (Every chunk's result in one
  // buffer for the whole call, ~10 MB a layer for a 2048-token prefill, made the prefill 5%
  // slower than without chunks.) Either way the same arithmetic.
  std::vector<int64_t> cut;  // merge numbers of the (request, KV head)s cut by a boundary
  std::vector<int64_t> cut_slot(merges.size(), -1);  // each merge's place in `cut`, or -1
  for (int64_t part = 1; part < threads; ++part) {
    const int64_t b = bounds[part];
    if (b > 0 && b < count && tasks[b].chunk > 0 && cut_slot[tasks[b].merge] < 0) {
      cut_slot[tasks[b].merge] = static_cast<int64_t>(cut.size());
      cut.push_back(tasks[b].merge);
    }
  }
  const int64_t stride = group * head_dim;  // floats of one chunk's result
  const int64_t buffer_size = most_chunks * (stride + 2 * group);
  std::vector<float> shared(cut.size() * buffer_size);
  // A buffer of `most_chunks` chunks: results, then largest scores, then sums.
  const auto merge_from = [&](const Task& task, const float* buffer, std::vector<float>& weight) {
    merge_chunks(buffer, buffer + most_chunks * stride,
                 buffer + most_chunks * (stride + group), task.chunks, group, head_dim,
                 op + (task.d * num_heads + task.g * group) * head_dim, weight);
  };
  at::parallel_for(0, threads, 1, [&](int64_t part_begin, int64_t part_end) {
    const int64_t begin = bounds[part_begin], end = bounds[part_end];
    std::vector<float> scores, whole_max(group), whole_sum(group), weight;
    std::vector<float> own(buffer_size);
    std::vector<const T*> keys, values;
    for (int64_t i = begin; i < end; ++i) {
      const Task& task = tasks[i];
      const auto [first, last] = rows_of(task);
      const int64_t n = last - first;
      const int64_t* table = tables + task.d * max_blocks;
      keys.resize(n);
      values.resize(n);
      scores.resize(group * n);
      // the rows' addresses, a block's run at a time (one division per block, not per row:
      // a 64-bit division per row cost more than a tenth of a long prefill's attention)
      for (int64_t t = first; t < last;) {
        const int64_t at_slot = t % block_size;
        const int64_t run = std::min(block_size - at_slot, last - t);
        const int64_t base =
            (table[t / block_size] * block_size + at_slot) * row + task.g * head_dim;
        for (int64_t j = 0; j < run; ++j) {
          keys[t - first + j] = kp + base + j * row;
          values[t - first + j] = vp + base + j * row;
        }
        t += run;
      }
      // the group's query heads are consecutive: q and out rows g * group .. (g + 1) * group
      const int64_t at = (task.d * num_heads + task.g * group) * head_dim;
      if (task.merge < 0) {
        attend(qp + at, keys.data(), values.data(), n, head_dim, scale, scores.data(), op + at,
               group, whole_max.data(), whole_sum.data());
        continue;
      }
      const int64_t slot = cut_slot[task.merge];
      const bool whole = slot < 0;  // then all its chunks are in this call's parts
      float* buffer = whole ? own.data() : shared.data() + slot * buffer_size;
      attend(qp + at, keys.data(), values.data(), n, head_dim, scale, scores.data(),
             buffer + task.chunk * stride, group,
             buffer + most_chunks * stride + task.chunk * group,
             buffer + most_chunks * (stride + group) + task.chunk * group);
      if (whole && task.chunk == task.chunks - 1) merge_from(task, buffer, weight);
    }
  });
  std::vector<float> weight;
  for (size_t j = 0; j < cut.size(); ++j)
    merge_from(tasks[merges[cut[j]]], shared.data() + j * buffer_size, weight);
}

}  // namespace

at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                        at::Tensor block_tables, at::Tensor context_lens, double scale,
                        int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode: bad shapes");
  const auto kv_type = k_cache.scalar_type();
  TORCH_CHECK(q.scalar_type() == at::kFloat && v_cache.scalar_type() == kv_type &&
                  (kv_type == at::kFloat || kv_type == at::kHalf || kv_type == at::kBFloat16),
              "paged_decode: fp32 queries over an fp32, fp16 or bf16 cache");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "paged_decode: int64 tables and lengths");
  q = q.contiguous();
  k_cache = k_cache.contiguous();
  v_cache = v_cache.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  auto out = pagoda_alloc::empty_like(q);

  const int64_t num_decode = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv = k_cache.size(2);
  TORCH_CHECK(num_heads % num_kv == 0 && k_cache.size(3) == head_dim,
              "paged_decode: heads do not match the cache");
  const float* qp = q.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const auto go = [&](auto* kp, auto* vp) {
    run(qp, kp, vp, tables, lens, op, num_decode, num_heads, head_dim, block_size, num_kv,
        block_tables.size(1), static_cast<float>(scale), window);
  };
  if (kv_type == at::kFloat)
    go(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  else if (kv_type == at::kHalf)
    go(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>());
  else
    go(k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>());
  return out;
}
