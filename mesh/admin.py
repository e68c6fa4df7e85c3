"""The admin listener: liveness, readiness, metrics, config and cluster state; reload, log level, drain, shutdown."""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import structlog
import trio

from mesh import http1
from mesh.admission import Waiter, WaitingRoom
from mesh.http1 import ProtocolError, RequestHead, RequestReader
from mesh.log import RUNTIME_LEVELS
from mesh.metrics import Metrics
from mesh.reload import ReloadRefused

log = structlog.get_logger("mesh.admin")

_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_MAX_BODY_BYTES = 65536  # request bodies are read; only POST /log-level's is kept, the others are dropped
_OPERATIONS = (b"/reload", b"/log-level", b"/drain", b"/shutdown")  # POST only, from loopback clients only
_NOT_FOUND = (
    b"not found; try /live /ready /metrics /config /clusters /certs /registration, or POST "
    + b" ".join(_OPERATIONS)
    + b"\n"
)
_NOT_LOOPBACK = {"error": "admin operations are answered to loopback clients only"}


class AdminApp:
    """Answers `GET /live`, `/ready`, `/metrics`, `/config`, `/clusters`, `/certs` and `/registration`, and
    `POST /reload`, `/log-level`, `/drain` and `/shutdown`, over HTTP/1.1.

    `ready()` returns (ready, reason); `config()` returns the running config with secrets redacted;
    `clusters()` returns per-cluster endpoint state; `certs()` this sidecar's identity and trust bundle;
    `registration()` its registration in Consul. The admin listener should stay on loopback.

    `POST /reload` awaits `reload()` and answers 200 with the JSON object it returns, or 400 with
    `{"result": "refused", "errors": [...]}` when it raises ReloadRefused (the running config stays); 404 when no
    `reload` was given. Reloads run one at a time: a second `POST /reload` waits for the one running, then runs
    its own (so it reads the file as it is after the first). The reload is not shielded from cancellation (the
    admin listener's drain at shutdown cancels it): `reload()` must leave the running config whole if cancelled.
    Request bodies (on any request) are read, up to 64 KiB within `head_timeout`, and ignored but for
    `POST /log-level`'s.

    `POST /log-level` (`level=debug` in a form body or the query) calls `log_level(level)` with one of
    mesh.log.RUNTIME_LEVELS, which sets it and returns the level before; it answers 200 `{"level", "was"}`, or
    400 naming the levels allowed. `POST /drain` calls `drain()`, which starts draining the listeners and returns
    False if they were draining already; from then on `/ready` answers 503 `draining` whatever `ready()` says,
    and `POST /reload` is refused (a reload must not bring a drained listener back). `POST /shutdown` calls
    `shutdown()`, which must only begin the shutdown (in another task) and return False if one had begun. Both
    answer 202 `{"result": ..., "already": bool}`; repeating them changes nothing (`drain` and `shutdown` are
    called once at most). Any of the four not given answers 404.

    The operations (POST /reload, /log-level, /drain, /shutdown) are answered only to a loopback peer
    (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104); any other gets 403. A stream that is not a socket (a memory
    stream, in process) counts as local. Other methods on them get 405 with `Allow: POST`.

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
        reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        log_level: Callable[[str], str] | None = None,
        drain: Callable[[], bool] | None = None,
        shutdown: Callable[[], bool] | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        only: frozenset[bytes] | None = None,
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
        self.reload = reload
        self._reloading = trio.Lock()
        self.log_level = log_level
        self.drain = drain
        self.shutdown = shutdown
        self.status = status
        self.only = only  # a read-only listener (the telemetry one) answers these paths and nothing else
        self.drained = False  # POST /drain was answered: /ready says draining, reloads are refused
        self.shutting_down = False  # POST /shutdown was answered
        self.head_timeout = head_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self._waiting: WaitingRoom[Waiter] = WaitingRoom(max_waiting)

    def respond(self, method: bytes, target: bytes) -> tuple[int, bytes, bytes]:
        """(status, content type, body) for one request but a POST of an operation (see `operate`); pure, so it
        is testable without sockets."""
        path = target.split(b"?", 1)[0]
        if self.only is not None and path not in self.only:
            return 404, _TEXT, b"not found; this listener serves GET " + b" ".join(sorted(self.only)) + b"\n"
        if path in _OPERATIONS:
            return 405, _TEXT, b"only POST is served here\n"
        if method not in (b"GET", b"HEAD"):
            return 405, _TEXT, b"only GET and HEAD are served here\n"
        if path == b"/live":
            return 200, _TEXT, b"live\n"
        if path == b"/ready":
            ok, reason = (False, "draining") if self.drained else self.ready()
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
        if path == b"/status" and self.status is not None:
            return 200, _JSON, _json(self.status())
        return 404, _TEXT, _NOT_FOUND

    async def operate(self, path: bytes, query: bytes, body: bytes, peer: str | None) -> tuple[int, bytes, bytes]:
        """(status, content type, body) for a POST to one of the operations, from `peer` (its IP address; None
        when local by nature): 403 unless local or loopback."""
        if peer is not None and not is_loopback(peer):
            log.info("admin operation refused: not a loopback client", path=path.decode(), peer=peer)
            return 403, _JSON, _json(_NOT_LOOPBACK)
        if path == b"/reload":
            return await self.reload_config()
        if path == b"/log-level":
            return self.set_log_level(query, body, peer)
        if path == b"/drain":
            return self.drain_listeners()
        return self.shut_down()

    def set_log_level(self, query: bytes, body: bytes, peer: str | None = None) -> tuple[int, bytes, bytes]:
        """`POST /log-level`: the level from the query or a form body (`level=debug`)."""
        if self.log_level is None:
            return 404, _TEXT, b"log level changes not configured\n"
        given = {
            value.strip().lower()
            for part in (query, body)
            for value in parse_qs(part.decode("latin-1"), keep_blank_values=True).get("level", [])
        }
        level = given.pop() if len(given) == 1 else None
        if level not in RUNTIME_LEVELS:
            allowed = ", ".join(RUNTIME_LEVELS)
            return 400, _JSON, _json({"error": f"give level= one of {allowed}", "allowed": list(RUNTIME_LEVELS)})
        shows_warnings = RUNTIME_LEVELS.index(level) <= RUNTIME_LEVELS.index("warning")
        if not shows_warnings:  # say it while the old level may still show it
            log.warning("log level changed", to=level, peer=peer)
        was = self.log_level(level)
        if shows_warnings:
            log.warning("log level changed", to=level, was=was, peer=peer)
        return 200, _JSON, _json({"level": level, "was": was})

    def drain_listeners(self) -> tuple[int, bytes, bytes]:
        """`POST /drain`: start draining the listeners, once."""
        if self.drain is None:
            return 404, _TEXT, b"drain not configured\n"
        already = self.drained or not self.drain()
        self.drained = True
        return 202, _JSON, _json({"result": "draining", "already": already})

    def shut_down(self) -> tuple[int, bytes, bytes]:
        """`POST /shutdown`: begin the shutdown, once."""
        if self.shutdown is None:
            return 404, _TEXT, b"shutdown not configured\n"
        already = self.shutting_down or not self.shutdown()
        self.shutting_down = True
        return 202, _JSON, _json({"result": "shutting down", "already": already})

    async def reload_config(self) -> tuple[int, bytes, bytes]:
        """(status, content type, body) for `POST /reload`: the reload's outcome, once any reload running is done."""
        if self.reload is None:
            return 404, _TEXT, b"reload not configured\n"
        async with self._reloading:
            if self.drained:
                errors = ["the listeners were drained by POST /drain: restart the sidecar to serve again"]
                return 400, _JSON, _json({"result": "refused", "errors": errors})
            try:
                result = await self.reload()
            except ReloadRefused as exc:
                return 400, _JSON, _json({"result": "refused", "errors": exc.errors})
            except Exception as exc:
                log.exception("config reload failed")
                return 500, _JSON, _json({"result": "error", "errors": [f"{type(exc).__name__}: {exc}"]})
        return 200, _JSON, _json(result)

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve the requests of one connection in turn, until the client closes or asks to, or a limit is hit.

        A head begun and not finished by its deadline gets 408; a connection silent until then, evicted, or slow
        to take its response is closed without an answer. serve_tcp closes `stream` when this returns, and
        cancels this when its drain time is up."""
        reader = RequestReader(max_header_bytes=16384, max_header_count=64, max_body_bytes=_MAX_BODY_BYTES)
        peer = peer_address(stream)
        try:
            while True:
                request_body: bytes | None = b""
                try:
                    head = await self._next_head(stream, reader)
                    if head is not None and head.has_body:
                        keep = head.method == b"POST" and head.target.split(b"?", 1)[0] == b"/log-level"
                        request_body = await self._read_body(stream, reader, head, keep=keep)
                        if request_body is None:
                            return
                except ProtocolError as exc:
                    body = (exc.reason + "\n").encode()
                    await self._send(stream, http1.simple_response(exc.status, body, close=True))
                    return
                if head is None:
                    return
                path, _, query = head.target.partition(b"?")
                if path in _OPERATIONS and head.method == b"POST" and self.only is None:
                    status, content_type, body = await self.operate(path, query, request_body, peer)
                else:
                    status, content_type, body = self.respond(head.method, head.target)
                headers = [(b"content-type", content_type)]
                if status == 405:
                    headers.append((b"allow", b"POST" if path in _OPERATIONS else b"GET, HEAD"))
                response = http1.simple_response(status, body, headers, close=not head.keep_alive)
                if head.method == b"HEAD":
                    response = response[: len(response) - len(body)]
                if not await self._send(stream, response) or not head.keep_alive:
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

    async def _read_body(
        self, stream: trio.abc.Stream, reader: RequestReader, head: RequestHead, *, keep: bool
    ) -> bytes | None:
        """Read the request's body to its end: the body if `keep`, else b"" (it is dropped); None if the client
        closed first. ProtocolError (413) for a body over the limit, 408 for one not complete within `head_timeout`
        of its head."""
        if head.expect_continue and not await self._send(stream, _CONTINUE):
            return None
        kept: list[bytes] = []
        with trio.move_on_after(self.head_timeout):
            while True:
                event = reader.next_event()
                if event is http1.END:
                    return b"".join(kept)
                if keep and isinstance(event, bytes):
                    kept.append(event)
                if event is None:
                    data = await stream.receive_some(16384)
                    if not data:
                        return None
                    reader.feed(data)
        raise ProtocolError(408, "the request body did not arrive in time")

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


def peer_address(stream: trio.abc.Stream) -> str | None:
    """The IP address of the client at the other end of `stream` (a TCP stream, or a TLS one over it); None for a
    stream that is not a network socket (a Unix socket, a memory stream in process): local by nature. An address
    that cannot be had (the client is already gone) is "unknown", which is not loopback."""
    while not hasattr(stream, "socket") and hasattr(stream, "transport_stream"):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "unknown"


def is_loopback(address: str) -> bool:
    """Whether `address` is a loopback IP address: 127.0.0.0/8, ::1, or 127.x mapped into IPv6 (::ffff:127.x)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode() + b"\n"
