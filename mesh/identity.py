"""This sidecar's identity: certificate, key and trust bundle from files, reloaded when they change."""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh import tls
from mesh.config import IdentityFiles

log = structlog.get_logger("mesh.identity")

UTC = datetime.UTC


class IdentityError(Exception):
    """The identity files cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class Identity:
    """One loaded certificate with the TLS contexts built from it; new connections use the latest one."""

    spiffe_id: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    fingerprint: str
    roots: tuple[str, ...]  # "subject (sha256 fingerprint)" of each bundle root
    server_context: ssl.SSLContext
    client_context: ssl.SSLContext

    def valid_at(self, now: datetime.datetime) -> bool:
        return self.not_before <= now < self.not_after


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
    try:
        chain = x509.load_pem_x509_certificates(files.cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{files.cert}: cannot read a PEM certificate: {exc}") from None
    try:
        roots = x509.load_pem_x509_certificates(files.bundle.read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"{files.bundle}: cannot read PEM root certificates: {exc}") from None
    leaf = chain[0]
    ids = _spiffe_ids(leaf)
    if len(ids) != 1:
        raise IdentityError(f"{files.cert}: expected exactly one spiffe:// URI SAN, found {len(ids)}")
    try:
        server_context = tls.server_context(files.cert, files.key, files.bundle)
        client_context = tls.client_context(files.cert, files.key, files.bundle)
    except (OSError, ssl.SSLError) as exc:
        raise IdentityError(f"{files.cert}, {files.key}: cannot be used together: {exc}") from None
    return Identity(
        spiffe_id=ids[0],
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        fingerprint=_fingerprint(leaf),
        roots=tuple(f"{root.subject.rfc4514_string()} ({_fingerprint(root)})" for root in roots),
        server_context=server_context,
        client_context=client_context,
    )


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
        current = self.current
        if current is None:
            return False, "no usable certificate"
        now = self.utcnow()
        if not current.valid_at(now):
            return False, f"certificate not valid now (valid {current.not_before} to {current.not_after})"
        return True, "ready"

    def seconds_until_expiry(self) -> float | None:
        if self.current is None:
            return None
        return (self.current.not_after - self.utcnow()).total_seconds()

    def status(self) -> dict[str, Any]:
        current = self.current
        if current is None:
            return {"loaded": False, "files": {k: str(v) for k, v in self.files.model_dump().items()}}
        return {
            "loaded": True,
            "spiffe_id": current.spiffe_id,
            "not_before": current.not_before.isoformat(),
            "not_after": current.not_after.isoformat(),
            "seconds_until_expiry": round(self.seconds_until_expiry() or 0.0, 1),
            "fingerprint_sha256": current.fingerprint,
            "bundle_roots": list(current.roots),
            "source": "files",
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load now, then poll the files for changes; runs until cancelled."""
        self.reload_if_changed()
        task_status.started()
        while True:
            await trio.sleep(self.poll_interval)
            self.reload_if_changed()
