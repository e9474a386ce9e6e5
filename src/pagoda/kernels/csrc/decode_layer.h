// Shared by decode_layer.cpp and bindings.cpp: a Llama decoder layer in one call, and the stack
// of a model's layers run by one call per step.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

at::Tensor llama_decode_layer(at::Tensor x, at::Tensor norm1, at::Tensor norm2, double eps,
                              std::vector<at::Tensor> qkv_w, std::vector<int64_t> qkv_form,
                              std::vector<at::Tensor> o_w, std::vector<int64_t> o_form,
                              std::vector<at::Tensor> gate_up_w, std::vector<int64_t> gate_up_form,
                              std::vector<at::Tensor> down_w, std::vector<int64_t> down_form,
                              at::Tensor positions, at::Tensor cos, at::Tensor sin_signed,
                              int64_t num_heads, int64_t num_kv_heads, at::Tensor k_blocks,
                              at::Tensor v_blocks, at::Tensor slots, at::Tensor block_tables,
                              at::Tensor context_lens, double scale);

// Every layer of a Llama model with its weights and KV blocks, held once (built at the first
// step that can use it): a step then crosses from Python once, not once per layer, and runs
// llama_decode_layer on each layer in order, so its output is that of the per-layer calls.
class LlamaDecodeStack {
 public:
  LlamaDecodeStack(double eps, int64_t num_heads, int64_t num_kv_heads, double scale,
                   at::Tensor cos, at::Tensor sin_signed);
  // One layer's norms, its four linears' operands and forms (as llama_decode_layer takes them)
  // and its cache blocks; layers run in the order they were added.
  void add_layer(at::Tensor norm1, at::Tensor norm2, std::vector<std::vector<at::Tensor>> weights,
                 std::vector<std::vector<int64_t>> forms, at::Tensor k_blocks,
                 at::Tensor v_blocks);
  at::Tensor run(at::Tensor x, at::Tensor positions, at::Tensor slots, at::Tensor block_tables,
                 at::Tensor context_lens) const;
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  struct Layer {
    at::Tensor norm1, norm2;
    std::vector<std::vector<at::Tensor>> weights;  // qkv, o, gate_up, down
    std::vector<std::vector<int64_t>> forms;
    at::Tensor k_blocks, v_blocks;
  };
  double eps_, scale_;
  int64_t num_heads_, num_kv_heads_;
  at::Tensor cos_, sin_signed_;
  std::vector<Layer> layers_;
};
