"""No TLS session resumption on the mesh hop: `openssl s_client` resuming sessions against a real sidecar's inbound."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ca.authority import CertificateAuthority

from .clients import backend_stats
from .conftest import Mesh, Process, free_port, sidecar_config

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command-line tool (openssl s_client)")

REQUEST = b"GET /status?code=200 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
REFUSAL = "the peer resumed a TLS session instead of presenting its certificate"
S_CLIENT_TIMEOUT = 30


@dataclass(frozen=True)
class Inbound:
    port: int
    proc: Process
    admin: str
    client: Path  # the caller's cert.pem, key.pem and bundle.pem


def write_identity(directory: Path, issued) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in (("cert", issued.cert_pem), ("key", issued.key_pem), ("bundle", issued.bundle_pem)):
        (directory / f"{name}.pem").write_bytes(data)
    return {"files": {name: str(directory / f"{name}.pem") for name in ("cert", "key", "bundle")}}


@pytest.fixture(scope="module")
def inbound(backend: dict[str, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inbound]:
    """One sidecar whose inbound is `tls: mutual` in front of the test backend, and a caller identity (`web`)."""
    directory = tmp_path_factory.mktemp("resumption")
    authority = CertificateAuthority.init(directory / "ca", "mesh.local")
    write_identity(directory / "web", authority.issue("web"))
    port = free_port()
    config = sidecar_config(
        service={"name": "api", "app": f"127.0.0.1:{backend['http']}"},
        inbound={"bind": f"127.0.0.1:{port}", "tls": "mutual", "allow": ["web"]},
        identity=write_identity(directory / "api", authority.issue("api")),
    )
    mesh = Mesh(directory)
    try:
        proc = mesh.sidecar(config, "inbound")
        admin = json.loads(proc.wait_for('"sidecar ready"'))["listeners"]["admin"]
        yield Inbound(port, proc, admin, directory / "web")
    finally:
        mesh.close()


def s_client_args(inbound: Inbound, version: str, *options: str) -> list[str]:
    """`openssl s_client` to the inbound as the caller `web`."""
    assert OPENSSL is not None
    args = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{inbound.port}", "-servername", "api", f"-{version}"]
    for option, name in (("-cert", "cert"), ("-key", "key"), ("-CAfile", "bundle")):
        args += [option, str(inbound.client / f"{name}.pem")]
    return [*args, *options]


def connections(out: str) -> list[str]:
    """How each connection s_client reported began: "New" (a full handshake) or "Reused" (a resumed session)."""
    return re.findall(r"^(New|Reused), TLSv1\.[23]", out, re.MULTILINE)


def summary(out: str) -> str:
    """The lines of s_client's output that matter here: how each connection began, and any HTTP status line."""
    return "\n".join(re.findall(r"^(?:New|Reused), .*$|^HTTP/1\.1 .*$", out, re.MULTILINE)) or out


def s_client(inbound: Inbound, version: str, *options: str, data: bytes = b"") -> tuple[list[str], str]:
    """Run s_client with `data` on its stdin until it ends: (its connections, New or Reused; its stdout)."""
    args = s_client_args(inbound, version, *options)
    done = subprocess.run(args, input=data, capture_output=True, timeout=S_CLIENT_TIMEOUT, check=False)
    out = done.stdout.decode(errors="replace")
    return connections(out), out


class OpenSClient:
    """An s_client kept connected: its stdout is collected by a thread; `finish` sends the last bytes and waits."""

    def __init__(self, inbound: Inbound, version: str, *options: str) -> None:
        self.args = s_client_args(inbound, version, *options)

    def __enter__(self) -> OpenSClient:
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._changed:
                self.lines.append(raw.decode(errors="replace"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str) -> None:
        with self._changed:
            seen = self._changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.proc.poll() is not None, S_CLIENT_TIMEOUT
            )
            assert seen and any(text in line for line in self.lines), "".join(self.lines)

    def finish(self, data: bytes) -> str:
        """Send `data`, close stdin and wait for s_client to end (the server closes): its whole stdout."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.close()
        self.proc.wait(S_CLIENT_TIMEOUT)
        self._reader.join(S_CLIENT_TIMEOUT)
        return "".join(self.lines)

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(S_CLIENT_TIMEOUT)  # the reader sees EOF once the process is gone
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


def session_refusals(inbound: Inbound) -> tuple[int, float]:
    """(refusals of a resumed session in the inbound's log, mesh_tls_refused_total{reason="session_reused"})."""
    logged = sum(event.get("reason") == REFUSAL for event in inbound.proc.events("mTLS handshake refused"))
    with urllib.request.urlopen(f"http://{inbound.admin}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    counted = re.search(r'^mesh_tls_refused_total\{direction="inbound",reason="session_reused"\} (\S+)$', metrics, re.M)
    return logged, float(counted.group(1)) if counted else 0.0


def expect_refusals(inbound: Inbound, before: tuple[int, float], resumed: int, out: str) -> None:
    """Every connection s_client resumed was refused, logged with its reason and counted."""
    logged, counted = before
    if resumed:
        inbound.proc.wait_for_count(REFUSAL, logged + resumed, timeout=10)
    assert session_refusals(inbound) == (logged + resumed, counted + resumed), summary(out)


@pytest.mark.parametrize("version", ["tls1_2", "tls1_3"])
def test_s_client_reconnect_gets_every_resumed_session_refused(inbound: Inbound, version: str) -> None:
    before = session_refusals(inbound)
    kinds, out = s_client(inbound, version, "-reconnect")
    assert len(kinds) == 6, summary(out)  # the first connection and five reconnections with its session
    assert kinds[0] == "New"
    expect_refusals(inbound, before, kinds.count("Reused"), out)


def test_a_saved_tls_1_2_session_gets_no_request_through(
    inbound: Inbound, backend: dict[str, int], tmp_path: Path
) -> None:
    session = tmp_path / "session.pem"
    kinds, out = s_client(inbound, "tls1_2", "-sess_out", str(session), "-ign_eof", data=REQUEST)
    assert kinds == ["New"] and "HTTP/1.1 200" in out, summary(out)
    served = backend_stats(backend["http"])["requests"]
    before = session_refusals(inbound)
    kinds, out = s_client(inbound, "tls1_2", "-sess_in", str(session), "-ign_eof", data=REQUEST)
    if kinds == ["Reused"]:
        assert "HTTP/1.1" not in out, summary(out)  # refused: no answer, and nothing reached the application
        assert backend_stats(backend["http"])["requests"] == served
    else:
        assert kinds == ["New"] and "HTTP/1.1 200" in out, summary(out)  # the caller presented its certificate again
    expect_refusals(inbound, before, kinds.count("Reused"), out)


def test_a_session_resumed_beside_its_open_connection_is_refused(
    inbound: Inbound, backend: dict[str, int], tmp_path: Path
) -> None:
    # While a connection is open, its TLS 1.2 session stays in the server's session-ID cache (which the stdlib
    # cannot turn off), so a second connection can resume it: this exercises the refusal every time.
    session = tmp_path / "session.pem"
    with OpenSClient(inbound, "tls1_2", "-sess_out", str(session), "-ign_eof") as first:
        first.wait_for("Verify return code")  # printed after the handshake, once the session is saved
        served = backend_stats(backend["http"])["requests"]
        before = session_refusals(inbound)
        kinds, out = s_client(inbound, "tls1_2", "-sess_in", str(session), "-ign_eof", data=REQUEST)
        assert kinds == ["Reused"], summary(out)
        assert "HTTP/1.1" not in out, summary(out)
        expect_refusals(inbound, before, 1, out)
        assert backend_stats(backend["http"])["requests"] == served
        assert "HTTP/1.1 200" in first.finish(REQUEST)  # the first connection, a full handshake, is unharmed


def test_tls_1_3_callers_get_no_session_to_resume(inbound: Inbound, tmp_path: Path) -> None:
    session = tmp_path / "session.pem"
    kinds, out = s_client(inbound, "tls1_3", "-sess_out", str(session), "-ign_eof", data=REQUEST)
    assert kinds == ["New"] and "HTTP/1.1 200" in out, summary(out)
    assert not session.exists()  # no session ticket was sent: s_client had nothing to save
