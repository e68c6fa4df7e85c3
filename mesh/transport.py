"""The mesh hop's transports: plaintext, or mutual TLS with the peer's SPIFFE identity checked after the handshake."""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from typing import Protocol

import structlog
import trio

from mesh.errors import MeshError
from mesh.identity import IdentitySource
from mesh.metrics import Metrics
from mesh.spiffe import Authorizer, svid_identity
from mesh.stream import FastStream
from mesh.tls import TlsHandshakeError, TlsStream, tls_accept, tls_connect

log = structlog.get_logger("mesh.transport")

Stream = FastStream | TlsStream


def _detach(stream: trio.SocketStream) -> socket.socket:
    trio_sock = stream.socket
    return socket.socket(trio_sock.family, trio_sock.type, trio_sock.proto, fileno=trio_sock.detach())


def _address(sock: socket.socket | trio.socket.SocketType) -> str:
    """The peer's "host:port" for the logs ("" if the socket has none)."""
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return ""
    return f"{host}:{port}"


class Acceptor(Protocol):
    """Turns an accepted TCP connection into the proxy's stream (plaintext or mTLS), or refuses it (None)."""

    async def accept(self, stream: trio.SocketStream) -> Accepted | None: ...


@dataclass(frozen=True)
class Accepted:
    """A downstream connection ready for the proxy, with the caller's verified identity and the SHA-256 of its
    certificate (hex, for x-forwarded-client-cert), both for mTLS only."""

    stream: Stream
    peer_identity: str | None
    allowed: bool = True
    rule: str = ""
    cert_hash: str = ""


class PlainAccept:
    """Plaintext listener: the connection is used as it is."""

    async def accept(self, stream: trio.SocketStream) -> Accepted | None:
        return Accepted(FastStream(_detach(stream)), None)


class MutualTlsAccept:
    """mTLS listener: the caller must present a certificate of the mesh, an X.509-SVID, in a full handshake (no
    resumed session); its SPIFFE ID is then authorised.

    A refused handshake is logged with its reason, counted in `metrics` (mesh_tls_refused_total, direction
    "inbound") and the connection closed (None is returned); nothing reaches the application. An authenticated
    caller whom the policy refuses is returned with `allowed=False`, so that HTTP callers get a 403 naming the rule
    (TCP callers are simply closed)."""

    def __init__(
        self,
        identity: IdentitySource,
        authorizer: Authorizer,
        *,
        handshake_timeout: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.identity = identity
        self.authorizer = authorizer
        self.handshake_timeout = handshake_timeout
        self.metrics = metrics

    def _refused(self, refusal: str, reason: str, peer: str) -> None:
        log.warning("mTLS handshake refused", peer=peer, reason=reason, refusal=refusal)
        if self.metrics is not None:
            self.metrics.tls_refused("inbound", refusal)

    async def accept(self, stream: trio.SocketStream) -> Accepted | None:
        peer = _address(stream.socket)
        sock = _detach(stream)
        current = self.identity.current
        if current is None:
            log.warning("mTLS connection refused: this sidecar has no usable certificate", peer=peer)
            if self.metrics is not None:
                self.metrics.tls_refused("inbound", "no_certificate")
            sock.close()
            return None
        with trio.move_on_after(self.handshake_timeout) as scope:
            try:
                tls = await tls_accept(sock, current.server_context)
            except TlsHandshakeError as exc:
                self._refused(exc.refusal, exc.reason, peer)
                return None
        if scope.cancelled_caught:  # tls_accept closed the socket when it was cancelled
            self._refused("handshake_timeout", "handshake timed out", peer)
            return None
        der = tls.socket.getpeercert(binary_form=True)
        try:
            identity = svid_identity(der)
        except ValueError as exc:
            self._refused("not_svid", str(exc), peer)
            tls.close()
            return None
        allowed, rule = self.authorizer.check(identity)
        if not allowed:
            log.warning("mTLS caller denied", peer=peer, caller=identity, rule=rule)
        return Accepted(tls, identity, allowed, rule, hashlib.sha256(der or b"").hexdigest())


@dataclass(frozen=True)
class UpstreamTls:
    """How to reach one upstream over mTLS: our identity, the peer's expected SPIFFE ID and the SNI; refusals are
    counted in `metrics` (mesh_tls_refused_total, direction "outbound")."""

    identity: IdentitySource
    expected_id: str
    server_name: str
    metrics: Metrics | None = None

    def refused(self, refusal: str, reason: str, peer: str) -> None:
        log.warning("mTLS upstream refused", upstream=self.server_name, peer=peer, reason=reason, refusal=refusal)
        if self.metrics is not None:
            self.metrics.tls_refused("outbound", refusal)


async def secure(sock: socket.socket, upstream_tls: UpstreamTls | None, *, http2: bool = False) -> Stream:
    """Turn a connected socket into the mesh hop's stream; MeshError 502 with the reason if TLS fails. With
    `http2`, ALPN offers h2 (the caller reads the choice from `selected_alpn_protocol()`), else http/1.1 only.

    The peer must present an X.509-SVID in a full handshake (no resumed session) and be the expected SPIFFE ID,
    all checked before any request byte is written; a failure never falls back to plaintext. The MeshError's code
    says what failed: "no_certificate" (we have none to present), "tls_failed" (the handshake), "tls_identity"
    (the peer is not who it must be: another SPIFFE ID, a leaf that is not an X.509-SVID, a resumed session)."""
    if upstream_tls is None:
        return FastStream(sock)
    peer = _address(sock)
    current = upstream_tls.identity.current
    if current is None:
        upstream_tls.refused("no_certificate", "this sidecar has no usable certificate", peer)
        sock.close()
        raise MeshError(502, "no usable certificate for mutual TLS", "no_certificate")
    try:
        context = current.client_context if http2 else current.client_context_http1
        stream = await tls_connect(sock, context, server_hostname=upstream_tls.server_name)
    except TlsHandshakeError as exc:
        upstream_tls.refused(exc.refusal, exc.reason, peer)
        if exc.refusal == "handshake_failed":
            raise MeshError(502, f"upstream TLS handshake failed: {exc.reason}", "tls_failed") from None
        raise MeshError(502, f"upstream identity refused: {exc.reason}", "tls_identity") from None
    try:
        identity = svid_identity(stream.socket.getpeercert(binary_form=True))
    except ValueError as exc:
        stream.close()
        upstream_tls.refused("not_svid", str(exc), peer)
        raise MeshError(502, f"upstream identity refused: {exc}", "tls_identity") from None
    if identity != upstream_tls.expected_id:
        stream.close()
        reason = f"identity mismatch: expected {upstream_tls.expected_id}, got {identity}"
        upstream_tls.refused("identity_mismatch", reason, peer)
        raise MeshError(502, f"upstream {reason}", "tls_identity")
    return stream
