"""mesh.tls and mesh.transport over real sockets: mutual TLS handshakes and their refusals (chain, X.509-SVID rules,
resumed sessions), MutualTlsAccept and secure(), and TlsStream's byte-stream behaviour."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
import ssl
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog.testing
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh import tls
from mesh.config import IdentityFiles
from mesh.errors import MeshError
from mesh.identity import load_identity
from mesh.metrics import TLS_REFUSAL_REASONS, Metrics
from mesh.spiffe import Authorizer
from mesh.tls import TlsHandshakeError, TlsStream
from mesh.transport import Accepted, MutualTlsAccept, UpstreamTls, secure

TD = "mesh.local"


def svc(name: str) -> str:
    return f"spiffe://{TD}/ns/default/dc/dc1/svc/{name}"


@dataclass(frozen=True)
class Leaf:
    cert: str
    key: str
    bundle: str


class _CA:
    """A P-256 root that issues leaves with one SPIFFE URI SAN (a test stand-in for ca/, which mesh/ must not use)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = directory / f"{name}-bundle.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        label: str,
        service: str,
        *,
        valid_from: dt.timedelta = dt.timedelta(hours=-1),
        valid_for: dt.timedelta = dt.timedelta(hours=24),
        usages: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        ca: bool = False,
        key_usage: x509.KeyUsage | None = None,
        uris: tuple[str, ...] | None = None,
    ) -> Leaf:
        """A leaf for `service`; `ca`, `key_usage` and `uris` make ones that break the X.509-SVID rules (no
        `usages` leaves out the extendedKeyUsage extension, `key_usage=NO_KEY_USAGE` the keyUsage extension)."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = dt.datetime.now(dt.UTC) + valid_from
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + valid_for)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris or (svc(service),)]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if key_usage is not NO_KEY_USAGE:
            builder = builder.add_extension(key_usage or _key_usage(cert_sign=False), critical=True)
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file = self.directory / f"{label}-cert.pem"
        key_file = self.directory / f"{label}-key.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return Leaf(str(cert_file), str(key_file), str(self.bundle))


def _key_usage(
    *, cert_sign: bool, digital_signature: bool | None = None, crl_sign: bool | None = None
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign if digital_signature is None else digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=digital_signature is False,  # OpenSSL wants a TLS peer's key for signing or key agreement
        key_cert_sign=cert_sign,
        crl_sign=cert_sign if crl_sign is None else crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


NO_KEY_USAGE = x509.KeyUsage(False, False, False, False, False, False, False, False, False)  # a marker for issue()

# Leaves that OpenSSL accepts (the chain verifies) but that are not X.509-SVIDs, with the rule each one breaks.
NOT_SVID = {
    "ca": (
        {"ca": True, "key_usage": _key_usage(cert_sign=True, digital_signature=True)},
        "peer certificate is a CA certificate (basicConstraints CA:TRUE), not an X.509-SVID",
    ),
    "ca-without-key-usage": (
        {"ca": True, "key_usage": NO_KEY_USAGE, "usages": ()},
        "peer certificate is a CA certificate (basicConstraints CA:TRUE), not an X.509-SVID",
    ),
    "key-cert-sign": (
        {"key_usage": _key_usage(cert_sign=True, digital_signature=True, crl_sign=False)},
        "peer certificate can sign certificates (keyUsage keyCertSign), not an X.509-SVID",
    ),
    "crl-sign": (
        {"key_usage": _key_usage(cert_sign=False, crl_sign=True)},
        "peer certificate can sign CRLs (keyUsage cRLSign), not an X.509-SVID",
    ),
    "no-digital-signature": (
        {"key_usage": _key_usage(cert_sign=False, digital_signature=False)},
        "peer certificate lacks keyUsage digitalSignature, which an X.509-SVID must have",
    ),
    "no-key-usage": (
        {"key_usage": NO_KEY_USAGE},
        "peer certificate has no keyUsage extension (an X.509-SVID must have digitalSignature)",
    ),
    "two-uri-sans": (
        {"uris": (svc("api"), svc("web"))},
        "peer certificate has 2 URI SANs (an X.509-SVID has exactly one, its SPIFFE ID)",
    ),
}


@dataclass(frozen=True)
class Certs:
    api: Leaf  # the server in these tests
    web: Leaf  # the client
    expired: Leaf
    not_yet_valid: Leaf
    server_auth_only: Leaf
    other_ca_web: Leaf  # same SPIFFE ID as `web`, another root
    not_svid: dict[str, Leaf]  # NOT_SVID's leaves, all for the SPIFFE ID of `api`


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca = _CA(directory, "mesh-root")
    other = _CA(directory, "other-root")
    return Certs(
        api=ca.issue("api", "api"),
        web=ca.issue("web", "web"),
        expired=ca.issue("expired", "web", valid_from=dt.timedelta(days=-3), valid_for=dt.timedelta(days=1)),
        not_yet_valid=ca.issue("future", "web", valid_from=dt.timedelta(days=1)),
        server_auth_only=ca.issue("server-only", "web", usages=(ExtendedKeyUsageOID.SERVER_AUTH,)),
        other_ca_web=other.issue("other-web", "web"),
        not_svid={name: ca.issue(f"not-svid-{name}", "api", **kwargs) for name, (kwargs, _) in NOT_SVID.items()},
    )


def server_ctx(leaf: Leaf) -> ssl.SSLContext:
    return tls.server_context(leaf.cert, leaf.key, leaf.bundle)


def client_ctx(leaf: Leaf) -> ssl.SSLContext:
    return tls.client_context(leaf.cert, leaf.key, leaf.bundle)


async def handshake_pair(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> tuple[TlsStream | BaseException, TlsStream | BaseException]:
    """Both sides of a handshake over a fresh socket pair; each result is a stream or the exception it raised."""
    a, b = socket.socketpair()
    results: dict[str, TlsStream | BaseException] = {}

    async def run(name: str, coro_fn, *args) -> None:
        try:
            results[name] = await coro_fn(*args)
        except (TlsHandshakeError, trio.BrokenResourceError) as exc:
            results[name] = exc

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "server", tls.tls_accept, a, server)
            nursery.start_soon(run, "client", partial(tls.tls_connect, server_hostname="api"), b, client)
    return results["server"], results["client"]


async def connected(certs: Certs) -> tuple[TlsStream, TlsStream]:
    server, client = await handshake_pair(server_ctx(certs.api), client_ctx(certs.web))
    assert isinstance(server, TlsStream) and isinstance(client, TlsStream)
    return server, client


async def first_receive_error(stream: TlsStream | BaseException) -> str:
    """With TLS 1.3 a client learns that the server refused its certificate on its first receive."""
    if isinstance(stream, BaseException):
        return str(stream)
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as info:
        await stream.receive_some()
    stream.close()
    return str(info.value)


def closed(result: TlsStream | BaseException) -> None:
    if isinstance(result, TlsStream):
        result.close()


# --- contexts ---------------------------------------------------------------------------------------------------


def test_contexts_are_strict(certs: Certs) -> None:
    for ctx in (server_ctx(certs.api), client_ctx(certs.web)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.options & ssl.OP_NO_RENEGOTIATION
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.options & ssl.OP_NO_TICKET  # no TLS 1.2 session tickets issued, nor asked for
        tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12, "no TLS 1.2 suites left"
        assert all(name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name) for name in tls12), tls12
    assert client_ctx(certs.web).check_hostname is False
    assert server_ctx(certs.api).num_tickets == 0  # nor TLS 1.3 tickets


# --- handshakes that succeed ------------------------------------------------------------------------------------


async def test_handshake_both_sides_see_the_peer_identity(certs: Certs) -> None:
    server, client = await connected(certs)
    assert server.peer_identity == svc("web")
    assert client.peer_identity == svc("api")
    assert server.selected_alpn_protocol() == client.selected_alpn_protocol() == "h2"
    assert server.socket.version() == "TLSv1.3"
    await client.send_all(b"ping")
    assert await server.receive_some() == b"ping"
    await server.aclose()
    await client.aclose()


async def test_handshake_over_tcp_loopback_with_tls_1_2(certs: Certs) -> None:
    client_context = client_ctx(certs.web)
    client_context.maximum_version = ssl.TLSVersion.TLSv1_2
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    with listener, trio.fail_after(5):
        raw_client = socket.create_connection(("127.0.0.1", port))
        await trio.lowlevel.wait_readable(listener)
        raw_server, _ = listener.accept()
        async with trio.open_nursery() as nursery:
            accepted: list[TlsStream] = []

            async def accept() -> None:
                accepted.append(await tls.tls_accept(raw_server, server_ctx(certs.api)))

            nursery.start_soon(accept)
            client = await tls.tls_connect(raw_client, client_context, server_hostname="api")
    (server,) = accepted
    assert client.socket.version() == "TLSv1.2"
    assert client.socket.cipher()[0].startswith("ECDHE-ECDSA-")
    assert (server.peer_identity, client.peer_identity) == (svc("web"), svc("api"))
    await client.send_all(b"x" * 1000)
    received = b""
    while len(received) < 1000:
        received += await server.receive_some()
    await server.aclose()
    assert await client.receive_some() == b""
    await client.aclose()


# --- handshakes the server refuses ------------------------------------------------------------------------------


async def test_alpn_falls_back_to_http1_for_a_client_that_offers_only_http1(certs: Certs) -> None:
    http1_only = tls.client_context(certs.web.cert, certs.web.key, certs.web.bundle, http2=False)
    server, client = await handshake_pair(server_ctx(certs.api), http1_only)
    assert server.selected_alpn_protocol() == client.selected_alpn_protocol() == "http/1.1"
    server.close()
    client.close()


async def test_server_refuses_a_client_without_certificate(certs: Certs) -> None:
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.load_verify_locations(certs.api.bundle)
    server, client = await handshake_pair(server_ctx(certs.api), no_cert)
    assert isinstance(server, TlsHandshakeError)
    assert server.reason == "peer sent no certificate"
    assert "requires a client certificate" in await first_receive_error(client)


@pytest.mark.parametrize(
    ("leaf", "reason", "client_sees"),
    [
        ("other_ca_web", "unable to get local issuer certificate (not issued by a CA in our trust bundle)", "trust"),
        ("expired", "certificate has expired", "expired"),
        ("not_yet_valid", "certificate is not yet valid", "rejected our certificate"),
        ("server_auth_only", "unsuitable certificate purpose (the certificate lacks the clientAuth", "key usage"),
    ],
)
async def test_server_refuses_a_bad_client_certificate(certs: Certs, leaf: str, reason: str, client_sees: str) -> None:
    bad = getattr(certs, leaf)
    client_context = tls.client_context(bad.cert, bad.key, certs.api.bundle)  # the client trusts the server
    server, client = await handshake_pair(server_ctx(certs.api), client_context)
    assert isinstance(server, TlsHandshakeError)
    assert server.reason.startswith(f"certificate verify failed: {reason}")
    assert client_sees in await first_receive_error(client)


async def test_server_refuses_tls_1_1(certs: Certs) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # setting TLS 1.1 is deprecated; that is the point
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.load_cert_chain(certs.web.cert, certs.web.key)
    server, client = await handshake_pair(server_ctx(certs.api), old)
    assert isinstance(server, TlsHandshakeError)
    assert server.reason.startswith("unsupported protocol")
    assert isinstance(client, TlsHandshakeError)
    assert client.reason.startswith("unsupported protocol")


async def test_server_refuses_a_non_aead_cipher(certs: Certs) -> None:
    weak = client_ctx(certs.web)
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("ECDHE-ECDSA-AES128-SHA256")
    server, client = await handshake_pair(server_ctx(certs.api), weak)
    assert isinstance(server, TlsHandshakeError)
    assert server.reason.startswith("no shared cipher")
    assert isinstance(client, TlsHandshakeError)
    assert "refused the handshake" in client.reason


# --- handshakes the client refuses ------------------------------------------------------------------------------


async def test_client_refuses_a_server_from_another_ca(certs: Certs) -> None:
    impostor = tls.server_context(certs.other_ca_web.cert, certs.other_ca_web.key, certs.web.bundle)
    server, client = await handshake_pair(impostor, client_ctx(certs.web))
    assert isinstance(client, TlsHandshakeError)
    assert client.reason.startswith("certificate verify failed: unable to get local issuer certificate")
    assert isinstance(server, TlsHandshakeError)
    assert "does not trust" in server.reason


async def test_client_refuses_an_expired_server_certificate(certs: Certs) -> None:
    stale = tls.server_context(certs.expired.cert, certs.expired.key, certs.expired.bundle)
    server, client = await handshake_pair(stale, client_ctx(certs.web))
    assert isinstance(client, TlsHandshakeError)
    assert client.reason == "certificate verify failed: certificate has expired"
    closed(server)


@pytest.mark.parametrize("side", ["server", "client"])
async def test_a_plaintext_peer_fails_the_handshake_with_a_clear_reason(certs: Certs, side: str) -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)

    async def plaintext_peer() -> None:
        # An HTTP client talking to our inbound, or an HTTP server answering our outbound's ClientHello.
        if side == "client":
            await trio.lowlevel.wait_readable(theirs)
            theirs.recv(65536)
            theirs.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        else:
            theirs.sendall(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n")

    with theirs, trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(plaintext_peer)
            with pytest.raises(TlsHandshakeError) as info:
                if side == "server":
                    await tls.tls_accept(ours, server_ctx(certs.api))
                else:
                    await tls.tls_connect(ours, client_ctx(certs.web), server_hostname="api")
    assert info.value.reason.startswith("the peer is not speaking TLS")
    assert ours.fileno() == -1  # closed (detached into the stream, which was closed)


async def test_peer_closing_during_the_handshake(certs: Certs) -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    with pytest.raises(TlsHandshakeError) as info:
        await tls.tls_connect(ours, client_ctx(certs.web), server_hostname="api")
    assert info.value.reason == "the peer closed the connection"


async def test_cancelled_handshake_closes_the_socket(certs: Certs) -> None:
    ours, theirs = socket.socketpair()
    with theirs, trio.move_on_after(0.05) as scope:
        await tls.tls_accept(ours, server_ctx(certs.api))  # the peer never says hello
    assert scope.cancelled_caught
    assert ours.fileno() == -1


# --- resumed sessions: every connection presents and verifies a certificate -----------------------------------


def tls12_client(leaf: Leaf, context_class: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    """A stdlib TLS 1.2 client with `leaf`'s certificate that, unlike our contexts, keeps the default ticket support."""
    ctx = context_class(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.load_cert_chain(leaf.cert, leaf.key)
    ctx.load_verify_locations(leaf.bundle)
    return ctx


def blocking_connect(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    """A blocking stdlib TLS client (run it in a thread), offering `session` for resumption."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="api", session=session)


def blocking_close(sock: ssl.SSLSocket) -> None:
    """Close as a well-behaved client does: a close_notify, then the socket."""
    with sock:
        try:
            sock.unwrap()
        except OSError:
            pass


async def tcp_listener() -> tuple[trio.SocketListener, int]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listener, listener.socket.getsockname()[1]


def detached(stream: trio.SocketStream) -> socket.socket:
    return socket.socket(fileno=stream.socket.detach())


async def test_server_refuses_a_resumed_tls_1_2_session(certs: Certs) -> None:
    server_context = server_ctx(certs.api)  # one context: one session cache
    client_context = tls12_client(certs.web)
    sessions: list[ssl.SSLSession] = []

    async def client(port: int) -> None:
        offered = sessions[0] if sessions else None
        sock = await trio.to_thread.run_sync(blocking_connect, port, client_context, offered)
        sessions.append(sock.session)
        await trio.to_thread.run_sync(blocking_close, sock)

    listener, port = await tcp_listener()
    async with listener:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client, port)
                server = await tls.tls_accept(detached(await listener.accept()), server_context)
                assert server.socket.session_reused is False
                await server.aclose()  # a close_notify: the session stays in the server's cache
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client, port)
                with pytest.raises(TlsHandshakeError) as info:
                    await tls.tls_accept(detached(await listener.accept()), server_context)
    assert sessions[1].id == sessions[0].id  # the client did resume
    assert info.value.refusal == "session_reused"
    assert info.value.reason == "the peer resumed a TLS session instead of presenting its certificate"


# --- the transports: MutualTlsAccept (inbound) and secure() (outbound) count and explain every refusal -----------


def identity_source(leaf: Leaf) -> SimpleNamespace:
    """An IdentitySource holding `leaf`, as FileIdentity gives it to the transports."""
    return SimpleNamespace(current=load_identity(IdentityFiles(cert=leaf.cert, key=leaf.key, bundle=leaf.bundle)))


def refusals(metrics: Metrics, direction: str) -> dict[str, float]:
    """mesh_tls_refused_total of one direction, by reason (reasons never counted left out)."""
    counts = {}
    for reason in TLS_REFUSAL_REASONS:
        value = metrics.registry.get_sample_value("mesh_tls_refused_total", {"direction": direction, "reason": reason})
        if value:
            counts[reason] = value
    return counts


def inbound(certs: Certs, metrics: Metrics, *, handshake_timeout: float = 5.0, identity: Any = None) -> MutualTlsAccept:
    authorizer = Authorizer([], [], trust_domain=TD, namespace="default", datacenter="dc1")
    return MutualTlsAccept(
        identity or identity_source(certs.api), authorizer, handshake_timeout=handshake_timeout, metrics=metrics
    )


async def accept_one(acceptor: MutualTlsAccept, client: Any) -> tuple[Accepted | None, list[dict[str, Any]]]:
    """`acceptor.accept()` on one connection from `await client(port)`; an accepted stream is closed cleanly."""
    listener, port = await tcp_listener()
    async with listener:
        with structlog.testing.capture_logs() as logs, trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client, port)
                accepted = await acceptor.accept(await listener.accept())
                if accepted is not None:
                    await accepted.stream.aclose()
    return accepted, logs


def tls_client(ctx: ssl.SSLContext) -> Any:
    """A client that runs the handshake with `ctx` and hangs up, whatever the outcome."""

    async def run(port: int) -> None:
        try:
            stream = await tls.tls_connect(socket.create_connection(("127.0.0.1", port)), ctx, server_hostname="api")
        except TlsHandshakeError:
            return
        stream.close()

    return run


def events(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


@pytest.mark.parametrize("case", NOT_SVID)
async def test_inbound_refuses_a_caller_whose_leaf_is_not_an_x509_svid(certs: Certs, case: str) -> None:
    metrics = Metrics()
    bad = certs.not_svid[case]
    accepted, logs = await accept_one(
        inbound(certs, metrics), tls_client(tls.client_context(bad.cert, bad.key, bad.bundle))
    )
    assert accepted is None
    (event,) = events(logs, "mTLS handshake refused")
    assert (event["reason"], event["refusal"]) == (NOT_SVID[case][1], "not_svid")
    assert refusals(metrics, "inbound") == {"not_svid": 1.0}


async def test_inbound_refuses_a_resumed_session(certs: Certs) -> None:
    metrics = Metrics()
    acceptor = inbound(certs, metrics)  # one identity: one server context, whose cache holds the session
    client_context = tls12_client(certs.web)
    sessions: list[ssl.SSLSession] = []

    async def client(port: int) -> None:
        offered = sessions[0] if sessions else None
        sock = await trio.to_thread.run_sync(blocking_connect, port, client_context, offered)
        sessions.append(sock.session)
        await trio.to_thread.run_sync(blocking_close, sock)

    first, _ = await accept_one(acceptor, client)
    assert first is not None and first.peer_identity == svc("web")
    second, logs = await accept_one(acceptor, client)
    assert sessions[1].id == sessions[0].id  # the client resumed
    assert second is None
    (event,) = events(logs, "mTLS handshake refused")
    assert event["reason"] == "the peer resumed a TLS session instead of presenting its certificate"
    assert refusals(metrics, "inbound") == {"session_reused": 1.0}


async def test_inbound_counts_every_refusal(certs: Certs) -> None:
    metrics = Metrics()
    good, logs = await accept_one(inbound(certs, metrics), tls_client(client_ctx(certs.web)))
    assert good is not None and good.peer_identity == svc("web") and logs == []

    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.load_verify_locations(certs.api.bundle)
    _, logs = await accept_one(inbound(certs, metrics), tls_client(no_cert))
    assert [event["reason"] for event in events(logs, "mTLS handshake refused")] == ["peer sent no certificate"]

    async def silent(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            await trio.lowlevel.wait_readable(sock)  # until the inbound gives up and closes

    _, logs = await accept_one(inbound(certs, metrics, handshake_timeout=0.05), silent)
    assert [event["reason"] for event in events(logs, "mTLS handshake refused")] == ["handshake timed out"]

    nothing = SimpleNamespace(current=None)
    _, logs = await accept_one(inbound(certs, metrics, identity=nothing), tls_client(client_ctx(certs.web)))
    assert len(events(logs, "mTLS connection refused: this sidecar has no usable certificate")) == 1
    assert refusals(metrics, "inbound") == {"handshake_failed": 1.0, "handshake_timeout": 1.0, "no_certificate": 1.0}


class ResumingContext(ssl.SSLContext):
    """A client context that offers the session of an earlier connection again: what our own contexts never do."""

    session: ssl.SSLSession | None = None

    def wrap_socket(self, sock: socket.socket, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        return super().wrap_socket(sock, session=self.session, **kwargs)


def blocking_serve(listener: socket.socket, ctx: ssl.SSLContext) -> ssl.SSLSocket | OSError:
    """Accept one connection and run the server side of the handshake (run it in a thread)."""
    conn, _ = listener.accept()
    conn.settimeout(5)
    try:
        return ctx.wrap_socket(conn, server_side=True)
    except OSError as exc:
        conn.close()
        return exc


def upstream(certs: Certs, metrics: Metrics, *, expected: str = "api", identity: Any = None) -> UpstreamTls:
    return UpstreamTls(
        identity or identity_source(certs.web), expected_id=svc(expected), server_name="api", metrics=metrics
    )


async def secure_to(
    server_context: ssl.SSLContext, upstream_tls: UpstreamTls
) -> tuple[ssl.SSLSocket | OSError, TlsStream | MeshError, list[dict[str, Any]]]:
    """secure() to a blocking stdlib server in a thread: (its side, ours, the log events)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        results: dict[str, Any] = {}

        async def serve() -> None:
            results["server"] = await trio.to_thread.run_sync(blocking_serve, listener, server_context)

        with structlog.testing.capture_logs() as logs, trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                try:
                    results["client"] = await secure(socket.create_connection(listener.getsockname()), upstream_tls)
                except MeshError as exc:
                    results["client"] = exc
    return results["server"], results["client"], logs


def closed_server(server: ssl.SSLSocket | OSError) -> None:
    if isinstance(server, ssl.SSLSocket):
        server.close()


@pytest.mark.parametrize("case", NOT_SVID)
async def test_outbound_refuses_a_peer_whose_leaf_is_not_an_x509_svid(certs: Certs, case: str) -> None:
    metrics = Metrics()
    bad = certs.not_svid[case]
    server, client, logs = await secure_to(tls.server_context(bad.cert, bad.key, bad.bundle), upstream(certs, metrics))
    closed_server(server)
    assert isinstance(client, MeshError)
    assert (client.status, client.code, client.reason) == (
        502,
        "tls_identity",
        f"upstream identity refused: {NOT_SVID[case][1]}",
    )
    (event,) = events(logs, "mTLS upstream refused")
    assert (event["reason"], event["refusal"]) == (NOT_SVID[case][1], "not_svid")
    assert refusals(metrics, "outbound") == {"not_svid": 1.0}


async def test_outbound_refuses_a_resumed_session(certs: Certs) -> None:
    metrics = Metrics()
    server_context = server_ctx(certs.api)  # one context: one session cache
    resuming = tls12_client(certs.web, ResumingContext)
    identity = SimpleNamespace(current=SimpleNamespace(client_context_http1=resuming))
    upstream_tls = upstream(certs, metrics, identity=identity)
    server, client, _ = await secure_to(server_context, upstream_tls)
    assert isinstance(server, ssl.SSLSocket) and isinstance(client, TlsStream)
    resuming.session = client.socket.session
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, blocking_close, server)
        await client.aclose()

    server, client, logs = await secure_to(server_context, upstream_tls)
    assert isinstance(server, ssl.SSLSocket) and server.session_reused  # this server let the client resume
    server.close()
    assert isinstance(client, MeshError)
    reason = "the peer resumed a TLS session instead of presenting its certificate"
    assert (client.code, client.reason) == ("tls_identity", f"upstream identity refused: {reason}")
    (event,) = events(logs, "mTLS upstream refused")
    assert (event["reason"], event["refusal"]) == (reason, "session_reused")
    assert refusals(metrics, "outbound") == {"session_reused": 1.0}


async def test_outbound_codes_and_counts_every_refusal(certs: Certs) -> None:
    metrics = Metrics()
    without_certificate = upstream(certs, metrics, identity=SimpleNamespace(current=None))
    ours, theirs = socket.socketpair()
    with theirs, pytest.raises(MeshError) as info:
        await secure(ours, without_certificate)  # closes `ours`
    assert (info.value.code, info.value.reason) == ("no_certificate", "no usable certificate for mutual TLS")

    impostor = tls.server_context(certs.other_ca_web.cert, certs.other_ca_web.key, certs.web.bundle)
    server, client, _ = await secure_to(impostor, upstream(certs, metrics))
    closed_server(server)
    assert isinstance(client, MeshError) and client.code == "tls_failed"
    assert client.reason.startswith("upstream TLS handshake failed: certificate verify failed: unable to get local")

    server, client, _ = await secure_to(server_ctx(certs.api), upstream(certs, metrics, expected="db"))
    closed_server(server)
    assert isinstance(client, MeshError)
    assert (client.code, client.reason) == (
        "tls_identity",
        f"upstream identity mismatch: expected {svc('db')}, got {svc('api')}",
    )
    assert refusals(metrics, "outbound") == {"no_certificate": 1.0, "handshake_failed": 1.0, "identity_mismatch": 1.0}


# --- the stream -------------------------------------------------------------------------------------------------


async def test_4_mib_each_way_concurrently(certs: Certs) -> None:
    server, client = await connected(certs)
    payloads = {server: os.urandom(4 * 1024 * 1024), client: os.urandom(4 * 1024 * 1024)}
    digests: dict[TlsStream, str] = {}

    async def send(stream: TlsStream, chunked: bool) -> None:
        data = payloads[stream]
        if chunked:  # odd sizes, so records and reads never line up
            view = memoryview(data)
            while view:
                await stream.send_all(view[:70001])
                view = view[70001:]
        else:  # one call: OpenSSL must be re-driven with the same buffer many times
            await stream.send_all(data)
        await stream.send_eof()

    async def receive(stream: TlsStream) -> None:
        digest = hashlib.sha256()
        while data := await stream.receive_some(30000):
            digest.update(data)
        digests[stream] = digest.hexdigest()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, client, False)
            nursery.start_soon(send, server, True)
            nursery.start_soon(receive, client)
            nursery.start_soon(receive, server)
    assert digests[server] == hashlib.sha256(payloads[client]).hexdigest()
    assert digests[client] == hashlib.sha256(payloads[server]).hexdigest()
    await server.aclose()
    await client.aclose()


async def test_half_close_each_way(certs: Certs) -> None:
    server, client = await connected(certs)
    with trio.fail_after(5):
        await client.send_all(b"request")
        await client.send_eof()  # FIN only: the server may still be sending
        await client.send_eof()  # a second time is a no-op
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"more")
        assert await server.receive_some() == b"request"
        assert await server.receive_some() == b""
        assert await server.receive_some() == b""  # EOF stays EOF
        # the server still sends after the client's EOF, then closes its side with a close_notify
        await server.send_all(b"response")
        await server.send_eof()
        assert await client.receive_some() == b"response"
        assert await client.receive_some() == b""
    await server.aclose()
    await client.aclose()


async def test_close_notify_from_aclose_reads_as_eof(certs: Certs) -> None:
    server, client = await connected(certs)
    with trio.fail_after(5):
        await server.send_all(b"bye")
        await server.aclose()
        assert await client.receive_some() == b"bye"
        assert await client.receive_some() == b""
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some()
    await client.aclose()


async def strict_peer(certs: Certs) -> tuple[TlsStream, ssl.SSLSocket]:
    """A TlsStream server and a blocking stdlib client that reports a FIN without close_notify as an error."""
    ctx = client_ctx(certs.web)
    ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    a, b = socket.socketpair()
    peer = ctx.wrap_socket(b, server_hostname="api", suppress_ragged_eofs=False, do_handshake_on_connect=False)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, peer.do_handshake)
            server = await tls.tls_accept(a, server_ctx(certs.api))
    return server, peer


async def test_aclose_sends_close_notify(certs: Certs) -> None:
    server, peer = await strict_peer(certs)
    with peer:
        await server.send_all(b"bye")
        await server.aclose()
        assert peer.recv(10) == b"bye"
        assert peer.recv(10) == b""  # a close_notify, not a bare FIN (which would raise SSLEOFError)


async def test_send_eof_is_a_bare_fin_while_the_peer_may_still_send(certs: Certs) -> None:
    server, peer = await strict_peer(certs)
    with peer:
        await server.send_eof()
        with pytest.raises(ssl.SSLEOFError):
            peer.recv(10)
    server.close()


async def test_send_eof_sends_close_notify_once_the_peer_has_finished(certs: Certs) -> None:
    server, peer = await strict_peer(certs)
    with peer, trio.fail_after(5):
        peer.sendall(b"request")
        async with trio.open_nursery() as nursery:
            # the peer sends its close_notify and waits for ours
            nursery.start_soon(trio.to_thread.run_sync, peer.unwrap)
            assert await server.receive_some() == b"request"
            assert await server.receive_some() == b""
            await server.send_eof()
    await server.aclose()


async def test_two_waits_for_the_same_direction_share_one_trio_wait(certs: Certs) -> None:
    # trio allows one waiter per socket and direction; a receive that needs writability (OpenSSL writing an
    # alert) while a send waits for it must not fail with BusyResourceError.
    server, client = await connected(certs)
    with trio.move_on_after(0.1):
        await client.send_all(b"x" * (8 * 1024 * 1024))  # clog the connection
    woken = []

    async def wait_writable(name: str) -> None:
        await client._wait(1)
        woken.append(name)

    async def drain() -> None:
        while True:
            await server.receive_some()

    with trio.fail_after(5):
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as waiters:
                waiters.start_soon(wait_writable, "first")
                waiters.start_soon(wait_writable, "second")
                await trio.testing.wait_all_tasks_blocked()
                assert woken == []
                outer.start_soon(drain)  # the kernel buffers get room again
            outer.cancel_scope.cancel()
    assert sorted(woken) == ["first", "second"]
    server.close()
    client.close()


async def test_cancelling_a_blocked_receive_leaves_the_stream_usable(certs: Certs) -> None:
    server, client = await connected(certs)
    with trio.move_on_after(0.05) as scope:
        await server.receive_some()
    assert scope.cancelled_caught
    await client.send_all(b"after")
    with trio.fail_after(5):
        assert await server.receive_some() == b"after"
    await server.aclose()
    await client.aclose()


async def test_close_wakes_a_blocked_receive(certs: Certs) -> None:
    server, client = await connected(certs)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await server.receive_some()

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            server.close()
    client.close()


async def test_a_cancelled_send_breaks_the_sending_side(certs: Certs) -> None:
    server, client = await connected(certs)
    with trio.move_on_after(0.1) as scope:
        await client.send_all(b"x" * (8 * 1024 * 1024))  # nobody reads: the socket buffers fill up
    assert scope.cancelled_caught
    with pytest.raises(trio.BrokenResourceError, match="interrupted"):
        await client.send_all(b"y")
    server.close()
    client.close()


async def test_sending_to_a_vanished_peer_is_a_broken_resource(certs: Certs) -> None:
    server, client = await connected(certs)
    server.close()
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as info:
        for _ in range(100):  # the first writes may still succeed
            await client.send_all(b"x" * 65536)
    assert isinstance(info.value.__cause__, OSError)
    client.close()


async def test_closed_stream_refuses_calls(certs: Certs) -> None:
    server, client = await connected(certs)
    server.close()
    server.close()  # idempotent
    for call in (server.receive_some(), server.send_all(b"x"), server.send_eof()):
        with pytest.raises(trio.ClosedResourceError):
            await call
    await server.aclose()
    client.close()
