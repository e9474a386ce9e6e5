// A whole Llama decoder layer in one call, for steps whose every row attends through the paged
// decode kernel (decodes, and prefill rows of batch-invariant engines) with 4/8-bit wgemm,
// igemm or qgemm linears or fp32 fgemm ones and a CPU cache of fp32, fp16 or bf16. It composes
// the kernels the Python layer
// calls one by one — rms_norm, wgemm/qgemm, rope_write, paged_decode, add_rms_norm, silu_mul — in
// the same order on the same tensors, so its output is bit-identical to that path (tested); what it
// removes is the Python between them (module calls, views, wrappers): ~50 us per layer at batch 1.
//
//   h = norm1(x); qkv = h Wqkv^T; rope(q, k), k/v -> cache; a = attention(q)
//   (x2, h2) = (x + a Wo^T, norm2(x + a Wo^T)); out = x2 + (silu(h2 Wg^T) * h2 Wu^T) Wd^T

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "alloc.h"
#include "decode_layer.h"

at::Tensor qgemm(at::Tensor x, at::Tensor q, at::Tensor scales, at::Tensor offsets,
                 int64_t bits, int64_t group);
at::Tensor paged_decode(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                        at::Tensor block_tables, at::Tensor context_lens, double scale,
                        int64_t window);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps, double offset);
std::vector<at::Tensor> add_rms_norm(at::Tensor x, at::Tensor delta, at::Tensor weight,
                                     double eps, double offset);
void rope_write(at::Tensor qkv, at::Tensor positions, at::Tensor cos, at::Tensor sin_signed,
                int64_t num_heads, int64_t num_kv_heads, at::Tensor k_cache, at::Tensor v_cache,
                at::Tensor slots);
at::Tensor silu_mul(at::Tensor gate_up);
at::Tensor wgemm(at::Tensor x, at::Tensor pq, at::Tensor ps, at::Tensor po, int64_t n,
                 int64_t bits, int64_t group);
at::Tensor igemm(at::Tensor x, at::Tensor pq, at::Tensor ps, at::Tensor po, int64_t n,
                 int64_t group);
at::Tensor igemm8(at::Tensor x, at::Tensor pq, at::Tensor ps, at::Tensor po, int64_t n,
                  int64_t group);
at::Tensor fgemm(at::Tensor x, at::Tensor pw, int64_t n);

namespace {

// One linear's operands: {q, scales, offsets (empty: none)} with {bits, group} for qgemm, or
// the packed {q, scales, offsets} with {bits, group, out_features} for wgemm and
// {bits, group, out_features, 1} for igemm (4 bits) and igemm8 (8); fp32 weights in fgemm's
// blocks as {w, empty, empty} with {out_features}.
at::Tensor linear(const at::Tensor& x, const std::vector<at::Tensor>& w,
                  const std::vector<int64_t>& form) {
  TORCH_CHECK(w.size() == 3 && form.size() >= 1 && form.size() <= 4, "decode_layer: a weight "
              "is {q, scales, offsets} with {bits, group} (qgemm), {bits, group, n} (wgemm), "
              "{bits, group, n, 1} (igemm, igemm8) or {w, -, -} with {n} (fgemm)");
  if (form.size() == 1) return fgemm(x, w[0], form[0]);
  if (form.size() == 4)
    return form[0] == 8 ? igemm8(x, w[0], w[1], w[2], form[2], form[1])
                        : igemm(x, w[0], w[1], w[2], form[2], form[1]);
  if (form.size() == 3) return wgemm(x, w[0], w[1], w[2], form[2], form[0], form[1]);
  return qgemm(x, w[0], w[1], w[2], form[0], form[1]);
}

}  // namespace

at::Tensor llama_decode_layer(at::Tensor x, at::Tensor norm1, at::Tensor norm2, double eps,
                              std::vector<at::Tensor> qkv_w, std::vector<int64_t> qkv_form,
                              std::vector<at::Tensor> o_w, std::vector<int64_t> o_form,
                              std::vector<at::Tensor> gate_up_w, std::vector<int64_t> gate_up_form,
                              std::vector<at::Tensor> down_w, std::vector<int64_t> down_form,
                              at::Tensor positions, at::Tensor cos, at::Tensor sin_signed,
                              int64_t num_heads, int64_t num_kv_heads, at::Tensor k_blocks,
                              at::Tensor v_blocks, at::Tensor slots, at::Tensor block_tables,
                              at::Tensor context_lens, double scale) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "decode_layer: x must be a contiguous (T, H) fp32 tensor");
  const int64_t tokens = x.size(0), head_dim = cos.size(1);
  TORCH_CHECK(block_tables.size(0) == tokens && context_lens.numel() == tokens,
              "decode_layer: one block table and context length per row");
  at::Tensor qkv = linear(rms_norm(x, norm1, eps, 0.0), qkv_w, qkv_form);
  rope_write(qkv, positions, cos, sin_signed, num_heads, num_kv_heads, k_blocks, v_blocks, slots);
  at::Tensor q = qkv.narrow(1, 0, num_heads * head_dim).view({tokens, num_heads, head_dim});
  at::Tensor attn = paged_decode(q, k_blocks, v_blocks, block_tables, context_lens, scale, 0);
  std::vector<at::Tensor> mid = add_rms_norm(
      x, linear(attn.view({tokens, num_heads * head_dim}), o_w, o_form), norm2, eps, 0.0);
  at::Tensor down = linear(silu_mul(linear(mid[1], gate_up_w, gate_up_form)), down_w, down_form);
  // the residual add, one fp32 rounding per element like torch's `x + y`
  at::Tensor out = pagoda_alloc::empty_like(down);
  const float* a = mid[0].data_ptr<float>();
  const float* b = down.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0, n = out.numel(); i < n; ++i) o[i] = a[i] + b[i];
  return out;
}

LlamaDecodeStack::LlamaDecodeStack(double eps, int64_t num_heads, int64_t num_kv_heads,
                                   double scale, at::Tensor cos, at::Tensor sin_signed)
    : eps_(eps), scale_(scale), num_heads_(num_heads), num_kv_heads_(num_kv_heads),
      cos_(std::move(cos)), sin_signed_(std::move(sin_signed)) {}

void LlamaDecodeStack::add_layer(at::Tensor norm1, at::Tensor norm2,
                                 std::vector<std::vector<at::Tensor>> weights,
                                 std::vector<std::vector<int64_t>> forms, at::Tensor k_blocks,
                                 at::Tensor v_blocks) {
  TORCH_CHECK(weights.size() == 4 && forms.size() == 4,
              "decode_stack: a layer has four linears (qkv, o, gate_up, down)");
  layers_.push_back(Layer{std::move(norm1), std::move(norm2), std::move(weights),
                          std::move(forms), std::move(k_blocks), std::move(v_blocks)});
}

at::Tensor LlamaDecodeStack::run(at::Tensor x, at::Tensor positions, at::Tensor slots,
                                 at::Tensor block_tables, at::Tensor context_lens) const {
  for (const Layer& l : layers_)
    x = llama_decode_layer(x, l.norm1, l.norm2, eps_, l.weights[0], l.forms[0], l.weights[1],
                           l.forms[1], l.weights[2], l.forms[2], l.weights[3], l.forms[3],
                           positions, cos_, sin_signed_, num_heads_, num_kv_heads_, l.k_blocks,
                           l.v_blocks, slots, block_tables, context_lens, scale_);
  return x;
}
