"""A cluster: one upstream's endpoints from discovery, its balancer and its pool of upstream connections."""

from __future__ import annotations

from functools import partial
from typing import Any

import trio

from mesh.balancer import make_balancer
from mesh.breaker import CircuitBreaker
from mesh.config import (
    BalancerSettings,
    CircuitBreakers,
    HealthCheckSettings,
    HedgeSettings,
    OutlierSettings,
    PoolSettings,
    RetrySettings,
)
from mesh.endpoint import Endpoint, EndpointSet
from mesh.errors import MeshError, connect_timeout, no_endpoints
from mesh.h1upstream import UpstreamConnection
from mesh.h2upstream import UPSTREAM_LIMITS, H2Connection, H2Exchange, H2Pool
from mesh.health import HealthTracker, run_health_checks
from mesh.http2 import H2Limits
from mesh.metrics import Metrics
from mesh.outlier import OutlierDetector
from mesh.pool import IdlePool
from mesh.retry import LatencyWindow, RetryBudget, RetryPolicy
from mesh.stream import connect_failure, open_socket
from mesh.timers import INF
from mesh.transport import Stream, UpstreamTls, secure
from mesh.watch import Watch

# The upstream end of one exchange: an HTTP/1.1 connection or a stream of an HTTP/2 one; both speak the neutral
# exchange (send_request, send_body, send_end, next_event, read_more, close).
Upstream = UpstreamConnection | H2Exchange
# Endpoint meta items a route's destination requires (e.g. (("version", "v2"),)); () for every endpoint.
Subset = tuple[tuple[str, str], ...]

_HASH_POLICIES = frozenset({"ring_hash", "maglev"})

# How a cluster speaks HTTP to its endpoints: "http1" only; "auto": HTTP/2 where TLS's ALPN agrees (else
# HTTP/1.1); "http2": HTTP/2 always (with prior knowledge on plaintext).
PROTOCOLS = ("http1", "auto", "http2")


class Cluster:
    """Picks endpoints for one upstream and lends out connections to them.

    The endpoint set comes from a discovery watch; the latest value is read on every pick, so an update
    applies to the next request. Connections are returned with `release`; only a connection whose exchange
    completed cleanly may be reused."""

    def __init__(
        self,
        name: str,
        endpoints: Watch[EndpointSet | None],
        *,
        balancer: BalancerSettings,
        pool: PoolSettings,
        connect_timeout: float,
        metrics: Metrics,
        tls: UpstreamTls | None = None,
        outlier: OutlierSettings | None = None,
        circuit_breakers: CircuitBreakers | None = None,
        retries: RetrySettings | None = None,
        hedging: HedgeSettings | None = None,
        health_check: HealthCheckSettings | None = None,
        protocol: str = "http1",
        h2_limits: H2Limits = UPSTREAM_LIMITS,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}")
        self.name = name
        self.protocol = protocol
        self.h2_limits = h2_limits
        self.h2 = H2Pool() if protocol != "http1" else None
        self._tasks: trio.Nursery | None = None  # runs the HTTP/2 connections (see maintain)
        self.tls = tls
        self.endpoints = endpoints
        self.balancer = make_balancer(balancer, clock=trio.current_time)
        self.policy = balancer.policy
        self.hash_on = balancer.hash_on
        self.outlier = (
            OutlierDetector(outlier, clock=trio.current_time)
            if outlier and (outlier.consecutive_failures or outlier.success_rate is not None)
            else None
        )
        self.breaker = CircuitBreaker(circuit_breakers or CircuitBreakers())
        self.retry_counts: dict[str, int] = {}  # retries by reason, of every route that sends here
        self.budget: RetryBudget | None = None  # the retry budget every route that sends here spends
        self.retry = self.retry_policy(retries) if retries and retries.attempts else None
        self.hedging = hedging
        self.health_check = health_check
        self.health = HealthTracker(health_check) if health_check is not None else None
        self.hedges: dict[str, int] | None = None  # {"sent": n, "won": n} when hedging is on
        self.latency: LatencyWindow | None = None  # recent response-head latencies, for a p95 hedge delay
        if hedging is not None:
            self.hedges = {"sent": 0, "won": 0}
            self.latency = LatencyWindow() if hedging.delay == "p95" else None
            if self.budget is None:  # hedges are paid from the retry budget, even with retries off
                self.budget = RetryBudget((retries or RetrySettings()).budget, clock=trio.current_time)
        self._subsets: dict[Subset, tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]] = {}
        self.connect_timeout = connect_timeout
        self.metrics = metrics
        self.pool: IdlePool[UpstreamConnection] = IdlePool(
            max_idle_per_endpoint=pool.max_idle_per_endpoint,
            idle_timeout=pool.idle_timeout,
            is_usable=UpstreamConnection.idle_and_open,
        )

    def __repr__(self) -> str:
        current = self.endpoints.value
        count = len(current.endpoints) if current else None
        return f"<Cluster {self.name} endpoints={count} {self.pool!r}>"

    def retry_policy(self, rules: RetrySettings) -> RetryPolicy:
        """A retry policy with `rules` (the cluster's own, or a route's) that spends this cluster's retry budget
        and counts its retries in this cluster's metrics."""
        if self.budget is None:
            self.budget = RetryBudget(rules.budget, clock=trio.current_time)
        return RetryPolicy(rules, clock=trio.current_time, budget=self.budget, counts=self.retry_counts)

    def pick(self, hash_key: bytes | None = None, avoid: list[Endpoint] | None = None, subset: Subset = ()) -> Endpoint:
        """An endpoint for the next request: discovery's set (only those whose meta has every `subset` item),
        minus ejected endpoints, through the balancer.

        A retry passes the endpoints already tried in `avoid`; they are left out while any other remains."""
        endpoints = self._usable(subset)
        if avoid:
            keys = {e.key for e in avoid}
            others = [e for e in endpoints if e.key not in keys]
            if others:
                if self.policy not in _HASH_POLICIES:
                    endpoints = others
                else:  # a hash ring is built per endpoint set: keep the set, and step off a key's tried home
                    endpoint = self.balancer.pick(endpoints, hash_key)
                    return endpoint if endpoint is not None and endpoint.key not in keys else others[0]
        endpoint = self.balancer.pick(endpoints, hash_key)
        if endpoint is None:
            raise no_endpoints(resolved=True)
        return endpoint

    def _usable(self, subset: Subset = ()) -> tuple[Endpoint, ...] | list[Endpoint]:
        """Discovery's endpoints (of the subset) minus those health checks fail and those outlier detection ejects
        (unless all are)."""
        current = self.endpoints.value
        if current is None:
            raise no_endpoints(resolved=False)
        endpoints = current.endpoints
        if subset:
            endpoints = self._subset(endpoints, subset)
        if self.health is not None:  # before ejection, so that a panic only brings back endpoints that answer probes
            endpoints = self.health.usable(endpoints)
        if self.outlier is not None:
            endpoints, _panic = self.outlier.usable(endpoints)
        return endpoints

    def _subset(self, endpoints: tuple[Endpoint, ...], subset: Subset) -> tuple[Endpoint, ...]:
        """The endpoints whose meta has every item of `subset`, worked out once per endpoint set."""
        cached = self._subsets.get(subset)
        if cached is not None and cached[0] is endpoints:
            chosen = cached[1]
        else:
            chosen = tuple(e for e in endpoints if all(e.meta.get(key) == value for key, value in subset))
            self._subsets[subset] = (endpoints, chosen)
        if not chosen:
            label = ",".join(f"{key}={value}" for key, value in subset)
            raise MeshError(503, f"no healthy endpoints in subset {label}", "no_healthy_endpoints")
        return chosen

    def has_other(self, avoid: list[Endpoint], subset: Subset = ()) -> bool:
        """Some usable endpoint is not among `avoid` (a retry that must not go back to one of them can go on)."""
        keys = {e.key for e in avoid}
        try:
            return any(e.key not in keys for e in self._usable(subset))
        except MeshError:
            return False

    def hedge_delay(self) -> float | None:
        """How long a hedgeable request waits before its hedge: the fixed delay, or the recent p95 latency
        (not below `min_delay`); None while too few latencies are known."""
        hedging = self.hedging
        if hedging is None:
            return None
        if hedging.delay != "p95":
            return float(hedging.delay)
        p95 = self.latency.value if self.latency is not None else None
        return None if p95 is None else max(hedging.min_delay, p95)

    def started(self, endpoint: Endpoint) -> None:
        self.balancer.started(endpoint)

    def finished(self, endpoint: Endpoint, latency_s: float, ok: bool, *, judged: bool = True) -> None:
        """One request's outcome: feeds the balancer's latency view and (if `judged`) outlier detection."""
        self.balancer.finished(endpoint, latency_s, ok)
        if judged and self.outlier is not None:
            self.outlier.record(endpoint, ok)

    def take_idle(self, endpoint: Endpoint, *, http1: bool = False) -> Upstream | None:
        """A connection ready for one request: a new stream on an HTTP/2 connection with room, or an idle
        HTTP/1.1 connection (only those when `http1`: upgrades); None if there is neither."""
        if self.h2 is not None and not http1:
            exchange = self.h2.take(endpoint.key)
            if exchange is not None:
                self.metrics.upstream_conn(self.name, "reused")
                return exchange
        conn, to_close, stale = self.pool.take(endpoint.key, trio.current_time())
        for c in to_close:
            c.close()
        if stale:
            self.metrics.upstream_conn(self.name, "stale")
        if conn is not None:
            self.metrics.upstream_conn(self.name, "reused")
        return conn

    async def connect(self, endpoint: Endpoint, *, timeout: float | None, http1: bool = False) -> Upstream:
        """Open a new connection (HTTP/1.1 only if `http1`); MeshError 502, or 504 after `timeout` (None: the
        caller bounds the time). To an endpoint that speaks HTTP/2 the result is a stream of a new connection,
        or of one that another request is opening at the same time."""
        h2 = self.h2 if not http1 else None
        if http1 and self.protocol == "http2":
            raise MeshError(502, "upgrade requests cannot reach an HTTP/2-only upstream", "invalid_response")
        key = endpoint.key
        if h2 is not None:
            with trio.move_on_after(INF if timeout is None else timeout) as scope:
                # Wait for a connection being opened to an endpoint that speaks HTTP/2, or whose protocol is
                # not known yet (the first requests to a new endpoint then share one connection).
                while (opening := h2.connecting.get(key)) is not None and (key in h2.speaks_h2 or key not in h2.known):
                    await opening.wait()
                    exchange = h2.take(key)
                    if exchange is not None:
                        self.metrics.upstream_conn(self.name, "reused")
                        return exchange
            if scope.cancelled_caught:
                raise connect_timeout()
        if h2 is not None and key not in h2.connecting:
            opening = h2.connecting[key] = trio.Event()
        else:
            opening = None
        try:
            return await self._open(endpoint, timeout, h2)
        finally:
            if opening is not None:
                del h2.connecting[key]
                opening.set()

    async def _open(self, endpoint: Endpoint, timeout: float | None, h2: H2Pool | None) -> Upstream:
        limit = self.breaker.admit_connection()
        if limit is not None:
            raise MeshError(503, f"circuit open ({limit})", "circuit_open")
        opened = False
        try:
            with trio.move_on_after(INF if timeout is None else timeout) as scope:
                try:
                    sock = await open_socket(endpoint.host, endpoint.port)
                except OSError as exc:
                    raise _connect_error(exc) from None
                try:
                    stream = await secure(sock, self.tls, http2=h2 is not None)
                except BaseException:  # a failed or cancelled handshake: the socket is ours to close
                    trio.lowlevel.notify_closing(sock)
                    sock.close()
                    raise
            if scope.cancelled_caught:
                raise connect_timeout()
            opened = True
        finally:
            self.breaker.pending_done(opened=opened)
        self.metrics.upstream_conn(self.name, "opened")
        if h2 is not None:
            if self.tls is None:
                speaks_h2 = self.protocol == "http2"
            else:
                speaks_h2 = stream.selected_alpn_protocol() == "h2"  # type: ignore[union-attr]
                if not speaks_h2 and self.protocol == "http2":
                    stream.close()
                    self.breaker.connection_closed()
                    raise MeshError(502, "upstream did not agree to HTTP/2 (ALPN)", "tls_failed")
            h2.known.add(endpoint.key)
            if speaks_h2:
                h2.speaks_h2.add(endpoint.key)
                return self._start_h2(stream, endpoint, h2)
            h2.speaks_h2.discard(endpoint.key)
        return UpstreamConnection(
            stream,
            endpoint,
            self.breaker,
            max_header_bytes=self.h2_limits.max_header_list_size,
            max_header_count=self.h2_limits.max_header_count,
        )

    def _start_h2(self, stream: Stream, endpoint: Endpoint, h2: H2Pool) -> H2Exchange:
        breaker = self.breaker

        def closed(conn: H2Connection) -> None:
            h2.remove(conn)
            breaker.connection_closed()

        conn = H2Connection(
            stream,
            endpoint,
            scheme=b"http" if self.tls is None else b"https",
            idle_timeout=self.pool.idle_timeout,
            on_close=closed,
            limits=self.h2_limits,
        )
        h2.add(endpoint.key, conn)
        if self._tasks is not None:
            self._tasks.start_soon(conn.run)
        else:  # a cluster used without maintain() (tests): the connection still needs its reader
            trio.lowlevel.spawn_system_task(conn.run)
        return conn.open()

    def release(self, conn: Upstream, *, reusable: bool) -> None:
        if not reusable or conn.multiplexed:
            conn.close()
            return
        for c in self.pool.put(conn.endpoint.key, conn, trio.current_time()):
            c.close()

    async def maintain(self) -> None:
        """Run the HTTP/2 connections, expire idle connections, drop those to endpoints that left discovery and
        (if configured) run the active health checks; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._tasks = nursery
            try:
                if self.health is not None and self.health_check is not None:
                    nursery.start_soon(
                        partial(
                            run_health_checks,
                            self.health,
                            self.endpoints,
                            settings=self.health_check,
                            tls=self.tls,
                            host_header=self.name,
                        )
                    )
                await self._maintain_pool()
            finally:
                self._tasks = None

    def endpoint_state(self, endpoint: Endpoint) -> dict[str, Any]:
        """What the cluster knows about one endpoint, for /clusters; `health` names what keeps it out, if any."""
        state: dict[str, Any] = dict(self.balancer.state(endpoint))
        if self.outlier is not None:
            state.update(self.outlier.state(endpoint))
        if self.health is not None:
            state.update(self.health.state(endpoint))
        if not endpoint.healthy:
            health = "unhealthy (discovery)"
        elif state.get("health_check") == "unhealthy":
            health = "unhealthy (health check)"
        elif state.get("ejected_until") is not None:
            health = "ejected (outlier detection)"
        else:
            health = "healthy"
        state["health"] = health
        return state

    async def _maintain_pool(self) -> None:
        version = self.endpoints.version
        interval = max(0.5, min(self.pool.idle_timeout / 2, 30.0))
        try:
            while True:
                with trio.move_on_after(interval):
                    current, version = await self.endpoints.wait_changed(version)
                    keys = {e.key for e in current.endpoints} if current else set()
                    for c in self.pool.drop(keys.__contains__):
                        c.close()
                    if self.h2 is not None:
                        self.h2.drain(keys.__contains__)
                for c in self.pool.expire(trio.current_time()):
                    self.metrics.upstream_conn(self.name, "closed_idle")
                    c.close()
        finally:
            for c in self.pool.clear():
                c.close()


def _connect_error(exc: OSError) -> MeshError:
    reason = connect_failure(exc)
    return MeshError(502, f"upstream {reason}", "connect_refused" if reason == "connect refused" else "connect_failed")
