"""x-forwarded-client-cert: the inbound sanitises and sets it (Envoy's SANITIZE_SET), so no app sees a forged one."""

from __future__ import annotations

import hashlib
import ssl

from .clients import request
from .conftest import free_port, sidecar_config
from .test_mtls import WEB_ID, authority, start_pair

__all__ = ["authority"]  # the module-scoped CA fixture, shared with test_mtls

API_ID = "spiffe://mesh.local/ns/default/dc/dc1/svc/api"
FORGED = "By=spiffe://mesh.local/ns/default/dc/dc1/svc/api;URI=spiffe://mesh.local/ns/default/dc/dc1/svc/admin"


def test_the_app_sees_only_the_certificate_the_inbound_verified(mesh, tmp_path, authority, backend) -> None:
    out_port, _, _, _ = start_pair(mesh, tmp_path, authority, backend["http"])
    seen = request(
        out_port, "GET", "/headers", headers=[("x-forwarded-client-cert", FORGED), ("X-Forwarded-Client-Cert", "x")]
    ).json()
    values = [v for k, v in seen["headers"] if k == "x-forwarded-client-cert"]
    der = ssl.PEM_cert_to_DER_cert(
        (tmp_path / "web" / "cert.pem").read_text().split("-----END CERTIFICATE-----")[0]
        + "-----END CERTIFICATE-----\n"
    )
    assert values == [f"By={API_ID};Hash={hashlib.sha256(der).hexdigest()};URI={WEB_ID}"]


def test_a_plaintext_inbound_passes_no_client_certificate_header(mesh, backend) -> None:
    port = free_port()
    mesh.sidecar(
        sidecar_config(
            service={"name": "api", "app": f"127.0.0.1:{backend['http']}"},
            inbound={"bind": f"127.0.0.1:{port}", "tls": "off"},
        ),
        "inbound",
    )
    seen = request(port, "GET", "/headers", headers=[("x-forwarded-client-cert", FORGED)]).json()
    assert [v for k, v in seen["headers"] if k == "x-forwarded-client-cert"] == []
