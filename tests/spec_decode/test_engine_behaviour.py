"""Speculation changes nothing a client can see but speed: stop strings inside accepted drafts,
max_tokens, logprobs, seeded sampling, aborts mid-verification, the per-request opt-out, and the
adaptive policy; a draft with another vocabulary is refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.entrypoints.llm import LLM
from pagoda.sampling.params import SamplingParams
from pagoda.scheduler.output import ScheduledRequest
from pagoda.spec_decode.ngram import SINGLE_TOKEN_MATCH_DEPTH, NgramProposer, lookup
from pagoda.spec_decode.setup import check_vocabulary
from tests.engine.helpers import run_to_completion

QUOTE = ("Repeat after me: the red fox ran past the old mill, the red fox ran past the old mill, "
         "the red fox ran past the old mill, the red fox")


def engine(loaded, method="ngram", draft=None, **kw):
    kw.setdefault("kv_cache_memory", 64 << 20)
    return LLMEngine(EngineConfig(progress=False, speculative_method=method, **kw),
                     loaded=loaded, draft=draft)


def outputs(eng, prompt, params):
    return LLM.from_engine(eng).generate([prompt], params)[0].outputs[0]


def test_ngram_lookup_takes_the_latest_longest_match():
    ctx = np.array([5, 1, 2, 3, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3])
    assert lookup(ctx, 2, 3, 2) == ([7, 8], 3)  # "1 2 3" last seen before 7 8
    assert lookup(ctx, 2, 3, 9) == ([7, 8, 4, 1, 2, 3], 3)
    assert lookup(np.array([1, 2, 3, 4]), 1, 3, 4) == ([], 0)
    assert lookup(np.array([4, 4, 4]), 1, 2, 3) == ([4], 2)
    assert lookup(np.array([6, 5, 7, 8, 9, 5]), 1, 3, 4) == ([7, 8, 9, 5], 1)


def windows_lookup(context: np.ndarray, min_n: int, max_n: int, k: int
                   ) -> tuple[list[int], int]:
    """lookup's definition, stated directly: every n-token window that ends before the last
    token, compared with the last n tokens, for n from the longest down."""
    length = len(context)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(context[:length - 1], n)
        hits = np.flatnonzero((windows == context[length - n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return context[start:start + k].tolist(), n
    return [], 0


def test_ngram_lookup_equals_comparing_every_window():
    rng = np.random.default_rng(0)
    for _ in range(3000):  # small vocabularies: many matches, of every length
        ctx = rng.integers(0, int(rng.integers(1, 6)), int(rng.integers(0, 50)))
        min_n = int(rng.integers(1, 4))
        max_n, k = int(rng.integers(min_n, 7)), int(rng.integers(1, 10))
        assert lookup(ctx, min_n, max_n, k) == windows_lookup(ctx, min_n, max_n, k)


def test_a_single_token_match_drafts_only_a_few_tokens():
    ctx = [6, 5, 7, 8, 9, 1, 2, 3, 4, 5]  # "5" matches one token: 7 8 9 1 ... follow it
    assert NgramProposer(1, 3).propose([scheduled(ctx)])["r"].token_ids == [
        7, 8, 9, 1, 2, 3, 4, 5][:SINGLE_TOKEN_MATCH_DEPTH]
    longer = ctx + [7]  # "5 7" matches two tokens: the draft takes all 8
    assert NgramProposer(1, 3).propose([scheduled(longer)])["r"].token_ids == [
        8, 9, 1, 2, 3, 4, 5, 7]


def scheduled(context: list[int]) -> ScheduledRequest:
    return ScheduledRequest("r", context[-1:], len(context) - 1, [[0]], True,
                            SamplingParams(temperature=0), 0, context[:2], context[2:],
                            num_spec_tokens=8)


STOP_AT_MILL = SamplingParams(temperature=0, max_tokens=48, stop=["old mill"])


@pytest.fixture(scope="module")
def stop_at_mill_off(loaded_model):
    """The stop-string request with speculation off (one run for the three methods)."""
    return outputs(engine(loaded_model, None), loaded_model.tokenizer.encode(QUOTE), STOP_AT_MILL)


@pytest.mark.parametrize("method", ["ngram", "draft", "hybrid"])
def test_stop_string_inside_accepted_drafts(loaded_model, gguf_draft, method, stop_at_mill_off):
    ids = loaded_model.tokenizer.encode(QUOTE)
    params = STOP_AT_MILL
    want = stop_at_mill_off
    eng = engine(loaded_model, method, None if method == "ngram" else gguf_draft)
    got = outputs(eng, ids, params)
    assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == (
        want.text, want.token_ids, want.finish_reason, want.stop_reason)
    assert eng.stats().spec_num_accepted_tokens > 0
    eng.check_integrity()


def test_max_tokens_and_logprobs_unchanged(loaded_model):
    ids = loaded_model.tokenizer.encode(QUOTE)
    # greedy with speculation off: each shorter request's tokens and logprobs are a prefix of
    # the longest one's (one run instead of one per max_tokens)
    longest = outputs(engine(loaded_model, None), ids, SamplingParams(
        temperature=0, max_tokens=13, ignore_eos=True, logprobs=3))
    assert len(longest.token_ids) == 13
    for max_tokens in (1, 2, 7, 13):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                logprobs=3)
        want_ids, want_logprobs = (longest.token_ids[:max_tokens],
                                   longest.logprobs[:max_tokens])
        got = outputs(engine(loaded_model, "ngram"), ids, params)
        assert got.token_ids == want_ids and len(got.token_ids) == max_tokens
        assert got.finish_reason == "length"
        for a, b in zip(got.logprobs, want_logprobs, strict=True):
            assert a.keys() == b.keys()
            assert all(abs(a[t] - b[t]) < 1e-3 for t in a)


SEEDED = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=32, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module")
def seeded_prompts(loaded_model):
    tok = loaded_model.tokenizer
    return {"quote": tok.encode(QUOTE),
            "story": tok.encode("Once upon a time, in a small village by the sea,")}


@pytest.fixture(scope="module")
def seeded_off(loaded_model, seeded_prompts):
    """Each seeded prompt alone with speculation off (one run for the three methods)."""
    off = engine(loaded_model, None)
    return {k: outputs(off, ids, SEEDED).token_ids for k, ids in seeded_prompts.items()}


@pytest.mark.parametrize("method", ["ngram", "draft", "hybrid"])
def test_seeded_sampling_equals_speculation_off_alone_and_in_a_batch(loaded_model, gguf_draft,
                                                                      method, seeded_prompts,
                                                                      seeded_off):
    """A seeded request's tokens are exactly its tokens without speculation, whatever drafted
    them and however many requests ran beside it (the batch size changes the drafts: the
    policy's solo rule, hybrid's model-or-lookup choice)."""
    tok = loaded_model.tokenizer
    prompts, params, want = seeded_prompts, SEEDED, seeded_off
    draft = None if method == "ngram" else gguf_draft
    eng = engine(loaded_model, method, draft, speculative_max_batch=8)
    alone = {k: outputs(eng, ids, params).token_ids for k, ids in prompts.items()}
    assert alone == want
    stats = eng.stats()
    assert stats.spec_num_accepted_tokens > 0
    assert stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens  # rejections too
    if method == "hybrid":
        assert eng.runner.proposer.num_model_drafts > 0  # the story has no repeats to look up
    others = {f"o{i}": (tok.encode(f"Story number {i}:"),
                        SamplingParams(temperature=1.0, max_tokens=20)) for i in range(4)}
    got = run_to_completion(eng, {**{k: (ids, params) for k, ids in prompts.items()}, **others},
                            arrivals={"quote": 2, "story": 3})
    assert {k: got[k] for k in prompts} == want
    eng.check_integrity()


def test_abort_mid_verification_frees_everything(loaded_model, gguf_draft):
    eng = engine(loaded_model, "draft", gguf_draft)
    ids = loaded_model.tokenizer.encode(QUOTE)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for rid in ("a", "b", "c"):
        eng.add_request(rid, ids, params)
    for _ in range(4):
        eng.step()
    real_submit = eng.runner.submit
    aborted = []

    def abort_during_verification(sched):
        """An abort that lands while a verify step with drafts for "b" is under way."""
        if not aborted and any(r.req_id == "b" and r.num_spec_tokens for r in sched.scheduled):
            eng.abort_request("b")
            aborted.append("b")
        return real_submit(sched)

    eng.runner.submit = abort_during_verification
    while eng.has_unfinished_requests():
        eng.step()
        if aborted and "a" in eng.scheduler.requests:
            eng.abort_request("a")
    assert aborted
    eng.check_integrity()
    assert eng.kv_manager.num_free_blocks == eng.kv_cache_config.num_blocks
    assert not eng.runner.proposer.held
    assert eng.runner.proposer.kv.num_free_blocks == eng.runner.proposer.kv.pool.num_blocks


def test_opt_out_and_batch_threshold(loaded_model):
    ids = loaded_model.tokenizer.encode(QUOTE)
    off = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, speculative=False)
    eng = engine(loaded_model, "ngram")
    outputs(eng, ids, off)
    assert eng.stats().spec_num_drafts == 0
    on = dataclasses.replace(off, speculative=True)
    eng = engine(loaded_model, "ngram", speculative_max_batch=2)
    run_to_completion(eng, {f"r{i}": (ids, on) for i in range(3)})
    drafted_crowded = eng.stats().spec_num_drafts
    # three requests exceed the threshold of 2 until the first of them ends
    assert 0 < drafted_crowded < 3 * 24 / 2
    eng = engine(loaded_model, "ngram", speculative_max_batch=3)
    run_to_completion(eng, {f"r{i}": (ids, on) for i in range(3)})
    assert eng.stats().spec_num_drafts > drafted_crowded


def test_metrics_count_drafts_and_acceptance(loaded_model):
    eng = engine(loaded_model, "ngram", num_speculative_tokens=3)
    outputs(eng, loaded_model.tokenizer.encode(QUOTE),
            SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    s = eng.stats()
    assert s.spec_num_drafts > 0 and len(s.spec_accepted_per_pos) == 3
    assert s.spec_num_accepted_tokens == sum(s.spec_accepted_per_pos) <= s.spec_num_draft_tokens
    assert list(s.spec_accepted_per_pos) == sorted(s.spec_accepted_per_pos, reverse=True)
    assert s.num_generation_tokens == 32


def test_draft_with_another_vocabulary_is_refused(loaded_model, gguf_draft):
    smaller = dataclasses.replace(gguf_draft, config=dataclasses.replace(
        gguf_draft.config, vocab_size=gguf_draft.config.vocab_size - 1))
    with pytest.raises(ValueError, match="vocabulary size"):
        check_vocabulary(loaded_model, smaller)

    class Raw:
        def get_vocab(self):
            vocab = loaded_model.tokenizer.raw.get_vocab()
            vocab["<|swapped|>"] = vocab.pop("hello")
            return vocab

    other = dataclasses.replace(gguf_draft, tokenizer=type("T", (), {"raw": Raw()})())
    with pytest.raises(ValueError, match="tokenizer differs"):
        check_vocabulary(loaded_model, other)
    with pytest.raises(ValueError, match="draft_model needs"):
        EngineConfig(speculative_method="ngram", draft_model="self")


def test_small_draft_pool_evicts_idle_state(loaded_model, gguf_draft):
    """A draft pool that holds one request's context: a request that needs blocks evicts the
    state of requests not drafting now; an evicted request is rebuilt by a catch-up pass and
    drafts exactly what a fresh draft would."""
    from pagoda.scheduler.output import ScheduledRequest

    eng = engine(loaded_model, "draft", gguf_draft, kv_cache_memory=8 * 256 * 46080,
                 max_num_seqs=16, speculative_max_batch=4)  # draft pool: 16 blocks
    proposer = eng.runner.proposer
    params = SamplingParams(temperature=0)

    def sreq(rid, text):
        ids = loaded_model.tokenizer.encode(text)
        return ScheduledRequest(rid, ids[-1:], len(ids) - 1, [], True, params, 0, ids[:-1], [],
                                num_spec_tokens=3)

    a, b = sreq("a", QUOTE * 4), sreq("b", "Another text. " + QUOTE * 4)
    first = proposer.propose([a])["a"].token_ids
    assert proposer.propose([b])["b"].token_ids  # needs a's blocks
    assert proposer.num_evicted == 1 and "a" not in proposer.held
    assert proposer.propose([a])["a"].token_ids == first
    proposer.kv.check_integrity()
    proposer.release(["a", "b"])
    assert proposer.kv.num_free_blocks == proposer.kv.pool.num_blocks


def test_prompt_lookup_defaults_are_settled_by_the_targets_weights(loaded_model, gguf_draft):
    fp32 = engine(loaded_model, "ngram")
    assert (fp32.config.num_speculative_tokens, fp32.config.prompt_lookup_min) == (8, 1)
    # a request alone may draft 16 on fp32 linears (the policy holds the limit)
    assert fp32.scheduler.spec.config.solo_num_speculative_tokens == 16
    quantized = engine(gguf_draft, "ngram")  # a target with 4/8-bit linears
    assert (quantized.config.num_speculative_tokens, quantized.config.prompt_lookup_min) == (4, 2)
    assert quantized.scheduler.spec.config.solo_num_speculative_tokens == 4


def test_hybrid_drafts_by_lookup_where_the_context_repeats(loaded_model, gguf_draft):
    """A context whose last 3 tokens occurred before drafts their continuation by lookup (the
    draft model does not run for it); any other context asks the draft model, for at most
    DRAFT_DEPTH tokens, while at most 2 requests draft. Its defaults: lookup from 3-token
    matches, as deep as ngram's."""
    from pagoda.spec_decode.hybrid import DRAFT_DEPTH, HybridProposer

    eng = engine(loaded_model, "hybrid", gguf_draft)
    assert (eng.config.num_speculative_tokens, eng.config.prompt_lookup_min) == (8, 3)
    proposer = eng.runner.proposer
    assert isinstance(proposer, HybridProposer) and proposer.draft_depth == DRAFT_DEPTH == 4
    repeats = [9, 1, 2, 3, 7, 8, 4, 5, 6, 0, 1, 2, 3]  # "1 2 3" seen before 7 8 4 ...
    assert proposer.propose([scheduled(repeats)])["r"].token_ids == [7, 8, 4, 5, 6, 0, 1, 2]
    assert "r" not in proposer.model.held  # the model never saw it
    two = [9, 1, 2, 7, 8, 4, 5, 6, 0, 1, 2]  # only "1 2" repeats: the model's turn
    got = proposer.propose([scheduled(two)])["r"]
    assert 0 < len(got.token_ids) <= DRAFT_DEPTH and proposer.model.held["r"]
    assert got.token_ids == eng.runner.proposer.model.propose(
        [dataclasses.replace(scheduled(two), num_spec_tokens=DRAFT_DEPTH)])["r"].token_ids
    proposer.release(["r"])
    # more than MODEL_MAX_BATCH requests drafting: lookup only, the model stays idle
    crowd = [dataclasses.replace(scheduled(two), req_id=f"c{i}") for i in range(3)]
    assert proposer.model_max_batch == 2 and proposer.propose(crowd) == {}
    assert not proposer.model.held
    assert engine(loaded_model, "hybrid", gguf_draft,
                  num_speculative_tokens=2).runner.proposer.draft_depth == 2
    # through the engine: both kinds of draft happen and are accepted on a quoting prompt
    ids = loaded_model.tokenizer.encode("Tell me a story. " + QUOTE)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    assert (outputs(eng, ids, params).token_ids
            == outputs(engine(loaded_model, None), ids, params).token_ids)
    assert proposer.num_lookup_drafts > 0 and proposer.num_model_drafts > 0
    assert eng.stats().spec_num_accepted_tokens > 0


def test_hybrid_gates_a_draft_model_whose_drafts_are_rejected(loaded_model, gguf_draft):
    """The model's acceptance is read from the context at the next step: a request whose model
    drafts are never kept soon gets them only as a probe every PROBE_EVERY steps, as under the
    draft method's policy, even alone (where lookup's floors would draft at every step)."""
    from pagoda.scheduler.spec_policy import PROBE_EVERY

    proposer = engine(loaded_model, "hybrid", gguf_draft).runner.proposer
    context = [9, 1, 2, 7, 8]  # no 3-token run repeats: the model's turn at every step
    drafted = []
    for step in range(4 * PROBE_EVERY):
        draft = proposer.propose([scheduled(context)]).get("r")
        drafted.append(len(draft.token_ids) if draft else 0)
        # the model's first token is never what the target verified
        wrong = draft.token_ids[0] + 1 if draft else 3
        context = context + [wrong % 1000 + 100 + step]
    assert drafted[0] == 4 and sum(drafted[:3]) > 3  # the prior's acceptance: full depth
    late = drafted[2 * PROBE_EVERY:]
    assert late.count(0) >= len(late) - 3 and max(late) == 1  # probes, one token each
    proposer.release(["r"])
    assert not proposer.states and not proposer.pending


def test_hybrid_on_the_drafts_own_weights_drafts_by_lookup_alone(caplog):
    """The default GGUF served on its own blocks: a self-draft would have the same weights (each
    draft token costing a model token), so hybrid keeps prompt lookup and loads no draft."""
    eng = LLMEngine(EngineConfig(progress=False, kv_cache_memory=32 << 20,
                                 speculative_method="hybrid", draft_model="self"))
    assert eng.config.quantization == "gguf" and eng.config.speculative_method == "ngram"
    assert isinstance(eng.runner.proposer, NgramProposer) and eng.draft is None
    assert eng.config.prompt_lookup_min == 2  # ngram's own default on quantized weights
    assert "drafting by prompt lookup only" in caplog.text


def test_the_draft_follows_the_engines_kernel_options(loaded_model, gguf_draft):
    """`--fused-ops off` reaches the draft model too, and an fp32 draft's linears take the
    engine's `--dense-kernel` (its own product, not torch's default, where fgemm runs)."""
    from pagoda.layers.dense_linear import resolve_kernel

    engine(loaded_model, "draft", gguf_draft, fused_ops=False)
    assert gguf_draft.model.fused is None
    engine(loaded_model, "draft", gguf_draft)  # auto: quantized, so fused
    assert gguf_draft.model.fused is not None
    if resolve_kernel("auto") is None:
        pytest.skip("neither fgemm's vector build nor oneDNN runs here: fp32 stays on torch")
    fp32 = engine(loaded_model, "draft", draft_quantization="none").draft
    kernels = {getattr(m, "kernel", None) for m in fp32.model.modules()
               if isinstance(m, torch.nn.Linear)}
    assert kernels == {resolve_kernel("auto")}
