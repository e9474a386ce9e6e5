// The kernels' output tensors, made in one translation unit (defined in bindings.cpp). ATen's
// <ATen/ops/empty.h> alone takes ~4 s to parse (every file that included it took 7-11 s to
// compile, of which ~7 s were headers); the kernels are compiled once per ISA flavour on every
// fresh install, so they include only <ATen/core/Tensor.h> and allocate through these.
#pragma once

#include <ATen/core/Tensor.h>

namespace pagoda_alloc {

// Uninitialized, of `sizes` with `options` (dtype, device).
at::Tensor empty(c10::IntArrayRef sizes, const c10::TensorOptions& options);
// Uninitialized, shaped and typed like `t` (contiguous).
at::Tensor empty_like(const at::Tensor& t);
// A CPU tensor owning a copy of `sizes`' elements of `dtype` at `data`.
at::Tensor copy_of(const void* data, c10::IntArrayRef sizes, c10::ScalarType dtype);

}  // namespace pagoda_alloc
