"""/metrics of a sidecar with routes, read with prometheus_client's own parser after a scripted run: every request
counted once, by route, destination and status class, and the duration histogram counting them all."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from tests.ports import free_port

from .conftest import Mesh, Process, sidecar_config
from .test_routes import Caller


def metrics(proc: Process) -> dict[str, list[tuple[dict[str, str], float, str]]]:
    """{family name: [(labels, value, sample name)]} of the sidecar's /metrics, as Prometheus would read it."""
    admin = json.loads(proc.wait_for('"sidecar ready"'))["listeners"]["admin"]
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        family.name: [(sample.labels, sample.value, sample.name) for sample in family.samples]
        for family in text_string_to_metric_families(text)
    }


def test_route_counts_and_the_histogram_equal_the_requests_sent(mesh: Mesh, backend: dict[str, int]) -> None:
    port = free_port()
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[
            {
                "service": "api",
                "bind": f"127.0.0.1:{port}",
                "tls": "off",
                "retries": {"attempts": 0},
                "routes": [
                    {"name": "ok", "match": {"path": "/status"}, "to": {"service": "api"}},
                    {"name": "teapot", "match": {"path": "/tea"}, "direct_response": {"status": 418}},
                    {"name": "moved", "match": {"path_prefix": "/old"}, "redirect": {"path": "/new"}},
                ],
            }
        ],
        discovery={"static": {"api": [f"127.0.0.1:{backend['http']}"]}},
    )
    proc = mesh.sidecar(config)
    sent: Counter[tuple[str, str]] = Counter()
    caller = Caller(port)
    try:
        for i in range(60):
            code = (200, 404, 503)[i % 3]
            assert caller.get(f"/status?code={code}").status == code
            sent["ok", f"{code // 100}xx"] += 1
        for _ in range(7):
            assert caller.get("/tea").status == 418
            sent["teapot", "4xx"] += 1
        for _ in range(5):
            assert caller.get("/old/x").status == 302
            sent["moved", "3xx"] += 1
        for _ in range(4):  # no route: the listener's default destination, through the implicit `default` route
            assert caller.get("/elsewhere").status == 404
            sent["default", "4xx"] += 1
    finally:
        caller.close()
    families = metrics(proc)
    by_route = {
        (labels["route"], labels["code_class"]): (labels["destination"], value)
        for labels, value, name in families["mesh_route_requests"]
        if name == "mesh_route_requests_total"
    }
    assert {key: value for key, (_, value) in by_route.items()} == sent
    assert by_route["ok", "2xx"][0] == by_route["default", "4xx"][0] == "api"
    assert by_route["teapot", "4xx"][0] == by_route["moved", "3xx"][0] == ""  # answered by the route itself
    total = sum(sent.values())
    requests = sum(
        value
        for labels, value, name in families["mesh_requests"]
        if name == "mesh_requests_total" and labels["direction"] == "outbound"
    )
    assert requests == total
    histogram_count = sum(
        value
        for labels, value, name in families["mesh_request_duration_seconds"]
        if name == "mesh_request_duration_seconds_count" and labels["direction"] == "outbound"
    )
    assert histogram_count == total
