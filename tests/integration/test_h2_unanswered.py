"""Every HTTP/2 request stream a real sidecar sees is accounted for, answered or not: reset by the client while the
app holds it or mid-response, refused over the stream limit, malformed, or reset in the write that opened it.

The client writes raw frames (test_http2_abuse.RawH2); the sidecar's upstream is the backend app itself.
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid

from h2.errors import ErrorCodes
from hyperframe.frame import HeadersFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame

from .clients import backend_stats, request
from .conftest import Process, free_port, sidecar_config
from .test_http2_abuse import RawH2, wait_until

MiB = 1024 * 1024
_SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")


def scrape(proc: Process) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The sidecar's metrics as {(name, labels): value}."""
    admin = json.loads(proc.wait_for('"sidecar ready"'))["listeners"]["admin"]
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if match := _SAMPLE.match(line):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match[2]))
            samples[match[1], labels] = float(match[3])
    return samples


def test_twenty_streams_twenty_records_in_the_metrics_and_the_logs(mesh, backend) -> None:
    port = free_port()
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[
            {
                "service": "api",
                "bind": f"127.0.0.1:{port}",
                "tls": "off",
                "limits": {"http2": {"max_concurrent_streams": 8}},
            }
        ],
        discovery={"static": {"api": [f"127.0.0.1:{backend['http']}"]}},
    )
    proc = mesh.sidecar(config, "outbound")
    key = uuid.uuid4().hex
    client = RawH2(port)  # 65535-byte stream windows, never opened: a large response stops mid-body
    held, cut = [1, 3, 5, 7, 9, 11], [13, 15]
    refused, malformed, dropped, answered = 17, [19, 21], 23, list(range(25, 41, 2))
    try:
        client.wait_for(lambda: client.settings.get(SettingsFrame.MAX_CONCURRENT_STREAMS) == 8, "SETTINGS")
        requests = [WindowUpdateFrame(0, window_increment=MiB).serialize()]  # room for every stream's first window
        requests += [client.request(s, f"/hold?key={key}") for s in held]
        requests += [client.request(s, f"/bytes?n={10 * MiB}") for s in cut]
        assert client.write(b"".join(requests))
        wait_until(lambda: backend_stats(backend["http"])["holding"].get(key) == len(held), "the app holds them")
        client.wait_for(lambda: all(s in client.heads for s in cut), "the large responses begin")
        assert client.write(client.request(refused, "/bytes?n=5"))  # a ninth stream
        client.wait_for(lambda: refused in client.resets, "the ninth stream refused")
        assert client.write(b"".join(RstStreamFrame(s, error_code=ErrorCodes.CANCEL).serialize() for s in held + cut))

        bad = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "api"), ("connection", "x")]
        frames = [
            HeadersFrame(s, data=client.encoder.encode(bad), flags=["END_HEADERS", "END_STREAM"]) for s in malformed
        ]
        assert client.write(b"".join(f.serialize() for f in frames))
        assert client.write(client.request(dropped, "/bytes?n=5") + RstStreamFrame(dropped, error_code=8).serialize())
        assert client.write(b"".join(client.request(s, "/bytes?n=5") for s in answered))
        client.wait_for(lambda: client.ended >= set(answered) and set(malformed) <= client.resets.keys(), "the rest")
    finally:
        request(backend["http"], "GET", f"/release?key={key}")
        client.close()
    assert client.resets[refused] == ErrorCodes.REFUSED_STREAM
    assert all(client.resets[s] == ErrorCodes.PROTOCOL_ERROR for s in malformed)
    assert all(client.heads[s][b":status"] == b"200" for s in answered + cut)

    logged = wait_until(lambda: (lambda e: e if len(e) >= 17 else None)(proc.events("request")), "17 access lines")
    by_outcome: dict[tuple[int, str], int] = {}
    for line in logged:
        outcome = (line["status"], line["mesh_error"])
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
    assert by_outcome == {
        (200, ""): len(answered),
        (200, "client reset the stream"): len(cut),  # the response had begun: answered, then cut
        (0, "client reset the stream"): len(held) + 1,  # no response at all (one of them never reached the app)
    }
    rejected = sorted((line["stream"], line["status"], line["reason"]) for line in proc.events("request rejected"))
    assert rejected == [
        (17, 0, "max concurrent streams exceeded"),
        (19, 0, "malformed request: connection-specific field 'connection'"),
        (21, 0, "malformed request: connection-specific field 'connection'"),
    ]

    metrics = scrape(proc)
    labels = {("direction", "outbound"), ("upstream", "api")}
    unanswered = {
        dict(key[1])["reason"]: value for key, value in metrics.items() if key[0] == "mesh_requests_unanswered_total"
    }
    assert unanswered == {"client_reset": 7.0, "refused": 1.0, "malformed": 2.0}
    assert metrics["mesh_requests_total", frozenset({*labels, ("code_class", "2xx")})] == 10.0
    assert sum(unanswered.values()) + 10 == 20
