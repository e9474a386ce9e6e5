"""Benchmark workloads: random prompts of exact token length, a shared-prefix variant, chat files.

Every generator is deterministic for a given seed and tokenizer. Prompt lengths are measured with
the tokenizer the prompts are fitted with (normally the server's), so `BenchRequest.prompt_len` is
what the server will see for a completions request; chat requests add the chat template on top.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from pagoda.bench.tokenizer import PromptTokenizer

DATASETS = ("random", "shared-prefix", "chat-file")

# Plain lowercase words that most BPE vocabularies keep as one token after a space.
WORDS = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book "
    "eye job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information back "
    "parent face others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education open green small river "
    "stone light dark quick slow warm cold table garden window paper music field bird tree road"
).split()

Prompt = str | list[dict[str, str]]  # text for /v1/completions, messages for /v1/chat/completions


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload; `prompt_len` is in the fitting tokenizer's tokens."""

    prompt: Prompt
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "random"
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0  # lengths drawn uniformly from [L*(1-r), L*(1+r)]
    shared_prefix_len: int = 0  # shared-prefix: tokens common to all prompts, within input_len
    num_prefixes: int = 1  # shared-prefix: prompts cycle through this many distinct prefixes
    chat_file: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}; choose one of {', '.join(DATASETS)}")
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("--num-prompts, --input-len and --output-len must be at least 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError("--range-ratio must be in [0, 1)")
        if self.name == "shared-prefix" and not 0 < self.shared_prefix_len < self.input_len:
            raise ValueError("shared-prefix needs 0 < --shared-prefix-len < --input-len")
        if self.num_prefixes < 1:
            raise ValueError("--num-prefixes must be at least 1")
        if self.name == "chat-file" and not self.chat_file:
            raise ValueError("the chat-file dataset needs --chat-file PATH")


def sample_len(rng: random.Random, mean: int, range_ratio: float) -> int:
    low = max(1, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.randint(low, high)


def random_words(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


async def fit_text(
    tokenizer: PromptTokenizer, rng: random.Random, prefix: str, num_tokens: int
) -> tuple[str, int]:
    """Text starting with `prefix`, extended with random words to as close to `num_tokens` tokens
    as the tokenizer allows; returns (text, its token count).

    Cutting a token list and decoding it does not always re-encode to the same count (merges
    across the cut), so the cut point is corrected a few times and the closest text is kept.
    """
    text = prefix
    ids = await tokenizer.encode(text) if text else []
    while len(ids) < num_tokens:
        missing = num_tokens - len(ids)
        words = random_words(rng, missing + 2)
        text = f"{text} {words}" if text else words
        ids = await tokenizer.encode(text)
    if len(ids) == num_tokens:
        return text, num_tokens
    best_text, best_len = text, len(ids)
    cut = num_tokens
    for _ in range(4):
        candidate = await tokenizer.decode(ids[:cut])
        count = len(await tokenizer.encode(candidate))
        if abs(count - num_tokens) < abs(best_len - num_tokens):
            best_text, best_len = candidate, count
        if count == num_tokens or not 0 < cut + (num_tokens - count) <= len(ids):
            break
        cut += num_tokens - count
    return best_text, best_len


async def random_dataset(config: DatasetConfig, tokenizer: PromptTokenizer) -> list[BenchRequest]:
    rng = random.Random(config.seed)
    requests = []
    for _ in range(config.num_prompts):
        input_len = sample_len(rng, config.input_len, config.range_ratio)
        output_len = sample_len(rng, config.output_len, config.range_ratio)
        text, prompt_len = await fit_text(tokenizer, rng, "", input_len)
        requests.append(BenchRequest(text, prompt_len, output_len))
    return requests


async def shared_prefix_dataset(
    config: DatasetConfig, tokenizer: PromptTokenizer
) -> list[BenchRequest]:
    """Prompt i starts with prefix i mod `num_prefixes` (`shared_prefix_len` tokens each); the
    rest is unique. Several prefixes model several system prompts or documents."""
    rng = random.Random(config.seed)
    prefixes = [(await fit_text(tokenizer, rng, "", config.shared_prefix_len))[0]
                for _ in range(config.num_prefixes)]
    requests = []
    for i in range(config.num_prompts):
        prefix = prefixes[i % len(prefixes)]
        input_len = max(
            config.shared_prefix_len + 1, sample_len(rng, config.input_len, config.range_ratio)
        )
        output_len = sample_len(rng, config.output_len, config.range_ratio)
        text, prompt_len = await fit_text(tokenizer, rng, prefix, input_len)
        requests.append(BenchRequest(text, prompt_len, output_len))
    return requests


def read_chat_file(path: str) -> list[tuple[list[dict[str, str]], int | None]]:
    """JSONL lines: {"messages": [...], "max_tokens"?: n} or a bare list of messages."""
    conversations = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        messages = item if isinstance(item, list) else item.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise ValueError(f"{path}:{lineno}: expected a list of {{role, content}} messages")
        max_tokens = item.get("max_tokens") if isinstance(item, dict) else None
        conversations.append((messages, max_tokens))
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


async def chat_file_dataset(
    config: DatasetConfig, tokenizer: PromptTokenizer
) -> list[BenchRequest]:
    """Conversations in file order, cycled to `num_prompts`; prompt_len counts message text only."""
    assert config.chat_file is not None
    conversations = read_chat_file(config.chat_file)
    requests = []
    for i in range(config.num_prompts):
        messages, max_tokens = conversations[i % len(conversations)]
        text = "\n".join(m["content"] for m in messages)
        prompt_len = len(await tokenizer.encode(text))
        requests.append(BenchRequest(messages, prompt_len, int(max_tokens or config.output_len)))
    return requests


async def build_dataset(config: DatasetConfig, tokenizer: PromptTokenizer) -> list[BenchRequest]:
    if config.name == "random":
        return await random_dataset(config, tokenizer)
    if config.name == "shared-prefix":
        return await shared_prefix_dataset(config, tokenizer)
    return await chat_file_dataset(config, tokenizer)
