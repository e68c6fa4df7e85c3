"""The last layer: the request to its destination cluster under the deadline, with retries and hedges (rule 2)."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
import trio
from h2.errors import ErrorCodes

from mesh.cluster import Cluster, Subset, Upstream
from mesh.config import HashOn
from mesh.deadline import DEADLINE_HEADER, GRPC_TIMEOUT, format_deadline_ms, format_grpc_timeout
from mesh.endpoint import Endpoint
from mesh.errors import MeshError, UpstreamLost, is_grpc, request_timeout
from mesh.h1upstream import UpstreamConnection
from mesh.http1 import ProtocolError
from mesh.message import END, Headers, RequestHead, ResponseHead, Trailers
from mesh.pipeline.exchange import BODY, REQUEST, Downstream, DownstreamGone, Exchange
from mesh.retry import (
    CONNECT_FAILURE,
    IDEMPOTENT,
    PER_TRY_TIMEOUT,
    RESET,
    STATUS,
    RetryPolicy,
    grpc_status,
    parse_retry_after,
)
from mesh.stream import STREAM_ERRORS
from mesh.telemetry.tracer import TrySpan
from mesh.timers import INF

log = structlog.get_logger("mesh.forward")


class Forward:
    """Sends each request to an endpoint of `cluster` (of its `subset`) and streams the response back.

    Built once per destination of a route (or per listener without routes): the cluster (breaker, balancer,
    outlier state, pool) is shared by every route that sends there; the timeouts, retry policy, hash policy
    and response header changes are the route's. The request timeout (`request_timeout`; 0: none) starts when
    the request body has been forwarded and covers connecting, retries and waiting for the response head; while
    a body streams, and once the response streams, a stall longer than `idle_timeout` ends it. The caller's
    deadline (`ex.caller_deadline`) bounds everything."""

    __slots__ = (
        "cluster",
        "connect_timeout",
        "hash_on",
        "label",
        "outbound",
        "request_timeout",
        "response_changes",
        "retry",
        "subset",
    )

    def __init__(
        self,
        cluster: Cluster,
        *,
        outbound: bool,
        request_timeout: float,
        connect_timeout: float,
        retry: RetryPolicy | None,
        subset: Subset = (),
        label: str = "",
        hash_on: HashOn | None = None,
        response_changes: Callable[[Headers], None] | None = None,
    ) -> None:
        self.cluster = cluster
        self.subset = subset
        self.label = label  # the destination as metrics and logs name it ("" on a listener without routes)
        self.outbound = outbound  # the mesh deadline header is sent on the mesh hop only
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.retry = retry
        self.hash_on = hash_on if hash_on is not None else cluster.hash_on
        self.response_changes = response_changes

    def __repr__(self) -> str:
        return f"<Forward {self.label or self.cluster.name} retry={self.retry!r}>"

    async def __call__(self, side: Downstream, head: RequestHead, ex: Exchange) -> bool:
        if self.label:
            ex.destination = self.label
        # The body's first bytes are read before the request takes anything of the cluster's: a client that
        # trickles its body then holds only its own connection, not an upstream connection or breaker slot.
        body, body_complete = ex.prebuffered or await prebuffer(side, head, ex, self.retry)
        cluster = self.cluster
        limit = cluster.breaker.admit_request()
        if limit is not None:
            raise MeshError(503, f"circuit open ({limit})", "circuit_open")
        try:
            return await self._tries(side, head, ex, body, body_complete)
        finally:
            cluster.breaker.request_done()

    def request_deadline(self, ex: Exchange) -> float:
        """The deadline once the request body has been forwarded (or read whole): the request timeout from now,
        never later than the caller's deadline."""
        timeout = self.request_timeout
        if not timeout:
            return ex.caller_deadline
        return min(ex.caller_deadline, trio.current_time() + timeout)

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
        self, headers: Headers, grpc_timeout: int, deadline: float, now: float, again: bool = False
    ) -> Headers:
        """One try's headers (`headers`, changed in place): the deadline headers carry what is left of the budget
        at this moment (for a body still streaming, only the caller's deadline: the request timeout has not
        started). `again`: an earlier try wrote them already. MeshError if nothing is left."""
        if deadline != INF:
            left = deadline - now
            if left <= 0:
                raise request_timeout()
            if self.outbound:  # the mesh deadline: appended by the first try, replaced by every later one
                value = (DEADLINE_HEADER, format_deadline_ms(left))
                if again:  # an earlier try's is among the last few headers (trace headers may follow it)
                    for i in range(len(headers) - 1, max(len(headers) - 8, -1), -1):
                        if headers[i][0] is DEADLINE_HEADER:
                            headers[i] = value
                            break
                    else:
                        headers.append(value)
                else:
                    headers.append(value)
            if grpc_timeout >= 0:
                headers[grpc_timeout] = (GRPC_TIMEOUT, format_grpc_timeout(left))
        return headers

    async def _tries(
        self, side: Downstream, head: RequestHead, ex: Exchange, body: list[bytes], body_complete: bool
    ) -> bool:
        """Send the request to an endpoint, and again to others while the retry policy allows (DESIGN rule 2)."""
        cluster = self.cluster
        retry = self.retry
        subset = self.subset
        headers = head.headers
        grpc_timeout = ex.grpc_timeout
        if body_complete:
            deadline = self.request_deadline(ex)
            side.deadline = deadline
            side.waiting_for = REQUEST
        else:  # the request timeout starts when the pump has forwarded the body; until then its progress counts
            deadline = ex.caller_deadline
            side.deadline = min(deadline, trio.current_time() + side.timeouts.idle)
            side.waiting_for = BODY
        # A body can be sent again only if all of it is here; an upgrade is never repeated.
        resendable = body_complete and head.upgrade is None
        if retry is not None:
            resendable = (
                resendable
                and (not body or sum(map(len, body)) <= retry.max_body_bytes)
                and (retry.all_methods or head.method in IDEMPOTENT)
            )
        now = trio.current_time()
        if cluster.budget is not None:
            cluster.budget.deposit(now)
        hash_key = self._hash_key(head, self.hash_on) if self.hash_on else None
        hedge_after = None
        if cluster.hedging is not None and resendable and head.method in IDEMPOTENT and not head.expect_continue:
            hedge_after = cluster.hedge_delay()
        tried: list[Endpoint] = []
        refused: list[Endpoint] = []  # identity checks failed: deterministic, never tried again
        failed: _TryFailed | None = None
        while True:
            endpoint = cluster.pick(hash_key, tried, subset)
            if failed is not None and endpoint in refused:
                raise failed.error  # every other endpoint was tried too
            ex.endpoint = str(endpoint)
            ex.status = 0
            ex.head_at = 0.0
            self._try_headers(headers, grpc_timeout, deadline, now, bool(tried))
            trace = ex.trace
            span = trace.start_try(headers, len(tried)) if trace is not None else None
            cluster.started(endpoint)
            sent_at = now
            judged = True
            try_error = ""  # why this try gave no answer the client gets (its span's error)
            try:
                if not body_complete:
                    return await self._streaming_try(side, head, body, endpoint, ex)
                if hedge_after is not None and not tried:
                    conn, response, endpoint, sent_at = await self._race(
                        side, head, body, endpoint, hedge_after, ex, hash_key, deadline, span
                    )
                elif retry is None or not retry.per_try_timeout:
                    conn, response = await self._send_for_head(side, head, body, endpoint, ex)
                else:
                    conn, response = await self._per_try(side, head, body, endpoint, ex, deadline, retry)
                if retry is not None and resendable:
                    why = None
                    if response.status in retry.statuses:
                        why = f"status_{response.status}"
                    elif (
                        not response.has_body  # a gRPC error is a "trailers-only" response: a head and nothing else
                        and response.status == 200
                        and retry.grpc_statuses
                        and (code := grpc_status(response.headers)) in retry.grpc_statuses
                        and is_grpc(headers)
                    ):
                        why = f"grpc_{int(code or b'0')}"
                    if why is not None:
                        pause = self._retry_pause(retry, STATUS, head, len(tried), deadline, response)
                        if pause is not None:
                            conn.close()
                            side.upstream = None
                            retry.count(why)
                            raise _TryFailed(MeshError(response.status, ""), STATUS)
                if response.upgrade:
                    if head.upgrade is None or not isinstance(conn, UpstreamConnection):
                        conn.close()
                        raise MeshError(
                            502, "upstream switched protocols without an upgrade request", "invalid_response"
                        )
                    return await side.upgraded(head, response, conn, ex)
                return await self._respond(side, head, response, conn, ex, None)
            except _TryFailed as exc:
                failed = exc
                try_error = exc.error.reason or f"status {exc.error.status}, retried"
                if exc.reason != STATUS:
                    pause = None
                    if exc.error.code == "tls_identity":
                        refused.append(endpoint)
                    if refused and not cluster.has_other(refused, subset):
                        pass  # a certificate or identity that failed its check fails it again: no retry to it
                    elif exc.never_ran or resendable:
                        pause = self._retry_pause(retry, exc.reason, head, len(tried), deadline, None, exc.never_ran)
                    if pause is None:
                        raise exc.error from None
                    assert retry is not None
                    retry.count(exc.reason)
            except MeshError as exc:
                judged = exc.code != "circuit_open"  # a local limit says nothing about the endpoint
                try_error = exc.reason
                raise
            except DownstreamGone:
                judged = False  # the client left: says nothing about the endpoint
                raise
            except trio.Cancelled:
                # A deadline that passed counts against the endpoint; a client that reset its stream (a cancelled
                # gRPC call) or the drain deadline says nothing about it.
                judged = not (side.client_left() or side.proxy.drain.cutting)
                raise
            finally:
                # An outcome for the balancer's latency view and for outlier detection: a 5xx, or no response
                # at all (refused, reset, timed out), counts against the endpoint.
                ok = 0 < ex.status < 500 and ex.head_at > 0.0
                latency = (ex.head_at or trio.current_time()) - sent_at
                cluster.finished(endpoint, latency, ok, judged=judged)
                if ok and cluster.latency is not None:
                    cluster.latency.add(latency)
                if span is not None and trace is not None and not span.ended:
                    trace.end_try(span, str(endpoint), ex.status, try_error)
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

    async def _respond(
        self,
        side: Downstream,
        head: RequestHead,
        response: ResponseHead,
        conn: Upstream,
        ex: Exchange,
        pump: BodyPump | None,
    ) -> bool:
        """Stream the response downstream, then hand the upstream back; True if the downstream stays open."""
        if self.response_changes is not None:
            self.response_changes(response.headers)
        keep_alive = await side.stream_response(head, response, conn, ex)
        if not await self._hand_back(side, response, conn, ex, pump):
            return False
        return keep_alive and ex.request_done

    async def _race(
        self,
        side: Downstream,
        head: RequestHead,
        body: list[bytes],
        first: Endpoint,
        hedge_after: float,
        ex: Exchange,
        hash_key: bytes | None,
        deadline: float,
        span: TrySpan | None = None,
    ) -> tuple[Upstream, ResponseHead, Endpoint, float]:
        """A hedged try: to `first` now and, if it has not answered after `hedge_after` seconds, the same request
        to another endpoint (paid from the retry budget). The first response head wins; the other try is
        cancelled and its connection closed; a failed try lets the other one finish. Returns the winner's
        connection, head, endpoint and send time; if every try failed, raises the first one's failure. The
        caller accounts the endpoint returned (or `first` on failure) to the cluster; this accounts the rest."""
        cluster = self.cluster
        hedges = cluster.hedges
        assert hedges is not None
        tries = [_Hedge(first, ex, trio.current_time(), list(head.headers))]
        tries[0].span = span
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
                one.response = await self._response_head(side, head, one.conn, one.ex, informational=False)
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
                    hedge = self._hedge(first, hash_key, head.headers, ex.grpc_timeout, deadline, ex)
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
                if one.span is not None and ex.trace is not None:  # each try is a span of its own
                    error = one.failure.error.reason if one.failure else "" if one is winner else "cancelled"
                    ex.trace.end_try(one.span, str(one.endpoint), one.ex.status, error)
        if winner is None:
            failure = tries[0].failure
            assert failure is not None
            raise failure
        assert winner.conn is not None and winner.response is not None
        side.upstream = winner.conn
        if winner is not tries[0]:
            hedges["won"] += 1
            ex.endpoint, ex.status, ex.head_at = winner.ex.endpoint, winner.ex.status, winner.ex.head_at
        return winner.conn, winner.response, winner.endpoint, winner.sent_at

    def _hedge(
        self,
        first: Endpoint,
        hash_key: bytes | None,
        headers: Headers,
        grpc_timeout: int,
        deadline: float,
        ex: Exchange,
    ) -> _Hedge | None:
        """The hedged try to launch, counted as started; None when there is no other endpoint, no time left or
        no budget. Never raises: it runs inside the race's nursery."""
        cluster = self.cluster
        assert cluster.hedges is not None and cluster.budget is not None
        try:
            second = cluster.pick(hash_key, [first], self.subset)
        except MeshError:  # discovery lost every endpoint meanwhile
            return None
        if second.key == first.key:
            return None
        now = trio.current_time()
        hedge = _Hedge(second, Exchange(), now, list(headers))
        hedge.ex.endpoint = str(second)
        try:
            self._try_headers(hedge.headers, grpc_timeout, deadline, now, True)
        except MeshError:  # the deadline has passed; the sweeper is about to answer
            return None
        if not cluster.budget.withdraw():
            return None
        cluster.hedges["sent"] += 1
        cluster.started(second)
        if ex.trace is not None:
            hedge.span = ex.trace.start_try(hedge.headers, 1)
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

    async def _connect(self, endpoint: Endpoint, http1: bool = False) -> Upstream:
        try:
            return await self.cluster.connect(endpoint, timeout=self.connect_timeout, http1=http1)
        except MeshError as exc:
            if exc.status == 503:  # circuit open: a local limit, not a failure of the endpoint
                raise
            raise _TryFailed(exc, CONNECT_FAILURE, never_ran=True) from None

    async def _per_try(
        self,
        side: Downstream,
        head: RequestHead,
        body: list[bytes],
        endpoint: Endpoint,
        ex: Exchange,
        deadline: float,
        retry: RetryPolicy,
    ) -> tuple[Upstream, ResponseHead]:
        """`_send_for_head` within the per-try timeout; its expiry is a failed try (`per_try_timeout`)."""
        with trio.CancelScope(deadline=min(deadline, trio.current_time() + retry.per_try_timeout)) as scope:
            result = await self._send_for_head(side, head, body, endpoint, ex)
        if not scope.cancelled_caught:
            return result
        if side.upstream is not None:
            side.upstream.close()
            side.upstream = None
        if trio.current_time() >= deadline:
            raise request_timeout()
        raise _TryFailed(MeshError(504, "upstream per-try timeout", "per_try_timeout"), PER_TRY_TIMEOUT)

    async def _send_for_head(
        self, side: Downstream, head: RequestHead, body: list[bytes], endpoint: Endpoint, ex: Exchange
    ) -> tuple[Upstream, ResponseHead]:
        # A pooled connection may have been closed by the upstream in the instant before our write. Such a
        # request is sent once more on a new connection when it is idempotent (Go's and httpcore's rule).
        replayable = head.method in IDEMPOTENT
        http1 = head.upgrade is not None
        conn = self.cluster.take_idle(endpoint, http1=http1)
        replayed = False
        while True:
            reused = conn is not None
            if conn is None:
                conn = await self._connect(endpoint, http1)
            conn.requests += 1
            side.upstream = conn
            ex.forwarded = True
            try:
                try:
                    await conn.send_request(head, head.headers, body, True, ex.trailers)
                except STREAM_ERRORS:
                    raise UpstreamLost("upstream connection lost while sending the request") from None
                return conn, await self._response_head(side, head, conn, ex)
            except UpstreamLost as lost:
                # An HTTP/2 peer that refused the stream (REFUSED_STREAM, or above its GOAWAY) never processed it.
                refused = lost.never_ran or getattr(conn, "error_code", None) == ErrorCodes.REFUSED_STREAM
                conn.close()
                side.upstream = conn = None
                if replayed or not ((reused and replayable) or refused):
                    raise _TryFailed(MeshError(502, lost.reason, "upstream_reset"), RESET, never_ran=refused) from None
                replayed = True
                log.debug("retrying on a new connection", upstream=self.cluster.name, endpoint=ex.endpoint)

    async def _streaming_try(
        self, side: Downstream, head: RequestHead, body: list[bytes], endpoint: Endpoint, ex: Exchange
    ) -> bool:
        """Send a request whose body is still arriving, streaming the rest as the response comes back."""
        http1 = head.upgrade is not None
        conn = self.cluster.take_idle(endpoint, http1=http1)
        if conn is None:
            conn = await self._connect(endpoint, http1)
        conn.requests += 1
        side.upstream = conn
        pump = BodyPump(side, conn, ex, self)
        ex.forwarded = True
        try:
            await conn.send_request(head, head.headers, body, False)
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
                response = await self._response_head(side, head, conn, ex)
                if response.upgrade:
                    if head.upgrade is None or not isinstance(conn, UpstreamConnection):
                        conn.close()
                        raise MeshError(
                            502, "upstream switched protocols without an upgrade request", "invalid_response"
                        )
                    keep_alive = await side.upgraded(head, response, conn, ex)
                else:
                    keep_alive = await self._respond(side, head, response, conn, ex, pump)
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
        self, side: Downstream, head: RequestHead, conn: Upstream, ex: Exchange, *, informational: bool = True
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
                    await side.send_informational(event)
                continue
            break
        ex.status = event.status
        ex.head_at = trio.current_time()
        return event

    async def _hand_back(
        self, side: Downstream, response: ResponseHead, conn: Upstream, ex: Exchange, pump: BodyPump | None
    ) -> bool:
        """After a complete response: return the upstream connection to the pool if the exchange left it clean,
        else close it. False if the upstream answered before the request body ended (the client must not reuse
        its connection either)."""
        side.deadline = INF
        if pump is not None and not pump.finished:
            if pump.body_read:
                # The whole body came from downstream; its last bytes are being handed to the upstream.
                with trio.move_on_after(side.timeouts.idle):
                    await pump.done.wait()
            if not pump.finished:  # the upstream answered before the request body ended
                side.upstream = None
                conn.close()
                return False
        reusable = response.keep_alive and not response.until_close and ex.request_done
        side.upstream = None
        self.cluster.release(conn, reusable=reusable)
        return True


async def prebuffer(
    side: Downstream, head: RequestHead, ex: Exchange, retry: RetryPolicy | None
) -> tuple[list[bytes], bool]:
    """The request body as far as it is read before the first try, and True if that is all of it: the whole of a
    small body that a retry may send again, else at most `limits.request_buffer` bytes. Nothing more is read for
    a request that waits for 100 Continue, an upgrade, or gRPC (whose streams may wait for responses before they
    send more). The result is kept in `ex.prebuffered` for the layers after the one that asked."""
    body, complete = available_body(side, head, ex)
    if not complete:
        if retry is not None and _worth_buffering(head, retry.max_body_bytes):
            want = INF
        elif head.expect_continue or head.upgrade is not None or is_grpc(head.headers):
            want = 0
        else:
            want = side.limits.request_buffer
        if ex.rx < want:
            complete = await _buffer_body(side, ex, body, want)
    ex.prebuffered = (body, complete)
    return body, complete


def available_body(side: Downstream, head: RequestHead, ex: Exchange) -> tuple[list[bytes], bool]:
    """Request body already received (raw pieces; trailers go to `ex.trailers`); True if that is all of it."""
    reader = side.reader
    if not head.has_body:
        if reader.next_event() is END:
            ex.request_done = True
        return [], ex.request_done
    out: list[bytes] = []
    while (event := reader.next_event()) is not None:
        if event is END:
            ex.request_done = True
            return out, True
        if type(event) is Trailers:
            ex.trailers = event.headers
            reader.next_event()  # END follows trailers
            ex.request_done = True
            return out, True
        assert isinstance(event, bytes)
        ex.rx += len(event)
        out.append(event)
    return out, False


async def _buffer_body(side: Downstream, ex: Exchange, body: list[bytes], want: float) -> bool:
    """Read more of the request body into `body` until it ends or `want` bytes are here; True if it ended.
    Each piece must come within timeouts.idle (and the caller's deadline)."""
    caller_deadline = ex.caller_deadline
    idle = side.timeouts.idle
    side.waiting_for = BODY
    while ex.rx < want:
        side.deadline = min(caller_deadline, trio.current_time() + idle)
        event = await side.body_event()
        if event is END:
            ex.request_done = True
            return True
        if type(event) is Trailers:
            ex.trailers = event.headers
            side.reader.next_event()  # END follows trailers
            ex.request_done = True
            return True
        assert isinstance(event, bytes)
        ex.rx += len(event)
        body.append(event)
    return False


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

    __slots__ = ("conn", "endpoint", "ex", "failed", "failure", "headers", "response", "sent_at", "span")

    def __init__(self, endpoint: Endpoint, ex: Exchange, sent_at: float, headers: Headers) -> None:
        self.endpoint = endpoint
        self.ex = ex
        self.sent_at = sent_at
        self.headers = headers
        self.conn: Upstream | None = None
        self.response: ResponseHead | None = None
        self.failure: _TryFailed | None = None
        self.failed = trio.Event()
        self.span: TrySpan | None = None  # its client span, when the request is traced

    def fail(self, failure: _TryFailed) -> None:
        self.failure = failure
        self.failed.set()


class BodyPump:
    """Copies the rest of a streaming request body from downstream to the upstream, in its own task.

    It never raises: a failure is kept in `error` and ends the pump, which the exchange then inspects."""

    __slots__ = ("body_read", "conn", "done", "downstream", "error", "ex", "finished", "forward")

    def __init__(self, downstream: Downstream, conn: Upstream, ex: Exchange, forward: Forward) -> None:
        self.downstream = downstream
        self.conn = conn
        self.ex = ex
        self.forward = forward
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
                if down.waiting_for == BODY:  # progress keeps the exchange alive until the body is through
                    down.deadline = min(caller_deadline, trio.current_time() + idle)
                event = await down.body_event()
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
            if down.waiting_for == BODY:  # the body is through: now the request timeout runs
                down.deadline = self.forward.request_deadline(ex)
                down.waiting_for = REQUEST
        except (DownstreamGone, ProtocolError) as exc:
            self.error = exc
            self.conn.close()  # the upstream must not see a request that ended early as complete
        except (*STREAM_ERRORS, UpstreamLost):
            # The upstream stopped reading (it may already be answering); the response decides the outcome.
            self.error = MeshError(502, "upstream connection lost while sending the request body", "upstream_reset")
        finally:
            self.done.set()
