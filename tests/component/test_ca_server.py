"""`mesh ca serve` over real TLS on loopback: the bundle, tokens, certificate renewal, refusals, limits and logs."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from ca import tokens
from ca.authority import CertificateAuthority, fingerprint
from ca.server import ServerLimits, serve_ca
from mesh import spiffe
from mesh.config import Address
from mesh.listener import Drain

TD = "mesh.local"
WEB_ID = "spiffe://mesh.local/ns/default/dc/dc1/svc/web"
API_ID = "spiffe://mesh.local/ns/default/dc/dc1/svc/api"
SERVER_ID = "spiffe://mesh.local/ns/default/dc/dc1/svc/mesh-ca"
TIMEOUT = 10


# --- a small HTTPS client: stdlib ssl through trio.SSLStream, one request per connection ---


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)

    @property
    def error(self) -> str:
        data = self.json()
        assert set(data) == {"error"}, data
        return data["error"]


def client_context(bundle_pem: bytes, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """Trusts the bundle; no host name check, since the server is identified by its SPIFFE ID (checked below)."""
    ctx = ssl.create_default_context(cadata=bundle_pem.decode())
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


async def connect(address: Address, ctx: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream(address.host, address.port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="mesh-ca", https_compatible=True)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    assert spiffe.peer_identity(stream.getpeercert()) == SERVER_ID
    return stream


def request_bytes(
    method: str, path: str, *, body: bytes | None = None, headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: mesh-ca", "connection: close", *(f"{k}: {v}" for k, v in headers)]
    if body is not None:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def read_response(stream: trio.abc.ReceiveStream) -> Response:
    """One response with a Content-Length body (the API always sends one)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        assert chunk, f"connection closed before a response head: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = await stream.receive_some()
        assert chunk, "connection closed mid-body"
        body += chunk
    assert len(body) == length
    return Response(int(status_line.split()[1]), headers, body)


async def exchange(address: Address, ctx: ssl.SSLContext, raw: bytes) -> Response:
    with trio.fail_after(TIMEOUT):
        stream = await connect(address, ctx)
        try:
            await stream.send_all(raw)
            return await read_response(stream)
        finally:
            await trio.aclose_forcefully(stream)


# --- CSRs and certificates ---


def new_csr(cn: str | None = "web", sans: Sequence[x509.GeneralName] = ()) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return key, builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_pair(directory: Path, name: str, cert_pem: bytes, key: bytes) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key)
    return cert_file, key_file


def uri_sans(certificate: x509.Certificate) -> list[str]:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(list(names)) == len(names.get_values_for_type(x509.UniformResourceIdentifier))
    return names.get_values_for_type(x509.UniformResourceIdentifier)


# --- the server under test ---


@dataclass
class Server:
    address: Address
    directory: Path
    logs: list[dict[str, Any]]
    drain: Drain

    @property
    def ca(self) -> CertificateAuthority:
        return CertificateAuthority.load(self.directory)

    def context(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        return client_context(self.ca.bundle_pem(), cert)

    async def get(self, path: str, ctx: ssl.SSLContext | None = None) -> Response:
        return await exchange(self.address, ctx or self.context(), request_bytes("GET", path))

    async def post(
        self,
        payload: Any,
        *,
        token: str | None = None,
        cert: tuple[Path, Path] | None = None,
        headers: Sequence[tuple[str, str]] = (("content-type", "application/json"),),
        path: str = "/v1/certificate",
    ) -> Response:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        all_headers = list(headers) + ([("authorization", f"Bearer {token}")] if token else [])
        raw = request_bytes("POST", path, body=body, headers=all_headers)
        return await exchange(self.address, self.context(cert), raw)

    def requests(self) -> list[dict[str, Any]]:
        return [entry for entry in self.logs if entry["event"] == "request"]

    def last_request(self) -> dict[str, Any]:
        return self.requests()[-1]


@pytest.fixture(params=[False, True], ids=["root-signs", "intermediate"])
def ca_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    # created a month ago, so that it can issue certificates with real past validity
    created = datetime.now(UTC) - timedelta(days=30)
    CertificateAuthority.init(tmp_path / "ca", TD, now=created, intermediate=request.param)
    return tmp_path / "ca"


LIMITS = ServerLimits(head_timeout=1, body_timeout=1, handshake_timeout=1, drain_timeout=1)


@pytest.fixture
async def server(nursery: trio.Nursery, ca_dir: Path) -> AsyncIterator[Server]:
    drain = Drain()
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[Address]) -> None:
        try:
            await serve_ca(ca_dir, "127.0.0.1:0", limits=LIMITS, drain=drain, task_status=task_status)
        finally:
            stopped.set()

    with structlog.testing.capture_logs() as logs:
        address = await nursery.start(run)
        yield Server(address, ca_dir, logs, drain)
        # stopped by a drain, as on SIGTERM (serve_tcp closes its listening socket on a drain, not on a cancel)
        drain.start()
        with trio.fail_after(TIMEOUT):
            await stopped.wait()


async def obtain(server: Server, service: str, tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for `service` through the API with a token, written to files for a client context."""
    key, csr = new_csr(service)
    response = await server.post({"csr": csr}, token=tokens.create(server.directory, service))
    assert response.status == 200, response.body
    return write_pair(tmp_path / "clients", service, response.json()["certificate"].encode(), key_pem(key))


# --- the bundle ---


async def test_bundle_needs_no_token_and_the_server_is_the_mesh_ca_identity(server: Server) -> None:
    response = await server.get("/v1/bundle")
    assert response.status == 200
    assert response.headers["content-type"] == "application/x-pem-file"
    assert response.body == server.ca.bundle_pem()
    assert server.last_request() | {"duration_s": 0} == {
        "event": "request",
        "log_level": "info",
        "method": "GET",
        "path": "/v1/bundle",
        "status": 200,
        "peer": server.last_request()["peer"],
        "duration_s": 0,
    }


# --- signing with a token ---


async def test_a_token_for_a_service_obtains_that_service_certificate(server: Server) -> None:
    key, csr = new_csr("web")
    token = tokens.create(server.directory, "web")
    response = await server.post({"csr": csr, "ttl": "2h"}, token=token)
    assert response.status == 200, response.body
    data = response.json()
    assert set(data) == {"certificate", "bundle", "spiffe_id", "not_after"}
    assert data["spiffe_id"] == WEB_ID
    assert data["bundle"].encode() == server.ca.bundle_pem()
    leaf, *intermediates = x509.load_pem_x509_certificates(data["certificate"].encode())
    assert uri_sans(leaf) == [WEB_ID]
    assert leaf.public_key() == key.public_key()
    assert datetime.fromisoformat(data["not_after"]) == leaf.not_valid_after_utc
    assert data["not_after"].endswith("Z")
    assert timedelta(hours=1, minutes=59) < leaf.not_valid_after_utc - datetime.now(UTC) <= timedelta(hours=2)
    store = Store(x509.load_pem_x509_certificates(data["bundle"].encode()))
    chain = PolicyBuilder().store(store).build_client_verifier().verify(leaf, intermediates)
    assert chain.subjects == [x509.UniformResourceIdentifier(WEB_ID)]
    line = server.last_request()
    assert line["status"] == 200 and line["auth"] == "token" and line["caller"] == WEB_ID
    assert line["token_id"] == tokens.token_id(token) and line["serial"] == f"{leaf.serial_number:x}"


async def test_the_ttl_is_capped_by_the_ca(server: Server) -> None:
    _, csr = new_csr("web")
    response = await server.post({"csr": csr, "ttl": "100000h"}, token=tokens.create(server.directory, "web"))
    assert response.status == 200
    leaf = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
    assert leaf.not_valid_after_utc - datetime.now(UTC) <= server.ca.max_leaf_ttl


@pytest.mark.parametrize(
    ("cn", "sans", "expected"),
    [
        ("web", [x509.UniformResourceIdentifier(API_ID)], f"URI:{API_ID}"),
        ("api", [], "CN=api"),
        ("web", [x509.UniformResourceIdentifier(WEB_ID), x509.DNSName("web.example")], "DNS:web.example"),
        ("web", [x509.DNSName("web.example")], "DNS:web.example"),
    ],
    ids=["san-of-another-service", "cn-of-another-service", "extra-dns-san", "dns-san-only"],
)
async def test_a_csr_asking_for_anything_but_the_proven_identity_is_refused(
    server: Server, cn: str, sans: list[x509.GeneralName], expected: str
) -> None:
    _, csr = new_csr(cn, sans)
    response = await server.post({"csr": csr}, token=tokens.create(server.directory, "web"))
    assert response.status == 400
    assert expected in response.error
    line = server.last_request()
    assert line["status"] == 400 and line["caller"] == WEB_ID and "serial" not in line  # nothing was signed


@pytest.mark.parametrize(
    ("payload", "headers", "expected"),
    [
        (b"{not json", (("content-type", "application/json"),), "not valid JSON"),
        (b"[1, 2]", (("content-type", "application/json"),), "JSON object"),
        ({"csr": "x"}, (("content-type", "text/plain"),), "content-type: application/json"),
        ({"ttl": "1h"}, (("content-type", "application/json"),), 'no "csr"'),
        ({"csr": "x", "service": "api"}, (("content-type", "application/json"),), "unknown field 'service'"),
        ({"csr": "x", "ttl": "soon"}, (("content-type", "application/json"),), "invalid ttl"),
        ({"csr": "not a csr"}, (("content-type", "application/json"),), "not a PEM certificate request"),
    ],
    ids=["bad-json", "not-an-object", "wrong-content-type", "no-csr", "unknown-field", "bad-ttl", "bad-csr"],
)
async def test_bad_requests_get_400_with_one_clear_sentence(
    server: Server, payload: Any, headers: Sequence[tuple[str, str]], expected: str
) -> None:
    response = await server.post(payload, token=tokens.create(server.directory, "web"), headers=headers)
    assert response.status == 400
    assert expected in response.error and "\n" not in response.error


@pytest.mark.parametrize("kind", ["expired", "revoked", "unknown", "other-scheme"])
async def test_unusable_tokens_get_401(server: Server, kind: str) -> None:
    _, csr = new_csr("web")
    past = datetime.now(UTC) - timedelta(hours=2)
    token = {
        "expired": lambda: tokens.create(server.directory, "web", timedelta(hours=1), now=past),
        "revoked": lambda: tokens.create(server.directory, "web"),
        "unknown": lambda: "not-a-token-of-this-ca",
        "other-scheme": lambda: tokens.create(server.directory, "web"),
    }[kind]()
    if kind == "revoked":
        tokens.revoke(server.directory, token)
    if kind == "other-scheme":
        headers = [("content-type", "application/json"), ("authorization", f"Basic {token}")]
        response = await server.post({"csr": csr}, headers=headers)
    else:
        response = await server.post({"csr": csr}, token=token)
    assert response.status == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    expected = {
        "expired": "expired at",
        "revoked": "was revoked",
        "unknown": "not recognised",
        "other-scheme": "Bearer",
    }
    assert expected[kind] in response.error
    assert "serial" not in server.last_request()
    assert token not in repr(server.logs)


async def test_no_credentials_get_401(server: Server) -> None:
    _, csr = new_csr("web")
    response = await server.post({"csr": csr})
    assert response.status == 401
    assert "no credentials" in response.error


async def test_a_damaged_token_store_is_the_cas_problem_500_and_logged_once(server: Server) -> None:
    token = tokens.create(server.directory, "web")
    (server.directory / tokens.TOKENS_FILE).write_text("{damaged")
    _, csr = new_csr("web")
    for _ in range(2):
        response = await server.post({"csr": csr}, token=token)
        assert response.status == 500 and "token store" in response.error
    problems = [entry for entry in server.logs if entry["event"] == "CA problem"]
    assert len(problems) == 1 and "damaged token store" in problems[0]["problem"]


async def test_the_ca_servers_own_identity_is_never_signed(server: Server) -> None:
    _, csr = new_csr("mesh-ca")
    response = await server.post({"csr": csr}, token=tokens.create(server.directory, "mesh-ca"))
    assert response.status == 403
    assert "CA server itself" in response.error


async def test_a_token_made_while_serving_works_at_once(server: Server) -> None:
    assert (await server.get("/v1/bundle")).status == 200
    _, csr = new_csr("api")
    response = await server.post({"csr": csr}, token=tokens.create(server.directory, "api"))
    assert response.status == 200
    assert response.json()["spiffe_id"] == API_ID


# --- renewal with the current certificate ---


async def test_renewal_with_a_valid_client_certificate_and_no_token(server: Server, tmp_path: Path) -> None:
    current = await obtain(server, "web", tmp_path)
    key, csr = new_csr(None)
    response = await server.post({"csr": csr}, cert=current)
    assert response.status == 200, response.body
    data = response.json()
    assert data["spiffe_id"] == WEB_ID
    leaf = x509.load_pem_x509_certificate(data["certificate"].encode())
    assert uri_sans(leaf) == [WEB_ID] and leaf.public_key() == key.public_key()
    line = server.last_request()
    assert line["auth"] == "certificate" and line["caller"] == WEB_ID and "token_id" not in line


async def test_renewal_cannot_change_the_identity(server: Server, tmp_path: Path) -> None:
    current = await obtain(server, "web", tmp_path)
    _, csr = new_csr(None, [x509.UniformResourceIdentifier(API_ID)])
    response = await server.post({"csr": csr}, cert=current)
    assert response.status == 400
    assert f"only URI:{WEB_ID}" in response.error


async def test_a_token_wins_over_a_presented_certificate(server: Server, tmp_path: Path) -> None:
    current = await obtain(server, "web", tmp_path)
    _, csr = new_csr("web")
    response = await server.post({"csr": csr}, cert=current, token="not-a-token-of-this-ca")
    assert response.status == 401  # the token is the credential when one is sent: no fallback to the certificate


async def test_a_certificate_from_another_ca_is_refused(server: Server, tmp_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other", TD)  # same trust domain, same SPIFFE ID
    issued = other.issue("web")
    assert issued.key_pem is not None
    cert = write_pair(tmp_path / "clients", "impostor", issued.cert_pem, issued.key_pem)
    _, csr = new_csr("web")
    try:
        response = await server.post({"csr": csr}, cert=cert)
    except trio.BrokenResourceError:
        pass  # TLS 1.3: the client learns of the refusal on its first read
    else:
        pytest.fail(f"the server answered {response.status}")
    refused = [entry for entry in server.logs if entry["event"] == "TLS handshake refused"]
    assert refused and "certificate verify failed" in refused[0]["reason"]
    assert server.requests() == []


async def test_an_expired_certificate_is_refused(server: Server, tmp_path: Path) -> None:
    issued = server.ca.issue("web", ttl=timedelta(hours=1), now=datetime.now(UTC) - timedelta(days=2))
    assert issued.key_pem is not None
    cert = write_pair(tmp_path / "clients", "expired", issued.cert_pem, issued.key_pem)
    _, csr = new_csr("web")
    with pytest.raises(trio.BrokenResourceError):
        await server.post({"csr": csr}, cert=cert)
    assert server.requests() == []


async def test_a_certificate_of_another_trust_domain_gets_403(server: Server, tmp_path: Path) -> None:
    # Signed by this CA's own signing key (as a misused key could): only the trust domain is wrong.
    signer = server.ca.signing_root()
    name = "intermediate-key.pem" if signer.intermediate else "key.pem"
    signer_key = serialization.load_pem_private_key((server.directory / "roots/1" / name).read_bytes(), None)
    assert isinstance(signer_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))
        .issuer_name(signer.issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://other.example/ns/default/dc/dc1/svc/web")]
            ),
            critical=False,
        )
        .sign(signer_key, hashes.SHA256())
    )
    chain = leaf.public_bytes(serialization.Encoding.PEM)
    if signer.intermediate:
        chain += signer.intermediate.public_bytes(serialization.Encoding.PEM)
    cert = write_pair(tmp_path / "clients", "foreign", chain, key_pem(key))
    _, csr = new_csr("web")
    response = await server.post({"csr": csr}, cert=cert)
    assert response.status == 403
    assert "trust domain 'other.example', not 'mesh.local'" in response.error


# --- rotation while serving ---


async def test_rotation_while_serving_reaches_the_bundle_and_the_servers_own_certificate(server: Server) -> None:
    old_bundle = server.ca.bundle_pem()
    server.ca.rotate()  # as `mesh ca rotate` would, from another process
    # published, not signing yet: clients that know only root 1 still verify the server
    response = await server.get("/v1/bundle", client_context(old_bundle))
    assert len(x509.load_pem_x509_certificates(response.body)) == 2
    new_bundle = response.body
    server.ca.activate()
    ctx = client_context(new_bundle)
    with trio.fail_after(TIMEOUT):
        stream = await connect(server.address, ctx)
        server_certificate = x509.load_der_x509_certificate(stream.getpeercert(binary_form=True) or b"")
        await trio.aclose_forcefully(stream)
    assert "root 2" in server_certificate.issuer.rfc4514_string() or "intermediate 2" in str(server_certificate.issuer)
    _, csr = new_csr("web")
    raw = request_bytes(
        "POST",
        "/v1/certificate",
        body=json.dumps({"csr": csr}).encode(),
        headers=[
            ("content-type", "application/json"),
            ("authorization", f"Bearer {tokens.create(server.directory, 'web')}"),
        ],
    )
    issued = (await exchange(server.address, ctx, raw)).json()
    leaf = x509.load_pem_x509_certificates(issued["certificate"].encode())[0]
    root_2 = server.ca.root(2)
    leaf.verify_directly_issued_by(root_2.issuer)
    assert issued["bundle"].encode() == new_bundle


# --- HTTP: routes, limits, slow clients ---


async def test_unknown_paths_get_404_and_wrong_methods_405(server: Server) -> None:
    response = await server.get("/v1/nothing")
    assert response.status == 404 and "GET /v1/bundle and POST /v1/certificate" in response.error
    response = await server.get("/v1/certificate")
    assert response.status == 405 and response.headers["allow"] == "POST"
    response = await server.post({}, path="/v1/bundle")
    assert response.status == 405 and response.headers["allow"] == "GET, HEAD"


async def test_a_body_over_64_kib_gets_413(server: Server) -> None:
    token = tokens.create(server.directory, "web")
    response = await server.post({"csr": "x" * 70000}, token=token)
    assert response.status == 413
    assert "larger than 65536 bytes" in response.error
    # the same without a Content-Length: a chunked body is counted as it arrives
    chunk = b"x" * 16384
    head = request_bytes(
        "POST",
        "/v1/certificate",
        headers=[
            ("content-type", "application/json"),
            ("transfer-encoding", "chunked"),
            ("authorization", f"Bearer {token}"),
        ],
    )
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    response = await exchange(server.address, server.context(), head + body)
    assert response.status == 413
    assert token not in repr(server.logs)


async def test_keep_alive_serves_several_requests_on_one_connection(server: Server) -> None:
    first = b"GET /v1/bundle HTTP/1.1\r\nhost: mesh-ca\r\n\r\n"
    with trio.fail_after(TIMEOUT):
        stream = await connect(server.address, server.context())
        try:
            await stream.send_all(first + request_bytes("GET", "/v1/bundle"))
            one, two = await read_response(stream), await read_response(stream)
        finally:
            await trio.aclose_forcefully(stream)
    assert one.status == two.status == 200
    assert "connection" not in one.headers and two.headers["connection"] == "close"


async def test_a_slow_client_never_blocks_others_and_is_timed_out(server: Server) -> None:
    silent = await trio.open_tcp_stream(server.address.host, server.address.port)  # never starts a handshake
    slow = await connect(server.address, server.context())
    await slow.send_all(b"GET /v1/bundle HTTP/1.1\r\nhost: mes")  # a head that never ends
    try:
        with trio.fail_after(TIMEOUT):
            assert (await server.get("/v1/bundle")).status == 200
        # answered while both slow clients were still waiting for their timeouts
        assert [entry["event"] for entry in server.logs if entry["event"] != "CA state reloaded"][-1] == "request"
        assert len(server.requests()) == 1
        with trio.fail_after(TIMEOUT):
            response = await read_response(slow)
            assert response.status == 408 and "did not arrive within 1s" in response.error
            assert await silent.receive_some() == b""  # the handshake timed out: closed
    finally:
        await trio.aclose_forcefully(slow)
        await trio.aclose_forcefully(silent)
    assert any(entry.get("reason") == "handshake timed out" for entry in server.logs)


async def test_protocol_upgrades_are_refused(server: Server) -> None:
    raw = request_bytes("GET", "/v1/bundle", headers=[("connection", "upgrade"), ("upgrade", "websocket")])
    response = await exchange(server.address, server.context(), raw.replace(b"connection: close\r\n", b""))
    assert response.status == 400 and "a protocol upgrade" in response.error


async def test_a_drain_closes_idle_connections_at_once_and_stops_listening(server: Server) -> None:
    stream = await connect(server.address, server.context())
    try:
        await stream.send_all(b"GET /v1/bundle HTTP/1.1\r\nhost: mesh-ca\r\n\r\n")
        with trio.fail_after(TIMEOUT):
            assert (await read_response(stream)).status == 200
        server.drain.start()
        with trio.fail_after(LIMITS.head_timeout / 2):  # not the idle timeout: the drain itself
            assert await stream.receive_some() == b""
    finally:
        await trio.aclose_forcefully(stream)
    with pytest.raises(OSError):
        await trio.open_tcp_stream(server.address.host, server.address.port)


# --- the command ---


async def _run_serve(ca_dir: Path, token: str) -> tuple[int, str, str]:
    """Start `mesh ca serve`, use it, stop it with SIGTERM: (exit status, stdout, stderr)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mesh.cli", "ca", "serve", "--dir", str(ca_dir), "--bind", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = b""

    async def collect_stderr() -> None:
        nonlocal stderr
        assert process.stderr is not None
        async for chunk in process.stderr:
            stderr += chunk

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect_stderr)
            out = b""
            with trio.fail_after(20):
                while b"stop with" not in out:
                    chunk = await process.stdout.receive_some()
                    assert chunk, stderr.decode()
                    out += chunk
            port = int(out.split(b"https://127.0.0.1:")[1].split()[0])
            address = Address("127.0.0.1", port)
            bundle = CertificateAuthority.load(ca_dir).bundle_pem()
            ctx = client_context(bundle)
            assert (await exchange(address, ctx, request_bytes("GET", "/v1/bundle"))).body == bundle
            _, csr = new_csr("web")
            body = json.dumps({"csr": csr}).encode()
            headers = [("content-type", "application/json"), ("authorization", f"Bearer {token}")]
            response = await exchange(
                address, ctx, request_bytes("POST", "/v1/certificate", body=body, headers=headers)
            )
            assert response.status == 200
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                status = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stdout.aclose()
        await process.stderr.aclose()
    return status, out.decode(), stderr.decode()


async def test_mesh_ca_serve_prints_address_and_fingerprints_and_stops_on_sigterm(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TD)
    token = tokens.create(ca.directory, "web")
    status, out, err = await _run_serve(ca.directory, token)
    assert status == 0, err
    assert f"SHA-256 {fingerprint(ca.root(1).certificate)}" in out
    assert SERVER_ID in out
    lines = [json.loads(line) for line in err.splitlines()]
    issued = [line for line in lines if line["event"] == "request" and line["status"] == 200]
    assert [line["path"] for line in issued] == ["/v1/bundle", "/v1/certificate"]
    assert issued[1]["token_id"] == tokens.token_id(token)
    assert token not in err and token not in out
    assert b"PRIVATE KEY" not in (err + out).encode()


def test_mesh_ca_serve_without_a_ca_exits_1_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "ca", "serve", "--dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("mesh ca serve: ") and result.stderr.count("\n") == 1, result.stderr
    assert "does not exist" in result.stderr


def test_mesh_ca_serve_help(capsys: pytest.CaptureFixture[str]) -> None:
    from mesh.cli import main

    assert main(["ca", "serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mesh ca serve ") and "--bind ADDR" in out and "127.0.0.1:8400" in out
