"""Routes through a real sidecar process: splits, matches, rewrites and header changes, subsets, mirrors, faults,
host routing, inbound routes, and per-route gRPC retries.

One outbound sidecar (plaintext hops) serves a listener per scenario; named backends stand in for the peers'
sidecars and say which endpoint answered (`/whoami`); the file registry gives them `meta: {version: ...}`."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import h11
import pytest
import yaml

from .clients import Client, Response
from .conftest import Mesh, NamedBackend, free_port, sidecar_config, start_backends
from .grpc_apps import CALL_ID
from .grpc_apps import Client as GrpcClient

ROOT = Path(__file__).parents[2]
MIRROR_DELAY = 1.0  # how long the mirror's backend takes to answer
FAULT_DELAY = 0.2  # the injected delay; a request slower than DELAYED took it
DELAYED = 0.15
V1 = {"version": "v1"}
V2 = {"version": "v2"}


class Caller:
    """A keep-alive HTTP/1.1 connection that sends any Host, and opens a new connection when the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client = Client(port)

    def close(self) -> None:
        self.client.close()

    def get(self, target: str, *, host: str = "test", headers: Iterable[tuple[str, str]] = ()) -> Response:
        client = self.client
        if client.conn.our_state is not h11.IDLE:  # the last response closed the connection
            client.close()
            client = self.client = Client(self.port)
        client._send(h11.Request(method="GET", target=target, headers=[("host", host), *headers]))
        client._send(h11.EndOfMessage())
        return client.read_response()


def get(port: int, target: str, *, host: str = "test", headers: Iterable[tuple[str, str]] = ()) -> Response:
    caller = Caller(port)
    try:
        return caller.get(target, host=host, headers=headers)
    finally:
        caller.close()


def timed_gets(port: int, target: str, total: int, workers: int) -> list[tuple[Response, float]]:
    """`total` GETs spread over `workers` keep-alive connections: each response with its latency in seconds."""

    def run(count: int) -> list[tuple[Response, float]]:
        caller, out = Caller(port), []
        try:
            for _ in range(count):
                start = time.monotonic()
                response = caller.get(target)
                out.append((response, time.monotonic() - start))
        finally:
            caller.close()
        return out

    shares = [total // workers + (i < total % workers) for i in range(workers)]
    with futures.ThreadPoolExecutor(workers) as pool:
        return [item for part in pool.map(run, shares) for item in part]


def version_of(response: Response) -> str:
    """Which version of `reviews` answered (its backends are named v1a, v1b, v2a, v2b), or the backend's name."""
    assert response.status == 200, (response.status, response.headers, response.body)
    name = response.body.decode()
    return name[:2] if name in ("v1a", "v1b", "v2a", "v2b") else name


def wait_until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> object:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)
    return value


def to(service: str, subset: dict | None = None) -> dict:
    return {"service": service, **({"subset": subset} if subset else {})}


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, NamedBackend]]:
    started = start_backends("v1a", "v1b", "v2a", "v2b", "api", ("shadow", MIRROR_DELAY))
    yield started
    for one in started.values():
        one.close()


class Routes:
    """The sidecar under test: its listeners' ports by scenario, its inbound port and its process."""

    def __init__(self, ports: dict[str, int], proc: object) -> None:
        self.ports = ports
        self.proc = proc

    def __getitem__(self, name: str) -> int:
        return self.ports[name]


def routes_config(backends: dict[str, NamedBackend], ports: dict[str, int], registry: Path) -> dict:
    def listener(name: str, routes: list[dict]) -> dict:
        return {"bind": f"127.0.0.1:{ports[name]}", "routes": routes}

    api = to("api")
    return sidecar_config(
        service={"name": "web", "app": backends["api"].address},
        inbound={
            "bind": f"127.0.0.1:{ports['inbound']}",
            "tls": "off",
            "routes": [
                {
                    "name": "direct",
                    "match": {"path": "/inbound/direct"},
                    "direct_response": {"status": 200, "body": "answered by the inbound"},
                    "response_headers": {"set": {"x-answered-by": "inbound"}},
                },
            ],
        },
        clusters=[
            {"service": "reviews", "tls": "off", "balancer": {"policy": "round_robin"}},
            {"service": "api", "tls": "off"},
            {"service": "shadow", "tls": "off", "retries": {"attempts": 0}},
        ],
        upstreams=[
            listener(
                "split",
                [
                    {
                        "name": "split",
                        "split": [{"to": to("reviews", V1), "weight": 90}, {"to": to("reviews", V2), "weight": 10}],
                    }
                ],
            ),
            listener(
                "match",
                [
                    {"name": "canary", "match": {"headers": {"x-canary": "1"}}, "to": to("reviews", V2)},
                    {"name": "exact", "match": {"path": "/whoami/exact"}, "to": to("reviews", V1)},
                    {"name": "prefix", "match": {"path_prefix": "/whoami/prefix"}, "to": to("reviews", V2)},
                    {"name": "regex", "match": {"path_regex": r"/whoami/users/\d+"}, "to": api},
                ],
            ),
            listener(
                "edit",
                [
                    {
                        "name": "edit",
                        "match": {"path_prefix": "/app"},
                        "to": api,
                        "rewrite": {"prefix": "/", "host": "backend.internal"},
                        "request_headers": {
                            "remove": ["x-remove"],
                            "set": {"x-set": "new"},
                            "add": {"x-added": "by-the-route"},
                        },
                        "response_headers": {
                            "remove": ["content-type"],
                            "set": {"x-resp-set": "new"},
                            "add": {"x-resp-added": "1"},
                        },
                    }
                ],
            ),
            listener(
                "subset",
                [
                    {"name": "v2-only", "match": {"path_prefix": "/whoami/v2"}, "to": to("reviews", V2)},
                    {"name": "nobody", "match": {"path_prefix": "/whoami/v3"}, "to": to("reviews", {"version": "v3"})},
                ],
            ),
            listener("mirror", [{"name": "mirrored", "to": api, "mirror": {"to": to("shadow"), "percent": 50}}]),
            listener(
                "faults",
                [
                    {
                        "name": "faulty",
                        "to": api,
                        "fault": {
                            "abort": {"status": 503, "percent": 20},
                            "delay": {"duration": f"{int(FAULT_DELAY * 1000)}ms", "percent": 10},
                        },
                    }
                ],
            ),
            listener(
                "hosts",
                [
                    {"name": "api", "match": {"host": "api"}, "to": api},
                    {"name": "reviews", "match": {"host": ["reviews", "*.reviews"]}, "to": to("reviews")},
                ],
            ),
        ],
        discovery={"file": str(registry)},
    )


@pytest.fixture(scope="module")
def routes(backends: dict[str, NamedBackend], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routes]:
    tmp = tmp_path_factory.mktemp("routes")
    registry = tmp / "registry.yaml"
    reviews = [{"address": backends[n].address, "meta": {"version": n[:2]}} for n in ("v1a", "v1b", "v2a", "v2b")]
    services = {"reviews": reviews, "api": [backends["api"].address], "shadow": [backends["shadow"].address]}
    registry.write_text(yaml.safe_dump({"services": services}))
    names = ("split", "match", "edit", "subset", "mirror", "faults", "hosts", "inbound")
    ports = {name: free_port() for name in names}
    mesh = Mesh(tmp)
    try:
        proc = mesh.sidecar(routes_config(backends, ports, registry), "routes")
        proc.wait_for('"sidecar ready"')
        yield Routes(ports, proc)
    finally:
        mesh.close()


def test_a_90_10_split_between_subsets_holds_over_2000_requests(routes: Routes) -> None:
    answers = timed_gets(routes["split"], "/whoami?tag=split", 2000, workers=8)
    versions = Counter(version_of(response) for response, _ in answers)
    assert set(versions) == {"v1", "v2"} and sum(versions.values()) == 2000, versions
    assert 0.07 <= versions["v2"] / 2000 <= 0.13, versions


@pytest.mark.parametrize(
    ("target", "headers", "expected"),
    [
        ("/whoami/exact", [], "v1"),
        ("/whoami/exact", [("x-canary", "1")], "v2"),  # the first route that matches takes it
        ("/whoami/prefix", [], "v2"),
        ("/whoami/prefix/deeper?q=1", [("x-canary", "2")], "v2"),
        ("/whoami/users/42", [], "api"),
        ("/whoami/anything", [("x-canary", "1")], "v2"),
    ],
)
def test_header_and_path_matches_pick_the_route(routes: Routes, target: str, headers: list, expected: str) -> None:
    assert version_of(get(routes["match"], target, headers=headers)) == expected


@pytest.mark.parametrize("target", ["/whoami/exact/more", "/whoami/prefixes", "/whoami/users/abc", "/"])
def test_a_request_no_route_takes_gets_404_no_route(routes: Routes, target: str) -> None:
    response = get(routes["match"], target)
    assert response.status == 404
    assert response.headers["x-mesh-error"] == "no route"


def test_rewrite_and_header_changes_reach_the_app_and_the_client(routes: Routes) -> None:
    response = get(
        routes["edit"],
        "/app/headers?x=1",
        headers=[("x-remove", "gone"), ("x-set", "old"), ("x-set", "older"), ("x-added", "by-the-client")],
    )
    assert response.status == 200, response
    seen = response.json()
    assert seen["target"] == "/headers?x=1"  # the prefix /app replaced by /, the query kept
    headers = [(name.lower(), value) for name, value in seen["headers"]]
    assert [v for n, v in headers if n == "host"] == ["backend.internal"]
    assert [v for n, v in headers if n == "x-set"] == ["new"]
    assert [v for n, v in headers if n == "x-added"] == ["by-the-client", "by-the-route"]
    assert "x-remove" not in {n for n, _ in headers}
    assert "content-type" not in response.headers  # the app sent application/json
    assert response.headers["x-resp-set"] == "new"
    assert response.headers["x-resp-added"] == "1"


def test_a_subset_destination_reaches_only_its_endpoints(routes: Routes, backends: dict[str, NamedBackend]) -> None:
    answers = timed_gets(routes["subset"], "/whoami/v2?tag=subset", 200, workers=4)
    assert {version_of(response) for response, _ in answers} == {"v2"}
    counts = {name: backends[name].count("subset") for name in ("v1a", "v1b", "v2a", "v2b")}
    assert counts["v1a"] == counts["v1b"] == 0, counts
    assert counts["v2a"] + counts["v2b"] == 200 and min(counts["v2a"], counts["v2b"]) > 0, counts


def test_an_empty_subset_answers_503_naming_it(routes: Routes) -> None:
    response = get(routes["subset"], "/whoami/v3?tag=nobody")
    assert response.status == 503
    assert response.headers["x-mesh-error"].startswith("no healthy endpoints in subset"), response.headers


def test_half_the_requests_are_mirrored_and_the_caller_never_waits(
    routes: Routes, backends: dict[str, NamedBackend]
) -> None:
    # Paced so that the copies in flight (rate x 50 % x MIRROR_DELAY, about 65) stay well under the mirror's bound.
    caller, latencies, start = Caller(routes["mirror"]), [], time.monotonic()
    try:
        for i in range(400):
            time.sleep(max(0.0, start + i / 130 - time.monotonic()))
            sent = time.monotonic()
            assert version_of(caller.get("/whoami?tag=mirror")) == "api"
            latencies.append(time.monotonic() - sent)
    finally:
        caller.close()
    shadow = backends["shadow"]
    wait_until(lambda: shadow.stats()["whoami_active"] == 0, "the mirrored copies answered")
    assert backends["api"].count("mirror") == 400
    assert 0.40 <= shadow.count("mirror") / 400 <= 0.60, shadow.count("mirror")
    assert max(latencies) < MIRROR_DELAY / 2, max(latencies)
    assert statistics.median(latencies) < 0.05, statistics.median(latencies)


def test_fault_abort_and_delay_rates_hold_over_2000_requests(routes: Routes, backends: dict[str, NamedBackend]) -> None:
    answers = timed_gets(routes["faults"], "/whoami?tag=faults", 2000, workers=25)
    aborted = [
        r for r, _ in answers if r.status == 503 and r.headers.get("x-mesh-error", "").startswith("fault injected")
    ]
    served = [r for r, _ in answers if r.status == 200]
    assert len(aborted) + len(served) == 2000, Counter(r.status for r, _ in answers)
    assert 0.17 <= len(aborted) / 2000 <= 0.23, len(aborted)
    assert backends["api"].count("faults") == len(served)  # nothing of an aborted request reached the backend
    delayed = sum(latency > DELAYED for _, latency in answers)
    assert 0.07 <= delayed / 2000 <= 0.13, delayed
    assert statistics.median(latency for _, latency in answers if latency > DELAYED) >= FAULT_DELAY


@pytest.mark.parametrize(
    ("host", "expected"),
    [("api", "api"), ("API.:8080", "api"), ("reviews", "reviews"), ("v2.reviews", "reviews")],
)
def test_the_host_picks_the_destination_on_one_port(routes: Routes, host: str, expected: str) -> None:
    name = get(routes["hosts"], "/whoami", host=host).body.decode()
    assert (name if name == "api" else "reviews" if name in ("v1a", "v1b", "v2a", "v2b") else name) == expected


def test_an_unknown_host_gets_404_no_route(routes: Routes) -> None:
    response = get(routes["hosts"], "/whoami", host="ratings")
    assert (response.status, response.headers.get("x-mesh-error")) == (404, "no route")


def test_an_inbound_direct_response_never_reaches_the_app(routes: Routes, backends: dict[str, NamedBackend]) -> None:
    response = get(routes["inbound"], "/inbound/direct")
    assert (response.status, response.body) == (200, b"answered by the inbound")
    assert response.headers["x-answered-by"] == "inbound"
    assert version_of(get(routes["inbound"], "/whoami?tag=inbound")) == "api"  # other paths go to the app
    assert "/inbound/direct" not in backends["api"].stats()["paths"]


def test_an_inbound_route_with_a_destination_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "inbound.yaml"
    config = sidecar_config(
        service={"name": "web", "app": "127.0.0.1:8080"},
        inbound={"bind": f"127.0.0.1:{free_port()}", "tls": "off", "routes": [{"to": {"service": "web"}}]},
    )
    path.write_text(yaml.safe_dump(config))
    check = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "config", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert check.returncode == 1, check.stderr
    assert f"{path}: inbound.routes[0].to: not allowed on the inbound" in check.stderr, check.stderr


# --- gRPC: per-route retries on grpc-status ------------------------------------------------------------------


class Attempts:
    """A grpcio server: `/mesh.test.Flaky/Once` and `/mesh.test.Plain/Once` answer UNAVAILABLE to the first attempt
    of each call (by x-call-id) and OK after; `/mesh.test.Flaky/Invalid` always answers INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: Counter[str] = Counter()

    def _count(self, context: grpc.ServicerContext) -> int:
        call_id = dict(context.invocation_metadata()).get(CALL_ID, "")
        with self.lock:
            self.seen[call_id] += 1
            return self.seen[call_id]

    def once(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if self._count(context) == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "first attempt refused")
        return b"ok: " + request

    def invalid(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count(context)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "never valid")
        raise AssertionError("unreachable")


@pytest.fixture
def attempts() -> Iterator[tuple[Attempts, int]]:
    servicer = Attempts()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)])
    unary = grpc.unary_unary_rpc_method_handler
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "mesh.test.Flaky", {"Once": unary(servicer.once), "Invalid": unary(servicer.invalid)}
            ),
            grpc.method_handlers_generic_handler("mesh.test.Plain", {"Once": unary(servicer.once)}),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


def test_a_grpc_route_retries_unavailable_and_not_invalid_argument(mesh: Mesh, attempts) -> None:
    servicer, app_port = attempts
    port = free_port()
    retried = {"attempts": 2, "grpc_statuses": ["unavailable"], "methods": "all"}
    mesh.sidecar(
        sidecar_config(
            service={"name": "web", "app": "127.0.0.1:1"},
            upstreams=[
                {
                    "service": "flaky",
                    "bind": f"127.0.0.1:{port}",
                    "protocol": "grpc",
                    "tls": "off",
                    "retries": {"attempts": 0},  # what no route takes is never retried
                    "routes": [{"name": "flaky", "match": {"path_prefix": "/mesh.test.Flaky"}, "retries": retried}],
                }
            ],
            discovery={"static": {"flaky": [f"127.0.0.1:{app_port}"]}},
        ),
        "grpc",
    )
    with GrpcClient(f"127.0.0.1:{port}") as client:
        once = client.unary(b"hi", "/mesh.test.Flaky/Once", timeout=10)
        invalid = client.unary(b"hi", "/mesh.test.Flaky/Invalid", timeout=10)
        plain = client.unary(b"hi", "/mesh.test.Plain/Once", timeout=10)
    assert (once.code, once.response) == (grpc.StatusCode.OK, b"ok: hi")
    assert servicer.seen[once.call_id] == 2
    assert (invalid.code, invalid.details) == (grpc.StatusCode.INVALID_ARGUMENT, "never valid")
    assert servicer.seen[invalid.call_id] == 1
    assert plain.code == grpc.StatusCode.UNAVAILABLE  # the listener's own retry settings: none
    assert servicer.seen[plain.call_id] == 1
