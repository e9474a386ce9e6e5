"""Property-based fuzzing of the server's and the gateway's OpenAPI with schemathesis (fixed
seed, bounded examples): for every documented operation, generated requests — valid and
invalid — never get a 5xx, and every answer matches what /openapi.json declares (status code,
content type, body schema).

The server is started with a short context (--max-model-len) so generated `max_tokens` values
cannot make one example run for minutes."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.gateway.gateway_harness import GatewayServer, auth, make_config
from tests.server.server_process import serving

# per operation: bounded in `make test`; `make soak` raises it
EXAMPLES = int(os.environ.get("PAGODA_FUZZ_EXAMPLES", "6"))


@pytest.fixture(scope="module")
def fuzz_server():
    with serving("--served-model-name", "m", "--max-model-len", "96", "--max-num-seqs", "8",
                 "--max-waiting", "64", api_key=None) as proc:
        yield proc


def test_no_server_error_and_answers_match_the_schema(fuzz_server):
    """One Hypothesis run per documented operation (schemathesis' strategies; its pytest
    plugin does not run under this pytest). Every failure is collected, not just the first."""
    operations, calls = fuzz(fuzz_server.url, {})
    assert operations >= 15 and len(set(calls)) == operations and len(calls) > 3 * operations


def test_the_gateway_in_front_of_a_server_too(fuzz_server):
    """The same over the gateway's /openapi.json, with a real server behind it: the gateway's
    own refusals and the server's passed-through answers both match what the gateway documents
    (its `model` is an enum of its routes, so most examples reach the server)."""
    with GatewayServer(make_config({"m": [fuzz_server.url]})) as gw:
        operations, calls = fuzz(gw.url, auth())
        forwarded = sum(gw.state.metrics.registry.get_sample_value(
            "pagoda:gateway_requests_total", {"key": "alice", "model": "m",
                                              "upstream": fuzz_server.url[7:], "status": status})
                        or 0 for status in ("200", "400"))
    assert operations == 8 and len(set(calls)) == operations and len(calls) > 3 * operations
    assert forwarded > 10  # the fuzz reached the server, not only the gateway's own checks


def fuzz(url: str, headers: dict[str, str]) -> tuple[int, list[str]]:
    """Fuzz every operation of the OpenAPI at `url`; returns (operations, operation per call)
    and fails with every failure found."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    failures, operations, calls = [], 0, []
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate])
        @given(case=operation.as_strategy())
        def one(case):
            calls.append(case.operation.label)
            case.call_and_validate(timeout=60, headers=headers, checks=[
                not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance])

        try:
            one()
        except Exception as exc:  # noqa: BLE001 - reported below with its operation
            failures.append(f"{operation.label}: {str(exc)[:600]}")
    assert not failures, "\n\n".join(failures)
    return operations, calls
