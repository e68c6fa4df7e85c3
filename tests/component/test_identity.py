"""CaIdentity over loopback TLS: timing, outages, bundles and refusals with a fake CA; then the real `mesh ca serve`."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import random
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from ca import tokens
from ca.authority import CAError, CertificateAuthority, fingerprint
from ca.server import serve_ca
from mesh import http1, spiffe, tls
from mesh.ca_client import CaError, root_fingerprint
from mesh.config import IdentityFromCA, MeshSettings, SidecarConfig, parse_duration
from mesh.identity import CaIdentity, backoff_delay, renewal_delay
from mesh.listener import Drain
from mesh.tls import TlsHandshakeError, TlsStream
from sidecar.app import Sidecar
from tests.ports import free_port

TD = "mesh.local"
WEB = f"spiffe://{TD}/ns/default/dc/dc1/svc/web"
UTC = dt.UTC
T0 = dt.datetime(2030, 1, 1, tzinfo=UTC)


# --- the pure scheduling functions ------------------------------------------------------------------------------


def test_renewal_delay_is_70_percent_of_the_lifetime_give_or_take_10() -> None:
    not_before, not_after = T0, T0 + dt.timedelta(hours=24)
    assert renewal_delay(not_before, not_after, T0, 0.7, 0.1, lambda: 0.5) == pytest.approx(0.7 * 86400)
    assert renewal_delay(not_before, not_after, T0, 0.7, 0.1, lambda: 0.0) == pytest.approx(0.6 * 86400)
    assert renewal_delay(not_before, not_after, T0, 0.7, 0.1, lambda: 0.999999) == pytest.approx(0.8 * 86400)
    delays = [renewal_delay(not_before, not_after, T0, 0.7, 0.1, random.Random(seed).random) for seed in range(200)]
    assert 0.6 * 86400 <= min(delays) < 0.62 * 86400 and 0.78 * 86400 < max(delays) <= 0.8 * 86400


def test_renewal_delay_counts_from_now_and_never_goes_negative() -> None:
    not_before, not_after = T0, T0 + dt.timedelta(hours=10)
    later = T0 + dt.timedelta(hours=2)
    assert renewal_delay(not_before, not_after, later, 0.5, 0.0, lambda: 0.3) == pytest.approx(3 * 3600)
    assert renewal_delay(not_before, not_after, T0 + dt.timedelta(hours=9), 0.7, 0.1, lambda: 0.5) == 0.0


def test_renewal_jitter_is_kept_between_half_renew_at_and_halfway_to_expiry() -> None:
    not_before, not_after = T0, T0 + dt.timedelta(hours=10)
    assert renewal_delay(not_before, not_after, T0, 0.95, 0.1, lambda: 0.999) == pytest.approx(0.975 * 36000)
    assert renewal_delay(not_before, not_after, T0, 0.1, 0.1, lambda: 0.0) == pytest.approx(0.05 * 36000)


def test_backoff_doubles_from_1s_to_60s_with_jitter() -> None:
    assert [backoff_delay(n, random=lambda: 0.5) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff_delay(1, random=lambda: 0.0) == 1.0  # never below the base
    assert backoff_delay(3, random=lambda: 0.0) == pytest.approx(3.2)
    assert backoff_delay(3, random=lambda: 0.999999) == pytest.approx(4.8)
    assert backoff_delay(20, random=lambda: 0.999999) == 60.0  # never above the cap


# --- a fake signing API following the `mesh ca serve` contract --------------------------------------------------


@dataclass
class Seen:
    """One request the fake CA answered."""

    at: float  # trio time
    method: str
    path: str
    auth: str | None  # "token", "certificate" or None
    status: int = 0


class FakeCa:
    """The signing API's contract over mesh.tls and mesh.http1, backed by a real ca.authority CA.

    Its TLS certificate is issued at the real time (OpenSSL checks it against the wall clock); certificates for
    CSRs are signed at the injected `utcnow`, as is everything else time-dependent."""

    def __init__(self, directory: Path, utcnow: Callable[[], dt.datetime], *, server_service: str = "mesh-ca") -> None:
        self.directory = directory / "ca"
        self.utcnow = utcnow
        self.ca = CertificateAuthority.init(self.directory, TD, now=utcnow() - dt.timedelta(hours=1))
        self.token = tokens.create(self.directory, "web", ttl=dt.timedelta(days=3), now=utcnow())
        server = self.ca.issue(server_service, ttl=dt.timedelta(hours=72))
        (directory / "server-cert.pem").write_bytes(server.cert_pem)
        (directory / "server-key.pem").write_bytes(server.key_pem or b"")
        (directory / "server-bundle.pem").write_bytes(server.bundle_pem)
        self.context = tls.server_context(
            str(directory / "server-cert.pem"), str(directory / "server-key.pem"), str(directory / "server-bundle.pem")
        )
        self.context.verify_mode = ssl.CERT_OPTIONAL  # a client certificate authenticates renewals; tokens need none
        self.seen: list[Seen] = []
        self.failed_handshakes: list[str] = []
        self.outage = False  # answer 503 to certificate requests
        self.refuse_certificates = False  # answer 401 to renewals authenticated by a client certificate
        self.port = 0

    async def serve(self, port: int = 0, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self.handle, listeners, task_status=task_status)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def handle(self, tcp: trio.SocketStream) -> None:
        sock = socket.socket(fileno=tcp.socket.detach())
        try:
            stream = await tls.tls_accept(sock, self.context)
        except TlsHandshakeError as exc:
            self.failed_handshakes.append(exc.reason)
            return
        try:
            request = await read_request(stream)
            if request is not None:
                await stream.send_all(self.answer(*request, stream.peer_identity))
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    def answer(self, head: http1.RequestHead, body: bytes, peer: str | None) -> bytes:
        headers = dict(head.headers)
        authorization = headers.get(b"authorization", b"").decode()
        seen = Seen(
            trio.current_time(),
            head.method.decode(),
            head.target.decode(),
            "token" if authorization else "certificate" if peer else None,
        )
        self.seen.append(seen)
        now = self.utcnow()
        if (head.method, head.target) == (b"GET", b"/v1/bundle"):
            seen.status = 200
            return http1.simple_response(200, self.ca.bundle_pem(now), [(b"content-type", b"application/x-pem-file")])
        if (head.method, head.target) != (b"POST", b"/v1/certificate"):
            return self.error(seen, 404, "no such endpoint")
        if self.outage:
            return self.error(seen, 503, "the CA is unavailable")
        if authorization:
            try:
                service = tokens.verify(self.directory, authorization.removeprefix("Bearer "), now=now)
            except CAError as exc:
                return self.error(seen, 401, str(exc))
        elif peer is not None and not self.refuse_certificates:
            service = spiffe.parse(peer).service
        else:
            return self.error(seen, 401, "authenticate with a bootstrap token or a valid mesh certificate")
        try:
            request = json.loads(body)
            issued = self.ca.sign_csr(
                request["csr"].encode(), service=service, ttl=parse_duration(request["ttl"]), now=now
            )
        except CAError as exc:
            return self.error(seen, 400, str(exc))
        seen.status = 200
        answer = {
            "certificate": issued.cert_pem.decode(),
            "bundle": issued.bundle_pem.decode(),
            "spiffe_id": issued.spiffe_id,
            "not_after": issued.certificate.not_valid_after_utc.isoformat(),
        }
        return http1.simple_response(200, json.dumps(answer).encode(), [(b"content-type", b"application/json")])

    @staticmethod
    def error(seen: Seen, status: int, message: str) -> bytes:
        seen.status = status
        body = json.dumps({"error": message}).encode()
        return http1.simple_response(status, body, [(b"content-type", b"application/json")], close=True)

    def posts(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST"]


async def read_request(stream: TlsStream) -> tuple[http1.RequestHead, bytes] | None:
    reader = http1.RequestReader()
    head, body = None, b""
    while True:
        event = reader.next_event()
        if event is None:
            data = await stream.receive_some()
            if not data:
                return None
            reader.feed(data)
        elif isinstance(event, http1.RequestHead):
            head = event
        elif isinstance(event, bytes):
            body += event
        elif event is http1.END and head is not None:
            return head, body


def virtual_utcnow(origin: dt.datetime) -> Callable[[], dt.datetime]:
    """A UTC clock that reads `origin` now and advances with trio's (autojump) clock."""
    start = trio.current_time()
    return lambda: origin + dt.timedelta(seconds=trio.current_time() - start)


def settings_for(fake: FakeCa, tmp_path: Path, **overrides: object) -> IdentityFromCA:
    (tmp_path / "web.token").write_text(fake.token + "\n")
    (tmp_path / "ca-bundle.pem").write_bytes(fake.ca.bundle_pem(fake.utcnow()))
    values = {"url": fake.url, "token_file": "web.token", "bundle": "ca-bundle.pem", **overrides}
    return IdentityFromCA.model_validate(values, context={"base_dir": tmp_path})


def identity_for(settings: IdentityFromCA, utcnow: Callable[[], dt.datetime], seed: int = 7) -> CaIdentity:
    return CaIdentity(settings, service="web", mesh=MeshSettings(), utcnow=utcnow, random=random.Random(seed).random)


def seconds(delta: dt.timedelta) -> float:
    return delta.total_seconds()


async def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[TlsStream | Exception, TlsStream]:
    """Both ends of a handshake over a socket pair; the server's end may be the error it raised."""
    a, b = socket.socketpair()
    accepted: list[TlsStream | Exception] = []

    async def accept() -> None:
        try:
            accepted.append(await tls.tls_accept(a, server))
        except TlsHandshakeError as exc:
            accepted.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        connected = await tls.tls_connect(b, client, server_hostname="web")
    return accepted[0], connected


def peer_leaf(fake: FakeCa, directory: Path, service: str = "api") -> ssl.SSLContext:
    """A client context for another sidecar, issued at the real time so that OpenSSL accepts it now."""
    issued = fake.ca.issue(service, ttl=dt.timedelta(hours=2))
    for name, data in (("cert", issued.cert_pem), ("key", issued.key_pem or b""), ("bundle", issued.bundle_pem)):
        (directory / f"{service}-{name}.pem").write_bytes(data)
    return tls.client_context(*(str(directory / f"{service}-{name}.pem") for name in ("cert", "key", "bundle")))


# --- obtaining and renewing -------------------------------------------------------------------------------------


async def test_obtains_a_certificate_with_the_token_at_start(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    utcnow = virtual_utcnow(dt.datetime.now(UTC))
    fake = FakeCa(tmp_path, utcnow)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        identity = identity_for(settings_for(fake, tmp_path, ttl="12h"), utcnow)
        assert identity.ready() == (False, "no certificate from the CA yet")
        await nursery.start(identity.run)
        current = identity.current
        assert current is not None
        assert identity.ready() == (True, "ready")
        assert current.spiffe_id == WEB
        assert seconds(current.not_after - current.not_before) == 12 * 3600 + 60  # the CA backdates by a minute
        assert [(s.method, s.path, s.auth, s.status) for s in fake.seen] == [("POST", "/v1/certificate", "token", 200)]
        status = identity.status()
        assert status["loaded"] and status["source"] == "ca" and status["ca"] == fake.url
        assert status["fingerprint_sha256"] == current.fingerprint and len(status["bundle_roots"]) == 1
        assert 0.6 * 12 * 3600 < seconds(dt.datetime.fromisoformat(status["renews_at"]) - current.not_before)
        assert 11.9 * 3600 < (identity.seconds_until_expiry() or 0) <= 12 * 3600
        assert list(private_tmp.iterdir()) == []  # the key was on disk only while OpenSSL read it
        assert fake.token not in repr(identity) and fake.token not in json.dumps(status)
        nursery.cancel_scope.cancel()


async def test_renews_at_about_70_percent_without_dropping_an_established_connection(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # The timeline starts 50 minutes in the past, so that with a 1 h TTL the renewal (60-80 % of 61 min after the
    # backdated start) falls before the real now: both certificates are valid for OpenSSL during the test.
    utcnow = virtual_utcnow(dt.datetime.now(UTC) - dt.timedelta(minutes=50))
    fake = FakeCa(tmp_path, utcnow)
    api = peer_leaf(fake, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        identity = identity_for(settings_for(fake, tmp_path, ttl="1h"), utcnow)
        await nursery.start(identity.run)
        first = identity.current
        assert first is not None
        lifetime = seconds(first.not_after - first.not_before)
        not_before_at = trio.current_time() + seconds(first.not_before - utcnow())  # in trio's time

        server, client = await handshake(first.server_context, api)  # a long-lived connection on the first cert
        assert isinstance(server, TlsStream)
        await client.send_all(b"before")
        assert await server.receive_some() == b"before"

        while identity.current is first:
            await trio.sleep(1)
        renewal = fake.posts()[1].at
        assert not_before_at + 0.6 * lifetime <= renewal <= not_before_at + 0.8 * lifetime
        second = identity.current
        assert second is not None and second.fingerprint != first.fingerprint and second.spiffe_id == WEB
        assert second.not_after > first.not_after
        assert [(s.auth, s.status) for s in fake.posts()] == [("token", 200), ("certificate", 200)]
        assert identity.ready() == (True, "ready")

        # The established connection still works both ways after the renewal.
        await server.send_all(b"after")
        assert await client.receive_some() == b"after"
        await client.send_all(b"again")
        assert await server.receive_some() == b"again"
        # A new connection gets the new certificate.
        new_server, new_client = await handshake(second.server_context, api)
        assert isinstance(new_server, TlsStream)
        presented = new_client.socket.getpeercert(binary_form=True) or b""
        assert hashlib.sha256(presented).hexdigest() == second.fingerprint
        for stream in (server, client, new_server, new_client):
            await stream.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("refusal", ["http", "tls"])
async def test_renewal_falls_back_to_the_token_when_the_ca_refuses_the_certificate(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, refusal: str
) -> None:
    utcnow = virtual_utcnow(dt.datetime.now(UTC) - dt.timedelta(minutes=50))
    fake = FakeCa(tmp_path, utcnow)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        identity = identity_for(settings_for(fake, tmp_path, ttl="1h"), utcnow)
        await nursery.start(identity.run)
        first = identity.current
        if refusal == "http":
            fake.refuse_certificates = True  # 401 to a request authenticated by the certificate
        else:  # the handshake fails as soon as the certificate is presented: the CA trusts other roots now
            other = CertificateAuthority.init(tmp_path / "other", TD)
            fake.context = tls.server_context(
                str(tmp_path / "server-cert.pem"),
                str(tmp_path / "server-key.pem"),
                str(other.directory / "roots/1/cert.pem"),
            )
            fake.context.verify_mode = ssl.CERT_OPTIONAL
        while identity.current is first:
            await trio.sleep(1)
        expected = [("token", 200), ("certificate", 401), ("token", 200)] if refusal == "http" else [("token", 200)] * 2
        assert [(s.auth, s.status) for s in fake.posts()] == expected
        if refusal == "tls":
            assert len(fake.failed_handshakes) == 1 and fake.failed_handshakes[0].startswith(
                "certificate verify failed"
            )
        assert identity.ready() == (True, "ready")
        nursery.cancel_scope.cancel()


async def test_ca_outage_during_renewal_backs_off_stays_ready_until_expiry_and_recovers(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    utcnow = virtual_utcnow(dt.datetime.now(UTC) - dt.timedelta(minutes=50))
    fake = FakeCa(tmp_path, utcnow)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        identity = identity_for(settings_for(fake, tmp_path, ttl="1h"), utcnow)
        await nursery.start(identity.run)
        first = identity.current
        assert first is not None
        fake.outage = True

        await trio.sleep(seconds(first.not_after - utcnow()) - 2)
        assert identity.ready() == (True, "ready") and identity.current is first
        failed = fake.posts()[1:]
        assert len(failed) > 10 and all((s.auth, s.status) == ("certificate", 503) for s in failed)
        gaps = [b.at - a.at for a, b in itertools.pairwise(failed)]
        for n, gap in enumerate(gaps, start=1):
            nominal = min(60, 2 ** (n - 1))
            assert max(1, 0.8 * nominal) <= gap <= min(60, 1.2 * nominal), (n, gaps)
        assert identity.status()["last_error"] == "the CA refused the certificate request (503): the CA is unavailable"

        await trio.sleep(3)
        ready, reason = identity.ready()
        assert not ready and reason.startswith("certificate not valid now")
        assert (identity.seconds_until_expiry() or 0) < 0

        fake.outage = False
        await trio.sleep(61)
        assert identity.ready() == (True, "ready")
        assert identity.current is not first
        assert (fake.posts()[-1].auth, fake.posts()[-1].status) == ("token", 200)  # the expired cert is not presented
        assert identity.status()["last_error"] is None
        nursery.cancel_scope.cancel()


async def test_ca_unreachable_at_start_is_retried_until_it_answers(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    utcnow = virtual_utcnow(dt.datetime.now(UTC))
    fake = FakeCa(tmp_path, utcnow)
    fake.port = free_port()  # nothing listens there yet
    async with trio.open_nursery() as nursery:
        identity = identity_for(settings_for(fake, tmp_path), utcnow)
        await nursery.start(identity.run)
        await trio.sleep(20)
        ready, reason = identity.ready()
        assert not ready and identity.current is None
        assert reason.startswith(f"no certificate from the CA yet: cannot connect to the CA at 127.0.0.1:{fake.port}")
        assert identity.status() == {
            "loaded": False,
            "spiffe_id": WEB,
            "source": "ca",
            "ca": fake.url,
            "last_error": reason.removeprefix("no certificate from the CA yet: "),
            "bundle_refreshed_at": None,
        }
        came_up = trio.current_time()
        await nursery.start(partial(fake.serve, fake.port))
        while identity.current is None:
            await trio.sleep(0.5)
        assert trio.current_time() - came_up <= 32 * 1.2  # the next attempt of the backoff, not a fixed long wait
        assert identity.ready() == (True, "ready")
        nursery.cancel_scope.cancel()


# --- the trust bundle -------------------------------------------------------------------------------------------


async def test_bundle_refresh_picks_up_a_new_root(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    utcnow = virtual_utcnow(dt.datetime.now(UTC) - dt.timedelta(hours=1))
    fake = FakeCa(tmp_path, utcnow)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        identity = identity_for(settings_for(fake, tmp_path), utcnow)
        await nursery.start(identity.run)
        first = identity.current
        assert first is not None and len(first.roots) == 1

        await trio.sleep(60)
        new_root = fake.ca.rotate(now=utcnow())
        await trio.sleep(240 + 1)  # the 5-minute refresh after start
        refreshed = identity.current
        assert refreshed is not None and refreshed is not first
        assert refreshed.fingerprint == first.fingerprint  # the same certificate, trusting one more root
        assert len(refreshed.roots) == 2 and root_fingerprint(new_root.certificate) in refreshed.roots[1]
        assert [(s.method, s.path, s.auth) for s in fake.seen[1:]] == [
            ("GET", "/v1/bundle", None)
        ]  # no credentials needed
        refreshed_at = dt.datetime.fromisoformat(identity.status()["bundle_refreshed_at"])
        assert seconds(utcnow() - refreshed_at) == pytest.approx(1)

        # A peer whose leaf comes from the new root is accepted by new connections only.
        fake.ca.activate(now=utcnow())
        api = peer_leaf(fake, tmp_path)
        old_server, old_client = await handshake(first.server_context, api)
        assert isinstance(old_server, TlsHandshakeError) and old_server.reason.startswith("certificate verify failed")
        new_server, new_client = await handshake(refreshed.server_context, api)
        assert (
            isinstance(new_server, TlsStream) and new_server.peer_identity == f"spiffe://{TD}/ns/default/dc/dc1/svc/api"
        )
        for stream in (old_client, new_server, new_client):
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_trust_is_bootstrapped_from_a_root_fingerprint(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    utcnow = virtual_utcnow(dt.datetime.now(UTC))
    fake = FakeCa(tmp_path, utcnow)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        # as `mesh ca inspect` and `openssl x509 -fingerprint -sha256` print it
        settings = settings_for(fake, tmp_path, bundle=None, fingerprint=fingerprint(fake.ca.root(1).certificate))
        identity = identity_for(settings, utcnow)
        await nursery.start(identity.run)
        assert identity.ready() == (True, "ready")
        # the bundle read unverified, again over a connection verified against the pinned root, then the CSR
        assert [(s.method, s.auth) for s in fake.seen] == [("GET", None), ("GET", None), ("POST", "token")]
        nursery.cancel_scope.cancel()


# --- refusing a server that is not the CA -----------------------------------------------------------------------


async def refused(fake: FakeCa, tmp_path: Path, **overrides: object) -> str:
    """Run an identity for a while against `fake`; it must never get a certificate nor send its token."""
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        identity = identity_for(settings_for(fake, tmp_path, **overrides), fake.utcnow)
        await nursery.start(identity.run)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert identity.current is None and not identity.ready()[0]
    assert all(s.auth != "token" and s.method == "GET" for s in fake.seen)
    return identity.status()["last_error"]


async def test_a_wrong_fingerprint_is_refused_before_any_token_is_sent(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    utcnow = virtual_utcnow(dt.datetime.now(UTC))
    fake = FakeCa(tmp_path, utcnow)
    error = await refused(fake, tmp_path, bundle=None, fingerprint="ab" * 32)
    assert error.startswith(f"no root in the bundle served by https://127.0.0.1:{fake.port} has the SHA-256")
    assert fake.seen  # it did read the (public) bundle


@pytest.mark.parametrize("trust", ["bundle", "fingerprint"])
async def test_a_server_with_another_spiffe_id_is_refused(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, trust: str
) -> None:
    utcnow = virtual_utcnow(dt.datetime.now(UTC))
    fake = FakeCa(tmp_path, utcnow, server_service="api")  # a real mesh certificate, but not the CA's identity
    overrides = (
        {} if trust == "bundle" else {"bundle": None, "fingerprint": root_fingerprint(fake.ca.root(1).certificate)}
    )
    error = await refused(fake, tmp_path, **overrides)
    assert error == (
        f"the server at 127.0.0.1:{fake.port} is spiffe://{TD}/ns/default/dc/dc1/svc/api, not the CA "
        f"(spiffe://{TD}/ns/default/dc/dc1/svc/mesh-ca); refusing to talk to it (no token was sent)"
    )
    if trust == "bundle":
        assert fake.seen == []  # nothing at all was sent


async def test_a_server_from_another_ca_is_refused(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    utcnow = virtual_utcnow(dt.datetime.now(UTC))
    fake = FakeCa(tmp_path, utcnow)
    other = CertificateAuthority.init(tmp_path / "other", TD)
    (tmp_path / "other-bundle.pem").write_bytes(other.bundle_pem())
    error = await refused(fake, tmp_path, bundle="other-bundle.pem")
    assert error.startswith("the CA's TLS certificate was refused: certificate verify failed: ")
    assert error.endswith("(no token was sent)")
    assert fake.seen == []


# --- against the real `mesh ca serve` (real clocks) -------------------------------------------------------------


async def run_real_ca(directory: Path, body: Callable[[str], Awaitable[None]]) -> None:
    """Serve the CA in `directory` with ca.server.serve_ca while `body(url)` runs, then drain it."""
    drain = Drain()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(partial(serve_ca, directory, "127.0.0.1:0", drain=drain))
        with trio.fail_after(10):
            await body(f"https://127.0.0.1:{address.port}")
        drain.start()


@pytest.mark.parametrize("trust", ["bundle", "fingerprint"])
async def test_with_the_real_ca_server_obtain_renew_and_refresh(tmp_path: Path, trust: str) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TD)
    (tmp_path / "web.token").write_text(tokens.create(ca.directory, "web") + "\n")
    (tmp_path / "ca-bundle.pem").write_bytes(ca.bundle_pem())
    anchor = {"bundle": "ca-bundle.pem"} if trust == "bundle" else {"fingerprint": fingerprint(ca.root(1).certificate)}

    async def body(url: str) -> None:
        values = {"url": url, "token_file": "web.token", "ttl": "2h", **anchor}
        identity = CaIdentity(
            IdentityFromCA.model_validate(values, context={"base_dir": tmp_path}), service="web", mesh=MeshSettings()
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(identity.run)
            first = identity.current
            assert first is not None and identity.ready() == (True, "ready") and first.spiffe_id == WEB
            assert 1.9 * 3600 < (identity.seconds_until_expiry() or 0) <= 2 * 3600

            (tmp_path / "web.token").unlink()  # renewal needs no token: the current certificate proves who we are
            await identity.obtain()
            assert identity.current is not first and identity.current.fingerprint != first.fingerprint

            new_root = CertificateAuthority.load(ca.directory).rotate()
            await identity.refresh_bundle()
            assert len(identity.current.roots) == 2
            assert root_fingerprint(new_root.certificate) in identity.current.roots[1]
            nursery.cancel_scope.cancel()

    await run_real_ca(ca.directory, body)


async def test_with_the_real_ca_server_a_wrong_fingerprint_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TD)
    (tmp_path / "web.token").write_text(tokens.create(ca.directory, "web"))

    async def body(url: str) -> None:
        values = {"url": url, "token_file": "web.token", "fingerprint": "ab" * 32}
        identity = CaIdentity(
            IdentityFromCA.model_validate(values, context={"base_dir": tmp_path}), service="web", mesh=MeshSettings()
        )
        with pytest.raises(CaError, match=r"has the SHA-256 fingerprint (ab)+; refusing to trust that server"):
            await identity.obtain()
        assert identity.current is None

    await run_real_ca(ca.directory, body)


# --- the sidecar chooses it -------------------------------------------------------------------------------------


def test_the_sidecar_uses_the_ca_when_identity_ca_is_configured(tmp_path: Path) -> None:
    config = SidecarConfig.model_validate(
        {
            "service": {"name": "web", "app": "127.0.0.1:8080"},
            "inbound": {"bind": "127.0.0.1:0"},
            "identity": {"ca": {"url": "https://127.0.0.1:8400", "token_file": "web.token", "bundle": "b.pem"}},
            "admin": {"bind": "127.0.0.1:0"},
        },
        context={"base_dir": tmp_path},
    )
    sidecar = Sidecar(config)
    assert isinstance(sidecar.identity, CaIdentity)
    assert sidecar.identity.spiffe_id == WEB and sidecar.identity.current is None
    assert sidecar.certs()["source"] == "ca"
