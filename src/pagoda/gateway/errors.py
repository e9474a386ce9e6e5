"""The gateway's own errors: OpenAI's shape `{"error": {"message", "type", "param", "code"}}`,
and Anthropic's `{"type": "error", "error": {"type", "message"}}` on the Messages API's route
(what a Pagoda server answers there too, and what Anthropic's clients read)."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse, Response

ANTHROPIC_ROUTE = "/v1/messages"
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                   429: "rate_limit_error", 503: "overloaded_error"}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(message, type_, code, param)
    return JSONResponse(body, status_code=status, headers=headers)


def unauthorized(message: str) -> JSONResponse:
    return error_response(401, message, "invalid_request_error", "invalid_api_key")


def bad_request(message: str, param: str | None = None) -> JSONResponse:
    return error_response(400, message, "invalid_request_error", None, param=param)


def in_route_shape(response: Response, endpoint: str) -> Response:
    """A gateway-made error re-shaped for its route (Anthropic's on /v1/messages); anything
    else unchanged. Never applied to an upstream's answer, which has its route's shape already."""
    if endpoint != ANTHROPIC_ROUTE or response.status_code < 400:
        return response
    error = json.loads(bytes(response.body))["error"]
    kind = ANTHROPIC_TYPES.get(response.status_code, "api_error")
    headers = {k: v for k, v in response.headers.items()
               if k not in ("content-length", "content-type")}
    return JSONResponse({"type": "error", "error": {"type": kind, "message": error["message"]}},
                        status_code=response.status_code, headers=headers)
