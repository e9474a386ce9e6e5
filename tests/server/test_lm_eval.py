"""lm-evaluation-harness (`local-completions`, remote tokenizer) against the real server, on a
tiny task written here (no dataset download): loglikelihood and generate_until both run, and
the loglikelihoods equal Pagoda's own offline scoring of the same continuations."""

from __future__ import annotations

import json
import math

import pytest

from pagoda.sampling.params import SamplingParams

DOCS = [{"question": "The capital of France is", "choices": [" Paris", " Rome", " a cat"],
         "answer": 0},
        {"question": "Two plus two equals", "choices": [" four", " seven"], "answer": 0},
        {"question": "The opposite of hot is", "choices": [" cold", " blue", " loud"],
         "answer": 0}]
MC = """task: pagoda_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN = """task: pagoda_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_local_completions(server, offline, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")  # a dev extra: always installed
    from lm_eval.tasks import TaskManager

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "mc.yaml").write_text(MC.format(data=data))
    (tmp_path / "gen.yaml").write_text(GEN.format(data=data))
    monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=(f"base_url={server.url}/v1/completions,model=SmolLM2-135M-Instruct,"
                    f"tokenizer_backend=remote,auth_token={server.api_key},num_concurrent=1,"
                    "max_retries=1,batch_size=4"),
        tasks=["pagoda_tiny_mc", "pagoda_tiny_gen"],
        # only the two tasks written here: indexing lm-eval's thousands of bundled task files
        # (include_defaults) takes ~8 s and none of them is run
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True)
    assert 0.0 <= results["results"]["pagoda_tiny_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in results["results"]["pagoda_tiny_gen"]
    tok = offline.tokenizer
    checked = 0
    for sample in results["samples"]["pagoda_tiny_mc"]:
        doc = sample["doc"]
        for choice, resp in zip(doc["choices"], sample["resps"], strict=True):
            context = tok.encode(doc["question"], add_special_tokens=False)
            whole = tok.encode(doc["question"] + choice, add_special_tokens=False)
            assert whole[:len(context)] == context  # the continuation tokenizes on its own
            want = _offline_loglikelihood(offline, whole, len(context))
            assert math.isclose(resp[0][0], want, abs_tol=1e-4), (choice, resp, want)
            checked += 1
    assert checked == 8
    for sample in results["samples"]["pagoda_tiny_gen"]:
        [[text]] = sample["resps"]
        want = offline(sample["doc"]["question"], SamplingParams(
            temperature=0, max_tokens=6, stop=["\n"], seed=1234))[0]
        assert text == want


def _offline_loglikelihood(offline, ids: list[int], context_len: int) -> float:
    engine_out = offline.score(ids)
    return sum(engine_out[i][ids[i]] for i in range(context_len, len(ids)))
