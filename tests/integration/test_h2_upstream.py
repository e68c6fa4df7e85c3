"""A sidecar calling an HTTP/2 upstream (h2c) that is the h2 library on a thread: refused streams and translation."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes

from .clients import request
from .conftest import free_port, sidecar_config


class RefusingServer:
    """An h2c server that refuses the first `refuse` streams (RST_STREAM REFUSED_STREAM) and echoes the rest."""

    def __init__(self, refuse: int) -> None:
        self.refuse = refuse
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen: list[tuple[str, bytes]] = []  # (what happened to a stream, the body it carried)
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        bodies: dict[int, bytes] = {}
        with sock:
            while data := sock.recv(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        if self.refuse > 0:
                            self.refuse -= 1
                            conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                            self.seen.append(("refused", b""))
                        else:
                            bodies[event.stream_id] = b""
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        if event.stream_id in bodies:
                            bodies[event.stream_id] += event.data
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id in bodies:
                        body = bodies.pop(event.stream_id)
                        self.seen.append(("answered", body))
                        conn.send_headers(
                            event.stream_id, [(b":status", b"200"), (b"content-length", b"%d" % len(body))]
                        )
                        conn.send_data(event.stream_id, body, end_stream=True)
                sock.sendall(conn.data_to_send())


@pytest.fixture
def refusing() -> Iterator[RefusingServer]:
    server = RefusingServer(refuse=1)
    yield server
    server.close()


def test_a_refused_stream_is_retried_even_for_a_post_and_runs_once(mesh, refusing: RefusingServer) -> None:
    port = free_port()
    mesh.sidecar(
        sidecar_config(
            upstreams=[{"service": "api", "bind": f"127.0.0.1:{port}", "tls": "off", "protocol": "http2"}],
            discovery={"static": {"api": [f"127.0.0.1:{refusing.port}"]}},
        ),
        "outbound",
    )
    answer = request(port, "POST", "/orders", body=b'{"buy": 1}')  # an HTTP/1.1 client
    assert answer.status == 200 and answer.body == b'{"buy": 1}'
    assert refusing.seen == [("refused", b""), ("answered", b'{"buy": 1}')]  # the refused try never ran
