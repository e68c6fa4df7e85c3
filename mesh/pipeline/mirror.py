"""Request mirroring: a share of a route's requests is copied to another destination, whose answer is discarded."""

from __future__ import annotations

from dataclasses import replace

import structlog
import trio

from mesh.cluster import Upstream
from mesh.config import Limits, Timeouts
from mesh.message import END, Headers, RequestHead, ResponseHead
from mesh.pipeline.exchange import IDLE, STALL, Downstream, Exchange, Layer
from mesh.pipeline.forward import Forward, prebuffer
from mesh.pipeline.router import Rng, Route
from mesh.proxy import HttpProxy
from mesh.retry import RetryPolicy
from mesh.timers import INF

log = structlog.get_logger("mesh.mirror")

MAX_IN_FLIGHT = 128  # mirrored requests of one route at once; more are skipped (and counted)


class Background:
    """Where work that outlives a request runs (mirrored requests): a nursery the sidecar provides once it serves.
    Until then, and after it stops, nothing is started."""

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None

    def __repr__(self) -> str:
        return f"<Background {'running' if self.nursery is not None else 'idle'}>"


class Mirror:
    """Copies `mirror.percent` % of the route's requests to the mirror destination (`forward`, without retries)
    in the background and goes on at once: the caller never waits for the copy, and its answer is discarded. Only
    requests whose body is read whole before forwarding (up to `limits.request_buffer`) are copied; larger or
    streaming ones are not (counted in `skipped`), nor more than MAX_IN_FLIGHT at once. A copy is bounded by
    the mirror destination's request timeout."""

    __slots__ = (
        "background",
        "copied",
        "failed",
        "forward",
        "in_flight",
        "next",
        "proxy",
        "retry",
        "rng",
        "route",
        "skipped",
    )

    def __init__(
        self,
        route: Route,
        forward: Forward,
        next: Layer,
        *,
        proxy: HttpProxy,
        background: Background,
        rng: Rng,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.route = route
        self.retry = retry  # the route's own policy: the body is read ahead as far as it would read it
        self.forward = forward
        self.next = next
        self.proxy = proxy
        self.background = background
        self.rng = rng
        self.in_flight = 0
        self.copied = 0
        self.skipped = 0
        self.failed = 0

    def __repr__(self) -> str:
        return f"<Mirror {self.route.name} to {self.forward.label} → {self.next!r}>"

    def _count(self, outcome: str) -> None:
        """Count a copy here (`copied` for sent, `failed`, `skipped`) and in mesh_mirrored_requests_total."""
        if outcome == "sent":
            self.copied += 1
        elif outcome == "failed":
            self.failed += 1
        else:
            self.skipped += 1
        self.proxy.metrics.mirrored(self.route.name, self.forward.label, outcome)

    async def __call__(self, side: Downstream, head: RequestHead, ex: Exchange) -> bool:
        if self.route.mirror_to(self.rng) is not None:
            await self._copy(side, head, ex)
        return await self.next(side, head, ex)

    async def _copy(self, side: Downstream, head: RequestHead, ex: Exchange) -> None:
        nursery = self.background.nursery
        if nursery is None or self.in_flight >= MAX_IN_FLIGHT:
            self._count("skipped")
            return
        body, complete = ex.prebuffered or await prebuffer(side, head, ex, self.retry)
        if not complete:
            self._count("skipped")
            return
        copy = replace(head, headers=list(head.headers), mesh_headers=[])
        self.in_flight += 1
        nursery.start_soon(self._send, copy, list(body), ex.trailers, ex.caller_deadline)

    async def _send(self, head: RequestHead, body: list[bytes], trailers: Headers | None, deadline: float) -> None:
        forward = self.forward
        side = MirrorSide(self.proxy)
        ex = Exchange()
        ex.caller_deadline = deadline
        ex.request_done = True
        ex.prebuffered = (body, True)
        ex.trailers = trailers
        timeout = forward.request_timeout or self.proxy.settings.timeouts.request or INF
        try:
            with trio.move_on_after(timeout + forward.connect_timeout):
                await forward(side, head, ex)  # type: ignore[arg-type]  (a Downstream in what Forward uses)
            self._count("sent")
        except Exception as exc:  # a copy's failure is its own: it never reaches the caller or the sidecar
            self._count("failed")
            log.debug("mirrored request failed", route=self.route.name, destination=forward.label, error=str(exc))
        finally:
            self.in_flight -= 1
            if side.upstream is not None:
                side.upstream.close()


class MirrorSide:
    """The downstream of a mirrored request (what mesh.pipeline.forward uses of one): its body is already here,
    and its response is read and dropped."""

    __slots__ = ("deadline", "exchange", "limits", "proxy", "reader", "timeouts", "upstream", "waiting_for")

    def __init__(self, proxy: HttpProxy) -> None:
        self.proxy = proxy
        self.limits: Limits = proxy.settings.limits
        self.timeouts: Timeouts = proxy.settings.timeouts
        self.deadline = INF
        self.waiting_for = IDLE
        self.upstream: Upstream | None = None
        self.reader = _NoMoreBody()
        self.exchange: tuple[RequestHead, Exchange, float] | None = None

    async def body_event(self) -> object:
        return END

    async def send_informational(self, response: ResponseHead) -> None:
        pass

    async def stream_response(self, head: RequestHead, response: ResponseHead, conn: Upstream, ex: Exchange) -> bool:
        self.response_begins(ex)
        while (event := conn.next_event()) is not END:  # to its end, so that the connection can be reused
            if event is None:
                await conn.read_more()
        return False

    async def upgraded(self, head: RequestHead, response: ResponseHead, conn: Upstream, ex: Exchange) -> bool:
        return False

    async def send_mesh_error(self, status: int, reason: str, head: RequestHead, ex: Exchange) -> bool:
        return False

    async def send_response(self, status: int, headers: Headers, body: bytes, head: RequestHead, ex: Exchange) -> bool:
        return False

    def response_begins(self, ex: Exchange) -> None:
        ex.response_started = True
        self.waiting_for = STALL

    def client_left(self) -> bool:
        return False

    def finish(self, head: RequestHead, ex: Exchange, start: float) -> None:
        pass


class _NoMoreBody:
    """A request body already read whole."""

    def next_event(self) -> object | None:
        return None
