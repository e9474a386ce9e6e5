// The Python module of one ISA flavour: every C++ kernel of pagoda, compiled together with the
// flavour's flags (pagoda.kernels.build). Each kernel lives in its own source file.

// Only pybind11 and torch's Tensor casters, not <torch/extension.h> (the whole C++ frontend):
// this file then compiles in 12-19 s instead of 33 s (the 2-core Xeon, 2026-12-06), once per
// flavour on every fresh install. It also defines alloc.h's functions: ATen's operator headers
// cost it ~1.5 s more, where a file of their own took ~7 s.
#include <ATen/ops/empty.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <cstring>
#include <string>
#include <vector>

#include "alloc.h"
#include "decode_layer.h"

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

// paged_decode.cpp
at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                        at::Tensor block_tables, at::Tensor context_lens, double scale,
                        int64_t window);
// qgemm.cpp
at::Tensor qgemm(at::Tensor x, at::Tensor q, at::Tensor scales, at::Tensor offsets,
                 int64_t bits, int64_t group);
std::vector<at::Tensor> quantize_blocks(at::Tensor x);
bool shape_supported(int64_t k, int64_t g, int64_t bits);
std::string flavour();
// wgemm.cpp
at::Tensor wgemm(at::Tensor x, at::Tensor pq, at::Tensor ps, at::Tensor po, int64_t n,
                 int64_t bits, int64_t group);
// fgemm.cpp
at::Tensor fgemm(at::Tensor x, at::Tensor pw, int64_t n);
// igemm.cpp
at::Tensor igemm(at::Tensor x, at::Tensor pq, at::Tensor ps, at::Tensor po, int64_t n,
                 int64_t group);
// igemm8.cpp
at::Tensor igemm8(at::Tensor x, at::Tensor pq, at::Tensor ps, at::Tensor po, int64_t n,
                  int64_t group);
// fused_ops.cpp
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps, double offset);
std::vector<at::Tensor> add_rms_norm(at::Tensor x, at::Tensor delta, at::Tensor weight,
                                     double eps, double offset);
void rope_write(at::Tensor qkv, at::Tensor positions, at::Tensor cos, at::Tensor sin_signed,
                int64_t num_heads, int64_t num_kv_heads, at::Tensor k_cache, at::Tensor v_cache,
                at::Tensor slots);
at::Tensor silu_mul(at::Tensor gate_up);
// decode_layer.cpp: decode_layer.h
// quantize_rows.cpp
std::vector<at::Tensor> quantize_rows(at::Tensor x, double outlier_ratio, bool to_int8);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged fp32/fp16/bf16 KV cache (CPU)");
  m.def("qgemm", &qgemm, "fp32 rows times 4/8-bit group-quantized weights (Q8 block activations)");
  m.def("quantize_blocks", &quantize_blocks, "per-32-block int8 activation rounding");
  m.def("wgemm", &wgemm, "fp32 rows times 4/8-bit weights widened to fp32 (weight-only)");
  m.def("fgemm", &fgemm, "fp32 rows times fp32 weights in blocks of 16 outputs (batch-invariant)");
  m.def("igemm", &igemm, "fp32 rows (int8 per 32-block) times 4-bit weights, an integer GEMM");
  m.def("igemm8", &igemm8, "fp32 rows (int8 per 32-block) times 8-bit weights, an integer GEMM");
  m.def("shape_supported", &shape_supported, "whether qgemm takes this (K, group, bits)");
  m.def("flavour", &flavour, "the ISA this module was compiled for");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, (offset + weight) scaled");
  m.def("add_rms_norm", &add_rms_norm, "(x + delta, rms_norm(x + delta))");
  m.def("rope_write", &rope_write, "RoPE on q/k of a fused qkv in place, k/v written to slots");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [gate | up]");
  m.def("llama_decode_layer", &llama_decode_layer,
        "a Llama decoder layer over qgemm weights, every row through the paged decode kernel");
  // module_local: every flavour's module of one process registers its own type
  pybind11::class_<LlamaDecodeStack>(m, "LlamaDecodeStack", pybind11::module_local(),
                                     "a Llama model's layers, run by one call per step")
      .def(pybind11::init<double, int64_t, int64_t, double, at::Tensor, at::Tensor>())
      .def("add_layer", &LlamaDecodeStack::add_layer)
      .def("run", &LlamaDecodeStack::run)
      .def("num_layers", &LlamaDecodeStack::num_layers);
  m.def("quantize_rows", &quantize_rows,
        "per-row int8 quantization (or normalisation) with outlier columns split off");
}
