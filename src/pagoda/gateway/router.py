"""Load-balancing policies: which upstream of a pool gets the next request.

Each policy chooses among `candidates` (never empty; the pool has already dropped unavailable and
already-tried upstreams), so health and retries stay out of the policies.

The prefix policy uses rendezvous (highest-random-weight) hashing of the prompt's first
`prefix_chars` characters: every upstream gets a score hash(prefix, name) and the highest wins.
When an upstream leaves, only the prefixes it owned move, and they come back when it returns, so
replicas' prefix caches stay warm across membership changes.
"""

from __future__ import annotations

import hashlib
import itertools
from abc import ABC, abstractmethod
from typing import Any

from pagoda.gateway.config import PoolConfig
from pagoda.gateway.upstream import Upstream


def prompt_text(body: dict[str, Any]) -> str:
    """The text a request's prompt renders to, for prefix hashing and complexity rules.

    Chat messages are joined as `role: content` lines, so shared system prompts and shared
    conversation histories give shared prefixes, as they do in the upstream's rendered template.
    """
    if "messages" in body:
        # any JSON may arrive here (the upstream refuses what is malformed; the gateway only
        # routes on it): what is not of the expected type reads as no text
        messages = body.get("messages")
        parts = []
        for message in messages if isinstance(messages, list) else []:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(t for p in content if isinstance(p, dict)
                                  and isinstance(t := p.get("text"), str))
            parts.append(f"{message.get('role', '')}: "
                         f"{content if isinstance(content, str) else ''}\n")
        return "".join(parts)
    if isinstance(body.get("input"), str):  # the Responses API
        return body["input"]
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return "\n".join(p if isinstance(p, str) else str(p) for p in prompt)
    return prompt if isinstance(prompt, str) else str(prompt)


def affinity_text(body: dict[str, Any]) -> str:
    """What the prefix policy hashes (its first `prefix_chars` characters).

    For chat with history, everything but the newest message: the system prompt and earlier turns
    are what a replica's prefix cache holds, while the newest message differs per request and,
    with a short system prompt, would otherwise fall inside the hashed window and scatter
    requests that share their whole history. Otherwise, the rendered prompt.
    """
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) >= 2:
        return prompt_text({"messages": messages[:-1]})
    return prompt_text(body)


def rendezvous_score(text: str, member: str) -> bytes:
    """`member`'s weight for `text` in rendezvous hashing (the highest wins); the gateway's
    prefix policy and the Ray Serve prefix router both rank by it."""
    key = text.encode("utf-8", "surrogatepass") + b"\0" + member.encode()  # lone surrogates too
    return hashlib.blake2b(key, digest_size=8).digest()


class Policy(ABC):
    @abstractmethod
    def choose(self, candidates: list[Upstream], text: str) -> Upstream: ...


class RoundRobin(Policy):
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: list[Upstream], text: str) -> Upstream:
        return candidates[next(self._counter) % len(candidates)]


class LeastOutstanding(Policy):
    """Fewest requests in flight; ties rotate so an idle pool still spreads load."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: list[Upstream], text: str) -> Upstream:
        least = min(u.num_outstanding for u in candidates)
        tied = [u for u in candidates if u.num_outstanding == least]
        return tied[next(self._counter) % len(tied)]


class PrefixAffinity(Policy):
    """Same prompt prefix -> same upstream, unless it has `max_outstanding` requests in flight;
    then the next upstream in that prefix's rendezvous order, then the least loaded."""

    def __init__(self, prefix_chars: int, max_outstanding: int) -> None:
        self.prefix_chars = prefix_chars
        self.max_outstanding = max_outstanding
        self._fallback = LeastOutstanding()

    def ranking(self, candidates: list[Upstream], text: str) -> list[Upstream]:
        prefix = text[: self.prefix_chars]
        return sorted(candidates, key=lambda u: rendezvous_score(prefix, u.name), reverse=True)

    def choose(self, candidates: list[Upstream], text: str) -> Upstream:
        for upstream in self.ranking(candidates, text):
            if upstream.num_outstanding < self.max_outstanding:
                return upstream
        return self._fallback.choose(candidates, text)


def make_policy(config: PoolConfig) -> Policy:
    if config.policy == "round_robin":
        return RoundRobin()
    if config.policy == "least_outstanding":
        return LeastOutstanding()
    assert config.policy == "prefix", config.policy
    return PrefixAffinity(config.prefix_chars, config.max_outstanding_per_upstream)
