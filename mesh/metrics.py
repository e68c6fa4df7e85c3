"""Prometheus metrics of one sidecar: cheap per-request recording and the text exposition."""

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from mesh.errors import REASON_CODES

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

UNANSWERED_REASONS = ("client_reset", "refused", "malformed", "connection_lost")
"""Why an HTTP/2 request stream ended with no response from the mesh: the client reset it (a cancelled gRPC call),
the session refused it (stream limit, after GOAWAY, rapid reset), it was malformed (RST_STREAM PROTOCOL_ERROR), or
the connection ended under it."""

TLS_REFUSAL_REASONS = (
    "handshake_failed",
    "handshake_timeout",
    "no_certificate",
    "not_svid",
    "session_reused",
    "identity_mismatch",
)
"""Why a TLS handshake on a mesh hop was refused: OpenSSL failed it (bad chain, protocol, cipher), it did not finish
in time, this sidecar had no usable certificate, the peer's leaf is not an X.509-SVID, the peer resumed a session
instead of presenting a certificate, or (outbound) the peer's SPIFFE ID is not the expected one."""


CONFIG_RELOAD_RESULTS = ("ok", "refused", "unchanged")
"""How a config reload ended: applied, refused (the file did not validate; the old config keeps serving), or
unchanged (the file's bytes were those already loaded)."""


class _RequestCell:
    """Plain counters for one (direction, upstream, status); cells share the duration histogram of their pair."""

    __slots__ = ("bytes", "count", "histogram")

    def __init__(self, histogram: list[float], byte_counts: list[int]) -> None:
        self.count = 0
        self.histogram = histogram  # [bucket counts..., +Inf count, sum]
        self.bytes = byte_counts  # [rx, tx]


class Metrics:
    """The mesh_* metrics, in a registry of their own so that several instances (and tests) never collide.

    The per-request metrics (requests, durations, bytes, pool reuse) are plain Python numbers that a
    custom collector turns into Prometheus samples at scrape time: recording a request is a dict lookup
    and a few additions, with no lock and no label resolution. Rarer events use prometheus_client's own
    Counter and Gauge. `direction` is "inbound" or "outbound"; `rx` is what the mesh received from the
    caller, `tx` what it sent back.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._cells: dict[tuple[str, str, int], _RequestCell] = {}
        self._histograms: dict[tuple[str, str], list[float]] = {}
        self._bytes: dict[tuple[str, str], list[int]] = {}
        self._tcp_connections: dict[tuple[str, str], int] = {}
        self._pool_events: dict[tuple[str, str], int] = {}
        self._routes: dict[tuple[str, str, str, str, str], int] = {}  # (direction, listener, route, dest, class)
        self._mirrored: dict[tuple[str, str, str], int] = {}  # (route, destination, outcome)
        self.registry.register(_HotPathCollector(self))
        self._active_connections = Gauge(
            "mesh_active_connections",
            "Client connections currently open on a listener.",
            ["direction", "listener"],
            registry=self.registry,
        )
        self._mesh_errors = Counter(
            "mesh_errors",
            "Errors the mesh produced itself, not those of the application, by reason code (the x-mesh-error text "
            "is in the response and the logs).",
            ["direction", "upstream", "reason"],
            registry=self.registry,
        )
        self._protocols = Counter(
            "mesh_protocol_detected",
            "Client connections of an HTTP listener by the protocol they turned out to speak: http1, http2 (h2c "
            "preface or ALPN h2), or none (closed or silent past timeouts.request_headers before sending a byte).",
            ["direction", "listener", "protocol"],
            registry=self.registry,
        )
        self._unanswered = Counter(
            "mesh_requests_unanswered",
            "HTTP/2 request streams that ended without any response from the mesh, by reason: client_reset, "
            "refused, malformed, connection_lost.",
            ["direction", "upstream", "reason"],
            registry=self.registry,
        )
        self._tls_refusals = Counter(
            "mesh_tls_refused",
            "Mesh-hop TLS connections refused, by reason: handshake_failed, handshake_timeout, no_certificate, "
            "not_svid, session_reused, identity_mismatch.",
            ["direction", "reason"],
            registry=self.registry,
        )
        self._config_reloads = Counter(
            "mesh_config_reloads",
            "Config reloads (SIGHUP or POST /reload on the admin listener), by result: ok, refused, unchanged.",
            ["result"],
            registry=self.registry,
        )
        for result in CONFIG_RELOAD_RESULTS:
            self._config_reloads.labels(result)  # every series exists from the start, at zero
        self._spans = Counter(
            "mesh_spans",
            "Trace spans by outcome: exported (the collector took them), dropped (the export queue was full, or "
            "spans were left at exit), failed (the collector could not be reached or refused them).",
            ["outcome"],
            registry=self.registry,
        )
        self._config_version = Gauge(
            "mesh_config_version",
            "Version of the config in use: 1 as started, one more per applied reload.",
            registry=self.registry,
        )
        self._config_loaded = Gauge(
            "mesh_config_loaded_timestamp_seconds",
            "Unix time the config in use was loaded.",
            registry=self.registry,
        )
        self._connection_gauges: dict[tuple[str, str], Gauge] = {}
        self._error_counters: dict[tuple[str, str, str], Counter] = {}
        self._protocol_counters: dict[tuple[str, str, str], Counter] = {}

    def _byte_counts(self, direction: str, upstream: str) -> list[int]:
        counts = self._bytes.get((direction, upstream))
        if counts is None:
            counts = self._bytes[(direction, upstream)] = [0, 0]
        return counts

    def _new_cell(self, key: tuple[str, str, int]) -> _RequestCell:
        pair = key[:2]
        histogram = self._histograms.get(pair)
        if histogram is None:
            histogram = self._histograms[pair] = [0.0] * (len(REQUEST_DURATION_BUCKETS) + 2)
        cell = self._cells[key] = _RequestCell(histogram, self._byte_counts(*pair))
        return cell

    def request_done(self, direction: str, upstream: str, status: int, duration_s: float, rx: int, tx: int) -> None:
        """Record one finished HTTP request (any outcome, mesh errors included)."""
        key = (direction, upstream, status)
        cell = self._cells.get(key) or self._new_cell(key)
        cell.count += 1
        histogram = cell.histogram
        histogram[bisect_left(REQUEST_DURATION_BUCKETS, duration_s)] += 1
        histogram[-1] += duration_s
        byte_counts = cell.bytes
        byte_counts[0] += rx
        byte_counts[1] += tx

    def route_done(self, direction: str, listener: str, route: str, destination: str, status: int) -> None:
        """Record one finished request that a route took (on a listener with routes): its route, the destination
        it was sent to ("" for a route that answered itself) and its status class (0xx: no response)."""
        key = (direction, listener, route, destination, f"{status // 100}xx")
        self._routes[key] = self._routes.get(key, 0) + 1

    def spans(self, outcome: str, count: int) -> None:
        """Count trace spans by outcome: exported, dropped, failed (the exporter's on_outcome)."""
        self._spans.labels(outcome).inc(count)

    def mirrored(self, route: str, destination: str, outcome: str) -> None:
        """Count a mirrored copy of a request: `outcome` is sent (the copy got an answer or ran out of time),
        failed (the copy could not be sent) or skipped (not copied: body too large, too many in flight, stopping)."""
        key = (route, destination, outcome)
        self._mirrored[key] = self._mirrored.get(key, 0) + 1

    def tcp_done(self, direction: str, upstream: str, rx: int, tx: int) -> None:
        """Record one finished opaque TCP connection and the bytes it carried."""
        key = (direction, upstream)
        self._tcp_connections[key] = self._tcp_connections.get(key, 0) + 1
        byte_counts = self._byte_counts(direction, upstream)
        byte_counts[0] += rx
        byte_counts[1] += tx

    def error(self, direction: str, upstream: str, reason: str) -> None:
        """Count an error the mesh produced itself, by its reason code (mesh.errors.REASON_CODES, e.g.
        "connect_timeout"); anything else counts as "other", so the label takes a bounded set of values."""
        if reason not in REASON_CODES:
            reason = "other"
        key = (direction, upstream, reason)
        counter = self._error_counters.get(key)
        if counter is None:
            counter = self._error_counters[key] = self._mesh_errors.labels(direction, upstream, reason)
        counter.inc()

    def request_unanswered(self, direction: str, upstream: str, reason: str) -> None:
        """Count an HTTP/2 request stream that ended with no response (`reason` from UNANSWERED_REASONS)."""
        if reason not in UNANSWERED_REASONS:
            raise ValueError(f"unknown unanswered-request reason {reason!r}")
        self._unanswered.labels(direction, upstream, reason).inc()

    def tls_refused(self, direction: str, reason: str) -> None:
        """Count a refused mesh-hop TLS connection (`reason` from TLS_REFUSAL_REASONS)."""
        if reason not in TLS_REFUSAL_REASONS:
            raise ValueError(f"unknown TLS refusal reason {reason!r}")
        self._tls_refusals.labels(direction, reason).inc()

    def protocol_detected(self, direction: str, listener: str, protocol: str) -> None:
        key = (direction, listener, protocol)
        counter = self._protocol_counters.get(key)
        if counter is None:
            counter = self._protocol_counters[key] = self._protocols.labels(*key)
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
        count = self._pool_events.get(key)
        if count is None:
            if event not in UPSTREAM_CONNECTION_EVENTS:
                raise ValueError(f"unknown upstream connection event {event!r}")
            count = 0
        self._pool_events[key] = count + 1

    def config_reloaded(self, result: str) -> None:
        """Count a config reload by its result (CONFIG_RELOAD_RESULTS)."""
        if result not in CONFIG_RELOAD_RESULTS:
            raise ValueError(f"unknown config reload result {result!r}")
        self._config_reloads.labels(result).inc()

    def config_loaded(self, version: int, unix_time: float) -> None:
        """Record the config now in use: its version and when it was loaded."""
        self._config_version.set(version)
        self._config_loaded.set(unix_time)

    def watch_certificate_expiry(self, seconds_left: Callable[[], float | None]) -> None:
        """Expose `mesh_certificate_expiry_seconds`, read from `seconds_left()` at scrape time."""
        gauge = Gauge(
            "mesh_certificate_expiry_seconds",
            "Seconds until this sidecar's certificate expires (negative once it has; NaN before one is loaded).",
            registry=self.registry,
        )
        gauge.set_function(lambda: _or_nan(seconds_left()))

    def watch_clusters(self, clusters: Callable[[], Iterable[Any]]) -> None:
        """Expose the resilience counters of the clusters `clusters()` returns (mesh.cluster.Cluster), read at
        scrape time: retries by reason, budget refusals, ejections, panics, circuit overflows and hedges."""
        self.registry.register(_ClusterCollector(clusters))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric: (body, content type)."""
        return _generate_text(self.registry), _TEXT_CONTENT_TYPE


class _HotPathCollector:
    """Exposes the plain counters of `Metrics` as Prometheus counter and histogram families."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        return self._families()

    def _families(self) -> Iterator[Metric]:
        m = self.metrics
        requests = CounterMetricFamily(
            "mesh_requests",
            "HTTP requests completed, by status class (1xx-5xx).",
            labels=["direction", "upstream", "code_class"],
        )
        by_class: dict[tuple[str, str, str], int] = {}
        for (direction, upstream, status), cell in m._cells.items():
            key = (direction, upstream, f"{status // 100}xx")
            by_class[key] = by_class.get(key, 0) + cell.count
        for labels, count in sorted(by_class.items()):
            requests.add_metric(list(labels), count)
        yield requests
        durations = HistogramMetricFamily(
            "mesh_request_duration_seconds",
            "Time from the request head arriving to the response being complete.",
            labels=["direction", "upstream"],
        )
        for labels, histogram in sorted(m._histograms.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip((*REQUEST_DURATION_BUCKETS, float("inf")), histogram[:-1], strict=True):
                cumulative += count
                buckets.append((_bound_label(bound), cumulative))
            durations.add_metric(list(labels), buckets, histogram[-1])
        yield durations
        tcp = CounterMetricFamily(
            "mesh_tcp_connections", "Opaque TCP connections proxied to completion.", labels=["direction", "upstream"]
        )
        for labels, count in sorted(m._tcp_connections.items()):
            tcp.add_metric(list(labels), count)
        yield tcp
        payload = CounterMetricFamily(
            "mesh_bytes",
            "Payload bytes proxied; flow rx = received from the caller, tx = sent back to it.",
            labels=["direction", "upstream", "flow"],
        )
        for (direction, upstream), (rx, tx) in sorted(m._bytes.items()):
            payload.add_metric([direction, upstream, "rx"], rx)
            payload.add_metric([direction, upstream, "tx"], tx)
        yield payload
        pool = CounterMetricFamily(
            "mesh_upstream_connections",
            "Connection pool events towards upstream endpoints: opened, reused, closed_idle, stale.",
            labels=["upstream", "event"],
        )
        for labels, count in sorted(m._pool_events.items()):
            pool.add_metric(list(labels), count)
        yield pool
        routes = CounterMetricFamily(
            "mesh_route_requests",
            "HTTP requests a route took, by listener, route, destination (service and subset; empty for a route "
            "that answers itself) and status class.",
            labels=["direction", "listener", "route", "destination", "code_class"],
        )
        for labels, count in sorted(m._routes.items()):
            routes.add_metric(list(labels), count)
        yield routes
        mirrored = CounterMetricFamily(
            "mesh_mirrored_requests",
            "Copies of requests sent to a route's mirror destination, by outcome: sent, failed, skipped.",
            labels=["route", "destination", "outcome"],
        )
        for labels, count in sorted(m._mirrored.items()):
            mirrored.add_metric(list(labels), count)
        yield mirrored


class _ClusterCollector:
    """Turns each cluster's own counters (kept by its sans-io state machines) into Prometheus families."""

    def __init__(self, clusters: Callable[[], Iterable[Any]]) -> None:
        self.clusters = clusters

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        retries = CounterMetricFamily(
            "mesh_retries",
            "Requests sent again, by reason: connect_failure, reset, per_try_timeout, status_<code>.",
            labels=["upstream", "reason"],
        )
        exhausted = CounterMetricFamily(
            "mesh_retry_budget_exhausted", "Retries not sent because the retry budget was spent.", labels=["upstream"]
        )
        ejections = CounterMetricFamily(
            "mesh_outlier_ejections", "Endpoints ejected by outlier detection.", labels=["upstream"]
        )
        panics = CounterMetricFamily(
            "mesh_outlier_panics",
            "Times every endpoint was ejected, so requests went to all of them.",
            labels=["upstream"],
        )
        panic = GaugeMetricFamily(
            "mesh_outlier_panic", "1 while every endpoint is ejected and all of them are used.", labels=["upstream"]
        )
        overflows = CounterMetricFamily(
            "mesh_circuit_overflows",
            "Requests and connections refused at once by a circuit breaker, by limit.",
            labels=["upstream", "limit"],
        )
        hedges = CounterMetricFamily(
            "mesh_hedges", "Hedged tries: sent, and won (answered first).", labels=["upstream", "outcome"]
        )
        endpoints = GaugeMetricFamily(
            "mesh_endpoints",
            "Endpoints discovery lists, by what the mesh makes of them: healthy, ejected (outlier detection), "
            "unhealthy (health check), unhealthy (discovery).",
            labels=["upstream", "health"],
        )
        age = GaugeMetricFamily(
            "mesh_discovery_age_seconds",
            "Seconds since discovery last answered for the upstream (grows while it fails: the endpoints in use "
            "are the last known ones).",
            labels=["upstream"],
        )
        stale = GaugeMetricFamily(
            "mesh_discovery_stale",
            "1 while discovery fails and the last known endpoints are used.",
            labels=["upstream"],
        )
        now = time.time()
        for cluster in self.clusters():
            name = cluster.name
            current = cluster.endpoints.value
            if current is not None:
                age.add_metric([name], max(0.0, now - current.updated_at))
                stale.add_metric([name], 1 if current.error else 0)
            by_health: dict[str, int] = {}
            for endpoint in current.endpoints if current is not None else ():
                health = cluster.endpoint_state(endpoint)["health"]
                by_health[health] = by_health.get(health, 0) + 1
            for health, count in sorted(by_health.items()):
                endpoints.add_metric([name, health], count)
            for reason, count in sorted(cluster.retry_counts.items()):
                retries.add_metric([name, reason], count)
            if cluster.retry is not None and cluster.budget is not None:
                exhausted.add_metric([name], cluster.budget.exhausted)
            outlier = cluster.outlier
            if outlier is not None:
                ejections.add_metric([name], outlier.ejections_total)
                panics.add_metric([name], outlier.panics_total)
                panic.add_metric([name], 1 if outlier.panic else 0)
            for limit, count in sorted(cluster.breaker.overflows.items()):
                overflows.add_metric([name, limit], count)
            if cluster.hedges is not None:
                for outcome, count in sorted(cluster.hedges.items()):
                    hedges.add_metric([name, outcome], count)
        yield from (retries, exhausted, ejections, panics, panic, overflows, hedges, endpoints, age, stale)


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _bound_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
