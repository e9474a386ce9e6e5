"""Translation of OpenAI request fields into engine inputs: a prompt and `SamplingParams`.

Range checks live in `SamplingParams` (it raises `SamplingParamsError` naming the field); this
module only maps names and picks the OpenAI defaults, so both sides agree on one rule set.
"""

from __future__ import annotations

from typing import Any

from pagoda.sampling.constraint import StructuredOutputs
from pagoda.sampling.params import SamplingParams
from pagoda.server.chat_protocol import ChatCompletionRequest
from pagoda.server.constraint_fields import check, request_constraint
from pagoda.server.errors import APIError
from pagoda.server.field_policy import check_fields
from pagoda.server.protocol import ChatMessage, CompletionRequest, SamplingFields
from pagoda.server.tool_prompt import ToolUse, tool_constraint

Prompt = str | list[int]


MAX_PROMPTS = 1024  # prompts per completions request


def completion_prompts(request: CompletionRequest) -> list[Prompt]:
    """The prompts of a completions request: a string, a list of strings, token ids, or a list
    of token-id lists."""
    prompt = request.prompt
    if isinstance(prompt, str):
        prompts: list[Prompt] = [prompt]
    elif prompt and isinstance(prompt[0], (str, list)):
        prompts = list(prompt)  # type: ignore[arg-type]
    else:
        prompts = [prompt]  # type: ignore[list-item]
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "prompt must not be empty", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", "prompt")
    return prompts


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them (`developer` is the newer `system`)."""
    if not messages:
        raise APIError(400, "messages must not be empty", "messages")
    out = []
    call_ids: set[str] = set()  # the tool calls of the assistant turns so far
    for i, msg in enumerate(messages):
        role = "system" if msg.role == "developer" else msg.role
        if role == "tool" and msg.tool_call_id not in call_ids:
            # as OpenAI: a result answers a call the conversation made (its id links them)
            reason = ("a tool message needs the tool_call_id of the call it answers"
                      if msg.tool_call_id is None else
                      f"tool_call_id {msg.tool_call_id!r} names no tool call of an earlier "
                      "assistant message")
            raise APIError(400, reason, f"messages[{i}].tool_call_id")
        call_ids.update(c.id for c in msg.tool_calls or ())
        entry: dict[str, Any] = {"role": role, "content": msg.text()}
        if msg.tool_calls:
            entry["tool_calls"] = [c.model_dump() for c in msg.tool_calls]
        if msg.tool_call_id is not None:
            entry["tool_call_id"] = msg.tool_call_id
        if msg.name is not None:
            entry["name"] = msg.name
        out.append(entry)
    if all(not m["content"] and not m.get("tool_calls") for m in out):
        raise APIError(400, "messages must not all be empty", "messages")
    return out


def _logit_bias(request: SamplingFields) -> dict[int, float] | None:
    if not request.logit_bias:
        return None
    out: dict[int, float] = {}
    for token, bias in request.logit_bias.items():
        # token ids as OpenAI writes them: decimal digits, no sign, spaces, "_" or leading 0
        if not (token.isascii() and token.isdigit() and (token == "0" or token[0] != "0")):
            raise APIError(400, f"logit_bias keys must be token ids, not {token!r}",
                           "logit_bias")
        out[int(token)] = bias
    return out


def _common(request: SamplingFields, constraint: StructuredOutputs | None = None
            ) -> dict[str, Any]:
    check_fields(request)
    stop = request.stop
    return {
        "logit_bias": _logit_bias(request),
        "allowed_token_ids": request.allowed_token_ids,
        "structured_outputs": constraint,
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
    max_tokens = request.max_tokens
    if max_tokens == 0:
        if not request.echo:
            raise APIError(400, "max_tokens 0 needs echo (scoring the prompt)", "max_tokens")
        max_tokens = 1  # the engine always generates; completions.py drops this token
    # echo with logprobs reports the prompt tokens' log-probs too
    prompt_logprobs = request.prompt_logprobs
    if request.echo and request.logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, request.logprobs)
    found = request_constraint(request)
    return SamplingParams(max_tokens=max_tokens, logprobs=request.logprobs,
                          prompt_logprobs=prompt_logprobs,
                          **_common(request, found[0] if found else None))


def chat_params(request: ChatCompletionRequest, tools: ToolUse) -> SamplingParams:
    # max_completion_tokens wins; None lets the reply run up to the context length.
    max_tokens = request.max_completion_tokens or request.max_tokens
    if request.max_completion_tokens is not None and request.max_completion_tokens < 1:
        raise APIError(400, "max_completion_tokens must be at least 1", "max_completion_tokens")
    logprobs = None
    if request.logprobs:
        logprobs = request.top_logprobs or 0
    elif request.top_logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    found = request_constraint(request)
    constraint = tool_constraint(tools)
    if constraint is not None:
        # response_format shapes the message's text, and a forced call leaves no text: OpenAI
        # accepts both (instructor's RESPONSES_TOOLS sends both), so the call's grammar rules.
        # The guided_* fields constrain the whole output, which the call's grammar already does.
        if found is not None and found[1] != "response_format":
            raise APIError(400, f"tool_choice {tools.mode!r} constrains the output; it cannot "
                           f"be combined with {found[1]}", found[1])
        check(constraint, "tools")
    elif found is not None:
        constraint = found[0]
    return SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                          prompt_logprobs=request.prompt_logprobs,
                          **_common(request, constraint))
