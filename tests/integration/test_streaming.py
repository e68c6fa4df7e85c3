"""200 MB streamed each way through the pair without the sidecars buffering it."""

from __future__ import annotations

import hashlib

from .clients import Client

MB = 1024 * 1024
TOTAL = 200 * MB


def test_200mb_upload_and_download_with_flat_memory(mesh, backend) -> None:
    port, outbound, inbound = mesh.pair(backend["http"])
    with Client(port, timeout=120) as client:
        client.request("GET", "/bytes?n=1000")  # warm up both sidecars before the baseline
        baseline = {p.name: p.memory_kib("VmRSS") for p in (outbound, inbound)}
        piece = bytes(range(256)) * 4096  # 1 MiB
        upload = client.request("POST", "/consume", body=(piece for _ in range(200)), chunked=True)
        expected = hashlib.sha256()
        for _ in range(200):
            expected.update(piece)
        assert upload.json() == {"size": TOTAL, "sha256": expected.hexdigest()}
        download = client.request("GET", f"/bytes?n={TOTAL}", sink=True)
        assert download.status == 200 and int(download.body) == TOTAL
    for proc in (outbound, inbound):
        growth_mib = (proc.memory_kib("VmHWM") - baseline[proc.name]) / 1024
        assert growth_mib < 30, f"{proc.name} peak RSS grew by {growth_mib:.1f} MiB"
