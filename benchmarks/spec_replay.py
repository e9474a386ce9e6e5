"""Prompt lookup replayed: what its proposals and depth policy earn, priced by this machine's
verify passes, against two bounds.

A greedy request's tokens are the same with speculation on or off, so prompt lookup can be
replayed offline: decode each grounded prompt once with speculation off, then walk its output as
the engine would, asking the engine's own policy (`SpecPolicy`, one request running) for a depth
and its own proposer (`NgramProposer`) for a draft, and accepting the draft's prefix that equals
the known continuation. Each pass is priced by a measured cost curve: an engine step verifying R
rows of one request (a proposer forced to draft R - 1 wrong tokens), over a one-row step.

Predicted ratio = decode tokens / sum of the passes' costs (a plain step costs 1). Bounds on the
same outputs: `perfect depth` drafts exactly what the suffix's longest match would get accepted
(never a wasted row, never a pass cut short); `free rows` prices every pass at 1 (what the same
proposals would give if verified rows cost nothing). The replay's prediction is checked against
`benchmarks/spec_decode.py`'s measured decode-rate ratio in docs/benchmarks.md.

    .venv/bin/python benchmarks/spec_replay.py [--passages-per-task 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import time
from types import SimpleNamespace

import numpy as np

from pagoda.engine.llm_engine import LLMEngine
from pagoda.sampling.params import SamplingParams
from pagoda.scheduler.output import ScheduledRequest
from pagoda.spec_decode.ngram import lookup
from pagoda.spec_decode.proposer import Draft
from spec_decode import Bench  # benchmarks/, the script's own directory

ROWS = (1, 2, 3, 5, 9, 13, 17)


def greedy_outputs(bench: Bench, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    engine = bench.engine(None)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs.setdefault(o.req_id, []).extend(t for c in o.outputs for t in c.token_ids)
    return [outs[str(i)] for i in range(len(prompts))]


class WrongDrafts:
    """A proposer that drafts as many tokens as the scheduler allows, all the same token (the
    prompt's last: almost always rejected; a step's cost depends on its rows, not on that)."""

    def __init__(self, token: int):
        self.token = token

    def propose(self, requests: list[ScheduledRequest]) -> dict[str, Draft]:
        return {r.req_id: Draft([self.token] * r.num_spec_tokens) for r in requests
                if r.num_spec_tokens}

    def release(self, req_ids: list[str]) -> None:
        pass


def step_ms(bench: Bench, prompt: list[int], rows: int, steps: int = 24) -> float:
    """Median engine step (ms) verifying `rows` rows of one request (1: a plain decode step,
    speculation off)."""
    if rows == 1:
        engine: LLMEngine = bench.engine(None)
    else:
        engine = bench.engine("ngram", num_speculative_tokens=rows - 1,
                              num_speculative_tokens_alone=rows - 1)
        engine.runner.proposer = WrongDrafts(prompt[-1])
        policy = engine.scheduler.spec  # every step drafts the most the depth allows
        policy.config = dataclasses.replace(policy.config, depth_floor=0.0,
                                            solo_depth_floor=0.0, min_acceptance=0.0)
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=steps + 4,
                                                   ignore_eos=True))
    times = []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[3:]) * 1e3


def cost_curve(bench: Bench, prompt: list[int], rounds: int) -> list[float]:
    """Each row count's step over the one-row step, the fastest of `rounds` alternating runs."""
    best = {r: float("inf") for r in ROWS}
    for _ in range(rounds):
        for r in ROWS:
            best[r] = min(best[r], step_ms(bench, prompt, r))
    return [best[r] / best[1] for r in ROWS]


def num_accepted(guess: list[int], output: list[int], pos: int) -> int:
    """How many of `guess` equal the known output from `pos` on, leaving room for the pass's
    own token (as the engine's depth leaves it: a pass emits at most what remains)."""
    accepted, room = 0, len(output) - pos - 1
    while accepted < min(len(guess), room) and guess[accepted] == output[pos + accepted]:
        accepted += 1
    return accepted


def replay(engine: LLMEngine, prompt: list[int], output: list[int], price) -> tuple[int, float,
                                                                                   int, int]:
    """(decode tokens, cost, passes, passes with no draft) of the engine's policy and proposer
    walking a known greedy output."""
    policy, proposer = engine.scheduler.spec, engine.runner.proposer
    params = SamplingParams(temperature=0, max_tokens=len(output))
    tokens = cost = passes = empty = 0
    pos = 1  # the first output token comes from the prefill
    while pos < len(output):
        done = output[:pos]
        req = SimpleNamespace(req_id="r", sampling_params=params, max_tokens=len(output),
                              output_token_ids=done, max_total_tokens=1 << 30,
                              num_tokens=len(prompt) + pos)
        depth = policy.num_spec_tokens(req, 1, 1 << 30)
        draft = proposer.propose([ScheduledRequest(
            "r", [], 0, [], True, params, 0, prompt, done, depth)]).get("r")
        guess = draft.token_ids[:depth] if draft else []
        accepted = num_accepted(guess, output, pos)
        policy.record("r", len(guess), accepted)
        empty += not guess
        pos += accepted + 1
        tokens += accepted + 1
        cost += price(len(guess) + 1)
        passes += 1
    policy.forget("r")
    return tokens, cost, passes, empty


def perfect_depth(prompt: list[int], output: list[int], min_n: int, max_n: int, price
                  ) -> tuple[int, float]:
    tokens = cost = 0
    pos = 1
    while pos < len(output):
        guess, _ = lookup(np.asarray(prompt + output[:pos], dtype=np.int64), min_n, max_n, 16)
        accepted = num_accepted(guess, output, pos)
        pos += accepted + 1
        tokens += accepted + 1
        cost += price(accepted + 1)
    return tokens, cost


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passages-per-task", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="rounds of the cost curve")
    args = p.parse_args()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True,
                         text=True).stdout.split(":")[-1].strip()
    print(f"# prompt lookup replay, {time.strftime('%Y-%m-%d')}, CPU: {cpu}")
    bench = Bench(argparse.Namespace(target_quantization="none", draft_quantization="none",
                                     passages_per_task=args.passages_per_task), with_draft=False)
    prompts = bench.grounded()
    outputs = greedy_outputs(bench, prompts, args.max_tokens)
    curve = cost_curve(bench, prompts[0], args.rounds)
    print("\nverify pass cost (rows: x a one-row step): "
          + ", ".join(f"{r}: {c:.2f}" for r, c in zip(ROWS, curve, strict=True)))

    def price(rows: int) -> float:
        return float(np.interp(rows, ROWS, curve))

    engine = bench.engine("ngram")
    cfg = engine.config
    eos = set(engine.tokenizer.eos_token_ids)
    print("\n| answers | decode tokens | passes | no draft | predicted | perfect depth | "
          "free rows |\n|---|---|---|---|---|---|---|")
    for label, stop in (("128 tokens (ignore_eos)", False), ("to the end of text", True)):
        outs = [o[:next((i + 1 for i, t in enumerate(o) if t in eos), len(o))] if stop else o
                for o in outputs]
        runs = [replay(engine, pr, o, price) for pr, o in zip(prompts, outs, strict=True)]
        tokens, cost = sum(r[0] for r in runs), sum(r[1] for r in runs)
        passes, empty = sum(r[2] for r in runs), sum(r[3] for r in runs)
        best = [perfect_depth(pr, o, cfg.prompt_lookup_min, cfg.prompt_lookup_max, price)
                for pr, o in zip(prompts, outs, strict=True)]
        print(f"| {label} | {tokens} | {passes} | {empty} | {tokens / cost:.2f}x | "
              f"{sum(b[0] for b in best) / sum(b[1] for b in best):.2f}x | "
              f"{tokens / passes:.2f}x |")


if __name__ == "__main__":
    main()
