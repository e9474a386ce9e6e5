"""The gateway's /openapi.json: each proxied route documented with a Pagoda server's own request
and response models, plus the answers the gateway gives itself.

The gateway forwards bodies as they are (it reads only `model` and the route's required field);
the replica behind it validates them and its 400s pass through. So the contract a client sees is
the server's, narrowed and widened by the gateway: `model` must name one of the gateway's models
(an enum here, so generated clients and fuzzers see the real choice), and the gateway adds its
own refusals (401 key, 404 model, 413 body, 429 limits, 502 no upstream, 503 overload or state
backend) to the server's. Building it imports only pydantic models: no engine, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from pagoda.server.chat_protocol import ChatCompletionRequest, ChatCompletionResponse
from pagoda.server.embeddings_protocol import EmbeddingRequest, EmbeddingResponse
from pagoda.server.messages_protocol import MessagesRequest, MessagesResponse
from pagoda.server.protocol import (
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
)
from pagoda.server.responses_protocol import ResponsesRequest

# route -> (request model, its 200 JSON model or None when untyped, may it stream SSE)
PROXIED: dict[str, tuple[type[BaseModel], type[BaseModel] | None, bool]] = {
    "/v1/completions": (CompletionRequest, CompletionResponse, True),
    "/v1/chat/completions": (ChatCompletionRequest, ChatCompletionResponse, True),
    "/v1/responses": (ResponsesRequest, None, True),
    "/v1/messages": (MessagesRequest, MessagesResponse, True),
    "/v1/embeddings": (EmbeddingRequest, EmbeddingResponse, False),
}
# the server's refusals (400, 404, 413, 503, 504) and the gateway's own (401, 429, 502)
ERROR_STATUSES = (400, 401, 404, 413, 429, 502, 503, 504)
REF = "#/components/schemas/{model}"
# the gateway's own /v1/models (OpenAI's card; a server's adds max_model_len, unknown here)
MODEL_LIST = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"},
    "data": {"type": "array", "items": {
        "type": "object", "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                       "created": {"type": "integer"}, "owned_by": {"type": "string"}}}}}}


def install_openapi(app: FastAPI, models: Sequence[str]) -> None:
    """Replace the app's schema builder; `models` are the names the gateway routes."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _schema(app, list(models))
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]


def _schema(app: FastAPI, models: list[str]) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    wanted = [(m, "validation") for m, _, _ in PROXIED.values()]
    wanted += [(m, "serialization") for _, m, _ in PROXIED.values() if m is not None]
    wanted += [(ErrorResponse, "serialization")]
    refs, top = models_json_schema(wanted, ref_template=REF)
    defs: dict[str, Any] = top.get("$defs", {})
    errors = {str(s): _json("an error in the route's shape", refs[(ErrorResponse, "serialization")])
              for s in ERROR_STATUSES}
    for path, (request, response, streams) in PROXIED.items():
        body_ref = refs[(request, "validation")]
        _name_the_models(defs[body_ref["$ref"].rsplit("/", 1)[1]], models)
        ok = _json("the upstream's answer", refs[(response, "serialization")] if response else {})
        if streams:
            ok["content"]["text/event-stream"] = {}
            ok["description"] += " (SSE events when `stream` is true)"
        operation = schema["paths"][path]["post"]
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": body_ref}}}
        operation["responses"] = {"200": ok, **errors}
    schema["paths"]["/v1/models"]["get"]["responses"] = {
        "200": _json("the models this key may use", MODEL_LIST),
        "401": errors["401"]}
    schema.setdefault("components", {})["schemas"] = defs
    schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    schema["security"] = [{"bearer": []}]
    return schema


def _name_the_models(body: dict[str, Any], models: list[str]) -> None:
    """The gateway routes by `model`: it is required and one of the configured names."""
    body.setdefault("properties", {})["model"] = {"type": "string", "enum": models}
    required = body.setdefault("required", [])
    if "model" not in required:
        required.append("model")


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}
