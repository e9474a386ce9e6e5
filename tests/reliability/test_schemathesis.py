"""Property-based fuzzing of the server's OpenAPI with schemathesis (fixed seed, bounded examples):
for every documented operation, generated requests — valid and invalid — never get a 5xx, and
every answer matches what /openapi.json declares (status code, content type, body schema).

The server is started with a short context (--max-model-len) so generated `max_tokens` values
cannot make one example run for minutes."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server.server_process import ServerProcess

EXAMPLES = 6  # per operation in `make test`; `make soak` raises it (PAGODA_FUZZ_EXAMPLES)


@pytest.fixture(scope="module")
def fuzz_server():
    proc = ServerProcess("--max-model-len", "96", "--max-num-seqs", "8", "--max-waiting", "64",
                         api_key=None)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
def test_no_server_error_and_answers_match_the_schema(case):
    case.call_and_validate(timeout=60, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance,
        response_schema_conformance])
