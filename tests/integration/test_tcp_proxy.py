"""`tcp` protocol through a real sidecar pair: a line-echo protocol with half-close."""

from __future__ import annotations

import socket


def test_line_echo_with_half_close(mesh, backend) -> None:
    port, _, _ = mesh.pair(backend["tcp"], protocol="tcp")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"one\ntwo\n")
        received = b""
        while received != b"one\ntwo\n":
            piece = sock.recv(100)
            assert piece, f"connection closed after {received!r}"
            received += piece
        sock.shutdown(socket.SHUT_WR)  # half-close: the app answers "bye" only after seeing our EOF
        rest = b""
        while True:
            piece = sock.recv(100)
            if not piece:
                break
            rest += piece
        assert rest == b"bye\n"
