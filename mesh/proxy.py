"""An HTTP listener: its settings, its compiled pipeline, and the metrics, access log, drain and sweeper it serves
with (mesh.httpserver serves its connections with mesh.h1server and mesh.h2server)."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from mesh.cluster import Cluster
from mesh.config import Limits, Timeouts
from mesh.errors import MeshError
from mesh.http1 import DEFAULT_UPGRADES
from mesh.http2 import H2Limits
from mesh.listener import Drain
from mesh.log import AccessLog
from mesh.message import RequestHead
from mesh.metrics import Metrics
from mesh.pipeline.authz import PeerAuthz
from mesh.pipeline.exchange import Downstream, Exchange, Layer
from mesh.pipeline.forward import Forward
from mesh.pipeline.forwarded import Forwarded
from mesh.pipeline.trace import Trace
from mesh.telemetry.tracer import Tracer
from mesh.timers import Sweeper
from mesh.transport import Acceptor, PlainAccept

log = structlog.get_logger("mesh.proxy")

READ_SIZE = 65536


@dataclass(frozen=True, slots=True)
class HttpProxySettings:
    """What one HTTP listener does: its direction and upstream label, and the limits that apply."""

    direction: str  # "outbound" (app → mesh) or "inbound" (mesh → app)
    upstream: str  # the cluster's name, used in logs and metrics
    timeouts: Timeouts
    limits: Limits
    forwarded_proto: bytes = b"http"
    upgrades: frozenset[bytes] = DEFAULT_UPGRADES  # Upgrade protocols tunnelled after a 101 (DESIGN rule 6)
    identity: bytes = b""  # this sidecar's SPIFFE ID: `By=` of the x-forwarded-client-cert the inbound sets


class HttpProxy:
    """One HTTP listener: its settings, the acceptor of its connections, the process-wide metrics, access log,
    drain and sweeper, and `pipeline`, the layers each request runs through (mesh.pipeline). mesh.httpserver
    serves the connections (mesh.h1server for HTTP/1.1, mesh.h2server's streams for HTTP/2).

    A listener built with a `cluster` and no `pipeline` forwards every request there, as a sidecar's listener
    without routes does: forwarding headers and the caller's deadline, peer authorisation on mTLS listeners,
    then the cluster with the listener's timeouts and the cluster's retry policy. A reload replaces `pipeline`;
    each request keeps the pipeline it started with.

    Request and response bodies are streamed with backpressure; nothing is buffered whole (the first
    `limits.request_buffer` bytes of a body are read before the request is sent on). Every request gets
    exactly one outcome: the upstream's response, a mesh error with `x-mesh-error`, or (when the response was
    cut) an aborted connection."""

    def __init__(
        self,
        settings: HttpProxySettings,
        cluster: Cluster | None,
        *,
        metrics: Metrics,
        access_log: AccessLog,
        drain: Drain,
        sweeper: Sweeper,
        acceptor: Acceptor | None = None,
        pipeline: Layer | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.acceptor = acceptor or PlainAccept()
        self.tracer = tracer
        self.settings = settings
        self.outbound = settings.direction == "outbound"
        self.cluster = cluster
        self.metrics = metrics
        self.access_log = access_log
        self.drain = drain
        self.sweeper = sweeper
        self.h2_limits = h2_limits(settings.limits)  # for HTTP/2 clients of this listener
        if pipeline is None:
            if cluster is not None:
                pipeline = Forward(
                    cluster,
                    outbound=self.outbound,
                    request_timeout=settings.timeouts.request,
                    connect_timeout=settings.timeouts.connect,
                    retry=cluster.retry,
                )
            else:
                pipeline = _NoDestination()
            pipeline = self.entry(pipeline)
        self.pipeline: Layer = pipeline

    def entry(self, next: Layer) -> Layer:
        """The listener's own layers in front of `next`: peer authorisation (mTLS listeners), then the forwarding
        headers and the caller's deadline, then tracing (when the sidecar traces)."""
        settings = self.settings
        if self.tracer is not None:
            next = Trace(next, self.tracer, inbound=not self.outbound)
        layer: Layer = Forwarded(
            next, inbound=not self.outbound, forwarded_proto=settings.forwarded_proto, identity=settings.identity
        )
        if not isinstance(self.acceptor, PlainAccept):
            layer = PeerAuthz(layer)
        return layer

    def __repr__(self) -> str:
        return f"<HttpProxy {self.settings.direction} {self.settings.upstream} {self.pipeline!r}>"

    def adopt(self, other: HttpProxy) -> None:
        """Serve from now on with `other`'s settings, acceptor and pipeline (a reload of this listener): new
        connections and new requests use them; a request in flight keeps the pipeline it started with."""
        self.settings = other.settings
        self.outbound = other.outbound
        self.acceptor = other.acceptor
        self.cluster = other.cluster
        self.h2_limits = other.h2_limits
        self.tracer = other.tracer
        self.pipeline = other.pipeline

    def log_rejected(self, status: int, reason: str, peer: bytes, **fields: object) -> None:
        """The "request rejected" log line of a request refused before anything was forwarded (HTTP/1.1 and
        HTTP/2 alike); `fields` add e.g. the HTTP/2 stream id."""
        settings = self.settings
        log.info(
            "request rejected",
            direction=settings.direction,
            upstream=settings.upstream,
            status=status,
            reason=reason,
            peer=peer.decode(),
            **fields,
        )


def h2_limits(limits: Limits) -> H2Limits:
    """A listener's HTTP/2 limits from its configuration: `limits.http2`, and the header limits of HTTP/1.1."""
    http2 = limits.http2
    return H2Limits(
        max_concurrent_streams=http2.max_concurrent_streams,
        initial_window_size=http2.stream_window,
        connection_window_size=http2.connection_window,
        max_frame_size=http2.max_frame_size,
        max_header_list_size=limits.max_header_bytes,
        max_header_count=limits.max_header_count,
        max_header_block_bytes=max(2 * limits.max_header_bytes, http2.max_frame_size),
    )


class _NoDestination:
    """The pipeline of a listener given nothing to forward to."""

    async def __call__(self, side: Downstream, head: RequestHead, ex: Exchange) -> bool:
        raise MeshError(503, "no destination", "no_healthy_endpoints")
