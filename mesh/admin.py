"""The admin listener: liveness, readiness, Prometheus metrics, the running config and cluster state."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import trio

from mesh import http1
from mesh.http1 import ProtocolError, RequestHead, RequestReader
from mesh.metrics import Metrics

_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"


class AdminApp:
    """Answers `GET /live`, `/ready`, `/metrics`, `/config`, `/clusters`, `/certs` and `/registration` over HTTP/1.1.

    `ready()` returns (ready, reason); `config()` returns the running config with secrets redacted;
    `clusters()` returns per-cluster endpoint state; `certs()` this sidecar's identity and trust bundle;
    `registration()` its registration in Consul. The admin listener should stay on loopback."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        ready: Callable[[], tuple[bool, str]],
        config: Callable[[], dict[str, Any]],
        clusters: Callable[[], dict[str, Any]],
        certs: Callable[[], dict[str, Any]],
        registration: Callable[[], dict[str, Any]] = lambda: {"registered": False, "reason": "not configured"},
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.config = config
        self.clusters = clusters
        self.certs = certs
        self.registration = registration

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

    async def handle(self, stream: trio.SocketStream) -> None:
        reader = RequestReader(max_header_bytes=16384, max_header_count=64, max_body_bytes=0)
        while True:
            try:
                head = await _read_head(stream, reader)
            except ProtocolError as exc:
                body = (exc.reason + "\n").encode()
                await stream.send_all(http1.simple_response(exc.status, body, close=True))
                return
            if head is None:
                return
            status, content_type, body = self.respond(head.method, head.target)
            keep_alive = head.keep_alive and not head.has_body
            response = http1.simple_response(status, body, [(b"content-type", content_type)], close=not keep_alive)
            if head.method == b"HEAD":
                response = response[: len(response) - len(body)]
            await stream.send_all(response)
            if not keep_alive:
                return


async def _read_head(stream: trio.SocketStream, reader: RequestReader) -> RequestHead | None:
    while True:
        event = reader.next_event()
        if isinstance(event, RequestHead):
            return event
        if event is not None:  # the END of a body-less request
            continue
        with trio.move_on_after(30) as scope:
            data = await stream.receive_some(16384)
        if scope.cancelled_caught or not data:
            return None
        reader.feed(data)


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode() + b"\n"
