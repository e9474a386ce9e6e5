"""Engine configuration: one dataclass, validated at construction, passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pagoda.kv_cache.kv_store import KV_DTYPES
from pagoda.layers.decode_backend import BACKENDS as ATTENTION_BACKENDS
from pagoda.layers.pooler import POOLING_MODES
from pagoda.models.bert import ATTENTION_MODES
from pagoda.quant.config import BACKENDS as QUANT_KERNELS
from pagoda.quant.config import METHODS as QUANT_METHODS
from pagoda.spec_decode.hybrid import LOOKUP_MIN_N as HYBRID_LOOKUP_MIN_N
from pagoda.spec_decode.hybrid import MODEL_MAX_BATCH as HYBRID_MODEL_MAX_BATCH

# Draft tokens per step when --num-speculative-tokens is unset, and how likely a drafted position
# must be to be accepted for it to be drafted (benchmarks/spec_decode.py; spec_policy.py).
# (ngram's entry is its quantized-target default; the engine settles ngram for its target with
# DEFAULT_NGRAM below before anything reads this)
DEFAULT_SPECULATIVE_TOKENS = {"ngram": 4, "draft": 4, "hybrid": 4}
SPECULATIVE_METHODS = ("ngram", "draft", "hybrid")
# Prompt lookup on a target with full-precision linears: a batch-1 step streams the weights, so
# more verified rows cost next to nothing, and drafting deeper and from one-token matches pays
# (grounded prompts 1.83-2.01x vs 1.74-1.86x, chat 1.31x vs 1.18x on the 2-core Zen 4 EPYC). With
# 4/8-bit linears each row is real work and the shorter, surer drafts win (1.17-1.31x vs
# 1.07-1.28x). One request alone on full-precision linears drafts up to 16 (a 17-row pass cost
# 1.6x a 1-row step, and the solo rule lets only well-accepted requests draft that deep: grounded
# prompts 1.91x vs 1.81x decode rate, answers stopping at their end 2.04x vs 1.98x; at 2-8
# concurrent requests 16 measured 0.96-1.02x of 8, hence alone only; docs/spec_decode.md).
# (num_speculative_tokens, prompt_lookup_min, alone) by "the target is quantized".
DEFAULT_NGRAM = {False: (8, 1, 16), True: (4, 2, 4)}
# hybrid: lookup drafts take the policy's depth as ngram's do; the draft model's are held to
# spec_decode/hybrid.py's DRAFT_DEPTH.
SPECULATIVE_DEPTH_FLOOR = {"ngram": 0.05, "draft": 0.2, "hybrid": 0.05}
# ... and when one request runs alone (scheduler/spec_policy.py): a draft model's tokens still
# cost forward passes, prompt lookup's only rows of a bandwidth-bound step.
SPECULATIVE_SOLO_DEPTH_FLOOR = {"ngram": 0.01, "hybrid": 0.01}
# Speculate only while at most this many requests run: measured break-even batch sizes on a
# 2-core EPYC (docs/spec_decode.md): prompt lookup still paid at 4 concurrent requests (1.5x) and
# broke even at 8; a draft model paid at 2 (1.3x), barely at 4, and cost 36% at 8. hybrid
# runs its draft model only while at most 2 requests draft (spec_decode/hybrid.py), lookup beyond.
DEFAULT_SPECULATIVE_MAX_BATCH = {"ngram": 8, "draft": 4, "hybrid": 8}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct GGUF)
    device: str = "cpu"
    dtype: str = "fp32"
    # Weights: none (fp32, the transformers-identical reference) | int8 | int4 | gguf (a GGUF
    # file's own blocks) | auto: gguf when the engine loads a GGUF file itself, for fp32 on the
    # CPU (measured faster than fp32 at every batch size, with fp32's perplexity:
    # docs/quantization.md), else none. A model handed in as `loaded=` is used as it is.
    quantization: str = "auto"
    # kernel for quantized linears: auto (igemm for 4/8-bit groups of 32k, else wgemm) | igemm |
    # wgemm | qgemm | <kernel>-<flavour> | onednn | fbgemm | reference
    # (quant/kernel_plan.py)
    quant_kernel: str = "auto"
    # kernel of fp32 linears: auto (fgemm where the C++ kernels are built, else onednn) | fgemm
    # | onednn | torch (layers/dense_linear.py: measured against oneDNN and MKL's sgemm)
    dense_kernel: str = "auto"
    # Move the linears' kernel weight forms into 2 MiB pages at load (kernels/huge_pages.py: a
    # decode step streams every weight, and in 4 KiB pages each page is a TLB miss; fp32 linears
    # 15-23% faster on the 2-core Xeon). Off: they stay where the packers put them.
    huge_pages: bool = True
    kv_cache_memory: int = 1 << 30  # bytes for the KV block pool
    # auto: bf16 when the linears are quantized and compute in fp32, else the compute dtype
    # (settle_for_weights says why)
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's context length
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    batching: str = "continuous"
    # decode attention kernel: auto | torch | cpp | numba (layers/decode_backend.py)
    attention_backend: str = "auto"
    # Prefill queries attend through the decode kernel, one query row at a time, so a token's
    # attention output is the same whether it is computed in a prefill chunk, after a prefix-cache
    # hit or as a decode. None (auto): on when the loaded model has quantized linears (from
    # `quantization` or passed in pre-quantized as `loaded=`), whose igemm/wgemm/qgemm linears
    # are already batch-invariant (with int8 activations a last-ulp difference can flip a
    # rounding and then a greedy token); fp32 keeps SDPA's faster blocked prefill (its linears on
    # fgemm are batch-invariant as well: `True` makes an fp32 engine invariant end to end).
    invariant_attention: bool | None = None
    # The elementwise steps of each layer (RMSNorm, RoPE + cache write, SiLU * up) as single C++
    # calls, and a decode step's layers as one call (layers/fused_ops.py). None (auto): on for CPU
    # models with quantized or fgemm linears (fgemm's bits are not transformers' either; the
    # greedy tokens still are, tests/engine/test_hf_reference.py; a batch-1 fp32 step ~20 ms
    # instead of ~30, docs/benchmarks.md); fp32 on torch's or oneDNN's products keeps torch's ops.
    fused_ops: bool | None = None
    # Speculative decoding (docs/spec_decode.md): None (off) | "ngram" (prompt lookup) | "draft"
    # (a draft model) | "hybrid" (prompt lookup where a 3-token match exists, else the draft)
    speculative_method: str | None = None
    num_speculative_tokens: int | None = None  # None: the measured default of the method
    # drafts per step while one request runs (None: num_speculative_tokens; prompt lookup's
    # measured default when that is unset too, DEFAULT_NGRAM)
    num_speculative_tokens_alone: int | None = None
    prompt_lookup_min: int | None = None  # ngram sizes tried, longest first (None: measured)
    prompt_lookup_max: int = 5
    draft_model: str | None = None  # "self" (default for "draft", "hybrid") or a model path
    draft_quantization: str = "auto"  # self-draft weights: auto (gguf for a GGUF file) | int4 | ...
    speculative_max_batch: int | None = None  # speculate only while at most this many run
    # auto: embed for encoder models (BERT), generate otherwise; embed on a decoder pools its
    # hidden states (docs/embeddings.md)
    task: str = "auto"
    pooling: str | None = None  # embed: override the model's pooling (layers/pooler.py modes)
    embed_attention: str = "padded"  # encoder attention: padded | varlen (models/bert.py)
    # Ranks of tensor parallelism (docs/parallel.md): this process is rank 0 and starts the rest;
    # `num_threads` (default: torch's) is split between them.
    tensor_parallel_size: int = 1
    # Pipeline stages (contiguous layers; docs/parallel.md): tp x pp ranks in all.
    pipeline_parallel_size: int = 1
    # Ranks on several machines, torchrun's way (parallel/nodes.py): this engine is node 0 and
    # hosts the rendezvous on master_addr:master_port (+1 for its workers' connections); the
    # other nodes run `pagoda worker`. Ranks split evenly over the nodes.
    nnodes: int = 1
    # who starts ranks 1..N-1: "mp" (this process; other nodes by `pagoda worker`) or "ray"
    # (a placement group on the Ray cluster, parallel/ray_executor.py)
    distributed_executor: str = "mp"
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # default: a free port (one node only)
    seed: int | None = None
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be fp32, bf16 or fp16, not {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", *KV_DTYPES):
            raise ValueError(f"kv_cache_dtype must be auto or one of {KV_DTYPES}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}")
        if self.dense_kernel not in ("auto", "fgemm", "onednn", "torch"):
            raise ValueError("dense_kernel must be auto, fgemm, onednn or torch")
        if self.quantization not in ("auto", *QUANT_METHODS):
            raise ValueError(f"quantization must be auto or one of {QUANT_METHODS}")
        if self.quant_kernel not in QUANT_KERNELS:
            raise ValueError(f"quant_kernel must be one of {QUANT_KERNELS}")
        if self.kv_cache_memory < 1:
            raise ValueError("kv_cache_memory must be positive")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be positive (leave it unset for the model's)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be positive (leave it unset for torch's)")
        if self.speculative_method not in (None, *SPECULATIVE_METHODS):
            raise ValueError("speculative_method must be ngram, draft or hybrid")
        if not self.uses_draft_model and self.draft_model is not None:
            raise ValueError("draft_model needs speculative_method draft or hybrid")
        if self.draft_quantization not in ("auto", "none", "int8", "int4", "gguf"):
            raise ValueError("draft_quantization must be auto, none, int8, int4 or gguf")
        if self.num_speculative_tokens is not None and not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("num_speculative_tokens must be between 1 and 16")
        alone = self.num_speculative_tokens_alone
        if alone is not None and (self.speculative_method is None or not 1 <= alone <= 16):
            raise ValueError("num_speculative_tokens_alone must be between 1 and 16, with a "
                             "speculative_method")
        if not 1 <= (self.prompt_lookup_min or 1) <= self.prompt_lookup_max:
            raise ValueError("prompt lookup sizes need 1 <= prompt_lookup_min <= "
                             "prompt_lookup_max")
        if self.task not in ("auto", "generate", "embed"):
            raise ValueError("task must be auto, generate or embed")
        if self.pooling is not None and self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}")
        if self.embed_attention not in ATTENTION_MODES:
            raise ValueError(f"embed_attention must be one of {ATTENTION_MODES}")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")
        if self.pipeline_parallel_size < 1:
            raise ValueError("pipeline_parallel_size must be at least 1")
        if self.nnodes < 1 or self.num_ranks % self.nnodes:
            raise ValueError(f"nnodes must be at least 1 and divide the {self.num_ranks} ranks "
                             "(tensor x pipeline parallel size) evenly")
        if self.distributed_executor not in ("mp", "ray"):
            raise ValueError("distributed_executor must be mp or ray")
        if self.distributed_executor == "ray" and self.nnodes > 1:
            raise ValueError("--distributed-executor ray places the ranks itself: leave "
                             "--nnodes at 1")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("ranks on several nodes need --master-port (and --master-addr, "
                             "this machine's address the other nodes reach)")
        if self.master_port is not None and not 0 < self.master_port < 65535:
            raise ValueError("master_port must be a TCP port below 65535 (the next one is used "
                             "too)")
        if self.speculative_max_batch is not None and self.speculative_max_batch < 1:
            raise ValueError("speculative_max_batch must be positive")

    def quantization_for(self, model_path: str, preloaded: bool = False) -> str:
        """`quantization` with auto settled for the model at `model_path` (see the field)."""
        if self.quantization != "auto":
            return self.quantization
        gguf = (not preloaded and model_path.endswith(".gguf") and self.device == "cpu"
                and self.dtype == "fp32")
        return "gguf" if gguf else "none"

    @property
    def num_ranks(self) -> int:
        """Processes one engine runs in: tensor x pipeline parallel size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def uses_draft_model(self) -> bool:
        return self.speculative_method in ("draft", "hybrid")

    @property
    def resolved_num_speculative_tokens(self) -> int:
        """Drafts per step; 0 when speculation is off (defaults measured: docs/spec_decode.md)."""
        if self.speculative_method is None:
            return 0
        if self.num_speculative_tokens is not None:
            return self.num_speculative_tokens
        return DEFAULT_SPECULATIVE_TOKENS[self.speculative_method]

    @property
    def resolved_num_speculative_tokens_alone(self) -> int:
        """Drafts per step while one request runs."""
        if self.speculative_method is None:
            return 0
        return self.num_speculative_tokens_alone or self.resolved_num_speculative_tokens

    def settle_for_weights(self, quantized_target: bool) -> EngineConfig:
        """This config with the choices that depend on whether the model's linears are quantized
        settled: prompt lookup's unset depths (in a batch and alone) and smallest n-gram
        (DEFAULT_NGRAM), and an auto KV cache dtype.

        Under auto, a model with quantized linears (GGUF blocks, int8, int4) computing in fp32
        keeps K/V in bf16, as llama-server and Ollama keep theirs in fp16: a decode step with
        long contexts is bound by reading the cache, and the kernels read half-precision caches
        in place. bf16, not fp16: it keeps fp32's exponent range; fp16 lost 1.7-1.9% perplexity
        on Gemma 3's GGUF where bf16 lost 0.1-0.3% (SmolLM2's GGUF, int8, int4: 0.2-0.3%;
        docs/quantization.md). An fp32 model keeps an fp32 cache: its greedy tokens are
        transformers' own."""
        depth, min_n, alone = DEFAULT_NGRAM[quantized_target]
        # hybrid's lookup drafts as deep as ngram's; its shorter matches go to the draft model
        ngram = self.speculative_method in ("ngram", "hybrid")
        if self.speculative_method == "hybrid":
            min_n = HYBRID_LOOKUP_MIN_N
        kv_dtype = self.kv_cache_dtype
        if kv_dtype == "auto":
            kv_dtype = "bf16" if quantized_target and self.dtype == "fp32" else self.dtype
        default_depth = self.speculative_method == "ngram" and self.num_speculative_tokens is None
        return replace(
            self, kv_cache_dtype=kv_dtype,
            num_speculative_tokens=(depth if ngram and self.num_speculative_tokens is None
                                    else self.num_speculative_tokens),
            num_speculative_tokens_alone=(alone if default_depth
                                          and self.num_speculative_tokens_alone is None
                                          else self.num_speculative_tokens_alone),
            prompt_lookup_min=self.prompt_lookup_min or min(min_n, self.prompt_lookup_max))

    @property
    def resolved_speculative_max_batch(self) -> int:
        if self.speculative_max_batch is not None:
            return self.speculative_max_batch
        if self.speculative_method is None:
            return 1  # unused: no request gets drafts
        return DEFAULT_SPECULATIVE_MAX_BATCH[self.speculative_method]

    @property
    def resolved_draft_max_batch(self) -> int:
        """Most requests the draft model drafts for in a step (its share of the KV budget)."""
        if self.speculative_method == "hybrid":
            return min(self.resolved_speculative_max_batch, HYBRID_MODEL_MAX_BATCH)
        return self.resolved_speculative_max_batch

    @property
    def resolved_kv_dtype(self) -> str:
        """The KV cache's dtype: the choice, or (auto, before `settle_for_weights`) the compute
        dtype."""
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype
