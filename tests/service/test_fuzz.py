"""Property-based fuzzing of the OpenAPI schema with schemathesis against a real server:
whatever the input (valid or not), no 5xx, and documented responses match their schema; each
operation's fuzzing reaches its route (checked per operation: no test depends on another's).
Auth is on: API keys on writes and reads (``auth_reads``), the admin token on admin routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from service.app import create_app
from service.settings import ServiceSettings
from tests.service.live import ServerThread, wait_ready
from tests.service.test_api import KEY, TOKEN, settings_for

MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def fuzz_server(
    artifacts_a: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("fuzz")
    app = create_app(
        settings_for(artifacts_a, tmp, max_k=100, max_history=100, max_batch=16, auth_reads=True)
    )
    with ServerThread(app) as srv:
        wait_ready(srv.url)
        yield srv


def openapi_document() -> dict:
    """The app's OpenAPI document (it does not depend on a loaded model: no lifespan runs)."""
    app = create_app(ServiceSettings.from_mapping({"artifacts": Path(__file__).parent}))
    return app.openapi()


# Loaded at import (schemathesis's lazy fixture loader does not support this pytest); the live
# server serves the same document, checked below.
schema = schemathesis.openapi.from_dict(openapi_document())
schema.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True)
schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])


def test_the_fuzzed_schema_is_the_served_one(fuzz_server: ServerThread) -> None:
    served = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    assert served == openapi_document()


def route_counts(url: str) -> dict[tuple[str, str], float]:
    """Requests the server counted so far, by (route, status)."""
    counts: dict[tuple[str, str], float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("shardrec_http_requests_total{"):
            labels, value = line[len("shardrec_http_requests_total{") :].split("} ")
            parts = dict(p.split("=", 1) for p in labels.split(","))
            key = (parts["route"].strip('"'), parts["status"].strip('"'))
            counts[key] = counts.get(key, 0) + float(value)
    return counts


@pytest.fixture
def fuzzed_route(fuzz_server: ServerThread) -> Iterator[list[str]]:
    """The route one operation's fuzzing requests (the test records it). Once Hypothesis has
    run all the examples of that operation, the server must have counted at least 10 requests
    on the route, none answered 5xx (checked here, so that no test depends on another)."""
    before = route_counts(fuzz_server.url)
    route: list[str] = []
    yield route
    if not route or route[0] == "/metrics":  # /metrics does not count itself
        return
    after = route_counts(fuzz_server.url)
    got = {s: n - before.get((r, s), 0) for (r, s), n in after.items() if r == route[0]}
    got = {s: n for s, n in got.items() if n}
    assert sum(got.values()) >= 10, (route[0], got)
    assert not [s for s in got if s.startswith("5")], (route[0], got)
    if route[0] == "/v1/recommend":
        assert "200" in got and "422" in got, got


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case, fuzz_server: ServerThread, fuzzed_route: list[str]) -> None:
    """Whatever the input, no 5xx and documented responses match their schema; the fuzzer
    reaches the route (see `fuzzed_route`)."""
    if not fuzzed_route:
        fuzzed_route.append(case.path)
    # The real credentials let the fuzzer reach the bodies (reload of random paths: refused, 422).
    headers = {"Authorization": f"Bearer {TOKEN if 'admin' in case.path else KEY}"}
    response = case.call(base_url=fuzz_server.url, headers=headers)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
