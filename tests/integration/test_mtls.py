"""Mutual TLS between real sidecar processes, with certificates from the mesh's own CA."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from ca.authority import CertificateAuthority

from .clients import backend_stats, request
from .conftest import free_port, sidecar_config

WEB_ID = "spiffe://mesh.local/ns/default/dc/dc1/svc/web"


def write_identity(directory: Path, issued) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert.pem").write_bytes(issued.cert_pem)
    (directory / "key.pem").write_bytes(issued.key_pem)
    (directory / "bundle.pem").write_bytes(issued.bundle_pem)
    return {"files": {k: str(directory / f"{k}.pem") for k in ("cert", "key", "bundle")}}


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    # Created in the past, so that it can issue certificates that have already expired.
    created = datetime.now(UTC) - timedelta(days=30)
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca", "mesh.local", now=created)


def start_pair(
    mesh,
    tmp_path: Path,
    authority,
    app_port: int,
    *,
    inbound: dict | None = None,
    upstream: dict | None = None,
    server_identity=None,
) -> tuple[int, int, object, object]:
    in_port, out_port = free_port(), free_port()
    server = sidecar_config(
        service={"name": "api", "app": f"127.0.0.1:{app_port}"},
        inbound={"bind": f"127.0.0.1:{in_port}", "tls": "mutual", "allow": ["web"], **(inbound or {})},
        identity=write_identity(tmp_path / "api", server_identity or authority.issue("api")),
    )
    client = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{out_port}", "tls": "mutual", **(upstream or {})}],
        discovery={"static": {"api": [f"127.0.0.1:{in_port}"]}},
        identity=write_identity(tmp_path / "web", authority.issue("web")),
    )
    inbound_proc = mesh.sidecar(server, "inbound")
    outbound_proc = mesh.sidecar(client, "outbound")
    return out_port, in_port, outbound_proc, inbound_proc


@pytest.mark.parametrize("mesh_http2", [False, True], ids=["http1-hop", "http2-hop"])
def test_requests_cross_the_mtls_hop_and_the_app_learns_the_caller(
    mesh, tmp_path, authority, backend, mesh_http2: bool
) -> None:
    out_port, _, _, _ = start_pair(mesh, tmp_path, authority, backend["http"], upstream={"mesh_http2": mesh_http2})
    seen = request(out_port, "GET", "/headers", headers=[("x-mesh-peer-identity", "spiffe://forged")]).json()
    identities = [v for k, v in seen["headers"] if k == "x-mesh-peer-identity"]
    assert identities == [WEB_ID]
    assert request(out_port, "POST", "/consume", body=b"x" * 100_000).json()["size"] == 100_000


def test_http1_requests_share_one_http2_mesh_connection(mesh, tmp_path, authority, backend) -> None:
    out_port, _, outbound, _ = start_pair(mesh, tmp_path, authority, backend["http"], upstream={"mesh_http2": True})
    with ThreadPoolExecutor(10) as pool:  # ten requests in flight at once, each held 0.5 s by the app
        statuses = list(pool.map(lambda _: request(out_port, "GET", "/slow?s=0.5").status, range(10)))
    assert statuses == [200] * 10
    head = request(out_port, "HEAD", "/headers")
    assert head.status == 200 and head.body == b""
    assert request(out_port, "GET", "/headers").status == 200  # the connection is still good after a HEAD
    admin = json.loads(outbound.wait_for('"sidecar ready"'))["listeners"]["admin"]
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    opened = [line for line in metrics.splitlines() if line.startswith("mesh_upstream_connections_total{")]
    assert 'mesh_upstream_connections_total{event="opened",upstream="api"} 1.0' in opened, opened
    detected = [line for line in metrics.splitlines() if line.startswith("mesh_protocol_detected_total{")]
    assert detected == ['mesh_protocol_detected_total{direction="outbound",listener="api",protocol="http1"} 12.0']


def test_a_websocket_keeps_its_own_http1_connection_beside_the_http2_hop(mesh, tmp_path, authority, backend) -> None:
    out_port, _, _, _ = start_pair(mesh, tmp_path, authority, backend["ws"], upstream={"mesh_http2": True})
    with ws_connect(f"ws://127.0.0.1:{out_port}/") as ws:  # an upgrade: ALPN http/1.1, a connection of its own
        for message in ("hello", "x" * 100_000, b"\x00\x01binary"):
            ws.send(message)
            assert ws.recv() == message


def tls_client(in_port: int, cert_dir: Path | None, bundle: Path, data: bytes) -> bytes:
    """Talk to the inbound directly as a TLS client; returns what came back (b"" if refused)."""
    ctx = ssl.create_default_context(cafile=str(bundle))
    ctx.check_hostname = False
    if cert_dir is not None:
        ctx.load_cert_chain(str(cert_dir / "cert.pem"), str(cert_dir / "key.pem"))
    received = b""
    try:
        with socket.create_connection(("127.0.0.1", in_port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="api") as tls:
                tls.sendall(data)
                while chunk := tls.recv(65536):
                    received += chunk
    except (ssl.SSLError, OSError):
        pass
    return received


REQUEST = b"GET /status?code=200 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"


def test_inbound_refusals_reach_nothing(mesh, tmp_path, authority, backend) -> None:
    _, in_port, _, inbound = start_pair(mesh, tmp_path, authority, backend["http"])
    bundle = tmp_path / "web" / "bundle.pem"
    past = datetime.now(UTC) - timedelta(days=3)
    future = datetime.now(UTC) + timedelta(days=3)
    other_ca = CertificateAuthority.init(tmp_path / "other-ca", "mesh.local")
    cases = {
        "no-cert": None,
        "other-ca": write_identity(tmp_path / "c1", other_ca.issue("web")) and tmp_path / "c1",
        "expired": write_identity(tmp_path / "c2", authority.issue("web", now=past, ttl=3600)) and tmp_path / "c2",
        "not-yet-valid": write_identity(tmp_path / "c3", authority.issue("web", now=future)) and tmp_path / "c3",
    }
    before = backend_stats(backend["http"])["requests"]
    for name, cert_dir in cases.items():
        assert tls_client(in_port, cert_dir, bundle, REQUEST) == b"", name
    assert backend_stats(backend["http"])["requests"] == before
    inbound.wait_for_count('"mTLS handshake refused"', len(cases))  # stderr is read by another thread
    refusals = inbound.events("mTLS handshake refused")
    assert len(refusals) >= len(cases)
    assert all(r["reason"] for r in refusals)

    # A valid certificate of a service the policy does not allow: 403 naming the caller and the rule.
    write_identity(tmp_path / "intruder", authority.issue("intruder"))
    answer = tls_client(in_port, tmp_path / "intruder", bundle, REQUEST)
    assert answer.startswith(b"HTTP/1.1 403")
    assert b"x-mesh-error: caller spiffe://mesh.local/ns/default/dc/dc1/svc/intruder denied" in answer
    assert backend_stats(backend["http"])["requests"] == before


def test_outbound_refuses_a_peer_with_the_wrong_identity(mesh, tmp_path, authority, backend) -> None:
    out_port, _, _, _ = start_pair(
        mesh,
        tmp_path,
        authority,
        backend["http"],
        upstream={"identity": "spiffe://mesh.local/ns/default/dc/dc1/svc/db"},
    )
    before = backend_stats(backend["http"])["requests"]
    response = request(out_port, "GET", "/status?code=200")
    assert response.status == 502
    assert response.headers["x-mesh-error"] == (
        "upstream identity mismatch: expected spiffe://mesh.local/ns/default/dc/dc1/svc/db, "
        "got spiffe://mesh.local/ns/default/dc/dc1/svc/api"
    )
    assert backend_stats(backend["http"])["requests"] == before


def test_outbound_refuses_an_expired_peer_certificate(mesh, tmp_path, authority, backend) -> None:
    past = datetime.now(UTC) - timedelta(days=3)
    out_port, _, _, _ = start_pair(
        mesh, tmp_path, authority, backend["http"], server_identity=authority.issue("api", now=past, ttl=3600)
    )
    response = request(out_port, "GET", "/status?code=200")
    assert response.status == 502
    assert response.headers["x-mesh-error"].startswith("upstream TLS handshake failed")
    assert "expired" in response.headers["x-mesh-error"]


def test_outbound_never_falls_back_to_plaintext(mesh, tmp_path, authority, backend) -> None:
    out_port = free_port()
    client = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{out_port}", "tls": "mutual"}],
        discovery={"static": {"api": [f"127.0.0.1:{backend['http']}"]}},  # a plaintext HTTP server
        identity=write_identity(tmp_path / "web", authority.issue("web")),
    )
    mesh.sidecar(client, "outbound")
    before = backend_stats(backend["http"])["requests"]
    response = request(out_port, "GET", "/status?code=200")
    assert response.status == 502
    assert response.headers["x-mesh-error"].startswith("upstream TLS handshake failed")
    assert backend_stats(backend["http"])["requests"] == before


def test_certificate_files_are_reloaded_without_a_restart(mesh, tmp_path, authority, backend) -> None:
    import json
    import urllib.request

    out_port, _, _, inbound = start_pair(mesh, tmp_path, authority, backend["http"])
    inbound_admin = json.loads(inbound.wait_for('"sidecar ready"'))["listeners"]["admin"]
    with urllib.request.urlopen(f"http://{inbound_admin}/certs", timeout=10) as response:
        before = json.loads(response.read())
    assert request(out_port, "GET", "/status?code=200").status == 200
    write_identity(tmp_path / "api", authority.issue("api"))  # a renewal written by another tool
    inbound.wait_for_count('"identity loaded"', 2)  # the first load happened at start
    with urllib.request.urlopen(f"http://{inbound_admin}/certs", timeout=10) as response:
        after = json.loads(response.read())
    assert after["fingerprint_sha256"] != before["fingerprint_sha256"]
    assert after["spiffe_id"] == "spiffe://mesh.local/ns/default/dc/dc1/svc/api"
    assert request(out_port, "GET", "/status?code=200").status == 200


def test_old_and_new_root_leaves_interoperate_during_a_rotation(mesh, tmp_path, backend) -> None:
    created = datetime.now(UTC) - timedelta(days=1)
    rotating = CertificateAuthority.init(tmp_path / "rotating-ca", "mesh.local", now=created)
    old_leaf = rotating.issue("web")  # signed by root 1; its bundle lists root 1 only
    rotating.rotate()
    rotating.activate()
    new_leaf = rotating.issue("api")  # signed by root 2; its bundle lists roots 1 and 2
    assert old_leaf.root != new_leaf.root
    in_port, out_port = free_port(), free_port()
    web_files = write_identity(tmp_path / "web", old_leaf)
    # Bundles are refreshed independently of leaves: web's sidecar already has the new bundle.
    (tmp_path / "web" / "bundle.pem").write_bytes(rotating.bundle_pem())
    mesh.sidecar(
        sidecar_config(
            service={"name": "api", "app": f"127.0.0.1:{backend['http']}"},
            inbound={"bind": f"127.0.0.1:{in_port}", "tls": "mutual"},
            identity=write_identity(tmp_path / "api", new_leaf),
        ),
        "inbound",
    )
    mesh.sidecar(
        sidecar_config(
            service={"name": "web", "app": "127.0.0.1:1"},
            upstreams=[{"service": "api", "bind": f"127.0.0.1:{out_port}", "tls": "mutual"}],
            discovery={"static": {"api": [f"127.0.0.1:{in_port}"]}},
            identity=web_files,
        ),
        "outbound",
    )
    assert request(out_port, "GET", "/status?code=200").status == 200
