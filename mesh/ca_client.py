"""Client of the mesh CA's signing API (`mesh ca serve`): trust bundle and certificates for CSRs, over verified TLS."""

from __future__ import annotations

import datetime
import hashlib
import json
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh import http1
from mesh.config import format_duration
from mesh.spiffe import spiffe_id
from mesh.tls import TlsHandshakeError, TlsStream, tls_connect

# The CA's own identity in its TLS certificate, in the namespace and datacenter `mesh ca serve` always uses.
CA_SERVICE = "mesh-ca"
# As on the mesh hop: forward secrecy and authenticated encryption only.
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
_MAX_RESPONSE_BYTES = 1 << 20


class CaError(Exception):
    """A request to the CA failed; the message says why in plain words.

    `status` is the HTTP status when the CA answered with an error. `credentials_refused` is true when the CA
    turned down the credentials we presented (401/403, or the TLS layer broke off after we presented our
    certificate), so that another credential is worth a try; it is false when the CA could not be reached,
    answered 5xx, or failed our own checks of its identity."""

    def __init__(self, message: str, *, status: int | None = None, credentials_refused: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.credentials_refused = credentials_refused


@dataclass(frozen=True)
class SignedCertificate:
    """The CA's answer to a CSR: our certificate chain (leaf first), the current trust bundle, both PEM."""

    chain_pem: bytes
    bundle_pem: bytes
    spiffe_id: str
    not_after: datetime.datetime


def ca_server_id(trust_domain: str) -> str:
    """The SPIFFE ID the CA's TLS certificate must carry."""
    return spiffe_id(trust_domain, "default", "dc1", CA_SERVICE)


def root_fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER as lowercase hex without colons (the config's `fingerprint` form)."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def parse_bundle(pem: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM bundle; CaError if there are none or they cannot be read."""
    try:
        roots = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CaError(f"the CA's trust bundle is not PEM certificates: {exc}") from None
    return roots


def ca_context(bundle_pem: bytes, *, cert_file: Path | None = None, key_file: Path | None = None) -> ssl.SSLContext:
    """A client context for the CA connection: its chain verified against `bundle_pem`, no host name check (the
    caller compares the SPIFFE ID), and our certificate presented when cert_file/key_file are given (renewal).

    Raises ssl.SSLError (or OSError) when the bundle or the certificate cannot be loaded."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_CIPHERS)
    # A server that closes after its Connection: close answer without close_notify is not an attack on a
    # Content-Length-framed message; ResponseReader still detects a truncated one.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_IGNORE_UNEXPECTED_EOF
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem.decode("ascii", "replace"))
    if cert_file is not None and key_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def _unverified_context() -> ssl.SSLContext:
    """Only to fetch the bundle once when trust is bootstrapped from a fingerprint; nothing secret is sent on it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_IGNORE_UNEXPECTED_EOF
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _detach(stream: trio.SocketStream) -> socket.socket:
    trio_sock = stream.socket
    return socket.socket(trio_sock.family, trio_sock.type, trio_sock.proto, fileno=trio_sock.detach())


class CaClient:
    """Talks to one CA: one request per TLS connection, each within `timeout` seconds.

    Every connection verifies the CA's chain against the context it is given and checks its SPIFFE ID before a
    single byte is sent, so a token never reaches a server that is not the CA."""

    def __init__(self, url: str, *, expected_id: str, timeout: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"the CA's URL must be https://host[:port] (got {url!r})")
        self.url = url
        self.host = parts.hostname
        self.port = 443 if parts.port is None else parts.port
        self.authority = parts.netloc.encode("ascii")
        self.base_path = parts.path.rstrip("/")
        self.expected_id = expected_id
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<CaClient {self.url} expecting {self.expected_id}>"

    async def fetch_bundle(self, context: ssl.SSLContext) -> bytes:
        """GET /v1/bundle: the CA's current trust bundle (PEM)."""
        status, body = await self._request(context, b"GET", "/v1/bundle")
        if status != 200:
            raise CaError(f"the CA answered {status} to GET /v1/bundle: {_error_text(body)}", status=status)
        parse_bundle(body)
        return body

    async def bootstrap_bundle(self, fingerprint: str) -> bytes:
        """Learn the bundle when all we hold is one root's fingerprint.

        The bundle is first read over an unverified connection (no credentials are sent on it); only the root
        whose DER has that SHA-256 is taken from it, then the bundle is read again over a connection verified
        against that root alone and checked for the CA's SPIFFE ID, so a server without a certificate from
        that root cannot slip another root in."""
        status, body = await self._request(_unverified_context(), b"GET", "/v1/bundle", check_identity=False)
        if status != 200:
            raise CaError(f"the CA answered {status} to GET /v1/bundle: {_error_text(body)}", status=status)
        pinned = [root for root in _lenient_bundle(body) if root_fingerprint(root) == fingerprint]
        if not pinned:
            raise CaError(
                f"no root in the bundle served by {self.url} has the SHA-256 fingerprint {fingerprint}; "
                "refusing to trust that server (no token was sent)"
            )
        try:
            context = ca_context(pinned[0].public_bytes(serialization.Encoding.PEM))
        except ssl.SSLError as exc:
            raise CaError(f"the root with fingerprint {fingerprint} cannot be used: {exc}") from None
        return await self.fetch_bundle(context)

    async def sign(
        self, context: ssl.SSLContext, csr_pem: bytes, *, ttl: float, token: str | None = None
    ) -> SignedCertificate:
        """POST /v1/certificate: a certificate for our CSR, authenticated by `token` or, when it is None, by the
        client certificate `context` presents."""
        body = json.dumps({"csr": csr_pem.decode("ascii"), "ttl": format_duration(ttl)}).encode()
        headers = [(b"content-type", b"application/json")]
        if token is not None:
            headers.append((b"authorization", b"Bearer " + token.encode("ascii")))
        status, answer = await self._request(
            context, b"POST", "/v1/certificate", body, headers, presenting_certificate=token is None
        )
        if status != 200:
            raise CaError(
                f"the CA refused the certificate request ({status}): {_error_text(answer)}",
                status=status,
                credentials_refused=status in (401, 403),
            )
        try:
            data = json.loads(answer)
            signed = SignedCertificate(
                chain_pem=data["certificate"].encode("ascii"),
                bundle_pem=data["bundle"].encode("ascii"),
                spiffe_id=data["spiffe_id"],
                not_after=datetime.datetime.fromisoformat(data["not_after"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CaError(f"the CA's answer is not the expected JSON: {type(exc).__name__}: {exc}") from None
        parse_bundle(signed.bundle_pem)
        return signed

    async def _request(
        self,
        context: ssl.SSLContext,
        method: bytes,
        path: str,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        check_identity: bool = True,
        presenting_certificate: bool = False,
    ) -> tuple[int, bytes]:
        """One request on a new connection; (status, body). CaError on any failure, including the timeout."""
        try:
            with trio.fail_after(self.timeout):
                return await self._exchange(
                    context, method, path, body, headers or [], check_identity, presenting_certificate
                )
        except trio.TooSlowError:
            raise CaError(
                f"the CA at {self.url} did not answer {method.decode()} {path} within {self.timeout:g}s"
            ) from None

    async def _exchange(
        self,
        context: ssl.SSLContext,
        method: bytes,
        path: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        check_identity: bool,
        presenting_certificate: bool,
    ) -> tuple[int, bytes]:
        try:
            tcp = await trio.open_tcp_stream(self.host, self.port)
        except OSError as exc:
            raise CaError(f"cannot connect to the CA at {self.host}:{self.port}: {exc.strerror or exc}") from None
        try:
            stream = await tls_connect(_detach(tcp), context, server_hostname=self.host)
        except TlsHandshakeError as exc:
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                raise CaError(f"the CA's TLS certificate was refused: {exc.reason} (no token was sent)") from None
            raise CaError(f"TLS with the CA failed: {exc.reason}", credentials_refused=presenting_certificate) from None
        try:
            if check_identity and stream.peer_identity != self.expected_id:
                got = stream.peer_identity or "no SPIFFE ID"
                raise CaError(
                    f"the server at {self.host}:{self.port} is {got}, not the CA ({self.expected_id}); "
                    "refusing to talk to it (no token was sent)"
                )
            target = (self.base_path + path).encode("ascii")
            all_headers = [(b"host", self.authority), *headers, (b"connection", b"close")]
            if body or method == b"POST":
                all_headers.append((b"content-length", b"%d" % len(body)))
            try:
                await stream.send_all(http1.request_head_bytes(method, target, all_headers) + body)
                return await _read_response(stream, method)
            except trio.BrokenResourceError as exc:
                # With TLS 1.3 a server that refuses our certificate says so only after our handshake ended.
                raise CaError(
                    f"the CA broke off the connection: {exc}", credentials_refused=presenting_certificate
                ) from None
        finally:
            stream.close()


async def _read_response(stream: TlsStream, method: bytes) -> tuple[int, bytes]:
    reader = http1.ResponseReader(request_method=method)
    status: int | None = None
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            event = reader.next_event()
            if event is None:
                data = await stream.receive_some()
                if data:
                    reader.feed(data)
                else:
                    reader.feed_eof()
            elif isinstance(event, http1.ResponseHead):
                if not event.informational:
                    status = event.status
            elif isinstance(event, bytes):
                size += len(event)
                if size > _MAX_RESPONSE_BYTES:
                    raise CaError(f"the CA's answer is larger than {_MAX_RESPONSE_BYTES} bytes")
                parts.append(event)
            elif event is http1.END and status is not None:
                return status, b"".join(parts)
    except http1.ProtocolError as exc:
        raise CaError(f"the CA's answer is not valid HTTP/1.1: {exc.reason}") from None


def _lenient_bundle(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def _error_text(body: bytes) -> str:
    """The `error` of a JSON error answer, else the start of the body."""
    try:
        error = json.loads(body)["error"]
        if isinstance(error, str):
            return error
    except (ValueError, KeyError, TypeError):
        pass
    return body[:200].decode("utf-8", "replace") or "(no body)"
