"""SPIFFE identities in Consul's format: formatting, parsing, reading one from a peer certificate, authorising it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509

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


# Verdicts of svid_identity by certificate: a peer presents the same one on every connection until it rotates, and
# parsing it costs ~35 µs (2 % of a handshake's CPU), a lookup under 1 µs. Only certificates whose chain OpenSSL has
# verified reach the check, so the cache holds the mesh's own certificates (under 1 KiB each); when it is full the
# oldest verdict goes.
_SVID_VERDICTS_MAX = 512
_svid_verdicts: dict[bytes, tuple[str | None, str | None]] = {}


def svid_identity(der: bytes | None) -> str:
    """The SPIFFE ID of a peer's leaf certificate (DER, as `getpeercert(binary_form=True)` gives it) that follows
    the X.509-SVID rules; ValueError says in plain words which rule it breaks (or that there is no certificate).

    The rules: not a CA (basicConstraints CA:FALSE, or none), keyUsage digitalSignature and neither keyCertSign
    nor cRLSign, and exactly one URI SAN, a SPIFFE ID (as peer_identity reads it). The chain, the validity period
    and the extended key usage are OpenSSL's to verify, before this."""
    if der is None:
        raise ValueError("peer presented no certificate")
    verdict = _svid_verdicts.get(der)
    if verdict is None:
        verdict = _svid_verdict(der)
        if len(_svid_verdicts) >= _SVID_VERDICTS_MAX:
            del _svid_verdicts[next(iter(_svid_verdicts))]
        _svid_verdicts[der] = verdict
    identity, problem = verdict
    if identity is None:
        raise ValueError(problem)
    return identity


def _svid_verdict(der: bytes) -> tuple[str | None, str | None]:
    """(the SPIFFE ID, None), or (None, the rule the certificate breaks)."""
    try:
        extensions = x509.load_der_x509_certificate(der).extensions
    except ValueError as exc:
        return None, f"peer certificate cannot be parsed: {exc}"
    try:
        ca = extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if ca:
        return None, "peer certificate is a CA certificate (basicConstraints CA:TRUE), not an X.509-SVID"
    try:
        usage = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None, "peer certificate has no keyUsage extension (an X.509-SVID must have digitalSignature)"
    if usage.key_cert_sign:
        return None, "peer certificate can sign certificates (keyUsage keyCertSign), not an X.509-SVID"
    if usage.crl_sign:
        return None, "peer certificate can sign CRLs (keyUsage cRLSign), not an X.509-SVID"
    if not usage.digital_signature:
        return None, "peer certificate lacks keyUsage digitalSignature, which an X.509-SVID must have"
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        found = f"{len(uris)} URI SANs" if uris else "no URI SAN"
        return None, f"peer certificate has {found} (an X.509-SVID has exactly one, its SPIFFE ID)"
    try:
        _split(uris[0])
    except ValueError as exc:
        return None, f"peer certificate's URI SAN is not a SPIFFE ID: {exc}"
    return uris[0], None


class Authorizer:
    """Decides whether a peer identity may call this service.

    `allow` and `deny` entries are service names (that service in this trust domain, namespace and datacenter)
    or full SPIFFE IDs. A deny entry always wins. A non-empty allow list admits only its entries (a full SPIFFE ID
    from another trust domain may be allowed explicitly). An empty one leaves it to `default_policy` (Consul
    intentions' default): "allow" admits any identity of this trust domain, so identities from another trust domain
    are refused unless allowed by name; "deny" admits nobody."""

    __slots__ = ("_allow", "_deny", "default_policy", "trust_domain")

    def __init__(
        self,
        allow: list[str],
        deny: list[str],
        *,
        trust_domain: str,
        namespace: str,
        datacenter: str,
        default_policy: Literal["allow", "deny"] = "allow",
    ) -> None:
        _check_trust_domain(trust_domain)
        if default_policy not in ("allow", "deny"):
            raise ValueError(f"default_policy must be 'allow' or 'deny' (got {default_policy!r})")
        self.trust_domain = trust_domain
        self.default_policy = default_policy
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
        policy = " default_policy=deny" if self.default_policy == "deny" else ""
        allow, deny = list(self._allow.values()), list(self._deny.values())
        return f"<Authorizer {self.trust_domain} allow={allow} deny={deny}{policy}>"

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
        if self.default_policy == "deny":
            return False, "refused by default_policy: deny"
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
