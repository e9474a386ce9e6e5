// The int8 rounding of one 32-element block of activations, shared by qgemm and igemm (and
// matched by pagoda.kernels.qgemm.quantize_blocks_torch): llama.cpp's Q8_0 rule.
//
//     d = max|x| / 127,  q[j] = round_half_even(x[j] * ((1 / max|x|) * 127))
//
// (1 / max) * 127 rather than 127 / max: the torch twin computes it this way, and the two must
// give the same integers. A NaN or infinity in the block makes d NaN and every q 0, so the
// block's products are NaN (as fp32's would be) and no NaN is cast to an integer (UB).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace pagoda_q8 {

constexpr int kBlock = 32;

// Block xb's scale d; its 32 integers go to out[at(j)] (the caller's layout).
template <typename At>
inline float round_block(const float* xb, int8_t* out, At at) {
  float mx = 0.f;
  for (int j = 0; j < kBlock; ++j) {
    const float v = std::fabs(xb[j]);
    mx = (v > mx || v != v) ? v : mx;  // a NaN sticks (std::max would skip it)
  }
  const bool finite = std::isfinite(mx);
  const float inv = finite && mx > 0.f ? (1.f / mx) * 127.f : 0.f;
  for (int j = 0; j < kBlock; ++j) out[at(j)] = static_cast<int8_t>(std::nearbyint(xb[j] * inv));
  return finite ? mx / 127.f : std::numeric_limits<float>::quiet_NaN();
}

}  // namespace pagoda_q8
