"""The admin listener of a running sidecar, file discovery re-read without a restart, and the header timeout."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

from .clients import raw_exchange, request, status_of
from .conftest import free_port, sidecar_config


def admin_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_admin_endpoints(mesh, backend) -> None:
    admin = free_port()
    out = free_port()
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{out}", "tls": "off"}],
        discovery={"static": {"api": [f"127.0.0.1:{backend['http']}"]}},
        admin={"bind": f"127.0.0.1:{admin}"},
    )
    mesh.sidecar(config, "outbound")
    assert request(out, "GET", "/status?code=200").status == 200
    assert admin_get(admin, "/live") == (200, b"live\n")
    assert admin_get(admin, "/ready") == (200, b"ready\n")
    status, metrics = admin_get(admin, "/metrics")
    assert status == 200
    assert b'mesh_requests_total{code_class="2xx",direction="outbound",upstream="api"} 1.0' in metrics
    assert b"mesh_request_duration_seconds_bucket" in metrics
    status, body = admin_get(admin, "/config")
    running = json.loads(body)
    assert running["upstreams"][0]["service"] == "api" and running["upstreams"][0]["timeouts"]["connect"] == "1s"
    status, body = admin_get(admin, "/clusters")
    assert json.loads(body)["api"]["endpoints"][0]["address"] == f"127.0.0.1:{backend['http']}"
    assert admin_get(admin, "/nope")[0] == 404


def test_file_registry_change_applies_without_restart(mesh, backend, tmp_path) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text(f"services: {{api: [127.0.0.1:{free_port()}]}}\n")  # nothing listens there
    out = free_port()
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{out}", "tls": "off"}],
        discovery={"file": str(registry)},
    )
    proc = mesh.sidecar(config, "outbound")
    assert request(out, "GET", "/status?code=200").status == 502
    registry.write_text(f"services: {{api: [{{address: 127.0.0.1:{backend['http']}, weight: 2}}]}}\n")
    proc.wait_for('"registry reloaded"')  # the file is polled once a second
    assert request(out, "GET", "/status?code=200").status == 200


def test_slow_request_head_gets_408_within_the_header_timeout(mesh, backend) -> None:
    port, _, _ = mesh.pair(backend["http"], outbound={"timeouts": {"request_headers": "1s"}})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: a\r\n")  # and never the blank line
        start = time.monotonic()
        data = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        elapsed = time.monotonic() - start
    assert status_of(data) == 408
    assert 0.9 < elapsed < 3


def test_http10_client_gets_a_close_delimited_or_sized_response(http_pair) -> None:
    port = http_pair[0]
    response = raw_exchange(port, b"GET /trailers HTTP/1.0\r\n\r\n")
    assert status_of(response) == 200
    assert response.endswith(b"hello world")
    assert b"transfer-encoding" not in response.lower()


def test_a_taken_port_is_reported_in_one_line_and_exit_1(tmp_path) -> None:
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "sidecar.yaml"
        config.write_text(
            f"service: {{name: web, app: 127.0.0.1:1}}\n"
            f"inbound: {{bind: 127.0.0.1:{port}, tls: 'off'}}\n"
            f"admin: {{bind: 127.0.0.1:{free_port()}}}\n"
        )
        result = subprocess.run(
            [sys.executable, "-m", "mesh.cli", "sidecar", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"inbound.bind: cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr
