"""The proxy's Prometheus metrics (``GET /metrics`` on the API port).

Nothing on the request or relay path touches prometheus_client: the proxy
keeps plain integers (``HttpStats``, ``wsrelay.RelayStats``, counts in
``Holds``), incremented once per request, per read or per websocket, and
``ProxyCollector`` turns them into metrics only when they are scraped.
The one prometheus_client object updated directly is the histogram of
hold waits, observed once per request that waited on a hold (rare).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from session_proxy.proxy.routes import Holds, RouteTable
from session_proxy.proxy.wsrelay import RelayStats

PREFIX = "chspawner_proxy_"
#: Seconds a request may wait on a hold: a session moves in seconds to a
#: few minutes (the default hold is 30 s, the longest a day).
HOLD_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class HttpStats:
    """Counts kept by the HTTP path: answers by status class (index:
    code // 100), failures to reach or read a target, and body bytes
    relayed each way (added once per chunk)."""

    __slots__ = ("responses", "upstream_errors", "to_backend", "to_client")

    def __init__(self) -> None:
        self.responses = [0] * 6
        self.upstream_errors = 0
        self.to_backend = self.to_client = 0

    def answered(self, code: int) -> None:
        self.responses[min(code // 100, 5)] += 1


class ProxyCollector(Collector):
    """Reads the proxy's counts at scrape time."""

    def __init__(self, routes: RouteTable, holds: Holds, websockets: RelayStats,
                 http: HttpStats, http_connections: Callable[[], int]) -> None:
        self.routes, self.holds, self.websockets = routes, holds, websockets
        self.http, self.http_connections = http, http_connections

    def collect(self) -> Iterator:
        ws = self.websockets
        yield GaugeMetricFamily(PREFIX + "routes", "Routes in the route table.",
                                value=len(self.routes.routes))
        yield GaugeMetricFamily(PREFIX + "http_connections",
                                "Client connections open on the public port, "
                                "websockets not included.", value=self.http_connections())
        yield GaugeMetricFamily(PREFIX + "websockets", "Websockets relayed now.",
                                value=len(ws.live))
        yield CounterMetricFamily(PREFIX + "websockets_opened",
                                  "Websockets relayed since the start.", value=ws.opened)
        closed = CounterMetricFamily(
            PREFIX + "websockets_closed",
            "Websockets ended, by reason: client_gone (the client closed or its "
            "connection broke), backend_gone (the target closed or vanished), "
            "ping_timeout (the client did not answer the proxy's ping).", labels=["reason"])
        for reason, count in ws.closed.items():
            closed.add_metric([reason], count)
        yield closed
        up, down = ws.bytes_relayed()
        relayed = CounterMetricFamily(PREFIX + "websocket_bytes",
                                      "Bytes relayed on websockets, by direction.",
                                      labels=["direction"])
        relayed.add_metric(["to_backend"], up)
        relayed.add_metric(["to_client"], down)
        yield relayed
        yield GaugeMetricFamily(PREFIX + "holds", "Holds in place now.",
                                value=len(self.holds.holds))
        yield CounterMetricFamily(PREFIX + "holds_placed", "Holds placed since the start.",
                                  value=self.holds.added)
        responses = CounterMetricFamily(
            PREFIX + "responses", "Answers to HTTP requests on the public port, by "
            "status class (those made by the proxy itself included).", labels=["code"])
        for index, name in enumerate(STATUS_CLASSES, start=1):
            responses.add_metric([name], self.http.responses[index])
        yield responses
        body = CounterMetricFamily(PREFIX + "http_bytes",
                                   "Bytes of HTTP bodies relayed, by direction.",
                                   labels=["direction"])
        body.add_metric(["to_backend"], self.http.to_backend)
        body.add_metric(["to_client"], self.http.to_client)
        yield body
        yield CounterMetricFamily(PREFIX + "upstream_errors",
                                  "Requests whose target could not be reached or "
                                  "broke off its answer.", value=self.http.upstream_errors)


class ProxyMetrics:
    """The registry served at /metrics: the proxy's counts, the hold-wait
    histogram, and the process's own (memory, CPU, open descriptors)."""

    def __init__(self, routes: RouteTable, holds: Holds, websockets: RelayStats,
                 http: HttpStats, http_connections: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(namespace="chspawner_proxy", registry=self.registry)
        self.registry.register(ProxyCollector(routes, holds, websockets, http,
                                              http_connections))
        self.hold_wait = Histogram(
            PREFIX + "hold_wait_seconds", "How long requests waited on a hold, by "
            "how the hold ended (released: the session came back; expired: 503).",
            ["outcome"], buckets=HOLD_BUCKETS, registry=self.registry)
        holds.on_waited = self.waited

    def waited(self, seconds: float, outcome: str) -> None:
        self.hold_wait.labels(outcome).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
