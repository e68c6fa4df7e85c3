"""Consul: the local agent's HTTP API (py-consul in worker threads) and health-API discovery, failing static."""

from __future__ import annotations

import functools
import random
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import consul
import requests
import trio

from mesh import log as mesh_log
from mesh.config import ConsulDiscoverySettings, ConsulSettings
from mesh.endpoint import Endpoint, EndpointSet
from mesh.watch import Watch

T = TypeVar("T")


class ConsulUnavailable(Exception):
    """A call to the agent failed: refused, timed out, or answered with an error status. `reason` says which."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class ConsulAgent:
    """The local Consul agent, through py-consul's blocking client run in worker threads.

    Two capacity limiters keep the two kinds of call apart: long polls (blocking queries, one per watched
    service) and control calls (registration, TTL updates). A poll hanging on a broken agent can therefore
    never delay the TTL updates that keep this sidecar's service registered. Every call has a timeout:
    `settings.timeout` for control calls; the query's `wait` plus Consul's wait/16 jitter plus
    `settings.timeout` for a blocking query (py-consul computes it). A call cancelled by trio is abandoned
    (`abandon_on_cancel`): its thread ends when that timeout expires, so abandoned threads are bounded.
    The ACL token is sent as `X-Consul-Token` and never logged."""

    def __init__(self, settings: ConsulSettings) -> None:
        self.settings = settings
        url = urllib.parse.urlsplit(settings.base_url)
        token = settings.token
        if token is None and settings.token_file is not None:
            token = settings.token_file.read_text().strip() or None
        self.address = f"{url.scheme}://{url.hostname}:{url.port or 8500}"
        self.datacenter = settings.datacenter
        self._client = consul.Consul(
            host=url.hostname,
            port=url.port or 8500,
            scheme=url.scheme,
            token=token,
            dc=settings.datacenter,
            verify=str(settings.ca_file) if settings.ca_file else True,
            connections_timeout=settings.timeout,
        )
        self.poll_limiter = trio.CapacityLimiter(256)
        self.control_limiter = trio.CapacityLimiter(4)

    def __repr__(self) -> str:
        return f"<ConsulAgent {self.address}>"

    async def _call(self, limiter: trio.CapacityLimiter, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await trio.to_thread.run_sync(
                functools.partial(fn, *args, **kwargs), abandon_on_cancel=True, limiter=limiter
            )
        except consul.ACLPermissionDenied:
            raise ConsulUnavailable("permission denied (check the ACL token)", 403) from None
        except consul.NotFound as exc:
            raise ConsulUnavailable(f"not found: {str(exc).strip()[:200]}", 404) from None
        except consul.ConsulException as exc:
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ConsulUnavailable(f"agent error: {text}", _status(exc)) from None
        except requests.Timeout:
            raise ConsulUnavailable("agent timed out") from None
        except requests.exceptions.SSLError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise ConsulUnavailable("agent TLS certificate not trusted (check consul.ca_file)") from None
            raise ConsulUnavailable("agent TLS handshake failed") from None
        except requests.ConnectionError as exc:
            raise ConsulUnavailable(f"agent unreachable: {_root_reason(exc)}") from None
        except (requests.RequestException, ValueError) as exc:  # ValueError: a body that is not JSON
            raise ConsulUnavailable(f"agent call failed: {type(exc).__name__}") from None

    async def health(
        self, service: str, *, connect: bool, tags: list[str], index: int, wait: float
    ) -> tuple[int, list[dict[str, Any]]]:
        """Passing instances of `service` (its connect proxies when `connect`), as a blocking query from `index`
        (0: answer at once). Returns (X-Consul-Index, entries)."""
        health = self._client.health
        fn = health.connect if connect else health.service
        kwargs: dict[str, Any] = {"passing": True}
        if tags:
            kwargs["tag"] = list(tags)
        if index:
            kwargs["index"] = str(index)
            kwargs["wait"] = f"{int(wait)}s"
        result = await self._call(self.poll_limiter, fn, service, **kwargs)
        new_index, entries = result
        return int(new_index or 0), list(entries or [])

    async def register_service(self, **definition: Any) -> None:
        """PUT /v1/agent/service/register with py-consul's keyword arguments (name, service_id, port, ...)."""
        await self._call(self.control_limiter, self._client.agent.service.register, **definition)

    async def deregister_service(self, service_id: str) -> None:
        await self._call(self.control_limiter, self._client.agent.service.deregister, service_id)

    async def check_ttl(self, check_id: str, status: str, note: str = "") -> None:
        """Set a TTL check: status "passing", "warning" or "critical". ConsulUnavailable with status 404 or 500
        when the agent does not know the check (it lost its state: re-register)."""
        check = self._client.agent.check
        fn = {"passing": check.ttl_pass, "warning": check.ttl_warn, "critical": check.ttl_fail}[status]
        if await self._call(self.control_limiter, fn, check_id, notes=note or None) is False:
            # py-consul answers False instead of raising when the agent says 404 (unknown check ID).
            raise ConsulUnavailable(f"not found: unknown check {check_id}", 404)

    async def local_service(self, service_id: str) -> dict[str, Any] | None:
        """This agent's registration of `service_id`, or None if it has none."""
        services = await self._call(self.control_limiter, self._client.agent.services)
        return (services or {}).get(service_id)

    async def node_address(self) -> str | None:
        """The agent's node address (what Consul uses for a service registered without an address)."""
        info = await self._call(self.control_limiter, self._client.agent.self)
        member = (info or {}).get("Member") or {}
        return member.get("Addr") or None


def _status(exc: Exception) -> int | None:
    for arg in exc.args:
        if isinstance(arg, str) and arg[:3].isdigit():
            return int(arg[:3])
    return None


def _root_reason(exc: BaseException) -> str:
    text = str(exc)
    if "Connection refused" in text or "ECONNREFUSED" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "name resolution failed"
    if "timed out" in text:
        return "connect timed out"
    return type(exc).__name__


def endpoint_from_entry(entry: dict[str, Any]) -> Endpoint | None:
    """An Endpoint from one /v1/health entry: Service.Address (Node.Address when empty), Service.Port,
    Weights.Passing, Tags and Meta. None for an entry without an address or port."""
    service = entry.get("Service") or {}
    node = entry.get("Node") or {}
    host = service.get("Address") or node.get("Address")
    port = service.get("Port")
    if not host or not isinstance(port, int) or not 0 < port < 65536:
        return None
    weights = service.get("Weights") or {}
    weight = weights.get("Passing", 1)
    weight = min(1000, max(1, weight)) if isinstance(weight, int) else 1
    tags = tuple(str(tag) for tag in service.get("Tags") or ())
    meta = {str(k): str(v) for k, v in (service.get("Meta") or {}).items()}
    return Endpoint(host, port, weight, tags, meta)


class ConsulDiscovery:
    """Endpoint sets from the agent's health API: one blocking-query loop per watched service.

    Each loop follows Consul's rules for blocking queries: it passes the last `X-Consul-Index`, starts over
    from 0 when the index goes backwards, treats an index below 1 as 1, never queries a service more often
    than `min_interval`, and backs off with full jitter (up to `retry_max`) while calls fail.

    Fail static: while Consul errors, hangs or is unreachable, the last known endpoints stay in use; the set
    is re-published with `error` saying why it may be stale (its `updated_at` stays the time of the last
    answer, so /clusters and `mesh_discovery_age_seconds` show the age), and the failure is logged once
    per change of state, not per attempt. A service never resolved stays None (503 `discovery unavailable`);
    an answer with no passing instance is an empty set (503 `no healthy endpoints`), as Consul says."""

    def __init__(
        self,
        agent: ConsulAgent,
        settings: ConsulDiscoverySettings,
        *,
        log: Any = None,
        rng: Callable[[float, float], float] = random.uniform,
        start_timeout: float = 2.0,
    ) -> None:
        self.agent = agent
        self.settings = settings
        self._log = log if log is not None else mesh_log.get_logger("mesh.discovery")
        self._uniform = rng
        self._start_timeout = start_timeout
        self._watches: dict[str, Watch[EndpointSet | None]] = {}
        self._nursery: trio.Nursery | None = None
        self.errors: dict[str, str | None] = {}  # service -> the current error, None while Consul answers

    def __repr__(self) -> str:
        return f"<ConsulDiscovery {self.agent.address} services={sorted(self._watches)}>"

    def watch(self, service: str) -> Watch[EndpointSet | None]:
        if service not in self._watches:
            self._watches[service] = Watch[EndpointSet | None](None)
            if self._nursery is not None:
                self._nursery.start_soon(self._follow, service, trio.Event())
        return self._watches[service]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            first = []
            for service in list(self._watches):
                event = trio.Event()
                first.append(event)
                nursery.start_soon(self._follow, service, event)
            with trio.move_on_after(self._start_timeout):  # a hung agent must not hold the sidecar's start
                for event in first:
                    await event.wait()
            task_status.started()

    async def _follow(self, service: str, first_done: trio.Event) -> None:
        watch = self._watches[service]
        settings = self.settings
        source = f"consul:{'connect' if settings.connect else 'service'}/{service}"
        index = 0
        failures = 0
        while True:
            started = trio.current_time()
            try:
                new_index, entries = await self.agent.health(
                    service, connect=settings.connect, tags=settings.tags, index=index, wait=settings.wait
                )
            except ConsulUnavailable as exc:
                failures += 1
                self._failed(service, watch, exc.reason)
                first_done.set()
                cap = min(settings.retry_max, 0.25 * 2 ** min(failures, 10))
                await trio.sleep(self._uniform(cap / 2, cap))
                continue
            failures = 0
            new_index = max(new_index, 1)  # Consul: an index below 1 is treated as 1
            if new_index < index:  # the index went backwards (e.g. the agent's servers restored a snapshot)
                self._log.info("consul index went backwards; starting over", service=service)
                new_index = 0
            index = new_index
            self._answered(service, watch, source, entries)
            first_done.set()
            elapsed = trio.current_time() - started
            if elapsed < settings.min_interval:
                await trio.sleep(settings.min_interval - elapsed)

    def _answered(self, service: str, watch: Watch[EndpointSet | None], source: str, entries: list[Any]) -> None:
        found: dict[tuple[str, int], Endpoint] = {}
        for entry in entries:
            endpoint = endpoint_from_entry(entry) if isinstance(entry, dict) else None
            if endpoint is not None:
                found.setdefault(endpoint.key, endpoint)
        endpoints = tuple(sorted(found.values(), key=lambda e: e.key))
        current = watch.value
        if self.errors.get(service) is not None:
            self._log.info("consul answers again", service=service, endpoints=len(endpoints))
        elif current is not None and current.endpoints != endpoints:
            self._log.info("endpoints changed", service=service, source=source, endpoints=len(endpoints))
        self.errors[service] = None
        if current is not None and current.endpoints == endpoints:
            endpoints = current.endpoints  # the same tuple object: balancer and ejection caches stay valid
        watch.set(EndpointSet(endpoints, time.time(), source))

    def _failed(self, service: str, watch: Watch[EndpointSet | None], reason: str) -> None:
        if self.errors.get(service) == reason:
            return  # logged when this state began
        self.errors[service] = reason
        current = watch.value
        if current is None:
            self._log.warning("consul unavailable; the service stays unresolved", service=service, reason=reason)
            return
        self._log.warning(
            "consul unavailable; keeping the last known endpoints",
            service=service,
            reason=reason,
            endpoints=len(current.endpoints),
            age_s=round(time.time() - current.updated_at, 1),
        )
        watch.set(EndpointSet(current.endpoints, current.updated_at, current.source, error=reason))
