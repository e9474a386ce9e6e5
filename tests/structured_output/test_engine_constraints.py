"""Constrained decoding inside the engine: valid output, no effect on free neighbours, exact
under speculation and preemption, state freed on abort, compiles off the step."""

from __future__ import annotations

import json
from concurrent.futures import Future

import jsonschema
import pytest

from pagoda.engine.request_validator import RequestError
from pagoda.sampling.constraint import StructuredOutputs
from pagoda.sampling.params import SamplingParams
from tests.engine.helpers import run_to_completion
from tests.structured_output.schemas import SCHEMAS, chat_for

CHOICES = ["yes", "no", "maybe so"]


def chat_ids(tokenizer, messages):
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


def run(engine, requests):
    """{req_id: (prompt ids, params)} -> {req_id: [(text, finish_reason) per sample]}."""
    out: dict[str, dict[int, list]] = {rid: {} for rid in requests}
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    steps = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            for s in o.outputs:
                entry = out[o.req_id].setdefault(s.index, ["", None])
                entry[0] += s.text
                entry[1] = s.finish_reason or entry[1]
        steps += 1
        assert steps < 20_000
    return {rid: [tuple(v) for _, v in sorted(samples.items())] for rid, samples in out.items()}


def json_params(schema, **kw):
    kw.setdefault("max_tokens", 200)
    return SamplingParams(structured_outputs=StructuredOutputs.json_schema(schema), **kw)


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(kv_cache_memory=64 << 20)


def test_constrained_outputs_parse_and_validate_greedy_and_sampled(engine):
    tok = engine.tokenizer
    chosen = SCHEMAS[::3]
    requests = {}
    for i, (desc, schema) in enumerate(chosen):
        ids = chat_ids(tok, chat_for(desc))
        requests[f"g{i}"] = (ids, json_params(schema, temperature=0))
        requests[f"s{i}"] = (ids, json_params(schema, temperature=1.0, seed=i, n=2))
    results = run(engine, requests)
    for rid, samples in results.items():
        schema = chosen[int(rid[1:])][1]
        for text, finish in samples:
            assert finish == "stop", (rid, text)
            jsonschema.validate(json.loads(text), schema)
    assert not engine.structured._matchers and not engine.structured._pending


def test_choice_ends_exactly_when_the_grammar_accepts(engine):
    ids = chat_ids(engine.tokenizer, [{"role": "user", "content": "Will it rain?"}])
    choice = StructuredOutputs.choice(CHOICES)
    requests = {f"c{i}": (ids, SamplingParams(temperature=1.5, seed=i, max_tokens=20,
                                              structured_outputs=choice)) for i in range(6)}
    requests["regex"] = (ids, SamplingParams(temperature=0, max_tokens=20, structured_outputs=(
        StructuredOutputs("regex", r"[0-9]{3}-[0-9]{4}"))))
    requests["lark"] = (ids, SamplingParams(temperature=1.0, seed=7, max_tokens=20,
                                            structured_outputs=StructuredOutputs(
        "grammar", 'start: ANSWER " (" NUM "%)"\nANSWER: "yes" | "no"\nNUM: /[0-9]{1,2}/')))
    results = run(engine, requests)
    for rid, [(text, finish)] in results.items():
        assert finish == "stop"
        if rid == "lark":
            answer, _, rest = text.partition(" (")
            assert answer in ("yes", "no") and rest.endswith("%)") and rest[:-2].isdigit()
        elif rid == "regex":
            assert len(text) == 8 and text[3] == "-" and text.replace("-", "").isdigit()
        else:
            assert text in CHOICES


def test_output_cut_by_max_tokens_reports_length(engine):
    ids = chat_ids(engine.tokenizer, chat_for("a team of two people"))
    [(text, finish)] = run(engine, {"r": (ids, json_params(SCHEMAS[13][1], temperature=0,
                                                           max_tokens=6))})["r"]
    assert finish == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_free_requests_get_the_tokens_they_get_alone(make_engine, engine):
    tok = engine.tokenizer
    free = {f"f{i}": (tok.encode(p), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
            for i, p in enumerate(["The capital of France is", "def fibonacci(n):",
                                   "Once upon a time"])}
    alone = make_engine(kv_cache_memory=64 << 20, max_num_seqs=1)
    want = run_to_completion(alone, free)
    mixed = dict(free)
    # the constrained neighbours run beside the free requests' 24 tokens and a few more; their
    # own outputs are not what this test reads, so they need not run to the end of their JSON
    for i, (desc, schema) in enumerate(SCHEMAS[:4]):
        mixed[f"c{i}"] = (chat_ids(tok, chat_for(desc)), json_params(schema, temperature=0,
                                                                     max_tokens=32))
    got = run_to_completion(engine, mixed)
    for rid in free:
        assert got[rid] == want[rid], rid


@pytest.fixture(scope="module")
def speculation_requests(loaded_model):
    tok = loaded_model.tokenizer
    example = '{"fruits": ["apple", "pear", "plum"]}'
    requests = {}
    for i, (desc, schema) in enumerate(SCHEMAS[:8]):
        messages = [{"role": "user", "content": f"Example: {example}. Now JSON for {desc}."}]
        requests[f"c{i}"] = (chat_ids(tok, messages), json_params(schema, temperature=0))
    requests["lark"] = (tok.encode("Count: 1, 2, 3, 4, 5, 6"), SamplingParams(
        temperature=0, max_tokens=30, structured_outputs=StructuredOutputs(
            "grammar", 'start: (" " NUM ",")+ " done"\nNUM: /[0-9]+/')))
    requests["bias"] = (tok.encode("1, 2, 3, 4, 5,"), SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True, logit_bias={17: 4.0, 28: -3.0}))
    return requests


@pytest.fixture(scope="module")
def speculation_off(make_engine, speculation_requests):
    """The requests with speculation off (one run serves both methods)."""
    return run_to_completion(make_engine(kv_cache_memory=64 << 20), speculation_requests)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculation_keeps_constrained_output_identical(loaded_model, gguf_draft, method,
                                                        speculation_requests, speculation_off):
    from pagoda.engine.config import EngineConfig
    from pagoda.engine.llm_engine import LLMEngine

    requests, plain = speculation_requests, speculation_off
    spec = LLMEngine(EngineConfig(progress=False, speculative_method=method,
                                  speculative_max_batch=64, kv_cache_memory=64 << 20),
                     loaded=loaded_model, draft=gguf_draft if method == "draft" else None)
    assert run_to_completion(spec, requests) == plain
    assert spec.stats().spec_num_accepted_tokens > 0
    assert not spec.structured._matchers


def test_seeded_sampling_with_speculation_stays_valid(loaded_model):
    from pagoda.engine.config import EngineConfig
    from pagoda.engine.llm_engine import LLMEngine

    spec = LLMEngine(EngineConfig(progress=False, speculative_method="ngram",
                                  speculative_max_batch=64, kv_cache_memory=64 << 20),
                     loaded=loaded_model)
    tok = loaded_model.tokenizer
    requests = {f"s{i}": (chat_ids(tok, chat_for(desc)), json_params(
        schema, temperature=0.8, seed=i)) for i, (desc, schema) in enumerate(SCHEMAS[3:9])}
    for rid, [(text, finish)] in run(spec, requests).items():
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMAS[3 + int(rid[1:])][1])


def test_preemption_keeps_the_grammar_state(make_engine, engine):
    tok = engine.tokenizer
    requests = {f"c{i}": (chat_ids(tok, chat_for(desc)), json_params(
        schema, temperature=0, max_tokens=120)) for i, (desc, schema) in enumerate(SCHEMAS[:6])}
    want = run_to_completion(engine, requests)
    # 16 blocks of 16 tokens (46080 bytes per token): a request needs up to 10, so they
    # preempt each other
    tiny = make_engine(kv_cache_memory=16 * 16 * 46080)
    got = run_to_completion(tiny, requests)
    assert tiny.scheduler.num_preemptions > 0
    assert got == want
    tiny.check_integrity()


def test_abort_frees_grammar_state_while_compiling_and_running(engine):
    ids = chat_ids(engine.tokenizer, chat_for("a person"))
    engine.add_request("early", ids, json_params({"type": "object", "properties": {
        "fresh_field_for_abort_test": {"type": "string"}}}, temperature=0))
    engine.abort_request("early")  # (very likely) still compiling
    engine.add_request("late", ids, json_params(SCHEMAS[0][1], temperature=0))
    while not engine.structured.has("late"):
        engine.step()
    engine.step()
    engine.abort_request("late")
    assert not engine.structured._matchers and not engine.structured._pending
    assert not engine.compiling and not engine.has_unfinished_requests()


def test_a_compiling_grammar_does_not_stall_the_batch(engine, monkeypatch):
    never: Future = Future()
    monkeypatch.setattr(engine.structured.compiler, "submit", lambda c: never)
    tok = engine.tokenizer
    bounded = {"type": "integer", "minimum": 0, "maximum": 999}
    engine.add_request("slow", tok.encode("Hi"), json_params(bounded))
    engine.add_request("free", tok.encode("Hi"), SamplingParams(temperature=0, max_tokens=8,
                                                                ignore_eos=True))
    finished = set()
    for _ in range(40):
        finished |= {o.req_id for o in engine.step() if o.finished}
        if "free" in finished:
            break
    assert "free" in finished and "slow" not in finished
    assert engine.stats().num_waiting == 1  # counted as waiting while its grammar compiles
    monkeypatch.undo()
    never.set_result(engine.structured.compiler.compile_now(
        StructuredOutputs.json_schema(bounded)))
    while engine.has_unfinished_requests():
        finished |= {o.req_id for o in engine.step() if o.finished}
    assert "slow" in finished


def test_logit_bias_and_allowed_token_ids(engine):
    tok = engine.tokenizer
    ids = tok.encode("The capital of France is")
    free = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    base = run_to_completion(engine, {"b": (ids, free)})["b"]
    forced = run_to_completion(engine, {"f": (ids, SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, logit_bias={42: 100}))})["f"]
    assert forced == [42] * 6
    banned = run_to_completion(engine, {"x": (ids, SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, logit_bias={base[0]: -100}))})["x"]
    assert banned[0] != base[0] and base[0] not in banned
    allowed = [base[0], 42, 100, 1000]
    got = run_to_completion(engine, {"a": (ids, SamplingParams(
        temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed))})
    assert set(got["a"]) <= set(allowed)


def test_engine_refuses_a_bad_constraint_and_out_of_vocabulary_ids(engine):
    ids = engine.tokenizer.encode("Hi")
    with pytest.raises(RequestError, match="'not'"):
        engine.add_request("bad", ids, json_params({"not": {"type": "string"}}))
    with pytest.raises(RequestError) as err:
        engine.add_request("oov", ids, SamplingParams(logit_bias={10**6: 1.0}))
    assert err.value.param == "logit_bias"
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("method", [None, "ngram"])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_position_that_allows_no_token_fails_only_that_request(make_engine, loaded_model,
                                                                  method, temperature):
    """`(ab){3}c` with allowed_token_ids of 'a' and 'b' only: after "ababab" no token is
    allowed. The request fails there with its text so far (an excluded token was once sampled
    as token 0), with or without speculation; its neighbour is untouched."""
    from pagoda.engine.config import EngineConfig
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.engine.outputs import REQUEST_ERROR

    tok = loaded_model.tokenizer
    a, b = (tok.encode(x, add_special_tokens=False)[0] for x in ("a", "b"))
    engine = LLMEngine(EngineConfig(progress=False, speculative_method=method,
                                    speculative_max_batch=64, kv_cache_memory=64 << 20),
                       loaded=loaded_model)
    dead = SamplingParams(temperature=temperature, seed=1, max_tokens=12, allowed_token_ids=[a, b],
                          structured_outputs=StructuredOutputs("regex", "(ab){3}c"))
    free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = tok.encode("ababab ababab ababab")
    engine.add_request("dead", prompt, dead)
    engine.add_request("free", prompt, free)
    texts, ids, final = {"dead": "", "free": ""}, {"dead": [], "free": []}, {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            texts[o.req_id] += "".join(s.text for s in o.outputs)
            ids[o.req_id] += [t for s in o.outputs for t in s.token_ids]
            if o.finished:
                final[o.req_id] = o
    assert texts["dead"] == "ababab" and final["dead"].outputs[0].finish_reason == "abort"
    assert final["dead"].error.startswith(REQUEST_ERROR + "no token is allowed")
    assert final["free"].error is None
    alone = run_to_completion(make_engine(kv_cache_memory=64 << 20), {"f": (prompt, free)})
    assert ids["free"] == alone["f"]
    assert not engine.structured._matchers
    engine.scheduler.check_integrity()
