"""`mesh ca serve` and signals: SIGHUP is logged and ignored, SIGTERM drains and exits 0."""

from __future__ import annotations

import signal
from pathlib import Path

from ca.authority import CertificateAuthority

from .conftest import Process
from .test_ca_flood import ca_dir, fetch_bundle, serve, start

__all__ = ["ca_dir", "serve"]  # fixtures shared with test_ca_flood


def test_sighup_is_logged_and_the_ca_keeps_serving(serve: list[Process], ca_dir: Path) -> None:
    port = start(serve, ca_dir)
    serve[0].proc.send_signal(signal.SIGHUP)
    serve[0].wait_for('"SIGHUP ignored')
    bundle = CertificateAuthority.load(ca_dir).bundle_pem()
    assert fetch_bundle(port, bundle)[0] == bundle
    assert serve[0].proc.poll() is None
