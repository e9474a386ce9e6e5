"""The benchmark's tokenizer: the server's own, reached over HTTP, or a word-count fallback.

Prompt lengths in a serving benchmark only mean something in the server's tokens, so the benchmark
asks the server. Two wire formats exist:
  - Pagoda / vLLM:  POST /tokenize {"prompt": str} -> {"tokens": [...], "count": n}
                    POST /detokenize {"tokens": [...]} -> {"prompt": str}
  - llama-server:   POST /tokenize {"content": str} -> {"tokens": [...]}
                    POST /detokenize {"tokens": [...]} -> {"content": str}
A server with neither gets `WordTokenizer`, where one whitespace-separated word counts as one token;
the saved result records which tokenizer was used so such lengths are not mistaken for exact ones.
"""

from __future__ import annotations

from typing import Protocol

import httpx

PROBE_TEXT = "Hello world, this is a tokenizer probe."


class PromptTokenizer(Protocol):
    """Encodes and decodes prompt text; `name` says where token counts come from."""

    name: str

    async def encode(self, text: str) -> list[int]: ...

    async def decode(self, token_ids: list[int]) -> str: ...


class ServerTokenizer:
    """The server's tokenizer over HTTP; `text_key` is the request field naming the text."""

    def __init__(self, client: httpx.AsyncClient, root_url: str, text_key: str) -> None:
        assert text_key in ("prompt", "content")
        self.client = client
        self.root_url = root_url.rstrip("/")
        self.text_key = text_key
        self.name = f"server:{'pagoda' if text_key == 'prompt' else 'llama.cpp'}"

    async def encode(self, text: str) -> list[int]:
        resp = await self.client.post(f"{self.root_url}/tokenize", json={self.text_key: text})
        resp.raise_for_status()
        tokens = resp.json()["tokens"]
        # llama-server may return [{"id": .., "piece": ..}] when asked for pieces; accept both.
        return [t["id"] if isinstance(t, dict) else int(t) for t in tokens]

    async def decode(self, token_ids: list[int]) -> str:
        resp = await self.client.post(f"{self.root_url}/detokenize", json={"tokens": token_ids})
        resp.raise_for_status()
        body = resp.json()
        text = body.get("prompt", body.get("content"))
        if not isinstance(text, str):
            raise ValueError(f"unexpected /detokenize reply: {body!r}")
        return text


class WordTokenizer:
    """Fallback: whitespace-separated words are tokens; ids index a vocabulary grown on the fly."""

    name = "words"

    def __init__(self) -> None:
        self.word_ids: dict[str, int] = {}
        self.words: list[str] = []

    async def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if word not in self.word_ids:
                self.word_ids[word] = len(self.words)
                self.words.append(word)
            ids.append(self.word_ids[word])
        return ids

    async def decode(self, token_ids: list[int]) -> str:
        return " ".join(self.words[i] for i in token_ids)


async def _works(tokenizer: ServerTokenizer) -> bool:
    """True when the server encodes the probe to a non-empty list and decodes it back to text."""
    try:
        ids = await tokenizer.encode(PROBE_TEXT)
        if not ids:
            return False
        await tokenizer.decode(ids)
        return True
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return False


async def detect_tokenizer(client: httpx.AsyncClient, root_url: str) -> PromptTokenizer:
    """The first wire format the server answers correctly, else the word-count fallback."""
    for key in ("prompt", "content"):
        candidate = ServerTokenizer(client, root_url, key)
        if await _works(candidate):
            return candidate
    return WordTokenizer()
