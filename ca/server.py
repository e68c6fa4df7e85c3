"""`mesh ca serve`: the CA's HTTPS API: serves the trust bundle, signs CSRs for the identity a caller proved."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any

import structlog
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ca import ratelimit, tokens
from ca.authority import (
    DEFAULT_LEAF_TTL,
    STATE_FILE,
    CAError,
    CertificateAuthority,
    Issued,
    fingerprint,
    format_time,
    utc_now,
    write_file,
)
from mesh import http1, spiffe
from mesh import log as mesh_log
from mesh.admission import Waiter, WaitingRoom
from mesh.config import Address, parse_address, parse_duration
from mesh.http1 import END, ProtocolError, RequestHead, RequestReader
from mesh.listener import Drain, serve_tcp
from mesh.tls import TlsHandshakeError, TlsStream, tls_accept

__all__ = ["DEFAULT_BIND", "SERVER_SERVICE", "CAServer", "ServerLimits", "run", "serve_ca"]

DEFAULT_BIND = "127.0.0.1:8400"
SERVER_SERVICE = "mesh-ca"
"""The service name in the CA server's own certificate; the API never signs it for a caller."""
RENEW_FRACTION = 0.7
"""The server certificate is re-issued once this share of its lifetime has passed (as sidecars renew theirs)."""

# As mesh.tls for the mesh hop: TLS >= 1.2 with forward secrecy and authenticated encryption only.
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
_JSON = b"application/json"
_PEM = b"application/x-pem-file"
_ENDPOINTS = "GET /v1/bundle and POST /v1/certificate"
_RECEIVE_SIZE = 16384
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1 << 20


@dataclass(frozen=True)
class ServerLimits:
    """What one client may cost: every connection has its own task, and these bound its time and memory."""

    max_connections: int = 1024
    """Connections open at once; more wait in the listen backlog."""
    max_waiting: int = 768
    """Connections the server is waiting on: in their TLS handshake, sending a request, or idle between requests.
    With this many, a new connection closes the one that has waited longest, so that slow or silent clients cannot
    lock others out. Below max_connections, which leaves room for the requests being answered."""
    handshake_timeout: float = 5.0
    head_timeout: float = 10.0
    """From accept (the TLS handshake included), or from the previous response on a keep-alive connection, until
    the request's head is complete."""
    body_timeout: float = 10.0
    """From the end of the head until the body is complete."""
    send_timeout: float = 10.0
    """A response the client does not take within this is abandoned, and its connection closed."""
    max_body_bytes: int = 65536
    max_header_bytes: int = 16384
    token_failures: int = 10
    """Failed token attempts one client address may make in a row; then each is answered 429 with Retry-After,
    without looking at the tokens, until the address may try again."""
    token_failure_interval: float = 6.0
    """Once the failures are spent, one more is allowed per this many seconds (10 a minute)."""
    max_failing_clients: int = 4096
    """Client addresses whose recent token failures are remembered; the one quiet for longest is forgotten first."""
    drain_timeout: float = 5.0
    """After SIGINT/SIGTERM, how long requests in progress may still take."""

    def __post_init__(self) -> None:
        if not 0 < self.max_waiting < self.max_connections:
            raise ValueError(
                f"max_waiting ({self.max_waiting}) must be positive and below max_connections ({self.max_connections})"
            )


# --- the CA as stored now, and the server's own certificate ---


class _Authority:
    """The CA read from its directory, and the TLS context of the server, both kept current.

    `refresh()` re-reads state.json when it has changed on disk (`mesh ca rotate` run meanwhile), and re-issues
    the server's certificate when the signing root or the bundle changed or its lifetime is 70 % gone. It runs for
    every connection and request: a stat, and rarely a few small file reads and one signature."""

    def __init__(self, directory: Path, log: Any) -> None:
        self.directory = directory
        self.log = log
        self.ca = CertificateAuthority.load(directory)
        self._stamp = self._state_stamp()
        self.context: ssl.SSLContext | None = None
        self.unavailable: str | None = None
        """Why the CA cannot sign now (it failed to issue its own certificate), or None."""
        self._built_for: tuple[bytes, int] | None = None
        self._renew_at: datetime | None = None
        self._reported: dict[str, str] = {}
        self.refresh()
        if self.context is None:
            raise CAError(f"cannot issue the CA server's own certificate: {self.unavailable}")

    def _state_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.directory / STATE_FILE)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def report(self, kind: str, problem: str | None) -> None:
        """Log a problem of one kind once, not once per request, until it changes; None: that kind is solved."""
        if problem is None:
            self._reported.pop(kind, None)
        elif self._reported.get(kind) != problem:
            self._reported[kind] = problem
            self.log.error("CA problem", problem=problem)

    def refresh(self) -> CertificateAuthority:
        """The CA as stored now; a CA directory that cannot be read keeps the last good one in use."""
        stamp = self._state_stamp()
        if stamp != self._stamp:
            try:
                self.ca = CertificateAuthority.load(self.directory)
                self._stamp = stamp
                self.report("reload", None)
                self.log.info("CA state reloaded", roots=[root.id for root in self.ca.bundle()])
            except CAError as exc:
                self.report("reload", f"cannot reload the CA; still using the last good state: {exc}")
        ca = self.ca
        now = utc_now()
        try:
            wanted = (ca.bundle_pem(now), ca.signing_root(now).id)
            if wanted != self._built_for or self._renew_at is None or now >= self._renew_at:
                self._reissue(ca, wanted, now)
        except (CAError, OSError, ssl.SSLError) as exc:
            self.unavailable = str(exc)
            self.report("issue", f"cannot issue the CA server's own certificate: {exc}")
        else:
            self.unavailable = None
            self.report("issue", None)
        return ca

    def _reissue(self, ca: CertificateAuthority, wanted: tuple[bytes, int], now: datetime) -> None:
        bundle_pem, _ = wanted
        issued = ca.issue(SERVER_SERVICE, ttl=DEFAULT_LEAF_TTL, now=now)
        self.context = _server_context(issued, bundle_pem)
        self._built_for = wanted
        not_after = issued.certificate.not_valid_after_utc
        self._renew_at = now + (not_after - now) * RENEW_FRACTION
        self.log.info(
            "server certificate issued",
            spiffe_id=issued.spiffe_id,
            root=issued.root,
            serial=f"{issued.certificate.serial_number:x}",
            not_after=_iso(not_after),
        )


def _server_context(issued: Issued, bundle_pem: bytes) -> ssl.SSLContext:
    """TLS >= 1.2, ECDHE+AEAD; a client MAY present a certificate, which must then verify against the bundle."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_IGNORE_UNEXPECTED_EOF | ssl.OP_NO_TICKET
    # Every connection is verified against the bundle of its time: no tickets in TLS 1.3 (num_tickets) or 1.2
    # (OP_NO_TICKET); a session still resumed from the server's session-ID cache is refused by mesh.tls.
    ctx.num_tickets = 0
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    assert issued.key_pem is not None  # issue() always makes a key
    # ssl loads a certificate and key only from files: they exist, 0600 in a 0700 directory, just for this call.
    with tempfile.TemporaryDirectory(prefix="mesh-ca-") as folder:
        cert_file, key_file = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        write_file(key_file, issued.key_pem, private=True)
        write_file(cert_file, issued.cert_pem)
        ctx.load_cert_chain(cert_file, key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


# --- requests and replies ---


@dataclass(frozen=True)
class _Peer:
    """The far end of one connection: its address and, if it presented one, its verified certificate."""

    address: str
    client: str
    """What token failures are counted by: ratelimit.client_key of the address."""
    identity: str | None
    certificate: bytes | None  # DER


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: bytes = _JSON
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    log: dict[str, Any] = field(default_factory=dict)
    """What the request log line adds: how the caller authenticated, who it is, why it was refused, what was signed."""


class _Refused(Exception):
    """A request answered with an error; `message` is the one sentence the caller gets (and the log line too)."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


def _error(status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None, **log: Any) -> _Reply:
    return _Reply(status, _json({"error": message}), headers=list(headers or ()), log={"error": message, **log})


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2).encode() + b"\n"


def _iso(t: datetime) -> str:
    """ISO 8601 in UTC with a Z, to the second: '2025-01-31T14:05:00Z'."""
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _header(head: RequestHead, name: bytes) -> list[bytes]:
    return [value for key, value in head.headers if key == name]


class CAServer:
    """Answers the CA's HTTP API on TLS connections; one instance serves every connection of a listener.

    `handle` is serve_tcp's connection handler: it runs the TLS handshake, then the requests of that
    connection one after another, and closes the connection. `respond` is the synchronous part that decides
    each answer, from the request, the caller's certificate and the CA as stored now."""

    def __init__(self, directory: str | os.PathLike[str], *, limits: ServerLimits, drain: Drain) -> None:
        self.directory = Path(directory)
        self.limits = limits
        self.drain = drain
        # A logger per server, bound at first use: tests capture the lines of the server they start.
        self.log = structlog.get_logger("ca.server")
        self.authority = _Authority(self.directory, self.log)
        self._waiting: WaitingRoom[Waiter] = WaitingRoom(limits.max_waiting)
        self.failures = ratelimit.FailureLimiter(
            burst=limits.token_failures, interval=limits.token_failure_interval, max_clients=limits.max_failing_clients
        )

    def __repr__(self) -> str:
        return f"<CAServer {str(self.directory)!r} trust_domain={self.authority.ca.trust_domain!r}>"

    # --- connections ---

    async def handle(self, stream: trio.SocketStream) -> None:
        """Handshake, then serve requests until the client closes, a limit is hit, or the drain begins.

        From accept until its first request is complete, and again from each response until the next request is,
        the connection waits in the server's waiting room: when `limits.max_waiting` connections wait, a new one
        evicts (closes) the one that has waited longest. serve_tcp closes `stream` when this returns, and cancels
        this when the drain's time is up."""
        accepted = trio.current_time()
        try:
            host, port = stream.socket.getpeername()[:2]
            address, client = f"{host}:{port}", ratelimit.client_key(host)
        except OSError:
            address = client = ""
        self.authority.refresh()
        context = self.authority.context
        assert context is not None  # _Authority refuses to start without one
        trio_sock = stream.socket
        sock = socket.socket(trio_sock.family, trio_sock.type, trio_sock.proto, fileno=trio_sock.detach())
        waiter = self._enter(accepted)
        tls: TlsStream | None = None
        try:
            # The head deadline counts from accept, so it bounds the handshake too.
            deadline = accepted + min(self.limits.handshake_timeout, self.limits.head_timeout)
            with trio.CancelScope(deadline=deadline) as scope:
                waiter.cancel = scope.cancel
                try:
                    tls = await tls_accept(sock, context)
                except TlsHandshakeError as exc:
                    self.log.info("TLS handshake refused", peer=address, reason=exc.reason)
                    return
            if tls is None:  # tls_accept closed the socket
                if waiter.evicted:
                    self._log_eviction(address, waiter, "handshake")
                else:
                    self.log.info("TLS handshake refused", peer=address, reason="handshake timed out")
                return
            peer = _Peer(address, client, tls.peer_identity, tls.socket.getpeercert(binary_form=True))
            try:
                await self._serve(tls, peer, waiter)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away; its last request, if any, has been logged
            finally:
                await tls.aclose()
        finally:
            self._waiting.leave(waiter)

    def _enter(self, since: float) -> Waiter:
        """The connection's place in the waiting room from `since`; a full room evicts those that waited longest.

        The caller sets the waiter's `cancel` to the cancel scope of what it waits in, before its next checkpoint."""
        waiter = Waiter(since, lambda: None)
        for other in self._waiting.enter(waiter):
            other.evict()
        return waiter

    def _log_eviction(self, address: str, waiter: Waiter, during: str) -> None:
        waited = round(trio.current_time() - waiter.since, 3)
        self.log.info("connection evicted", peer=address, during=during, waited_s=waited)

    async def _serve(self, tls: TlsStream, peer: _Peer, waiter: Waiter) -> None:
        """Serve the connection's requests in turn; `waiter` is its place in the waiting room for the first one.

        Each request is read in a cancel scope that ends at its deadline (the head's, then the body's), when a newer
        connection evicts this one, or, while the connection is idle, when the drain begins."""
        reader = RequestReader(max_header_bytes=self.limits.max_header_bytes, max_header_count=64)
        while True:
            started = time.perf_counter()
            head: RequestHead | None = None
            body = b""
            try:
                with trio.CancelScope(deadline=waiter.since + self.limits.head_timeout) as scope:
                    waiter.cancel = scope.cancel
                    try:
                        head = await self._read_head(tls, reader, waiter)
                        if head is None:
                            return
                        if head.upgrade is not None:
                            raise ProtocolError(400, "a protocol upgrade (this API speaks only HTTP/1.1)")
                        scope.deadline = trio.current_time() + self.limits.body_timeout
                        body = await self._read_body(tls, reader, head)
                    finally:
                        self._waiting.leave(waiter)
                if scope.cancelled_caught:
                    if waiter.evicted:
                        self._log_eviction(peer.address, waiter, "request" if head or reader.in_head else "idle")
                        return
                    if head is not None:
                        raise ProtocolError(408, "body timeout")
                    if reader.in_head:
                        raise ProtocolError(408, "head timeout")
                    return  # idle until the deadline, or until the drain began
            except ProtocolError as exc:
                reply = _error(exc.status, _protocol_message(exc, self.limits))
                self._log_request(head, peer, reply, started)
                if await self._send(tls, _response(reply, close=True)) and exc.status != 408:
                    await _linger(tls)  # let the client read this answer before a reset could destroy it
                return
            reply = self.respond(head, body, peer)
            self._log_request(head, peer, reply, started)
            keep_alive = head.keep_alive and not self.drain.draining
            if not await self._send(tls, _response(reply, close=not keep_alive, head_only=head.method == b"HEAD")):
                return
            if not keep_alive:
                return
            waiter = self._enter(trio.current_time())

    async def _read_head(self, tls: TlsStream, reader: RequestReader, waiter: Waiter) -> RequestHead | None:
        """The next request's head; None if the client closed before sending one. The caller bounds the time.

        Until the first byte arrives the connection is idle: a drain that begins then ends the caller's wait."""
        self.drain.idle(waiter)
        try:
            while True:
                event = reader.next_event()
                if isinstance(event, RequestHead):
                    return event
                if event is not None:
                    continue
                data = await tls.receive_some(_RECEIVE_SIZE)
                self.drain.busy(waiter)
                if not data:
                    return None
                reader.feed(data)
        finally:
            self.drain.busy(waiter)

    async def _read_body(self, tls: TlsStream, reader: RequestReader, head: RequestHead) -> bytes:
        """The request's body, within its size limit; the caller bounds the time."""
        limit = self.limits.max_body_bytes
        if head.content_length is not None and head.content_length > limit:
            raise ProtocolError(413, "body too large")
        if head.expect_continue and head.has_body:
            await tls.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = bytearray()
        while True:
            event = reader.next_event()
            if event is None:
                data = await tls.receive_some(_RECEIVE_SIZE)
                if not data:
                    raise ProtocolError(400, "the connection closed in the middle of the body")
                reader.feed(data)
            elif event is END:
                return bytes(body)
            elif isinstance(event, bytes):
                body += event
                if len(body) > limit:
                    raise ProtocolError(413, "body too large")

    async def _send(self, tls: TlsStream, data: bytes) -> bool:
        """False if the client did not take `data` within the send timeout."""
        with trio.move_on_after(self.limits.send_timeout):
            await tls.send_all(data)
            return True
        return False

    def _log_request(self, head: RequestHead | None, peer: _Peer, reply: _Reply, started: float) -> None:
        # The path only: a query string could hold anything a client thought fit to send, a token included.
        path = head.target.split(b"?", 1)[0].decode("latin-1")[:200] if head else None
        self.log.info(
            "request",
            method=head.method.decode("latin-1") if head else None,
            path=path,
            status=reply.status,
            peer=peer.address,
            duration_s=round(time.perf_counter() - started, 6),
            **reply.log,
        )

    # --- the API ---

    def respond(self, head: RequestHead, body: bytes, peer: _Peer) -> _Reply:
        """The answer to one complete request."""
        path = head.target.split(b"?", 1)[0]
        try:
            if path == b"/v1/bundle":
                if head.method not in (b"GET", b"HEAD"):
                    raise _Refused(405, "/v1/bundle answers only GET (and HEAD)", [(b"allow", b"GET, HEAD")])
                return _Reply(200, self.authority.refresh().bundle_pem(), content_type=_PEM)
            if path == b"/v1/certificate":
                if head.method != b"POST":
                    raise _Refused(405, "/v1/certificate answers only POST", [(b"allow", b"POST")])
                return self._certificate(head, body, peer)
            raise _Refused(404, f"no such endpoint; this API serves {_ENDPOINTS}")
        except _Refused as refused:
            return _error(refused.status, refused.message, refused.headers)

    def _certificate(self, head: RequestHead, body: bytes, peer: _Peer) -> _Reply:
        ca = self.authority.refresh()
        log: dict[str, Any] = {}
        try:
            identity = self._authenticate(ca, head, peer, log)
            log["caller"] = str(identity)
            if identity.service == SERVER_SERVICE:
                raise _Refused(403, f"the identity {identity} belongs to the CA server itself and is never signed here")
            if self.authority.unavailable:
                raise _Refused(503, f"the CA cannot sign certificates now: {self.authority.unavailable}")
            csr, ttl = _certificate_request(head, body)
            # Capped here as the CA would cap it, so that an absurd request cannot overflow a timedelta.
            seconds = min(ttl if ttl is not None else DEFAULT_LEAF_TTL.total_seconds(), ca.max_leaf_ttl.total_seconds())
            try:
                issued = ca.sign_csr(
                    csr,
                    service=identity.service,
                    namespace=identity.namespace,
                    datacenter=identity.datacenter,
                    ttl=seconds,
                )
            except CAError as exc:
                raise _Refused(400, str(exc)) from None
        except _Refused as refused:
            return _error(refused.status, refused.message, refused.headers, **log)
        not_after = _iso(issued.certificate.not_valid_after_utc)
        reply = {
            "certificate": issued.cert_pem.decode("ascii"),
            "bundle": issued.bundle_pem.decode("ascii"),
            "spiffe_id": issued.spiffe_id,
            "not_after": not_after,
        }
        log.update(serial=f"{issued.certificate.serial_number:x}", root=issued.root, not_after=not_after)
        return _Reply(200, _json(reply), log=log)

    def _authenticate(
        self, ca: CertificateAuthority, head: RequestHead, peer: _Peer, log: dict[str, Any]
    ) -> spiffe.SpiffeId:
        """The identity the caller proved: with the bearer token if it sent one, else with its certificate."""
        authorization = _header(head, b"authorization")
        if len(authorization) > 1:
            raise _Refused(400, "send one Authorization header, not several")
        if authorization:
            log["auth"] = "token"
            scheme, _, credentials = authorization[0].strip().partition(b" ")
            secret = credentials.strip().decode("latin-1")
            if scheme.lower() != b"bearer" or not secret:
                raise _Refused(401, "unsupported Authorization header; send `Authorization: Bearer <token>`", _BEARER)
            log["token_id"] = tokens.token_id(secret)  # never the secret itself
            service = self._verify_token(secret, peer.client)
            return spiffe.SpiffeId(ca.trust_domain, "default", "dc1", service)
        if peer.certificate is None:
            raise _Refused(
                401,
                "no credentials: send `Authorization: Bearer <token>`, or present your current certificate to renew it",
                _BEARER,
            )
        log["auth"] = "certificate"
        return _certificate_identity(ca, peer)

    def _verify_token(self, secret: str, client: str) -> str:
        """The service of a valid token. A client address that has failed too often is refused (429) without its
        token being looked at, so that guessing tokens costs the guesser time rather than the CA its token store."""
        now = trio.current_time()
        wait = self.failures.retry_after(client, now)
        if wait > 0:
            seconds = math.ceil(wait)
            raise _Refused(
                429,
                f"too many failed token attempts from {client}; try again in {seconds}s",
                [(b"retry-after", b"%d" % seconds)],
            )
        try:
            tokens.list(self.directory)  # a damaged store is the CA's problem, not the caller's
        except CAError as exc:
            self.authority.report("tokens", f"cannot read the token store: {exc}")
            raise _Refused(500, "the CA cannot read its token store; its log says why") from None
        self.authority.report("tokens", None)
        try:
            return tokens.verify(self.directory, secret)
        except CAError as exc:  # unknown, expired or revoked: the message names the token's id, never its secret
            self.failures.failed(client, now)
            raise _Refused(401, str(exc), _BEARER) from None


_BEARER = [(b"www-authenticate", b'Bearer realm="mesh-ca"')]


def _certificate_identity(ca: CertificateAuthority, peer: _Peer) -> spiffe.SpiffeId:
    """The identity in a client certificate the handshake verified, if it is still one this CA vouches for.

    The handshake checked the chain against the bundle of the moment the connection began; a root may have
    left the bundle since, or the certificate expired, while the connection stayed open."""
    assert peer.certificate is not None
    certificate = x509.load_der_x509_certificate(peer.certificate)
    now = utc_now()
    if not _issued_by_bundle(ca, certificate, now):
        raise _Refused(401, "the client certificate was not issued under a root in this CA's current trust bundle")
    if now >= certificate.not_valid_after_utc:
        expired = format_time(certificate.not_valid_after_utc)
        raise _Refused(401, f"the client certificate expired at {expired}; obtain a new one with a token")
    if now < certificate.not_valid_before_utc:
        raise _Refused(401, "the client certificate is not valid yet")
    if peer.identity is None:
        raise _Refused(403, "the client certificate carries no single SPIFFE ID")
    try:
        identity = spiffe.parse(peer.identity)
    except ValueError as exc:
        raise _Refused(403, f"the client certificate's identity is not a mesh service: {exc}") from None
    if identity.trust_domain != ca.trust_domain:
        raise _Refused(
            403,
            f"the client certificate's SPIFFE ID {peer.identity} belongs to trust domain "
            f"{identity.trust_domain!r}, not {ca.trust_domain!r}",
        )
    return identity


def _issued_by_bundle(ca: CertificateAuthority, certificate: x509.Certificate, now: datetime) -> bool:
    for root in ca.bundle(now):
        try:
            certificate.verify_directly_issued_by(root.issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def _certificate_request(head: RequestHead, body: bytes) -> tuple[bytes, float | None]:
    """(CSR PEM, requested TTL in seconds or None) from a `{"csr": ..., "ttl": ...}` JSON body."""
    content_type = _header(head, b"content-type")
    if len(content_type) != 1 or content_type[0].split(b";", 1)[0].strip().lower() != _JSON:
        raise _Refused(400, "send the request as JSON, with `content-type: application/json`")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _Refused(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _Refused(400, 'the body must be a JSON object: {"csr": "<PEM CSR>", "ttl": "24h"}')
    unknown = sorted(str(key)[:40] for key in data if key not in ("csr", "ttl"))
    if unknown:
        raise _Refused(
            400,
            f'unknown field {", ".join(map(repr, unknown))}: the body holds "csr" and optionally "ttl" '
            "(the identity comes from your token or certificate)",
        )
    csr = data.get("csr")
    if not isinstance(csr, str) or not csr.strip():
        raise _Refused(400, 'the body has no "csr": put the PEM certificate signing request there')
    ttl = data.get("ttl")
    seconds = None
    if ttl is not None:
        try:
            seconds = parse_duration(ttl)
        except ValueError as exc:
            raise _Refused(400, f"invalid ttl: {exc}") from None
    return csr.encode("utf-8"), seconds


def _response(reply: _Reply, *, close: bool, head_only: bool = False) -> bytes:
    headers = [
        (b"content-type", reply.content_type),
        (b"content-length", b"%d" % len(reply.body)),
        (b"cache-control", b"no-store"),
        *reply.headers,
    ]
    if close:
        headers.append((b"connection", b"close"))
    head = http1.response_head_bytes(reply.status, HTTPStatus(reply.status).phrase.encode("ascii"), headers)
    return head if head_only else head + reply.body


def _protocol_message(exc: ProtocolError, limits: ServerLimits) -> str:
    if exc.status == 413:
        return f"the request body is larger than {limits.max_body_bytes} bytes"
    if exc.status == 408:
        which = "body" if exc.reason == "body timeout" else "head"
        seconds = limits.body_timeout if which == "body" else limits.head_timeout
        return f"the request {which} did not arrive within {seconds:g}s"
    return f"malformed request: {exc.reason}" if exc.status == 400 else exc.reason


async def _linger(tls: TlsStream) -> None:
    """Read and drop what the client still sends, briefly, so that closing with unread bytes (a TCP reset) does
    not destroy the error response before the client has read it."""
    received = 0
    with trio.move_on_after(_LINGER_SECONDS):
        while received < _LINGER_BYTES:
            try:
                data = await tls.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            received += len(data)


# --- serving ---


async def serve_ca(
    directory: str | os.PathLike[str],
    bind: str | Address = DEFAULT_BIND,
    *,
    limits: ServerLimits = ServerLimits(),
    drain: Drain | None = None,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the CA in `directory` over HTTPS on `bind` (port 0: any free port) until cancelled or drained.

    Reports the bound Address through `task_status` once listening. CAError if the directory holds no usable CA
    (before listening); OSError if the address cannot be bound. When `drain.start()` is called, listening stops,
    idle connections close, and requests in progress get `limits.drain_timeout` seconds; then it returns."""
    address = bind if isinstance(bind, Address) else parse_address(bind)
    server = CAServer(directory, limits=limits, drain=drain or Drain())
    await serve_tcp(
        address,
        server.handle,
        name="mesh-ca",
        drain=server.drain,
        max_connections=limits.max_connections,
        drain_timeout=limits.drain_timeout,
        task_status=task_status,
    )


def run(directory: Path, bind: Address, limits: ServerLimits = ServerLimits()) -> int:
    """`mesh ca serve`: serve until SIGINT or SIGTERM, then drain and return 0.

    CAError or OSError (no CA in `directory`, address in use) propagate for the caller to report."""
    mesh_log.configure("info")
    try:
        trio.run(_main, directory, bind, limits)
    except BaseExceptionGroup as group:
        expected, rest = group.split((CAError, OSError))
        if expected is None or rest is not None:
            raise
        raise _first_leaf(expected) from None
    return 0


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _main(directory: Path, bind: Address, limits: ServerLimits) -> None:
    log = structlog.get_logger("ca.server")
    drain = Drain()
    # SIGHUP's default action would end the CA with no drain; it has nothing to reload (it re-reads its directory
    # when the files change), so it is logged and ignored.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        log.warning("SIGHUP ignored: the CA re-reads its directory when it changes; nothing to reload")
                        continue
                    if drain.draining:
                        log.warning("second signal: stopping now", signal=name)
                        nursery.cancel_scope.cancel()
                        return
                    log.info("shutting down", signal=name)
                    drain.start()

            nursery.start_soon(on_signals)
            async with trio.open_nursery() as server:
                bound = await server.start(partial(serve_ca, directory, bind, limits=limits, drain=drain))
                _announce(directory, bound)
            nursery.cancel_scope.cancel()


def _announce(directory: Path, bound: Address) -> None:
    """Tell the operator where the API is and what a sidecar can pin: the fingerprints of the bundle's roots."""
    ca = CertificateAuthority.load(directory)
    print(f"mesh ca serve: listening on https://{bound} for trust domain {ca.trust_domain}")
    print(f"  server identity: {ca.spiffe_id(SERVER_SERVICE)}")
    for root in ca.bundle():
        print(f"  root {root.id}: SHA-256 {fingerprint(root.certificate)} (a sidecar may pin this)")
    print(f"  {_ENDPOINTS}; stop with Ctrl-C or SIGTERM")
    sys.stdout.flush()
