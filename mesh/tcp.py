"""Opaque byte splicing between two streams with half-close, used for `tcp` upstreams and HTTP upgrades."""

from __future__ import annotations

import trio

from mesh.cluster import Cluster
from mesh.errors import MeshError
from mesh.log import AccessLog
from mesh.metrics import Metrics
from mesh.stream import STREAM_ERRORS
from mesh.transport import Acceptor, PlainAccept

_READ_SIZE = 65536


async def splice(
    a: trio.abc.HalfCloseableStream, b: trio.abc.HalfCloseableStream, *, idle_timeout: float
) -> tuple[int, int]:
    """Copy bytes both ways until both directions have ended; returns (bytes a→b, bytes b→a).

    When one side sends EOF, the other side's write half is closed (`send_eof`) and the opposite direction
    keeps flowing, so protocols that half-close work end to end. A reset on either side ends both
    directions. If no byte moves in either direction for `idle_timeout` seconds, both directions stop.
    The caller closes both streams."""
    counts = [0, 0]
    with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as idle:

        async def copy(src: trio.abc.HalfCloseableStream, dst: trio.abc.HalfCloseableStream, slot: int) -> None:
            try:
                while True:
                    data = await src.receive_some(_READ_SIZE)
                    if not data:
                        break
                    idle.deadline = trio.current_time() + idle_timeout
                    await dst.send_all(data)
                    counts[slot] += len(data)
                await dst.send_eof()
            except STREAM_ERRORS:
                idle.cancel()  # a reset (or a peer gone) ends the whole splice

        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy, a, b, 0)
            nursery.start_soon(copy, b, a, 1)
    return counts[0], counts[1]


class TcpProxy:
    """Serves `tcp` listeners: each downstream connection is spliced to a new connection to a cluster endpoint."""

    def __init__(
        self,
        *,
        direction: str,
        cluster: Cluster,
        idle_timeout: float,
        metrics: Metrics,
        access_log: AccessLog,
        acceptor: Acceptor | None = None,
    ) -> None:
        self.acceptor = acceptor or PlainAccept()
        self.direction = direction
        self.cluster = cluster
        self.idle_timeout = idle_timeout
        self.metrics = metrics
        self.access_log = access_log

    def __repr__(self) -> str:
        return f"<TcpProxy {self.direction} {self.cluster!r}>"

    def adopt(self, other: TcpProxy) -> None:
        """Serve new connections with `other`'s cluster, acceptor and idle timeout (a reload of this listener)."""
        self.cluster = other.cluster
        self.acceptor = other.acceptor
        self.idle_timeout = other.idle_timeout

    async def handle(self, stream: trio.SocketStream) -> None:
        """Proxy one connection; if no upstream connection can be made, the downstream is closed at once."""
        cluster = self.cluster
        start = trio.current_time()
        rx = tx = 0
        mesh_error = endpoint = ""
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = ""
        accepted = await self.acceptor.accept(stream)
        if accepted is None:
            return  # refused at the TLS handshake; the acceptor logged why
        downstream = accepted.stream
        if not accepted.allowed:
            downstream.close()  # a TCP caller the policy refuses is simply closed (the acceptor logged why)
            return
        self.metrics.connection_opened(self.direction, cluster.name)
        try:
            chosen = cluster.pick()
            endpoint = str(chosen)
            conn = await cluster.connect(chosen, timeout=cluster.connect_timeout)
            try:
                rx, tx = await splice(downstream, conn.stream, idle_timeout=self.idle_timeout)
            finally:
                conn.close()
        except MeshError as exc:
            mesh_error = exc.reason
            self.metrics.error(self.direction, cluster.name, exc.code)
        finally:
            downstream.close()
            self.metrics.connection_closed(self.direction, cluster.name)
        self.metrics.tcp_done(self.direction, cluster.name, rx, tx)
        self.access_log.tcp(
            direction=self.direction,
            upstream=cluster.name,
            peer=peer,
            endpoint=endpoint,
            duration_s=trio.current_time() - start,
            rx=rx,
            tx=tx,
            mesh_error=mesh_error,
        )
