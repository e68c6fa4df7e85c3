"""mesh.spiffe: SPIFFE ID formatting and parsing, identity from a peer certificate, and the inbound Authorizer."""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca.authority import CertificateAuthority
from mesh import spiffe
from mesh.spiffe import Authorizer, SpiffeId

WEB = "spiffe://mesh.local/ns/default/dc/dc1/svc/web"


def test_format_is_consuls() -> None:
    assert spiffe.spiffe_id("mesh.local", "default", "dc1", "web") == WEB


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (("Mesh.Local", "default", "dc1", "web"), "invalid trust domain 'Mesh.Local'"),
        (("", "default", "dc1", "web"), "invalid trust domain ''"),
        (("mesh.local", "default", "dc1", "a/b"), "invalid service 'a/b'"),
        (("mesh.local", "", "dc1", "web"), "invalid namespace ''"),
        (("mesh.local", "default", "..", "web"), "invalid datacenter '..'"),
    ],
)
def test_format_refuses_bad_parts(parts: tuple[str, str, str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spiffe.spiffe_id(*parts)


def test_parse_round_trips() -> None:
    parsed = spiffe.parse(WEB)
    assert parsed == SpiffeId("mesh.local", "default", "dc1", "web")
    assert str(parsed) == WEB
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.service = "api"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("https://mesh.local/ns/default/dc/dc1/svc/web", "must start with spiffe://"),
        ("spiffe://mesh.local", "has no path"),
        ("spiffe://mesh.local/", "has no path"),
        ("spiffe://mesh.local/svc/web", "not in the form"),
        ("spiffe://mesh.local/ns/default/dc/dc1/svc/web/extra", "not in the form"),
        ("spiffe://mesh.local/ns/default/datacenter/dc1/svc/web", "not in the form"),
        ("spiffe://mesh.local/ns/default/dc/dc1/svc/", "invalid path segment ''"),
        ("spiffe://MESH/ns/default/dc/dc1/svc/web", "invalid trust domain 'MESH'"),
        ("spiffe://mesh.local/ns/default/dc/dc1/svc/w%20b", "invalid path segment"),
    ],
)
def test_parse_says_what_is_wrong(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spiffe.parse(uri)


def cert(*sans: tuple[str, str]) -> dict[str, object]:
    """The shape of ssl.SSLSocket.getpeercert() (only the parts that matter here)."""
    return {"subject": ((("commonName", "web"),),), "subjectAltName": sans}


def test_peer_identity_is_the_single_uri_san() -> None:
    assert spiffe.peer_identity(cert(("DNS", "web.internal"), ("URI", WEB))) == WEB


@pytest.mark.parametrize(
    "peercert",
    [
        None,  # no certificate
        {},  # not verified
        cert(),  # no SANs
        cert(("DNS", "web.internal")),  # no URI SAN
        cert(("URI", WEB), ("URI", "spiffe://mesh.local/ns/default/dc/dc1/svc/api")),  # two identities
        cert(("URI", WEB), ("URI", "https://web.example")),  # an X.509-SVID carries exactly one URI SAN
        cert(("URI", "https://web.example")),  # a URI that is not a SPIFFE ID
        cert(("URI", "spiffe://mesh.local")),  # a trust domain, not a workload
    ],
)
def test_peer_identity_is_none_without_exactly_one_spiffe_uri(peercert: dict[str, object] | None) -> None:
    assert spiffe.peer_identity(peercert) is None


def test_peer_identity_accepts_a_non_consul_spiffe_id() -> None:
    assert spiffe.peer_identity(cert(("URI", "spiffe://partner.example/billing"))) == "spiffe://partner.example/billing"


# --- the X.509-SVID rules, on a peer's DER certificate --------------------------------------------------------

_KEY = ec.generate_private_key(ec.SECP256R1())
_NOW = dt.datetime.now(dt.UTC)


def key_usage(*, digital_signature: bool = True, cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not digital_signature,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def leaf_der(
    *, ca: bool | None = False, usage: x509.KeyUsage | None = None, uris: tuple[str, ...] | None = (WEB,)
) -> bytes:
    """A certificate as a peer presents it (the signature does not matter here: OpenSSL has verified the chain)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW)
        .not_valid_after(_NOW + dt.timedelta(hours=1))
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    if uris is not None:
        names = [x509.UniformResourceIdentifier(uri) for uri in uris] + [x509.DNSName("web.internal")]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_a_leaf_following_the_rules_is_its_spiffe_id() -> None:
    assert spiffe.svid_identity(leaf_der(usage=key_usage())) == WEB
    assert spiffe.svid_identity(leaf_der(ca=None, usage=key_usage())) == WEB  # basicConstraints may be absent


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca", "mesh.local", intermediate=True)


def test_the_mesh_ca_issues_x509_svids_and_its_own_certificates_are_not(authority: CertificateAuthority) -> None:
    issued = authority.issue("web")
    assert spiffe.svid_identity(issued.certificate.public_bytes(serialization.Encoding.DER)) == WEB
    root = authority.signing_root()
    assert root.intermediate is not None
    for ca_certificate in (root.certificate, root.intermediate):
        with pytest.raises(ValueError, match=r"is a CA certificate \(basicConstraints CA:TRUE\)"):
            spiffe.svid_identity(ca_certificate.public_bytes(serialization.Encoding.DER))


@pytest.mark.parametrize(
    ("der", "reason"),
    [
        (
            leaf_der(ca=True, usage=key_usage(cert_sign=True, crl_sign=True)),
            "peer certificate is a CA certificate (basicConstraints CA:TRUE), not an X.509-SVID",
        ),
        (leaf_der(ca=True, usage=None), "peer certificate is a CA certificate (basicConstraints CA:TRUE)"),
        (
            leaf_der(usage=key_usage(cert_sign=True)),
            "peer certificate can sign certificates (keyUsage keyCertSign), not an X.509-SVID",
        ),
        (
            leaf_der(usage=key_usage(crl_sign=True)),
            "peer certificate can sign CRLs (keyUsage cRLSign), not an X.509-SVID",
        ),
        (
            leaf_der(usage=key_usage(digital_signature=False)),
            "peer certificate lacks keyUsage digitalSignature, which an X.509-SVID must have",
        ),
        (leaf_der(usage=None), "peer certificate has no keyUsage extension (an X.509-SVID must have digitalSignature)"),
        (leaf_der(usage=key_usage(), uris=None), "peer certificate has no URI SAN (an X.509-SVID has exactly one"),
        (leaf_der(usage=key_usage(), uris=()), "peer certificate has no URI SAN (an X.509-SVID has exactly one"),
        (
            leaf_der(usage=key_usage(), uris=(WEB, "spiffe://mesh.local/ns/default/dc/dc1/svc/api")),
            "peer certificate has 2 URI SANs (an X.509-SVID has exactly one",
        ),
        (
            leaf_der(usage=key_usage(), uris=("https://web.example",)),
            "peer certificate's URI SAN is not a SPIFFE ID: 'https://web.example' is not a SPIFFE ID",
        ),
        (
            leaf_der(usage=key_usage(), uris=("spiffe://mesh.local",)),
            "peer certificate's URI SAN is not a SPIFFE ID: 'spiffe://mesh.local' is not a workload SPIFFE ID",
        ),
        (b"\x30\x03\x02\x01\x00", "peer certificate cannot be parsed"),
    ],
    ids=[
        "ca",
        "ca-without-key-usage",
        "key-cert-sign",
        "crl-sign",
        "no-digital-signature",
        "no-key-usage",
        "no-san",
        "no-uri-san",
        "two-uri-sans",
        "not-spiffe",
        "trust-domain-only",
        "not-der",
    ],
)
def test_a_leaf_breaking_a_rule_is_refused_with_the_rule(der: bytes, reason: str) -> None:
    for _ in range(2):  # the second answer comes from the cache, and says the same
        with pytest.raises(ValueError) as info:
            spiffe.svid_identity(der)
        assert str(info.value).startswith(reason)


def test_no_certificate_is_no_x509_svid() -> None:
    with pytest.raises(ValueError, match=r"^peer presented no certificate$"):
        spiffe.svid_identity(None)


def test_verdicts_are_cached_by_the_certificate_bytes_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spiffe, "_SVID_VERDICTS_MAX", 3)
    monkeypatch.setattr(spiffe, "_svid_verdicts", {})
    certificates = [leaf_der(usage=key_usage()) for _ in range(5)]
    for der in certificates:
        assert spiffe.svid_identity(der) == WEB
        assert len(spiffe._svid_verdicts) <= 3
    assert list(spiffe._svid_verdicts) == certificates[2:]  # the oldest verdicts go first
    assert spiffe.svid_identity(bytes(certificates[4])) == WEB  # equal bytes, another object: a cache hit
    assert len(spiffe._svid_verdicts) == 3


def authorizer(allow: list[str], deny: list[str] | None = None) -> Authorizer:
    return Authorizer(allow, deny or [], trust_domain="mesh.local", namespace="default", datacenter="dc1")


def svc(name: str, trust_domain: str = "mesh.local") -> str:
    return f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/{name}"


def test_default_allows_the_same_trust_domain_only() -> None:
    auth = authorizer([])
    assert auth.check(svc("web")) == (True, "allowed by default: same trust domain")
    assert auth.check("spiffe://mesh.local/legacy/worker") == (True, "allowed by default: same trust domain")
    assert auth.check(svc("web", "other.mesh")) == (
        False,
        "refused by default: trust domain 'other.mesh' is not 'mesh.local'",
    )


def test_allow_list_by_service_name_and_by_full_id() -> None:
    gateway = "spiffe://mesh.local/ns/default/dc/dc1/svc/gateway"
    partner = svc("web", "partner.example")
    auth = authorizer(["frontend", gateway, partner])
    assert auth.check(svc("frontend")) == (True, "allow list entry 'frontend'")
    assert auth.check(gateway) == (True, f"allow list entry {gateway!r}")
    assert auth.check(partner) == (True, f"allow list entry {partner!r}")  # another trust domain, allowed by name
    assert auth.check(svc("web")) == (False, "not in allow list")
    # a service name means this namespace and datacenter only
    assert auth.check("spiffe://mesh.local/ns/other/dc/dc1/svc/frontend") == (False, "not in allow list")
    assert auth.check("spiffe://mesh.local/ns/default/dc/dc2/svc/frontend") == (False, "not in allow list")


def test_deny_wins_over_allow_and_over_the_default() -> None:
    assert authorizer(["billing"], ["billing"]).check(svc("billing")) == (False, "deny list entry 'billing'")
    assert authorizer([], [svc("billing")]).check(svc("billing")) == (False, f"deny list entry {svc('billing')!r}")
    assert authorizer([], ["billing"]).check(svc("web")) == (True, "allowed by default: same trust domain")


def test_no_or_malformed_identity_is_refused() -> None:
    auth = authorizer([])
    assert auth.check(None) == (False, "no SPIFFE identity in the peer certificate")
    assert auth.check("https://web") == (False, "not a SPIFFE ID: 'https://web'")


@pytest.mark.parametrize("entry", ["", "a/b", "spiffe://mesh.local", "spiffe://Mesh/ns/default/dc/dc1/svc/web"])
def test_bad_entries_are_refused_at_construction(entry: str) -> None:
    with pytest.raises(ValueError, match=r"SPIFFE ID|trust domain|service name"):
        authorizer([entry])
    with pytest.raises(ValueError):
        authorizer([], [entry])


def test_repr_quotes_the_entries() -> None:
    assert repr(authorizer(["web"], ["billing"])) == "<Authorizer mesh.local allow=['web'] deny=['billing']>"


def test_spiffe_is_sans_io() -> None:
    tree = ast.parse(Path(spiffe.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.split(".")[0] == "trio"}
