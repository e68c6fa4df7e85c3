"""Small independent HTTP/1.1 clients for integration tests (h11 and raw sockets, not the mesh's own codec)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

import h11


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str] = field(default_factory=dict)

    def json(self) -> object:
        return json.loads(self.body)


class Client:
    """One keep-alive client connection speaking h11."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.conn = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        target: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | Iterable[bytes] = b"",
        chunked: bool = False,
        trailers: Iterable[tuple[str, str]] = (),
        sink: bool = False,
    ) -> Response:
        hs = [("host", "test"), *headers]
        if chunked:
            hs.append(("transfer-encoding", "chunked"))
        elif isinstance(body, bytes) and (body or method in ("POST", "PUT")):
            hs.append(("content-length", str(len(body))))
        self._send(h11.Request(method=method, target=target, headers=hs))
        pieces = [body] if isinstance(body, bytes) else body
        for piece in pieces:
            if piece:
                self._send(h11.Data(data=piece))
        self._send(h11.EndOfMessage(headers=list(trailers)))
        return self.read_response(sink=sink)

    def read_response(self, *, sink: bool = False) -> Response:
        """Read one response; with sink=True the body is counted, not kept (its length is in `body`)."""
        head = None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = self._next()
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                if sink:
                    size += len(event.data)
                else:
                    chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                response = Response(
                    head.status_code,
                    {k.decode(): v.decode() for k, v in head.headers},
                    b"%d" % size if sink else b"".join(chunks),
                    {k.decode(): v.decode() for k, v in event.headers},
                )
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return response
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("connection closed before the response was complete")

    def _send(self, event: object) -> None:
        data = self.conn.send(event)
        if data:
            self.sock.sendall(data)

    def _next(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
                continue
            return event


def request(port: int, method: str, target: str, **kwargs: object) -> Response:
    with Client(port) as client:
        return client.request(method, target, **kwargs)  # type: ignore[arg-type]


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes; returns everything received."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = []
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            received.append(piece)
    return b"".join(received)


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:100]
    return int(raw[9:12])


def header_of(raw: bytes, name: str) -> str | None:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def backend_stats(port: int) -> dict:
    return request(port, "GET", "/__stats").json()  # type: ignore[return-value]


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed `sock` (EOF or reset); waits up to `timeout` seconds for it."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
