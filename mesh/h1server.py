"""HTTP/1.1 downstream connections: requests parsed, each run through the listener's pipeline, responses framed."""

from __future__ import annotations

import trio
from h2.errors import ErrorCodes

from mesh import http1
from mesh.cluster import Upstream
from mesh.errors import MeshError, UpstreamLost, grpc_error_headers, is_grpc
from mesh.h1upstream import UpstreamConnection
from mesh.http1 import Http2Preface, ProtocolError, RequestReader
from mesh.http2 import H2Limits, H2Session
from mesh.message import END, Headers, RequestHead, ResponseHead, Trailers
from mesh.pipeline.exchange import (
    HEAD,
    IDLE,
    STALL,
    DownstreamGone,
    Exchange,
    answer_expired,
    record,
    serve_exchange,
)
from mesh.proxy import READ_SIZE, HttpProxy
from mesh.stream import STREAM_ERRORS
from mesh.tcp import splice
from mesh.timers import INF
from mesh.transport import Accepted, Stream


class H1Downstream:
    """One HTTP/1.1 client connection: a loop of request → response exchanges, each through the pipeline.

    It is the pipeline's `Downstream` (mesh.pipeline.exchange) for the exchange in progress: it reads the request
    body, writes the response head and body with HTTP/1.1 framing, answers mesh errors, and splices the two
    connections after a 101. One coarse deadline per connection (`deadline`, `waiting_for`), swept by the
    listener's Sweeper, bounds whatever it waits for."""

    __slots__ = (
        "accepted",
        "deadline",
        "exchange",
        "limits",
        "peer_ip",
        "pending",
        "proxy",
        "reader",
        "stream",
        "timeouts",
        "timer",
        "upstream",
        "waiting_for",
        "waker",
    )

    def __init__(self, proxy: HttpProxy, accepted: Accepted, initial: bytes = b"") -> None:
        self.pending = initial  # bytes already read from the client (protocol detection), parsed first
        self.proxy = proxy
        self.stream = stream = accepted.stream
        self.accepted = accepted
        # Timeouts: `deadline` (trio clock) and `waiting_for` change freely on the hot path; the sweeper
        # cancels `timer`, which wraps the whole connection, once the deadline passes.
        self.deadline = INF
        self.waiting_for = IDLE
        self.timer = trio.CancelScope()
        self.exchange: tuple[RequestHead, Exchange, float] | None = None
        self.upstream: Upstream | None = None
        self.timeouts = proxy.settings.timeouts
        self.limits = limits = proxy.settings.limits
        self.reader = RequestReader(
            max_header_bytes=limits.max_header_bytes,
            max_header_count=limits.max_header_count,
            max_body_bytes=limits.max_body_bytes,
            upgrades=proxy.settings.upgrades,
        )
        self.waker = _IdleWake(stream)
        try:
            self.peer_ip = stream.socket.getpeername()[0].encode()
        except OSError:
            self.peer_ip = b""

    def __repr__(self) -> str:
        return f"<H1Downstream {self.peer_ip.decode()} {self.proxy!r}>"

    def expire(self) -> None:
        """The deadline passed, or the drain deadline cut the exchange: `_timed_out` answers for it."""
        self.timer.cancel()

    async def serve(self) -> None:
        sweeper = self.proxy.sweeper
        sweeper.add(self)
        try:
            with self.timer:
                await self._serve_requests()
            if self.timer.cancelled_caught:
                await self._timed_out()
        finally:
            sweeper.discard(self)
            self.proxy.drain.busy(self.waker)
            if self.upstream is not None:
                self.upstream.close()

    async def _serve_requests(self) -> None:
        while True:
            try:
                head = await self._next_head()
            except Http2Preface as exc:
                self._rejected(exc)
                await self._refuse_http2(exc.reason)
                return
            except ProtocolError as exc:
                self._rejected(exc)
                await self._send_error(exc.status, exc.reason, close=True)
                return
            if head is None:
                return
            if not await serve_exchange(self, head):
                return

    async def _timed_out(self) -> None:
        """The connection's deadline passed, or the drain deadline cut its exchange: answer what is due, then
        close."""
        if self.exchange is not None:
            await answer_expired(self)
        elif self.waiting_for == HEAD:  # between requests, with a head begun
            cut = self.proxy.drain.cutting
            exc = ProtocolError(503, "draining") if cut else ProtocolError(408, "request header timeout")
            self._rejected(exc)
            await self._send_error(exc.status, exc.reason, close=True)

    def _rejected(self, exc: ProtocolError) -> None:
        settings = self.proxy.settings
        self.proxy.metrics.request_done(settings.direction, settings.upstream, exc.status, 0.0, 0, 0)
        self.proxy.metrics.error(settings.direction, settings.upstream, exc.code)
        self.proxy.log_rejected(exc.status, exc.reason, self.peer_ip)

    # -- reading from downstream ---------------------------------------------------------------------------
    async def _next_head(self) -> RequestHead | None:
        """The next request head, or None when the connection should close (EOF or a drain)."""
        reader = self.reader
        event = reader.next_event()
        if event is not None:
            return event  # a pipelined request already parsed
        drain = self.proxy.drain
        self.deadline = trio.current_time() + self.timeouts.idle
        self.waiting_for = IDLE
        waker = self.waker
        while True:
            in_head = reader.in_head
            if in_head and self.waiting_for == IDLE:
                self.deadline = trio.current_time() + self.timeouts.request_headers
                self.waiting_for = HEAD
            if not in_head:
                # Between requests a drain closes the connection. It wakes this wait only while it still waits:
                # bytes already received are a request to serve (with Connection: close), never to drop.
                if drain.draining:
                    return None
                drain.idle(waker)
            try:
                if self.pending:
                    data, self.pending = self.pending, b""
                else:
                    data = await self.stream.receive_some(READ_SIZE)
            except STREAM_ERRORS:
                return None
            finally:
                drain.busy(waker)
            if not data:
                if in_head:
                    raise ProtocolError(400, "connection closed mid-request")
                return None
            reader.feed(data)
            event = reader.next_event()
            if event is not None:
                return event

    async def body_event(self) -> object:
        """The next request body event (bytes, Trailers or END), reading more from downstream as needed. The
        caller keeps the connection's deadline (waiting_for BODY), which bounds a stalled body."""
        reader = self.reader
        event = reader.next_event()
        while event is None:
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except STREAM_ERRORS:
                raise DownstreamGone("client connection lost mid-request") from None
            if not data:
                raise DownstreamGone("client closed mid-request")
            reader.feed(data)
            event = reader.next_event()
        return event

    # -- the exchange's side -------------------------------------------------------------------------------
    def response_begins(self, ex: Exchange) -> None:
        """The response (the upstream's or the mesh's own) is going downstream: from now on a stall of
        timeouts.idle ends the exchange, and nothing else may answer the request."""
        ex.response_started = True
        self.waiting_for = STALL

    def client_left(self) -> bool:
        """An HTTP/1.1 client that leaves is seen as DownstreamGone instead."""
        return False

    def finish(self, head: RequestHead, ex: Exchange, start: float) -> None:
        record(self, head, ex, start)

    async def stream_response(self, head: RequestHead, response: ResponseHead, conn: Upstream, ex: Exchange) -> bool:
        proxy = self.proxy
        headers = response.headers
        keep_alive = head.keep_alive and not proxy.drain.draining
        if head.upgrade is not None:  # the upstream declined the upgrade: what follows is the next request
            self.pending = self.reader.resume() + self.pending
        chunked_out = False
        if response.content_length is not None:
            headers.append((b"content-length", b"%d" % response.content_length))
        elif response.chunked or response.until_close:
            if head.http10:
                keep_alive = False  # close-delimited to an HTTP/1.0 client
            else:
                chunked_out = True
                headers.append((b"transfer-encoding", b"chunked"))
        if not keep_alive:
            headers.append((b"connection", b"close"))
        elif head.http10:
            headers.append((b"connection", b"keep-alive"))
        out = [http1.response_head_bytes(response.status, response.reason, headers)]
        downstream = self.stream
        idle = self.timeouts.idle
        complete = not response.has_body
        if complete:
            conn.next_event()  # END
        self.response_begins(ex)
        while not complete:
            event = conn.next_event()
            if event is None:
                if out:
                    self.deadline = trio.current_time() + idle
                    await downstream.send_all(b"".join(out))
                    out = []
                self.deadline = trio.current_time() + idle
                try:
                    await conn.read_more()
                except (ProtocolError, UpstreamLost) as exc:
                    conn.close()
                    raise MeshError(502, exc.reason, "upstream_reset") from None
                continue
            if event is END:
                if chunked_out:
                    out.append(http1.last_chunk_bytes())
                complete = True
            elif type(event) is Trailers:
                if chunked_out:
                    out.append(http1.last_chunk_bytes(event.headers))
                    chunked_out = False
            else:
                ex.tx += len(event)
                out.append(http1.chunk_bytes(event) if chunked_out else event)
        if out:
            self.deadline = trio.current_time() + idle
            await downstream.send_all(b"".join(out))
        return keep_alive

    async def upgraded(self, head: RequestHead, response: ResponseHead, conn: Upstream, ex: Exchange) -> bool:
        """After a 101, the two connections become one opaque byte stream; both close when it ends."""
        assert isinstance(conn, UpstreamConnection)
        ex.response_started = True
        self.deadline = INF  # the splice keeps its own idle timeout
        downstream = self.stream
        first_down = http1.response_head_bytes(response.status, response.reason, response.headers)
        await downstream.send_all(first_down + conn.upgraded_data)
        pending_up = self.reader.upgraded_data or b""
        try:
            if pending_up:
                await conn.stream.send_all(pending_up)
            rx, tx = await splice(downstream, conn.stream, idle_timeout=self.timeouts.idle)
            ex.rx += rx + len(pending_up)
            ex.tx += tx
        finally:
            conn.close()
            self.upstream = None
        return False

    async def send_informational(self, response: ResponseHead) -> None:
        """Pass a 1xx head (e.g. 100 Continue) on to the client."""
        await self.stream.send_all(http1.response_head_bytes(response.status, response.reason, response.headers))

    # -- answering errors ----------------------------------------------------------------------------------
    def _keep_alive_after_answer(self, head: RequestHead, ex: Exchange) -> bool:
        """Whether the connection can carry another request after the mesh answered this one itself: only if
        the request body was read entirely."""
        if not ex.request_done and not head.has_body and head.upgrade is None:
            ex.request_done = self.reader.next_event() is END
        return head.keep_alive and ex.request_done and not self.proxy.drain.draining

    async def send_mesh_error(self, status: int, reason: str, head: RequestHead, ex: Exchange) -> bool:
        """Answer a mesh error; the connection stays open only if the request body was read entirely."""
        keep_alive = self._keep_alive_after_answer(head, ex)
        ex.status = status
        self.response_begins(ex)  # whatever happens next, this request has had its one answer
        self.deadline = trio.current_time() + self.timeouts.idle
        grpc = is_grpc(head.headers)
        return await self._send_error(status, reason, close=not keep_alive, grpc=grpc) and keep_alive

    async def send_response(self, status: int, headers: Headers, body: bytes, head: RequestHead, ex: Exchange) -> bool:
        """Answer with a response the mesh makes (a direct response, a redirect)."""
        keep_alive = self._keep_alive_after_answer(head, ex)
        ex.status = status
        ex.tx += len(body)
        self.response_begins(ex)
        self.deadline = trio.current_time() + self.timeouts.idle
        if head.method == b"HEAD":
            body = b""
        try:
            await self.stream.send_all(http1.simple_response(status, body, headers, close=not keep_alive))
        except STREAM_ERRORS:
            return False
        return keep_alive

    async def _refuse_http2(self, reason: str) -> None:
        """Answer an HTTP/2 client in its own protocol: SETTINGS, then GOAWAY HTTP_1_1_REQUIRED with the reason,
        which tells it to come back over HTTP/1.1 (an HTTP/1.1 error page would be garbage to it)."""
        session = H2Session(client_side=False, limits=H2Limits(), clock=trio.current_time)
        data = session.initiate()
        session.goaway(ErrorCodes.HTTP_1_1_REQUIRED, reason)
        try:
            await self.stream.send_all(data + session.data_to_send())
        except STREAM_ERRORS:
            pass

    async def _send_error(self, status: int, reason: str, *, close: bool, grpc: bool = False) -> bool:
        """Send a response the mesh makes itself, with `x-mesh-error`; False if the client is gone. To a gRPC
        request: HTTP 200 with `grpc-status` and `grpc-message` (see mesh.errors)."""
        if grpc:
            response = http1.simple_response(200, b"", grpc_error_headers(status, reason), close=close)
        else:
            headers = [(b"x-mesh-error", reason.encode()), (b"content-type", b"text/plain; charset=utf-8")]
            response = http1.simple_response(status, f"{reason}\n".encode(), headers, close=close)
        try:
            await self.stream.send_all(response)
        except STREAM_ERRORS:
            return False
        return True


class _IdleWake:
    """What a connection registers with the drain while it waits for its next request: the drain wakes that wait
    (ClosedResourceError) only if it is still waiting. A receive that has already returned bytes, even to a task
    not yet resumed, is not interrupted, so a request that arrived is served, never dropped."""

    __slots__ = ("deadline", "stream")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.deadline = INF

    def expire(self) -> None:
        trio.lowlevel.notify_closing(self.stream.socket)
