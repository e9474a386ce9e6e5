// One call of the integer GEMMs (igemm.cpp: 4-bit weights, igemm8.cpp: 8-bit): the checks of
// their operands, the padded output and the rounded rows, shared so both refuse the same inputs
// with the same messages. Only the packed integers' layout differs between them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "alloc.h"
#include "q8_block.h"
#include "wgemm.h"

namespace pagoda_igemm {

struct Call {
  at::Tensor pq, ps, po;  // the packed operands, contiguous: w points into them
  pagoda_wgemm::Packed w;
  at::Tensor x, y;  // x (M, K) contiguous fp32; y (M, 16 * blocks)
  int64_t m, n, padded;
  pagoda_q8::RoundedRows a;
  // y without its padding outputs (a copy only when N is not a multiple of 16)
  at::Tensor unpadded() const { return n == padded ? y : y.narrow(1, 0, n).contiguous(); }
};

// x (M, K) fp32; pq (N/16, K / k_per_unit, unit_bytes) bytes; ps/po as wgemm's. `wide`: also
// keep the rounded rows as int16.
inline Call prepare(const char* name, at::Tensor x, at::Tensor pq, at::Tensor ps, at::Tensor po,
                    int64_t n, int64_t group, int64_t bits, int64_t k_per_unit,
                    int64_t unit_bytes, bool wide) {
  const std::string who(name);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              who, ": x must be a 2-D fp32 CPU tensor");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(group > 0 && group % pagoda_q8::kBlock == 0 && k % group == 0,
              who, ": the group must be a multiple of 32 dividing K");
  TORCH_CHECK(pq.dim() == 3 && pq.size(1) == k / k_per_unit && pq.size(2) == unit_bytes &&
                  pq.element_size() == 1,
              who, ": packed weights must be (N/16, K/", k_per_unit, ", ", unit_bytes, ") bytes");
  // the Call owns the (possibly copied) contiguous operands, so w never outlives them
  Call c{pq, ps, po, {}, x.contiguous(), at::Tensor(), m, n, 0, {}};
  c.w = pagoda_wgemm::packed_operands(name, c.pq, c.ps, c.po, n, k, group, bits);
  c.padded = c.w.blocks * pagoda_wgemm::kOut;
  c.y = pagoda_alloc::empty({m, c.padded}, c.x.options());
  if (m > 0)
    pagoda_q8::round_rows(c.x.data_ptr<float>(), m, k, group, c.w.o != nullptr, wide, c.a);
  return c;
}

}  // namespace pagoda_igemm
