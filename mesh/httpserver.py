"""An HTTP listener's connections: the transport's accept, then HTTP/2 (preface or ALPN h2) or HTTP/1.1 served."""

from __future__ import annotations

import trio

from mesh.h1server import H1Downstream
from mesh.h2server import H2Downstream
from mesh.proxy import READ_SIZE, HttpProxy
from mesh.stream import STREAM_ERRORS

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class HttpServer:
    """Serves the connections of one HTTP listener with `proxy`: each is accepted by the proxy's acceptor
    (plaintext, or mTLS with the caller's identity), then served as HTTP/2 when the client opened with the
    preface (plaintext) or ALPN agreed on h2 (TLS), else as HTTP/1.1."""

    def __init__(self, proxy: HttpProxy) -> None:
        self.proxy = proxy

    def __repr__(self) -> str:
        return f"<HttpServer {self.proxy!r}>"

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one downstream connection until it closes; the listener closes `stream` afterwards."""
        proxy = self.proxy
        accepted = await proxy.acceptor.accept(stream)
        if accepted is None:
            return  # refused at the TLS handshake; the acceptor logged why
        settings, metrics = proxy.settings, proxy.metrics
        initial = b""
        # One request-header timeout from here covers protocol detection and, on HTTP/2, the first request head.
        head_deadline = trio.current_time() + settings.timeouts.request_headers
        if accepted.peer_identity is None:  # plaintext: the client may speak HTTP/2 with prior knowledge
            initial = await _first_bytes(accepted.stream, head_deadline)
            if initial is None:
                metrics.protocol_detected(settings.direction, settings.upstream, "none")
                accepted.stream.close()
                return
            # A preface cut short (the deadline passed, or the client closed) is HTTP/2's to answer.
            http2 = initial.startswith(H2_PREFACE) or H2_PREFACE.startswith(initial)
        else:  # TLS: ALPN decided
            http2 = accepted.stream.selected_alpn_protocol() == "h2"  # type: ignore[union-attr]
        metrics.protocol_detected(settings.direction, settings.upstream, "http2" if http2 else "http1")
        metrics.connection_opened(settings.direction, settings.upstream)
        try:
            if http2:
                await H2Downstream(proxy, accepted, initial, head_deadline).serve()
            else:
                await H1Downstream(proxy, accepted, initial).serve()
        finally:
            accepted.stream.close()
            metrics.connection_closed(settings.direction, settings.upstream)


async def _first_bytes(stream: trio.abc.Stream, deadline: float) -> bytes | None:
    """The client's first bytes, enough to tell the HTTP/2 preface from HTTP/1.1 (or part of the preface, if
    `deadline` passed first); None if it sent nothing by `deadline` or closed."""
    data = b""
    with trio.move_on_at(deadline):
        try:
            while True:
                chunk = await stream.receive_some(READ_SIZE)
                if not chunk:
                    return data or None
                data += chunk
                if len(data) >= len(H2_PREFACE) or not H2_PREFACE.startswith(data):
                    return data
        except STREAM_ERRORS:
            return None
    return data or None
