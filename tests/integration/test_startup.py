"""A sidecar process's start and life: listen failures, readiness in its log, the inbound's default, signals."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from ca.authority import CertificateAuthority

from .conftest import Mesh, free_port, sidecar_config


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca", "mesh.local")


def admin_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def identity_files(directory: Path) -> dict:
    return {"files": {k: str(directory / f"{k}.pem") for k in ("cert", "key", "bundle")}}


def write_identity(directory: Path, issued) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in (("key", issued.key_pem), ("bundle", issued.bundle_pem), ("cert", issued.cert_pem)):
        (directory / f"{name}.pem").write_bytes(data)


def run_to_exit(tmp_path: Path, config: dict) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", "sidecar", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def taken_port(stack: list[socket.socket]) -> int:
    sock = socket.socket()
    stack.append(sock)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock.getsockname()[1]


def test_every_taken_port_is_reported_by_its_setting_and_nothing_starts(tmp_path: Path) -> None:
    held: list[socket.socket] = []
    try:
        inbound, second, admin = taken_port(held), taken_port(held), taken_port(held)
        first = free_port()
        config = sidecar_config(
            service={"name": "web", "app": "127.0.0.1:1"},
            inbound={"bind": f"127.0.0.1:{inbound}", "tls": "off"},
            upstreams=[
                {"service": "api", "bind": f"127.0.0.1:{first}", "tls": "off"},
                {"service": "db", "bind": f"127.0.0.1:{second}", "tls": "off"},
            ],
            discovery={"static": {"api": ["127.0.0.1:1"], "db": ["127.0.0.1:1"]}},
            admin={"bind": f"127.0.0.1:{admin}"},
        )
        result = run_to_exit(tmp_path, config)
    finally:
        for sock in held:
            sock.close()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(r["event"], r["error"]) for r in records if r["level"] == "error"] == [
        ("cannot start", f"inbound.bind: cannot listen on 127.0.0.1:{inbound}: Address already in use"),
        ("cannot start", f"upstreams[1].bind: cannot listen on 127.0.0.1:{second}: Address already in use"),
        ("cannot start", f"admin.bind: cannot listen on 127.0.0.1:{admin}: Address already in use"),
    ]
    assert not [r for r in records if r["event"] in ("listening", "sidecar ready")]  # nothing was served


def test_a_sidecar_with_only_an_admin_listener_keeps_running(mesh: Mesh) -> None:
    admin = free_port()
    proc = mesh.sidecar(sidecar_config(admin={"bind": f"127.0.0.1:{admin}"}), "admin-only")
    assert admin_get(admin, "/ready") == (200, b"ready\n")
    proc.proc.send_signal(signal.SIGTERM)
    proc.wait_for('"shutting down"')
    assert proc.proc.wait(30) == 0


def test_sighup_reloads_the_file_and_the_sidecar_keeps_serving(mesh: Mesh) -> None:
    """SIGHUP's default action would end the process without a drain: the sidecar reloads its file instead."""
    admin, inbound = free_port(), free_port()
    config = sidecar_config(
        inbound={"bind": f"127.0.0.1:{inbound}", "tls": "off"}, admin={"bind": f"127.0.0.1:{admin}"}
    )
    proc = mesh.sidecar(config)
    proc.proc.send_signal(signal.SIGHUP)
    line = json.loads(proc.wait_for('"config reload: the file is unchanged'))
    assert line["version"] == 1
    assert admin_get(admin, "/ready") == (200, b"ready\n")
    proc.proc.send_signal(signal.SIGTERM)
    proc.wait_for('"drained"')
    assert proc.proc.wait(30) == 0


def test_the_log_says_what_ready_says(mesh: Mesh, tmp_path: Path, authority: CertificateAuthority) -> None:
    admin = free_port()
    certs = tmp_path / "certs"  # written only once the sidecar runs
    config = sidecar_config(
        service={"name": "api", "app": "127.0.0.1:1"},
        inbound={"bind": f"127.0.0.1:{free_port()}", "allow": ["web"]},
        identity=identity_files(certs),
        admin={"bind": f"127.0.0.1:{admin}"},
    )
    proc = mesh.sidecar(config)
    started = json.loads(proc.wait_for('"event": "sidecar '))
    assert started["event"] == "sidecar started, not ready"
    assert started["level"] == "warning"
    assert started["reason"] == "no usable certificate"
    assert admin_get(admin, "/ready") == (503, b"no usable certificate\n")

    write_identity(certs, authority.issue("api"))
    ready = json.loads(proc.wait_for('"sidecar ready"'))
    assert ready["level"] == "info" and "admin" in ready["listeners"]
    assert admin_get(admin, "/ready") == (200, b"ready\n")


def test_an_inbound_without_allow_is_named_in_a_warning_at_start(mesh: Mesh, tmp_path: Path, authority) -> None:
    write_identity(tmp_path / "api", authority.issue("api"))
    config = sidecar_config(
        service={"name": "api", "app": "127.0.0.1:1"},
        inbound={"bind": f"127.0.0.1:{free_port()}"},
        identity=identity_files(tmp_path / "api"),
    )
    proc = mesh.sidecar(config)
    [warning] = [r for r in proc.events("inbound.allow is empty") if r["level"] == "warning"]
    assert warning["listener"] == "inbound"
    assert warning["setting"] == "inbound.allow"
    assert "every identity of trust domain 'mesh.local'" in warning["admits"]
    assert "inbound.allow" in warning["restrict"] and "mesh.default_policy: deny" in warning["restrict"]


def test_default_policy_deny_refuses_a_caller_no_allow_entry_names(
    mesh: Mesh, tmp_path: Path, authority: CertificateAuthority
) -> None:
    in_port = free_port()
    write_identity(tmp_path / "api", authority.issue("api"))
    write_identity(tmp_path / "web", authority.issue("web"))
    config = sidecar_config(
        mesh={"default_policy": "deny"},
        service={"name": "api", "app": "127.0.0.1:1"},
        inbound={"bind": f"127.0.0.1:{in_port}"},
        identity=identity_files(tmp_path / "api"),
    )
    proc = mesh.sidecar(config)
    [warning] = proc.events("inbound.allow is empty")
    assert warning["admits"] == "no caller: inbound.allow is empty and mesh.default_policy is deny"

    ctx = ssl.create_default_context(cafile=str(tmp_path / "web" / "bundle.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(tmp_path / "web" / "cert.pem"), str(tmp_path / "web" / "key.pem"))
    answer = b""
    with socket.create_connection(("127.0.0.1", in_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="api") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            while chunk := tls.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 403")
    assert b"x-mesh-error: caller spiffe://mesh.local/ns/default/dc/dc1/svc/web denied: " in answer
    assert b"denied: refused by default_policy: deny\r\n" in answer
