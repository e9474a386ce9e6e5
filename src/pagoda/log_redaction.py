"""Secrets never reach the logs: query-string credentials are redacted from uvicorn's lines.

Browsers cannot set headers on a WebSocket, so the chat page sends its API key as
`/v1/ws?api_key=...`; uvicorn's access log and its WebSocket lines ("WebSocket /v1/ws?..."
[accepted]) print the path with its query string. A logging filter on uvicorn's loggers (and
their handlers, which uvicorn's own logging config installs) rewrites any `api_key`, `key`,
`token` or `access_token` query value to `[redacted]` before a line is formatted.
"""

from __future__ import annotations

import logging
import re

SECRET_PARAM = re.compile(r"([?&](?:api[_-]?key|key|token|access[_-]?token)=)[^&\s\"']*",
                          re.IGNORECASE)
LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def redact(text: str) -> str:
    return SECRET_PARAM.sub(r"\1[redacted]", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def install() -> None:
    """Attach the filter to uvicorn's loggers and their current handlers (call it after
    uvicorn.Config is built: building it applies uvicorn's logging config)."""
    secret_filter = RedactSecrets()
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(secret_filter)
        for handler in logger.handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(secret_filter)
