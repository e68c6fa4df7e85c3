"""A file-backed ECDSA P-256 certificate authority that issues SPIFFE leaf certificates and rotates its roots."""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.config import format_duration
from mesh.spiffe import spiffe_id as mesh_spiffe_id

__all__ = [
    "BACKDATE",
    "DEFAULT_BUNDLE_REFRESH_INTERVAL",
    "DEFAULT_LEAF_TTL",
    "DEFAULT_MAX_LEAF_TTL",
    "DEFAULT_ROOT_TTL",
    "CAError",
    "CertificateAuthority",
    "Issued",
    "Root",
    "check_service",
    "check_trust_domain",
    "fingerprint",
    "format_time",
    "inspect",
    "locked",
    "require_ca_directory",
    "spiffe_id",
    "utc_now",
    "write_file",
]

DEFAULT_ROOT_TTL = timedelta(days=3650)
DEFAULT_LEAF_TTL = timedelta(hours=24)
DEFAULT_MAX_LEAF_TTL = timedelta(hours=72)
DEFAULT_BUNDLE_REFRESH_INTERVAL = timedelta(minutes=5)
BACKDATE = timedelta(minutes=1)
"""Leaves (and roots) start this long before they are issued, so small clock differences between hosts do no harm."""

STATE_FILE = "state.json"
LOCK_FILE = ".lock"
_STATE_FORMAT = 1


class CAError(Exception):
    """A CA operation was refused or failed; the message is one plain line meant for the user."""


# --- names ---

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SERVICE = re.compile(r"[a-z][a-z0-9-]{0,62}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,63}")


def check_trust_domain(trust_domain: str) -> str:
    """Return the trust domain if it is valid (the rules of mesh.config), else raise CAError."""
    if not isinstance(trust_domain, str) or not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise CAError(f"invalid trust domain {trust_domain!r}: use lowercase letters, digits, '.', '-' and '_'")
    return trust_domain


def check_service(service: str) -> str:
    """Return the service name if it is valid (the rules of mesh.config), else raise CAError."""
    if not isinstance(service, str) or not _SERVICE.fullmatch(service):
        raise CAError(
            f"invalid service name {service!r}: use 1-63 lowercase letters, digits and '-', starting with a letter"
        )
    return service


def _check_segment(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value) or value in (".", ".."):
        raise CAError(f"invalid {kind} {value!r}: use 1-63 letters, digits, '.', '-' and '_'")
    return value


def spiffe_id(trust_domain: str, namespace: str, datacenter: str, service: str) -> str:
    """The SPIFFE ID of a service, in Consul's form: spiffe://<trust_domain>/ns/<ns>/dc/<dc>/svc/<service>."""
    check_trust_domain(trust_domain)
    _check_segment("namespace", namespace)
    _check_segment("datacenter", datacenter)
    check_service(service)
    return mesh_spiffe_id(trust_domain, namespace, datacenter, service)


# --- time ---


def utc_now(now: datetime | None = None) -> datetime:
    """`now` (default: the current time) in UTC, whole seconds, as certificates store it."""
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC).replace(microsecond=0)


def format_time(t: datetime) -> str:
    """A time as the CA shows it to people: '2025-01-31 14:05:00 UTC'."""
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _as_timedelta(value: timedelta | float, what: str) -> timedelta:
    span = value if isinstance(value, timedelta) else timedelta(seconds=value)
    if span <= timedelta(0):
        raise CAError(f"{what} must be positive (got {span.total_seconds():g}s)")
    return span


def _span(delta: timedelta) -> str:
    """A duration in plain words at a useful precision: '3d 4h', '23h 59m', '5m 10s', '42s'."""
    seconds = int(abs(delta.total_seconds()))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n][:2]
    return " ".join(shown) or "0s"


# --- files ---


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Replace `path` atomically with `data`; a private file (a key, the token store) is created with mode 0600."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the CA directory's lock: one process at a time changes state.json or tokens.json."""
    fd = os.open(Path(directory) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CAError(f"{path}: {what} is missing") from None
    except OSError as exc:
        raise CAError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None


def require_ca_directory(directory: str | os.PathLike[str]) -> Path:
    """The directory as a Path if it holds a CA (a state.json), else CAError saying what is wrong and what to do."""
    path = Path(directory)
    if not path.exists():
        raise CAError(f"{path} does not exist; create a CA there with `mesh ca init --dir {path} --trust-domain TD`")
    if not path.is_dir():
        raise CAError(f"{path} is not a directory (expected a CA directory made by `mesh ca init`)")
    if not (path / STATE_FILE).exists():
        try:
            next(path.iterdir(), None)
        except OSError as exc:
            raise CAError(f"{path}: cannot read the CA directory: {exc.strerror or exc}") from None
        raise CAError(f"{path} is not a CA directory (it has no {STATE_FILE}; make one with `mesh ca init`)")
    return path


# --- state ---


@dataclass(frozen=True)
class _RootRecord:
    id: int
    published: datetime
    signs_from: datetime


@dataclass(frozen=True)
class _State:
    trust_domain: str
    created: datetime
    intermediate: bool
    root_ttl: timedelta
    max_leaf_ttl: timedelta
    bundle_refresh_interval: timedelta
    roots: tuple[_RootRecord, ...]

    def to_json(self) -> bytes:
        data = {
            "format": _STATE_FORMAT,
            "trust_domain": self.trust_domain,
            "created": self.created.isoformat(),
            "intermediate": self.intermediate,
            "root_ttl_seconds": self.root_ttl.total_seconds(),
            "max_leaf_ttl_seconds": self.max_leaf_ttl.total_seconds(),
            "bundle_refresh_interval_seconds": self.bundle_refresh_interval.total_seconds(),
            "roots": [
                {"id": r.id, "published": r.published.isoformat(), "signs_from": r.signs_from.isoformat()}
                for r in self.roots
            ],
        }
        return (json.dumps(data, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, path: Path) -> _State:
        try:
            data = json.loads(raw)
            if data.get("format") != _STATE_FORMAT:
                raise CAError(f"{path}: unknown CA state format {data.get('format')!r} (this version reads 1)")
            roots = tuple(
                _RootRecord(int(r["id"]), _parse_time(r["published"]), _parse_time(r["signs_from"]))
                for r in data["roots"]
            )
            state = cls(
                trust_domain=check_trust_domain(data["trust_domain"]),
                created=_parse_time(data["created"]),
                intermediate=bool(data["intermediate"]),
                root_ttl=timedelta(seconds=float(data["root_ttl_seconds"])),
                max_leaf_ttl=timedelta(seconds=float(data["max_leaf_ttl_seconds"])),
                bundle_refresh_interval=timedelta(seconds=float(data["bundle_refresh_interval_seconds"])),
                roots=roots,
            )
        except CAError:
            raise
        except KeyError as exc:
            raise CAError(f"{path}: damaged CA state: {exc.args[0]!r} is missing") from None
        except (ValueError, TypeError, AttributeError) as exc:
            raise CAError(f"{path}: damaged CA state: {exc}") from None
        if not roots or [r.id for r in roots] != list(range(1, len(roots) + 1)):
            raise CAError(f"{path}: damaged CA state: roots must be numbered 1, 2, 3, ...")
        return state


def _parse_time(text: str) -> datetime:
    t = datetime.fromisoformat(text)
    if t.tzinfo is None:
        raise ValueError(f"time without a timezone: {text!r}")
    return t.astimezone(UTC)


def _read_state(directory: Path) -> _State:
    path = directory / STATE_FILE
    return _State.from_json(_read(path, "the CA state"), path)


# --- public results ---


@dataclass(frozen=True)
class Root:
    """One CA root (and its intermediate, when the CA uses one) with its place in the rotation schedule."""

    id: int
    certificate: x509.Certificate
    intermediate: x509.Certificate | None
    published: datetime
    """From this time the root is in the trust bundle."""
    signs_from: datetime
    """From this time the CA signs leaves under this root, until a newer root's signs_from."""
    retires: datetime | None
    """When the root leaves the bundle: its successor's signs_from plus the maximum leaf TTL (None: no successor)."""

    @property
    def issuer(self) -> x509.Certificate:
        """The certificate that signs leaves: the intermediate if there is one, else the root itself."""
        return self.intermediate or self.certificate

    @property
    def not_valid_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    def in_bundle(self, now: datetime) -> bool:
        return self.published <= now < self.not_valid_after and (self.retires is None or now < self.retires)


@dataclass(frozen=True)
class Issued:
    """A signed leaf: the chain for cert.pem, its key (None when signed from a CSR) and the trust bundle."""

    cert_pem: bytes
    """The leaf certificate, followed by the intermediate when the CA uses one (what cert.pem holds)."""
    key_pem: bytes | None
    """The leaf's new private key (PKCS#8 PEM); None for sign_csr, where the key never left the caller."""
    bundle_pem: bytes
    """Every root currently in the trust bundle."""
    certificate: x509.Certificate
    spiffe_id: str
    root: int
    """The id of the root the chain leads to."""
    capped: str | None
    """Why the requested TTL was shortened (e.g. "the CA's maximum leaf TTL of 72h"), or None."""

    def __repr__(self) -> str:  # never show the key
        return (
            f"Issued({self.spiffe_id!r}, root={self.root}, serial={self.certificate.serial_number:x}, "
            f"not_valid_after={format_time(self.certificate.not_valid_after_utc)!r})"
        )


def fingerprint(certificate: x509.Certificate) -> str:
    """The SHA-256 fingerprint as colon-separated hex, as `openssl x509 -fingerprint -sha256` prints it."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


# --- certificate construction ---


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_id(certificate: x509.Certificate) -> x509.SubjectKeyIdentifier:
    return certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value


def _ca_certificate(
    *,
    common_name: str,
    trust_domain: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    path_length: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """A root (issuer None: self-signed) or an intermediate; both carry the trust domain's SPIFFE ID."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    key_id = x509.SubjectKeyIdentifier.from_public_key(public_key)
    authority_key_id = _key_id(issuer) if issuer else key_id
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(key_id, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(authority_key_id), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _leaf_certificate(
    *,
    service: str,
    identity: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_key_id(issuer)), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def _root_folder(directory: Path, root_id: int) -> Path:
    return directory / "roots" / str(root_id)


def _create_root(directory: Path, state: _State, root_id: int, now: datetime) -> None:
    """Generate root `root_id` (and its intermediate) and write its files; keys are written 0600."""
    folder = _root_folder(directory, root_id)
    if folder.exists():
        raise CAError(
            f"{folder} exists but {STATE_FILE} does not list it (left from an interrupted rotation?); "
            "move it away and try again"
        )
    folder.mkdir(mode=0o700, parents=True)
    not_before, not_after = now - BACKDATE, now + state.root_ttl
    key = _new_key()
    root = _ca_certificate(
        common_name=f"triomesh {state.trust_domain} root {root_id}",
        trust_domain=state.trust_domain,
        public_key=key.public_key(),
        issuer=None,
        issuer_key=key,
        path_length=1 if state.intermediate else 0,
        not_before=not_before,
        not_after=not_after,
    )
    write_file(folder / "key.pem", _key_pem(key), private=True)
    write_file(folder / "cert.pem", _pem(root))
    if state.intermediate:
        intermediate_key = _new_key()
        intermediate = _ca_certificate(
            common_name=f"triomesh {state.trust_domain} intermediate {root_id}",
            trust_domain=state.trust_domain,
            public_key=intermediate_key.public_key(),
            issuer=root,
            issuer_key=key,
            path_length=0,
            not_before=not_before,
            not_after=not_after,
        )
        write_file(folder / "intermediate-key.pem", _key_pem(intermediate_key), private=True)
        write_file(folder / "intermediate.pem", _pem(intermediate))


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, "the certificate"))
    except ValueError:
        raise CAError(f"{path}: damaged certificate (not a PEM certificate)") from None


def _load_key(path: Path, certificate: x509.Certificate) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path, "the private key"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CAError(f"{path}: damaged private key (not an unencrypted PEM key)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
        raise CAError(f"{path}: this key does not belong to the certificate beside it")
    return key


# --- CSR checks ---


# Requested extensions the CA ignores because it always sets its own values; any other one is refused.
_IGNORED_CSR_EXTENSIONS = (x509.KeyUsage, x509.ExtendedKeyUsage, x509.SubjectKeyIdentifier)


def _check_csr(csr: x509.CertificateSigningRequest, *, service: str, identity: str) -> ec.EllipticCurvePublicKey:
    """The CSR's public key if the CSR asks for nothing but `identity`; else CAError saying what it asked for."""
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise CAError(
            "the CSR's public key is of an unsupported type; the mesh CA signs only ECDSA P-256 keys"
        ) from None
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
        kind = (
            f"an EC key on {public_key.curve.name}"
            if isinstance(public_key, ec.EllipticCurvePublicKey)
            else f"a {type(public_key).__name__.removesuffix('PublicKey').removeprefix('_')} key"
        )
        raise CAError(f"the CSR holds {kind}; the mesh CA signs only ECDSA P-256 (secp256r1) keys")
    if not csr.is_signature_valid:
        raise CAError("the CSR's signature does not verify (it was not signed by the key it holds)")
    allowed_subjects = (x509.Name([]), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
    if csr.subject not in allowed_subjects:
        raise CAError(
            f"the CSR asks for subject {csr.subject.rfc4514_string()!r}; leave the subject empty or use "
            f"CN={service} (the CA sets the identity itself)"
        )
    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension) as exc:
        raise CAError(f"the CSR's extensions cannot be read: {exc}") from None
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.SubjectAlternativeName):
            names = [_describe_name(name) for name in value]
            if names != [f"URI:{identity}"]:
                raise CAError(
                    f"the CSR asks for names {', '.join(names) or 'none'}; only URI:{identity}, the identity "
                    "the caller proved, may be requested (the CA sets it itself)"
                )
        elif isinstance(value, x509.BasicConstraints):
            if value.ca:
                raise CAError("the CSR asks for a CA certificate; the mesh CA signs only leaf certificates")
        elif not isinstance(value, _IGNORED_CSR_EXTENSIONS):
            raise CAError(f"the CSR asks for the {_extension_name(extension)} extension, which the CA does not grant")
    return public_key


def _describe_name(name: x509.GeneralName) -> str:
    kinds = {
        x509.DNSName: "DNS",
        x509.UniformResourceIdentifier: "URI",
        x509.RFC822Name: "email",
        x509.IPAddress: "IP",
    }
    return f"{kinds.get(type(name), type(name).__name__)}:{name.value}"


def _extension_name(extension: x509.Extension[Any]) -> str:
    name = getattr(extension.oid, "_name", None)
    return name if name and name != "Unknown OID" else extension.oid.dotted_string


# --- the CA ---


class CertificateAuthority:
    """A CA living in a directory: its roots, their rotation schedule, and leaf signing.

    Everything that depends on time (which root signs, which roots are in the bundle) is computed from the stored
    schedule and an injectable `now`, so nothing needs a background task. Private keys are read only when a leaf is
    signed and are never logged or shown.
    """

    def __init__(self, directory: Path, state: _State) -> None:
        """Use `CertificateAuthority.init` or `CertificateAuthority.load`."""
        self.directory = directory
        self._state = state
        self._certificates: dict[int, tuple[x509.Certificate, x509.Certificate | None]] = {}
        self._keys: dict[int, ec.EllipticCurvePrivateKey] = {}
        self._load_certificates()

    def __repr__(self) -> str:
        roots = ", ".join(str(r.id) for r in self._state.roots)
        return f"CertificateAuthority({str(self.directory)!r}, trust_domain={self.trust_domain!r}, roots=[{roots}])"

    # construction

    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str],
        trust_domain: str,
        *,
        now: datetime | None = None,
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
        intermediate: bool = False,
        max_leaf_ttl: timedelta = DEFAULT_MAX_LEAF_TTL,
        bundle_refresh_interval: timedelta = DEFAULT_BUNDLE_REFRESH_INTERVAL,
    ) -> CertificateAuthority:
        """Create a CA with its first root in `directory` (new or empty); never overwrites an existing CA."""
        now = utc_now(now)
        path = Path(directory)
        state = _State(
            trust_domain=check_trust_domain(trust_domain),
            created=now,
            intermediate=intermediate,
            root_ttl=_as_timedelta(root_ttl, "the root TTL"),
            max_leaf_ttl=_as_timedelta(max_leaf_ttl, "the maximum leaf TTL"),
            bundle_refresh_interval=_as_timedelta(bundle_refresh_interval, "the bundle refresh interval"),
            roots=(_RootRecord(1, published=now, signs_from=now),),
        )
        if state.max_leaf_ttl >= state.root_ttl:
            raise CAError("the root TTL must be longer than the maximum leaf TTL")
        try:
            if path.exists() and not path.is_dir():
                raise CAError(f"{path} exists and is not a directory; choose a new or empty directory for the CA")
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            with locked(path):
                if (path / STATE_FILE).exists():
                    raise CAError(f"{path} already holds a CA ({STATE_FILE} exists); refusing to overwrite it")
                others = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
                if others:
                    shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
                    raise CAError(f"{path} is not empty ({shown}); choose a new or empty directory for the CA")
                _create_root(path, state, 1, now)
                write_file(path / STATE_FILE, state.to_json())  # last: a half-made directory is not a CA
        except OSError as exc:
            raise CAError(f"cannot create the CA in {path}: {exc.strerror or exc}") from None
        return cls(path, state)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """Open the CA in `directory`; CAError says clearly if it is missing, unreadable or not a CA."""
        path = require_ca_directory(directory)
        return cls(path, _read_state(path))

    def _load_certificates(self) -> None:
        for record in self._state.roots:
            if record.id not in self._certificates:
                folder = _root_folder(self.directory, record.id)
                intermediate = _load_certificate(folder / "intermediate.pem") if self._state.intermediate else None
                self._certificates[record.id] = (_load_certificate(folder / "cert.pem"), intermediate)

    # settings

    @property
    def trust_domain(self) -> str:
        return self._state.trust_domain

    @property
    def intermediate(self) -> bool:
        """Whether leaves are signed by a per-root intermediate rather than by the root itself."""
        return self._state.intermediate

    @property
    def max_leaf_ttl(self) -> timedelta:
        return self._state.max_leaf_ttl

    @property
    def bundle_refresh_interval(self) -> timedelta:
        """How often sidecars re-read the bundle; a new root signs two of these after its rotation."""
        return self._state.bundle_refresh_interval

    def spiffe_id(self, service: str, *, namespace: str = "default", datacenter: str = "dc1") -> str:
        """The SPIFFE ID this CA gives `service`."""
        return spiffe_id(self.trust_domain, namespace, datacenter, service)

    # roots and the bundle

    def roots(self) -> tuple[Root, ...]:
        """Every root on disk, oldest first, with its schedule (including roots already out of the bundle)."""
        records = self._state.roots
        result = []
        for i, record in enumerate(records):
            successor = records[i + 1] if i + 1 < len(records) else None
            certificate, intermediate = self._certificates[record.id]
            result.append(
                Root(
                    id=record.id,
                    certificate=certificate,
                    intermediate=intermediate,
                    published=record.published,
                    signs_from=record.signs_from,
                    retires=successor.signs_from + self.max_leaf_ttl if successor else None,
                )
            )
        return tuple(result)

    def root(self, root_id: int) -> Root:
        """The root numbered `root_id`."""
        for root in self.roots():
            if root.id == root_id:
                return root
        raise CAError(f"{self.directory} has no root {root_id}")

    def signing_root(self, now: datetime | None = None) -> Root:
        """The root whose key (or intermediate) signs leaves at `now`: the newest whose signs_from has come."""
        now = utc_now(now)
        started = [root for root in self.roots() if root.signs_from <= now]
        if not started:
            raise CAError(
                f"the CA in {self.directory} was created at {format_time(self._state.created)}, "
                f"after {format_time(now)}: no root signs then"
            )
        return max(started, key=lambda root: (root.signs_from, root.id))

    def bundle(self, now: datetime | None = None) -> tuple[Root, ...]:
        """The roots in the trust bundle at `now`, oldest first."""
        now = utc_now(now)
        return tuple(root for root in self.roots() if root.in_bundle(now))

    def bundle_pem(self, now: datetime | None = None) -> bytes:
        """The trust bundle at `now`: every current root certificate as PEM (intermediates travel in leaf chains)."""
        return b"".join(_pem(root.certificate) for root in self.bundle(now))

    # issuing

    def issue(
        self,
        service: str,
        *,
        namespace: str = "default",
        datacenter: str = "dc1",
        ttl: timedelta | float = DEFAULT_LEAF_TTL,
        now: datetime | None = None,
    ) -> Issued:
        """Generate a P-256 key and a leaf certificate for `service`; `ttl` (timedelta or seconds) is capped."""
        key = _new_key()
        issued = self._sign(
            key.public_key(), service=service, namespace=namespace, datacenter=datacenter, ttl=ttl, now=now
        )
        return replace(issued, key_pem=_key_pem(key))

    def sign_csr(
        self,
        csr_pem: bytes,
        *,
        service: str,
        namespace: str = "default",
        datacenter: str = "dc1",
        ttl: timedelta | float = DEFAULT_LEAF_TTL,
        now: datetime | None = None,
    ) -> Issued:
        """Sign a CSR for the identity of `service` (which the caller has proven); refuses a CSR asking for more.

        The CSR must hold a P-256 key, carry a valid signature, and ask for no names but that identity (an empty or
        CN=<service> subject; no SAN, or exactly the service's SPIFFE ID). The CA sets every extension itself.
        """
        identity = spiffe_id(self.trust_domain, namespace, datacenter, service)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise CAError("the CSR is not a PEM certificate request (-----BEGIN CERTIFICATE REQUEST-----)") from None
        public_key = _check_csr(csr, service=service, identity=identity)
        return self._sign(public_key, service=service, namespace=namespace, datacenter=datacenter, ttl=ttl, now=now)

    def _sign(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        service: str,
        namespace: str,
        datacenter: str,
        ttl: timedelta | float,
        now: datetime | None,
    ) -> Issued:
        now = utc_now(now)
        identity = spiffe_id(self.trust_domain, namespace, datacenter, service)
        requested = _as_timedelta(ttl, "the certificate TTL")
        root = self.signing_root(now)
        limits = [
            (now + requested, None),
            (
                now + self.max_leaf_ttl,
                f"the CA's maximum leaf TTL of {format_duration(self.max_leaf_ttl.total_seconds())}",
            ),
            (root.issuer.not_valid_after_utc, f"the expiry of root {root.id} at {format_time(root.not_valid_after)}"),
        ]
        not_after, capped = min(limits, key=lambda limit: limit[0])
        if not_after <= now:
            raise CAError(
                f"root {root.id} expired at {format_time(root.not_valid_after)}; "
                f"run `mesh ca rotate --dir {self.directory} --activate` after publishing a new root"
            )
        certificate = _leaf_certificate(
            service=service,
            identity=identity,
            public_key=public_key,
            issuer=root.issuer,
            issuer_key=self._signing_key(root),
            not_before=now - BACKDATE,
            not_after=not_after,
        )
        chain = _pem(certificate) + (_pem(root.intermediate) if root.intermediate else b"")
        return Issued(
            cert_pem=chain,
            key_pem=None,
            bundle_pem=self.bundle_pem(now),
            certificate=certificate,
            spiffe_id=identity,
            root=root.id,
            capped=capped,
        )

    def _signing_key(self, root: Root) -> ec.EllipticCurvePrivateKey:
        if root.id not in self._keys:
            name = "intermediate-key.pem" if root.intermediate else "key.pem"
            self._keys[root.id] = _load_key(_root_folder(self.directory, root.id) / name, root.issuer)
        return self._keys[root.id]

    # rotation

    def rotate(self, *, now: datetime | None = None) -> Root:
        """Publish a new root in the bundle at once; it starts signing after two bundle refresh intervals.

        Until then (or until `activate`) leaves are still signed under the current root, so every peer has seen the
        new root in its bundle before it meets a leaf signed under it. Refused while a newer root is still waiting.
        """
        now = utc_now(now)
        with self._changing_state() as state:
            newest = state.roots[-1]
            if newest.signs_from > now:
                raise CAError(
                    f"root {newest.id} is already waiting to take over (it signs from "
                    f"{format_time(newest.signs_from)}); activate it with "
                    f"`mesh ca rotate --dir {self.directory} --activate` before rotating again"
                )
            record = _RootRecord(newest.id + 1, published=now, signs_from=now + 2 * state.bundle_refresh_interval)
            _create_root(self.directory, state, record.id, now)
            self._state = replace(state, roots=(*state.roots, record))
        return self.root(record.id)

    def activate(self, *, now: datetime | None = None) -> Root:
        """Make the newest root, published by `rotate` and still waiting, sign from `now` on."""
        now = utc_now(now)
        with self._changing_state() as state:
            newest = state.roots[-1]
            if newest.signs_from <= now:
                raise CAError(
                    f"no new root is waiting to be activated: root {newest.id} signs since "
                    f"{format_time(newest.signs_from)}; publish a new root with `mesh ca rotate --dir {self.directory}`"
                )
            record = replace(newest, signs_from=max(now, newest.published))
            self._state = replace(state, roots=(*state.roots[:-1], record))
        return self.root(record.id)

    @contextmanager
    def _changing_state(self) -> Iterator[_State]:
        """Under the directory lock, yield the state as stored now; write self._state back if it was changed."""
        try:
            with locked(self.directory):
                self._state = _read_state(self.directory)  # another process may have rotated meanwhile
                before = self._state
                yield before
                if self._state is not before:
                    write_file(self.directory / STATE_FILE, self._state.to_json())
        except OSError as exc:
            raise CAError(f"cannot update the CA in {self.directory}: {exc.strerror or exc}") from None
        self._load_certificates()


# --- inspection ---


def inspect(pem: bytes, *, now: datetime | None = None) -> str:
    """Describe each certificate in PEM data in plain words: subject, SPIFFE ID, validity, issuer, fingerprint."""
    now = utc_now(now)
    has_key = b"PRIVATE KEY-----" in pem
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        if has_key:
            raise CAError("it holds a private key and no certificate (inspect shows certificates only)")
        raise CAError("it holds no PEM certificate (no -----BEGIN CERTIFICATE----- line)")
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CAError("it holds a damaged PEM certificate") from None
    blocks = [_describe(c, now, f"certificate {i} of {len(certificates)}") for i, c in enumerate(certificates, 1)]
    if has_key:
        blocks.append("the file also holds a private key (not shown)")
    return "\n\n".join(blocks) + "\n"


def _describe(certificate: x509.Certificate, now: datetime, title: str) -> str:
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if now < start:
        status = f"NOT YET VALID (starts in {_span(start - now)})"
    elif now >= end:
        status = f"EXPIRED {_span(now - end)} ago"
    else:
        status = f"valid now (expires in {_span(end - now)})"
    rows = [
        ("subject", certificate.subject.rfc4514_string() or "(empty)"),
        ("SPIFFE ID", _spiffe_ids(certificate)),
        ("valid from", format_time(start)),
        ("valid until", format_time(end)),
        ("status", status),
        ("issuer", certificate.issuer.rfc4514_string() or "(empty)"),
        ("fingerprint", f"SHA-256 {fingerprint(certificate)}"),
        ("CA", _ca_role(certificate)),
        ("key", _key_kind(certificate)),
        ("usage", _usage(certificate)),
    ]
    return title + "\n" + "\n".join(f"  {name + ':':<13}{value}" for name, value in rows)


def _extension(certificate: x509.Certificate, kind: type[Any]) -> Any:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _spiffe_ids(certificate: x509.Certificate) -> str:
    names = _extension(certificate, x509.SubjectAlternativeName)
    uris = names.get_values_for_type(x509.UniformResourceIdentifier) if names else []
    ids = [uri for uri in uris if uri.startswith("spiffe://")]
    if not ids:
        return "none"
    if len(ids) > 1:
        return ", ".join(ids) + " (several: not a valid SPIFFE certificate)"
    return ids[0]


def _ca_role(certificate: x509.Certificate) -> str:
    constraints = _extension(certificate, x509.BasicConstraints)
    if not constraints or not constraints.ca:
        return "no (a leaf certificate)"
    if certificate.issuer == certificate.subject:
        return "yes (a self-signed root)"
    return "yes (an intermediate)"


def _key_kind(certificate: x509.Certificate) -> str:
    key = certificate.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ECDSA P-256" if isinstance(key.curve, ec.SECP256R1) else f"EC {key.curve.name}"
    size = getattr(key, "key_size", None)
    kind = type(key).__name__.removeprefix("_").removesuffix("PublicKey")
    return f"{kind} {size} bits" if size else kind


def _usage(certificate: x509.Certificate) -> str:
    words = []
    usage = _extension(certificate, x509.KeyUsage)
    if usage:
        flags = [
            ("digital_signature", "digital signature"),
            ("key_agreement", "key agreement"),
            ("key_encipherment", "key encipherment"),
            ("key_cert_sign", "signs certificates"),
            ("crl_sign", "signs CRLs"),
        ]
        words += [text for flag, text in flags if getattr(usage, flag)]
    extended = _extension(certificate, x509.ExtendedKeyUsage)
    if extended:
        roles = {ExtendedKeyUsageOID.SERVER_AUTH: "TLS server", ExtendedKeyUsageOID.CLIENT_AUTH: "TLS client"}
        words += [roles.get(oid, oid.dotted_string) for oid in extended]
    return ", ".join(words) or "not restricted"
