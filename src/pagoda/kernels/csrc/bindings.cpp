// The Python module of one ISA flavour: every C++ kernel of pagoda, compiled together with the
// flavour's flags (pagoda.kernels.build). Each kernel lives in its own source file.

#include <torch/extension.h>

#include <string>
#include <vector>

// paged_decode.cpp
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                           int64_t window);
// qgemm.cpp
torch::Tensor qgemm(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor offsets,
                    int64_t bits, int64_t group);
std::vector<torch::Tensor> quantize_blocks(torch::Tensor x);
bool shape_supported(int64_t k, int64_t g, int64_t bits);
std::string flavour();
// quantize_rows.cpp
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, double outlier_ratio, bool to_int8);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged fp32 KV cache (CPU)");
  m.def("qgemm", &qgemm, "fp32 rows times 4/8-bit group-quantized weights (Q8 block activations)");
  m.def("quantize_blocks", &quantize_blocks, "per-32-block int8 activation rounding");
  m.def("shape_supported", &shape_supported, "whether qgemm takes this (K, group, bits)");
  m.def("flavour", &flavour, "the ISA this module was compiled for");
  m.def("quantize_rows", &quantize_rows,
        "per-row int8 quantization (or normalisation) with outlier columns split off");
}
