"""The read-only telemetry listener of a real sidecar: GET /metrics and GET /status for other hosts, nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

from tests.ports import free_port

from .conftest import Mesh, sidecar_config
from .test_routes import Caller


def fetch(address: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{address}{path}", method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def test_metrics_and_status_and_nothing_else(mesh: Mesh, backend: dict[str, int]) -> None:
    port, telemetry = free_port(), f"127.0.0.1:{free_port()}"
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{port}", "tls": "off"}],
        discovery={"static": {"api": [f"127.0.0.1:{backend['http']}"]}},
        telemetry={"bind": telemetry},
    )
    proc = mesh.sidecar(config)
    ready = json.loads(proc.wait_for('"sidecar ready"'))
    assert ready["listeners"]["telemetry"] == telemetry
    caller = Caller(port)
    try:
        for _ in range(3):
            assert caller.get("/echo").status == 200
    finally:
        caller.close()

    status, metrics = fetch(telemetry, "/metrics")
    assert status == 200 and b'mesh_requests_total{code_class="2xx",direction="outbound",upstream="api"} 3.0' in metrics
    status, body = fetch(telemetry, "/status")
    view = json.loads(body)
    assert status == 200 and view["service"] == "web" and view["loaded"]["version"] == 1
    assert view["ready"] == {"ready": True, "reason": "ready"}
    assert [e["address"] for e in view["clusters"]["api"]["endpoints"]] == [f"127.0.0.1:{backend['http']}"]
    for path in ("/config", "/clusters", "/live"):  # the admin listener's views stay on loopback
        assert fetch(telemetry, path)[0] == 404
    for path in ("/reload", "/shutdown", "/drain"):  # and its operations are not answered here at all
        assert fetch(telemetry, path, "POST")[0] == 404
    assert proc.proc.poll() is None


def test_a_telemetry_bind_that_collides_names_the_setting(mesh: Mesh, tmp_path) -> None:
    admin = free_port()
    config = sidecar_config(admin={"bind": f"127.0.0.1:{admin}"}, telemetry={"bind": f"127.0.0.1:{admin}"})
    path = mesh.write_config(config, "collide")
    result = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "config", "check", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert f"collide.yaml: telemetry.bind: 127.0.0.1:{admin} is already used by admin.bind" in result.stderr
