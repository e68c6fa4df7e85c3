"""Nothing lost, nothing doubled: what a real outbound sidecar re-sends or hedges, counted at scripted endpoints."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator

import pytest

from .clients import Client, request
from .conftest import free_port, sidecar_config
from .scripted import ScriptedEndpoint

FAST_BACKOFF = {"backoff_base": "1ms", "backoff_max": "2ms"}


@pytest.fixture
def endpoints() -> Iterator[list[ScriptedEndpoint]]:
    made: list[ScriptedEndpoint] = []
    yield made
    for endpoint in made:
        endpoint.close()


def scripted(made: list[ScriptedEndpoint], *scripts: object) -> list[ScriptedEndpoint]:
    new = [ScriptedEndpoint(script) for script in scripts]  # type: ignore[arg-type]
    made.extend(new)
    return new


def outbound(mesh, endpoints: list[ScriptedEndpoint], **upstream: object) -> tuple[int, str]:
    port, admin = free_port(), free_port()
    upstream.setdefault("retries", dict(FAST_BACKOFF))
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[{"service": "api", "bind": f"127.0.0.1:{port}", "tls": "off", **upstream}],
        discovery={"static": {"api": [e.address for e in endpoints]}},
        admin={"bind": f"127.0.0.1:{admin}"},
    )
    mesh.sidecar(config, "outbound")
    return port, f"127.0.0.1:{admin}"


def metric_lines(admin: str, name: str) -> list[str]:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as response:
        return [line for line in response.read().decode().splitlines() if line.startswith(name)]


@pytest.mark.parametrize("action", ["reset", "eof"])
def test_a_post_whose_connection_dies_after_it_was_sent_is_not_retried(mesh, endpoints, action) -> None:
    a, b = scripted(endpoints, action, action)
    port, _ = outbound(mesh, [a, b])
    response = request(port, "POST", "/orders", body=b'{"buy": 1}')
    assert response.status == 502
    assert response.headers["x-mesh-error"] == "upstream closed the connection before responding"
    assert a.count() + b.count() == 1  # it may have run: exactly one arrival


def test_the_same_get_is_retried_on_another_endpoint_and_succeeds(mesh, endpoints) -> None:
    bad, good = scripted(endpoints, "reset", "ok")
    port, _ = outbound(mesh, [bad, good], balancer={"policy": "round_robin"})
    assert [request(port, "GET", f"/items/{i}").status for i in range(4)] == [200] * 4
    assert good.count() == 4  # every request arrived there exactly once
    assert 1 <= bad.count() <= 4
    # Each retry went elsewhere: no request arrived twice at the resetting endpoint.
    paths = [arrival.path for arrival in bad.arrivals]
    assert len(paths) == len(set(paths))


def test_a_get_that_keeps_failing_is_tried_three_times_then_answered_502(mesh, endpoints) -> None:
    a, b = scripted(endpoints, "reset", "reset")
    port, _ = outbound(mesh, [a, b])
    response = request(port, "GET", "/items/1")
    assert response.status == 502
    assert a.count() + b.count() == 3  # the first try and the default two retries


def test_a_post_on_a_pooled_connection_the_upstream_closed_while_idle_arrives_exactly_once(mesh, endpoints) -> None:
    (endpoint,) = scripted(endpoints, "ok-then-close")
    port, _ = outbound(mesh, [endpoint])
    with Client(port) as client:
        assert client.request("GET", "/warm").status == 200
        assert endpoint.closed_idle.wait(5)  # the FIN reached the sidecar's pooled connection before the POST
        response = client.request("POST", "/orders", body=b"x" * 100)
    assert response.status == 200
    assert endpoint.count("POST") == 1
    assert endpoint.connections == 2  # the stale connection was never written to


def test_a_100_kib_put_is_never_retried(mesh, endpoints) -> None:
    a, b = scripted(endpoints, "reset", "reset")
    port, _ = outbound(mesh, [a, b])
    response = request(port, "PUT", "/blob", body=b"x" * 100 * 1024)  # idempotent, but too big to keep
    assert response.status == 502
    assert a.count() + b.count() == 1


def test_a_small_put_is_retried_with_its_whole_body(mesh, endpoints) -> None:
    bad, good = scripted(endpoints, "reset", "ok")
    port, _ = outbound(mesh, [bad, good], balancer={"policy": "round_robin"})
    for i in range(2):
        assert request(port, "PUT", f"/blob/{i}", body=b"y" * 60 * 1024).status == 200
    assert [arrival.body_bytes for arrival in good.arrivals] == [60 * 1024] * 2


def test_a_refused_connection_is_retried_whatever_the_method(mesh, endpoints) -> None:
    (good,) = scripted(endpoints, "ok")
    port, admin = free_port(), free_port()
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        upstreams=[
            {"service": "api", "bind": f"127.0.0.1:{port}", "tls": "off", "balancer": {"policy": "round_robin"}}
        ],
        discovery={"static": {"api": [f"127.0.0.1:{free_port()}", good.address]}},  # nothing listens on the first
        admin={"bind": f"127.0.0.1:{admin}"},
    )
    mesh.sidecar(config, "outbound")
    assert [request(port, "POST", "/orders", body=b"1").status for _ in range(4)] == [200] * 4
    assert good.count("POST") == 4


def test_503_is_retried_and_retry_after_is_honoured(mesh, endpoints) -> None:
    flaky, good = scripted(endpoints, "status:503:0", "ok")
    port, _ = outbound(mesh, [flaky, good], balancer={"policy": "round_robin"})
    assert [request(port, "GET", "/a").status for _ in range(2)] == [200, 200]
    (too_long,) = scripted(endpoints, "status:503:30")
    port, _ = outbound(mesh, [too_long], retries={**FAST_BACKOFF, "retry_after_max": "1s"})
    response = request(port, "GET", "/a")
    assert response.status == 503 and response.headers["retry-after"] == "30"  # the upstream's own answer
    assert too_long.count() == 1


def test_a_post_answered_503_is_passed_back_not_retried(mesh, endpoints) -> None:
    a, b = scripted(endpoints, "status:503", "status:503")
    port, _ = outbound(mesh, [a, b])
    assert request(port, "POST", "/orders", body=b"1").status == 503
    assert a.count() + b.count() == 1


def test_methods_all_lets_a_post_be_retried(mesh, endpoints) -> None:
    bad, good = scripted(endpoints, "reset", "ok")
    port, _ = outbound(
        mesh, [bad, good], balancer={"policy": "round_robin"}, retries={**FAST_BACKOFF, "methods": "all"}
    )
    assert [request(port, "POST", "/o", body=b"1").status for _ in range(2)] == [200, 200]
    assert good.count() == 2


def test_per_try_timeout_moves_a_get_to_another_endpoint(mesh, endpoints) -> None:
    slow, good = scripted(endpoints, "hang", "ok")
    retries = {**FAST_BACKOFF, "per_try_timeout": "200ms"}
    port, _ = outbound(mesh, [slow, good], balancer={"policy": "round_robin"}, retries=retries)
    assert [request(port, "GET", "/a").status for _ in range(2)] == [200, 200]
    assert good.count() == 2
    # A POST that may be running at the hung endpoint is not sent again: it gets the per-try timeout.
    (hung,) = scripted(endpoints, "hang")
    port, _ = outbound(
        mesh, [hung, good], balancer={"policy": "round_robin"}, retries={**FAST_BACKOFF, "per_try_timeout": "200ms"}
    )
    statuses = {request(port, "POST", "/o", body=b"1").status for _ in range(2)}
    assert statuses == {200, 504}


def test_retries_stay_within_the_budget_when_everything_fails(mesh, endpoints) -> None:
    a, b = scripted(endpoints, "status:503", "status:503")
    budget = {"percent": 20, "min_per_second": 0, "window": "1m"}
    port, admin = outbound(
        mesh, [a, b], retries={**FAST_BACKOFF, "budget": budget}, outlier={"consecutive_failures": 0}
    )
    sent = 200
    with Client(port) as client:
        statuses = [client.request("GET", f"/x/{i}").status for i in range(sent)]
    assert statuses == [503] * sent
    arrivals = a.count() + b.count()
    # Without a budget this would be 3 x 200 = 600 arrivals; the budget allows 20 % more than the requests.
    assert sent + 0.2 * sent - 1 <= arrivals <= sent + 0.2 * sent + 1, arrivals
    retried = arrivals - sent
    assert metric_lines(admin, "mesh_retries_total") == [
        f'mesh_retries_total{{reason="status_503",upstream="api"}} {float(retried)}'
    ]
    # A request stops at its first refused retry; those refusals are counted.
    (line,) = metric_lines(admin, "mesh_retry_budget_exhausted_total")
    assert line.startswith('mesh_retry_budget_exhausted_total{upstream="api"} ')
    assert sent - retried / 2 <= float(line.split()[-1]) <= sent


def test_inbound_answers_an_expired_mesh_deadline_without_forwarding(mesh, endpoints) -> None:
    (app,) = scripted(endpoints, "ok")
    port = free_port()
    mesh.sidecar(
        sidecar_config(
            service={"name": "api", "app": app.address}, inbound={"bind": f"127.0.0.1:{port}", "tls": "off"}
        ),
        "inbound",
    )
    expired = request(port, "GET", "/a", headers=[("x-mesh-deadline", "0")])
    assert expired.status == 504
    assert expired.headers["x-mesh-error"] == "deadline expired before forwarding"
    assert app.count() == 0
    assert request(port, "GET", "/a", headers=[("x-mesh-deadline", "5000")]).status == 200
    assert "x-mesh-deadline" not in app.arrivals[0].headers  # never passed to the application


def test_the_deadline_shrinks_across_the_mesh_hop(mesh, endpoints) -> None:
    (app,) = scripted(endpoints, "ok")
    port, _, _ = mesh.pair(app.port)
    assert request(port, "GET", "/a", headers=[("grpc-timeout", "5S")]).status == 200
    seen = app.arrivals[0].headers["grpc-timeout"]
    assert seen.endswith("u") and 4_000_000 < int(seen[:-1]) < 5_000_000  # rewritten with what was left
    assert "x-mesh-deadline" not in app.arrivals[0].headers


def test_a_grpc_timeout_shortens_the_request_timeout(mesh, endpoints) -> None:
    (hung,) = scripted(endpoints, "hang")
    port, _ = outbound(mesh, [hung], retries={"attempts": 0})
    started = time.monotonic()
    response = request(port, "GET", "/a", headers=[("grpc-timeout", "300m")])
    assert response.status == 504
    assert response.headers["x-mesh-error"] == "upstream request timeout"
    assert time.monotonic() - started < 5  # not the 15 s request timeout
    expired = request(port, "GET", "/a", headers=[("grpc-timeout", "0m")])
    assert expired.status == 504 and expired.headers["x-mesh-error"] == "deadline expired before forwarding"
    assert hung.count() == 1


def test_hedging_sends_a_slow_get_to_a_second_endpoint_and_takes_the_first_answer(mesh, endpoints) -> None:
    slow, fast = scripted(endpoints, "slow:2000", "ok")
    port, admin = outbound(mesh, [slow, fast], balancer={"policy": "round_robin"}, hedging={"delay": "50ms"})
    with Client(port) as client:
        assert [client.request("GET", f"/a/{i}").status for i in range(4)] == [200] * 4
    assert fast.count() == 4  # each GET reached the fast endpoint once, directly or as a hedge
    hedges = {
        line.split('outcome="')[1].split('"')[0]: float(line.split()[-1])
        for line in metric_lines(admin, "mesh_hedges_total")
    }
    assert hedges["sent"] >= 1 and hedges["won"] >= 1  # the GETs that went to the slow endpoint first were hedged
    assert slow.count() + fast.count() <= 4 + hedges["sent"]  # nothing arrived but the tries and their hedges


def test_a_post_is_never_hedged(mesh, endpoints) -> None:
    slow, fast = scripted(endpoints, "slow:300", "ok")
    port, admin = outbound(mesh, [slow, fast], balancer={"policy": "round_robin"}, hedging={"delay": "20ms"})
    assert [request(port, "POST", "/o", body=b"1").status for _ in range(4)] == [200] * 4
    assert slow.count() + fast.count() == 4
    assert all(line.endswith(" 0.0") for line in metric_lines(admin, "mesh_hedges_total"))


def test_an_endpoint_failing_its_health_check_gets_no_traffic(mesh, endpoints) -> None:
    sick, well = scripted(endpoints, "ok", "ok")
    sick.paths["/healthz"] = "status:503"
    health_check = {"interval": "100ms", "http_path": "/healthz", "unhealthy_threshold": 2}
    port, admin = outbound(mesh, [sick, well], retries={"attempts": 0}, health_check=health_check)
    for _ in range(100):  # probes run every 100 ms: wait (bounded) until the sidecar has judged the sick one
        state = {e["address"]: e for e in clusters(admin)["api"]["endpoints"]}
        if state[sick.address]["health"] == "unhealthy (health check)":
            break
        time.sleep(0.05)
    assert state[sick.address]["health"] == "unhealthy (health check)"
    assert state[sick.address]["last_probe"] == "status 503"
    assert state[well.address]["health"] == "healthy"
    before = sick.count()
    assert [request(port, "GET", "/work").status for _ in range(10)] == [200] * 10
    assert sick.count() - before == len([a for a in sick.arrivals[before:] if a.path == "/healthz"])  # probes only
    assert 'mesh_endpoints{health="unhealthy (health check)",upstream="api"} 1.0' in metric_lines(
        admin, "mesh_endpoints"
    )


def clusters(admin: str) -> dict:
    with urllib.request.urlopen(f"http://{admin}/clusters", timeout=10) as response:
        return json.loads(response.read())
