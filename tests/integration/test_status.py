"""`mesh status` and `mesh sidecar wait-ready` against real sidecar processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from ca.authority import CertificateAuthority

from .clients import request
from .conftest import Mesh, Process, free_port, sidecar_config


def mesh_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def admin_of(mesh: Mesh, name: str) -> str:
    return yaml.safe_load(mesh.config_path(name).read_text())["admin"]["bind"]


def start_pair(mesh: Mesh, app_port: int, registry: Path) -> tuple[int, str, str, str]:
    """web (outbound, with routes, and a `reviews` cluster where nothing listens) → api (inbound) → the backend, with
    a file registry in which api advertises its admin address. Returns (web's listener port, web's admin address,
    api's admin address, api's inbound address)."""
    inbound, port, nothing = (f"127.0.0.1:{free_port()}" for _ in range(3))
    web, api = (f"127.0.0.1:{free_port()}" for _ in range(2))
    registry.write_text(
        yaml.safe_dump({"services": {"api": [{"address": inbound, "meta": {"admin": api}}], "reviews": [nothing]}})
    )
    server = sidecar_config(
        service={"name": "api", "app": f"127.0.0.1:{app_port}"},
        inbound={"bind": inbound, "tls": "off"},
        admin={"bind": api},
    )
    routes = [
        {"name": "healthz", "match": {"path": "/healthz"}, "direct_response": {"status": 200, "body": "ok"}},
        {"name": "reviews", "match": {"path_prefix": "/reviews"}, "to": {"service": "reviews"}},
        {"name": "api"},
    ]
    client = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": port, "tls": "off", "routes": routes}],
        clusters=[{"service": "reviews", "tls": "off"}],
        discovery={"file": str(registry)},
        admin={"bind": web},
    )
    mesh.sidecar(server, "inbound")
    mesh.sidecar(client, "outbound")
    return int(port.rsplit(":", 1)[1]), web, api, inbound


def test_status_shows_each_sidecar(mesh: Mesh, backend: dict[str, int], tmp_path: Path) -> None:
    registry = tmp_path / "registry.yaml"
    port, web, api, inbound = start_pair(mesh, backend["http"], registry)
    for _ in range(5):
        assert request(port, "GET", "/status?code=200").status == 200
    assert request(port, "GET", "/status?code=404").status == 404
    assert request(port, "GET", "/status?code=503").status == 503  # tried three times by web
    for _ in range(2):
        assert request(port, "GET", "/healthz").status == 200
        assert request(port, "GET", "/reviews/1").status == 502  # nothing listens there
    registry.write_text("services: [")  # broken: web keeps the endpoints it knows, and says why they may be old
    mesh.procs[1].wait_for('"registry reload failed; keeping the last good endpoints"')
    gone = f"127.0.0.1:{free_port()}"

    result = mesh_cli("status", "--admin", web, "--admin", api, "--admin", gone)
    print(result.stdout)  # the sample in docs/operations.md
    assert result.returncode == 1 and result.stderr == ""
    assert "\x1b[" not in result.stdout  # no colour: stdout is not a terminal
    lines = result.stdout.splitlines()
    assert lines[0] == f"web  admin {web}"
    assert lines[1] == "  ready        yes"
    assert lines[2].startswith("  config       version 1, loaded ")
    assert lines[2].endswith(f" from {mesh.config_path('outbound')}")
    assert lines[3] == "  certificate  none: no identity configured (every mesh hop is tls: off)"
    assert f"  stale api, reviews: {registry}: line 1, column 12: " in result.stdout
    assert any(line.startswith(f"  api      {inbound}  healthy  ") for line in lines)
    assert any(line.startswith("  reviews  127.0.0.1:") and "  ejected  " in line for line in lines)
    traffic = lines.index("  traffic: totals since start")
    assert lines[traffic + 1 : traffic + 13] == [
        "  DIRECTION  UPSTREAM  2xx  3xx  4xx  5xx  TOTAL",
        "  outbound   api       7    0    1    1    9",  # the listener's service counts its direct responses too
        "  outbound   reviews   0    0    0    2    2",
        "",
        "  LISTENER  ROUTE    DESTINATION  2xx  3xx  4xx  5xx  TOTAL",
        "  api       api      api          5    0    1    1    7",
        "  api       healthz  -            2    0    0    0    2",
        "  api       reviews  reviews      0    0    0    2    2",
        "",
        "  DIRECTION  UPSTREAM  MESH ERROR       COUNT",
        "  outbound   reviews   connect_refused  2",
        "",
    ]
    assert f"api  admin {api}" in lines
    assert "  inbound    api       5    0    1    3    9" in lines  # web's two retries of the 503
    assert lines[-1] == f"{gone}  unreachable: connection refused"

    result = mesh_cli("status", "--admin", web, "--admin", api, "--json")
    assert result.returncode == 0
    outbound, inbound_sidecar = json.loads(result.stdout)["sidecars"]
    assert (outbound["service"], outbound["ready"], outbound["config_version"]) == ("web", True, 1)
    assert outbound["certificate"]["loaded"] is False
    cluster = outbound["clusters"][0]
    assert (cluster["name"], cluster["source"]) == ("api", f"file:{registry}")
    assert cluster["stale_reason"].startswith(f"{registry}: ")
    assert cluster["endpoints"][0]["address"] == inbound and cluster["endpoints"][0]["health"] == "healthy"
    assert cluster["endpoints"][0]["ewma_ms"] > 0
    assert outbound["requests"][0] == {
        "direction": "outbound",
        "upstream": "api",
        "by_class": {"2xx": 7, "4xx": 1, "5xx": 1},
        "total": 9,
        "per_second": None,
        "error_rate": None,
    }
    assert inbound_sidecar["service"] == "api" and inbound_sidecar["clusters"][0]["source"] == "service.app"

    result = mesh_cli("status", "--registry", str(registry), "--admin", api)  # the same sidecar is read once
    assert result.returncode == 1  # the registry is broken now
    registry.write_text(yaml.safe_dump({"services": {"api": [{"address": inbound, "meta": {"admin": api}}]}}))
    result = mesh_cli("status", "--registry", str(registry), "--admin", api)
    assert result.returncode == 0
    assert result.stdout.count(" admin ") == 1 and result.stdout.startswith(f"api  admin {api}\n")


def test_status_with_an_interval_shows_rates(mesh: Mesh, backend: dict[str, int]) -> None:
    port, _, _ = mesh.pair(backend["http"])
    web = admin_of(mesh, "outbound")
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            request(port, "GET", "/status?code=200")
            time.sleep(0.02)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        result = mesh_cli("status", "--admin", web, "--interval", "1")
    finally:
        stop.set()
        sender.join()
    print(result.stdout)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert any(line.startswith("  traffic: totals since start; rates over the last 1.") for line in lines)
    header = lines.index("  DIRECTION  UPSTREAM  2xx  3xx  4xx  5xx  TOTAL  REQ/S  5XX %")
    row = lines[header + 1].split()
    assert row[:2] == ["outbound", "api"] and float(row[7]) > 0 and row[8] == "0.0"


def test_wait_ready_follows_a_sidecar_until_it_is_ready(mesh: Mesh, tmp_path: Path) -> None:
    admin = f"127.0.0.1:{free_port()}"
    certs = tmp_path / "certs"  # written once the sidecar runs
    config = sidecar_config(
        service={"name": "api", "app": "127.0.0.1:1"},
        inbound={"bind": f"127.0.0.1:{free_port()}", "allow": ["web"]},
        identity={"files": {k: str(certs / f"{k}.pem") for k in ("cert", "key", "bundle")}},
        admin={"bind": admin},
    )
    waiter = Process(
        [sys.executable, "-m", "mesh.cli", "sidecar", "wait-ready", "--admin", admin, "--timeout", "60"],
        name="wait-ready",
    )
    try:
        waiter.wait_for(f"{admin}: waiting: unreachable: connection refused")  # not started yet
        mesh.sidecar(config)
        waiter.wait_for(f"{admin}: waiting: no usable certificate")

        result = mesh_cli("status", "--admin", admin)
        assert result.returncode == 0  # reachable, though not ready
        assert result.stdout.splitlines()[1:4:2] == [
            "  ready        no: no usable certificate",
            "  certificate  none: no certificate loaded yet",
        ]

        certs.mkdir()
        issued = CertificateAuthority.init(tmp_path / "ca", "mesh.local").issue("api")
        for name, data in (("key", issued.key_pem), ("bundle", issued.bundle_pem), ("cert", issued.cert_pem)):
            (certs / f"{name}.pem").write_bytes(data)
        assert waiter.proc.wait(30) == 0
    finally:
        waiter.terminate()
    # each reason once, as it changed ("starting" lasts a moment: a poll may or may not fall in it)
    assert [line for line in waiter.lines if not line.endswith(": starting")] == [
        f"{admin}: waiting: unreachable: connection refused",
        f"{admin}: waiting: no usable certificate",
    ]


def test_wait_ready_gives_up_at_its_timeout() -> None:
    admin = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = mesh_cli("sidecar", "wait-ready", "--admin", admin, "--timeout", "1", "--interval", "0.2")
    assert 1 <= time.monotonic() - started < 10
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{admin}: waiting: unreachable: connection refused",
        f"{admin}: not ready after 1s: unreachable: connection refused",
    ]
