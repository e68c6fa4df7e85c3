"""The sidecar process: inbound and outbound listeners, discovery, clusters and admin under one root nursery."""

from __future__ import annotations

import gc
import signal
import time
from functools import partial
from typing import Any

import structlog
import trio

from mesh import log as mesh_log
from mesh.admin import AdminApp
from mesh.cluster import Cluster
from mesh.config import (
    Address,
    BalancerSettings,
    InboundSettings,
    SidecarConfig,
    UpstreamSettings,
    dump_config,
    inbound_default,
    redact,
)
from mesh.consul import ConsulAgent, ConsulDiscovery
from mesh.discovery import Discovery, Endpoint, EndpointSet, discovery_from_settings
from mesh.httpserver import HttpServer
from mesh.identity import identity_source
from mesh.listener import Drain, open_listeners, serve_tcp
from mesh.metrics import Metrics
from mesh.proxy import HttpProxy, HttpProxySettings, h2_limits
from mesh.registration import Registration
from mesh.spiffe import Authorizer, spiffe_id
from mesh.tcp import TcpProxy
from mesh.timers import Sweeper
from mesh.transport import Acceptor, MutualTlsAccept, PlainAccept, UpstreamTls
from mesh.watch import Watch

log = structlog.get_logger("sidecar")

READINESS_CHECK_INTERVAL = 1.0
"""Seconds between checks of what /ready answers, to log its changes (a certificate also expires with time alone)."""


class Sidecar:
    """One sidecar: the inbound listener in front of the local app and one outbound listener per upstream.

    Built from a validated config; `serve()` runs it until `drain.start()` has been called and every
    listener has drained, then returns."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.access_log = mesh_log.AccessLog(config.log.access_log, mesh_log.get_logger("access"))
        self.drain = Drain()
        self.sweeper = Sweeper()
        self.consul = ConsulAgent(config.consul) if config.consul is not None else None
        self.discovery: Discovery | None = None
        if config.discovery is not None and config.discovery.consul is not None:
            assert self.consul is not None  # the config fills in the agent's defaults when discovery uses it
            self.discovery = ConsulDiscovery(self.consul, config.discovery.consul)
        elif config.discovery is not None:
            self.discovery = discovery_from_settings(config.discovery)
        self.registration: Registration | None = None
        if config.registration is not None:
            assert self.consul is not None and config.inbound is not None  # the config guarantees both
            self.registration = Registration(
                self.consul, config.registration, service=config.service, inbound=config.inbound
            )
        self.stopping = False
        self.identity = (
            identity_source(config.identity, service=config.service.name, mesh=config.mesh) if config.identity else None
        )
        if self.identity is not None:
            self.metrics.watch_certificate_expiry(self.identity.seconds_until_expiry)
        self.clusters: list[Cluster] = []
        self.metrics.watch_clusters(lambda: self.clusters)
        # (name, its bind setting in the config, bind, handler, max_connections)
        self.listeners: list[tuple[str, str, Address, Any, int]] = []
        self.bound: dict[str, Address] = {}
        self.serving = False
        self._build()

    def __repr__(self) -> str:
        return f"<Sidecar {self.config.service.name} listeners={[n for n, *_ in self.listeners]}>"

    def _build(self) -> None:
        config = self.config
        inbound = config.inbound
        if inbound is not None:
            app = config.service.app
            app_endpoints: Watch[EndpointSet | None] = Watch(
                EndpointSet((Endpoint(app.host, app.port),), updated_at=time.time(), source="service.app")
            )
            cluster = Cluster(
                config.service.name,
                app_endpoints,
                balancer=BalancerSettings(),
                pool=inbound.pool,
                connect_timeout=inbound.timeouts.connect,
                metrics=self.metrics,
                protocol="http2" if config.service.protocol in ("http2", "grpc") else "http1",
                h2_limits=h2_limits(inbound.limits),
            )
            acceptor: Acceptor = PlainAccept()
            if inbound.tls == "mutual":
                assert self.identity is not None  # the config requires an identity for tls: mutual
                mesh = config.mesh
                authorizer = Authorizer(
                    inbound.allow,
                    inbound.deny,
                    trust_domain=mesh.trust_domain,
                    namespace=mesh.namespace,
                    datacenter=mesh.datacenter,
                    default_policy=mesh.default_policy,
                )
                acceptor = MutualTlsAccept(
                    self.identity, authorizer, handshake_timeout=inbound.timeouts.request_headers, metrics=self.metrics
                )
            self._add_listener(
                "inbound", "inbound.bind", "inbound", inbound.bind, config.service.protocol, cluster, inbound, acceptor
            )
        for index, upstream in enumerate(config.upstreams):
            assert self.discovery is not None  # the config requires discovery when upstreams exist
            cluster = Cluster(
                upstream.service,
                self.discovery.watch(upstream.service),
                balancer=upstream.balancer,
                pool=upstream.pool,
                connect_timeout=upstream.timeouts.connect,
                metrics=self.metrics,
                tls=self._upstream_tls(upstream),
                outlier=upstream.outlier,
                circuit_breakers=upstream.circuit_breakers,
                retries=upstream.retries,
                hedging=upstream.hedging,
                health_check=upstream.health_check,
                protocol=_mesh_hop_protocol(upstream),
                h2_limits=h2_limits(upstream.limits),
            )
            name = f"upstreams[{index}]:{upstream.service}"
            self._add_listener(
                name, f"upstreams[{index}].bind", "outbound", upstream.bind, upstream.protocol, cluster, upstream
            )

    def _add_listener(
        self,
        name: str,
        setting: str,
        direction: str,
        bind: Address,
        protocol: str,
        cluster: Cluster,
        settings: InboundSettings | UpstreamSettings,
        acceptor: Acceptor | None = None,
    ) -> None:
        """One listener in front of `cluster`: an HTTP proxy or, for protocol `tcp`, a byte splice."""
        self.clusters.append(cluster)
        if protocol == "tcp":
            handler = TcpProxy(
                direction=direction,
                cluster=cluster,
                idle_timeout=settings.timeouts.idle,
                metrics=self.metrics,
                access_log=self.access_log,
                acceptor=acceptor,
            ).handle
        else:
            proxy = HttpProxy(
                HttpProxySettings(
                    direction,
                    cluster.name,
                    settings.timeouts,
                    settings.limits,
                    upgrades=frozenset(name.encode() for name in settings.upgrades),
                    identity=self._own_identity().encode(),
                ),
                cluster,
                metrics=self.metrics,
                access_log=self.access_log,
                drain=self.drain,
                sweeper=self.sweeper,
                acceptor=acceptor,
            )
            handler = HttpServer(proxy).handle
        self.listeners.append((name, setting, bind, handler, settings.limits.max_connections))

    def _own_identity(self) -> str:
        """This sidecar's SPIFFE ID (its service's, in this mesh)."""
        mesh, service = self.config.mesh, self.config.service.name
        return spiffe_id(mesh.trust_domain, mesh.namespace, mesh.datacenter, service)

    # -- admin views ---------------------------------------------------------------------------------------
    def _upstream_tls(self, upstream: UpstreamSettings) -> UpstreamTls | None:
        if upstream.tls != "mutual":
            return None
        assert self.identity is not None  # the config requires an identity for tls: mutual
        mesh = self.config.mesh
        expected = upstream.identity or spiffe_id(mesh.trust_domain, mesh.namespace, mesh.datacenter, upstream.service)
        return UpstreamTls(self.identity, expected_id=expected, server_name=upstream.service, metrics=self.metrics)

    def ready(self) -> tuple[bool, str]:
        if self.stopping or self.drain.draining:
            return False, "draining"
        if not self.serving:
            return False, "starting"
        if self.identity is not None:
            return self.identity.ready()
        return True, "ready"

    def registration_state(self) -> dict[str, Any]:
        if self.registration is None:
            return {"registered": False, "reason": "not configured (registration: null)"}
        return self.registration.state()

    def certs(self) -> dict[str, Any]:
        if self.identity is None:
            return {"loaded": False, "reason": "no identity configured (every mesh hop is tls: off)"}
        return self.identity.status()

    def cluster_state(self) -> dict[str, Any]:
        now = time.time()
        errors = self.discovery.errors if self.discovery is not None else {}
        state: dict[str, Any] = {}
        for cluster in self.clusters:
            current = cluster.endpoints.value
            state[cluster.name] = {
                "resolved": current is not None,
                "source": current.source if current else None,
                "age_s": round(now - current.updated_at, 3) if current else None,
                "stale_reason": current.error if current else errors.get(cluster.name),
                "balancer": cluster.policy,
                "panic": bool(cluster.outlier and cluster.outlier.panic),
                "circuit": {
                    "connections": cluster.breaker.connections,
                    "pending": cluster.breaker.pending,
                    "requests": cluster.breaker.requests,
                    "overflows": dict(cluster.breaker.overflows),
                },
                "endpoints": [
                    {
                        **cluster.endpoint_state(e),
                        "address": str(e),
                        "weight": e.weight,
                        "healthy": e.healthy,
                        "tags": list(e.tags),
                        "meta": dict(e.meta),
                        "idle_connections": cluster.pool.idle_count(e.key),
                    }
                    for e in (current.endpoints if current else ())
                ],
            }
        return state

    # -- running -------------------------------------------------------------------------------------------
    async def serve(self, *, task_status: trio.TaskStatus[dict[str, Address]] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until drained. Reports {listener name: bound address} (including "admin") once all are bound.

        Every address is bound before anything else starts, so that nothing registers in Consul or serves when
        one cannot be: an ExceptionGroup then holds one OSError per address, naming its setting."""
        opened = await self._open_listeners()
        try:
            default = inbound_default(self.config)
            if default is not None:
                log.warning("inbound.allow is empty", listener="inbound", **default._asdict())
            await self._serve(opened, task_status=task_status)
        finally:  # serve_tcp closes the listeners it was given; these are the ones it never got
            _close(opened)

    async def _open_listeners(self) -> dict[str, list[trio.SocketListener]]:
        """{listener name: its listeners}, or an ExceptionGroup of one OSError per address that cannot be bound."""
        wanted = [(name, setting, bind) for name, setting, bind, *_ in self.listeners]
        wanted.append(("admin", "admin.bind", self.config.admin.bind))  # last, as in the config's own checks
        opened: dict[str, list[trio.SocketListener]] = {}
        failures: list[OSError] = []
        for name, setting, bind in wanted:
            try:
                opened[name] = await open_listeners(bind, name=setting)
            except OSError as exc:
                failures.append(exc)
        if failures:
            _close(opened)
            raise ExceptionGroup("cannot listen", failures)
        return opened

    async def _serve(
        self, opened: dict[str, list[trio.SocketListener]], *, task_status: trio.TaskStatus[dict[str, Address]]
    ) -> None:
        config = self.config
        admin = AdminApp(
            metrics=self.metrics,
            ready=self.ready,
            config=lambda: redact(dump_config(config)),
            clusters=self.cluster_state,
            certs=self.certs,
            registration=self.registration_state,
        )
        admin_drain = Drain()
        async with trio.open_nursery() as background:
            if self.identity is not None:
                await background.start(self.identity.run)
            if self.discovery is not None:
                await background.start(self.discovery.run)
            if self.registration is not None:
                await background.start(self.registration.run)
            background.start_soon(self.sweeper.run)
            background.start_soon(_flush_access_log_periodically)
            for cluster in self.clusters:
                background.start_soon(cluster.maintain)
            self.bound["admin"] = await background.start(
                partial(
                    serve_tcp,
                    opened["admin"],
                    admin.handle,
                    name="admin",
                    drain=admin_drain,
                    max_connections=admin.max_connections,
                    drain_timeout=1.0,
                )
            )
            async with trio.open_nursery() as listeners:
                for name, _, _, handler, max_connections in self.listeners:
                    self.bound[name] = await listeners.start(
                        partial(
                            serve_tcp,
                            opened[name],
                            handler,
                            name=name,
                            drain=self.drain,
                            max_connections=max_connections,
                            drain_timeout=config.shutdown.drain_timeout,
                        )
                    )
                self.serving = True
                listening = {k: str(v) for k, v in self.bound.items()}
                readiness = self.ready()
                self._log_readiness(readiness, listening, started=True)
                background.start_soon(self._follow_readiness, readiness, listening)
                # Everything built so far (config, modules, listeners) lives as long as the process: move it
                # out of the cyclic collector's sight, so full collections stay short and do not stall requests.
                gc.freeze()
                task_status.started(dict(self.bound))
                # The listeners return once drained; a sidecar with none but admin must wait for the drain too.
                await self.drain.started.wait()
            log.info("drained", service=config.service.name)
            admin_drain.start()
            background.cancel_scope.cancel()

    def _log_readiness(self, readiness: tuple[bool, str], listeners: dict[str, str], *, started: bool = False) -> None:
        """Say in the log what /ready says."""
        ready, reason = readiness
        service = self.config.service.name
        if ready:
            log.info("sidecar ready", service=service, listeners=listeners)
        else:
            event = "sidecar started, not ready" if started else "sidecar not ready"
            log.warning(event, service=service, reason=reason, listeners=listeners)

    async def _follow_readiness(self, readiness: tuple[bool, str], listeners: dict[str, str]) -> None:
        """Log each change of what /ready answers until the shutdown begins (which is logged as such)."""
        while True:
            await trio.sleep(READINESS_CHECK_INTERVAL)
            if self.stopping or self.drain.draining:
                return
            now = self.ready()
            if now != readiness:
                readiness = now
                self._log_readiness(readiness, listeners)

    async def shutdown(self) -> None:
        """Leave the mesh, then drain: deregister from Consul first (bounded by its timeout), so that peers
        stop sending new requests before the listeners stop accepting them."""
        if self.stopping:
            return
        self.stopping = True
        if self.registration is not None and self.consul is not None:
            with trio.move_on_after(self.consul.settings.timeout):
                await self.registration.deregister()
        self.drain.start()


async def _flush_access_log_periodically() -> None:
    try:
        while True:
            await trio.sleep(0.2)
            mesh_log.flush_access_log()
    finally:
        mesh_log.flush_access_log()


async def main(config: SidecarConfig) -> None:
    """Run a sidecar until SIGTERM or SIGINT, then drain; a second signal stops at once. SIGHUP is logged and
    ignored: there is no config reload, and its default action would end the process without a drain."""
    sidecar = Sidecar(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        log.warning("SIGHUP ignored: the config is not reloaded; restart the sidecar to apply changes")
                        continue
                    if sidecar.stopping:
                        log.warning("second signal: stopping now", signal=name)
                        nursery.cancel_scope.cancel()
                        return
                    log.info("shutting down", signal=name, drain_timeout_s=config.shutdown.drain_timeout)
                    nursery.start_soon(sidecar.shutdown)

            nursery.start_soon(on_signals)
            await sidecar.serve()
            nursery.cancel_scope.cancel()


def run(config: SidecarConfig) -> int:
    """Entry point of `mesh sidecar run`: returns the process exit code."""
    mesh_log.configure(config.log.level)
    try:
        trio.run(main, config)
    except BaseExceptionGroup as group:
        startup, rest = group.split(OSError)
        if startup is None or rest is not None:
            raise
        for exc in _leaves(startup):
            log.error("cannot start", error=_reason(exc))
        return 1
    except OSError as exc:
        log.error("cannot start", error=_reason(exc))
        return 1
    return 0


def _reason(exc: BaseException) -> str:
    """An OSError in plain words, without the "[Errno N]" that str() puts first."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


def _close(opened: dict[str, list[trio.SocketListener]]) -> None:
    for listeners in opened.values():
        for listener in listeners:
            listener.socket.close()


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions inside nested exception groups (one per failed task)."""
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


def _mesh_hop_protocol(upstream: UpstreamSettings) -> str:
    """How an outbound cluster speaks to peer sidecars (docs/wire.md): over mTLS, HTTP/2 where ALPN agrees; in
    plaintext, HTTP/2 with prior knowledge only for http2 and grpc upstreams (the peer may not be a sidecar)."""
    if upstream.protocol == "tcp":
        return "http1"
    if upstream.tls == "mutual":
        return "auto" if upstream.mesh_http2 or upstream.protocol != "http" else "http1"
    return "http2" if upstream.protocol in ("http2", "grpc") else "http1"
