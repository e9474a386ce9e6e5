"""Structured output against free generation, in the same run, on the fp32 default model.

Sections:
  w1        W1-shaped load: 32 concurrent chat requests x 128 output tokens, every request under a
            JSON schema vs the same load unconstrained. The schema (an array of at least 40
            strings) cannot finish inside 128 tokens, so both loads generate exactly 128 tokens
            per request and the batches have the same shape: the ratio is the cost of masking.
  compile   grammar compile time of a 20-property schema: cold (a new schema each time) and
            cached (the same schema again), through Pagoda's GrammarCompiler (LRU, worker thread)
  backends  xgrammar vs llguidance on the same schema and vocabulary: compile, and the per-token
            mask time along a valid 167-token JSON (llguidance only if installed:
            pip install llguidance)

    python benchmarks/structured_output.py [--sections w1,compile,backends] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.loader.model_loader import load_model
from pagoda.sampling.constraint import StructuredOutputs
from pagoda.sampling.params import SamplingParams
from pagoda.structured_output.grammar import build_grammar
from pagoda.structured_output.grammar_compiler import GrammarCompiler

LONG_LIST = {"type": "object", "properties": {"items": {
    "type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 40},
    "minItems": 40}}, "required": ["items"]}
TOPICS = ["fruits", "cities", "rivers", "animals", "colours", "tools", "songs", "books"]
KINDS = [{"type": "string", "maxLength": 30}, {"type": "integer", "minimum": 0, "maximum": 100},
         {"type": "number"}, {"type": "boolean"}, {"type": "array", "items": {"type": "string"}},
         {"type": "string", "enum": ["a", "bb", "ccc"]}]


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name")), "unknown CPU")
    flags = open("/proc/cpuinfo").read()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f" {f}" in flags]
    return f"{name} ({', '.join(isa)})"


def twenty_properties(tag: str) -> dict:
    props = {f"{tag}_{i}": KINDS[i % len(KINDS)] for i in range(20)}
    return {"type": "object", "properties": props, "required": list(props)[:12]}


def run_load(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> float:
    """All prompts at once (the scheduler batches up to max_num_seqs); output tokens/s."""
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", ids, params)
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.token_ids) for out in engine.step() for o in out.outputs)
    return tokens / (time.perf_counter() - start)


def section_w1(engine: LLMEngine, concurrency: int, max_tokens: int, repeats: int) -> None:
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": (
        f"List as many {TOPICS[i % len(TOPICS)]} as you can, as JSON.")}]),
        add_special_tokens=False) for i in range(concurrency)]
    free = SamplingParams(temperature=0.7, seed=1, max_tokens=max_tokens, ignore_eos=True)
    schema = SamplingParams(temperature=0.7, seed=1, max_tokens=max_tokens,
                            structured_outputs=StructuredOutputs.json_schema(LONG_LIST))
    run_load(engine, prompts[:2], schema)  # warm-up: compile the grammar, touch the kernels
    rows = {"unconstrained": [], "json schema": []}
    for _ in range(repeats):  # interleaved, so drift on a noisy machine hits both
        rows["unconstrained"].append(run_load(engine, prompts, free))
        rows["json schema"].append(run_load(engine, prompts, schema))
    base = statistics.median(rows["unconstrained"])
    print(f"\nW1-shaped: {concurrency} concurrent x {max_tokens} output tokens, "
          f"median of {repeats}")
    print(f"{'load':<16}{'out tok/s':>12}{'ratio':>8}   runs")
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"{name:<16}{med:>12.1f}{med / base:>8.2f}   "
              + " ".join(f"{v:.1f}" for v in values))


def section_compile(engine: LLMEngine, repeats: int) -> None:
    compiler = GrammarCompiler(engine.tokenizer.hf, engine.model_config.vocab_size,
                               engine.tokenizer.eos_token_ids)
    start = time.perf_counter()
    compiler.warm_up().result()
    info_s = time.perf_counter() - start
    cold, cached = [], []
    for i in range(repeats):
        constraint = StructuredOutputs.json_schema(twenty_properties(f"f{i}"))
        start = time.perf_counter()
        compiler.compile_now(constraint)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        compiler.compile_now(constraint)
        cached.append(time.perf_counter() - start)
    print(f"\nGrammar compile, 20-property schema ({repeats} schemas; tokenizer view built once "
          f"in {info_s * 1e3:.0f} ms)")
    print(f"cold   median {statistics.median(cold) * 1e3:8.2f} ms   max {max(cold) * 1e3:.2f} ms")
    print(f"cached median {statistics.median(cached) * 1e3:8.4f} ms   "
          f"max {max(cached) * 1e3:.4f} ms")
    compiler.shutdown()


def valid_document() -> str:
    values = {"string": "hello", "integer": 5, "number": 2.5, "boolean": True,
              "array": ["x"]}
    doc = {}
    for i, kind in enumerate(KINDS * 4):
        doc[f"f_{i}"] = "bb" if "enum" in kind else values[kind["type"]]
        if i == 19:
            break
    return json.dumps(doc)


def section_backends(engine: LLMEngine) -> None:
    import xgrammar as xgr

    hf, vocab = engine.tokenizer.hf, engine.model_config.vocab_size
    schema = json.dumps(twenty_properties("f"))
    ids = hf.encode(valid_document(), add_special_tokens=False)
    print(f"\nBackends: 20-property schema, mask along a valid {len(ids)}-token document")
    print(f"{'backend':<12}{'compile ms':>12}{'mask median us':>16}{'mask p99 us':>13}")
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    start = time.perf_counter()
    compiled = compiler.compile_grammar(build_grammar(StructuredOutputs.json_schema(schema)))
    compile_ms = (time.perf_counter() - start) * 1e3
    matcher, bitmask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, vocab)
    times = []
    for t in ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        times.append(time.perf_counter() - start)
        assert matcher.accept_token(t)
    _print_backend("xgrammar", compile_ms, times)
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        print("llguidance   (not installed: pip install llguidance)")
        return
    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)  # flexible whitespace
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    compile_ms = (time.perf_counter() - start) * 1e3
    bitmask, times = llguidance.torch.allocate_token_bitmask(1, vocab), []
    for t in ids:
        start = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        times.append(time.perf_counter() - start)
        assert matcher.consume_token(t)
    _print_backend("llguidance", compile_ms, times)


def _print_backend(name: str, compile_ms: float, times: list[float]) -> None:
    times = sorted(times)
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    print(f"{name:<12}{compile_ms:>12.2f}{statistics.median(times) * 1e6:>16.1f}"
          f"{p99 * 1e6:>13.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="w1,compile,backends")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sections = args.sections.split(",")
    print(f"CPU: {cpu_name()}")
    loaded = load_model(progress=False)
    engine = LLMEngine(EngineConfig(progress=False, max_num_seqs=max(args.concurrency, 1),
                                    kv_cache_memory=512 << 20), loaded=loaded)
    if "w1" in sections:
        section_w1(engine, args.concurrency, args.max_tokens, args.repeats)
    if "compile" in sections:
        section_compile(engine, max(args.repeats, 10))
    if "backends" in sections:
        section_backends(engine)


if __name__ == "__main__":
    main()
