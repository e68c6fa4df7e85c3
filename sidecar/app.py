"""The sidecar process: inbound and outbound listeners, discovery, clusters and admin under one root nursery."""

from __future__ import annotations

import contextlib
import gc
import random
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import structlog
import trio

from mesh import log as mesh_log
from mesh.admin import AdminApp
from mesh.cluster import Cluster
from mesh.config import (
    Address,
    BalancerSettings,
    ClusterSettings,
    ConfigError,
    InboundSettings,
    Limits,
    SidecarConfig,
    UpstreamSettings,
    dump_config,
    inbound_default,
    parse_config,
    redact,
)
from mesh.consul import ConsulAgent, ConsulDiscovery
from mesh.discovery import Discovery, discovery_from_settings
from mesh.endpoint import Endpoint, EndpointSet
from mesh.httpserver import HttpServer
from mesh.identity import identity_source
from mesh.listener import Drain, open_listeners, serve_tcp
from mesh.metrics import Metrics
from mesh.pipeline.compile import route_pipeline
from mesh.pipeline.forward import Forward
from mesh.pipeline.mirror import Background
from mesh.pipeline.router import Destination, Route, RouteTable
from mesh.proxy import HttpProxy, HttpProxySettings, h2_limits
from mesh.registration import Registration
from mesh.reload import (
    ConfigVersion,
    ReloadRefused,
    diff_listeners,
    inbound_cluster_unchanged,
    keep_settings,
    listener_name,
    sections_needing_restart,
    unchanged_clusters,
)
from mesh.spiffe import Authorizer, spiffe_id
from mesh.tcp import TcpProxy
from mesh.telemetry.tracer import Tracer
from mesh.timers import Sweeper
from mesh.transport import Acceptor, MutualTlsAccept, PlainAccept, UpstreamTls
from mesh.watch import Watch

log = structlog.get_logger("sidecar")

READINESS_CHECK_INTERVAL = 1.0
"""Seconds between checks of what /ready answers, to log its changes (a certificate also expires with time alone)."""


@dataclass(eq=False)
class _Listener:
    """One listener of the sidecar: what it is called, where it binds, and what serves its connections."""

    key: str  # its identity across reloads (mesh.reload.listener_name; "inbound")
    name: str  # in logs: "inbound", "upstreams[0]:api"
    setting: str  # its bind setting, named in errors: "upstreams[0].bind"
    bind: Address
    server: HttpProxy | TcpProxy
    handler: Any
    max_connections: int
    drain: Drain  # its own: a reload that removes it drains it alone


class Sidecar:
    """One sidecar: the inbound listener in front of the local app and the outbound listeners of its upstreams,
    each serving a pipeline compiled from the config (mesh.pipeline), with one cluster per destination service.

    Built from a validated config; `serve()` runs it until `shutdown()` (or `drain_all()`) has been called and
    every listener has drained, then returns. With `source` (the config file), `reload()` re-reads it: a valid
    config swaps in (requests in flight finish on the pipeline they started on; clusters whose settings did not
    change are kept with their pools and outlier state; listeners are added, removed or re-bound as needed), an
    invalid one is refused and the running config keeps serving."""

    def __init__(self, config: SidecarConfig, *, source: Path | None = None) -> None:
        self.config = config
        self.source = source
        data = source.read_bytes() if source is not None else b""
        self.version = ConfigVersion.first(data, source=str(source or "<config>"), loaded_at=time.time())
        self.metrics = Metrics()
        self.metrics.config_loaded(self.version.version, self.version.loaded_at)
        self.access_log = mesh_log.AccessLog(config.log.access_log, mesh_log.get_logger("access"))
        self.drain = Drain()  # the sidecar's own: started by a shutdown (readiness answers "draining")
        self.sweeper = Sweeper()
        self.background = Background()  # mirrored requests run here once the sidecar serves
        self.rng = random.Random()
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
                self.consul,
                config.registration,
                service=config.service,
                inbound=config.inbound,
                telemetry=config.telemetry.bind,
            )
        self.stopping = False
        self.identity = (
            identity_source(config.identity, service=config.service.name, mesh=config.mesh) if config.identity else None
        )
        if self.identity is not None:
            self.metrics.watch_certificate_expiry(self.identity.seconds_until_expiry)
        self.exporter: Any = None  # mesh.telemetry.otlp.SpanExporter, with tracing
        self.tracer: Tracer | None = None
        tracing = config.telemetry.tracing
        if tracing is not None:
            from mesh.telemetry.otlp import SpanExporter  # only with tracing: it brings protobuf along

            self.exporter = SpanExporter(
                tracing.collector,
                service=config.service.name,
                resource={"service.namespace": config.mesh.namespace, "mesh.datacenter": config.mesh.datacenter},
                max_queue=tracing.max_queue,
                on_outcome=self.metrics.spans,
            )
            self.tracer = Tracer(service=config.service.name, sampling=tracing.sampling, submit=self.exporter.submit)
        self.app_cluster: Cluster | None = None  # the inbound's cluster: the local application
        self.clusters: dict[str, Cluster] = {}  # by destination service
        self.metrics.watch_clusters(self.all_clusters)
        self.listeners: dict[str, _Listener] = {}
        self.bound: dict[str, Address] = {}
        self.serving = False
        self._reloading = trio.Lock()
        self._tasks: trio.Nursery | None = None  # runs cluster maintenance (and retires replaced clusters)
        self._listener_tasks: trio.Nursery | None = None  # runs the listeners
        self._maintaining: dict[Cluster, trio.CancelScope] = {}
        self._listeners_drained = False  # POST /drain: the listeners stay drained until the process ends
        self.app_cluster, self.clusters = self._make_clusters(config, {}, set(), None)
        for listener in self._make_listeners(config, self.app_cluster, self.clusters, {}):
            self.listeners[listener.key] = listener

    def __repr__(self) -> str:
        return f"<Sidecar {self.config.service.name} v{self.version.version} listeners={list(self.listeners)}>"

    def all_clusters(self) -> list[Cluster]:
        return [*([self.app_cluster] if self.app_cluster is not None else []), *self.clusters.values()]

    # -- compiling a config ----------------------------------------------------------------------------------
    def _make_clusters(
        self, config: SidecarConfig, old: dict[str, Cluster], keep: set[str], keep_app: Cluster | None
    ) -> tuple[Cluster | None, dict[str, Cluster]]:
        """The inbound's application cluster and one cluster per destination service: `keep_app` and the clusters
        of `old` named in `keep` are reused as they are (pool, outlier state, retry budget), the rest are new."""
        app_cluster = keep_app
        inbound = config.inbound
        if inbound is not None and app_cluster is None:
            app = config.service.app
            app_endpoints: Watch[EndpointSet | None] = Watch(
                EndpointSet((Endpoint(app.host, app.port),), updated_at=time.time(), source="service.app")
            )
            app_cluster = Cluster(
                config.service.name,
                app_endpoints,
                balancer=BalancerSettings(),
                pool=inbound.pool,
                connect_timeout=inbound.timeouts.connect,
                metrics=self.metrics,
                protocol="http2" if config.service.protocol in ("http2", "grpc") else "http1",
                h2_limits=h2_limits(inbound.limits),
            )
        elif inbound is None:
            app_cluster = None
        clusters: dict[str, Cluster] = {}
        for service, settings in config.cluster_settings().items():
            if service in keep and service in old:
                clusters[service] = old[service]
                continue
            assert self.discovery is not None  # the config requires discovery when destinations exist
            clusters[service] = Cluster(
                service,
                self.discovery.watch(service),
                balancer=settings.balancer,
                pool=settings.pool,
                connect_timeout=settings.timeouts.connect,
                metrics=self.metrics,
                tls=self._upstream_tls(settings),
                outlier=settings.outlier,
                circuit_breakers=settings.circuit_breakers,
                retries=settings.retries,
                hedging=settings.hedging,
                health_check=settings.health_check,
                protocol=_mesh_hop_protocol(settings),
                h2_limits=h2_limits(getattr(settings, "limits", None) or Limits()),
            )
        return app_cluster, clusters

    def _make_listeners(
        self,
        config: SidecarConfig,
        app_cluster: Cluster | None,
        clusters: dict[str, Cluster],
        drains: dict[str, Drain],
    ) -> list[_Listener]:
        """Every listener of `config` with its server and compiled pipeline; a listener named in `drains` keeps
        that drain (a reload keeps the listener's socket and its connections)."""
        made: list[_Listener] = []
        inbound = config.inbound
        if inbound is not None:
            assert app_cluster is not None
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
            made.append(
                self._listener(
                    config, "inbound", "inbound", "inbound.bind", "inbound", inbound, config.service.protocol,
                    app_cluster, clusters, drains, acceptor,
                )
            )  # fmt: skip
        for index, upstream in enumerate(config.upstreams):
            key = listener_name(upstream)
            name = f"upstreams[{index}]:{upstream.service or upstream.bind}"
            default = clusters[upstream.service] if upstream.service is not None else None
            made.append(
                self._listener(
                    config, key, name, f"upstreams[{index}].bind", "outbound", upstream, upstream.protocol, default,
                    clusters, drains,
                )
            )  # fmt: skip
        return made

    def _listener(
        self,
        config: SidecarConfig,
        key: str,
        name: str,
        setting: str,
        direction: str,
        settings: InboundSettings | UpstreamSettings,
        protocol: str,
        cluster: Cluster | None,
        clusters: dict[str, Cluster],
        drains: dict[str, Drain],
        acceptor: Acceptor | None = None,
    ) -> _Listener:
        """One listener in front of `cluster` (its default destination): an HTTP proxy with its pipeline or, for
        protocol `tcp`, a byte splice."""
        drain = drains.get(key) or Drain()
        server: HttpProxy | TcpProxy
        if protocol == "tcp":
            assert cluster is not None  # a tcp listener names its service
            server = TcpProxy(
                direction=direction,
                cluster=cluster,
                idle_timeout=settings.timeouts.idle,
                metrics=self.metrics,
                access_log=self.access_log,
                acceptor=acceptor,
            )
            handler = server.handle
        else:
            label = cluster.name if cluster is not None else name
            server = HttpProxy(
                HttpProxySettings(
                    direction,
                    label,
                    settings.timeouts,
                    settings.limits,
                    upgrades=frozenset(name.encode() for name in settings.upgrades),
                    identity=self._own_identity().encode(),
                ),
                cluster,
                metrics=self.metrics,
                access_log=self.access_log,
                drain=drain,
                sweeper=self.sweeper,
                acceptor=acceptor,
                tracer=self.tracer,
            )
            if settings.routes:
                default = Destination(cluster.name) if cluster is not None else None
                table = RouteTable(settings.routes, default=default)
                destinations = clusters
                if direction == "inbound":
                    assert cluster is not None
                    destinations = {cluster.name: cluster}
                server.pipeline = server.entry(
                    route_pipeline(
                        table,
                        forward_for=partial(self._forward_for, config, destinations, direction == "outbound"),
                        proxy=server,
                        background=self.background,
                        rng=self.rng,
                    )
                )
            handler = HttpServer(server).handle
        return _Listener(key, name, setting, settings.bind, server, handler, settings.limits.max_connections, drain)

    def _forward_for(
        self,
        config: SidecarConfig,
        clusters: dict[str, Cluster],
        outbound: bool,
        route: Route,
        destination: Destination,
        mirror: bool,
    ) -> Forward:
        """The destination layer of a route: the destination's cluster with the route's timeouts, retries (none
        on the inbound and for a mirror) and response header changes."""
        cluster = clusters[destination.service]
        if outbound:
            settings = config.cluster_settings()[destination.service]
            timeouts, retries = settings.timeouts, settings.retries
        else:
            assert config.inbound is not None
            timeouts, retries = config.inbound.timeouts, None
        retry = None
        if outbound and not mirror:
            if route.retries is None and route.timeout_per_try is None:
                retry = cluster.retry  # the destination's own policy
            else:
                rules = route.retries or retries
                assert rules is not None
                if route.timeout_per_try is not None:
                    rules = rules.model_copy(update={"per_try_timeout": route.timeout_per_try})
                retry = cluster.retry_policy(rules) if rules.attempts else None
        return Forward(
            cluster,
            outbound=outbound,
            request_timeout=route.timeout_request if route.timeout_request is not None else timeouts.request,
            connect_timeout=timeouts.connect,
            retry=retry,
            subset=destination.subset,
            label=destination.label,
            hash_on=route.hash_on,
            response_changes=route.apply_response_headers if route.changes_response else None,
        )

    def _own_identity(self) -> str:
        """This sidecar's SPIFFE ID (its service's, in this mesh)."""
        mesh, service = self.config.mesh, self.config.service.name
        return spiffe_id(mesh.trust_domain, mesh.namespace, mesh.datacenter, service)

    # -- admin views ---------------------------------------------------------------------------------------
    def _upstream_tls(self, settings: UpstreamSettings | ClusterSettings) -> UpstreamTls | None:
        if settings.tls != "mutual":
            return None
        assert self.identity is not None and settings.service is not None  # the config requires both
        mesh = self.config.mesh
        expected = settings.identity or spiffe_id(mesh.trust_domain, mesh.namespace, mesh.datacenter, settings.service)
        return UpstreamTls(self.identity, expected_id=expected, server_name=settings.service, metrics=self.metrics)

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
        for cluster in self.all_clusters():
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

    def status_view(self) -> dict[str, Any]:
        """What the telemetry listener's GET /status answers: the service, its config version, readiness, clusters
        and certificate, in one read (what `mesh status` shows)."""
        ready, reason = self.ready()
        return {
            "service": self.config.service.name,
            "loaded": self.version.as_dict(),
            "ready": {"ready": ready, "reason": reason},
            "listeners": {name: str(address) for name, address in self.bound.items()},
            "clusters": self.cluster_state(),
            "certs": self.certs(),
            "registration": self.registration_state(),
        }

    def config_view(self) -> dict[str, Any]:
        """The admin view of the running config: the loaded version, when, from where, and the config itself
        with secrets redacted."""
        return {"loaded": self.version.as_dict(), **redact(dump_config(self.config))}

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
        """{listener key: its sockets}, or an ExceptionGroup of one OSError per address that cannot be bound."""
        wanted = [(listener.key, listener.setting, listener.bind) for listener in self.listeners.values()]
        wanted.append(("admin", "admin.bind", self.config.admin.bind))  # last, as in the config's own checks
        if self.config.telemetry.bind is not None:
            wanted.append(("telemetry", "telemetry.bind", self.config.telemetry.bind))
        return await _open_all(wanted)

    async def _serve(
        self, opened: dict[str, list[trio.SocketListener]], *, task_status: trio.TaskStatus[dict[str, Address]]
    ) -> None:
        config = self.config
        admin = AdminApp(
            metrics=self.metrics,
            ready=self.ready,
            config=self.config_view,
            clusters=self.cluster_state,
            certs=self.certs,
            registration=self.registration_state,
            reload=self.reload if self.source is not None else None,
            log_level=mesh_log.set_level,
            drain=self.drain_listeners,
            shutdown=self.shutdown_soon,
        )
        admin_drain = Drain()
        async with trio.open_nursery() as background:
            self._tasks = background
            self.background.nursery = background
            if self.identity is not None:
                await background.start(self.identity.run)
            if self.discovery is not None:
                await background.start(self.discovery.run)
            if self.registration is not None:
                await background.start(self.registration.run)
            background.start_soon(self.sweeper.run)
            background.start_soon(_flush_access_log_periodically)
            if self.exporter is not None:
                await background.start(self.exporter.run)
            for cluster in self.all_clusters():
                self._maintain(cluster)
            apps = {"admin": admin}
            if "telemetry" in opened:  # read-only: GET /metrics and GET /status, for other hosts
                apps["telemetry"] = AdminApp(
                    metrics=self.metrics,
                    ready=self.ready,
                    config=self.config_view,
                    clusters=self.cluster_state,
                    certs=self.certs,
                    status=self.status_view,
                    only=frozenset({b"/metrics", b"/status"}),
                )
            for name, app in apps.items():
                self.bound[name] = await background.start(
                    partial(
                        serve_tcp,
                        opened.pop(name),
                        app.handle,
                        name=name,
                        drain=admin_drain,
                        max_connections=app.max_connections,
                        drain_timeout=1.0,
                    )
                )
            async with trio.open_nursery() as listeners:
                self._listener_tasks = listeners
                for listener in self.listeners.values():
                    await self._start_listener(listener, opened.pop(listener.key))
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
            self.background.nursery = None
            admin_drain.start()
            background.cancel_scope.cancel()

    async def _start_listener(self, listener: _Listener, sockets: list[trio.SocketListener]) -> None:
        assert self._listener_tasks is not None
        self.bound[listener.name] = await self._listener_tasks.start(
            partial(
                serve_tcp,
                sockets,
                listener.handler,
                name=listener.name,
                drain=listener.drain,
                max_connections=listener.max_connections,
                drain_timeout=self.config.shutdown.drain_timeout,
            )
        )

    def _maintain(self, cluster: Cluster) -> None:
        """Run the cluster's upkeep (pool expiry, health checks, its HTTP/2 connections) until it is retired."""
        assert self._tasks is not None
        scope = self._maintaining[cluster] = trio.CancelScope()

        async def maintain() -> None:
            with scope:
                await cluster.maintain()

        self._tasks.start_soon(maintain)

    async def _retire(self, clusters: list[Cluster]) -> None:
        """Clusters a reload replaced: requests still in flight on the old pipelines may use them until the drain
        timeout; then their upkeep (and the HTTP/2 connections it runs) ends and their idle connections close."""
        await trio.sleep(self.config.shutdown.drain_timeout)
        for cluster in clusters:
            scope = self._maintaining.pop(cluster, None)
            if scope is not None:
                scope.cancel()
            for conn in cluster.pool.clear():
                conn.close()

    # -- reloading -----------------------------------------------------------------------------------------
    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply it (see the class docstring). Returns what the admin's
        `POST /reload` answers; ReloadRefused (with `file: path: error` lines) if the file cannot be applied.
        Reloads run one at a time."""
        async with self._reloading:
            try:
                result = await self._reload()
            except ReloadRefused as refused:
                self.metrics.config_reloaded("refused")
                log.error("config reload refused; the running config keeps serving", errors=refused.errors)
                raise
            self.metrics.config_reloaded(result["result"])
            return result

    async def _reload(self) -> dict[str, Any]:
        source = self.source
        if source is None:
            raise ReloadRefused(["the sidecar was started without a config file: nothing to reload"])
        if self.stopping or self.drain.draining:
            raise ReloadRefused([f"{source}: the sidecar is shutting down"])
        if self._listeners_drained:  # POST /drain: nothing may start listening again
            raise ReloadRefused([f"{source}: the listeners were drained (POST /drain); restart the sidecar"])
        try:
            data = source.read_bytes()
            new = parse_config(data.decode("utf-8"), name=str(source), base_dir=source.parent)
        except ConfigError as exc:
            raise ReloadRefused(exc.errors) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ReloadRefused([f"{source}: cannot read file: {exc}"]) from None
        if self.version.same_file(data):
            log.info("config reload: the file is unchanged", version=self.version.version)
            return {"result": "unchanged", **self.version.as_dict()}
        old = self.config
        kept_old = sections_needing_restart(old, new)
        if kept_old:
            new = keep_settings(new, old, kept_old)
            log.warning("config reload: these settings need a restart and keep their running values", settings=kept_old)
        if new.discovery is not None and self.discovery is None:
            raise ReloadRefused([f"{source}: discovery: added by a reload; restart the sidecar to start discovery"])
        # Compile everything before touching anything: a config that cannot be built is refused as a whole.
        keep = unchanged_clusters(old, new)
        keep_app = self.app_cluster if inbound_cluster_unchanged(old, new) else None
        try:
            app_cluster, clusters = self._make_clusters(new, self.clusters, keep, keep_app)
            diff = diff_listeners(old, new)
            drains = {key: self.listeners[key].drain for key in diff.kept}
            made = {listener.key: listener for listener in self._make_listeners(new, app_cluster, clusters, drains)}
        except (ValueError, KeyError) as exc:
            raise ReloadRefused([f"{source}: {exc}"]) from None
        # Bind the new addresses (the removed listeners' sockets are closed first: one may move to another name).
        rebind = [*diff.added, *diff.changed_bind]
        for key in [*diff.removed, *diff.changed_bind]:
            self.listeners[key].drain.start()
        try:
            opened = await _open_all([(key, made[key].setting, made[key].bind) for key in rebind])
        except ExceptionGroup as group:
            for key in [*diff.removed, *diff.changed_bind]:  # the old ones are gone too: say so plainly
                log.error("listener stopped by a reload that could not bind its replacement", listener=key)
            raise ReloadRefused([f"{source}: {_reason(exc)}" for exc in _leaves(group)]) from None
        # Swap: no await from here until the listeners start, so requests see one config or the other.
        retired = [c for c in self.all_clusters() if c not in {app_cluster, *clusters.values()}]
        for key in diff.kept:
            self.listeners[key].server.adopt(made[key].server)  # type: ignore[arg-type]
            made[key] = self.listeners[key]
        for key in [*diff.removed, *diff.changed_bind]:
            self.bound.pop(self.listeners[key].name, None)
        self.listeners = made
        self.app_cluster, self.clusters = app_cluster, clusters
        self.config = new
        self.version = self.version.next(data, loaded_at=time.time())
        self.metrics.config_loaded(self.version.version, self.version.loaded_at)
        for cluster in self.all_clusters():
            if cluster not in self._maintaining:
                self._maintain(cluster)
        for key in rebind:
            await self._start_listener(made[key], opened[key])
        if retired and self._tasks is not None:
            self._tasks.start_soon(self._retire, retired)
        summary = {
            "added": diff.added,
            "removed": diff.removed,
            "rebound": diff.changed_bind,
            "clusters_kept": sorted(keep & set(clusters)),
            "clusters_new": sorted(set(clusters) - keep),
        }
        log.info("config reloaded", version=self.version.version, **summary)
        return {"result": "ok", **self.version.as_dict(), "listeners": summary, "restart_needed": kept_old}

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

    def drain_all(self) -> None:
        """Stop accepting on every listener and give the work in flight the drain timeout."""
        self.drain.start()
        for listener in self.listeners.values():
            listener.drain.start()

    async def shutdown(self) -> None:
        """Leave the mesh, then drain: deregister from Consul first (bounded by its timeout), so that peers
        stop sending new requests before the listeners stop accepting them."""
        if self.stopping:
            return
        self.stopping = True
        if self.registration is not None and self.consul is not None:
            with trio.move_on_after(self.consul.settings.timeout):
                await self.registration.deregister()
        self.drain_all()

    def drain_listeners(self) -> bool:
        """Drain every listener as a shutdown does, but stay registered and keep running (`POST /drain`, for a load
        balancer in front that watches /ready): `serve()` still ends only after `shutdown()`, which then finds the
        listeners drained. False if they were draining already, or a shutdown has begun."""
        listeners = list(self.listeners.values())
        if self.stopping or self.drain.draining or (listeners and all(one.drain.draining for one in listeners)):
            return False
        log.warning(
            "draining the listeners; the sidecar stays up, not serving, until SIGTERM or POST /shutdown",
            service=self.config.service.name,
            listeners=[listener.name for listener in listeners],
            drain_timeout_s=self.config.shutdown.drain_timeout,
        )
        self._listeners_drained = True
        for listener in listeners:
            listener.drain.start()
        return True

    def shutdown_soon(self) -> bool:
        """Begin `shutdown()` in the background, as SIGTERM does (`POST /shutdown`); False if it has begun."""
        if self.stopping or self._tasks is None:
            return False
        log.info("shutting down", request="POST /shutdown", drain_timeout_s=self.config.shutdown.drain_timeout)
        self._tasks.start_soon(self.shutdown)
        return True


async def _flush_access_log_periodically() -> None:
    try:
        while True:
            await trio.sleep(0.2)
            mesh_log.flush_access_log()
    finally:
        mesh_log.flush_access_log()


async def main(config: SidecarConfig, source: Path | None = None) -> None:
    """Run a sidecar until SIGTERM or SIGINT, then drain; a second signal stops at once. SIGHUP reloads the config
    file `source` (see Sidecar.reload); without one it is logged and ignored (its default action would end the
    process without a drain)."""
    sidecar = Sidecar(config, source=source)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def reload() -> None:
                with contextlib.suppress(ReloadRefused):  # logged and counted by the sidecar
                    await sidecar.reload()

            async def on_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        if source is None:
                            log.warning("SIGHUP ignored: the sidecar was started without a config file to reload")
                        elif sidecar.serving and not sidecar.stopping:
                            log.info("reloading the config", signal=name, file=str(source))
                            nursery.start_soon(reload)
                        continue
                    if sidecar.stopping:
                        log.warning("second signal: stopping now", signal=name)
                        nursery.cancel_scope.cancel()
                        return
                    log.info("shutting down", signal=name, drain_timeout_s=sidecar.config.shutdown.drain_timeout)
                    nursery.start_soon(sidecar.shutdown)

            nursery.start_soon(on_signals)
            await sidecar.serve()
            nursery.cancel_scope.cancel()


def run(config: SidecarConfig, source: Path | None = None) -> int:
    """Entry point of `mesh sidecar run`: returns the process exit code. `source` is the config file (reloaded on
    SIGHUP and POST /reload)."""
    mesh_log.configure(config.log.level)
    try:
        trio.run(main, config, source)
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


async def _open_all(wanted: list[tuple[str, str, Address]]) -> dict[str, list[trio.SocketListener]]:
    """{key: its sockets} for (key, setting, address) each, or an ExceptionGroup of one OSError per address that
    cannot be bound (nothing is left open then)."""
    opened: dict[str, list[trio.SocketListener]] = {}
    failures: list[OSError] = []
    for key, setting, bind in wanted:
        try:
            opened[key] = await open_listeners(bind, name=setting)
        except OSError as exc:
            failures.append(exc)
    if failures:
        _close(opened)
        raise ExceptionGroup("cannot listen", failures)
    return opened


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


def _mesh_hop_protocol(upstream: UpstreamSettings | ClusterSettings) -> str:
    """How an outbound cluster speaks to peer sidecars (docs/wire.md): over mTLS, HTTP/2 where ALPN agrees; in
    plaintext, HTTP/2 with prior knowledge only for http2 and grpc upstreams (the peer may not be a sidecar)."""
    if upstream.protocol == "tcp":
        return "http1"
    if upstream.tls == "mutual":
        return "auto" if upstream.mesh_http2 or upstream.protocol != "http" else "http1"
    return "http2" if upstream.protocol in ("http2", "grpc") else "http1"
