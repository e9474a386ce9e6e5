"""The operations examples stay true: every series the Grafana dashboard queries is exported by a
real server or gateway, and the Kubernetes manifests validate against Kubernetes' own schemas
(kubernetes-validate, strict: unknown fields are errors) and probe routes that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.gateway.gateway_harness import GatewayServer, make_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DASHBOARD = EXAMPLES / "grafana" / "pagoda.json"
SUFFIXES = {"counter": ("", "_total"), "gauge": ("",),  # TYPE lines name counters with or
            # without _total depending on the client version
            "histogram": ("_bucket", "_sum", "_count", "_created")}


def exported_series(metrics_text: str) -> set[str]:
    """Every series name a scrape can hold, from the `# TYPE` lines: a labelled metric with no
    samples yet is still declared there."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\w+)$", metrics_text, re.M):
        names |= {name + s for s in SUFFIXES.get(kind, ("",))}
    return names


def dashboard_series() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"]
              if isinstance(v.get("query"), dict)]
    assert len(exprs) >= 20
    return set(re.findall(r"pagoda:[A-Za-z0-9_:]+", " ".join(exprs)))


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"]
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p


def test_every_dashboard_series_is_exported(server):
    with GatewayServer(make_config({"small": [server.url]})) as gateway:
        gateway_text = httpx.get(gateway.url + "/metrics").text
    server_text = httpx.get(server.url + "/metrics").text
    exported = exported_series(server_text) | exported_series(gateway_text)
    missing = sorted(dashboard_series() - exported)
    assert not missing, f"the dashboard queries series nobody exports: {missing}"


@pytest.mark.parametrize("manifest", sorted((EXAMPLES / "k8s").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_kubernetes_manifests_validate(manifest, server):
    documents = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    assert documents
    for doc in documents:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
        if doc["kind"] != "Deployment":
            continue
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            path = container[probe]["httpGet"]["path"]
            assert httpx.get(server.url + path).status_code == 200, path
        assert container["args"][0] == "serve"
