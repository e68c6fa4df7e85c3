"""Balancing, outlier ejection and circuit breaking in a real outbound sidecar."""

from __future__ import annotations

import json
import threading
import urllib.request

from .clients import request
from .conftest import free_port, sidecar_config


def outbound(mesh, endpoints: list[str], **upstream: object) -> tuple[int, object, str]:
    port, admin = free_port(), free_port()
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{port}", "tls": "off", **upstream}],
        discovery={"static": {"api": endpoints}},
        admin={"bind": f"127.0.0.1:{admin}"},
    )
    return port, mesh.sidecar(config, "outbound"), f"127.0.0.1:{admin}"


def clusters(admin: str) -> dict:
    with urllib.request.urlopen(f"http://{admin}/clusters", timeout=10) as response:
        return json.loads(response.read())


def test_an_endpoint_that_keeps_failing_is_ejected_after_five_failures(mesh, backend) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: every connect is refused
    port, _, admin = outbound(
        mesh, [f"127.0.0.1:{backend['http']}", dead], balancer={"policy": "round_robin"}, retries={"attempts": 0}
    )
    statuses = [request(port, "GET", "/status?code=200").status for _ in range(40)]
    assert statuses.count(502) == 5  # the five consecutive failures that eject it, then never again
    assert statuses.count(200) == 35
    (ejected,) = [e for e in clusters(admin)["api"]["endpoints"] if e["address"] == dead]
    assert ejected["ejected_until"] is not None and ejected["times_ejected"] == 1


def test_with_default_retries_a_refusing_endpoint_costs_the_caller_nothing(mesh, backend) -> None:
    dead = f"127.0.0.1:{free_port()}"
    port, _, admin = outbound(mesh, [f"127.0.0.1:{backend['http']}", dead], balancer={"policy": "round_robin"})
    statuses = [request(port, "POST", "/status?code=200", body=b"x").status for _ in range(40)]
    assert statuses == [200] * 40  # a refused connect never ran: retried on the other endpoint, even a POST
    (ejected,) = [e for e in clusters(admin)["api"]["endpoints"] if e["address"] == dead]
    assert ejected["ejected_until"] is not None and ejected["times_ejected"] == 1


def test_circuit_breaker_refuses_at_once_over_max_requests(mesh, backend) -> None:
    port, _, admin = outbound(mesh, [f"127.0.0.1:{backend['http']}"], circuit_breakers={"max_requests": 2})
    results: list[int] = []
    slow = [
        threading.Thread(target=lambda: results.append(request(port, "GET", "/slow?s=1.5").status)) for _ in range(2)
    ]
    for thread in slow:
        thread.start()
    # Wait until both slow requests are in flight in the sidecar (its /clusters says so), bounded.
    for _ in range(200):
        if clusters(admin)["api"]["circuit"]["requests"] == 2:
            break
        threading.Event().wait(0.02)
    refused = request(port, "GET", "/status?code=200")
    for thread in slow:
        thread.join(10)
    assert refused.status == 503
    assert refused.headers["x-mesh-error"] == "circuit open (max_requests)"
    assert results == [200, 200]
    assert clusters(admin)["api"]["circuit"]["overflows"]["max_requests"] == 1


def test_ring_hash_keeps_a_key_on_one_endpoint(mesh, backend) -> None:
    # Two distinct endpoints in front of the same app: two inbound sidecars.
    endpoints = []
    for name in ("in-a", "in-b"):
        in_port = free_port()
        mesh.sidecar(
            sidecar_config(
                service={"name": "api", "app": f"127.0.0.1:{backend['http']}"},
                inbound={"bind": f"127.0.0.1:{in_port}", "tls": "off"},
            ),
            name,
        )
        endpoints.append(f"127.0.0.1:{in_port}")
    port, proc, _ = outbound(mesh, endpoints, balancer={"policy": "ring_hash", "hash_on": {"header": "x-user"}})
    for user in ("alice", "bob", "carol"):
        for i in range(6):
            headers = [("x-user", user), ("x-request-id", f"{user}-{i}")]
            assert request(port, "GET", "/status?code=200", headers=headers).status == 200
    proc.wait_for('"request_id":"carol-5"')  # access lines are written in batches
    chosen: dict[str, set[str]] = {}
    for event in proc.events("request"):
        chosen.setdefault(event["request_id"].split("-")[0], set()).add(event["endpoint"])
    assert all(len(endpoints_used) == 1 for endpoints_used in chosen.values()), chosen
