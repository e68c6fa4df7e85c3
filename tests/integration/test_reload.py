"""Live config reload of a real sidecar process: SIGHUP under load, POST /reload on the admin listener, and
connections that outlive a reload."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from websockets.sync.client import connect as ws_connect

from .clients import Client
from .conftest import Mesh, NamedBackend, Process, free_port, sidecar_config, start_backends
from .test_h2_unanswered import scrape
from .test_routes import Caller, to, version_of, wait_until

V1 = {"version": "v1"}
V2 = {"version": "v2"}
WRK_SECONDS = 6


@pytest.fixture(scope="module")
def versions() -> Iterator[dict[str, NamedBackend]]:
    started = start_backends("v1a", "v2a")
    yield started
    for one in started.values():
        one.close()


def write_registry(tmp_path: Path, versions: dict[str, NamedBackend]) -> Path:
    registry = tmp_path / "registry.yaml"
    reviews = [{"address": b.address, "meta": {"version": name[:2]}} for name, b in versions.items()]
    registry.write_text(yaml.safe_dump({"services": {"reviews": reviews}}))
    return registry


def split_config(port: int, registry: Path, weights: tuple[int, int], *, v2_service: str = "reviews") -> dict:
    split = [{"to": to("reviews", V1), "weight": weights[0]}, {"to": to(v2_service, V2), "weight": weights[1]}]
    return sidecar_config(
        service={"name": "web", "app": "127.0.0.1:1"},
        clusters=[{"service": "reviews", "tls": "off"}],
        upstreams=[{"bind": f"127.0.0.1:{port}", "routes": [{"name": "split", "split": split}]}],
        discovery={"file": str(registry)},
    )


def admin(config: dict, path: str, method: str = "GET") -> tuple[int, dict]:
    """(status, JSON body) of an admin request; an error status is an answer too."""
    url = f"http://{config['admin']['bind']}{path}"
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def loaded_version(config: dict) -> dict:
    """The version record of /config: `version`, `loaded_at`, ... (at the top, or under `loaded`)."""
    status, view = admin(config, "/config")
    assert status == 200
    return view.get("loaded", view)


def reloads(proc: Process) -> dict[str, float]:
    return {
        dict(labels)["result"]: value
        for (name, labels), value in scrape(proc).items()
        if name == "mesh_config_reloads_total"
    }


def wrk(port: int, target: str, seconds: int) -> subprocess.Popen[str]:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed (apt-get install -y wrk)")
    args = ["wrk", "-t2", "-c16", f"-d{seconds}s", f"http://127.0.0.1:{port}{target}"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def all_on(caller: Caller, version: str, count: int) -> bool:
    return all(version_of(caller.get("/whoami?tag=poll")) == version for _ in range(count))


def test_sighup_under_load_switches_the_split_without_a_failed_request_and_refuses_a_bad_file(
    mesh: Mesh, tmp_path: Path, versions: dict[str, NamedBackend]
) -> None:
    port, registry = free_port(), write_registry(tmp_path, versions)
    config = split_config(port, registry, (100, 0))
    proc = mesh.sidecar(config, "reload")
    proc.wait_for('"sidecar ready"')
    caller = Caller(port)
    try:
        assert all_on(caller, "v1", 20)
        load, started = wrk(port, "/whoami?tag=wrk", WRK_SECONDS), time.monotonic()
        wait_until(lambda: versions["v1a"].count("wrk") > 100, "wrk's requests reach v1")
        time.sleep(max(0.0, started + 2 - time.monotonic()))  # the reload lands mid-run, not as a sync point

        mesh.write_config(split_config(port, registry, (0, 100)), "reload")
        hup = time.monotonic()
        proc.proc.send_signal(signal.SIGHUP)
        deadline = hup + 5
        while True:  # the new split holds once 20 requests in a row land on v2
            first = time.monotonic()
            if all_on(caller, "v2", 20):
                break
            assert time.monotonic() < deadline, "the new split did not take effect within 5 s"
        assert first - hup < 1.0, f"the new split took {first - hup:.2f} s"
        assert loaded_version(config)["version"] == 2
        v1_after_switch = versions["v1a"].count("wrk")

        mesh.write_config(split_config(port, registry, (0, 100), v2_service="nosuch"), "reload")
        proc.proc.send_signal(signal.SIGHUP)
        refusal = proc.wait_for("reload.yaml: upstreams[0].routes[0].split[1].to.service: unknown service 'nosuch'")
        assert "refused" in refusal, refusal
        assert reloads(proc)["refused"] == 1
        assert all_on(caller, "v2", 50)  # the old (last good) split keeps serving
        assert loaded_version(config)["version"] == 2

        output, _ = load.communicate(timeout=WRK_SECONDS + 20)
    finally:
        caller.close()
    assert load.returncode == 0, output
    assert "Non-2xx" not in output and "Socket errors" not in output, output
    assert int(re.search(r"(\d+) requests in", output)[1]) > 1000, output  # type: ignore[index]
    # After the switch, v1 got at most the requests that were already on their way (one per connection).
    assert versions["v1a"].count("wrk") - v1_after_switch <= 16
    assert versions["v2a"].count("wrk") > 0


def test_post_reload_answers_ok_unchanged_and_refused(mesh: Mesh, tmp_path: Path, versions) -> None:
    port, registry = free_port(), write_registry(tmp_path, versions)
    config = split_config(port, registry, (100, 0))
    proc = mesh.sidecar(config, "admin-reload")
    proc.wait_for('"sidecar ready"')
    first = loaded_version(config)
    assert first["version"] == 1

    status, unchanged = admin(config, "/reload", "POST")
    assert (status, unchanged["result"], unchanged["version"]) == (200, "unchanged", 1)

    mesh.write_config(split_config(port, registry, (0, 100)), "admin-reload")
    status, ok = admin(config, "/reload", "POST")
    assert (status, ok["result"], ok["version"]) == (200, "ok", 2), ok
    second = loaded_version(config)
    assert second["version"] == 2 and second["loaded_at"] >= first["loaded_at"]
    caller = Caller(port)
    try:
        assert all_on(caller, "v2", 10)  # applied at once: the answer comes after the swap

        broken = split_config(port, registry, (0, 100))
        broken["upstreams"][0]["bind"] = "127.0.0.1:70000"
        mesh.write_config(broken, "admin-reload")
        status, refused = admin(config, "/reload", "POST")
        assert (status, refused["result"]) == (400, "refused"), refused
        assert any(
            line.endswith("admin-reload.yaml: upstreams[0].bind: port 70000 out of range") for line in refused["errors"]
        ), refused["errors"]
        assert loaded_version(config)["version"] == 2
        assert all_on(caller, "v2", 10)
    finally:
        caller.close()
    assert reloads(proc) == {"ok": 1, "unchanged": 1, "refused": 1}


def test_connections_opened_before_a_reload_keep_working_after_it(mesh: Mesh, backend: dict[str, int]) -> None:
    http_port, ws_port = free_port(), free_port()

    def config(routes: list[dict]) -> dict:
        return sidecar_config(
            service={"name": "web", "app": "127.0.0.1:1"},
            upstreams=[
                {"service": "api", "bind": f"127.0.0.1:{http_port}", "tls": "off", "routes": routes},
                {"service": "chat", "bind": f"127.0.0.1:{ws_port}", "tls": "off"},
            ],
            discovery={"static": {"api": [f"127.0.0.1:{backend['http']}"], "chat": [f"127.0.0.1:{backend['ws']}"]}},
        )

    before = config([])
    mesh.sidecar(before, "keep")
    with Client(http_port) as client, ws_connect(f"ws://127.0.0.1:{ws_port}/", open_timeout=10) as ws:
        assert client.request("GET", "/headers").status == 200
        ws.send("before")
        assert ws.recv(timeout=10) == "before"

        new_route = {"name": "new", "match": {"path": "/new"}, "direct_response": {"status": 200, "body": "new route"}}
        mesh.write_config(config([new_route]), "keep")
        status, result = admin(before, "/reload", "POST")
        assert (status, result["result"]) == (200, "ok"), result

        socket_before = client.sock.getsockname()
        answer = client.request("GET", "/new")  # the same connection, served by the new config
        assert (answer.status, answer.body) == (200, b"new route")
        assert client.request("GET", "/headers").status == 200
        assert client.sock.getsockname() == socket_before
        ws.send("after")
        assert ws.recv(timeout=10) == "after"


def pool_events(proc: Process, upstream: str) -> dict[str, float]:
    return {
        dict(labels)["event"]: value
        for (name, labels), value in scrape(proc).items()
        if name == "mesh_upstream_connections_total" and dict(labels)["upstream"] == upstream
    }


def test_a_reload_keeps_the_pool_of_an_unchanged_cluster_and_renews_a_changed_one(
    mesh: Mesh, tmp_path: Path, versions
) -> None:
    """A route change leaves the reviews cluster as it was: the next requests reuse its pooled connections. A
    change of the cluster's own settings gives it a new pool, which opens its own connections."""
    port, registry = free_port(), write_registry(tmp_path, {"v1a": versions["v1a"]})
    config = split_config(port, registry, (100, 0))
    proc = mesh.sidecar(config, "pool-reload")
    proc.wait_for('"sidecar ready"')
    caller = Caller(port)
    try:
        assert all_on(caller, "v1", 10)
        before = pool_events(proc, "reviews")
        assert before.get("opened") == 1  # one keep-alive connection carried the ten requests

        routes_only = split_config(port, registry, (100, 0))
        routes_only["upstreams"][0]["routes"][0]["response_headers"] = {"set": {"x-reloaded": "yes"}}
        mesh.write_config(routes_only, "pool-reload")
        status, ok = admin(config, "/reload", "POST")
        assert (status, ok["result"], ok["listeners"]["clusters_kept"]) == (200, "ok", ["reviews"]), ok
        assert caller.get("/whoami").headers.get("x-reloaded") == "yes"  # the new route serves...
        assert all_on(caller, "v1", 10)
        assert pool_events(proc, "reviews").get("opened") == 1  # ...with the connection the old one pooled

        new_cluster = split_config(port, registry, (100, 0))
        new_cluster["clusters"][0]["balancer"] = {"policy": "round_robin"}
        mesh.write_config(new_cluster, "pool-reload")
        status, ok = admin(config, "/reload", "POST")
        assert (status, ok["result"], ok["listeners"]["clusters_new"]) == (200, "ok", ["reviews"]), ok
        assert all_on(caller, "v1", 10)
        assert pool_events(proc, "reviews").get("opened") == 2  # the new cluster's own connection
    finally:
        caller.close()
