"""Request fields that Pagoda does not implement are refused, never dropped.

A field from OpenAI's chat/completions schema or one of vLLM's extras that Pagoda does not
implement is a 400 naming it (OpenAI's error shape, `param` set) as soon as its value would
change the result; its neutral values (null, false, the default) pass, since some clients send
every field. A few fields are accepted because they cannot change the output (`metadata`,
`prompt_cache_key`: prefix caching is automatic). A field no one defines is a 400 naming it too
unless its value is neutral (null, false, empty): a client that sends `"foo": null` loses nothing,
one that sends `"foo": 1` learns that nothing here reads it. Unknown keys inside a message are
logged once per name (clients echo assistant messages back with fields such as `refusal`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from pagoda.server.errors import APIError

log = logging.getLogger(__name__)


def _unset(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def _one_of(*neutral: Any) -> Callable[[Any], bool]:
    # the same type too: true == 1 in Python, but `"best_of": true` is not `"best_of": 1`
    return lambda value: value is None or any(
        type(value) is type(n) and value == n for n in neutral)


# field -> (is the value neutral?, why a non-neutral value is refused)
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    # OpenAI
    "audio": (_unset, "audio output is not supported"),
    "modalities": (_one_of(["text"]), "only the text modality is supported"),
    "functions": (_unset, "is deprecated by OpenAI and not supported; use tools"),
    "function_call": (_unset, "is deprecated by OpenAI and not supported; use tool_choice"),
    "prediction": (_unset, "predicted outputs are not supported"),
    "reasoning_effort": (_unset, "this server's models have no reasoning mode"),
    "verbosity": (_unset, "is not supported"),
    "web_search_options": (_unset, "web search is not supported"),
    "store": (_unset, "stored completions are not supported"),
    "service_tier": (_one_of("auto", "default"), "only the default service tier exists"),
    "suffix": (_unset, "suffix (insertion) is not supported"),
    "best_of": (_one_of(1), "best_of is not supported; use n"),
    # vLLM
    "echo": (_unset, "echo is not supported on chat completions"),
    "use_beam_search": (_unset, "beam search is not supported"),
    "length_penalty": (_one_of(1, 1.0), "is a beam-search parameter; beam search is not supported"),
    "truncate_prompt_tokens": (_unset, "prompt truncation is not supported"),
    "spaces_between_special_tokens": (_one_of(True), "is not supported"),
    "bad_words": (_unset, "is not supported; use logit_bias"),
    "add_special_tokens": (_unset, "is not supported on chat completions"),
    "documents": (_unset, "is not supported"),
    "chat_template": (_unset, "a per-request chat template is not supported"),
    "mm_processor_kwargs": (_unset, "multimodal input is not supported"),
    "priority": (_one_of(0), "priority scheduling is not supported"),
    "request_id": (_unset, "client-chosen request ids are not supported"),
    "return_tokens_as_token_ids": (_unset, "is not supported"),
    "return_token_ids": (_unset, "is not supported"),
    "cache_salt": (_unset, "is not supported"),
    "kv_transfer_params": (_unset, "disaggregated serving is not supported"),
    "vllm_xargs": (_unset, "is not supported"),
    "logits_processors": (_unset, "custom logits processors are not supported"),
    "structural_tag": (_unset, "structural tags are not supported"),
    "guided_whitespace_pattern": (_unset, "is not supported (JSON output has no free whitespace)"),
}
# Accepted: they cannot change the output.
ACCEPTED = frozenset({"metadata", "prompt_cache_key", "safety_identifier"})
MESSAGE_REFUSED = {"audio": "audio content is not supported",
                   "function_call": "is deprecated by OpenAI; use tool_calls"}

_logged: set[str] = set()  # unknown field names already logged (log once per name)


def check_fields(request: BaseModel) -> None:
    """Refuse (400) the request's undeclared fields that Pagoda knows but does not implement."""
    for name, value in (request.model_extra or {}).items():
        _check(name, value, REFUSED, name)
    if "messages" not in type(request).model_fields:  # e.g. `messages` sent to completions
        return
    for i, message in enumerate(getattr(request, "messages", None) or ()):
        for name, value in (message.model_extra or {}).items():
            if name in MESSAGE_REFUSED and not _unset(value):
                raise APIError(400, f"messages[{i}].{name}: {MESSAGE_REFUSED[name]}",
                               f"messages[{i}].{name}")
            if name not in MESSAGE_REFUSED:
                log_unknown(f"messages[].{name}")


def _check(name: str, value: Any, refused: dict, param: str) -> None:
    if name in refused:
        neutral, reason = refused[name]
        if not neutral(value):
            raise APIError(400, f"{name}: {reason}", param)
    elif name not in ACCEPTED and not _unset(value):
        raise APIError(400, f"unknown field '{name}': this server does not read it", param)


def log_unknown(name: str) -> None:
    """Log an unknown field accepted without effect, once per name."""
    if name not in _logged:
        _logged.add(name)
        log.warning("ignoring the unknown request field %r (logged once)", name)
