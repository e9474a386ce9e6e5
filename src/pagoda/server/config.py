"""Server configuration: the HTTP-side knobs beside the engine's own `EngineConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.engine.config import EngineConfig

MAX_BODY_BYTES = 4 << 20  # request bodies above this are refused (413) before parsing


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no authentication
    served_model_name: str | None = None  # None: the model's own name
    max_waiting: int = 256  # admitted requests without a first token; beyond it -> 503
    request_timeout: float | None = None  # seconds per request; None: no limit
    shutdown_grace: float = 30.0  # seconds in-flight requests get after SIGTERM
    max_body_bytes: int = MAX_BODY_BYTES
    retry_after: int = 1  # seconds, sent with 503 responses
    # the engine loop in a spawned process instead of a thread of the server (docs/server.md)
    engine_process: bool = False
    # OTLP/HTTP collector URL for traces (e.g. http://127.0.0.1:4318/v1/traces); None: no tracing
    otlp_traces_endpoint: str | None = None
    # CORS, as vLLM's and llama-server's defaults: any web page may call the API (with the API
    # key, if one is set: a bearer header, not a cookie). No origins: no CORS headers at all,
    # so browsers refuse pages of other origins.
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, not {self.port}")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        if self.shutdown_grace < 0:
            raise ValueError("shutdown_grace must be non-negative")
        if self.api_key == "":
            raise ValueError("api_key must not be empty")
