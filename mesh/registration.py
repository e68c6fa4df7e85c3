"""This sidecar's registration in the local Consul agent: the service, its TTL check fed by app probes, the proxy."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from typing import Any

import trio

from mesh import log as mesh_log
from mesh.config import Address, InboundSettings, RegistrationSettings, ServiceSettings, format_duration
from mesh.consul import ConsulAgent, ConsulUnavailable
from mesh.endpoint import Endpoint
from mesh.health import probe

_BACKOFF_BASE = 0.5
_BACKOFF_MAX = 10.0
_STATE_LOST = (404, 500)  # what a TTL update gets from an agent that does not know the check (old agents: 500)


def advertised_address(settings: RegistrationSettings, inbound: InboundSettings) -> str:
    """The address peers reach the inbound listener on: `settings.address`, else the inbound bind host, else ""
    when that is a wildcard (0.0.0.0, ::). Consul reports a service registered without an address at its
    node's address, and discovery (`endpoint_from_entry`) reads it that way."""
    if settings.address:
        return settings.address
    return _unless_wildcard(inbound.bind.host)


def _unless_wildcard(host: str) -> str:
    try:
        return "" if ipaddress.ip_address(host).is_unspecified else host
    except ValueError:  # a host name
        return host


class Registration:
    """Registers the application's service and this sidecar as its connect-proxy in the local agent, and keeps
    the service's TTL check in step with the application's health.

    Two registrations, as Consul's own `sidecar_service` makes them:

    - the service `<id>` at the application's address (`service.app`), with the TTL check `service:<id>`.
      The check is critical until the first passing probe; this sidecar refreshes it every `health.interval`
      with the probe's result. If the sidecar dies, nobody refreshes it and it turns critical after `ttl`:
      the check covers the sidecar as well as the application.
    - the proxy `<id>-sidecar-proxy` (`Kind: connect-proxy`) at the advertised address and the inbound port,
      with an alias check of the service: when the service is critical, so is the proxy, and
      `/v1/health/connect/<service>?passing` (what peers' discovery asks) drops this instance.

    Both carry `DeregisterCriticalServiceAfter`, so Consul removes an instance left critical (a sidecar that
    died without deregistering). `run` never raises for Consul's failures: while the agent fails it retries
    with full-jitter backoff and logs once per change of state; an agent that forgot the registration (a TTL
    update answered 404 or 500) or that was unreachable is registered with again.

    Wiring: `await nursery.start(registration.run)` once the inbound listener listens (it returns after the first
    attempt, or after `start_timeout` while the agent hangs); on a stop signal `await registration.deregister()`
    before draining, so peers stop routing here first; `state()` is for the admin listener."""

    def __init__(
        self,
        agent: ConsulAgent,
        settings: RegistrationSettings,
        *,
        service: ServiceSettings,
        inbound: InboundSettings,
        log: Any = None,
        rng: Callable[[float, float], float] = random.uniform,
        start_timeout: float = 2.0,
        telemetry: Address | None = None,
    ) -> None:
        self.agent = agent
        self.settings = settings
        # Advertised in both registrations' meta (`mesh-telemetry`), so that Prometheus and `mesh status` on other
        # hosts find the read-only telemetry listener through the catalog.
        # A wildcard bind is advertised at the address peers reach this instance by (":port" when that is the
        # node's own address, as Consul reports it).
        self._meta = dict(settings.meta)
        if telemetry is not None:
            host = _unless_wildcard(telemetry.host) or advertised_address(settings, inbound)
            self._meta["mesh-telemetry"] = str(Address(host, telemetry.port)) if host else f":{telemetry.port}"
        self.service_name = service.name
        self.service_id = settings.id or f"{service.name}-{inbound.bind.port}"
        self.check_id = f"service:{self.service_id}"
        self.proxy_id = f"{self.service_id}-sidecar-proxy"
        self.address = advertised_address(settings, inbound)
        self._service = service
        self._inbound = inbound
        self._app = Endpoint(service.app.host, service.app.port)
        self._log = log if log is not None else mesh_log.get_logger("mesh.registration")
        self._uniform = rng
        self._start_timeout = start_timeout
        self._lock = trio.Lock()  # one registration call at a time, so none can land after deregister()
        self._stopped = False  # deregister() was called: register no more
        self._deregistered = False
        self.registered = False
        self.app_healthy: bool | None = None  # None: not probed yet
        self.last_error: str | None = None  # Consul's current error; None while it answers
        self.registrations = 0  # successful registrations, the first included

    def __repr__(self) -> str:
        return f"<Registration {self.service_id} via {self.agent.address} registered={self.registered}>"

    def state(self) -> dict[str, Any]:
        """For the admin listener: `last_error` is Consul's current error (None while it answers);
        `app_healthy` None until the first probe; `registrations` counts successful (re-)registrations."""
        return {
            "service_id": self.service_id,
            "proxy_id": self.proxy_id,
            "registered": self.registered,
            "app_healthy": self.app_healthy,
            "last_error": self.last_error,
            "registrations": self.registrations,
        }

    # -- the definitions ----------------------------------------------------------------------------------

    def service_definition(self) -> dict[str, Any]:
        """py-consul `agent.service.register` keywords for the application's service and its TTL check."""
        settings = self.settings
        check = {
            "CheckID": self.check_id,
            "Name": "Application health",
            "TTL": format_duration(settings.ttl),
            "DeregisterCriticalServiceAfter": format_duration(settings.deregister_critical_after),
            # Critical until a probe passes (Consul's default for a new check); a registration made again
            # later carries the last known health, so re-registering never flaps a healthy instance.
            "Status": "passing" if self.app_healthy else "critical",
        }
        return {
            "name": self._service.name,
            "service_id": self.service_id,
            "address": _unless_wildcard(self._app.host),  # an app bound to 0.0.0.0: at the node's address
            "port": self._app.port,
            "tags": list(settings.tags),
            "meta": dict(self._meta),
            "check": check,
        }

    def proxy_definition(self) -> dict[str, Any]:
        """py-consul `agent.service.register` keywords for this sidecar as the service's connect-proxy."""
        settings = self.settings
        check = {
            "CheckID": f"service:{self.proxy_id}",
            "Name": f"Connect Sidecar Aliasing {self.service_id}",
            "AliasService": self.service_id,
            "DeregisterCriticalServiceAfter": format_duration(settings.deregister_critical_after),
        }
        return {
            "name": f"{self._service.name}-sidecar-proxy",
            "service_id": self.proxy_id,
            "address": self.address,  # "" is left out: Consul then reports the node's address
            "port": self._inbound.bind.port,
            "tags": list(settings.tags),
            "meta": dict(self._meta),
            "kind": "connect-proxy",
            "proxy": {
                "DestinationServiceName": self._service.name,
                "DestinationServiceID": self.service_id,
                "LocalServiceAddress": self._app.host,
                "LocalServicePort": self._app.port,
            },
            "check": check,
        }

    # -- the task -----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register, then probe the application and update the TTL check every `health.interval`, until
        cancelled or `deregister` is called. Reports started after the first registration attempt, whatever
        its outcome, or after `start_timeout` if the agent hangs: a dead agent never holds the sidecar's start."""
        first_attempt = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_registered, first_attempt)
            with trio.move_on_after(self._start_timeout):
                await first_attempt.wait()
            task_status.started()

    async def _keep_registered(self, first_attempt: trio.Event) -> None:
        interval = self.settings.health.interval
        failures = 0
        while not self._stopped:
            if not self.registered:
                registered = await self._register()
                first_attempt.set()
                if not registered:
                    failures += 1
                    await trio.sleep(self._backoff(failures))
                    continue
            round_started = trio.current_time()
            reason = await probe(self._app, settings=self.settings.health, tls=None)
            self._app_health(reason)
            if await self._report(reason):
                failures = 0
                await trio.sleep_until(round_started + interval)
            else:
                failures += 1
                await trio.sleep(self._backoff(failures))
        first_attempt.set()

    def _backoff(self, failures: int) -> float:
        """Full jitter: uniform in [0, 0.5 s x 2^(failures-1)], the cap growing up to 10 s."""
        return self._uniform(0.0, min(_BACKOFF_MAX, _BACKOFF_BASE * 2 ** min(failures - 1, 10)))

    async def _register(self) -> bool:
        """Register the service, then the proxy (its alias check refers to the service). False if it failed."""
        async with self._lock:
            if self._stopped:
                return False
            try:
                await self.agent.register_service(**self.service_definition())
                await self.agent.register_service(**self.proxy_definition())
            except ConsulUnavailable as exc:
                self.registered = False
                self._failed(exc.reason)
                return False
            self.registered = True
            self.registrations += 1
            self.last_error = None
        self._log.info(
            "registered in consul",
            agent=self.agent.address,
            service_id=self.service_id,
            proxy_id=self.proxy_id,
            address=self.address or "(node address)",
            port=self._inbound.bind.port,
            registrations=self.registrations,
        )
        return True

    async def _report(self, reason: str | None) -> bool:
        """Set the TTL check from a probe's outcome. An agent that does not know the check (404, or 500 from
        older agents) lost its state: register again at once, then set it. False if Consul failed."""
        status = "passing" if reason is None else "critical"
        error = await self._set_ttl(status, reason)
        if error is not None and error.status in _STATE_LOST and not self._stopped:
            self._log.warning(
                "consul lost this registration; registering again", service_id=self.service_id, reason=error.reason
            )
            if not await self._register():
                return False
            error = await self._set_ttl(status, reason)
        if error is None:
            return True
        self.registered = False  # lost, or perhaps lost while the agent was unreachable: register when it answers
        self._failed(error.reason)
        return False

    async def _set_ttl(self, status: str, reason: str | None) -> ConsulUnavailable | None:
        if self._stopped:
            return None
        try:
            await self.agent.check_ttl(self.check_id, status, note=reason or "")
        except ConsulUnavailable as exc:
            return exc
        self.last_error = None
        return None

    def _app_health(self, reason: str | None) -> None:
        healthy = reason is None
        if healthy == self.app_healthy:
            return
        if healthy:
            self._log.info("application healthy", service_id=self.service_id, app=str(self._app))
        else:
            self._log.warning("application unhealthy", service_id=self.service_id, app=str(self._app), reason=reason)
        self.app_healthy = healthy

    def _failed(self, reason: str) -> None:
        if reason == self.last_error:
            return  # logged when this state began
        self.last_error = reason
        self._log.warning(
            "consul registration failing; retrying",
            agent=self.agent.address,
            service_id=self.service_id,
            reason=reason,
        )

    # -- shutdown -----------------------------------------------------------------------------------------

    async def deregister(self) -> None:
        """Remove the proxy, then the service, from the agent, so that peers stop routing here; call it on
        SIGTERM before draining. Best effort: failures are logged, never raised, and the whole call is bounded
        by the agent's timeout (an instance left behind turns critical when its TTL expires, and Consul
        removes it after `deregister_critical_after`). It stops `run` from registering again; once it has
        succeeded, calling it again does nothing."""
        self._stopped = True
        if self._deregistered:
            return
        failed: list[str] = []
        with trio.move_on_after(self.agent.settings.timeout) as scope:
            async with self._lock:  # waits for a registration in flight, so it cannot land afterwards
                for service_id in (self.proxy_id, self.service_id):
                    try:
                        await self.agent.deregister_service(service_id)
                    except ConsulUnavailable as exc:
                        if exc.status != 404:  # 404: already gone
                            failed.append(f"{service_id}: {exc.reason}")
        if scope.cancelled_caught:
            failed.append("timed out")
        self.registered = False
        if failed:
            self._log.warning("consul deregistration failed", service_id=self.service_id, errors=failed)
            return
        self._deregistered = True
        self._log.info("deregistered from consul", service_id=self.service_id, proxy_id=self.proxy_id)
