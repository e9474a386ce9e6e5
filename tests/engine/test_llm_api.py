"""The offline API: generate/chat outputs, n samples, logprobs, stop handling, errors, abort."""

from __future__ import annotations

import pytest

from pagoda.engine.llm_engine import RequestError
from pagoda.entrypoints.llm import LLM
from pagoda.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def llm(make_engine):
    return LLM.from_engine(make_engine())


def test_generate_fields_and_order(llm):
    outs = llm.generate(["The capital of France is", "1, 2, 3, 4,"],
                        SamplingParams(temperature=0, max_tokens=8))
    assert len(outs) == 2 and all(o.finished for o in outs)
    first = outs[0].outputs[0]
    assert first.finish_reason == "length" and len(first.token_ids) == 8
    assert first.text == llm.tokenizer.decode(first.token_ids)
    assert "Paris" in first.text
    assert outs[1].prompt == "1, 2, 3, 4,"


def test_chat_applies_template_and_stops_at_eos(llm):
    out = llm.chat([{"role": "user", "content": "Say hello."}],
                   SamplingParams(temperature=0, max_tokens=64))[0]
    assert out.prompt_token_ids[:2] == llm.tokenizer.encode("<|im_start|>system")
    assert out.outputs[0].finish_reason == "stop"
    assert "<|im_end|>" not in out.outputs[0].text and out.outputs[0].text.strip()


def test_n_samples_are_distinct_and_reproducible(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12)
    a = llm.generate("Once upon a time", params)[0]
    b = llm.generate("Once upon a time", params)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2, 3]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_seeded_sample_same_alone_and_in_a_busy_batch(llm):
    params = SamplingParams(temperature=1.0, seed=123, max_tokens=16)
    alone = llm.generate("My favourite food is", params)[0].outputs[0].token_ids
    crowd = llm.generate(["Tell me about cats"] * 5 + ["My favourite food is"],
                         [SamplingParams(temperature=1.0, max_tokens=20)] * 5 + [params])
    assert crowd[5].outputs[0].token_ids == alone


def test_logprobs(llm):
    out = llm.generate("The sky is", SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0]
    sample = out.outputs[0]
    assert len(sample.logprobs) == 5
    for token, lps in zip(sample.token_ids, sample.logprobs, strict=True):
        assert token in lps and 3 <= len(lps) <= 4
        assert max(lps.values()) == lps[token]  # greedy picks the most likely token
        assert all(v <= 0 for v in lps.values())


def test_stop_string_and_stop_token(llm):
    base = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=12))[0]
    text = base.outputs[0].text
    assert " 7" in text
    out = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=12,
                                                     stop=[" 7"]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == " 7"
    assert out.text == text[:text.index(" 7")]
    stop_id = base.outputs[0].token_ids[2]
    out = llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=12,
                                                     stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_id
    assert len(out.token_ids) == 3


def test_too_long_request_is_rejected_before_queueing(llm):
    engine = llm.engine
    with pytest.raises(RequestError, match="maximum context length"):
        llm.generate("hello", SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(RequestError):
        llm.generate("", SamplingParams())
    with pytest.raises(RequestError):
        llm.generate([engine.model_config.vocab_size + 5], SamplingParams())
    assert not engine.has_unfinished_requests()


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    total = engine.kv_cache_config.num_blocks
    engine.add_request("long", "Write an essay about the sea.",
                       SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.kv_manager.num_free_blocks < total
    final = engine.abort_request("long")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert engine.kv_manager.num_free_blocks == total
    assert not engine.has_unfinished_requests()
    engine.check_integrity()
