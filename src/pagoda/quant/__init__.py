"""Weight quantization by module swap: the model file never changes.

Public contract (what the loader, engine and CLI call):

    quantize_model(model, QuantConfig(method="int8", skip=("lm_head",))) -> model
        Replaces, in place, every bias-free `nn.Linear` whose kind (last name component:
        qkv_proj, o_proj, gate_up_proj, down_proj, lm_head) the config selects. Methods:
        int8 (per-channel), int4 (group-wise, group_size 16..256), gguf (the file's own blocks,
        `gguf_path=`), fp16 / bf16 (half-precision weights). Weights must be loaded first
        (gguf reads its own). Quantized modules accept (T, in) inputs in any float dtype and
        return x's dtype; on x86 CPUs they run fbgemm, elsewhere dequantize + matmul.

    save_quantized(model, out_dir, config) -> None
        Writes out_dir/model.safetensors + out_dir/pagoda_quant.json (incl. model.config).

    is_quantized_checkpoint(path) -> bool
    read_model_config(path, ModelConfig) -> ModelConfig
    load_quantized(path, skeleton, device="cpu") -> model
        `skeleton` is the architecture built from that config (meta device is fine); its linears
        are swapped from the saved specs, all tensors assigned, kernels packed. The caller then
        runs its usual post-load step (e.g. `model.post_load()` for RoPE tables).

    apply_quantization(loaded, "int8")     what LLMEngine calls on a LoadedModel (in place)
    file_linears("gguf")   the linears apply_quantization takes from the file (load_model need
                           not read them)
    (pagoda.loader.model_loader.load_quantized_model(dir) reads such a directory back)

    prepare_model(model)   pack kernels now instead of at the first forward
    weight_bytes(model)    bytes of linear weights: stored, packed kernel copies, dense
"""

from pagoda.quant.checkpoint import (
    is_quantized_checkpoint,
    load_quantized,
    read_checkpoint_meta,
    read_model_config,
    save_quantized,
)
from pagoda.quant.config import LINEAR_KINDS, METHODS, QuantConfig
from pagoda.quant.loading import apply_quantization, config_for, file_linears
from pagoda.quant.quant_linear import QuantLinear
from pagoda.quant.swap import prepare_model, quantize_model, quantized_modules, weight_bytes

__all__ = [
    "apply_quantization",
    "config_for",
    "file_linears",
    "LINEAR_KINDS",
    "METHODS",
    "QuantConfig",
    "QuantLinear",
    "is_quantized_checkpoint",
    "load_quantized",
    "prepare_model",
    "quantize_model",
    "quantized_modules",
    "read_checkpoint_meta",
    "read_model_config",
    "save_quantized",
    "weight_bytes",
]
