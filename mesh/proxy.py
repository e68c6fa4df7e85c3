"""The HTTP/1.1 reverse proxy: one downstream connection's requests forwarded to a cluster, bodies streamed."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from random import getrandbits

import structlog
import trio
from h2.errors import ErrorCodes

from mesh import http1
from mesh.cluster import Cluster, Upstream
from mesh.config import HashOn, Limits, Timeouts
from mesh.deadline import (
    DEADLINE_HEADER,
    GRPC_TIMEOUT,
    format_deadline_ms,
    format_grpc_timeout,
    parse_deadline_ms,
    parse_grpc_timeout,
)
from mesh.endpoint import Endpoint
from mesh.errors import MeshError, UpstreamLost, deadline_expired, grpc_error_headers, is_grpc, request_timeout
from mesh.h1upstream import UpstreamConnection
from mesh.http1 import (
    DEFAULT_UPGRADES,
    END,
    Http2Preface,
    ProtocolError,
    RequestHead,
    RequestReader,
    ResponseHead,
    Trailers,
)
from mesh.http2 import H2Limits, H2Session
from mesh.listener import Drain
from mesh.log import AccessLog
from mesh.metrics import Metrics
from mesh.retry import CONNECT_FAILURE, IDEMPOTENT, PER_TRY_TIMEOUT, RESET, STATUS, RetryPolicy, parse_retry_after
from mesh.stream import STREAM_ERRORS
from mesh.tcp import splice
from mesh.timers import INF, Sweeper
from mesh.transport import Accepted, Acceptor, PlainAccept, Stream

log = structlog.get_logger("mesh.proxy")

READ_SIZE = 65536
_EMPTY_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})

# What a connection is waiting for, which decides what happens when its deadline passes: the next request, the
# rest of a request head, the response head (timeouts.request), more of a response body (timeouts.idle), progress
# of a request body (timeouts.idle; timeouts.request starts when the body has been forwarded).
_IDLE, _HEAD, _REQUEST, _STALL, _BODY = range(5)


class DownstreamGone(Exception):
    """The client closed its connection before its request was complete."""


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
    """What one HTTP listener forwards with: its settings, the cluster its requests go to, the acceptor of its
    connections and the process-wide metrics, access log, drain and sweeper. Each request is forwarded to an
    endpoint of `cluster` (mesh.httpserver serves the connections: `Downstream` for HTTP/1.1, H2Downstream's
    streams for HTTP/2).

    Request and response bodies are streamed with backpressure; nothing is buffered whole (the first
    `limits.request_buffer` bytes of a body are read before the request is sent on). The request timeout
    starts when the request body has been forwarded and covers connecting, retries and waiting for the
    response head; while a body streams, and once the response streams, a stall longer than the idle
    timeout ends it. A caller's deadline (`grpc-timeout`, `x-mesh-deadline`) runs from the request head.
    Every request gets exactly one outcome: the upstream's response, a mesh error with `x-mesh-error`,
    or (when the response was cut) an aborted connection."""

    def __init__(
        self,
        settings: HttpProxySettings,
        cluster: Cluster,
        *,
        metrics: Metrics,
        access_log: AccessLog,
        drain: Drain,
        sweeper: Sweeper,
        acceptor: Acceptor | None = None,
    ) -> None:
        self.acceptor = acceptor or PlainAccept()
        self.settings = settings
        self.outbound = settings.direction == "outbound"
        self.cluster = cluster
        self.metrics = metrics
        self.access_log = access_log
        self.drain = drain
        self.sweeper = sweeper
        self.h2_limits = h2_limits(settings.limits)  # for HTTP/2 clients of this listener

    def __repr__(self) -> str:
        return f"<HttpProxy {self.settings.direction} {self.settings.upstream} {self.cluster!r}>"

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


class Exchange:
    """Book-keeping for one request: what was sent and received, for the access log and the reuse decision."""

    __slots__ = (
        "caller_deadline",
        "endpoint",
        "error_code",
        "forwarded",
        "head_at",
        "mesh_error",
        "request_done",
        "request_id",
        "response_started",
        "rx",
        "status",
        "trailers",
        "tx",
        "upstream_reading",
    )

    def __init__(self) -> None:
        self.caller_deadline = INF  # from grpc-timeout or (inbound) x-mesh-deadline: runs from the request head
        self.endpoint = ""
        self.error_code = ""  # mesh.errors.REASON_CODES, with mesh_error
        self.forwarded = False  # request bytes were handed to an upstream: the request may have run
        self.head_at = 0.0  # when the final response head arrived (trio clock); 0.0 until then
        self.mesh_error = ""
        self.request_done = False  # the whole request body was read from downstream
        self.upstream_reading = False  # a streaming body waits for the upstream to take it (not for the client)
        self.request_id = b""
        self.response_started = False  # bytes of the final response went downstream
        self.rx = 0
        self.tx = 0
        self.status = 0
        self.trailers: list[tuple[bytes, bytes]] | None = None  # of a request body read whole


class Downstream:
    """One downstream connection: a loop of request → response exchanges."""

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
        self.waiting_for = _IDLE
        self.timer = trio.CancelScope()
        self.exchange: tuple[RequestHead, Exchange, float] | None = None
        self.upstream: UpstreamConnection | None = None
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
            if not await self._exchange(head):
                return

    async def _timed_out(self) -> None:
        """The connection's deadline passed, or the drain deadline cut its exchange: answer what is due, then
        close. A request that may have reached the upstream is never answered with a timeout it did not have."""
        waiting_for = self.waiting_for
        cut = self.proxy.drain.cutting
        if self.exchange is None:  # between requests
            if waiting_for == _HEAD:
                exc = ProtocolError(503, "draining") if cut else ProtocolError(408, "request header timeout")
                self._rejected(exc)
                await self._send_error(exc.status, exc.reason, close=True)
            return
        head, ex, start = self.exchange
        if cut:
            error = _drain_error(ex)
        elif waiting_for == _BODY:
            error = self._body_stalled(ex)
        elif waiting_for == _STALL:
            error = MeshError(504, "upstream response stalled past the idle timeout", "response_stalled")
        else:
            error = request_timeout()
        ex.mesh_error = error.reason
        ex.error_code = error.code
        if not ex.response_started:
            ex.request_done = False  # whatever remains of the request body is abandoned with the connection
            await self._send_mesh_error(error.status, error.reason, head, ex)
        self._finish(head, ex, start)

    def _response_begins(self, ex: Exchange) -> None:
        """The response (the upstream's or the mesh's own) is going downstream: from now on a stall of
        timeouts.idle ends the exchange, and nothing else may answer the request."""
        ex.response_started = True
        self.waiting_for = _STALL

    def _client_left(self) -> bool:
        """The client ended the exchange itself (HTTP/2: it reset the stream); an HTTP/1.1 client that leaves is
        seen as DownstreamGone instead."""
        return False

    def _body_stalled(self, ex: Exchange) -> MeshError:
        """The error for a request body that made no progress for timeouts.idle (or outlived the caller's
        deadline while it streamed)."""
        if trio.current_time() >= ex.caller_deadline:
            return request_timeout()
        if ex.upstream_reading:
            return MeshError(504, "upstream stopped reading the request body", "response_stalled")
        return MeshError(408, "request body stalled past the idle timeout", "body_stalled")

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
        self.waiting_for = _IDLE
        waker = self.waker
        while True:
            in_head = reader.in_head
            if in_head and self.waiting_for == _IDLE:
                self.deadline = trio.current_time() + self.timeouts.request_headers
                self.waiting_for = _HEAD
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

    async def _body_event(self) -> object:
        """The next request body event (bytes, Trailers or END), reading more from downstream as needed. The
        caller keeps the connection's deadline (waiting_for _BODY), which bounds a stalled body."""
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

    def _available_body(self, head: RequestHead, ex: Exchange) -> tuple[list[bytes], bool]:
        """Request body already received (raw pieces; trailers go to `ex.trailers`); True if that is all of it."""
        if not head.has_body:
            if self.reader.next_event() is END:
                ex.request_done = True
            return [], ex.request_done
        out: list[bytes] = []
        reader = self.reader
        while (event := reader.next_event()) is not None:
            if event is END:
                ex.request_done = True
                return out, True
            if type(event) is Trailers:
                ex.trailers = event.headers
                reader.next_event()  # END follows trailers
                ex.request_done = True
                return out, True
            ex.rx += len(event)
            out.append(event)
        return out, False

    # -- one exchange --------------------------------------------------------------------------------------
    async def _exchange(self, head: RequestHead) -> bool:
        """Forward one request and its response; True if the downstream connection stays open."""
        start = trio.current_time()
        ex = Exchange()
        self.exchange = (head, ex, start)
        keep_alive = False
        drain = self.proxy.drain
        drain.active(self)  # the drain deadline answers it (see _timed_out) rather than dropping it
        try:
            keep_alive = await self._forward(head, ex, start)
        except MeshError as exc:
            ex.mesh_error = exc.reason
            ex.error_code = exc.code
            if ex.response_started:
                keep_alive = False
            else:
                keep_alive = await self._send_mesh_error(exc.status, exc.reason, head, ex)
        except ProtocolError as exc:  # the request body broke its framing or a limit mid-stream
            ex.mesh_error = exc.reason
            ex.error_code = exc.code
            if not ex.response_started:
                await self._send_error(exc.status, exc.reason, close=True, grpc=is_grpc(head.headers))
                ex.status = exc.status
        except DownstreamGone as exc:
            ex.mesh_error = str(exc)
            ex.error_code = "client_gone"
        except STREAM_ERRORS:
            if not ex.mesh_error:
                ex.mesh_error = "downstream connection lost"
                ex.error_code = "client_gone"
        finally:
            drain.finished(self)
        if self.upstream is not None:  # the exchange failed while holding it: its state is unknown
            self.upstream.close()
            self.upstream = None
        self._finish(head, ex, start)
        return keep_alive

    def _finish(self, head: RequestHead, ex: Exchange, start: float) -> None:
        """Record one exchange's outcome: metrics and the access-log event."""
        self.exchange = None
        proxy = self.proxy
        duration = trio.current_time() - start
        settings = proxy.settings
        if ex.status:
            proxy.metrics.request_done(settings.direction, settings.upstream, ex.status, duration, ex.rx, ex.tx)
        if ex.mesh_error:
            proxy.metrics.error(settings.direction, settings.upstream, ex.error_code or "other")
        if not proxy.access_log.enabled:
            return
        proxy.access_log.request(
            direction=settings.direction,
            upstream=settings.upstream,
            method=head.method.decode("latin-1"),
            authority=head.authority.decode("latin-1"),
            path=head.target.decode("latin-1"),
            status=ex.status,
            duration_s=duration,
            endpoint=ex.endpoint,
            rx=ex.rx,
            tx=ex.tx,
            mesh_error=ex.mesh_error,
            request_id=ex.request_id.decode("latin-1"),
        )

    def _upstream_headers(self, head: RequestHead, ex: Exchange) -> tuple[list[tuple[bytes, bytes]], int]:
        """The request's end-to-end headers for the upstream (the upstream codec adds its framing), and the index
        of its `grpc-timeout` (-1 if none)."""
        headers = head.headers
        xff = proto = rid = xfcc = False
        grpc_timeout = -1
        for i, (name, value) in enumerate(headers):
            first = name[0]
            if first == 120:  # b"x": only then can it be one of ours
                if name == b"x-forwarded-for":
                    headers[i] = (name, value + b", " + self.peer_ip)
                    xff = True
                elif name == b"x-forwarded-proto":
                    proto = True
                elif name == b"x-request-id":
                    rid = True
                    ex.request_id = value
                elif name == b"x-forwarded-client-cert":
                    xfcc = True
            elif first == 103 and name == GRPC_TIMEOUT:  # b"g"
                grpc_timeout = i
        inbound = not self.proxy.outbound
        if xfcc and inbound:  # only the inbound's own, from the verified certificate, may reach the app
            headers[:] = [(n, v) for n, v in headers if n != b"x-forwarded-client-cert"]
            grpc_timeout = next((i for i, (n, _) in enumerate(headers) if n == GRPC_TIMEOUT), -1)
        if not xff and self.peer_ip:
            headers.append((b"x-forwarded-for", self.peer_ip))
        if not proto:
            headers.append((b"x-forwarded-proto", self.proxy.settings.forwarded_proto))
        if not rid:
            ex.request_id = _new_request_id()
            headers.append((b"x-request-id", ex.request_id))
        accepted = self.accepted
        if accepted.peer_identity is not None:  # the caller's verified identity, for the application
            peer = accepted.peer_identity.encode()
            headers.append((b"x-mesh-peer-identity", peer))
            if inbound:  # Envoy's SANITIZE_SET: what the app sees describes the certificate this hop verified
                value = b"By=%s;Hash=%s;URI=%s" % (self.proxy.settings.identity, accepted.cert_hash.encode(), peer)
                headers.append((b"x-forwarded-client-cert", value))
        return headers, grpc_timeout

    def _caller_deadline(self, head: RequestHead, start: float, grpc_timeout: int) -> float:
        """When the caller's own budget ends, counted from the request head: its `grpc-timeout` and (inbound) its
        mesh deadline; INF if it sent neither. MeshError 504 if it is already spent: nothing is forwarded."""
        timeout = INF
        if head.mesh_headers and self.proxy.settings.direction == "inbound":
            for name, value in head.mesh_headers:
                if name == DEADLINE_HEADER and (left := parse_deadline_ms(value)) is not None:
                    timeout = min(timeout, left)
        if grpc_timeout >= 0 and (left := parse_grpc_timeout(head.headers[grpc_timeout][1])) is not None:
            timeout = min(timeout, left)
        if timeout <= 0:
            raise deadline_expired()
        return start + timeout

    def _request_deadline(self, ex: Exchange) -> float:
        """The deadline once the request body has been forwarded (or read whole): timeouts.request from now,
        never later than the caller's deadline."""
        timeout = self.timeouts.request
        if not timeout:
            return ex.caller_deadline
        return min(ex.caller_deadline, trio.current_time() + timeout)

    async def _forward(self, head: RequestHead, ex: Exchange, start: float) -> bool:
        proxy = self.proxy
        if not self.accepted.allowed:
            raise MeshError(403, f"caller {self.accepted.peer_identity} denied: {self.accepted.rule}", "denied")
        headers, grpc_timeout = self._upstream_headers(head, ex)
        ex.caller_deadline = self._caller_deadline(head, start, grpc_timeout)
        # The body's first bytes are read before the request takes anything of the cluster's: a client that
        # trickles its body then holds only its own connection, not an upstream connection or breaker slot.
        body, body_complete = await self._prebuffer(head, ex)
        cluster = proxy.cluster
        limit = cluster.breaker.admit_request()
        if limit is not None:
            raise MeshError(503, f"circuit open ({limit})", "circuit_open")
        try:
            return await self._tries(head, ex, headers, grpc_timeout, body, body_complete)
        finally:
            cluster.breaker.request_done()

    async def _prebuffer(self, head: RequestHead, ex: Exchange) -> tuple[list[bytes], bool]:
        """The request body framed for the upstream as far as it is read before the first try, and True if that
        is all of it: the whole of a small body that a retry may send again, else at most `limits.request_buffer`
        bytes. Nothing more is read for a request that waits for 100 Continue, an upgrade, or gRPC (whose streams
        may wait for responses before they send more)."""
        body, complete = self._available_body(head, ex)
        if complete:
            return body, True
        retry = self.proxy.cluster.retry
        if retry is not None and _worth_buffering(head, retry.max_body_bytes):
            want = INF
        elif head.expect_continue or head.upgrade is not None or is_grpc(head.headers):
            return body, False
        else:
            want = self.limits.request_buffer
        if ex.rx >= want:
            return body, False
        return body, await self._buffer_body(head, ex, body, want)

    def _hash_key(self, head: RequestHead, hash_on: HashOn) -> bytes | None:
        """The request's value for a consistent-hash balancer: a header, or a cookie from `cookie` headers."""
        if hash_on.header is not None:
            wanted = hash_on.header.lower().encode()
            return next((value for name, value in head.headers if name == wanted), None)
        prefix = hash_on.cookie.encode() + b"=" if hash_on.cookie else b""
        for name, value in head.headers:
            if name == b"cookie":
                for part in value.split(b";"):
                    part = part.strip()
                    if part.startswith(prefix):
                        return part[len(prefix) :]
        return None

    def _try_headers(
        self, headers: list[tuple[bytes, bytes]], grpc_timeout: int, deadline: float, now: float
    ) -> list[tuple[bytes, bytes]]:
        """One try's headers (`headers`, changed in place): the deadline headers carry what is left of the budget
        at this moment (for a body still streaming, only the caller's deadline: the request timeout has not
        started). MeshError if nothing is left."""
        if deadline != INF:
            left = deadline - now
            if left <= 0:
                raise request_timeout()
            if self.proxy.outbound:  # the mesh deadline: the last header, replaced by every later try
                value = (DEADLINE_HEADER, format_deadline_ms(left))
                if headers[-1][0] is DEADLINE_HEADER:
                    headers[-1] = value
                else:
                    headers.append(value)
            if grpc_timeout >= 0:
                headers[grpc_timeout] = (GRPC_TIMEOUT, format_grpc_timeout(left))
        return headers

    async def _tries(
        self,
        head: RequestHead,
        ex: Exchange,
        headers: list[tuple[bytes, bytes]],
        grpc_timeout: int,
        body: list[bytes],
        body_complete: bool,
    ) -> bool:
        """Send the request to an endpoint, and again to others while the retry policy allows (DESIGN rule 2)."""
        cluster = self.proxy.cluster
        retry = cluster.retry
        if body_complete:
            deadline = self._request_deadline(ex)
            self.deadline = deadline
            self.waiting_for = _REQUEST
        else:  # the request timeout starts when the pump has forwarded the body; until then its progress counts
            deadline = ex.caller_deadline
            self.deadline = min(deadline, trio.current_time() + self.timeouts.idle)
            self.waiting_for = _BODY
        # A body can be sent again only if all of it is here; an upgrade is never repeated.
        resendable = body_complete and head.upgrade is None
        if retry is not None:
            resendable = (
                resendable
                and sum(map(len, body)) <= retry.max_body_bytes
                and (retry.all_methods or head.method in IDEMPOTENT)
            )
        now = trio.current_time()
        if cluster.budget is not None:
            cluster.budget.deposit(now)
        hash_key = self._hash_key(head, cluster.hash_on) if cluster.hash_on else None
        hedge_after = None
        if cluster.hedging is not None and resendable and head.method in IDEMPOTENT and not head.expect_continue:
            hedge_after = cluster.hedge_delay()
        tried: list[Endpoint] = []
        refused: list[Endpoint] = []  # identity checks failed: deterministic, never tried again
        failed: _TryFailed | None = None
        while True:
            endpoint = cluster.pick(hash_key, tried)
            if failed is not None and endpoint in refused:
                raise failed.error  # every other endpoint was tried too
            ex.endpoint = str(endpoint)
            ex.status = 0
            ex.head_at = 0.0
            self._try_headers(headers, grpc_timeout, deadline, now)
            cluster.started(endpoint)
            sent_at = now
            judged = True
            try:
                if not body_complete:
                    return await self._streaming_try(head, headers, body, endpoint, ex)
                if hedge_after is not None and not tried:
                    conn, response, endpoint, sent_at = await self._race(
                        head, headers, body, endpoint, hedge_after, ex, hash_key, grpc_timeout, deadline
                    )
                elif retry is None or not retry.per_try_timeout:
                    conn, response = await self._send_for_head(head, headers, body, endpoint, ex)
                else:
                    conn, response = await self._per_try(head, headers, body, endpoint, ex, deadline, retry)
                if retry is not None and response.status in retry.statuses and resendable:
                    pause = self._retry_pause(retry, STATUS, head, len(tried), deadline, response)
                    if pause is not None:
                        conn.close()
                        self.upstream = None
                        retry.count(f"status_{response.status}")
                        raise _TryFailed(MeshError(response.status, ""), STATUS)
                if response.upgrade:
                    return await self._upgraded(head, response, conn, ex)
                return await self._stream_response(head, response, conn, ex, None)
            except _TryFailed as exc:
                failed = exc
                if exc.reason != STATUS:
                    pause = None
                    if exc.error.code == "tls_identity":
                        refused.append(endpoint)
                    if refused and not cluster.has_other(refused):
                        pass  # a certificate or identity that failed its check fails it again: no retry to it
                    elif exc.never_ran or resendable:
                        pause = self._retry_pause(retry, exc.reason, head, len(tried), deadline, None, exc.never_ran)
                    if pause is None:
                        raise exc.error from None
                    assert retry is not None
                    retry.count(exc.reason)
            except MeshError as exc:
                judged = exc.code != "circuit_open"  # a local limit says nothing about the endpoint
                raise
            except DownstreamGone:
                judged = False  # the client left: says nothing about the endpoint
                raise
            except trio.Cancelled:
                # A deadline that passed counts against the endpoint; a client that reset its stream (a cancelled
                # gRPC call) or the drain deadline says nothing about it.
                judged = not (self._client_left() or self.proxy.drain.cutting)
                raise
            finally:
                # An outcome for the balancer's latency view and for outlier detection: a 5xx, or no response
                # at all (refused, reset, timed out), counts against the endpoint.
                ok = 0 < ex.status < 500 and ex.head_at > 0.0
                latency = (ex.head_at or trio.current_time()) - sent_at
                cluster.finished(endpoint, latency, ok, judged=judged)
                if ok and cluster.latency is not None:
                    cluster.latency.add(latency)
            log.debug(
                "retrying",
                upstream=cluster.name,
                endpoint=ex.endpoint,
                reason=failed.error.reason or f"status {failed.error.status}",
                pause_s=round(pause, 3),
            )
            tried.append(endpoint)
            if pause > 0:
                await trio.sleep(pause)
            now = trio.current_time()

    async def _race(
        self,
        head: RequestHead,
        headers: list[tuple[bytes, bytes]],
        body: list[bytes],
        first: Endpoint,
        hedge_after: float,
        ex: Exchange,
        hash_key: bytes | None,
        grpc_timeout: int,
        deadline: float,
    ) -> tuple[Upstream, ResponseHead, Endpoint, float]:
        """A hedged try: to `first` now and, if it has not answered after `hedge_after` seconds, the same request
        to another endpoint (paid from the retry budget). The first response head wins; the other try is
        cancelled and its connection closed; a failed try lets the other one finish. Returns the winner's
        connection, head, endpoint and send time; if every try failed, raises the first one's failure. The
        caller accounts the endpoint returned (or `first` on failure) to the cluster; this accounts the rest."""
        cluster = self.proxy.cluster
        hedges = cluster.hedges
        assert hedges is not None
        tries = [_Hedge(first, ex, trio.current_time(), list(headers))]
        winner: _Hedge | None = None

        async def attempt(one: _Hedge, nursery: trio.Nursery) -> None:
            nonlocal winner
            try:
                one.conn = cluster.take_idle(one.endpoint) or await self._connect(one.endpoint)
                one.conn.requests += 1
                ex.forwarded = True
                try:
                    await one.conn.send_request(head, one.headers, body, True, ex.trailers)
                except STREAM_ERRORS:
                    raise UpstreamLost("upstream connection lost while sending the request") from None
                one.response = await self._response_head(head, one.conn, one.ex, informational=False)
                winner = one
                nursery.cancel_scope.cancel()
            except UpstreamLost as lost:
                one.fail(_TryFailed(MeshError(502, lost.reason, "upstream_reset"), RESET))
            except _TryFailed as exc:
                one.fail(exc)
            except MeshError as exc:  # an invalid response, a circuit open: not a reason to retry
                one.fail(_TryFailed(exc, "invalid"))
            finally:
                if winner is not one and one.conn is not None:
                    one.conn.close()  # failed, or cancelled while its request may be in flight

        returned = tries[0]  # the try whose outcome the caller accounts; this accounts every other one
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(attempt, tries[0], nursery)
                with trio.move_on_after(hedge_after):
                    await tries[0].failed.wait()  # a winner cancels the wait with the rest of the nursery
                if tries[0].failure is None and winner is None:
                    hedge = self._hedge(first, hash_key, headers, grpc_timeout, deadline)
                    if hedge is not None:
                        tries.append(hedge)
                        nursery.start_soon(attempt, hedge, nursery)
            if winner is not None:
                returned = winner
        finally:
            if returned is not winner and winner is not None and winner.conn is not None:
                winner.conn.close()  # cancelled from outside just after a try won: nobody will read its response
            now = trio.current_time()
            for one in tries:
                if one is not returned:  # a failure is the endpoint's; a cancelled try says nothing about it
                    cluster.finished(one.endpoint, now - one.sent_at, False, judged=one.failure is not None)
        if winner is None:
            failure = tries[0].failure
            assert failure is not None
            raise failure
        assert winner.conn is not None and winner.response is not None
        self.upstream = winner.conn
        if winner is not tries[0]:
            hedges["won"] += 1
            ex.endpoint, ex.status, ex.head_at = winner.ex.endpoint, winner.ex.status, winner.ex.head_at
        return winner.conn, winner.response, winner.endpoint, winner.sent_at

    def _hedge(
        self,
        first: Endpoint,
        hash_key: bytes | None,
        headers: list[tuple[bytes, bytes]],
        grpc_timeout: int,
        deadline: float,
    ) -> _Hedge | None:
        """The hedged try to launch, counted as started; None when there is no other endpoint, no time left or
        no budget. Never raises: it runs inside the race's nursery."""
        cluster = self.proxy.cluster
        assert cluster.hedges is not None and cluster.budget is not None
        try:
            second = cluster.pick(hash_key, [first])
        except MeshError:  # discovery lost every endpoint meanwhile
            return None
        if second.key == first.key:
            return None
        now = trio.current_time()
        hedge = _Hedge(second, Exchange(), now, list(headers))
        hedge.ex.endpoint = str(second)
        try:
            self._try_headers(hedge.headers, grpc_timeout, deadline, now)
        except MeshError:  # the deadline has passed; the sweeper is about to answer
            return None
        if not cluster.budget.withdraw():
            return None
        cluster.hedges["sent"] += 1
        cluster.started(second)
        return hedge

    def _retry_pause(
        self,
        retry: RetryPolicy | None,
        reason: str,
        head: RequestHead,
        retries_done: int,
        deadline: float,
        response: ResponseHead | None,
        never_ran: bool = False,
    ) -> float | None:
        """The pause before one more try, or None if there is to be none: no policy, no tries left, a failure
        not to retry, a Retry-After above the cap, not enough time left, or the budget spent."""
        if retry is None or retries_done >= retry.attempts:
            return None
        if not retry.wanted(reason, never_ran=never_ran, method=head.method):
            return None
        retry_after = None
        if response is not None:
            for name, value in response.headers:
                if name == b"retry-after":
                    retry_after = parse_retry_after(value, time.time())
                    break
        pause = retry.backoff(retries_done, retry_after)
        if pause is None or trio.current_time() + pause >= deadline:
            return None
        if not retry.budget.withdraw():
            return None
        return pause

    async def _buffer_body(self, head: RequestHead, ex: Exchange, body: list[bytes], want: float) -> bool:
        """Read more of the request body into `body` until it ends or `want` bytes are here; True if it ended.
        Each piece must come within timeouts.idle (and the caller's deadline)."""
        caller_deadline = ex.caller_deadline
        idle = self.timeouts.idle
        self.waiting_for = _BODY
        while ex.rx < want:
            self.deadline = min(caller_deadline, trio.current_time() + idle)
            event = await self._body_event()
            if event is END:
                ex.request_done = True
                return True
            if type(event) is Trailers:
                ex.trailers = event.headers
                self.reader.next_event()  # END follows trailers
                ex.request_done = True
                return True
            assert isinstance(event, bytes)
            ex.rx += len(event)
            body.append(event)
        return False

    async def _connect(self, endpoint: Endpoint, http1: bool = False) -> UpstreamConnection:
        try:
            return await self.proxy.cluster.connect(endpoint, timeout=self.timeouts.connect, http1=http1)
        except MeshError as exc:
            if exc.status == 503:  # circuit open: a local limit, not a failure of the endpoint
                raise
            raise _TryFailed(exc, CONNECT_FAILURE, never_ran=True) from None

    async def _per_try(
        self,
        head: RequestHead,
        headers: list[tuple[bytes, bytes]],
        body: list[bytes],
        endpoint: Endpoint,
        ex: Exchange,
        deadline: float,
        retry: RetryPolicy,
    ) -> tuple[Upstream, ResponseHead]:
        """`_send_for_head` within the per-try timeout; its expiry is a failed try (`per_try_timeout`)."""
        with trio.CancelScope(deadline=min(deadline, trio.current_time() + retry.per_try_timeout)) as scope:
            result = await self._send_for_head(head, headers, body, endpoint, ex)
        if not scope.cancelled_caught:
            return result
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if trio.current_time() >= deadline:
            raise request_timeout()
        raise _TryFailed(MeshError(504, "upstream per-try timeout", "per_try_timeout"), PER_TRY_TIMEOUT)

    async def _send_for_head(
        self, head: RequestHead, headers: list[tuple[bytes, bytes]], body: list[bytes], endpoint: Endpoint, ex: Exchange
    ) -> tuple[Upstream, ResponseHead]:
        # A pooled connection may have been closed by the upstream in the instant before our write. Such a
        # request is sent once more on a new connection when it is idempotent (Go's and httpcore's rule).
        replayable = head.method in IDEMPOTENT
        http1 = head.upgrade is not None
        conn = self.proxy.cluster.take_idle(endpoint, http1=http1)
        replayed = False
        while True:
            reused = conn is not None
            if conn is None:
                conn = await self._connect(endpoint, http1)
            conn.requests += 1
            self.upstream = conn
            ex.forwarded = True
            try:
                try:
                    await conn.send_request(head, headers, body, True, ex.trailers)
                except STREAM_ERRORS:
                    raise UpstreamLost("upstream connection lost while sending the request") from None
                return conn, await self._response_head(head, conn, ex)
            except UpstreamLost as lost:
                # An HTTP/2 peer that refused the stream (REFUSED_STREAM, or above its GOAWAY) never processed it.
                refused = lost.never_ran or getattr(conn, "error_code", None) == ErrorCodes.REFUSED_STREAM
                conn.close()
                self.upstream = conn = None
                if replayed or not ((reused and replayable) or refused):
                    raise _TryFailed(MeshError(502, lost.reason, "upstream_reset"), RESET, never_ran=refused) from None
                replayed = True
                log.debug("retrying on a new connection", upstream=self.proxy.cluster.name, endpoint=ex.endpoint)

    async def _streaming_try(
        self, head: RequestHead, headers: list[tuple[bytes, bytes]], body: list[bytes], endpoint: Endpoint, ex: Exchange
    ) -> bool:
        """Send a request whose body is still arriving, streaming the rest as the response comes back."""
        http1 = head.upgrade is not None
        conn = self.proxy.cluster.take_idle(endpoint, http1=http1)
        if conn is None:
            conn = await self._connect(endpoint, http1)
        conn.requests += 1
        self.upstream = conn
        return await self._send_streaming(head, headers, body, conn, ex)

    async def _send_streaming(
        self, head: RequestHead, headers: list[tuple[bytes, bytes]], body: list[bytes], conn: Upstream, ex: Exchange
    ) -> bool:
        pump = BodyPump(self, conn, ex)
        ex.forwarded = True
        try:
            await conn.send_request(head, headers, body, False)
        except (*STREAM_ERRORS, UpstreamLost):
            conn.close()
            raise MeshError(502, "upstream connection lost while sending the request", "upstream_reset") from None
        # Failures are raised after the nursery has closed: raised inside it they would reach the caller
        # wrapped in an ExceptionGroup, which no handler of the exchange expects.
        failure: Exception | None = None
        keep_alive = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            try:
                response = await self._response_head(head, conn, ex)
                if response.upgrade:
                    keep_alive = await self._upgraded(head, response, conn, ex)
                else:
                    keep_alive = await self._stream_response(head, response, conn, ex, pump)
            except UpstreamLost as lost:
                conn.close()
                # If the request broke off first, that is the outcome.
                failure = pump.error if pump.error is not None else MeshError(502, lost.reason, "upstream_reset")
            except Exception as exc:
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if pump.error is not None and not ex.response_started:
            raise pump.error
        return keep_alive and ex.request_done

    async def _response_head(
        self, head: RequestHead, conn: Upstream, ex: Exchange, *, informational: bool = True
    ) -> ResponseHead:
        """Read up to the final response head, passing 1xx heads downstream (if `informational`: a hedged try
        must not write downstream while another try may); UpstreamLost if nothing came."""
        while True:
            event = conn.next_event()
            if event is None:
                try:
                    await conn.read_more()
                except ProtocolError as exc:
                    conn.close()
                    cut = exc.code == "upstream_reset"
                    reason = exc.reason if cut else f"invalid response from upstream: {exc.reason}"
                    raise MeshError(502, reason, exc.code) from None
                continue
            if type(event) is not ResponseHead:
                conn.close()
                raise MeshError(502, "invalid response from upstream", "invalid_response")
            if event.informational:
                if informational and not head.http10:
                    await self._send_informational(event)
                continue
            break
        ex.status = event.status
        ex.head_at = trio.current_time()
        return event

    async def _stream_response(
        self, head: RequestHead, response: ResponseHead, conn: Upstream, ex: Exchange, pump: BodyPump | None
    ) -> bool:
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
        self._response_begins(ex)
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
        if not await self._hand_back(head, response, conn, ex, pump):
            return False
        return keep_alive and ex.request_done

    async def _hand_back(
        self, head: RequestHead, response: ResponseHead, conn: Upstream, ex: Exchange, pump: BodyPump | None
    ) -> bool:
        """After a complete response: return the upstream connection to the pool if the exchange left it clean,
        else close it. False if the upstream answered before the request body ended (the client must not reuse
        its connection either)."""
        self.deadline = INF
        if pump is not None and not pump.finished:
            if pump.body_read:
                # The whole body came from downstream; its last bytes are being handed to the upstream.
                with trio.move_on_after(self.timeouts.idle):
                    await pump.done.wait()
            if not pump.finished:  # the upstream answered before the request body ended
                self.upstream = None
                conn.close()
                return False
        reusable = response.keep_alive and not response.until_close and ex.request_done
        self.upstream = None
        self.proxy.cluster.release(conn, reusable=reusable)
        return True

    async def _upgraded(self, head: RequestHead, response: ResponseHead, conn: Upstream, ex: Exchange) -> bool:
        """After a 101, the two connections become one opaque byte stream; both close when it ends."""
        if head.upgrade is None or not isinstance(conn, UpstreamConnection):
            conn.close()
            raise MeshError(502, "upstream switched protocols without an upgrade request", "invalid_response")
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

    # -- answering errors ----------------------------------------------------------------------------------
    async def _send_mesh_error(self, status: int, reason: str, head: RequestHead, ex: Exchange) -> bool:
        """Answer a mesh error; the connection stays open only if the request body was read entirely."""
        if not ex.request_done and not head.has_body and head.upgrade is None:
            ex.request_done = self.reader.next_event() is END
        keep_alive = head.keep_alive and ex.request_done and not self.proxy.drain.draining
        ex.status = status
        self._response_begins(ex)  # whatever happens next, this request has had its one answer
        self.deadline = trio.current_time() + self.timeouts.idle
        grpc = is_grpc(head.headers)
        return await self._send_error(status, reason, close=not keep_alive, grpc=grpc) and keep_alive

    async def _send_informational(self, event: ResponseHead) -> None:
        """Pass a 1xx head (e.g. 100 Continue) on to the client."""
        await self.stream.send_all(http1.response_head_bytes(event.status, event.reason, event.headers))

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


def _drain_error(ex: Exchange) -> MeshError:
    """The answer to an exchange the drain deadline cut before its response began."""
    if ex.forwarded:
        return MeshError(
            503,
            "draining: cut by the drain deadline before the upstream answered (the request may have run)",
            "drain_cut",
        )
    return MeshError(503, "draining", "draining")


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


class _TryFailed(Exception):
    """One try got no usable response: `error` is the answer if there is no other try; `reason` is a retry reason
    of mesh.retry; `never_ran` says the request provably never reached the upstream."""

    def __init__(self, error: MeshError, reason: str, *, never_ran: bool = False) -> None:
        super().__init__(error.reason)
        self.error = error
        self.reason = reason
        self.never_ran = never_ran


def _worth_buffering(head: RequestHead, limit: int) -> bool:
    """A body of known small size is read whole before the first try, so that it can be sent again; a client
    waiting for 100 Continue, a chunked body of unknown length or a larger body is streamed instead."""
    length = head.content_length
    return length is not None and length <= limit and not head.expect_continue and head.upgrade is None


class _Hedge:
    """One try of a hedged request: where it went, when, with which headers, and what came back."""

    __slots__ = ("conn", "endpoint", "ex", "failed", "failure", "headers", "response", "sent_at")

    def __init__(self, endpoint: Endpoint, ex: Exchange, sent_at: float, headers: list[tuple[bytes, bytes]]) -> None:
        self.endpoint = endpoint
        self.ex = ex
        self.sent_at = sent_at
        self.headers = headers
        self.conn: Upstream | None = None
        self.response: ResponseHead | None = None
        self.failure: _TryFailed | None = None
        self.failed = trio.Event()

    def fail(self, failure: _TryFailed) -> None:
        self.failure = failure
        self.failed.set()


class BodyPump:
    """Copies the rest of a streaming request body from downstream to the upstream, in its own task.

    It never raises: a failure is kept in `error` and ends the pump, which the exchange then inspects."""

    __slots__ = ("body_read", "conn", "done", "downstream", "error", "ex", "finished")

    def __init__(self, downstream: Downstream, conn: Upstream, ex: Exchange) -> None:
        self.downstream = downstream
        self.conn = conn
        self.ex = ex
        self.finished = False  # the whole body reached the upstream
        self.body_read = False  # the whole body came from downstream
        self.done = trio.Event()
        self.error: Exception | None = None

    async def run(self) -> None:
        conn = self.conn
        ex = self.ex
        down = self.downstream
        idle = down.timeouts.idle
        caller_deadline = ex.caller_deadline
        try:
            while True:
                if down.waiting_for == _BODY:  # progress keeps the exchange alive until the body is through
                    down.deadline = min(caller_deadline, trio.current_time() + idle)
                event = await down._body_event()
                ex.upstream_reading = True
                if event is END:
                    self.body_read = True
                    await conn.send_end()
                elif type(event) is Trailers:
                    self.body_read = True
                    down.reader.next_event()  # END
                    await conn.send_end(event.headers)
                else:
                    ex.rx += len(event)
                    await conn.send_body(event)
                ex.upstream_reading = False
                if self.body_read:
                    break
            ex.request_done = True
            self.finished = True
            if down.waiting_for == _BODY:  # the body is through: now the request timeout runs
                down.deadline = down._request_deadline(ex)
                down.waiting_for = _REQUEST
        except (DownstreamGone, ProtocolError) as exc:
            self.error = exc
            self.conn.close()  # the upstream must not see a request that ended early as complete
        except (*STREAM_ERRORS, UpstreamLost):
            # The upstream stopped reading (it may already be answering); the response decides the outcome.
            self.error = MeshError(502, "upstream connection lost while sending the request body", "upstream_reset")
        finally:
            self.done.set()


def _request_id_prefix() -> bytes:
    raw = b"%020x" % getrandbits(80)
    return b"%s-%s-%s-%s-" % (raw[:8], raw[8:12], raw[12:16], raw[16:20])


_REQUEST_ID_PREFIX = _request_id_prefix()
_request_ids = itertools.count(getrandbits(32))


def _new_request_id() -> bytes:
    """A UUID-shaped id: 80 random bits per process, then a counter; unique without a random draw per request."""
    return b"%s%012x" % (_REQUEST_ID_PREFIX, next(_request_ids))
