"""The mesh hop's transports: plaintext, or mutual TLS with the peer's SPIFFE identity checked after the handshake."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol

import structlog
import trio

from mesh.errors import MeshError
from mesh.identity import IdentitySource
from mesh.spiffe import Authorizer
from mesh.stream import FastStream
from mesh.tls import TlsHandshakeError, TlsStream, tls_accept, tls_connect

log = structlog.get_logger("mesh.transport")

Stream = FastStream | TlsStream


def _detach(stream: trio.SocketStream) -> socket.socket:
    trio_sock = stream.socket
    return socket.socket(trio_sock.family, trio_sock.type, trio_sock.proto, fileno=trio_sock.detach())


class Acceptor(Protocol):
    """Turns an accepted TCP connection into the proxy's stream (plaintext or mTLS), or refuses it (None)."""

    async def accept(self, stream: trio.SocketStream) -> Accepted | None: ...


@dataclass(frozen=True)
class Accepted:
    """A downstream connection ready for the proxy, with the caller's verified identity (mTLS only)."""

    stream: Stream
    peer_identity: str | None
    allowed: bool = True
    rule: str = ""


class PlainAccept:
    """Plaintext listener: the connection is used as it is."""

    async def accept(self, stream: trio.SocketStream) -> Accepted | None:
        return Accepted(FastStream(_detach(stream)), None)


class MutualTlsAccept:
    """mTLS listener: the caller must present a certificate of the mesh; its SPIFFE ID is then authorised.

    A failed handshake is logged with its reason and the connection closed (None is returned); nothing
    reaches the application. An authenticated caller whom the policy refuses is returned with
    `allowed=False`, so that HTTP callers get a 403 naming the rule (TCP callers are simply closed)."""

    def __init__(self, identity: IdentitySource, authorizer: Authorizer, *, handshake_timeout: float) -> None:
        self.identity = identity
        self.authorizer = authorizer
        self.handshake_timeout = handshake_timeout

    async def accept(self, stream: trio.SocketStream) -> Accepted | None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = ""
        sock = _detach(stream)
        current = self.identity.current
        if current is None:
            log.warning("mTLS connection refused: this sidecar has no usable certificate", peer=peer)
            sock.close()
            return None
        with trio.move_on_after(self.handshake_timeout) as scope:
            try:
                tls = await tls_accept(sock, current.server_context)
            except TlsHandshakeError as exc:
                log.warning("mTLS handshake refused", peer=peer, reason=exc.reason)
                return None
        if scope.cancelled_caught:  # tls_accept closed the socket when it was cancelled
            log.warning("mTLS handshake refused", peer=peer, reason="handshake timed out")
            return None
        identity = tls.peer_identity
        if identity is None:
            log.warning("mTLS caller refused", peer=peer, reason="certificate has no single spiffe:// URI SAN")
            tls.close()
            return None
        allowed, rule = self.authorizer.check(identity)
        if not allowed:
            log.warning("mTLS caller denied", peer=peer, caller=identity, rule=rule)
        return Accepted(tls, identity, allowed, rule)


@dataclass(frozen=True)
class UpstreamTls:
    """How to reach one upstream over mTLS: our identity, the peer's expected SPIFFE ID and the SNI."""

    identity: IdentitySource
    expected_id: str
    server_name: str


async def secure(sock: socket.socket, upstream_tls: UpstreamTls | None, *, http2: bool = False) -> Stream:
    """Turn a connected socket into the mesh hop's stream; MeshError 502 with the reason if TLS fails. With
    `http2`, ALPN offers h2 (the caller reads the choice from `selected_alpn_protocol()`), else http/1.1 only.

    The peer's identity is checked against the expected SPIFFE ID before any request byte is written,
    and a failure never falls back to plaintext."""
    if upstream_tls is None:
        return FastStream(sock)
    current = upstream_tls.identity.current
    if current is None:
        sock.close()
        raise MeshError(502, "no usable certificate for mutual TLS")
    try:
        context = current.client_context if http2 else current.client_context_http1
        stream = await tls_connect(sock, context, server_hostname=upstream_tls.server_name)
    except TlsHandshakeError as exc:
        raise MeshError(502, f"upstream TLS handshake failed: {exc.reason}") from None
    if stream.peer_identity != upstream_tls.expected_id:
        got = stream.peer_identity or "no SPIFFE ID"
        stream.close()
        raise MeshError(502, f"upstream identity mismatch: expected {upstream_tls.expected_id}, got {got}")
    return stream
