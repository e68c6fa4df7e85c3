"""This sidecar's identity: certificate, key and trust bundle from watched files or from the mesh CA, kept current."""

from __future__ import annotations

import datetime
import hashlib
import os
import random as _random
import ssl
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh import spiffe, tls
from mesh.ca_client import CaClient, CaError, ca_context, ca_server_id, parse_bundle
from mesh.config import IdentityFiles, IdentityFromCA, IdentitySettings, MeshSettings

log = structlog.get_logger("mesh.identity")

UTC = datetime.UTC


class IdentityError(Exception):
    """The identity cannot be used; the message says which file (or which part of the CA's answer) and why."""


@dataclass(frozen=True)
class Identity:
    """One loaded certificate with the TLS contexts built from it; new connections use the latest one."""

    spiffe_id: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    fingerprint: str
    roots: tuple[str, ...]  # "subject (sha256 fingerprint)" of each bundle root
    server_context: ssl.SSLContext
    client_context: ssl.SSLContext  # ALPN h2 and http/1.1
    client_context_http1: ssl.SSLContext  # ALPN http/1.1 only: upgrades and opaque TCP

    def valid_at(self, now: datetime.datetime) -> bool:
        return self.not_before <= now < self.not_after

    def describe(self, now: datetime.datetime) -> dict[str, Any]:
        """What admin `/certs` shows of this certificate."""
        return {
            "loaded": True,
            "spiffe_id": self.spiffe_id,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "seconds_until_expiry": round((self.not_after - now).total_seconds(), 1),
            "fingerprint_sha256": self.fingerprint,
            "bundle_roots": list(self.roots),
        }


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _spiffe_ids(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [uri for uri in san.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith("spiffe://")]


def load_identity(files: IdentityFiles) -> Identity:
    """Read and check the three files and build the mesh hop's TLS contexts from them."""
    return _build_identity(
        files.cert, files.key, files.bundle, names=(str(files.cert), str(files.key), str(files.bundle))
    )


def _build_identity(cert_file: Path, key_file: Path, bundle_file: Path, *, names: tuple[str, str, str]) -> Identity:
    """The Identity of a certificate chain, key and bundle in files; `names` (cert, key, bundle) name them in errors."""
    cert_name, key_name, bundle_name = names
    try:
        chain = x509.load_pem_x509_certificates(cert_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{cert_name}: cannot read a PEM certificate: {exc}") from None
    try:
        roots = x509.load_pem_x509_certificates(bundle_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{bundle_name}: cannot read PEM root certificates: {exc}") from None
    leaf = chain[0]
    ids = _spiffe_ids(leaf)
    if len(ids) != 1:
        raise IdentityError(f"{cert_name}: expected exactly one spiffe:// URI SAN, found {len(ids)}")
    try:
        server_context = tls.server_context(str(cert_file), str(key_file), str(bundle_file))
        client_context = tls.client_context(str(cert_file), str(key_file), str(bundle_file))
        client_context_http1 = tls.client_context(str(cert_file), str(key_file), str(bundle_file), http2=False)
    except (OSError, ssl.SSLError) as exc:
        raise IdentityError(f"{cert_name}, {key_name}: cannot be used together: {exc}") from None
    return Identity(
        spiffe_id=ids[0],
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        fingerprint=_fingerprint(leaf),
        roots=tuple(f"{root.subject.rfc4514_string()} ({_fingerprint(root)})" for root in roots),
        server_context=server_context,
        client_context=client_context,
        client_context_http1=client_context_http1,
    )


@contextmanager
def _private_files(**contents: bytes) -> Iterator[dict[str, Path]]:
    """PEM data written for OpenSSL to read (ssl loads keys only from files): a fresh 0700 temporary directory,
    each file 0600, removed with everything in it when the block ends."""
    with tempfile.TemporaryDirectory(prefix="mesh-identity-") as directory:
        paths = {}
        for name, data in contents.items():
            path = Path(directory) / f"{name}.pem"
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
                file.write(data)
            paths[name] = path
        yield paths


def _readiness(current: Identity | None, now: datetime.datetime, missing: str) -> tuple[bool, str]:
    """Ready only while a certificate is held and valid at `now`; otherwise the reason (`missing` if none is held)."""
    if current is None:
        return False, missing
    if not current.valid_at(now):
        return False, f"certificate not valid now (valid {current.not_before} to {current.not_after})"
    return True, "ready"


class FileIdentity:
    """Holds the current identity from files and reloads it when a file changes.

    A file that is missing or broken on reload keeps the last good identity (and logs once per distinct
    problem); at start the identity stays absent, so the sidecar is not ready and refuses mTLS traffic."""

    def __init__(
        self,
        files: IdentityFiles,
        *,
        poll_interval: float = 2.0,
        utcnow: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(UTC),
    ) -> None:
        self.files = files
        self.poll_interval = poll_interval
        self.utcnow = utcnow
        self.current: Identity | None = None
        self._stamp: tuple[Any, ...] | None = None
        self._reported = ""

    def __repr__(self) -> str:
        return f"<FileIdentity {self.current.spiffe_id if self.current else 'unloaded'} from {self.files.cert}>"

    def _file_stamp(self) -> tuple[Any, ...]:
        stamp = []
        for path in (self.files.cert, self.files.key, self.files.bundle):
            try:
                st = os.stat(path)
                stamp.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def reload_if_changed(self) -> None:
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            identity = load_identity(self.files)
        except IdentityError as exc:
            if str(exc) != self._reported:
                self._reported = str(exc)
                if self.current is None:
                    log.error("identity unusable; mutual TLS is refused until it is fixed", error=str(exc))
                else:
                    log.warning("identity reload failed; keeping the current certificate", error=str(exc))
            return
        self._reported = ""
        self.current = identity
        log.info(
            "identity loaded",
            spiffe_id=identity.spiffe_id,
            not_after=identity.not_after.isoformat(),
            roots=len(identity.roots),
        )

    def ready(self) -> tuple[bool, str]:
        return _readiness(self.current, self.utcnow(), "no usable certificate")

    def seconds_until_expiry(self) -> float | None:
        if self.current is None:
            return None
        return (self.current.not_after - self.utcnow()).total_seconds()

    def status(self) -> dict[str, Any]:
        current = self.current
        if current is None:
            return {"loaded": False, "files": {k: str(v) for k, v in self.files.model_dump().items()}}
        return {**current.describe(self.utcnow()), "source": "files"}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load now, then poll the files for changes; runs until cancelled."""
        self.reload_if_changed()
        task_status.started()
        while True:
            await trio.sleep(self.poll_interval)
            self.reload_if_changed()


def renewal_delay(
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    now: datetime.datetime,
    renew_at: float = 0.7,
    jitter_fraction: float = 0.1,
    random: Callable[[], float] = _random.random,
) -> float:
    """Seconds from `now` until a certificate valid from not_before to not_after should be renewed.

    The renewal point is `renew_at` of the lifetime, moved by up to ±`jitter_fraction` of the lifetime (`random()`
    in [0, 1) picks where), so that sidecars started together do not all renew at once. Jitter never moves it
    before half of renew_at, nor past halfway between renew_at and expiry. 0 when that point has passed."""
    lifetime = (not_after - not_before).total_seconds()
    fraction = renew_at + jitter_fraction * (2 * random() - 1)
    fraction = min(max(fraction, renew_at / 2), (1 + renew_at) / 2)
    renew = not_before + datetime.timedelta(seconds=lifetime * fraction)
    return max(0.0, (renew - now).total_seconds())


def backoff_delay(
    failures: int,
    *,
    base: float = 1.0,
    cap: float = 60.0,
    jitter: float = 0.2,
    random: Callable[[], float] = _random.random,
) -> float:
    """Seconds to wait after `failures` failed attempts in a row (1 for the first): base doubling up to cap,
    moved by up to ±`jitter` of itself and kept within [base, cap]."""
    delay = min(cap, base * 2 ** max(0, failures - 1))
    return min(cap, max(base, delay * (1 + jitter * (2 * random() - 1))))


# Renewal moves by up to this fraction of the lifetime either way, so that sidecars started together spread out.
_RENEWAL_JITTER = 0.1


class IdentitySource(Protocol):
    """What the transports, /ready, /certs and the expiry metric use of an identity, wherever it comes from."""

    current: Identity | None

    def ready(self) -> tuple[bool, str]: ...

    def status(self) -> dict[str, Any]: ...

    def seconds_until_expiry(self) -> float | None: ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...


class CaIdentity:
    """Holds this sidecar's certificate from the mesh CA's signing API, renews it, and refreshes the trust bundle.

    At start a P-256 key is generated and a CSR for this sidecar's SPIFFE ID is sent with the bootstrap token.
    Each certificate is renewed at `renew_at` of its lifetime (±10 % jitter) with a new key, authenticated by
    the current certificate, or by the token again if the CA refuses the certificate. Failures are retried with
    exponential backoff (1 s to 60 s, jittered) for as long as it takes, while the current certificate keeps
    serving until it expires. The bundle is fetched again every `bundle_refresh`, independently of renewal.

    Every change publishes a new Identity (`current`): new connections use it at once, established ones keep
    the contexts they were made with. Private keys never leave the process: OpenSSL reads them from a private
    temporary directory that is removed as soon as the contexts are built. Two clocks are used: trio's for
    waiting and `utcnow` for certificate validity (tests inject both)."""

    def __init__(
        self,
        settings: IdentityFromCA,
        *,
        service: str,
        mesh: MeshSettings,
        utcnow: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(UTC),
        random: Callable[[], float] = _random.random,
        request_timeout: float = 10.0,
    ) -> None:
        self.settings = settings
        self.service = service
        self.spiffe_id = spiffe.spiffe_id(mesh.trust_domain, mesh.namespace, mesh.datacenter, service)
        self.client = CaClient(settings.url, expected_id=ca_server_id(mesh.trust_domain), timeout=request_timeout)
        self.utcnow = utcnow
        self.random = random
        self.current: Identity | None = None
        self.renews_at: datetime.datetime | None = None
        self.last_error = ""
        self.bundle_refreshed_at: datetime.datetime | None = None
        self._key_pem = b""
        self._chain_pem = b""
        self._bundle_pem: bytes | None = None  # what we trust the CA (and peers) with
        self._ca_context: ssl.SSLContext | None = None  # verifies the CA, presents nothing
        self._renewal_context: ssl.SSLContext | None = None  # verifies the CA, presents the current certificate

    def __repr__(self) -> str:
        state = f"valid until {self.current.not_after.isoformat()}" if self.current else "no certificate"
        return f"<CaIdentity {self.spiffe_id} from {self.settings.url}: {state}>"

    # -- what the sidecar reads ------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        why = f": {self.last_error}" if self.last_error else ""
        return _readiness(self.current, self.utcnow(), f"no certificate from the CA yet{why}")

    def seconds_until_expiry(self) -> float | None:
        if self.current is None:
            return None
        return (self.current.not_after - self.utcnow()).total_seconds()

    def status(self) -> dict[str, Any]:
        current = self.current
        about = {
            "source": "ca",
            "ca": self.settings.url,
            "last_error": self.last_error or None,
            "bundle_refreshed_at": self.bundle_refreshed_at.isoformat() if self.bundle_refreshed_at else None,
        }
        if current is None:
            return {"loaded": False, "spiffe_id": self.spiffe_id, **about}
        return {
            **current.describe(self.utcnow()),
            "renews_at": self.renews_at.isoformat() if self.renews_at else None,
            **about,
        }

    # -- running ---------------------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Make one attempt to obtain a certificate, report started (holding one or not), then keep it renewed and
        the bundle fresh until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._keep_certificate)
            nursery.start_soon(self._keep_bundle_fresh)
            task_status.started()

    async def _keep_certificate(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        failures = 0
        while True:
            try:
                await self.obtain()
            except (CaError, IdentityError) as exc:
                failures += 1
                delay = backoff_delay(failures, random=self.random)
                self._failed(exc, delay)
            else:
                failures = 0
                assert self.renews_at is not None
                delay = max(0.0, (self.renews_at - self.utcnow()).total_seconds())
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await trio.sleep(delay)

    async def _keep_bundle_fresh(self) -> None:
        while True:
            await trio.sleep(self.settings.bundle_refresh)
            try:
                await self.refresh_bundle()
            except (CaError, IdentityError) as exc:
                log.warning(
                    "trust bundle refresh failed; keeping the current bundle", ca=self.settings.url, error=str(exc)
                )

    def _failed(self, exc: Exception, retry_in: float) -> None:
        self.last_error = str(exc)
        current = self.current
        if current is not None and current.valid_at(self.utcnow()):
            log.warning(
                "certificate renewal failed; the current certificate stays in use",
                error=str(exc),
                not_after=current.not_after.isoformat(),
                retry_in_s=round(retry_in, 1),
            )
        else:
            log.error(
                "no valid certificate from the CA; mutual TLS is refused until one is obtained",
                ca=self.settings.url,
                error=str(exc),
                retry_in_s=round(retry_in, 1),
            )

    # -- talking to the CA -------------------------------------------------------------------------------------
    async def obtain(self) -> None:
        """Get and publish a new certificate for a new key: with the current certificate while it is valid, else
        (or when the CA refuses it) with the bootstrap token. CaError or IdentityError if that fails."""
        ca_context = await self._trusted_context()
        key = ec.generate_private_key(ec.SECP256R1())
        csr = _csr(key, self.service, self.spiffe_id)
        ttl = self.settings.ttl
        current = self.current
        signed = None
        if current is not None and current.valid_at(self.utcnow()) and self._renewal_context is not None:
            try:
                signed = await self.client.sign(self._renewal_context, csr, ttl=ttl)
            except CaError as exc:
                if not exc.credentials_refused:
                    raise
                log.warning(
                    "the CA refused renewal with the current certificate; trying the bootstrap token", error=str(exc)
                )
        if signed is None:
            signed = await self.client.sign(ca_context, csr, ttl=ttl, token=self._read_token())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        identity = self._install(signed.chain_pem, key_pem, signed.bundle_pem)
        now = self.utcnow()
        delay = renewal_delay(
            identity.not_before, identity.not_after, now, self.settings.renew_at, _RENEWAL_JITTER, self.random
        )
        self.renews_at = now + datetime.timedelta(seconds=delay)
        self.last_error = ""
        log.info(
            "certificate obtained from the CA",
            spiffe_id=identity.spiffe_id,
            not_after=identity.not_after.isoformat(),
            renews_at=self.renews_at.isoformat(),
            renewed=current is not None,
        )

    async def refresh_bundle(self) -> None:
        """Fetch the CA's trust bundle and, if it changed, trust it: rebuild the contexts and publish them."""
        bundle = await self.client.fetch_bundle(await self._trusted_context())
        self.bundle_refreshed_at = self.utcnow()
        if bundle == self._bundle_pem:
            return
        if self.current is not None:
            identity = self._install(self._chain_pem, self._key_pem, bundle)
            log.info("trust bundle updated", roots=list(identity.roots))
        else:
            self._trust(bundle)

    async def _trusted_context(self) -> ssl.SSLContext:
        """The context that verifies the CA; at first from the configured bundle file or root fingerprint."""
        if self._ca_context is None:
            if self.settings.bundle is not None:
                try:
                    bundle = self.settings.bundle.read_bytes()
                except OSError as exc:
                    raise IdentityError(
                        f"{self.settings.bundle}: cannot read the CA bundle: {exc.strerror or exc}"
                    ) from None
            else:
                assert self.settings.fingerprint is not None  # the config requires one of them
                bundle = await self.client.bootstrap_bundle(self.settings.fingerprint)
            self._trust(bundle)
        assert self._ca_context is not None
        return self._ca_context

    def _trust(self, bundle_pem: bytes) -> None:
        try:
            parse_bundle(bundle_pem)
            self._ca_context = ca_context(bundle_pem)
        except (CaError, ssl.SSLError) as exc:
            raise IdentityError(f"the CA bundle cannot be used: {exc}") from None
        self._bundle_pem = bundle_pem

    def _install(self, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> Identity:
        """Build and publish the Identity and both CA contexts from a chain, its key and a bundle."""
        try:
            identity, renewal_context, plain_context = self._contexts(chain_pem, key_pem, bundle_pem)
        except OSError as exc:  # the private temporary directory could not be written
            raise IdentityError(f"cannot hand the certificate to OpenSSL: {exc.strerror or exc}") from None
        self._chain_pem, self._key_pem, self._bundle_pem = chain_pem, key_pem, bundle_pem
        self._ca_context, self._renewal_context = plain_context, renewal_context
        self.current = identity
        return identity

    def _contexts(
        self, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes
    ) -> tuple[Identity, ssl.SSLContext, ssl.SSLContext]:
        """The Identity, the CA context presenting its certificate, and the CA context presenting none."""
        with _private_files(cert=chain_pem, key=key_pem, bundle=bundle_pem) as files:
            identity = _build_identity(
                files["cert"],
                files["key"],
                files["bundle"],
                names=("the CA's certificate", "our key", "the CA's bundle"),
            )
            if identity.spiffe_id != self.spiffe_id:
                raise IdentityError(
                    f"the CA issued a certificate for {identity.spiffe_id}, but this sidecar is {self.spiffe_id} "
                    "(check mesh.trust_domain, namespace and datacenter)"
                )
            try:
                renewal_context = ca_context(bundle_pem, cert_file=files["cert"], key_file=files["key"])
                plain_context = ca_context(bundle_pem)
            except ssl.SSLError as exc:
                raise IdentityError(f"the CA's certificate and bundle cannot be used: {exc}") from None
        return identity, renewal_context, plain_context

    def _read_token(self) -> str:
        """The bootstrap token, read at each use (it may be replaced on disk); never logged."""
        path = self.settings.token_file
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise IdentityError(
                f"{path}: cannot read the bootstrap token: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        if not token or not token.isascii() or any(c.isspace() for c in token):
            raise IdentityError(f"{path}: expected one bootstrap token (`mesh ca token` prints it)")
        return token


def _csr(key: ec.EllipticCurvePrivateKey, service: str, identity: str) -> bytes:
    """A CSR for exactly our SPIFFE ID (the CA sets every other extension itself)."""
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


def identity_source(settings: IdentitySettings, *, service: str, mesh: MeshSettings) -> IdentitySource:
    """The identity the config asks for: certificate files, or the mesh CA's signing API."""
    if settings.ca is not None:
        return CaIdentity(settings.ca, service=service, mesh=mesh)
    assert settings.files is not None  # the config requires exactly one source
    return FileIdentity(settings.files)
