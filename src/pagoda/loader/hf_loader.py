"""Read a Hugging Face model directory: config.json and *.safetensors."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from pagoda.models.config import ModelConfig

# config.json "architectures" -> the engine's architecture names
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Gemma3ForCausalLM": "gemma3"}


class HFCheckpoint:
    def __init__(self, directory: str):
        cfg_path = os.path.join(directory, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{directory} has no config.json")
        self.directory = directory
        with open(cfg_path) as f:
            self.raw = json.load(f)
        self.files = safetensors_files(directory)
        self.config = self._read_config()

    def _read_config(self) -> ModelConfig:
        raw = self.raw
        archs = raw.get("architectures") or []
        arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs} "
                             f"(supported: {list(HF_ARCHITECTURES)})")
        text = raw.get("text_config", raw)
        num_heads = text["num_attention_heads"]
        eos = text.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        theta = text.get("rope_theta", rope.get("rope_theta", 10000.0))
        common = dict(
            architecture=arch,
            name=os.path.basename(os.path.normpath(self.directory)),
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=text.get("num_key_value_heads", num_heads),
            head_dim=text.get("head_dim") or text["hidden_size"] // num_heads,
            max_model_len=text.get("max_position_embeddings", 2048),
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get(
                "tie_word_embeddings", False))),
            bos_token_id=text.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        if arch == "gemma3":
            from pagoda.models.gemma3_config import gemma3_extras_from_hf

            common.update(gemma3_extras_from_hf(text))
        return ModelConfig(**common)

    def weights(self, progress: bool = True, skip: Callable[[str], bool] | None = None
                ) -> Iterator[tuple[str, torch.Tensor]]:
        return safetensors_weights(self.files, progress, skip)


def safetensors_files(directory: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors files")
    return files


def safetensors_weights(files: list[str], progress: bool = True,
                        skip: Callable[[str], bool] | None = None
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, fp32 tensor) of every tensor in `files` but those `skip` names (never read),
    one file open at a time."""
    from safetensors import safe_open

    for path in tqdm(files, desc="Loading weights", unit="file", disable=not progress):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if skip is not None and skip(name):
                    continue
                yield name, f.get_tensor(name).float()
