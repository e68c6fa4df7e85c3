"""The mesh-wide default policy of the inbound authorizer: what an empty allow list admits."""

import pytest

from mesh.spiffe import Authorizer


def authorizer(allow: list[str], deny: list[str] | None = None, *, default_policy: str = "allow") -> Authorizer:
    return Authorizer(
        allow,
        deny or [],
        trust_domain="mesh.local",
        namespace="default",
        datacenter="dc1",
        default_policy=default_policy,  # type: ignore[arg-type]
    )


def svc(name: str, trust_domain: str = "mesh.local") -> str:
    return f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/{name}"


def test_default_policy_allow_admits_the_trust_domain_when_allow_is_empty() -> None:
    auth = authorizer([], default_policy="allow")
    assert auth.check(svc("web")) == (True, "allowed by default: same trust domain")
    assert auth.check(svc("web", "other.mesh"))[0] is False


def test_default_policy_deny_admits_nobody_when_allow_is_empty() -> None:
    auth = authorizer([], default_policy="deny")
    assert auth.check(svc("web")) == (False, "refused by default_policy: deny")
    assert auth.check(svc("web", "other.mesh")) == (False, "refused by default_policy: deny")
    assert auth.check(None) == (False, "no SPIFFE identity in the peer certificate")


def test_default_policy_deny_still_admits_the_allow_list_and_deny_still_wins() -> None:
    auth = authorizer(["frontend", "billing"], ["billing"], default_policy="deny")
    assert auth.check(svc("frontend")) == (True, "allow list entry 'frontend'")
    assert auth.check(svc("billing")) == (False, "deny list entry 'billing'")
    assert auth.check(svc("web")) == (False, "not in allow list")
    assert authorizer([], ["billing"], default_policy="deny").check(svc("billing")) == (
        False,
        "deny list entry 'billing'",
    )


def test_the_default_policy_is_allow_and_deny_shows_in_repr() -> None:
    auth = Authorizer([], [], trust_domain="mesh.local", namespace="default", datacenter="dc1")
    assert auth.check(svc("web"))[0] is True
    assert repr(auth) == "<Authorizer mesh.local allow=[] deny=[]>"
    assert repr(authorizer(["web"], default_policy="deny")) == (
        "<Authorizer mesh.local allow=['web'] deny=[] default_policy=deny>"
    )


def test_an_unknown_default_policy_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="default_policy must be 'allow' or 'deny'"):
        authorizer([], default_policy="block")
