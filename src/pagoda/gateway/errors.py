"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from fastapi.responses import JSONResponse


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
