"""Per-service bootstrap tokens for the CA's signing API, stored hashed (SHA-256) in the CA directory."""

from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ca.authority import CAError, check_service, format_time, locked, require_ca_directory, utc_now, write_file

__all__ = [
    "DEFAULT_TOKEN_TTL",
    "TOKENS_FILE",
    "TokenError",
    "TokenInfo",
    "create",
    "list",
    "revoke",
    "token_id",
    "verify",
]

DEFAULT_TOKEN_TTL = timedelta(hours=24)
TOKENS_FILE = "tokens.json"
_FORMAT = 1
_ID_LENGTH = 12  # hex digits of the secret's SHA-256: a name for the token that reveals nothing usable


class TokenError(CAError):
    """A token was refused (unknown, expired, revoked) or the token store could not be used."""


@dataclass(frozen=True)
class TokenInfo:
    """What the CA keeps about a token: never the secret, only its SHA-256."""

    id: str
    service: str
    created: datetime
    expires: datetime
    revoked: datetime | None

    def status(self, now: datetime | None = None) -> str:
        """'active', 'expired' or 'revoked' at `now`."""
        if self.revoked is not None:
            return "revoked"
        return "expired" if utc_now(now) >= self.expires else "active"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(token: str) -> str:
    """The public name of a token (the start of its SHA-256), as `list` shows it and `revoke` accepts it."""
    return _digest(token)[:_ID_LENGTH]


def _path(directory: str | os.PathLike[str]) -> Path:
    return require_ca_directory(directory) / TOKENS_FILE


def _load(path: Path) -> builtins.list[dict[str, Any]]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TokenError(f"{path}: cannot read the token store: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise TokenError(f"{path}: damaged token store: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("tokens"), builtins.list):
        raise TokenError(f"{path}: damaged token store: expected {{'format': 1, 'tokens': [...]}}")
    return data["tokens"]


def _save(path: Path, entries: Any) -> None:
    try:
        write_file(path, (json.dumps({"format": _FORMAT, "tokens": entries}, indent=2) + "\n").encode(), private=True)
    except OSError as exc:
        raise TokenError(f"{path}: cannot write the token store: {exc.strerror or exc}") from None


def _info(entry: dict[str, Any], path: Path) -> TokenInfo:
    try:
        revoked = entry.get("revoked")
        return TokenInfo(
            id=entry["id"],
            service=entry["service"],
            created=datetime.fromisoformat(entry["created"]),
            expires=datetime.fromisoformat(entry["expires"]),
            revoked=datetime.fromisoformat(revoked) if revoked else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TokenError(f"{path}: damaged token store: bad entry ({exc})") from None


def create(
    directory: str | os.PathLike[str],
    service: str,
    ttl: timedelta | float = DEFAULT_TOKEN_TTL,
    now: datetime | None = None,
) -> str:
    """Make a bootstrap token for `service`, valid for `ttl`; the secret is returned here once and never stored."""
    check_service(service)
    span = ttl if isinstance(ttl, timedelta) else timedelta(seconds=ttl)
    if span <= timedelta(0):
        raise TokenError(f"the token TTL must be positive (got {span.total_seconds():g}s)")
    now = utc_now(now)
    path = _path(directory)
    with locked(path.parent):
        entries = _load(path)
        taken = {entry.get("id") for entry in entries}
        while True:
            token = secrets.token_urlsafe(32)
            digest = _digest(token)
            if digest[:_ID_LENGTH] not in taken:
                break
        entries.append(
            {
                "id": digest[:_ID_LENGTH],
                "service": service,
                "sha256": digest,
                "created": now.isoformat(),
                "expires": (now + span).isoformat(),
                "revoked": None,
            }
        )
        _save(path, entries)
    return token


def verify(directory: str | os.PathLike[str], token: str, now: datetime | None = None) -> str:
    """The service `token` was made for, if it is known, unexpired and unrevoked; else TokenError saying which."""
    now = utc_now(now)
    path = _path(directory)
    digest = _digest(token)
    found = [entry for entry in _load(path) if hmac.compare_digest(str(entry.get("sha256", "")), digest)]
    if not found:
        raise TokenError("token not recognised by this CA")
    info = _info(found[0], path)
    if info.revoked is not None:
        raise TokenError(f"token {info.id} for service {info.service} was revoked at {format_time(info.revoked)}")
    if now >= info.expires:
        raise TokenError(f"token {info.id} for service {info.service} expired at {format_time(info.expires)}")
    return info.service


def revoke(directory: str | os.PathLike[str], token_or_id: str, now: datetime | None = None) -> TokenInfo:
    """Revoke a token, named by its id (as `list` shows it) or by the secret itself; revoking twice is harmless."""
    now = utc_now(now)
    path = _path(directory)
    digest = _digest(token_or_id)
    with locked(path.parent):
        entries = _load(path)
        for entry in entries:
            if entry.get("id") == token_or_id or hmac.compare_digest(str(entry.get("sha256", "")), digest):
                if not entry.get("revoked"):
                    entry["revoked"] = now.isoformat()
                    _save(path, entries)
                return _info(entry, path)
    looks_like_id = len(token_or_id) == _ID_LENGTH and all(c in "0123456789abcdef" for c in token_or_id)
    shown = f"id {token_or_id}" if looks_like_id else "that id or secret"  # never echo what may be a secret
    raise TokenError(f"no token in {path.parent} matches {shown}")


def list(directory: str | os.PathLike[str]) -> tuple[TokenInfo, ...]:  # shadows the builtin here: `tokens.list`
    """Every token the CA knows, oldest first: ids, services, expiry and revocation, never a secret."""
    path = _path(directory)
    return tuple(_info(entry, path) for entry in _load(path))
