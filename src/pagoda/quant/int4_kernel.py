"""A small AVX2 kernel for 4-bit group-32 weights at decode row counts, compiled at first use.

fbgemm cannot apply one scale per group, so group-quantized layers otherwise run as re-rounded
per-channel int8 (1 byte per weight). This kernel reads the groups themselves: 0.5 byte of
nibbles plus 8 bytes of (scale, offset) per 32 weights, and computes

    y[r, n] = sum_g  s[n, g] * dot(x[r, g], q[n, g])  +  o[n, g] * sum(x[r, g])

in fp32 (the offset term uses per-group sums of x computed once per call). The unpacked group is
reused across the (at most MAX_ROWS) input rows. It is built with torch.utils.cpp_extension on
first use (~1 minute, cached under ~/.cache/torch_extensions); if the build fails or the CPU
lacks AVX2/FMA, `available()` is False and callers fall back to fbgemm.
"""

from __future__ import annotations

import logging
import os
from functools import cache

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 8
GROUP = 32

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// x (R, K) fp32; packed (N, K/2) uint8, element 2i in the low nibble of byte i;
// scales, offsets (N, K/32) fp32. Returns (R, N) fp32.
torch::Tensor int4_group32_mm(torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                              torch::Tensor offsets) {
  const int64_t R = x.size(0), K = x.size(1), N = packed.size(0), G = K / 32;
  TORCH_CHECK(R >= 1 && R <= 8 && K % 32 == 0 && packed.size(1) == K / 2);
  // De-interleave x per group so low nibbles meet even and high nibbles odd elements.
  auto xd = torch::empty({R, K}, x.options());
  auto xsum = torch::empty({R, G}, x.options());
  const float* xp = x.data_ptr<float>();
  float* xdp = xd.data_ptr<float>();
  float* xsp = xsum.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float* src = xp + r * K + g * 32;
      float* dst = xdp + r * K + g * 32;
      float s = 0.f;
      for (int i = 0; i < 16; ++i) {
        dst[i] = src[2 * i];
        dst[16 + i] = src[2 * i + 1];
        s += src[2 * i] + src[2 * i + 1];
      }
      xsp[r * G + g] = s;
    }
  auto y = torch::empty({R, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* op = offsets.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = wp + n * (K / 2);
      const float* s = sp + n * G;
      const float* o = op + n * G;
      __m256 acc[8];
      float off[8];
      for (int64_t r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); off[r] = 0.f; }
      for (int64_t g = 0; g < G; ++g) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * 16));
        __m128i lo = _mm_and_si128(b, mask);
        __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        __m256 sv = _mm256_set1_ps(s[g]);
        for (int64_t r = 0; r < R; ++r) {
          const float* xg = xdp + r * K + g * 32;
          __m256 d = _mm256_mul_ps(w0, _mm256_loadu_ps(xg));
          d = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + 8), d);
          d = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xg + 16), d);
          d = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xg + 24), d);
          acc[r] = _mm256_fmadd_ps(d, sv, acc[r]);
          off[r] += o[g] * xsp[r * G + g];
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        h = _mm_hadd_ps(h, h);
        h = _mm_hadd_ps(h, h);
        yp[r * N + n] = _mm_cvtss_f32(h) + off[r];
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("int4_group32_mm", &int4_group32_mm); }
"""


def _cpu_has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@cache
def _extension() -> object | None:
    if os.environ.get("PAGODA_NO_INT4_KERNEL") or not _cpu_has_avx2_fma():
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline("pagoda_int4_group32", cpp_sources=[_SOURCE], functions=None,
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # a missing compiler must not break serving: fbgemm remains
        log.warning("int4 kernel unavailable, using fbgemm int8 for 4-bit layers: %s", exc)
        return None


def available() -> bool:
    return _extension() is not None


def int4_group32_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                    offsets: torch.Tensor) -> torch.Tensor:
    """x (R <= MAX_ROWS, K) fp32 -> (R, N); scales/offsets fp32 (N, K/32)."""
    ext = _extension()
    assert ext is not None
    return ext.int4_group32_mm(x.contiguous(), packed, scales, offsets)
