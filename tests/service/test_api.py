"""The HTTP API against a real uvicorn server on a loopback port: every endpoint, fallbacks,
exclusions, unknown ids, limits and error texts, admin and API-key auth, CORS, request ids,
readiness, metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.hotpath import HotRouteMiddleware
from service.requestid import RequestIdFilter
from service.settings import ServiceSettings
from service.state import default_model_factory
from tests.procs import NotYet, wait_until
from tests.service.live import ServerThread, wait_ready

TOKEN = "test-admin-token-0123456789"
KEY = "test-api-key-0123456789-abc"
WRITE = {"Authorization": f"Bearer {KEY}"}


def settings_for(
    artifacts: Path, tmp: Path, index: dict[str, object] | None = None, **extra: object
) -> ServiceSettings:
    """Small, fast settings; ``index`` entries replace those of the index settings."""
    values = {
        "artifacts": artifacts,
        "db_path": tmp / "histories.sqlite",
        "index": {
            "dir": tmp / "index",
            "hnsw_m": 8,
            "ef_construction": 40,
            "recall_queries": 100,
            **(index or {}),
        },
        "db_synchronous": "NORMAL",
        "max_k": 50,
        "max_history": 40,
        "max_batch": 8,
        "max_body_bytes": 8192,
        "admin_token": TOKEN,
        "api_keys": f"another-key-0123456789,{KEY}",
        **extra,
    }
    return ServiceSettings.from_mapping(values)


@pytest.fixture(scope="module")
def server(artifacts_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    app = create_app(settings_for(artifacts_a, tmp_path_factory.mktemp("api")))
    with ServerThread(app) as srv:
        wait_ready(srv.url)
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def item_ids(body: dict) -> list[str]:
    return [i["item_id"] for i in body["items"]]


def errors(response: httpx.Response) -> list[tuple[str, str]]:
    return [(".".join(map(str, e["loc"])), e["msg"]) for e in response.json()["detail"]]


# ---------------------------------------------------------------------- health, docs, model


def test_health_ready_docs(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model_version"].startswith("run-")
    assert "swagger" in client.get("/docs").text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/recommend",
        "/v1/recommend/batch",
        "/v1/items/{item_id}/similar",
        "/v1/users/{user_id}/events",
        "/v1/model",
        "/v1/admin/reload",
    ):
        assert path in paths


def test_model_summary(client: httpx.Client) -> None:
    body = client.get("/v1/model").json()
    assert body["num_items"] == 300 and body["embedding_dim"] == 16
    assert body["index"]["kind"] == "hnsw" and body["index"]["source"] == "built"
    assert body["index"]["params"]["hnsw_m"] == 8
    recall = body["index"]["recall"]
    assert recall["k"] == 10 and recall["num_queries"] == 100 and 0.5 < recall["recall"] <= 1
    assert "HR@10" in body["metrics"]["model"]["filtered"]


# ---------------------------------------------------------------------- recommend


def test_recommend_by_user_excludes_its_history(client: httpx.Client) -> None:
    history = client.get("/v1/users/9/history", params={"limit": 1000}).json()
    assert history["length"] > 0
    r = client.post("/v1/recommend", json={"user_id": "9", "k": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "model" and body["user_id"] == "9"
    assert len(body["items"]) == 20 and body["history_length"] > 0
    assert not set(history["items"]) & set(item_ids(body))
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(i["title"] is None for i in body["items"])  # synthetic items have no titles


def test_exclude_history_false_keeps_watched_items(client: httpx.Client) -> None:
    watched = client.get("/v1/users/9/history").json()["items"]
    body = client.post(
        "/v1/recommend", json={"user_id": "9", "k": 50, "exclude_history": False}
    ).json()
    excluded = client.post("/v1/recommend", json={"user_id": "9", "k": 50}).json()
    assert set(watched) & set(item_ids(body))
    assert not set(watched) & set(item_ids(excluded))


def test_explicit_history_exclusions_and_unknown_ids(client: httpx.Client) -> None:
    base = client.post("/v1/recommend", json={"history": ["1", "2"], "k": 5}).json()
    banned = item_ids(base)[:2]
    r = client.post(
        "/v1/recommend",
        json={"history": ["1", "no-such", "2"], "exclude": [*banned, "ghost"], "k": 5},
    )
    body = r.json()
    assert body["source"] == "model" and body["history_length"] == 2
    assert not {"1", "2", *banned} & set(item_ids(body))
    assert body["unknown_items"] == ["no-such", "ghost"]
    numbers = client.post("/v1/recommend", json={"history": [1, 2], "k": 5}).json()
    assert item_ids(numbers) == item_ids(base)  # JSON numbers are ids too


def test_popularity_fallback(client: httpx.Client) -> None:
    anonymous = client.post("/v1/recommend", json={"history": [], "k": 4}).json()
    stranger = client.post("/v1/recommend", json={"user_id": "stranger", "k": 4}).json()
    unknown_only = client.post("/v1/recommend", json={"history": ["x", "y"], "k": 4}).json()
    for body in (anonymous, stranger, unknown_only):
        assert body["source"] == "popularity" and body["history_length"] == 0
        assert item_ids(body) == item_ids(anonymous)
    counts = [i["score"] for i in anonymous["items"]]
    assert counts == sorted(counts, reverse=True) and counts[0] > 0
    assert unknown_only["unknown_items"] == ["x", "y"]


def test_user_features(client: httpx.Client) -> None:
    plain = client.post("/v1/recommend", json={"history": ["3", "4"], "k": 10}).json()
    unknown_value = client.post(
        "/v1/recommend",
        json={"history": ["3", "4"], "k": 10, "user_features": {"age": "nope", "shoe": "9"}},
    ).json()
    assert item_ids(unknown_value) == item_ids(plain)  # unknown value -> code 0
    assert unknown_value["ignored_features"] == ["shoe"]
    known = client.post(
        "/v1/recommend",
        json={"history": ["3", "4"], "k": 10, "user_features": {"age": "18-24"}},
    ).json()
    assert [i["score"] for i in known["items"]] != [i["score"] for i in plain["items"]]


def test_batch_matches_single_requests(client: httpx.Client) -> None:
    requests = [
        {"user_id": "5", "k": 3},
        {"history": [], "k": 2},
        {"history": ["7", "bogus"], "k": 4, "exclude": ["8"]},
    ]
    r = client.post("/v1/recommend/batch", json={"requests": requests})
    assert r.status_code == 200, r.text
    body = r.json()
    singles = [client.post("/v1/recommend", json=q).json() for q in requests]
    assert [res["source"] for res in body["results"]] == ["model", "popularity", "model"]
    for got, single in zip(body["results"], singles):
        assert item_ids(got) == item_ids(single)
        assert got["unknown_items"] == single["unknown_items"]
    assert body["model_version"] == singles[0]["model_version"]


def hot_dispatcher(app) -> HotRouteMiddleware:
    layer = app.middleware_stack
    while not isinstance(layer, HotRouteMiddleware):
        layer = layer.app
    return layer


def test_hot_routes_are_answered_without_the_router(
    server: ServerThread, client: httpx.Client
) -> None:
    hot = hot_dispatcher(server.server.config.app)
    assert set(hot.routes) == {("POST", "/v1/recommend"), ("POST", "/v1/recommend/batch")}
    before = hot.hits
    assert client.post("/v1/recommend", json={"user_id": "1"}).status_code == 200
    assert (
        client.post("/v1/recommend/batch", json={"requests": [{"history": []}]}).status_code == 200
    )
    assert client.post("/v1/recommend", json={"k": 0}).status_code == 422
    assert hot.hits == before + 3
    assert client.get("/v1/recommend").status_code == 405  # other methods: the router
    assert client.post("/v1/recommend/", json={"user_id": "1"}).status_code in (307, 404)
    assert hot.hits == before + 3
    r = client.post(
        "/v1/recommend", content=b'{"user_id": "1"}', headers={"content-type": "text/plain"}
    )
    assert r.status_code == 422 and errors(r)[0][0] == "body"
    r = client.post("/v1/recommend")
    assert r.status_code == 422 and errors(r) == [("body", "Field required")]


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("payload", "loc", "reason"),
    [
        ({"user_id": "1", "k": 51}, "body.k", "at most 50 (the service's max_k)"),
        ({"user_id": "1", "k": 0}, "body.k", "greater than or equal to 1"),
        ({"history": ["1"] * 41}, "body.history", "at most 40 (the service's max_history)"),
        ({"user_id": "1", "exclude": ["1"] * 41}, "body.exclude", "max_history"),
        ({"k": 3}, "body", "give user_id, history, or both"),
        ({"user_id": "1", "colour": "red"}, "body.colour", "Extra inputs are not permitted"),
        ({"user_id": ""}, "body.user_id", "at least 1 character"),
        ({"user_id": "a\u0000b"}, "body.user_id", "should match pattern"),
        ({"history": [None]}, "body.history.0", "valid string"),
        ({"user_id": "1", "exclude_history": "maybe"}, "body.exclude_history", "valid boolean"),
    ],
)
def test_validation_errors_name_the_field_and_reason(
    client: httpx.Client, payload: dict, loc: str, reason: str
) -> None:
    r = client.post("/v1/recommend", json=payload)
    assert r.status_code == 422, r.text
    assert any(loc == got_loc and reason in msg for got_loc, msg in errors(r)), errors(r)


def test_batch_limits(client: httpx.Client) -> None:
    r = client.post("/v1/recommend/batch", json={"requests": [{"history": []}] * 9})
    assert r.status_code == 422
    assert ("body.requests", "must be at most 8 (the service's max_batch), got 9") in errors(r)
    r = client.post("/v1/recommend/batch", json={"requests": [{"history": [], "k": 99}]})
    assert errors(r)[0][0] == "body.requests.0.k"
    assert client.post("/v1/recommend/batch", json={"requests": []}).status_code == 422


def test_malformed_json_and_oversized_body(client: httpx.Client) -> None:
    r = client.post(
        "/v1/recommend", content=b'{"user_id": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    big = {"history": ["x" * 250] * 40, "k": 5}  # within max_history, over max_body_bytes
    r = client.post("/v1/recommend", json=big)
    assert r.status_code == 413
    assert r.json()["detail"] == "request body larger than 8192 bytes (max_body_bytes)"
    chunks = iter([b'{"history": [', b'"x",' * 3000, b'"y"]}'])  # no Content-Length
    r = client.post("/v1/recommend", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json()["detail"] == "request body larger than 8192 bytes (max_body_bytes)"
    assert client.get("/v1/nothing-here").status_code == 404
    assert client.put("/v1/recommend", json={}).status_code == 405


# ---------------------------------------------------------------------- similar


def test_similar_items(client: httpx.Client) -> None:
    r = client.get("/v1/items/10/similar", params={"k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["item_id"] == "10" and len(body["items"]) == 7
    assert "10" not in item_ids(body)
    assert client.get("/v1/items/10/similar").json()["items"][:7] == body["items"]
    missing = client.get("/v1/items/no-such-item/similar")
    assert missing.status_code == 404
    assert missing.json()["detail"].startswith("unknown item id 'no-such-item': not in the")
    too_many = client.get("/v1/items/10/similar", params={"k": 51})
    assert too_many.status_code == 422 and errors(too_many)[0][0] == "query.k"


# ---------------------------------------------------------------------- events


def test_events_feed_the_next_recommendation(client: httpx.Client) -> None:
    before = client.post("/v1/recommend", json={"user_id": "fresh-user", "k": 5}).json()
    assert before["source"] == "popularity"
    watched = item_ids(before)[:3]
    r = client.post("/v1/users/fresh-user/events", json={"items": [*watched, "zzz"]}, headers=WRITE)
    assert r.status_code == 200, r.text
    assert r.json()["history_length"] == 4 and r.json()["unknown_items"] == ["zzz"]
    after = client.post("/v1/recommend", json={"user_id": "fresh-user", "k": 5}).json()
    assert after["source"] == "model" and after["history_length"] == 3
    assert not set(watched) & set(item_ids(after))
    history = client.get("/v1/users/fresh-user/history").json()
    assert history == {"user_id": "fresh-user", "items": [*watched, "zzz"], "length": 4}
    more = client.post(
        "/v1/users/fresh-user/events",
        json={"items": ["1", "2"], "timestamps": [1.0, 2.0]},
        headers=WRITE,
    )
    assert more.json()["history_length"] == 6


def test_event_refusals(client: httpx.Client) -> None:
    r = client.post(
        "/v1/users/u/events", json={"items": ["1"], "timestamps": [1.0, 2.0]}, headers=WRITE
    )
    assert r.status_code == 422 and "one value per item" in r.text
    r = client.post("/v1/users/u/events", json={"items": ["1"] * 41}, headers=WRITE)
    assert ("body.items", "must be at most 40 (the service's max_history), got 41") in errors(r)
    assert client.post("/v1/users/u/events", json={"items": []}, headers=WRITE).status_code == 422
    r = client.post(
        "/v1/users/u/events",
        content=b'{"items": ["1"], "timestamps": [NaN]}',
        headers={"content-type": "application/json", **WRITE},
    )
    assert r.status_code == 422
    assert client.get("/v1/users/u/history").json()["length"] == 0


# ---------------------------------------------------------------------- admin


def test_admin_token_missing_wrong_right(client: httpx.Client, tmp_path: Path) -> None:
    body = {"artifacts": str(tmp_path)}
    missing = client.post("/v1/admin/reload", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "missing admin token" in missing.json()["detail"]
    wrong = client.post("/v1/admin/reload", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["detail"] == "wrong admin token"
    basic = client.post("/v1/admin/reload", json=body, headers={"Authorization": "Basic eDp5"})
    assert basic.status_code == 401
    right = client.post("/v1/admin/reload", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 422
    assert right.json()["detail"].startswith("reload refused: ")
    assert "manifest.json is missing" in right.json()["detail"]


def test_admin_disabled_without_token(artifacts_a: Path, tmp_path: Path) -> None:
    app = create_app(settings_for(artifacts_a, tmp_path, admin_token=None))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as c:
        wait_ready(srv.url)
        r = c.post(
            "/v1/admin/reload",
            json={"artifacts": str(artifacts_a)},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert r.status_code == 403
        assert r.json()["detail"].startswith("admin routes are disabled")


def test_event_writes_need_an_api_key(client: httpx.Client) -> None:
    before = client.get("/v1/users/victim/history").json()["length"]
    missing = client.post("/v1/users/victim/events", json={"items": ["1"]})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["detail"].startswith("missing API key: event writes need")
    for wrong in ("nope", TOKEN, KEY[:-1]):  # the admin token is no API key
        r = client.post(
            "/v1/users/victim/events",
            json={"items": ["1"]},
            headers={"Authorization": f"Bearer {wrong}"},
        )
        assert r.status_code == 403 and r.json()["detail"] == "wrong API key", wrong
    assert client.get("/v1/users/victim/history").json()["length"] == before
    other = {"Authorization": "Bearer another-key-0123456789"}  # any configured key
    r = client.post("/v1/users/victim/events", json={"items": ["1"]}, headers=other)
    assert r.status_code == 200 and r.json()["history_length"] == before + 1


def test_event_writes_disabled_without_keys(artifacts_a: Path, tmp_path: Path) -> None:
    app = create_app(settings_for(artifacts_a, tmp_path, api_keys=None))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as c:
        wait_ready(srv.url)
        r = c.post("/v1/users/u/events", json={"items": ["1"]}, headers=WRITE)
        assert r.status_code == 403
        assert r.json()["detail"] == (
            "event writes are disabled: set SHARDREC_API_KEYS to enable them"
        )


def test_reads_with_auth_reads(artifacts_a: Path, tmp_path: Path) -> None:
    app = create_app(settings_for(artifacts_a, tmp_path, auth_reads=True))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as c:
        wait_ready(srv.url)
        reads = [
            ("POST", "/v1/recommend", {"user_id": "1"}),
            ("POST", "/v1/recommend/batch", {"requests": [{"user_id": "1"}]}),
            ("GET", "/v1/items/1/similar", None),
            ("GET", "/v1/users/1/history", None),
            ("GET", "/v1/model", None),
        ]
        for method, path, body in reads:
            r = c.request(method, path, json=body)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["detail"].startswith("missing API key: reads need"), path
            r = c.request(method, path, json=body, headers={"Authorization": "Bearer x"})
            assert r.status_code == 403 and r.json()["detail"] == "wrong API key", path
            assert c.request(method, path, json=body, headers=WRITE).status_code == 200, path
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_request_ids_in_the_answer_and_the_logs(server: ServerThread, client: httpx.Client) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(RequestIdFilter())
    app_log = logging.getLogger("service.app")
    app_log.addHandler(handler)
    level = app_log.level
    app_log.setLevel(logging.INFO)
    try:
        given = {"X-Request-ID": "trace-42.a:b"}
        r = client.post("/v1/recommend", json={"k": 0, "user_id": "1"}, headers=given)
        assert r.status_code == 422 and r.headers["x-request-id"] == "trace-42.a:b"
        r = client.get("/v1/items/no-such/similar", headers={"X-Request-ID": "other-7"})
        assert r.status_code == 404 and r.headers["x-request-id"] == "other-7"
    finally:
        app_log.removeHandler(handler)
        app_log.setLevel(level)
    logged = {(rec.getMessage().split(":")[0], rec.request_id) for rec in records}  # type: ignore[attr-defined]
    assert ("422 POST /v1/recommend", "trace-42.a:b") in logged, logged
    assert ("404 GET /v1/items/no-such/similar", "other-7") in logged, logged
    made = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    for bad in ("has space", "x" * 129, "a/b<script>"):
        r = client.get("/healthz", headers={"X-Request-ID": bad})
        assert len(r.headers["x-request-id"]) == 32 and r.headers["x-request-id"] != bad


def test_cors_is_off_by_default_and_configurable(
    client: httpx.Client, artifacts_a: Path, tmp_path: Path
) -> None:
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    r = client.options("/v1/recommend", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = client.get("/healthz", headers={"Origin": "https://app.example.com"})
    assert "access-control-allow-origin" not in r.headers
    app = create_app(settings_for(artifacts_a, tmp_path, cors_origins=["https://app.example.com"]))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as c:
        wait_ready(srv.url)
        r = c.options("/v1/recommend", headers=preflight)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example.com"
        r = c.post(
            "/v1/recommend", json={"user_id": "1"}, headers={"Origin": "https://app.example.com"}
        )
        assert r.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        r = c.options("/v1/recommend", headers={**preflight, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


# ---------------------------------------------------------------------- readiness, threads


def test_not_ready_until_loaded(artifacts_a: Path, tmp_path: Path) -> None:
    release = threading.Event()

    def slow_factory(settings, path, index_dir):
        release.wait(30)
        return default_model_factory(settings, path, index_dir)

    app = create_app(settings_for(artifacts_a, tmp_path), model_factory=slow_factory)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/healthz").status_code == 200
        loading = c.get("/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        r = c.post("/v1/recommend", json={"user_id": "1"})
        assert r.status_code == 503 and "still loading" in r.json()["detail"]
        assert c.get("/v1/model").status_code == 503
        release.set()
        wait_ready(srv.url)
        assert c.post("/v1/recommend", json={"user_id": "1"}).status_code == 200


def test_failed_load_is_reported(tmp_path: Path) -> None:
    empty = tmp_path / "not-artifacts"
    empty.mkdir()
    app = create_app(settings_for(empty, tmp_path))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as c:

        def loaded() -> httpx.Response:
            r = c.get("/readyz")
            if r.json()["status"] == "loading":
                raise NotYet("loading")
            return r

        ready = wait_until(loaded, "the load to end", timeout=30, interval=0.02)
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "manifest.json is missing" in ready.json()["detail"]
        r = c.post("/v1/recommend", json={"user_id": "1"})
        assert r.status_code == 503 and "model not loaded: ArtifactError" in r.json()["detail"]


def test_slow_work_does_not_block_the_event_loop(
    server: ServerThread, client: httpx.Client
) -> None:
    """A recommendation held on its compute thread does not stop other requests (no wall-clock
    bound: the recommendation waits until the other answers have arrived)."""
    recommender = server.server.config.app.state.service.recommender
    original = recommender.recommend
    started, release = threading.Event(), threading.Event()

    def slow(queries):
        started.set()
        assert release.wait(30), "not released"
        return original(queries)

    recommender.recommend = slow
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.post, "/v1/recommend", json={"user_id": "1"})
            assert started.wait(30)
            # Both answer while the recommendation is still held (not behind it).
            assert client.get("/healthz").status_code == 200
            assert client.get("/v1/items/1/similar").status_code == 200
            assert not pending.done()
            release.set()
            assert pending.result().status_code == 200
    finally:
        release.set()
        del recommender.recommend


# ---------------------------------------------------------------------- metrics


def test_metrics(client: httpx.Client) -> None:
    client.post("/v1/recommend", json={"user_id": "1"})
    client.post("/v1/recommend", json={"k": 0})
    client.get("/v1/items/no-such/similar")
    version = client.get("/readyz").json()["model_version"]
    text = client.get("/metrics").text
    assert 'shardrec_http_requests_total{method="POST",route="/v1/recommend",status="200"}' in text
    assert 'shardrec_http_requests_total{method="POST",route="/v1/recommend",status="422"}' in text
    assert (
        'shardrec_http_requests_total{method="GET",route="/v1/items/{item_id}/similar",'
        'status="404"}' in text
    )
    assert 'shardrec_http_request_duration_seconds_bucket{le="0.005",method="POST"' in text
    assert f'shardrec_model_info{{index_kind="hnsw",version="{version}"}} 1.0' in text
    assert 'shardrec_search_duration_seconds_count{index_kind="hnsw"}' in text
    assert "shardrec_model_items 300.0" in text
    assert "shardrec_batch_size_count" in text
    assert 'route="/metrics"' not in text
