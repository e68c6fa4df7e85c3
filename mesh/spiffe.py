"""SPIFFE identities in Consul's format: formatting, parsing, reading one from a peer certificate, authorising it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_SCHEME = "spiffe://"
_FORMAT = "spiffe://<trust-domain>/ns/<namespace>/dc/<datacenter>/svc/<service>"
# The SPIFFE ID standard: trust domains are lower-case letters, digits, '.', '-' and '_'; path segments also allow
# upper-case letters, and are never '.' or '..'.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A SPIFFE ID in Consul's format; `str()` gives the URI back."""

    trust_domain: str
    namespace: str
    datacenter: str
    service: str

    def __str__(self) -> str:
        return spiffe_id(self.trust_domain, self.namespace, self.datacenter, self.service)


def spiffe_id(trust_domain: str, namespace: str, datacenter: str, service: str) -> str:
    """The URI `spiffe://<td>/ns/<ns>/dc/<dc>/svc/<service>`; ValueError names the part that is not allowed."""
    _check_trust_domain(trust_domain)
    for what, value in (("namespace", namespace), ("datacenter", datacenter), ("service", service)):
        _check_segment(what, value)
    return f"{_SCHEME}{trust_domain}/ns/{namespace}/dc/{datacenter}/svc/{service}"


def parse(uri: str) -> SpiffeId:
    """Parse a SPIFFE ID in Consul's format; ValueError says what is wrong with anything else."""
    trust_domain, path = _split(uri)
    parts = path.split("/")
    if len(parts) != 6 or parts[0] != "ns" or parts[2] != "dc" or parts[4] != "svc":
        raise ValueError(f"{uri!r} is not in the form {_FORMAT}")
    _, namespace, _, datacenter, _, service = parts
    for what, value in (("namespace", namespace), ("datacenter", datacenter), ("service", service)):
        _check_segment(what, value, uri)
    return SpiffeId(trust_domain, namespace, datacenter, service)


def peer_identity(peercert: dict[str, Any] | None) -> str | None:
    """The SPIFFE ID of a verified peer certificate (`SSLSocket.getpeercert()`'s dict), or None.

    As the X.509-SVID standard requires, the certificate must carry exactly one URI SAN and it must be a valid
    SPIFFE ID (any path: an identity from a federated, non-Consul trust domain is still an identity); a
    certificate with none, with two, or with a URI that is not a SPIFFE ID has no identity."""
    if not peercert:
        return None
    uris = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]
    if len(uris) != 1:
        return None
    try:
        _split(uris[0])
    except ValueError:
        return None
    return uris[0]


class Authorizer:
    """Decides whether a peer identity may call this service.

    `allow` and `deny` entries are service names (that service in this trust domain, namespace and datacenter)
    or full SPIFFE IDs. A deny entry always wins. A non-empty allow list admits only its entries (a full SPIFFE ID
    from another trust domain may be allowed explicitly); an empty one admits any identity of this trust domain,
    so identities from another trust domain are refused unless allowed by name."""

    __slots__ = ("_allow", "_deny", "trust_domain")

    def __init__(
        self, allow: list[str], deny: list[str], *, trust_domain: str, namespace: str, datacenter: str
    ) -> None:
        _check_trust_domain(trust_domain)
        self.trust_domain = trust_domain
        # full SPIFFE ID -> the entry as the operator wrote it, so a decision quotes their words
        self._allow = {self._resolve(entry, namespace, datacenter): entry for entry in allow}
        self._deny = {self._resolve(entry, namespace, datacenter): entry for entry in deny}

    def _resolve(self, entry: str, namespace: str, datacenter: str) -> str:
        if entry.startswith(_SCHEME):
            _split(entry)
            return entry
        try:
            return spiffe_id(self.trust_domain, namespace, datacenter, entry)
        except ValueError as exc:
            raise ValueError(f"{entry!r} is neither a service name nor a SPIFFE ID: {exc}") from None

    def __repr__(self) -> str:
        return f"<Authorizer {self.trust_domain} allow={list(self._allow.values())} deny={list(self._deny.values())}>"

    def check(self, identity: str | None) -> tuple[bool, str]:
        """(allowed, the rule that decided, in words fit for a log line or an `x-mesh-error` header)."""
        if identity is None:
            return False, "no SPIFFE identity in the peer certificate"
        try:
            trust_domain, _ = _split(identity)
        except ValueError:
            return False, f"not a SPIFFE ID: {identity!r}"
        entry = self._deny.get(identity)
        if entry is not None:
            return False, f"deny list entry {entry!r}"
        if self._allow:
            entry = self._allow.get(identity)
            if entry is None:
                return False, "not in allow list"
            return True, f"allow list entry {entry!r}"
        if trust_domain != self.trust_domain:
            return False, f"refused by default: trust domain {trust_domain!r} is not {self.trust_domain!r}"
        return True, "allowed by default: same trust domain"


def _split(uri: str) -> tuple[str, str]:
    """(trust domain, path without its leading '/') of any valid SPIFFE ID; ValueError otherwise."""
    if not uri.startswith(_SCHEME):
        raise ValueError(f"{uri!r} is not a SPIFFE ID: it must start with {_SCHEME}")
    trust_domain, _, path = uri[len(_SCHEME) :].partition("/")
    _check_trust_domain(trust_domain, uri)
    if not path:
        raise ValueError(f"{uri!r} is not a workload SPIFFE ID: it has no path")
    for segment in path.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise ValueError(f"{uri!r} has an invalid path segment {segment!r}")
    return trust_domain, path


def _check_trust_domain(trust_domain: str, uri: str | None = None) -> None:
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        where = f" in {uri!r}" if uri else ""
        raise ValueError(
            f"invalid trust domain {trust_domain!r}{where}: use lower-case letters, digits, '.', '-' and '_'"
        )


def _check_segment(what: str, value: str, uri: str | None = None) -> None:
    if not _SEGMENT.fullmatch(value) or value in (".", ".."):
        where = f" in {uri!r}" if uri else ""
        raise ValueError(f"invalid {what} {value!r}{where}: use letters, digits, '.', '-' and '_'")
