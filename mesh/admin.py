"""The admin listener: liveness, readiness, Prometheus metrics, the running config and cluster state."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import structlog
import trio

from mesh import http1
from mesh.admission import Waiter, WaitingRoom
from mesh.http1 import ProtocolError, RequestHead, RequestReader
from mesh.metrics import Metrics

log = structlog.get_logger("mesh.admin")

_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"


class AdminApp:
    """Answers `GET /live`, `/ready`, `/metrics`, `/config`, `/clusters`, `/certs` and `/registration` over HTTP/1.1.

    `ready()` returns (ready, reason); `config()` returns the running config with secrets redacted;
    `clusters()` returns per-cluster endpoint state; `certs()` this sidecar's identity and trust bundle;
    `registration()` its registration in Consul. The admin listener should stay on loopback.

    Its limits keep `/live` and `/ready` answering under a flood of slow connections. A request head must be
    complete within `head_timeout` seconds of the connection beginning to wait for it (accepted, or done with its
    previous request); a response must be taken by the client within `send_timeout`. At most `max_waiting`
    connections wait for a head: one more evicts (closes) the one that has waited longest. Serve it with
    serve_tcp's `max_connections=app.max_connections`: the connections above `max_waiting` are the room for the
    requests being answered."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        ready: Callable[[], tuple[bool, str]],
        config: Callable[[], dict[str, Any]],
        clusters: Callable[[], dict[str, Any]],
        certs: Callable[[], dict[str, Any]],
        registration: Callable[[], dict[str, Any]] = lambda: {"registered": False, "reason": "not configured"},
        head_timeout: float = 5.0,
        send_timeout: float = 5.0,
        max_waiting: int = 128,
        max_connections: int = 256,
    ) -> None:
        if not 0 < max_waiting < max_connections:
            raise ValueError(
                f"max_waiting ({max_waiting}) must be positive and below max_connections ({max_connections})"
            )
        self.metrics = metrics
        self.ready = ready
        self.config = config
        self.clusters = clusters
        self.certs = certs
        self.registration = registration
        self.head_timeout = head_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self._waiting: WaitingRoom[Waiter] = WaitingRoom(max_waiting)

    def respond(self, method: bytes, target: bytes) -> tuple[int, bytes, bytes]:
        """(status, content type, body) for one request; pure, so it is testable without sockets."""
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, _TEXT, b"only GET and HEAD are served here\n"
        if path == b"/live":
            return 200, _TEXT, b"live\n"
        if path == b"/ready":
            ok, reason = self.ready()
            return (200 if ok else 503), _TEXT, (reason + "\n").encode()
        if path == b"/metrics":
            body, content_type = self.metrics.render()
            return 200, content_type.encode(), body
        if path == b"/config":
            return 200, _JSON, _json(self.config())
        if path == b"/clusters":
            return 200, _JSON, _json(self.clusters())
        if path == b"/certs":
            return 200, _JSON, _json(self.certs())
        if path == b"/registration":
            return 200, _JSON, _json(self.registration())
        return 404, _TEXT, b"not found; try /live /ready /metrics /config /clusters /certs /registration\n"

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve the requests of one connection in turn, until the client closes or asks to, or a limit is hit.

        A head begun and not finished by its deadline gets 408; a connection silent until then, evicted, or slow
        to take its response is closed without an answer. serve_tcp closes `stream` when this returns, and
        cancels this when its drain time is up."""
        reader = RequestReader(max_header_bytes=16384, max_header_count=64, max_body_bytes=0)
        try:
            while True:
                try:
                    head = await self._next_head(stream, reader)
                except ProtocolError as exc:
                    body = (exc.reason + "\n").encode()
                    await self._send(stream, http1.simple_response(exc.status, body, close=True))
                    return
                if head is None:
                    return
                status, content_type, body = self.respond(head.method, head.target)
                keep_alive = head.keep_alive and not head.has_body
                response = http1.simple_response(status, body, [(b"content-type", content_type)], close=not keep_alive)
                if head.method == b"HEAD":
                    response = response[: len(response) - len(body)]
                if not await self._send(stream, response) or not keep_alive:
                    return
        except trio.BrokenResourceError:
            pass  # the client went away

    async def _next_head(self, stream: trio.abc.Stream, reader: RequestReader) -> RequestHead | None:
        """The next request's head; None if the client closed, stayed silent, or was evicted before sending one.

        ProtocolError for a malformed head, and 408 for one begun but not complete by the deadline."""
        now = trio.current_time()
        with trio.CancelScope(deadline=now + self.head_timeout) as scope:
            waiter = Waiter(now, scope.cancel)
            for other in self._waiting.enter(waiter):
                other.evict()
            try:
                return await _read_head(stream, reader)
            finally:
                self._waiting.leave(waiter)
        if waiter.evicted:
            log.info("connection evicted", listener="admin", waited_s=round(trio.current_time() - waiter.since, 3))
            return None
        if reader.in_head:
            raise ProtocolError(408, "the request head did not arrive in time")
        return None

    async def _send(self, stream: trio.abc.Stream, data: bytes) -> bool:
        """False if the client did not take `data` within the send timeout."""
        with trio.move_on_after(self.send_timeout):
            await stream.send_all(data)
            return True
        return False


async def _read_head(stream: trio.abc.Stream, reader: RequestReader) -> RequestHead | None:
    """The next head from `reader`, reading as needed; None at EOF. The caller bounds the time it takes."""
    while True:
        event = reader.next_event()
        if isinstance(event, RequestHead):
            return event
        if event is not None:  # the END of a body-less request
            continue
        data = await stream.receive_some(16384)
        if not data:
            return None
        reader.feed(data)


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode() + b"\n"
