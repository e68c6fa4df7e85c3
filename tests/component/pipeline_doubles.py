"""Test doubles for the pipeline's layers, each tested alone: a scripted downstream (`ScriptedSide`), a scripted
upstream at the neutral-exchange level (`ScriptedUpstream`), a real Cluster that hands those out
(`ScriptedCluster`), a recording inner layer (`RecordingLayer`), and `serve_like_codec`, which runs an exchange
with a sweeper and answers an expired deadline as the codecs do."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import structlog
import trio

from mesh.cluster import Cluster
from mesh.config import BalancerSettings, Limits, PoolSettings, Timeouts
from mesh.endpoint import Endpoint, EndpointSet
from mesh.errors import MeshError, UpstreamLost
from mesh.http1 import ProtocolError
from mesh.listener import Drain
from mesh.log import AccessLog
from mesh.message import END, Headers, RequestHead, ResponseHead, Trailers
from mesh.metrics import Metrics
from mesh.pipeline.exchange import IDLE, STALL, DownstreamGone, Exchange, answer_expired, record, serve_exchange
from mesh.proxy import HttpProxySettings
from mesh.timers import INF, Sweeper
from mesh.transport import Accepted
from mesh.watch import Watch

# -- requests and responses --------------------------------------------------------------------------------------


def request(
    method: bytes = b"GET",
    target: bytes = b"/",
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    body: bytes | None = None,
    chunked: bool = False,
    authority: bytes = b"api",
    mesh_headers: Iterable[tuple[bytes, bytes]] = (),
    keep_alive: bool = True,
) -> RequestHead:
    """A request head as a codec hands it over; `body` gives its length (None: no body), `chunked` an unknown one."""
    has_body = body is not None or chunked
    return RequestHead(
        method=method,
        target=target,
        http10=False,
        headers=[(b"host", authority), *headers],
        mesh_headers=list(mesh_headers),
        keep_alive=keep_alive,
        has_body=has_body,
        chunked=chunked,
        content_length=None if chunked or body is None else len(body),
        expect_continue=False,
        upgrade=None,
        authority=authority,
    )


def response_head(
    status: int = 200,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    has_body: bool = True,
    content_length: int | None = None,
    keep_alive: bool = True,
    until_close: bool = False,
) -> ResponseHead:
    return ResponseHead(
        status=status,
        reason=b"",
        headers=list(headers),
        keep_alive=keep_alive,
        chunked=has_body and content_length is None and not until_close,
        content_length=content_length,
        until_close=until_close,
        has_body=has_body,
        informational=100 <= status < 200 and status != 101,
        upgrade=status == 101,
    )


def response(
    status: int = 200,
    headers: Iterable[tuple[bytes, bytes]] = (),
    body: bytes = b"",
    *,
    trailers: Headers | None = None,
    keep_alive: bool = True,
    until_close: bool = False,
) -> list[object]:
    """The response events an upstream delivers: head, body, trailers, END."""
    has_body = bool(body) or trailers is not None or until_close
    length = len(body) if has_body and trailers is None and not until_close else None
    head = response_head(
        status, headers, has_body=has_body, content_length=length, keep_alive=keep_alive, until_close=until_close
    )
    events: list[object] = [head]
    if body:
        events.append(body)
    if trailers is not None:
        events.append(Trailers(trailers))
    events.append(END)
    return events


def header(headers: Headers, name: bytes) -> bytes | None:
    """The last value of `name`, or None."""
    found = [value for n, value in headers if n == name]
    return found[-1] if found else None


# -- the upstream ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delay:
    """Script step: the response pauses this long (trio.sleep: the autojump clock skips it)."""

    seconds: float


@dataclass(frozen=True)
class WaitFor:
    """Script step: the response waits for a trio.Event the test sets (a close() meanwhile does not end it)."""

    event: trio.Event


@dataclass(frozen=True)
class AwaitRequestEnd:
    """Script step: the response waits until the whole request body (send_end or end=True) arrived."""


@dataclass(frozen=True)
class Cut:
    """Script step: the connection ends. Before any response byte: UpstreamLost (`never_ran` as an HTTP/2
    REFUSED_STREAM says); after some: ProtocolError 502 upstream_reset."""

    never_ran: bool = False


_STEPS = (Delay, WaitFor, AwaitRequestEnd, Cut)


class ScriptedUpstream:
    """An upstream connection (or stream) at the neutral exchange: records the request it was sent and plays the
    scripted response. With the script played out and no END, it waits for ever (an upstream that never answers)."""

    multiplexed = False

    def __init__(self, script: Iterable[object] = (), *, send_fails: bool = False) -> None:
        self.script: deque[object] = deque(script)
        self.send_fails = send_fails
        self.endpoint: Endpoint | None = None
        self.requests = 0
        self.error_code: int | None = None
        self.head: RequestHead | None = None  # as sent: its headers are the ones passed to send_request
        self.body: list[bytes] = []
        self.trailers: Headers | None = None
        self.request_ended = trio.Event()
        self.request_sent = trio.Event()
        self.sent_at: float | None = None
        self.answered_at: float | None = None  # when the response head was delivered
        self.closed = False
        self._closed = trio.Event()
        self._wake = trio.Event()  # set by send_end and close: what _wait_request_end waits for
        self._events: deque[object] = deque()
        self._delivered = False

    def __repr__(self) -> str:
        return f"<ScriptedUpstream {self.endpoint} closed={self.closed}>"

    async def send_request(
        self, head: RequestHead, headers: Headers, body: list[bytes], end: bool, trailers: Headers | None = None
    ) -> None:
        await trio.lowlevel.checkpoint()
        if self.send_fails or self.closed:
            raise trio.BrokenResourceError("scripted: connection lost while sending")
        self.head = replace(head, headers=list(headers))
        self.body = list(body)
        self.sent_at = trio.current_time()
        self.request_sent.set()
        if end:
            self.trailers = trailers
            self.request_ended.set()
            self._wake.set()

    async def send_body(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise trio.ClosedResourceError
        self.body.append(data)

    async def send_end(self, trailers: Headers | None = None) -> None:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise trio.ClosedResourceError
        self.trailers = trailers
        self.request_ended.set()
        self._wake.set()

    def next_event(self) -> object | None:
        return self._events.popleft() if self._events else None

    async def read_more(self) -> None:
        script = self.script
        while script:
            self._check_open()
            step = script.popleft()
            if type(step) is Delay:
                await trio.sleep(step.seconds)
            elif type(step) is WaitFor:
                await step.event.wait()
            elif type(step) is AwaitRequestEnd:
                await self._wait_request_end()
            elif type(step) is Cut:
                self.close()
                self._raise_lost(step.never_ran)
            else:  # response events: deliver this one and those right behind it
                if type(step) is ResponseHead and not step.informational:
                    self.answered_at = trio.current_time()
                self._events.append(step)
                while script and not isinstance(script[0], _STEPS):
                    self._events.append(script.popleft())
                self._delivered = True
                return
        await self._closed.wait()  # an upstream that never answers: until the proxy closes it
        self._check_open()

    def _raise_lost(self, never_ran: bool = False) -> None:
        if not self._delivered:
            raise UpstreamLost("scripted: upstream closed before responding", never_ran=never_ran)
        raise ProtocolError(502, "scripted: upstream closed mid-response", "upstream_reset")

    def _check_open(self) -> None:
        if self.closed:
            self._raise_lost()

    async def _wait_request_end(self) -> None:
        """Wait for the end of the request body; a close() meanwhile ends the wait as a lost connection. (No
        nursery here: a Cancelled from one would reach the proxy wrapped in an ExceptionGroup, which no real
        upstream does.)"""
        while not self.request_ended.is_set():
            self._check_open()
            self._wake = trio.Event()
            await self._wake.wait()
        self._check_open()

    def close(self) -> None:
        self.closed = True
        self._closed.set()
        self._wake.set()


class ScriptedCluster:
    """A real mesh.cluster.Cluster (balancer, breaker, budget, subsets, outlier state) whose connections are
    ScriptedUpstreams: `connects` gives, per connect in order (a list) or per endpoint (a dict), a ScriptedUpstream,
    a script for one, or an exception the connect raises. `released` records (upstream, reusable)."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        endpoints: Sequence[Endpoint],
        connects: Sequence[object] | Mapping[Endpoint, Sequence[object]],
        *,
        name: str = "api",
        policy: str = "round_robin",
        **settings: Any,
    ) -> None:
        self.cluster = Cluster(
            name,
            Watch(EndpointSet(tuple(endpoints), 0.0, "static")),
            balancer=BalancerSettings(policy=policy),  # type: ignore[arg-type]
            pool=PoolSettings(),
            connect_timeout=1.0,
            metrics=Metrics(),
            **settings,
        )
        if isinstance(connects, Mapping):
            self._by_endpoint: dict[Endpoint, deque[object]] | None = {e: deque(s) for e, s in connects.items()}
            self._in_order: deque[object] = deque()
        else:
            self._by_endpoint = None
            self._in_order = deque(connects)
        self.upstreams: list[ScriptedUpstream] = []  # handed out, in order
        self.connected: list[Endpoint] = []  # every connect asked for, in order (failed ones too)
        self.released: list[tuple[ScriptedUpstream, bool]] = []
        monkeypatch.setattr(self.cluster, "take_idle", self._take_idle)
        monkeypatch.setattr(self.cluster, "connect", self._connect)
        monkeypatch.setattr(self.cluster, "release", self._release)

    def _take_idle(self, endpoint: Endpoint, *, http1: bool = False) -> None:
        return None

    async def _connect(self, endpoint: Endpoint, *, timeout: float | None, http1: bool = False) -> ScriptedUpstream:
        await trio.lowlevel.checkpoint()
        self.connected.append(endpoint)
        queue = self._in_order if self._by_endpoint is None else self._by_endpoint.get(endpoint, deque())
        if not queue:
            raise AssertionError(f"unexpected connect to {endpoint}")
        planned = queue.popleft()
        if isinstance(planned, BaseException):
            raise planned
        upstream = planned if isinstance(planned, ScriptedUpstream) else ScriptedUpstream(planned)  # type: ignore[arg-type]
        upstream.endpoint = endpoint
        self.upstreams.append(upstream)
        return upstream

    def _release(self, conn: ScriptedUpstream, *, reusable: bool) -> None:
        self.released.append((conn, reusable))
        if not reusable:
            conn.close()


def endpoints(count: int, **meta_by_index: Mapping[str, str]) -> list[Endpoint]:
    """`count` endpoints 10.0.0.1:15000, 10.0.0.2:15000, ...; `e<i>={...}` gives endpoint i its meta."""
    return [Endpoint(f"10.0.0.{i + 1}", 15000, meta=meta_by_index.get(f"e{i}", {})) for i in range(count)]


# -- the downstream ----------------------------------------------------------------------------------------------


class FakeProxy:
    """What the layers use of mesh.proxy.HttpProxy."""

    def __init__(
        self,
        *,
        direction: str = "outbound",
        timeouts: Timeouts | None = None,
        limits: Limits | None = None,
        forwarded_proto: bytes = b"http",
    ) -> None:
        self.settings = HttpProxySettings(
            direction, "api", timeouts or Timeouts(), limits or Limits(), forwarded_proto=forwarded_proto
        )
        self.outbound = direction == "outbound"
        self.drain = Drain()
        self.metrics = Metrics()
        self.access_log = AccessLog(False, structlog.get_logger("t"))
        self.pipeline: Any = None


@dataclass
class Answer:
    """One answer the side gave its client: `kind` is "upstream" (streamed from an upstream), "mesh_error" or
    "response" (a response the mesh made: direct, redirect, gRPC fault)."""

    kind: str
    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    trailers: Headers | None = None
    reason: str = ""
    at: float = 0.0


class _Reader:
    def __init__(self, side: ScriptedSide) -> None:
        self.side = side

    def next_event(self) -> object | None:
        return self.side._arrived()


class ScriptedSide:
    """A Downstream double: the request body is `events` (already received) then whatever `send_later` adds
    (closing it with `client_gone` makes the next wait raise DownstreamGone); every answer, informational head,
    finished exchange and (waiting_for, deadline) change is recorded."""

    def __init__(
        self,
        events: Iterable[object] = (END,),
        *,
        proxy: FakeProxy | None = None,
        accepted: Accepted | None = None,
        peer_ip: bytes = b"10.1.1.1",
    ) -> None:
        self.proxy = proxy or FakeProxy()
        self.accepted = accepted or Accepted(None, None)  # type: ignore[arg-type]
        self.peer_ip = peer_ip
        self.limits = self.proxy.settings.limits
        self.timeouts = self.proxy.settings.timeouts
        self.upstream: Any = None
        self.reader = _Reader(self)
        self.exchange: tuple[RequestHead, Exchange, float] | None = None
        self.left = False
        self.timer_log: list[tuple[int, float]] = []
        self._deadline = INF
        self._waiting_for = IDLE
        self._ready: deque[object] = deque(events)
        self._later_in, self._later_out = trio.open_memory_channel[object](math.inf)
        self.answers: list[Answer] = []
        self.informational: list[ResponseHead] = []
        self.finished: list[Exchange] = []
        self.timer = trio.CancelScope()
        self.expired = False

    # -- recorded timer ---------------------------------------------------------------------------------------
    @property
    def deadline(self) -> float:
        return self._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._deadline = value
        self.timer_log.append((self._waiting_for, value))

    @property
    def waiting_for(self) -> int:
        return self._waiting_for

    @waiting_for.setter
    def waiting_for(self, value: int) -> None:
        self._waiting_for = value
        self.timer_log.append((value, self._deadline))

    def expire(self) -> None:
        self.expired = True
        self.timer.cancel()

    # -- the request body -------------------------------------------------------------------------------------
    def send_later(self, event: object) -> None:
        """One more request body event arrives from the client."""
        self._later_in.send_nowait(event)

    def client_gone(self) -> None:
        """The client goes away: waiting for more of the body raises DownstreamGone."""
        self._later_in.close()

    def _arrived(self) -> object | None:
        if self._ready:
            return self._ready.popleft()
        try:
            return self._later_out.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return None

    async def body_event(self) -> object:
        await trio.lowlevel.checkpoint()
        if self._ready:
            return self._ready.popleft()
        try:
            return await self._later_out.receive()
        except trio.EndOfChannel:
            raise DownstreamGone("client closed mid-request") from None

    # -- answers ----------------------------------------------------------------------------------------------
    async def send_informational(self, response: ResponseHead) -> None:
        self.informational.append(response)

    async def stream_response(self, head: RequestHead, response: ResponseHead, conn: Any, ex: Exchange) -> bool:
        answer = Answer("upstream", response.status, list(response.headers), at=trio.current_time())
        self.answers.append(answer)
        self.response_begins(ex)
        body = []
        if not response.has_body:
            conn.next_event()  # END
        else:
            while (event := conn.next_event()) is not END:
                if event is None:
                    try:
                        await conn.read_more()
                    except (ProtocolError, UpstreamLost) as exc:
                        conn.close()
                        raise MeshError(502, exc.reason, "upstream_reset") from None
                elif type(event) is Trailers:
                    answer.trailers = event.headers
                else:
                    assert isinstance(event, bytes)
                    ex.tx += len(event)
                    body.append(event)
        answer.body = b"".join(body)
        return head.keep_alive

    async def upgraded(self, head: RequestHead, response: ResponseHead, conn: Any, ex: Exchange) -> bool:
        self.answers.append(Answer("upgraded", response.status, list(response.headers)))
        ex.response_started = True
        return False

    def _keep_alive_after_answer(self, head: RequestHead, ex: Exchange) -> bool:
        """As HTTP/1.1 decides it: only if the whole request body was read."""
        if not ex.request_done and not head.has_body and head.upgrade is None:
            ex.request_done = self._arrived() is END
        return head.keep_alive and ex.request_done

    async def send_mesh_error(self, status: int, reason: str, head: RequestHead, ex: Exchange) -> bool:
        self.answers.append(Answer("mesh_error", status, reason=reason, at=trio.current_time()))
        keep_alive = self._keep_alive_after_answer(head, ex)
        ex.status = status
        self.response_begins(ex)
        return keep_alive

    async def send_response(self, status: int, headers: Headers, body: bytes, head: RequestHead, ex: Exchange) -> bool:
        self.answers.append(Answer("response", status, list(headers), body, at=trio.current_time()))
        keep_alive = self._keep_alive_after_answer(head, ex)
        ex.status = status
        ex.tx += len(body)
        self.response_begins(ex)
        return keep_alive

    def response_begins(self, ex: Exchange) -> None:
        ex.response_started = True
        self.waiting_for = STALL

    def client_left(self) -> bool:
        return self.left

    def finish(self, head: RequestHead, ex: Exchange, start: float) -> None:
        self.finished.append(ex)
        record(self, head, ex, start)  # type: ignore[arg-type]

    # -- for assertions ---------------------------------------------------------------------------------------
    @property
    def answer(self) -> Answer:
        """The one answer given (fails if there is not exactly one)."""
        assert len(self.answers) == 1, self.answers
        return self.answers[0]


def started(side: ScriptedSide, head: RequestHead, ex: Exchange | None = None) -> Exchange:
    """The book-keeping serve_exchange does before the first layer, for a layer called on its own."""
    ex = ex or Exchange()
    side.exchange = (head, ex, trio.current_time())
    return ex


async def serve_like_codec(side: ScriptedSide, head: RequestHead, *, tick: float = 0.05) -> bool:
    """Run `head` through `side.proxy.pipeline` as a codec does: serve_exchange under the side's timer, a sweeper
    that expires the side once its deadline passes, then answer_expired for an exchange the timer cut; the held
    upstream is closed at the end."""
    sweeper = Sweeper(tick)
    keep_alive = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sweeper.run)
        sweeper.add(side)
        try:
            with side.timer:
                keep_alive = await serve_exchange(side, head)  # type: ignore[arg-type]
            if side.timer.cancelled_caught and side.exchange is not None:
                await answer_expired(side)  # type: ignore[arg-type]
        finally:
            sweeper.discard(side)
            if side.upstream is not None:
                side.upstream.close()
                side.upstream = None
            nursery.cancel_scope.cancel()
    return keep_alive


# -- the next layer ----------------------------------------------------------------------------------------------


@dataclass
class Call:
    """What a RecordingLayer saw of one exchange, copied when it was called."""

    method: bytes
    target: bytes
    authority: bytes
    headers: Headers
    ex: Exchange
    at: float


class RecordingLayer:
    """An inner layer that records each call and returns `result`, after waiting for `gate` (if given) and
    raising what `raises` makes (if given)."""

    def __init__(
        self,
        result: bool = True,
        *,
        raises: Callable[[], BaseException] | None = None,
        gate: trio.Event | None = None,
        effect: Callable[[Any, RequestHead, Exchange], None] | None = None,
    ) -> None:
        self.result = result
        self.raises = raises
        self.gate = gate
        self.effect = effect
        self.calls: list[Call] = []
        self.returned_at: float | None = None

    async def __call__(self, side: Any, head: RequestHead, ex: Exchange) -> bool:
        self.calls.append(Call(head.method, head.target, head.authority, list(head.headers), ex, trio.current_time()))
        if self.effect is not None:
            self.effect(side, head, ex)
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        if self.raises is not None:
            raise self.raises()
        self.returned_at = trio.current_time()
        return self.result

    @property
    def call(self) -> Call:
        assert len(self.calls) == 1, self.calls
        return self.calls[0]
