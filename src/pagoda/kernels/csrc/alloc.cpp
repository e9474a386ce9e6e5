// See alloc.h: the only kernel file that parses ATen's operator headers.
#include "alloc.h"

#include <ATen/ops/empty.h>

#include <cstring>

namespace pagoda_alloc {

at::Tensor empty(c10::IntArrayRef sizes, const c10::TensorOptions& options) {
  return at::empty(sizes, options);
}

at::Tensor empty_like(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options());
}

at::Tensor copy_of(const void* data, c10::IntArrayRef sizes, c10::ScalarType dtype) {
  at::Tensor out = at::empty(sizes, c10::TensorOptions().dtype(dtype));
  std::memcpy(out.data_ptr(), data, out.nbytes());
  return out;
}

}  // namespace pagoda_alloc
