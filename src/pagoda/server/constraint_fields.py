"""The request fields that constrain output, turned into one engine `StructuredOutputs`.

OpenAI's `response_format`, vLLM's `structured_outputs` and its older `guided_*` spellings all
say the same thing; a request may use one of them (two are a 400, since silently preferring one
would ignore the other). The constraint is checked here (`build_grammar`, no tokenizer needed),
so a schema, regex or grammar that cannot be compiled is a 400 naming the field before any
token is generated.
"""

from __future__ import annotations

import json
from typing import Any

from pagoda.sampling.constraint import StructuredOutputs
from pagoda.server.errors import APIError
from pagoda.server.protocol import SamplingFields, StructuredOutputsRequest
from pagoda.structured_output.grammar import ConstraintError, build_grammar

BACKENDS = (None, "auto", "xgrammar")


def request_constraint(request: SamplingFields) -> tuple[StructuredOutputs, str] | None:
    """(constraint, the field it came from) or None; raises APIError(400) when it is invalid."""
    found = [c for c in _sources(request) if c is not None]
    if len(found) > 1:
        raise APIError(400, f"{found[0][1]} and {found[1][1]} both constrain the output; "
                       "use one", found[1][1])
    if request.guided_decoding_backend not in BACKENDS:
        raise APIError(400, f"guided_decoding_backend {request.guided_decoding_backend!r} is "
                       "not available; this server uses xgrammar", "guided_decoding_backend")
    if not found:
        return None
    check(*found[0])
    return found[0]


def check(constraint: StructuredOutputs, param: str) -> None:
    try:
        build_grammar(constraint)
    except ConstraintError as exc:
        raise APIError(400, str(exc), param) from None


def _sources(request: SamplingFields) -> list[tuple[StructuredOutputs, str] | None]:
    fmt = request.response_format
    out: list[tuple[StructuredOutputs, str] | None] = []
    if fmt is not None and fmt.type == "json_object":
        out.append((StructuredOutputs("json_object", ""), "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        spec = fmt.json_schema
        if spec is None or spec.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema",
                           "response_format")
        # strict or not, the output follows the schema (see structured_output/grammar.py)
        out.append((_schema(spec.schema_, "response_format"), "response_format"))
    if request.structured_outputs is not None:
        out.append((_structured(request.structured_outputs), "structured_outputs"))
    if request.guided_json is not None:
        out.append((_schema(request.guided_json, "guided_json"), "guided_json"))
    if request.guided_regex is not None:
        out.append((StructuredOutputs("regex", request.guided_regex), "guided_regex"))
    if request.guided_choice is not None:
        out.append((StructuredOutputs.choice(request.guided_choice), "guided_choice"))
    if request.guided_grammar is not None:
        out.append((StructuredOutputs("grammar", request.guided_grammar), "guided_grammar"))
    return out


def _schema(schema: dict[str, Any] | str, param: str) -> StructuredOutputs:
    try:
        return StructuredOutputs.json_schema(schema)
    except (json.JSONDecodeError, TypeError) as exc:
        raise APIError(400, f"{param}: the JSON schema is not valid JSON ({exc})", param) from None


def _structured(so: StructuredOutputsRequest) -> StructuredOutputs:
    param = "structured_outputs"
    for knob in ("whitespace_pattern", "structural_tag"):
        if getattr(so, knob) is not None:
            raise APIError(400, f"structured_outputs.{knob} is not supported", f"{param}.{knob}")
    kinds = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                 ("grammar", so.grammar)) if v is not None]
    if so.json_object:
        kinds.append(("json_object", ""))
    if len(kinds) != 1:
        raise APIError(400, "structured_outputs needs exactly one of json, regex, choice, "
                       "grammar, json_object", param)
    kind, value = kinds[0]
    if kind == "json":
        return _schema(value, param)
    if kind == "choice":
        return StructuredOutputs.choice(value)
    return StructuredOutputs(kind, value)
