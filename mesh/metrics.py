"""Prometheus metrics of one sidecar: cheap per-request recording and the text exposition."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

# What the library serves a scraper that states no preference: generate_latest with the 0.0.4 text format's
# content type, which every Prometheus version reads (CONTENT_TYPE_LATEST says 1.0.0 in recent releases).
_generate_text, _TEXT_CONTENT_TYPE = choose_encoder("")

REQUEST_DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
"""Histogram bounds in seconds: 0.5 ms (a local hop) to 30 s (past the default 15 s request timeout)."""

UPSTREAM_CONNECTION_EVENTS = ("opened", "reused", "closed_idle", "stale")


class Metrics:
    """The mesh_* metrics, in a registry of their own so that several instances (and tests) never collide.

    Labelled children are looked up once per label combination and kept in dicts, so recording a request
    costs one dict lookup plus the increments. `direction` is "inbound" or "outbound"; byte counts are from
    the mesh's side of the listener: `rx` received from the caller, `tx` sent back to it.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "mesh_requests",
            "HTTP requests completed, by status class (1xx-5xx).",
            ["direction", "upstream", "code_class"],
            registry=self.registry,
        )
        self._request_duration = Histogram(
            "mesh_request_duration_seconds",
            "Time from the request head arriving to the response being complete.",
            ["direction", "upstream"],
            buckets=REQUEST_DURATION_BUCKETS,
            registry=self.registry,
        )
        self._active_connections = Gauge(
            "mesh_active_connections",
            "Client connections currently open on a listener.",
            ["direction", "listener"],
            registry=self.registry,
        )
        self._tcp_connections = Counter(
            "mesh_tcp_connections",
            "Opaque TCP connections proxied to completion.",
            ["direction", "upstream"],
            registry=self.registry,
        )
        self._bytes = Counter(
            "mesh_bytes",
            "Payload bytes proxied; flow rx = received from the caller, tx = sent back to it.",
            ["direction", "upstream", "flow"],
            registry=self.registry,
        )
        self._upstream_connections = Counter(
            "mesh_upstream_connections",
            "Connection pool events towards upstream endpoints: opened, reused, closed_idle, stale.",
            ["upstream", "event"],
            registry=self.registry,
        )
        self._mesh_errors = Counter(
            "mesh_mesh_errors",
            "Errors the mesh produced itself (the x-mesh-error reason), not those of the application.",
            ["direction", "upstream", "reason"],
            registry=self.registry,
        )
        # (direction, upstream, status) -> (request counter, duration histogram, rx counter, tx counter)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram, Counter, Counter]] = {}
        self._tcp_children: dict[tuple[str, str], tuple[Counter, Counter, Counter]] = {}
        self._connection_gauges: dict[tuple[str, str], Gauge] = {}
        self._upstream_connection_counters: dict[tuple[str, str], Counter] = {}
        self._error_counters: dict[tuple[str, str, str], Counter] = {}

    def request_done(self, direction: str, upstream: str, status: int, duration_s: float, rx: int, tx: int) -> None:
        """Record one finished HTTP request (any outcome, mesh errors included)."""
        key = (direction, upstream, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self._requests.labels(direction, upstream, f"{status // 100}xx"),
                self._request_duration.labels(direction, upstream),
                self._bytes.labels(direction, upstream, "rx"),
                self._bytes.labels(direction, upstream, "tx"),
            )
        requests, duration, received, sent = children
        requests.inc()
        duration.observe(duration_s)
        if rx:
            received.inc(rx)
        if tx:
            sent.inc(tx)

    def tcp_done(self, direction: str, upstream: str, rx: int, tx: int) -> None:
        """Record one finished opaque TCP connection and the bytes it carried."""
        key = (direction, upstream)
        children = self._tcp_children.get(key)
        if children is None:
            children = self._tcp_children[key] = (
                self._tcp_connections.labels(direction, upstream),
                self._bytes.labels(direction, upstream, "rx"),
                self._bytes.labels(direction, upstream, "tx"),
            )
        connections, received, sent = children
        connections.inc()
        if rx:
            received.inc(rx)
        if tx:
            sent.inc(tx)

    def error(self, direction: str, upstream: str, reason: str) -> None:
        """Count an error the mesh produced itself, by its reason (e.g. "upstream connect timeout")."""
        key = (direction, upstream, reason)
        counter = self._error_counters.get(key)
        if counter is None:
            counter = self._error_counters[key] = self._mesh_errors.labels(direction, upstream, reason)
        counter.inc()

    def connection_opened(self, direction: str, listener: str) -> None:
        self._connection_gauge(direction, listener).inc()

    def connection_closed(self, direction: str, listener: str) -> None:
        self._connection_gauge(direction, listener).dec()

    def _connection_gauge(self, direction: str, listener: str) -> Gauge:
        key = (direction, listener)
        gauge = self._connection_gauges.get(key)
        if gauge is None:
            gauge = self._connection_gauges[key] = self._active_connections.labels(direction, listener)
        return gauge

    def upstream_conn(self, upstream: str, event: str) -> None:
        """Count a pool event: "opened", "reused", "closed_idle" or "stale" (found closed when taken)."""
        key = (upstream, event)
        counter = self._upstream_connection_counters.get(key)
        if counter is None:
            if event not in UPSTREAM_CONNECTION_EVENTS:
                raise ValueError(f"unknown upstream connection event {event!r}")
            counter = self._upstream_connection_counters[key] = self._upstream_connections.labels(upstream, event)
        counter.inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric: (body, content type)."""
        return _generate_text(self.registry), _TEXT_CONTENT_TYPE
