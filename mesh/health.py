"""Active health checks: probe each endpoint on an interval; its health joins discovery and outlier ejection."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import Any, Protocol

import trio

from mesh import log as mesh_log
from mesh.endpoint import Endpoint, EndpointSet
from mesh.errors import MeshError
from mesh.http1 import ProtocolError, ResponseHead, ResponseReader, request_head_bytes
from mesh.stream import connect_failure, open_socket
from mesh.transport import UpstreamTls, secure
from mesh.watch import Watch

_Key = tuple[str, int]
_READ_SIZE = 65536
_USER_AGENT = b"triomesh-health-check"

_log = mesh_log.get_logger("mesh.health")


class HealthPolicy(Protocol):
    """The settings health checking reads (mesh.config.HealthCheckSettings has them)."""

    interval: float
    timeout: float
    http_path: str | None
    unhealthy_threshold: int
    healthy_threshold: int


# -- the state machine (sans-io) ----------------------------------------------------------------------------


class _Host:
    """What the tracker knows about one probed endpoint key."""

    __slots__ = ("failures", "last_probe", "passes", "unhealthy")

    def __init__(self) -> None:
        self.failures = 0  # consecutive failed probes
        self.passes = 0  # consecutive passed probes
        self.unhealthy = False
        self.last_probe = "ok"


class HealthTracker:
    """Each endpoint's health from its probe results: unhealthy after `unhealthy_threshold` failed probes in a
    row, healthy again after `healthy_threshold` passed probes in a row.

    An endpoint never probed counts as healthy: discovery already vouches for it, so a new endpoint takes
    traffic at once and passive outlier ejection covers the first interval. (Envoy instead holds a new host
    out of rotation until its first check passes; with probes jittered over a whole interval that would
    leave a freshly scaled-up service idle for up to `interval`.) Endpoints that discovery itself reports
    unhealthy are not this tracker's business: the cluster excludes them whatever the probes say.

    `usable()` is called per request: with no endpoint unhealthy it returns the `endpoints` object itself
    without allocating; otherwise the filtered tuple is cached until the set's identity changes or an
    endpoint's health changes. `report()` is O(1). No clock is needed: time is the runner's business.
    """

    def __init__(self, settings: HealthPolicy) -> None:
        self.settings = settings
        self._hosts: dict[_Key, _Host] = {}
        self._unhealthy: set[_Key] = set()
        self.changes_total = 0  # healthy <-> unhealthy transitions
        self._version = 0  # bumped whenever the unhealthy set changes
        self._cached_for: Sequence[Endpoint] | None = None
        self._cached_version = -1
        self._cached: Sequence[Endpoint] = ()

    def __repr__(self) -> str:
        return (
            f"<HealthTracker probed={len(self._hosts)} unhealthy={len(self._unhealthy)} "
            f"changes_total={self.changes_total}>"
        )

    # -- hot path -------------------------------------------------------------------------------------------

    def usable(self, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        """`endpoints` minus those marked unhealthy (possibly none left: there is no panic mode here)."""
        unhealthy = self._unhealthy
        if not unhealthy:
            return endpoints
        if endpoints is self._cached_for and self._cached_version == self._version:
            return self._cached
        chosen = tuple(endpoint for endpoint in endpoints if endpoint.key not in unhealthy)
        self._cached_for = endpoints
        self._cached_version = self._version
        # An unhealthy endpoint outside this set: keep the set's identity, which downstream caches key on.
        self._cached = endpoints if len(chosen) == len(endpoints) else chosen
        return self._cached

    # -- probe results --------------------------------------------------------------------------------------

    def report(self, key: _Key, ok: bool, reason: str | None = None) -> bool:
        """One probe result for `Endpoint.key`; `reason` says why it failed. True if the health changed."""
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host()
        if ok:
            host.last_probe = "ok"
            host.failures = 0
            host.passes += 1
            if host.unhealthy and host.passes >= self.settings.healthy_threshold:
                host.unhealthy = False
                self._unhealthy.discard(key)
                self._changed()
                return True
            return False
        host.last_probe = reason or "failed"
        host.passes = 0
        host.failures += 1
        if not host.unhealthy and host.failures >= self.settings.unhealthy_threshold:
            host.unhealthy = True
            self._unhealthy.add(key)
            self._changed()
            return True
        return False

    def forget(self, keys_present: Container[_Key]) -> None:
        """Drop the state of keys no longer in discovery; one that comes back starts as never probed."""
        for key in [key for key in self._hosts if key not in keys_present]:
            del self._hosts[key]
            if key in self._unhealthy:
                self._unhealthy.discard(key)
                self._version += 1

    # -- admin ----------------------------------------------------------------------------------------------

    def state(self, endpoint: Endpoint) -> dict[str, object]:
        """The endpoint's health for admin /clusters; "unknown" (and usable) until its first probe."""
        host = self._hosts.get(endpoint.key)
        if host is None:
            return {"health_check": "unknown", "health_check_failures": 0, "last_probe": None}
        return {
            "health_check": "unhealthy" if host.unhealthy else "healthy",
            "health_check_failures": host.failures,
            "last_probe": host.last_probe,
        }

    def _changed(self) -> None:
        self.changes_total += 1
        self._version += 1


# -- probes ------------------------------------------------------------------------------------------------


async def probe(
    endpoint: Endpoint, *, settings: HealthPolicy, tls: UpstreamTls | None, host_header: str | None = None
) -> str | None:
    """Probe one endpoint: None if it passed, else a short reason ("connect refused", "timeout", "status 503",
    "tls: ...", "invalid response", ...). Never raises for network errors; the sockets it opens are closed
    before it returns or when it is cancelled.

    Without `settings.http_path` it passes when the TCP connection (and the TLS handshake with the peer's
    identity check, when `tls` is given) succeeds. With it, it sends `GET <http_path>` with `Host: host_header`
    (default: the endpoint's address) and `connection: close`; a 2xx response head passes. The whole probe
    is bounded by `settings.timeout`.
    """
    with trio.move_on_after(settings.timeout):
        return await _probe(endpoint, settings.http_path, tls, host_header or str(endpoint))
    return "timeout"


async def _probe(endpoint: Endpoint, path: str | None, tls: UpstreamTls | None, host_header: str) -> str | None:
    try:
        sock = await open_socket(endpoint.host, endpoint.port)
    except OSError as exc:
        return connect_failure(exc)
    try:
        stream = await secure(sock, tls)  # closes the socket itself when it fails or is cancelled
    except MeshError as exc:
        return "tls: " + exc.reason.removeprefix("upstream ")
    try:
        if path is None:
            return None
        headers = [(b"host", host_header.encode()), (b"user-agent", _USER_AGENT), (b"connection", b"close")]
        await stream.send_all(request_head_bytes(b"GET", path.encode(), headers))
        reader = ResponseReader(request_method=b"GET")
        while True:
            event = reader.next_event()
            if event is None:
                data = await stream.receive_some(_READ_SIZE)
                if not data:
                    return "closed before responding"
                reader.feed(data)
            elif type(event) is not ResponseHead:
                return "invalid response"
            elif not event.informational:
                return None if 200 <= event.status < 300 else f"status {event.status}"
    except ProtocolError:
        return "invalid response"
    except (trio.BrokenResourceError, OSError):
        return "connection lost"
    finally:
        stream.close()


# -- the runner --------------------------------------------------------------------------------------------

ProbeFn = Callable[..., Awaitable[str | None]]
"""`probe`'s signature: (endpoint, *, settings, tls, host_header) -> None or the reason it failed."""


class _Checker:
    """Probes one endpoint key every interval until its cancel scope is cancelled."""

    __slots__ = ("endpoint", "scope")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint  # the latest Endpoint for this key (weight or tags may change under it)
        self.scope = trio.CancelScope()


async def run_health_checks(
    tracker: HealthTracker,
    endpoints: Watch[EndpointSet | None],
    *,
    settings: HealthPolicy,
    tls: UpstreamTls | None,
    host_header: str,
    on_change: Callable[[Endpoint, bool], object] | None = None,
    probe_fn: ProbeFn = probe,
    rng: Callable[[], float] = random.random,
    log: Any = None,
) -> None:
    """Probe every endpoint of the watched set every `settings.interval` and feed `tracker`; runs until cancelled.

    Each endpoint's first probe comes at a random point of its first interval (`rng() * interval`), so that
    sidecars started together do not probe in lockstep; later probes follow every interval after the previous
    one started. Endpoints that join the set get a task, those that leave lose theirs and their state
    (`tracker.forget`). Every endpoint in the set is probed, including those discovery reports unhealthy.
    A change of health is logged once (not every probe) and passed to `on_change(endpoint, healthy)`.
    """
    log = log if log is not None else _log
    checkers: dict[_Key, _Checker] = {}

    async def check(checker: _Checker) -> None:
        interval = settings.interval
        with checker.scope:
            await trio.sleep(rng() * interval)
            while True:
                next_probe = trio.current_time() + interval
                endpoint = checker.endpoint
                reason = await probe_fn(endpoint, settings=settings, tls=tls, host_header=host_header)
                if tracker.report(endpoint.key, reason is None, reason):
                    healthy = reason is None
                    if healthy:
                        log.info("endpoint healthy again", service=host_header, endpoint=str(endpoint))
                    else:
                        log.warning(
                            "endpoint unhealthy",
                            service=host_header,
                            endpoint=str(endpoint),
                            reason=reason,
                            failed_probes=settings.unhealthy_threshold,
                        )
                    if on_change is not None:
                        on_change(endpoint, healthy)
                await trio.sleep_until(next_probe)

    async with trio.open_nursery() as nursery:
        current, version = endpoints.value, endpoints.version
        while True:
            present = {endpoint.key: endpoint for endpoint in current.endpoints} if current is not None else {}
            for key in [key for key in checkers if key not in present]:
                checkers.pop(key).scope.cancel()
            tracker.forget(present)
            for key, endpoint in present.items():
                checker = checkers.get(key)
                if checker is None:
                    checkers[key] = checker = _Checker(endpoint)
                    nursery.start_soon(check, checker)
                else:
                    checker.endpoint = endpoint
            current, version = await endpoints.wait_changed(version)
