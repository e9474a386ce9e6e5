"""KV-cache dtype report: bytes per token, capacity at a fixed budget, and fidelity vs fp32.

Fidelity is teacher-forced: every KV dtype decodes the fp32 greedy continuation token by token,
reading its own cache, so each position compares next-token predictions on identical inputs:
greedy-token agreement and the mean absolute log-prob difference of the fp32 greedy token.

    python benchmarks/kv_cache_dtype.py [--budget 1GiB] [--context 2048] [--tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from pagoda.cli.engine_args import parse_bytes
from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.loader.model_loader import load_model
from pagoda.sampling.params import SamplingParams
from pagoda.scheduler.output import ScheduledRequest

PROMPTS = [
    "The history of the Roman Empire begins with",
    "def merge_sort(items):\n    \"\"\"Sort a list.\"\"\"\n",
    "Photosynthesis is the process by which plants",
    "<|im_start|>user\nGive me three tips for learning a new language.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "La tour Eiffel est un monument situé à Paris. Elle a été construite",
    "In economics, inflation refers to",
    "The quick brown fox jumps over the lazy dog. This sentence is famous because",
    "Once upon a time, a young engineer built a tiny language model server that",
]


@torch.inference_mode()
def forced_logprobs(engine: LLMEngine, prompt: list[int], continuation: list[int]
                    ) -> torch.Tensor:
    """(len(continuation), V) log-probs of each next token, decoding through the KV cache."""
    runner, kv = engine.runner, engine.kv_manager
    assert kv.allocate("forced", len(prompt) + len(continuation))
    tables = kv.block_ids("forced")
    params = SamplingParams(temperature=0)
    rows = []
    chunks = [(prompt, 0)] + [([t], len(prompt) + i) for i, t in enumerate(continuation[:-1])]
    for tokens, start in chunks:
        req = ScheduledRequest("forced", tokens, start, tables, True, params, 0, prompt, [])
        ids, positions, meta, sample_rows = runner._prepare([req])
        hidden = runner.model(ids, positions, runner.kv_stores, meta)
        logits = runner.model.compute_logits(hidden[sample_rows[0][1]:][:1])
        rows.append(torch.log_softmax(logits.float(), dim=-1)[0])
    kv.forget("forced")
    return torch.stack(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--budget", type=parse_bytes, default=1 << 30)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    prompts = [tok.encode(t) for t in PROMPTS]
    engines = {d: LLMEngine(EngineConfig(kv_cache_memory=args.budget, kv_cache_dtype=d,
                                         progress=False), loaded=loaded)
               for d in ("fp32", "fp16", "int8")}
    ref = engines["fp32"]
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    from pagoda.entrypoints.llm import LLM

    llm = LLM.from_engine(ref)
    continuations = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    print(f"\n{loaded.config.name}: KV budget {args.budget / 2**30:.2f} GiB, context "
          f"{args.context}, {len(prompts)} prompts x {args.tokens} teacher-forced tokens")
    print(f"{'kv dtype':<9}{'bytes/token':>12}{'tokens':>10}{'x fp32':>8}"
          f"{'max reqs@ctx':>14}{'agreement':>11}{'mean |dlogp|':>14}{'time s':>8}")
    base_tokens = ref.kv_cache_config.num_tokens
    for dtype, engine in engines.items():
        kvc = engine.kv_cache_config
        per_token = kvc.bytes_per_block / kvc.block_size
        start = time.perf_counter()
        agree, diffs, total = 0, [], 0
        for prompt, cont in tqdm(list(zip(prompts, continuations, strict=True)), desc=dtype):
            lp = forced_logprobs(engine, prompt, cont)
            lp_ref = forced_logprobs(ref, prompt, cont) if dtype != "fp32" else lp
            target = torch.tensor(cont)
            agree += int((lp.argmax(-1) == lp_ref.argmax(-1)).sum())
            diffs.append((lp.gather(1, target[:, None]) - lp_ref.gather(1, target[:, None]))
                         .abs().flatten())
            total += len(cont)
        mad = torch.cat(diffs).mean().item()
        print(f"{dtype:<9}{per_token:>12,.0f}{kvc.num_tokens:>10,}"
              f"{kvc.num_tokens / base_tokens:>8.2f}{kvc.num_tokens // args.context:>14}"
              f"{agree / total:>11.1%}{mad:>14.5f}{time.perf_counter() - start:>8.1f}")


if __name__ == "__main__":
    main()
