"""mesh.spiffe: SPIFFE ID formatting and parsing, identity from a peer certificate, and the inbound Authorizer."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

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
