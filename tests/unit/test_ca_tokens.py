"""Bootstrap tokens: stored hashed and 0600, one service each, expiring and revocable, secrets never listed."""

from __future__ import annotations

import hashlib
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from ca import tokens
from ca.authority import CAError, CertificateAuthority, utc_now


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    CertificateAuthority.init(tmp_path / "ca", "mesh.local")
    return tmp_path / "ca"


def test_a_token_is_returned_once_and_stored_only_as_its_hash(ca_dir: Path) -> None:
    secret = tokens.create(ca_dir, "web", timedelta(hours=1))
    assert len(secret) >= 40  # 32 random bytes, URL-safe base64
    store = ca_dir / tokens.TOKENS_FILE
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    text = store.read_text()
    assert secret not in text
    assert hashlib.sha256(secret.encode()).hexdigest() in text
    assert tokens.verify(ca_dir, secret) == "web"
    assert tokens.create(ca_dir, "web") != secret


def test_each_token_names_its_own_service(ca_dir: Path) -> None:
    web, api = tokens.create(ca_dir, "web"), tokens.create(ca_dir, "api")
    assert (tokens.verify(ca_dir, web), tokens.verify(ca_dir, api)) == ("web", "api")
    with pytest.raises(tokens.TokenError, match=r"^token not recognised by this CA$"):
        tokens.verify(ca_dir, web + "x")
    with pytest.raises(tokens.TokenError, match=r"^token not recognised by this CA$"):
        tokens.verify(ca_dir, "")


def test_tokens_expire(ca_dir: Path) -> None:
    t = utc_now()
    secret = tokens.create(ca_dir, "web", timedelta(minutes=10), now=t)
    assert tokens.verify(ca_dir, secret, now=t + timedelta(minutes=10) - timedelta(seconds=1)) == "web"
    token_id = tokens.token_id(secret)
    with pytest.raises(tokens.TokenError, match=f"^token {token_id} for service web expired at "):
        tokens.verify(ca_dir, secret, now=t + timedelta(minutes=10))
    with pytest.raises(tokens.TokenError, match="the token TTL must be positive"):
        tokens.create(ca_dir, "web", 0)


def test_revoke_by_id_or_by_secret(ca_dir: Path) -> None:
    first, second = tokens.create(ca_dir, "web"), tokens.create(ca_dir, "web")
    info = tokens.revoke(ca_dir, tokens.token_id(first))
    assert info.service == "web" and info.revoked is not None and info.status() == "revoked"
    with pytest.raises(tokens.TokenError, match=f"^token {info.id} for service web was revoked at "):
        tokens.verify(ca_dir, first)
    assert tokens.verify(ca_dir, second) == "web"  # the other token of the same service still works
    revoked = tokens.revoke(ca_dir, second)
    assert revoked.id == tokens.token_id(second)
    again = tokens.revoke(ca_dir, second, now=utc_now() + timedelta(hours=1))
    assert again.revoked == revoked.revoked  # revoking twice keeps the first time

    with pytest.raises(tokens.TokenError, match=r"^no token in .* matches id 0123456789ab$"):
        tokens.revoke(ca_dir, "0123456789ab")
    with pytest.raises(tokens.TokenError) as caught:
        tokens.revoke(ca_dir, "a-secret-that-was-never-issued")
    assert "a-secret" not in str(caught.value)  # never echo what may be a secret


def test_list_shows_ids_services_and_expiry_never_secrets(ca_dir: Path) -> None:
    t = utc_now()
    assert tokens.list(ca_dir) == ()
    web = tokens.create(ca_dir, "web", timedelta(hours=1), now=t)
    api = tokens.create(ca_dir, "api", timedelta(hours=2), now=t)
    tokens.revoke(ca_dir, api)
    listed = tokens.list(ca_dir)
    assert [(i.id, i.service, i.expires) for i in listed] == [
        (tokens.token_id(web), "web", t + timedelta(hours=1)),
        (tokens.token_id(api), "api", t + timedelta(hours=2)),
    ]
    assert [i.status(t) for i in listed] == ["active", "revoked"]
    assert listed[0].status(t + timedelta(hours=1)) == "expired"
    assert web not in repr(listed) and api not in repr(listed)


def test_tokens_need_a_ca_directory_and_a_valid_service(tmp_path: Path, ca_dir: Path) -> None:
    with pytest.raises(CAError, match="does not exist"):
        tokens.create(tmp_path / "nowhere", "web")
    with pytest.raises(CAError, match="invalid service name 'Web'"):
        tokens.create(ca_dir, "Web")
    (ca_dir / tokens.TOKENS_FILE).write_text("[]")
    with pytest.raises(tokens.TokenError, match=r"tokens\.json: damaged token store"):
        tokens.list(ca_dir)
