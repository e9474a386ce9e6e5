"""Gateway configuration: typed, frozen dataclasses loaded from YAML and checked on load.

Every section validates itself in `__post_init__`, so a `GatewayConfig` that exists is usable:
each key names only defined models, each virtual model's rules name real pools, every pool has at
least one upstream. Errors are `ConfigError` naming the offending entry (e.g. `keys[1]: ...`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

POLICIES = ("round_robin", "least_outstanding", "prefix")


class ConfigError(ValueError):
    """The gateway config is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """One API key: a salted hash of the secret (never the secret itself) and its limits.

    A limit of None means unlimited. `models` lists public model names; "*" allows every model.
    """

    name: str
    hash: str
    models: tuple[str, ...] = ("*",)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        if not self.hash.startswith("pbkdf2_sha256$") or self.hash.count("$") != 3:
            raise ConfigError(f"key {self.name!r}: hash must come from `pagoda gateway hash-key`")
        for limit in ("requests_per_minute", "tokens_per_minute", "max_concurrent"):
            value = getattr(self, limit)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"key {self.name!r}: {limit} must be a positive integer")

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One replica. An upstream started with `pagoda serve --api-key` needs the gateway to send
    that key: `api_key_env` names the environment variable holding it (read once, at load), so the
    secret stays out of the YAML; `api_key` takes it literally and is kept out of reprs."""

    url: str  # base URL without /v1, e.g. http://127.0.0.1:8001
    name: str = ""  # label in metrics; defaults to the URL's host:port
    api_key_env: str = ""
    api_key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"upstream url {self.url!r} must start with http:// or https://")
        if not self.name:
            object.__setattr__(self, "name", self.url.split("://", 1)[1].rstrip("/"))
        object.__setattr__(self, "url", self.url.rstrip("/"))
        if self.api_key_env:
            if self.api_key:
                raise ConfigError(f"upstream {self.name!r}: give api_key or api_key_env, not both")
            value = os.environ.get(self.api_key_env, "")
            if not value:
                raise ConfigError(f"upstream {self.name!r}: environment variable "
                                  f"{self.api_key_env!r} (its api_key_env) is not set")
            object.__setattr__(self, "api_key", value)

    @property
    def auth_headers(self) -> dict[str, str]:
        """What every request to this upstream carries (nothing when it has no key)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """A public model name served by a pool of interchangeable upstreams."""

    name: str
    upstreams: tuple[UpstreamConfig, ...]
    policy: str = "least_outstanding"
    upstream_model: str = ""  # model name sent upstream; defaults to `name`
    prefix_chars: int = 256  # prefix policy: how much of the rendered prompt picks the replica
    max_outstanding_per_upstream: int = 32  # prefix policy: beyond this, fall back to least loaded

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ConfigError(f"model {self.name!r}: needs at least one upstream")
        if self.policy not in POLICIES:
            raise ConfigError(f"model {self.name!r}: policy must be one of {', '.join(POLICIES)}")
        if self.prefix_chars < 1 or self.max_outstanding_per_upstream < 1:
            raise ConfigError(f"model {self.name!r}: prefix settings must be positive")
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ConfigError(f"model {self.name!r}: upstream names must be unique")


@dataclass(frozen=True, slots=True)
class RouteRule:
    """Send the request to `model` if any condition set here holds (unset ones are ignored)."""

    model: str
    min_prompt_chars: int | None = None
    min_max_tokens: int | None = None
    keywords: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.min_prompt_chars is None and self.min_max_tokens is None and not self.keywords:
            raise ConfigError(f"rule for {self.model!r}: needs at least one condition")


@dataclass(frozen=True, slots=True)
class VirtualModelConfig:
    """A model name that is not a pool: its rules pick a pool per request, first match wins."""

    name: str
    default: str
    rules: tuple[RouteRule, ...] = ()


@dataclass(frozen=True, slots=True)
class HealthConfig:
    path: str = "/health"
    interval_s: float = 5.0
    timeout_s: float = 2.0
    unhealthy_after: int = 2  # consecutive failed active checks before marked down
    eject_after_failures: int = 3  # consecutive failed requests before passive ejection
    eject_s: float = 30.0  # how long a passively ejected upstream sits out

    def __post_init__(self) -> None:
        _positive(self, "interval_s", "timeout_s", "unhealthy_after", "eject_after_failures",
                  "eject_s")


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = 3  # total tries across distinct upstreams
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _positive(self, "max_attempts", "connect_timeout_s", "read_timeout_s")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    enabled: bool = True
    ttl_s: float = 300.0
    max_entries: int = 10_000  # in-memory backend only; Redis relies on TTLs

    def __post_init__(self) -> None:
        _positive(self, "ttl_s", "max_entries")


def _positive(section: Any, *names: str) -> None:
    """Numeric fields that must be above zero (a zero timeout or attempt count would fail every
    request once the gateway runs; types were checked by `_build`)."""
    for name in names:
        if getattr(section, name) <= 0:
            raise ConfigError(f"{name} must be positive")


@dataclass(frozen=True, slots=True)
class EmbeddingCacheConfig:
    """The per-input embedding cache (see embedding_cache.py). Vectors of a fixed model and input
    never change, so entries live long: `ttl_s` (7 days) unless `model_ttl_s` names the model."""

    enabled: bool = True
    ttl_s: float = 7 * 86400.0
    model_ttl_s: dict[str, float] = field(default_factory=dict)  # pool name -> its entries' TTL
    max_bytes: int = 256 << 20  # in-memory backend only (vectors + keys); Redis relies on TTLs

    def __post_init__(self) -> None:
        if not isinstance(self.model_ttl_s, dict):
            raise ConfigError("model_ttl_s must map model names to seconds")
        for name, ttl in {"": self.ttl_s, **self.model_ttl_s}.items():
            where = f"model_ttl_s[{name!r}]" if name else "ttl_s"
            if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0:
                raise ConfigError(f"{where} must be a positive number of seconds")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) \
                or self.max_bytes < 1:
            raise ConfigError("max_bytes must be a positive integer")

    def ttl_for(self, pool: str) -> float:
        return self.model_ttl_s.get(pool, self.ttl_s)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    models: tuple[PoolConfig, ...]
    keys: tuple[KeyConfig, ...] = ()
    virtual_models: tuple[VirtualModelConfig, ...] = ()
    health: HealthConfig = field(default_factory=HealthConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    embedding_cache: EmbeddingCacheConfig = field(default_factory=EmbeddingCacheConfig)
    redis_url: str = ""  # empty: in-memory limits and cache (one gateway instance)
    redis_prefix: str = "pagoda:gw:"
    # OTLP/HTTP collector URL for traces; empty: no tracing (pagoda/telemetry.py)
    otlp_traces_endpoint: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 16 << 20  # larger request bodies get 413 without being read
    # CORS: origins whose web pages may call the gateway ("*": any, as `pagoda serve`'s
    # default; empty: no CORS headers, so browsers refuse other origins). Keys are bearer
    # headers, never cookies, so no credentials mode.
    allowed_origins: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        pools = {p.name for p in self.models}
        if not self.models:
            raise ConfigError("models: at least one model is required")
        if len(pools) != len(self.models):
            raise ConfigError("models: names must be unique")
        if not 1 <= self.port <= 65535:
            raise ConfigError("port must be in 1..65535")
        if not self.keys:
            raise ConfigError("keys: at least one API key is required")
        if self.max_body_bytes < 1:
            raise ConfigError("max_body_bytes must be positive")
        if not all(isinstance(o, str) and o for o in self.allowed_origins):
            raise ConfigError("allowed_origins: expected a list of origins such as "
                              "https://app.example.com, or '*'")
        if len({k.name for k in self.keys}) != len(self.keys):
            raise ConfigError("keys: names must be unique")
        for vm in self.virtual_models:
            if vm.name in pools:
                raise ConfigError(f"virtual model {vm.name!r} clashes with a model of that name")
            for target in [vm.default, *(r.model for r in vm.rules)]:
                if target not in pools:
                    raise ConfigError(f"virtual model {vm.name!r}: unknown model {target!r}")
        unknown_ttl = sorted(set(self.embedding_cache.model_ttl_s) - pools)
        if unknown_ttl:  # a virtual name has no vectors of its own: they belong to its pools
            raise ConfigError(f"embedding_cache.model_ttl_s: unknown models {unknown_ttl}")
        public = pools | {vm.name for vm in self.virtual_models}
        for key in self.keys:
            unknown = [m for m in key.models if m != "*" and m not in public]
            if unknown:
                raise ConfigError(f"key {key.name!r}: unknown models {unknown}")

    def pool(self, name: str) -> PoolConfig | None:
        return next((p for p in self.models if p.name == name), None)

    def virtual_model(self, name: str) -> VirtualModelConfig | None:
        return next((v for v in self.virtual_models if v.name == name), None)


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct `cls` from a mapping, turning unknown fields and type errors into ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    for name, value in data.items():
        expected = _SCALARS.get(str(cls.__dataclass_fields__[name].type))
        if expected is not None and not expected[0](value):
            raise ConfigError(f"{where}.{name}: expected {expected[1]}, got {value!r}")
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Field annotations (strings, as this module's) whose values YAML could give of another type:
# `retry: {max_attempts: '3'}` or `cache: {enabled: 'no'}` would otherwise load and misbehave.
_SCALARS = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (_number, "a number"),
    "int | None": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
                   "an integer"),
    "tuple[str, ...]": (lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v),
                        "a list of strings"),
}


def _strings(value: Any, where: str) -> tuple[str, ...]:
    """A YAML list of strings as a tuple (a lone string is a mistake, not a list of letters)."""
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(value)


def _list(data: dict, name: str) -> list:
    value = data.get(name) or []
    if not isinstance(value, list):
        raise ConfigError(f"{name}: expected a list")
    return value


def parse_config(data: Any) -> GatewayConfig:
    """Build a GatewayConfig from the YAML document's parsed mapping."""
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping at the top level")
    data = dict(data)
    pools = []
    for i, raw in enumerate(_list(data, "models")):
        raw = dict(raw) if isinstance(raw, dict) else raw
        if isinstance(raw, dict):
            ups = raw.get("upstreams") or []
            if not isinstance(ups, list):
                raise ConfigError(f"models[{i}].upstreams: expected a list, got {ups!r}")
            raw["upstreams"] = tuple(
                _build(UpstreamConfig, {"url": u} if isinstance(u, str) else u,
                       f"models[{i}].upstreams[{j}]")
                for j, u in enumerate(ups)
            )
        pools.append(_build(PoolConfig, raw, f"models[{i}]"))
    keys = []
    for i, raw in enumerate(_list(data, "keys")):
        if isinstance(raw, dict) and "models" in raw:
            raw = {**raw, "models": _strings(raw["models"], f"keys[{i}].models")}
        keys.append(_build(KeyConfig, raw, f"keys[{i}]"))
    virtual = []
    for i, raw in enumerate(_list(data, "virtual_models")):
        if isinstance(raw, dict):
            rules = tuple(
                _build(RouteRule, {**r, "keywords": _strings(
                    r.get("keywords", []), f"virtual_models[{i}].rules[{j}].keywords")}
                    if isinstance(r, dict) and "keywords" in r else r,
                    f"virtual_models[{i}].rules[{j}]")
                for j, r in enumerate(raw.get("rules") or [])
            )
            raw = {**raw, "rules": rules}
        virtual.append(_build(VirtualModelConfig, raw, f"virtual_models[{i}]"))
    top = {k: v for k, v in data.items() if k not in ("models", "keys", "virtual_models")}
    if "allowed_origins" in top:
        origins = top["allowed_origins"]
        if not isinstance(origins, list):
            raise ConfigError("allowed_origins: expected a list")
        top["allowed_origins"] = tuple(origins)
    sections = (("health", HealthConfig), ("retry", RetryConfig), ("cache", CacheConfig),
                ("embedding_cache", EmbeddingCacheConfig))
    for section, cls in sections:
        if section in top:
            top[section] = _build(cls, top[section] or {}, section)
    return _build(
        GatewayConfig,
        {**top, "models": tuple(pools), "keys": tuple(keys), "virtual_models": tuple(virtual)},
        "config",
    )


def load_config(path: str | Path) -> GatewayConfig:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:  # missing, a directory, unreadable, not text
        raise ConfigError(f"{path}: cannot read the config: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data)
