"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure the server reports — validation, auth, overload, timeouts, crashes — goes through
`APIError` or one of the exception handlers installed by `install_error_handlers`, so clients
never see FastAPI's default `{"detail": ...}` bodies or a 422.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagoda.engine.request_validator import RequestError
from pagoda.sampling.params import SamplingParamsError

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",  # as OpenAI reports a bad key (code "invalid_api_key")
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "server_overloaded",
    504: "timeout_error",
}


ANTHROPIC_PREFIX = "/v1/messages"
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                   429: "rate_limit_error", 500: "api_error", 503: "overloaded_error",
                   504: "api_error"}


class ErrorResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error message may repeat what the
    client sent, and a lone surrogate (valid in JSON's escapes, not in UTF-8) must not turn a
    400 into a 500 when the body is encoded."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def anthropic_body(self) -> dict[str, Any]:
        """Anthropic's shape, for the Messages API's routes."""
        kind = ANTHROPIC_TYPES.get(self.status, "invalid_request_error" if self.status < 500
                                   else "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def response(self, path: str | None = None) -> JSONResponse:
        """The error in the shape of the route at `path` (OpenAI's unless it is Anthropic's)."""
        body = self.anthropic_body() if path and path.startswith(ANTHROPIC_PREFIX) \
            else self.body()
        return ErrorResponse(body, status_code=self.status, headers=self.headers)

    @classmethod
    def bad_request(cls, exc: ValueError) -> APIError:
        """A 400 from an engine-side validation error (`RequestError`, `SamplingParamsError`)."""
        return cls(400, str(exc), getattr(exc, "param", None))


def error_body(message: str, type_: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def overloaded(retry_after: int, message: str) -> APIError:
    return APIError(503, message, code="server_overloaded",
                    headers={"Retry-After": str(retry_after)})


# pydantic's tags for the plain-type branches of a union ("prompt.str"): no request field is
# named so
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "bytes", "none"})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    return validation_message(list(exc.errors()))


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """(message, param) of pydantic's errors for a request: HTTP's handler and the WebSocket's."""
    if not errors:
        return "invalid request", None
    # Our own validators' messages ("Value error, ...") say more than a union's failed branches
    # (a list of content parts is first reported as "not a valid string").
    # Otherwise the deepest error, and of equally deep ones not a mere type mismatch: of a
    # union's failed branches, the one that got furthest names the actual problem (a part's
    # unknown key, a list that is too long; not "content is not a string").
    first = next((e for e in errors if str(e.get("msg", "")).startswith("Value error, ")),
                 max(errors, key=lambda e: (len(e.get("loc", ())),
                                            not str(e.get("type", "")).endswith("_type"))))
    # Field names and list indices; pydantic's union-branch tags ("constrained-str",
    # "list[int]", a model's class name) name no field, so they are left out.
    loc = [str(p) for p in first.get("loc", ())
           if p != "body" and (isinstance(p, int)
                               or (str(p).isidentifier() and not str(p)[:1].isupper()
                                   and str(p) not in _TYPE_TAGS))]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    where = f" at '{param}'" if param else ""
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")  # our own
    return f"{message}{where}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, param).response(request.url.path)

    @app.exception_handler(RequestError)
    @app.exception_handler(SamplingParamsError)
    async def _engine_validation(request: Request, exc: ValueError) -> JSONResponse:
        return APIError.bad_request(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = APIError(exc.status_code, str(exc.detail)).response(request.url.path)
        response.headers.update(exc.headers or {})  # e.g. a 405's Allow
        return response

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}").response(request.url.path)


def openapi_without_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every body it validates; this server answers such bodies
    with a 400 in OpenAI's shape (above), so the schema says that instead."""
    from fastapi.openapi.utils import get_openapi

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
