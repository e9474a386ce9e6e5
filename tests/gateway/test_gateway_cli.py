"""`pagoda gateway --config ...` as a real process, configured from a YAML file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from pagoda.gateway.auth import hash_key
from tests.gateway.gateway_harness import free_port, wait_for


def test_gateway_command_serves_from_a_yaml_config(replicas, tmp_path: Path):
    config = {
        "keys": [{"name": "cli", "hash": hash_key("cli-key", iterations=1000),
                  "requests_per_minute": 2}],
        "models": [{"name": "m", "upstreams": [replicas[0].url]}],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    pagoda = Path(sys.executable).with_name("pagoda")
    proc = subprocess.Popen([str(pagoda), "gateway", "--config", str(path), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=30)
        headers = {"Authorization": "Bearer cli-key"}
        body = {"model": "m", "prompt": "hello", "max_tokens": 2}
        codes = [httpx.post(url + "/v1/completions", json=body, headers=headers).status_code
                 for _ in range(3)]
        assert codes == [200, 200, 429]
    finally:
        proc.terminate()
        output = proc.communicate(timeout=10)[0]
    assert "cli-key" not in output
    assert replicas[0].stats()["requests"] == 2


def test_gateway_command_rejects_a_bad_config(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("models: []\nkeys: []\n")
    pagoda = Path(sys.executable).with_name("pagoda")
    result = subprocess.run([str(pagoda), "gateway", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "at least one model" in result.stderr


GOOD = ("keys: [{name: a, hash: 'pbkdf2_sha256$1$x$y'}]\n"
        "models: [{name: m, upstreams: ['http://127.0.0.1:9']}]\n")


@pytest.mark.parametrize("extra, says", [
    ("keys: [{name: a, hash: 123}]\n", "keys[0].hash: expected a string"),
    ("keys: [{name: a, hash: 'pbkdf2_sha256$1$x$y', models: small}]\n",
     "keys[0].models: expected a list of strings"),
    ("virtual_models: [{name: auto, default: m, rules: [{model: m, keywords: prove}]}]\n",
     "rules[0].keywords: expected a list of strings"),
    ("virtual_models: [{name: auto, default: m, rules: [{model: m, keywords: [a, 5]}]}]\n",
     "rules[0].keywords: expected a list of strings"),
    ("retry: {max_attempts: '3'}\n", "retry.max_attempts: expected an integer"),
    ("retry: {max_attempts: 0}\n", "max_attempts must be positive"),
    ("retry: {read_timeout_s: -1}\n", "read_timeout_s must be positive"),
    ("health: {interval_s: fast}\n", "health.interval_s: expected a number"),
    ("cache: {enabled: 'no'}\n", "cache.enabled: expected true or false"),
    ("cache: {ttl_s: -1}\n", "ttl_s must be positive"),
    ("port: 99999\n", "port must be in 1..65535"),
    ("models: [{name: m, upstreams: 'http://127.0.0.1:9'}]\n", "upstreams: expected a list"),
])
def test_malformed_config_values_are_one_line_errors(tmp_path: Path, extra, says):
    """Each once started the gateway and broke it later (misrouting, a 500 or 502 on every
    request, no health checks, the cache left on), or printed a traceback."""
    from pagoda.gateway.config import ConfigError, parse_config

    doc = yaml.safe_load(GOOD)
    doc.update(yaml.safe_load(extra))
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_config(doc)


def test_the_cli_refuses_a_directory_a_bad_port_and_no_redis_in_one_line(tmp_path: Path):
    pagoda = Path(sys.executable).with_name("pagoda")
    path = tmp_path / "ok.yaml"
    path.write_text(GOOD)
    for args in (["--config", str(tmp_path)], ["--config", str(path), "--port", "99999"],
                 ["--config", str(path), "--redis", "redis://127.0.0.1:1/0"]):
        result = subprocess.run([str(pagoda), "gateway", *args], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, \
            result.stderr
