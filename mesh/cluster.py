"""A cluster: one upstream's endpoints from discovery, its balancer and its pool of upstream connections."""

from __future__ import annotations

import select
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
from mesh.discovery import Endpoint, EndpointSet
from mesh.errors import CONNECT_TIMEOUT, MeshError, no_endpoints
from mesh.health import HealthTracker, run_health_checks
from mesh.metrics import Metrics
from mesh.outlier import OutlierDetector
from mesh.pool import IdlePool
from mesh.retry import LatencyWindow, RetryBudget, RetryPolicy
from mesh.stream import connect_failure, open_socket
from mesh.timers import INF
from mesh.transport import Stream, UpstreamTls, secure
from mesh.watch import Watch

_HASH_POLICIES = frozenset({"ring_hash", "maglev"})


class UpstreamConnection:
    """One transport connection to an endpoint, owned by whoever holds it (the pool while idle)."""

    __slots__ = ("breaker", "endpoint", "fd", "reader", "requests", "stream")

    def __init__(self, stream: Stream, endpoint: Endpoint, breaker: CircuitBreaker) -> None:
        self.stream = stream
        self.endpoint = endpoint
        self.breaker: CircuitBreaker | None = breaker  # None once closed, so a second close counts nothing
        self.fd = stream.socket.fileno()
        self.requests = 0
        self.reader: Any = None  # the response parser, kept across keep-alive exchanges by the protocol code

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.endpoint} fd={self.fd} requests={self.requests}>"

    def close(self) -> None:
        """Close at once, without a TLS or HTTP goodbye (the connection carries no request)."""
        self.stream.close()
        if self.breaker is not None:
            self.breaker.connection_closed()
            self.breaker = None

    def idle_and_open(self) -> bool:
        """False if the upstream closed the connection (or sent unsolicited bytes) while it sat idle."""
        try:
            readable, _, _ = select.select((self.fd,), (), (), 0)
        except (OSError, ValueError):
            return False
        return not readable


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
    ) -> None:
        self.name = name
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
        self.retry = RetryPolicy(retries, clock=trio.current_time) if retries and retries.attempts else None
        self.hedging = hedging
        self.health_check = health_check
        self.health = HealthTracker(health_check) if health_check is not None else None
        self.hedges: dict[str, int] | None = None  # {"sent": n, "won": n} when hedging is on
        self.latency: LatencyWindow | None = None  # recent response-head latencies, for a p95 hedge delay
        self.budget = self.retry.budget if self.retry is not None else None
        if hedging is not None:
            self.hedges = {"sent": 0, "won": 0}
            self.latency = LatencyWindow() if hedging.delay == "p95" else None
            if self.budget is None:  # hedges are paid from the retry budget, even with retries off
                self.budget = RetryBudget((retries or RetrySettings()).budget, clock=trio.current_time)
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

    def pick(self, hash_key: bytes | None = None, avoid: list[Endpoint] | None = None) -> Endpoint:
        """An endpoint for the next request: discovery's set, minus ejected endpoints, through the balancer.

        A retry passes the endpoints already tried in `avoid`; they are left out while any other remains."""
        current = self.endpoints.value
        if current is None:
            raise no_endpoints(resolved=False)
        endpoints = current.endpoints
        if self.health is not None:  # before ejection, so that a panic only brings back endpoints that answer probes
            endpoints = self.health.usable(endpoints)
        if self.outlier is not None:
            endpoints, _panic = self.outlier.usable(endpoints)
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

    def take_idle(self, endpoint: Endpoint) -> UpstreamConnection | None:
        conn, to_close, stale = self.pool.take(endpoint.key, trio.current_time())
        for c in to_close:
            c.close()
        if stale:
            self.metrics.upstream_conn(self.name, "stale")
        if conn is not None:
            self.metrics.upstream_conn(self.name, "reused")
        return conn

    async def connect(self, endpoint: Endpoint, *, timeout: float | None) -> UpstreamConnection:
        """Open a new connection; MeshError 502, or 504 after `timeout` (None: the caller bounds the time)."""
        limit = self.breaker.admit_connection()
        if limit is not None:
            raise MeshError(503, f"circuit open ({limit})")
        opened = False
        try:
            with trio.move_on_after(INF if timeout is None else timeout) as scope:
                try:
                    sock = await open_socket(endpoint.host, endpoint.port)
                except OSError as exc:
                    raise _connect_error(exc) from None
                try:
                    stream = await secure(sock, self.tls)
                except BaseException:  # a failed or cancelled handshake: the socket is ours to close
                    trio.lowlevel.notify_closing(sock)
                    sock.close()
                    raise
            if scope.cancelled_caught:
                raise CONNECT_TIMEOUT
            opened = True
        finally:
            self.breaker.pending_done(opened=opened)
        self.metrics.upstream_conn(self.name, "opened")
        return UpstreamConnection(stream, endpoint, self.breaker)

    def release(self, conn: UpstreamConnection, *, reusable: bool) -> None:
        if not reusable:
            conn.close()
            return
        for c in self.pool.put(conn.endpoint.key, conn, trio.current_time()):
            c.close()

    async def maintain(self) -> None:
        """Expire idle connections, drop those to endpoints that left discovery and (if configured) run the
        active health checks; runs until cancelled."""
        if self.health is None or self.health_check is None:
            await self._maintain_pool()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._maintain_pool)
            await run_health_checks(
                self.health, self.endpoints, settings=self.health_check, tls=self.tls, host_header=self.name
            )

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
                for c in self.pool.expire(trio.current_time()):
                    self.metrics.upstream_conn(self.name, "closed_idle")
                    c.close()
        finally:
            for c in self.pool.clear():
                c.close()


def _connect_error(exc: OSError) -> MeshError:
    return MeshError(502, f"upstream {connect_failure(exc)}")
