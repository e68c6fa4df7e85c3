"""UpstreamConnection.idle_and_open on real sockets: what makes an idle pooled connection unusable."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from mesh.discovery import Endpoint
from mesh.h1upstream import UpstreamConnection


def connection() -> tuple[UpstreamConnection, socket.socket, socket.socket]:
    ours, peer = socket.socketpair()
    stream = SimpleNamespace(socket=ours)
    return UpstreamConnection(stream, Endpoint("127.0.0.1", 1), None), ours, peer  # type: ignore[arg-type]


def test_an_idle_connection_is_open_until_the_peer_writes() -> None:
    conn, ours, peer = connection()
    with ours, peer:
        assert conn.idle_and_open() and conn.idle_and_open()  # asked twice: the same answer
        peer.send(b"HTTP/1.1 408 Request Timeout\r\n\r\n")  # unsolicited bytes: not a clean idle connection
        assert not conn.idle_and_open()


def test_an_idle_connection_the_peer_closed_is_not_reused() -> None:
    conn, ours, peer = connection()
    with ours:
        assert conn.idle_and_open()
        peer.close()
        assert not conn.idle_and_open()


def test_a_connection_whose_socket_is_closed_is_not_reused() -> None:
    conn, ours, peer = connection()
    with peer:
        assert conn.idle_and_open()
        ours.close()  # poll answers POLLNVAL for an fd that is no longer open
        assert not conn.idle_and_open()
