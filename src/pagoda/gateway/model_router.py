"""Virtual models: a public name (e.g. `auto`) whose rules pick a real pool per request.

Rules are tried in config order and the first whose any condition holds wins; otherwise the
virtual model's `default`. Conditions look only at the request itself (prompt length in characters
of the rendered prompt, requested max_tokens, case-insensitive keywords), so routing is cheap and
the same request always routes the same way.
"""

from __future__ import annotations

from typing import Any

from pagoda.gateway.config import RouteRule, VirtualModelConfig
from pagoda.gateway.router import prompt_text


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int):
            return value
    return None


def rule_matches(rule: RouteRule, text: str, max_tokens: int | None) -> bool:
    if rule.min_prompt_chars is not None and len(text) >= rule.min_prompt_chars:
        return True
    if rule.min_max_tokens is not None and max_tokens is not None:
        if max_tokens >= rule.min_max_tokens:
            return True
    lowered = text.lower()
    return any(word.lower() in lowered for word in rule.keywords)


def route_virtual(model: VirtualModelConfig, body: dict[str, Any]) -> str:
    """The pool name this request goes to."""
    text = prompt_text(body)
    max_tokens = requested_max_tokens(body)
    for rule in model.rules:
        if rule_matches(rule, text, max_tokens):
            return rule.model
    return model.default
