"""`pagoda gateway --config ...` as a real process, configured from a YAML file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
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
    assert "at least one API key" in result.stderr
