"""Speculative decoding against speculation off, in the same run, on the fp32 default model.

Sections (each prints a table of output tokens/s, the ratio to speculation off, acceptance):
  grounded  batch-1 decode of prompts whose answers quote their input (summarize, edit, answer
            from a context), greedy: prompt lookup (ngram), the low-bit self-draft, and both
            (hybrid: lookup where a 3-token run repeats, the self-draft elsewhere); each answer
            runs to --max-tokens (ignore_eos)
  grounded-eos  the same, each answer ending at its end of text (what a user receives)
  chat      batch-1 chat-page prompts at the page's defaults (temperature 0.7)
  depth     tokens/s by num_speculative_tokens (the default's measurement)
  lookup    prompt lookup's (depth, smallest n-gram) pairs on grounded and chat prompts (the
            measurement behind its defaults, which differ for fp32 and quantized targets)
  batch     B concurrent grounded requests, speculation forced on vs off: where it stops paying
            (the measurement behind speculative_max_batch)
  w1        W1: 32 requests x (128 prompt, 128 output) tokens at 32 concurrent, adaptive policy

    python benchmarks/spec_decode.py [--sections grounded,grounded-eos,chat,depth,lookup,batch,w1]
                                     [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import time
from importlib import resources

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.loader.model_loader import LoadedModel, load_model
from pagoda.quant import apply_quantization
from pagoda.sampling.params import SamplingParams

CHAT = [
    "What are three tips for staying healthy?",
    "Write a short poem about the sea.",
    "Explain what a CPU cache is, simply.",
    "Give me a recipe for pancakes.",
    "How do I reverse a list in Python?",
    "What is the difference between weather and climate?",
]
TASKS = [
    "Rewrite the following text with correct punctuation, keeping every word:\n\n{text}",
    "Repeat the following passage word for word:\n\n{text}",
    "Here is a passage:\n\n{text}\n\nQuote the first two sentences of the passage exactly.",
    "Summarize this text, quoting its key phrases:\n\n{text}",
    "Fix any typos in this text and return it in full:\n\n{text}",
    "Context:\n{text}\n\nQuestion: what does the passage say? Answer using its own words.",
]


def passages(num: int, words: int = 90) -> list[str]:
    text = resources.files("pagoda.data").joinpath("devils_dictionary.txt").read_text()
    body = " ".join(text.split()[2000:])
    tokens = body.split()
    rng = random.Random(0)
    starts = [rng.randrange(0, len(tokens) - words) for _ in range(num)]
    return [" ".join(tokens[s:s + words]) for s in starts]


def chat_ids(loaded: LoadedModel, content: str) -> list[int]:
    tok = loaded.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": content}]),
                      add_special_tokens=False)


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams,
        concurrency: int) -> tuple[float, int, float]:
    """(output tokens/s, output tokens, decode tokens/s) for the prompts at `concurrency`
    requests in flight. Output tokens/s counts the whole run, prefills included; decode
    tokens/s is what a user watches once text flows: each request's tokens after its first,
    over the time from its first token to its last (1 / TPOT, averaged over the tokens), which
    is the rate speculation changes (a prefill costs the same with it or without)."""
    pending = list(enumerate(prompts))
    tokens = 0
    first: dict[str, float] = {}
    after_first: dict[str, int] = {}
    last: dict[str, float] = {}
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and engine.scheduler.num_unfinished < concurrency:
            i, p = pending.pop(0)
            engine.add_request(f"r{i}-{time.monotonic_ns()}", p, params)
        for out in engine.step():
            n = sum(len(o.token_ids) for o in out.outputs)
            now = time.perf_counter()
            tokens += n
            if n and out.req_id not in first:
                first[out.req_id], after_first[out.req_id] = now, n - 1
            elif n:
                after_first[out.req_id] += n
                last[out.req_id] = now
    spans = sum(last[r] - first[r] for r in last)
    decode = sum(after_first[r] for r in last) / spans if spans else 0.0
    return tokens / (time.perf_counter() - start), tokens, decode


class Bench:
    def __init__(self, args: argparse.Namespace, with_draft: bool = True):
        self.args = args
        self.loaded = load_model(None)
        if args.target_quantization != "none":  # the default engine's weights: --target-... gguf
            apply_quantization(self.loaded, args.target_quantization)
        self.draft = None
        if with_draft:
            self.draft = load_model(self.loaded.path, progress=False)
            apply_quantization(self.draft, args.draft_quantization)

    def engine(self, method: str | None, **kw) -> LLMEngine:
        kw.setdefault("max_num_seqs", 32)
        cfg = EngineConfig(progress=False, kv_cache_memory=512 << 20,
                           speculative_method=method, **kw)
        return LLMEngine(cfg, loaded=self.loaded,
                         draft=self.draft if method in ("draft", "hybrid") else None)

    def compare(self, title: str, prompts: list[list[int]], params: SamplingParams,
                concurrency: int, configs: list[tuple[str, str | None, dict]]) -> None:
        warm = self.engine(None)
        run(warm, prompts[:1], SamplingParams(temperature=0, max_tokens=8), 1)
        print(f"\n## {title}\n")
        print("| configuration | output tok/s | vs off | decode tok/s | vs off | drafted "
              "| accepted | acceptance | tokens / verify pass |")
        print("|---|---|---|---|---|---|---|---|---|")
        base = decode_base = None
        for label, method, kw in configs:
            engine = self.engine(method, **kw)
            tps, _, decode = run(engine, prompts, params, concurrency)
            base, decode_base = base or tps, decode_base or decode
            s = engine.stats()
            acc = s.spec_num_accepted_tokens / s.spec_num_draft_tokens if s.spec_num_drafts else 0
            per_pass = 1 + s.spec_num_accepted_tokens / s.spec_num_drafts if s.spec_num_drafts \
                else 1
            print(f"| {label} | {tps:.1f} | {tps / base:.2f}x | {decode:.1f} | "
                  f"{decode / decode_base:.2f}x | {s.spec_num_draft_tokens} | "
                  f"{s.spec_num_accepted_tokens} | {acc:.0%} | {per_pass:.2f} |", flush=True)

    def grounded(self) -> list[list[int]]:
        """Each task over --passages-per-task passages (task-major: the first six prompts are
        the one-passage set whatever the count)."""
        per = self.args.passages_per_task
        texts = passages(len(TASKS) * per)
        return [chat_ids(self.loaded, TASKS[i % len(TASKS)].format(text=x))
                for i, x in enumerate(texts)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="grounded,grounded-eos,chat,depth,lookup,batch,w1")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--depths", default="2,4,6,8",
                   help="num_speculative_tokens values of the depth section")
    p.add_argument("--lookup-pairs", default="4:2,8:1,8:2,4:1",
                   help="the lookup section's num_speculative_tokens:prompt_lookup_min pairs")
    p.add_argument("--passages-per-task", type=int, default=1,
                   help="grounded prompts: each of the six tasks over this many passages (1: the "
                   "six prompts of every figure before 2026-12-06; 3: 18 prompts, a wider sample)")
    p.add_argument("--draft-quantization", default="gguf")
    p.add_argument("--target-quantization", default="none",
                   help="the target's weights: none (fp32, the issue's baseline) or gguf (what "
                   "`pagoda serve` loads a GGUF file with by default)")
    args = p.parse_args()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True,
                         text=True).stdout.split(":")[-1].strip()
    print(f"# spec_decode benchmark, {time.strftime('%Y-%m-%d')}, CPU: {cpu}")
    b = Bench(args)
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    methods = [("off", None, {}), ("ngram", "ngram", {}),
             (f"draft self-{args.draft_quantization}", "draft", {}),
             (f"hybrid (ngram + self-{args.draft_quantization})", "hybrid", {})]
    sections = args.sections.split(",")
    if "grounded" in sections:
        b.compare("batch 1, input-grounded prompts, greedy", b.grounded(), greedy, 1, methods)
    if "grounded-eos" in sections:
        # the answers as a user receives them: with ignore_eos, two of the six greedy answers
        # run past their end of text into an invented new chat turn (free text, not quoting)
        b.compare("batch 1, input-grounded prompts, greedy, stopping at the end of text",
                  b.grounded(), SamplingParams(temperature=0, max_tokens=args.max_tokens),
                  1, methods)
    if "chat" in sections:
        chat = [chat_ids(b.loaded, c) for c in CHAT]
        sampled = SamplingParams(temperature=0.7, max_tokens=args.max_tokens, seed=0)
        b.compare("batch 1, chat prompts, temperature 0.7", chat, sampled, 1, methods)
        b.compare("batch 1, chat prompts, greedy", chat, greedy, 1, methods)
    if "depth" in sections:
        prompts = b.grounded()[:3] + [chat_ids(b.loaded, c) for c in CHAT[:3]]
        configs = [("off", None, {})] + [
            (f"{m} k={k}", m, {"num_speculative_tokens": k})
            for m in ("ngram", "draft") for k in map(int, args.depths.split(","))]
        b.compare("batch 1, num_speculative_tokens (3 grounded + 3 chat prompts, greedy)",
                  prompts, greedy, 1, configs)
    if "lookup" in sections:
        configs = [("off", None, {})] + [
            (f"ngram k={k} min_n={n}", "ngram", {"num_speculative_tokens": k,
                                                 "prompt_lookup_min": n})
            for k, n in (map(int, pair.split(":")) for pair in args.lookup_pairs.split(","))]
        b.compare("batch 1, grounded prompts, greedy, prompt lookup settings", b.grounded(),
                  greedy, 1, configs)
        b.compare("batch 1, chat prompts, greedy, prompt lookup settings",
                  [chat_ids(b.loaded, c) for c in CHAT], greedy, 1, configs)
    if "batch" in sections:
        prompts = b.grounded() * 3
        for bs in (2, 4, 8, 16):
            b.compare(f"{bs} concurrent grounded requests, greedy, speculation forced on",
                      prompts[:max(bs, 6)], greedy, bs,
                      [("off", None, {}),
                       ("ngram", "ngram", {"speculative_max_batch": 64}),
                       ("draft", "draft", {"speculative_max_batch": 64}),
                       ("hybrid", "hybrid", {"speculative_max_batch": 64})])
    if "w1" in sections:
        rng = random.Random(0)
        prompts = [[rng.randrange(1000, 30000) for _ in range(128)] for _ in range(32)]
        w1 = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        b.compare("W1: 32 x (128 in, 128 out) at 32 concurrent, adaptive", prompts, w1, 32,
                  [("off", None, {}), ("ngram", "ngram", {}), ("draft", "draft", {}),
                   ("hybrid", "hybrid", {})])


if __name__ == "__main__":
    main()
