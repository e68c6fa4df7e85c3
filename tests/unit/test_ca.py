"""The mesh CA with real cryptography: layout, leaf contents, CSR checks, TTL caps, rotation, real TLS handshakes."""

from __future__ import annotations

import json
import socket
import ssl
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ca.authority import (
    BACKDATE,
    DEFAULT_MAX_LEAF_TTL,
    CAError,
    CertificateAuthority,
    Issued,
    fingerprint,
    inspect,
    spiffe_id,
    utc_now,
)

TD = "mesh.local"
WEB_ID = "spiffe://mesh.local/ns/default/dc/dc1/svc/web"
API_ID = "spiffe://mesh.local/ns/default/dc/dc1/svc/api"
HOUR = timedelta(hours=1)
INTERVAL = timedelta(minutes=5)  # the default bundle refresh interval


def now() -> datetime:
    return utc_now()


def make_ca(tmp_path: Path, name: str = "ca", **kwargs: Any) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / name, TD, **kwargs)


def chain_of(issued: Issued) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(issued.cert_pem)


def verify(issued: Issued, bundle_pem: bytes, at: datetime) -> list[x509.GeneralName]:
    """Verify a leaf chain against a bundle with cryptography's X.509 path validation, as a TLS client cert."""
    leaf, *intermediates = chain_of(issued)
    store = Store(x509.load_pem_x509_certificates(bundle_pem))
    verifier = PolicyBuilder().store(store).time(at).build_client_verifier()
    return list(verifier.verify(leaf, intermediates).subjects or [])


# --- real TLS over a socketpair ---


@dataclass
class Side:
    """One end of a handshake: its certificate chain, key and the bundle it trusts."""

    cert_pem: bytes
    key_pem: bytes
    bundle_pem: bytes

    @classmethod
    def of(cls, issued: Issued, bundle_pem: bytes | None = None) -> Side:
        assert issued.key_pem is not None
        return cls(issued.cert_pem, issued.key_pem, issued.bundle_pem if bundle_pem is None else bundle_pem)

    def context(self, purpose: int, directory: Path) -> ssl.SSLContext:
        context = ssl.SSLContext(purpose)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = False  # identity is the URI SAN, checked after the handshake
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cert.pem").write_bytes(self.cert_pem)
        (directory / "key.pem").write_bytes(self.key_pem)
        context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
        context.load_verify_locations(cadata=self.bundle_pem.decode())
        return context


@dataclass
class Outcome:
    """What each end saw: the peer's SPIFFE IDs after a completed exchange, or the exception it raised."""

    server: list[str] | BaseException
    client: list[str] | BaseException


def _uris(peer: dict[str, Any] | None) -> list[str]:
    assert peer is not None
    return [value for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]


def handshake(server: Side, client: Side, tmp_path: Path) -> Outcome:
    """A real mutual-TLS handshake and one request/response between two leaves over a socketpair."""
    server_context = server.context(ssl.PROTOCOL_TLS_SERVER, tmp_path / "server")
    client_context = client.context(ssl.PROTOCOL_TLS_CLIENT, tmp_path / "client")
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)

    def serve() -> list[str]:
        try:
            with server_context.wrap_socket(a, server_side=True) as tls:
                assert tls.recv(4) == b"ping"
                tls.sendall(b"pong")
                return _uris(tls.getpeercert())
        finally:
            a.close()

    def call() -> list[str]:
        try:
            with client_context.wrap_socket(b, server_hostname="web") as tls:
                tls.sendall(b"ping")
                assert tls.recv(4) == b"pong"
                return _uris(tls.getpeercert())
        finally:
            b.close()

    with ThreadPoolExecutor(2) as pool:
        futures = pool.submit(serve), pool.submit(call)
        results = [future.exception() or future.result() for future in futures]
    return Outcome(*results)


def assert_rejected(outcome: Outcome, reason: str) -> None:
    errors = [str(e) for e in (outcome.server, outcome.client) if isinstance(e, BaseException)]
    assert errors, "the handshake succeeded"
    assert any(reason in e for e in errors), errors


# --- init and load ---


def test_init_writes_the_layout_and_refuses_to_overwrite(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, intermediate=True)
    directory = tmp_path / "ca"
    assert ca.directory == directory
    files = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
    assert files == {
        ".lock",
        "state.json",
        "roots/1/cert.pem",
        "roots/1/key.pem",
        "roots/1/intermediate.pem",
        "roots/1/intermediate-key.pem",
    }
    state = json.loads((directory / "state.json").read_text())
    assert state["trust_domain"] == TD and state["intermediate"] is True and [r["id"] for r in state["roots"]] == [1]
    before = (directory / "roots/1/key.pem").read_bytes()

    with pytest.raises(CAError, match=rf"^{directory} already holds a CA \(state.json exists\); refusing"):
        make_ca(tmp_path)
    assert (directory / "roots/1/key.pem").read_bytes() == before


def test_init_refuses_a_non_empty_directory_and_a_file(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "notes.txt").write_text("mine")
    with pytest.raises(CAError, match=r"ca is not empty \(notes.txt\); choose a new or empty directory"):
        make_ca(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(CAError, match=r"file exists and is not a directory"):
        make_ca(tmp_path, "file")
    make_ca(tmp_path, "new/nested")  # a new directory, parents included, is fine


def test_init_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="invalid trust domain 'Mesh Local'"):
        CertificateAuthority.init(tmp_path / "ca", "Mesh Local")
    with pytest.raises(CAError, match="the root TTL must be longer than the maximum leaf TTL"):
        make_ca(tmp_path, root_ttl=timedelta(hours=10))
    with pytest.raises(CAError, match="the bundle refresh interval must be positive"):
        make_ca(tmp_path, bundle_refresh_interval=timedelta(0))
    assert not (tmp_path / "ca").exists()


def test_private_keys_are_0600_and_the_directory_0700(tmp_path: Path) -> None:
    make_ca(tmp_path, intermediate=True)
    directory = tmp_path / "ca"
    for key in ("roots/1/key.pem", "roots/1/intermediate-key.pem"):
        assert stat.S_IMODE((directory / key).stat().st_mode) == 0o600, key
        assert b"PRIVATE KEY" in (directory / key).read_bytes()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_load_reads_back_the_ca_and_says_what_is_wrong(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert loaded.trust_domain == TD and loaded.max_leaf_ttl == DEFAULT_MAX_LEAF_TTL
    assert [r.certificate for r in loaded.roots()] == [r.certificate for r in ca.roots()]
    assert "key" not in repr(loaded).lower()

    with pytest.raises(CAError, match=r"missing does not exist; create a CA there with `mesh ca init --dir"):
        CertificateAuthority.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CAError, match=r"empty is not a CA directory \(it has no state.json"):
        CertificateAuthority.load(tmp_path / "empty")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(CAError, match=r"plain is not a directory"):
        CertificateAuthority.load(tmp_path / "plain")

    (tmp_path / "ca" / "state.json").write_text("{not json")
    with pytest.raises(CAError, match=r"state.json: damaged CA state"):
        CertificateAuthority.load(tmp_path / "ca")
    (tmp_path / "ca" / "state.json").write_text('{"format": 1}')
    with pytest.raises(CAError, match=r"state.json: damaged CA state: 'roots' is missing"):
        CertificateAuthority.load(tmp_path / "ca")


def test_a_missing_root_key_is_reported_when_signing(tmp_path: Path) -> None:
    make_ca(tmp_path)
    (tmp_path / "ca" / "roots/1/key.pem").unlink()
    ca = CertificateAuthority.load(tmp_path / "ca")
    with pytest.raises(CAError, match=r"roots/1/key.pem: the private key is missing"):
        ca.issue("web")


# --- leaves ---


def test_spiffe_id_helper() -> None:
    assert spiffe_id(TD, "default", "dc1", "web") == WEB_ID
    assert spiffe_id("td", "prod", "eu-1", "billing-api") == "spiffe://td/ns/prod/dc/eu-1/svc/billing-api"
    with pytest.raises(CAError, match="invalid service name 'Web'"):
        spiffe_id(TD, "default", "dc1", "Web")
    with pytest.raises(CAError, match="invalid namespace 'a/b'"):
        spiffe_id(TD, "a/b", "dc1", "web")
    with pytest.raises(CAError, match=r"invalid datacenter '\.\.'"):
        spiffe_id(TD, "default", "..", "web")


@pytest.mark.parametrize("intermediate", [False, True])
def test_a_leaf_carries_exactly_the_mtls_identity(tmp_path: Path, intermediate: bool) -> None:
    ca = make_ca(tmp_path, intermediate=intermediate)
    t = now()
    issued = ca.issue("web", now=t)
    leaf, *rest = chain_of(issued)
    root = ca.root(1)
    assert rest == ([root.intermediate] if intermediate else [])
    assert issued.spiffe_id == WEB_ID and issued.root == 1 and issued.capped is None

    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(names) == [x509.UniformResourceIdentifier(WEB_ID)]
    assert leaf.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    extended = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(extended) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    authority_key = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_key = root.issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert authority_key.key_identifier == issuer_key.digest
    subject_key = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert subject_key == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    assert leaf.issuer == root.issuer.subject

    assert leaf.not_valid_before_utc == t - BACKDATE
    assert leaf.not_valid_after_utc == t + timedelta(hours=24)
    key = serialization.load_pem_private_key(issued.key_pem or b"", password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == leaf.public_key()
    assert issued.bundle_pem == ca.bundle_pem(t) == root.certificate.public_bytes(serialization.Encoding.PEM)
    assert "PRIVATE" not in repr(issued)


@pytest.mark.parametrize("intermediate", [False, True])
def test_a_leaf_verifies_against_the_bundle(tmp_path: Path, intermediate: bool) -> None:
    ca = make_ca(tmp_path, intermediate=intermediate)
    issued = ca.issue("web", namespace="prod", datacenter="eu-1")
    subjects = verify(issued, issued.bundle_pem, now())
    assert subjects == [x509.UniformResourceIdentifier("spiffe://mesh.local/ns/prod/dc/eu-1/svc/web")]
    other = make_ca(tmp_path, "other", intermediate=intermediate)
    with pytest.raises(VerificationError):
        verify(issued, other.bundle_pem(), now())


@pytest.mark.parametrize("intermediate", [False, True])
def test_two_leaves_complete_a_real_mutual_tls_handshake(tmp_path: Path, intermediate: bool) -> None:
    ca = make_ca(tmp_path, intermediate=intermediate)
    outcome = handshake(Side.of(ca.issue("api")), Side.of(ca.issue("web")), tmp_path)
    assert outcome.server == [WEB_ID]  # the server saw the client's identity
    assert outcome.client == [API_ID]


def test_a_leaf_from_another_ca_fails_the_handshake(tmp_path: Path) -> None:
    ca, other = make_ca(tmp_path), make_ca(tmp_path, "other")
    server = Side.of(ca.issue("api"))
    stranger = Side.of(other.issue("web"), bundle_pem=ca.bundle_pem())  # trusts us, but has a foreign certificate
    assert_rejected(handshake(server, stranger, tmp_path), "certificate verify failed")


def test_ttl_is_capped_by_the_maximum_and_by_the_root(tmp_path: Path) -> None:
    t = now()
    ca = make_ca(tmp_path, now=t)
    issued = ca.issue("web", ttl=timedelta(hours=100), now=t)
    assert issued.certificate.not_valid_after_utc == t + DEFAULT_MAX_LEAF_TTL
    assert issued.capped == "the CA's maximum leaf TTL of 72h"
    assert ca.issue("web", ttl=30, now=t).certificate.not_valid_after_utc == t + timedelta(seconds=30)
    with pytest.raises(CAError, match="the certificate TTL must be positive"):
        ca.issue("web", ttl=0, now=t)

    short = make_ca(tmp_path, "short", now=t, root_ttl=timedelta(hours=5), max_leaf_ttl=timedelta(hours=2))
    assert short.issue("web", ttl=5 * HOUR, now=t).certificate.not_valid_after_utc == t + 2 * HOUR
    late = t + 4 * HOUR
    issued = short.issue("web", ttl=2 * HOUR, now=late)
    assert issued.certificate.not_valid_after_utc == short.root(1).not_valid_after == t + 5 * HOUR
    assert issued.capped is not None and issued.capped.startswith("the expiry of root 1")
    with pytest.raises(CAError, match=r"root 1 expired at .*; run `mesh ca rotate"):
        short.issue("web", now=t + 6 * HOUR)


def test_expired_and_not_yet_valid_leaves_are_issued_with_real_validity(tmp_path: Path) -> None:
    t = now()
    ca = make_ca(tmp_path, now=t - timedelta(days=3))
    expired = ca.issue("web", ttl=HOUR, now=t - timedelta(days=2))
    assert expired.certificate.not_valid_after_utc == t - timedelta(days=2) + HOUR
    future = ca.issue("web", now=t + timedelta(days=1))
    assert future.certificate.not_valid_before_utc == t + timedelta(days=1) - BACKDATE
    with pytest.raises(VerificationError):
        verify(expired, ca.bundle_pem(), t)
    with pytest.raises(VerificationError):
        verify(future, ca.bundle_pem(), t)

    server = Side.of(ca.issue("api"))
    assert_rejected(handshake(server, Side.of(expired), tmp_path / "expired"), "certificate has expired")
    assert_rejected(handshake(server, Side.of(future), tmp_path / "future"), "certificate is not yet valid")

    with pytest.raises(CAError, match="no root signs then"):
        ca.issue("web", now=t - timedelta(days=4))


# --- CSRs ---


def csr(
    key: Any = None,
    *,
    subject: x509.Name | None = None,
    names: list[x509.GeneralName] | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] = (),  # type: ignore[assignment]
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {},
        {"names": [x509.UniformResourceIdentifier(WEB_ID)]},
        {"subject": x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])},
        {"extensions": [(x509.BasicConstraints(ca=False, path_length=None), True)]},
    ],
)
def test_sign_csr_issues_the_proven_identity_for_the_callers_key(tmp_path: Path, request_kwargs: Any) -> None:
    ca = make_ca(tmp_path, intermediate=True)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.sign_csr(csr(key, **request_kwargs), service="web", ttl=HOUR)
    assert issued.key_pem is None
    assert issued.certificate.public_key() == key.public_key()
    names = issued.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(names) == [x509.UniformResourceIdentifier(WEB_ID)]
    assert verify(issued, issued.bundle_pem, now()) == [x509.UniformResourceIdentifier(WEB_ID)]


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        (
            {"names": [x509.UniformResourceIdentifier(WEB_ID), x509.DNSName("web.internal")]},
            f"the CSR asks for names URI:{WEB_ID}, DNS:web.internal; only URI:{WEB_ID}, the identity the caller",
        ),
        ({"names": [x509.UniformResourceIdentifier(API_ID)]}, f"the CSR asks for names URI:{API_ID}; only"),
        ({"names": [x509.DNSName("web")]}, "the CSR asks for names DNS:web; only"),
        (
            {"subject": x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api")])},
            "the CSR asks for subject 'CN=api'; leave the subject empty or use CN=web",
        ),
        (
            {
                "subject": x509.Name(
                    [x509.NameAttribute(NameOID.COMMON_NAME, "web"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]
                )
            },
            "the CSR asks for subject 'O=x,CN=web'",
        ),
        (
            {"extensions": [(x509.BasicConstraints(ca=True, path_length=None), True)]},
            "the CSR asks for a CA certificate",
        ),
        (
            {
                "extensions": [
                    (x509.NameConstraints(permitted_subtrees=[x509.DNSName("x")], excluded_subtrees=None), True)
                ]
            },
            "the CSR asks for the nameConstraints extension, which the CA does not grant",
        ),
    ],
)
def test_sign_csr_refuses_a_csr_asking_for_more_than_the_identity(
    tmp_path: Path, request_kwargs: Any, message: str
) -> None:
    ca = make_ca(tmp_path)
    with pytest.raises(CAError) as caught:
        ca.sign_csr(csr(**request_kwargs), service="web", ttl=HOUR)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("make_key", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 2048), "the CSR holds a RSA key; the mesh CA signs only ECDSA P-256"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "the CSR holds an EC key on secp384r1; the mesh CA signs"),
        (ed25519.Ed25519PrivateKey.generate, "the CSR holds a Ed25519 key; the mesh CA signs only ECDSA P-256"),
    ],
)
def test_sign_csr_refuses_other_key_types(tmp_path: Path, make_key: Callable[[], Any], message: str) -> None:
    ca = make_ca(tmp_path)
    with pytest.raises(CAError) as caught:
        ca.sign_csr(csr(make_key()), service="web", ttl=HOUR)
    assert str(caught.value).startswith(message)


def test_sign_csr_refuses_a_bad_signature_and_garbage(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    request = x509.load_pem_x509_csr(csr())
    der = bytearray(request.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CAError, match="the CSR's signature does not verify"):
        ca.sign_csr(tampered, service="web")
    with pytest.raises(CAError, match="the CSR is not a PEM certificate request"):
        ca.sign_csr(b"hello", service="web")
    with pytest.raises(CAError, match="invalid service name"):
        ca.sign_csr(csr(), service="../web")


# --- rotation ---


def test_rotation_publishes_first_and_switches_after_two_refresh_intervals(tmp_path: Path) -> None:
    t0 = now() - timedelta(days=1)
    ca = make_ca(tmp_path, now=t0)
    rotated_at = t0 + HOUR
    new = ca.rotate(now=rotated_at)
    assert new.id == 2 and new.published == rotated_at and new.signs_from == rotated_at + 2 * INTERVAL
    assert [r.id for r in ca.bundle(rotated_at)] == [1, 2]
    assert ca.bundle_pem(rotated_at) == b"".join(
        r.certificate.public_bytes(serialization.Encoding.PEM) for r in ca.roots()
    )
    assert ca.signing_root(rotated_at).id == 1
    assert ca.signing_root(rotated_at + INTERVAL).id == 1  # one interval: some peers may not have the new root
    assert ca.issue("web", now=rotated_at + 2 * INTERVAL - timedelta(seconds=1)).root == 1
    assert ca.issue("web", now=rotated_at + 2 * INTERVAL).root == 2
    # the schedule is stored, not held in memory
    assert CertificateAuthority.load(tmp_path / "ca").signing_root(rotated_at + 2 * INTERVAL).id == 2


def test_activate_switches_at_once_and_the_rules_around_it(tmp_path: Path) -> None:
    t0 = now() - timedelta(days=1)
    ca = make_ca(tmp_path, now=t0)
    with pytest.raises(CAError, match="no new root is waiting to be activated: root 1 signs since"):
        ca.activate(now=t0 + HOUR)
    ca.rotate(now=t0 + HOUR)
    with pytest.raises(CAError, match=r"root 2 is already waiting to take over .* before rotating again"):
        ca.rotate(now=t0 + HOUR + timedelta(seconds=10))
    activated = ca.activate(now=t0 + HOUR + timedelta(seconds=30))
    assert activated.signs_from == t0 + HOUR + timedelta(seconds=30)
    assert ca.issue("web", now=t0 + HOUR + timedelta(seconds=30)).root == 2
    assert CertificateAuthority.load(tmp_path / "ca").signing_root(t0 + HOUR + timedelta(seconds=30)).id == 2
    assert ca.rotate(now=t0 + 2 * HOUR).id == 3  # nothing waits any more


def test_rotate_refuses_to_reuse_a_leftover_root_folder(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    (tmp_path / "ca" / "roots" / "2").mkdir()
    with pytest.raises(CAError, match=r"roots/2 exists but state.json does not list it"):
        ca.rotate()
    assert [r.id for r in CertificateAuthority.load(tmp_path / "ca").roots()] == [1]


@pytest.mark.parametrize("intermediate", [False, True])
def test_leaves_of_both_roots_interoperate_during_the_overlap(tmp_path: Path, intermediate: bool) -> None:
    t = now()
    ca = make_ca(tmp_path, now=t - timedelta(days=1), intermediate=intermediate)
    ca.rotate(now=t - HOUR)
    old_leaf = ca.issue("web", now=t - HOUR + timedelta(minutes=1))
    ca.activate(now=t - HOUR + timedelta(minutes=2))
    new_leaf = ca.issue("api", now=t - timedelta(minutes=20))
    assert (old_leaf.root, new_leaf.root) == (1, 2)
    bundle = ca.bundle_pem(t)
    assert old_leaf.bundle_pem == bundle  # published before the old root stopped signing
    for leaf in (old_leaf, new_leaf):
        assert len(verify(leaf, bundle, t)) == 1

    outcome = handshake(Side.of(new_leaf, bundle), Side.of(old_leaf, bundle), tmp_path / "a")
    assert (outcome.server, outcome.client) == ([WEB_ID], [API_ID])
    outcome = handshake(Side.of(old_leaf, bundle), Side.of(new_leaf, bundle), tmp_path / "b")
    assert (outcome.server, outcome.client) == ([API_ID], [WEB_ID])


def test_the_old_root_leaves_the_bundle_when_its_last_leaf_has_expired(tmp_path: Path) -> None:
    t0 = now() - timedelta(days=10)
    ca = make_ca(tmp_path, now=t0)
    ca.rotate(now=t0 + HOUR)
    handover = t0 + HOUR + 2 * INTERVAL
    last_old_leaf = ca.issue("web", ttl=DEFAULT_MAX_LEAF_TTL, now=handover - timedelta(seconds=1))
    assert last_old_leaf.root == 1
    retires = ca.root(1).retires
    assert retires == handover + DEFAULT_MAX_LEAF_TTL
    assert last_old_leaf.certificate.not_valid_after_utc <= retires

    assert [r.id for r in ca.bundle(retires - timedelta(seconds=1))] == [1, 2]
    assert [r.id for r in ca.bundle(retires)] == [2]
    assert ca.bundle_pem(retires) == ca.root(2).certificate.public_bytes(serialization.Encoding.PEM)
    # an old-root leaf still inside its validity verifies up to the last moment, then the root is gone
    assert verify(last_old_leaf, ca.bundle_pem(retires - timedelta(seconds=1)), retires - timedelta(seconds=2))
    with pytest.raises(VerificationError):
        verify(ca.issue("web", now=handover - HOUR), ca.bundle_pem(retires), retires - timedelta(seconds=2))
    # and on the wall clock, ten days later, the bundle holds only the new root
    assert [r.id for r in ca.bundle()] == [2]


def test_rotation_with_an_intermediate_gives_each_root_its_own(tmp_path: Path) -> None:
    t0 = now() - timedelta(days=1)
    ca = make_ca(tmp_path, now=t0, intermediate=True)
    ca.rotate(now=t0 + HOUR)
    assert (tmp_path / "ca" / "roots/2/intermediate-key.pem").stat().st_mode & 0o777 == 0o600
    ca.activate(now=t0 + HOUR)
    leaf = ca.issue("web", now=t0 + 2 * HOUR)
    assert chain_of(leaf)[1] == ca.root(2).intermediate
    assert chain_of(leaf)[1].issuer == ca.root(2).certificate.subject


# --- inspect ---


def test_inspect_describes_a_chain_in_plain_words(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, intermediate=True)
    t = now()
    issued = ca.issue("web", now=t)
    text = inspect(issued.cert_pem + (issued.key_pem or b""), now=t + timedelta(minutes=1))
    leaf, _ = chain_of(issued)
    assert text.startswith("certificate 1 of 2\n  subject:     CN=web\n")
    assert f"  SPIFFE ID:   {WEB_ID}\n" in text
    assert "  status:      valid now (expires in 23h 59m)\n" in text
    assert "  issuer:      CN=triomesh mesh.local intermediate 1\n" in text
    assert f"  fingerprint: SHA-256 {fingerprint(leaf)}\n" in text
    assert "  CA:          no (a leaf certificate)\n" in text
    assert "  CA:          yes (an intermediate)\n" in text
    assert "  key:         ECDSA P-256\n" in text
    assert "  usage:       digital signature, key agreement, TLS server, TLS client\n" in text
    assert text.endswith("the file also holds a private key (not shown)\n")
    assert "BEGIN" not in text
    assert len(fingerprint(leaf).split(":")) == 32

    root_text = inspect(ca.bundle_pem())
    assert "CA:          yes (a self-signed root)" in root_text and "SPIFFE ID:   spiffe://mesh.local\n" in root_text


def test_inspect_says_expired_not_yet_valid_and_none(tmp_path: Path) -> None:
    t = now()
    ca = make_ca(tmp_path, now=t - timedelta(days=3))
    assert "status:      EXPIRED 1d 23h ago" in inspect(ca.issue("web", ttl=HOUR, now=t - timedelta(days=2)).cert_pem)
    assert "status:      NOT YET VALID (starts in 1d)" in inspect(
        ca.issue("web", now=t + timedelta(days=1) + BACKDATE).cert_pem, now=t
    )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plain")])
    plain = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(t)
        .not_valid_after(t + HOUR)
        .sign(key, hashes.SHA256())
    )
    text = inspect(plain.public_bytes(serialization.Encoding.PEM))
    assert "SPIFFE ID:   none\n" in text and "CA:          no (a leaf certificate)" in text

    with pytest.raises(CAError, match="it holds no PEM certificate"):
        inspect(b"hello")
    with pytest.raises(CAError, match="it holds a private key and no certificate"):
        inspect(ca.issue("web").key_pem or b"")
    with pytest.raises(CAError, match="damaged"):
        inspect(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
