"""Prometheus metrics of the service, one registry per app instance, aggregated across worker
processes.

`ServiceMetrics` owns a private ``CollectorRegistry``: two apps in one process (tests, a reload)
never share or collide on metric series, and nothing is registered in prometheus_client's
global ``REGISTRY``. Under ``serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set, see
`service.cli`) every worker writes its values to that directory (prometheus_client's
multiprocess mode) and a scrape of any worker reads them all: counters and histograms are
summed over the workers, ``shardrec_model_info`` has one series per worker process (a ``pid``
label), and the per-process CPU and memory collector is off (it would describe one worker).

`MetricsMiddleware` is a plain ASGI middleware (no framework import) that records every HTTP
request by method, route template (``/users/{user_id}/recommend``, not the raw path, so label
cardinality stays bounded however many users or fuzzed paths come) and status code. Requests
that match no route are recorded under the route ``"<unmatched>"``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

logger = logging.getLogger(__name__)

UNMATCHED_ROUTE = "<unmatched>"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ServiceMetrics:
    """The service's metrics in their own registry.

    Series (with the default ``namespace="shardrec"``):

    * ``shardrec_http_requests_total{method, route, status}``: counter.
    * ``shardrec_http_request_duration_seconds{method, route, status}``: histogram.
    * ``shardrec_http_requests_in_flight``: gauge.
    * ``shardrec_model_info{version, index_kind}``: 1 for the serving model (one series).
    * ``shardrec_model_items``, ``shardrec_index_recall``, ``shardrec_model_loaded_timestamp_seconds``.
    * ``shardrec_search_duration_seconds{index_kind}``: time spent in index search.
    * ``shardrec_batch_size``: user queries per encoder + index batch.
    * ``shardrec_process_*``: CPU and memory of the process (Linux), if ``process_metrics``
      (one process only).

    Args:
        namespace: prefix of every metric name.
        registry: registry to fill; a new private one by default.
        process_metrics: also export the process collector.
        multiprocess_dir: the directory shared by the worker processes; by default
            ``$PROMETHEUS_MULTIPROC_DIR`` (prometheus_client reads it when it is imported).
    """

    def __init__(
        self,
        namespace: str = "shardrec",
        registry: CollectorRegistry | None = None,
        process_metrics: bool = True,
        latency_buckets: Iterable[float] = LATENCY_BUCKETS,
        multiprocess_dir: str | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir or os.environ.get(MULTIPROC_ENV) or None
        many = self.multiprocess_dir is not None
        buckets = tuple(latency_buckets)
        labels = ("method", "route", "status")
        own = {"namespace": namespace, "registry": self.registry}
        latest = {**own, "multiprocess_mode": "livemostrecent"}
        self.requests = Counter(
            "http_requests",
            "HTTP requests handled, by method, route template and status code.",
            labels,
            **own,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency until the response is fully sent, in seconds.",
            labels,
            buckets=buckets,
            **own,
        )
        self.in_flight = Gauge(
            "http_requests_in_flight",
            "HTTP requests being handled.",
            multiprocess_mode="livesum",
            **own,
        )
        self.model_info = Gauge(
            "model_info",
            "The model being served (value 1), by model version and index kind (and pid, with "
            "several worker processes).",
            ("version", "index_kind"),
            multiprocess_mode="liveall",
            **own,
        )
        self.model_items = Gauge("model_items", "Number of items in the serving index.", **latest)
        self.index_recall = Gauge(
            "index_recall",
            "Recall@k of the serving index against exact search, measured at index build "
            "(1 for exact; NaN when unknown).",
            **latest,
        )
        self.model_loaded = Gauge(
            "model_loaded_timestamp_seconds", "Unix time the serving model was loaded.", **latest
        )
        self.search_latency = Histogram(
            "search_duration_seconds",
            "Time spent in index search per call (a batch counts once), in seconds.",
            ("index_kind",),
            buckets=buckets,
            **own,
        )
        self.batch_size = Histogram(
            "batch_size",
            "User queries answered per encoder + index batch (requests arriving together are "
            "coalesced).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            **own,
        )
        if process_metrics and not many:
            ProcessCollector(namespace=namespace, registry=self.registry)
        self._model_labels: tuple[str, str] | None = None

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one finished HTTP request."""
        labels = (method.upper(), route, str(int(status)))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(max(0.0, seconds))

    def observe_search(self, index_kind: str, seconds: float) -> None:
        """Record one index search call."""
        self.search_latency.labels(index_kind).observe(max(0.0, seconds))

    def set_model(
        self,
        version: str,
        index_kind: str,
        num_items: int | None = None,
        recall: float | None = None,
    ) -> None:
        """Mark ``version`` as the serving model; the previous model's info series is removed."""
        labels = (str(version), str(index_kind))
        previous = self._model_labels
        self.model_info.labels(*labels).set(1)
        if previous is not None and previous != labels:
            self.model_info.labels(*previous).set(0)  # what a multiprocess scrape keeps
            try:
                self.model_info.remove(*previous)
            except KeyError:
                logger.debug("model_info series %s already removed", previous)
        self._model_labels = labels
        if num_items is not None:
            self.model_items.set(num_items)
        self.index_recall.set(float("nan") if recall is None else recall)
        self.model_loaded.set(time.time())

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition text and its content type (OpenMetrics if ``accept`` asks for it)."""
        encoder, content_type = choose_encoder(accept or "")
        if self.multiprocess_dir is None:
            return encoder(self.registry), content_type
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)
        return encoder(merged), content_type

    def process_exited(self) -> None:
        """Drop this process's live gauges from the shared directory (at shutdown)."""
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/items/{item_id}``), or ``"<unmatched>"``.

    Starlette/FastAPI store the matched route in ``scope["route"]`` while routing (for a route
    inside a mounted sub-application the template is relative to the mount).
    """
    route = scope.get("route")
    if route is None:
        return UNMATCHED_ROUTE
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str) or not template:
        return UNMATCHED_ROUTE
    return template


class MetricsMiddleware:
    """ASGI middleware recording HTTP requests into a `ServiceMetrics`.

    Args:
        app: the ASGI app to wrap.
        metrics: where to record.
        skip_routes: route templates not recorded (e.g. the ``/metrics`` scrape itself).
    """

    def __init__(
        self, app: ASGIApp, metrics: ServiceMetrics, skip_routes: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.skip_routes = frozenset(skip_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = route_template(scope)
            if route not in self.skip_routes:
                self.metrics.observe_request(
                    scope.get("method", "GET"), route, status, time.perf_counter() - start
                )
