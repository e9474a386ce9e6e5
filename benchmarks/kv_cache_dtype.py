"""KV-cache dtype report: bytes per token, capacity at a fixed budget, and fidelity vs fp32.

Fidelity is teacher-forced: every KV dtype decodes the fp32-cache greedy continuation token by
token, reading its own cache, so each position compares next-token predictions on identical
inputs: greedy-token agreement and the mean absolute log-prob difference of that token. With
quantized linears (`--quantization auto` on a GGUF, int8, int4) the prompt's own queries also
read the cache (invariant attention), so the report adds the perplexity of the shipped text
(`--ppl-tokens`, windows of 1,024) scored through each cache: the measurement behind the bf16
default of those models (EngineConfig.settle_for_weights).

    python benchmarks/kv_cache_dtype.py [--model M] [--quantization auto|none|int8|int4|gguf]
        [--dtypes fp32,bf16,fp16,int8] [--budget 1GiB] [--context 2048] [--tokens 64]
        [--ppl-tokens 8192] [--ppl-offset 0]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from tqdm import tqdm

from pagoda.cli.engine_args import parse_bytes
from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.quant.quality import load_eval_text
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
        ids, positions, meta, sample_rows = runner._prepare([req], {})
        hidden = runner.model(ids, positions, runner.kv_stores, meta)
        last = sample_rows[0][1].stop - 1  # the row that predicts the next token
        logits = runner.model.compute_logits(hidden[last:last + 1])
        rows.append(torch.log_softmax(logits.float(), dim=-1)[0])
    kv.forget("forced")
    return torch.stack(rows)


def cache_perplexity(engine: LLMEngine, ids: list[int], window: int = 1024) -> float:
    """exp(mean NLL) of `ids` in windows of `window` tokens, scored by the engine's prompt
    log-probs (each window's first token is not scored)."""
    from pagoda.entrypoints.llm import LLM

    windows = [ids[s:s + window] for s in range(0, len(ids) - 1, window)]
    outs = LLM.from_engine(engine).generate(
        windows, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    nll, count = 0.0, 0
    for w, out in zip(windows, outs, strict=True):
        for token, logprobs in zip(w[1:], out.prompt_logprobs[1:], strict=True):
            nll -= logprobs[token]
            count += 1
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--quantization", default="auto")
    p.add_argument("--dtypes", default="fp32,bf16,fp16,int8",
                   help="comma-separated KV dtypes; the first is the reference")
    p.add_argument("--budget", type=parse_bytes, default=1 << 30)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--ppl-tokens", type=int, default=8192, help="0: no perplexity column")
    p.add_argument("--ppl-offset", type=int, default=0, help="first token of the scored text")
    args = p.parse_args()

    def engine(dtype: str) -> LLMEngine:  # each loads (and quantizes) its own model, as a server
        return LLMEngine(EngineConfig(model=args.model, kv_cache_memory=args.budget,
                                      kv_cache_dtype=dtype, quantization=args.quantization,
                                      progress=False))

    dtypes = args.dtypes.split(",")
    engines = {d: engine(d) for d in dtypes}
    ref = engines[dtypes[0]]
    tok = ref.tokenizer
    prompts = [tok.encode(t) for t in PROMPTS]
    ppl_ids = tok.encode(load_eval_text())[args.ppl_offset:args.ppl_offset + args.ppl_tokens]
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    from pagoda.entrypoints.llm import LLM

    llm = LLM.from_engine(ref)
    continuations = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    print(f"\n{ref.model_config.name} ({args.quantization}): KV budget "
          f"{args.budget / 2**30:.2f} GiB, context {args.context}, {len(prompts)} prompts x "
          f"{args.tokens} teacher-forced tokens; perplexity over {len(ppl_ids)} tokens from "
          f"{args.ppl_offset}; invariant attention "
          f"{'on (prompts read the cache)' if ref.runner.invariant_attention else 'off'}")
    print(f"{'kv dtype':<9}{'bytes/token':>12}{'tokens':>10}{'x ref':>8}"
          f"{'max reqs@ctx':>14}{'agreement':>11}{'mean |dlogp|':>14}{'perplexity':>12}"
          f"{'time s':>8}")
    base_tokens = ref.kv_cache_config.num_tokens
    for dtype, engine in engines.items():
        kvc = engine.kv_cache_config
        per_token = kvc.bytes_per_block / kvc.block_size
        start = time.perf_counter()
        agree, diffs, total = 0, [], 0
        for prompt, cont in tqdm(list(zip(prompts, continuations, strict=True)), desc=dtype):
            lp = forced_logprobs(engine, prompt, cont)
            lp_ref = forced_logprobs(ref, prompt, cont) if engine is not ref else lp
            target = torch.tensor(cont)
            agree += int((lp.argmax(-1) == lp_ref.argmax(-1)).sum())
            diffs.append((lp.gather(1, target[:, None]) - lp_ref.gather(1, target[:, None]))
                         .abs().flatten())
            total += len(cont)
        mad = torch.cat(diffs).mean().item()
        ppl = f"{cache_perplexity(engine, ppl_ids):>12.3f}" if ppl_ids else f"{'-':>12}"
        print(f"{dtype:<9}{per_token:>12,.0f}{kvc.num_tokens:>10,}"
              f"{kvc.num_tokens / base_tokens:>8.2f}{kvc.num_tokens // args.context:>14}"
              f"{agree / total:>11.1%}{mad:>14.5f}{ppl}{time.perf_counter() - start:>8.1f}")


if __name__ == "__main__":
    main()
