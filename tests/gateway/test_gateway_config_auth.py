"""Config validation, key hashing and the hash-key CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pagoda.cli.main import main as pagoda_main
from pagoda.gateway.auth import KeyStore, bearer_token, hash_key, verify_key
from pagoda.gateway.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gateway.yaml"
HASH = hash_key("k", iterations=1000)


def minimal(**extra):
    return {
        "models": [{"name": "m", "upstreams": ["http://127.0.0.1:9"]}],
        "keys": [{"name": "a", "hash": HASH}],
        **extra,
    }


def test_example_config_loads():
    config = load_config(EXAMPLE)
    assert {p.name for p in config.models} >= {"small", "large"}
    assert config.virtual_model("auto") is not None
    assert all(k.hash.startswith("pbkdf2_sha256$") for k in config.keys)


def test_minimal_config_defaults():
    config = parse_config(minimal())
    pool = config.models[0]
    assert pool.policy == "least_outstanding"
    assert pool.upstreams[0].name == "127.0.0.1:9"
    assert config.keys[0].models == ("*",)
    assert config.cache.enabled and config.redis_url == ""


@pytest.mark.parametrize(
    "data, message",
    [
        (minimal(keys=[]), "at least one API key"),
        (minimal(keys=[{"name": "a", "hash": "plaintext"}]), "hash-key"),
        (minimal(keys=[{"name": "a", "hash": HASH, "models": ["nope"]}]), "unknown models"),
        (minimal(keys=[{"name": "a", "hash": HASH, "requests_per_minute": 0}]), "positive"),
        (minimal(models=[{"name": "m", "upstreams": []}]), "at least one upstream"),
        (minimal(models=[{"name": "m", "upstreams": ["ftp://x"]}]), "http://"),
        (minimal(models=[{"name": "m", "upstreams": ["http://a"], "policy": "x"}]), "policy"),
        (minimal(models=[{"name": "m", "upstreams": ["http://a"], "colour": 1}]), "colour"),
        (minimal(virtual_models=[{"name": "auto", "default": "zzz"}]), "unknown model 'zzz'"),
        (minimal(virtual_models=[{"name": "m", "default": "m"}]), "clashes"),
        (minimal(virtual_models=[{"name": "v", "default": "m", "rules": [{"model": "m"}]}]),
         "at least one condition"),
        (minimal(cache={"ttl": 3}), "cache: unknown field"),
        (minimal(models=[{"name": "m", "upstreams": [
            {"url": "http://a", "api_key_env": "PAGODA_TEST_UNSET_VARIABLE"}]}]), "is not set"),
        (minimal(models=[{"name": "m", "upstreams": [
            {"url": "http://a", "api_key": "k", "api_key_env": "HOME"}]}]), "not both"),
        ([1, 2], "mapping"),
    ],
)
def test_invalid_configs_name_the_problem(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_upstream_key_from_the_environment_never_shows_in_reprs(monkeypatch):
    monkeypatch.setenv("PAGODA_TEST_UPSTREAM_KEY", "s3cret-value")
    config = parse_config(minimal(models=[{"name": "m", "upstreams": [
        {"url": "http://a:1", "api_key_env": "PAGODA_TEST_UPSTREAM_KEY"}, "http://b:2"]}]))
    keyed, plain = config.models[0].upstreams
    assert keyed.auth_headers == {"Authorization": "Bearer s3cret-value"}
    assert plain.auth_headers == {}
    assert "s3cret" not in repr(config)


def test_hash_is_salted_and_verifies():
    a, b = hash_key("secret", iterations=1000), hash_key("secret", iterations=1000)
    assert a != b  # different salts
    assert verify_key("secret", a) and verify_key("secret", b)
    assert not verify_key("secret2", a)
    assert "secret" not in a


def test_keystore_matches_and_memoises():
    config = parse_config(minimal(keys=[
        {"name": "a", "hash": hash_key("ka", iterations=1000)},
        {"name": "b", "hash": hash_key("kb", iterations=1000)},
    ]))
    store = KeyStore(config.keys)
    assert store.authenticate("kb").name == "b"
    assert store.authenticate("ka").name == "a"
    assert store.authenticate("kc") is None
    assert asyncio.run(store.authenticate_async("kb")).name == "b"
    assert asyncio.run(store.authenticate_async("nope")) is None
    assert store.authenticate(None) is None and store.authenticate("") is None


def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_hash_key_cli_output_verifies(capsys):
    assert pagoda_main(["gateway", "hash-key", "my-key", "--iterations", "2000"]) == 0
    encoded = capsys.readouterr().out.strip()
    assert encoded.startswith("pbkdf2_sha256$2000$")
    assert verify_key("my-key", encoded) and not verify_key("other", encoded)


def test_gateway_cli_requires_config(capsys):
    assert pagoda_main(["gateway"]) == 2
    assert "--config" in capsys.readouterr().err
