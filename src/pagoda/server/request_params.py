"""Translation of OpenAI request fields into engine inputs: a prompt and `SamplingParams`.

Range checks live in `SamplingParams` (it raises `SamplingParamsError` naming the field); this
module only maps names and picks the OpenAI defaults, so both sides agree on one rule set.
"""

from __future__ import annotations

from typing import Any

from pagoda.sampling.params import SamplingParams
from pagoda.server.chat_protocol import ChatCompletionRequest
from pagoda.server.errors import APIError
from pagoda.server.protocol import ChatMessage, CompletionRequest, SamplingFields

Prompt = str | list[int]


def completion_prompt(request: CompletionRequest) -> Prompt:
    """The single prompt of a completions request: text or token ids."""
    prompt = request.prompt
    if isinstance(prompt, list):
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        if isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", "prompt")
            prompt = prompt[0]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    return prompt


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them (`developer` is the newer `system`)."""
    if not messages:
        raise APIError(400, "messages must not be empty", "messages")
    out = []
    for msg in messages:
        role = "system" if msg.role == "developer" else msg.role
        out.append({"role": role, "content": msg.text()})
    if all(not m["content"] for m in out):
        raise APIError(400, "messages must not all be empty", "messages")
    return out


def _common(request: SamplingFields) -> dict[str, Any]:
    stop = request.stop
    return {
        "n": request.n,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "seed": request.seed,
        "stop": [stop] if isinstance(stop, str) else list(stop or []),
        "stop_token_ids": list(request.stop_token_ids or []),
        "ignore_eos": request.ignore_eos,
        "min_tokens": request.min_tokens,
        "skip_special_tokens": request.skip_special_tokens,
        "include_stop_str_in_output": request.include_stop_str_in_output,
        "speculative": request.speculative,
    }


def completion_params(request: CompletionRequest) -> SamplingParams:
    if request.echo:
        raise APIError(400, "echo is not supported", "echo")
    return SamplingParams(max_tokens=request.max_tokens, logprobs=request.logprobs,
                          **_common(request))


def chat_params(request: ChatCompletionRequest) -> SamplingParams:
    # max_completion_tokens wins; None lets the reply run up to the context length.
    max_tokens = request.max_completion_tokens or request.max_tokens
    if request.max_completion_tokens is not None and request.max_completion_tokens < 1:
        raise APIError(400, "max_completion_tokens must be at least 1", "max_completion_tokens")
    logprobs = None
    if request.logprobs:
        logprobs = request.top_logprobs or 0
    elif request.top_logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **_common(request))
