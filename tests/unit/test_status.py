"""`mesh status` and `mesh sidecar wait-ready`: the model and its rendering from recorded admin answers, the
registry's advertised admin addresses, the polling loop, and the command line's errors."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from mesh.cli import main
from mesh.config import Address, ConfigError
from mesh.status import (
    AdminAnswers,
    Unreachable,
    build_status,
    registry_admins,
    render_json,
    render_table,
    wait_ready,
)

LOADED_AT = 1_765_000_000.0  # 2025-12-06 05:46:40 UTC
NOW = LOADED_AT + 125

# What a web sidecar's admin listener answered (trimmed to the fields mesh status reads, plus a few it ignores).
CONFIG: dict[str, Any] = {
    "loaded": {
        "version": 3,
        "loaded_at": LOADED_AT,
        "loaded_at_utc": "2025-12-06T05:46:40+00:00",
        "digest": "c47b07",
        "source": "/etc/mesh/web.yaml",
    },
    "service": {"name": "web", "app": "127.0.0.1:8080", "protocol": "http"},
    "admin": {"bind": "127.0.0.1:9901"},
}
CERTS: dict[str, Any] = {
    "loaded": True,
    "spiffe_id": "spiffe://mesh.local/ns/default/dc/dc1/svc/web",
    "not_before": "2025-12-06T00:00:00+00:00",
    "not_after": "2025-12-07T00:00:00+00:00",
    "seconds_until_expiry": 65_000.0,
    "fingerprint_sha256": "ab" * 32,
    "bundle_roots": ["cd" * 32],
    "source": "files",
}
CLUSTERS: dict[str, Any] = {
    "api": {
        "resolved": True,
        "source": "file:/etc/mesh/registry.yaml",
        "age_s": 312.5,
        "stale_reason": "registry.yaml: line 3, column 1: could not find expected ':'",
        "balancer": "p2c_ewma",
        "panic": False,
        "circuit": {
            "connections": 4,
            "pending": 0,
            "requests": 2,
            "overflows": {"max_connections": 0, "max_pending": 0, "max_requests": 7},
        },
        "endpoints": [
            {
                "address": "10.0.0.5:15000",
                "weight": 1,
                "healthy": True,
                "tags": [],
                "meta": {},
                "idle_connections": 2,
                "ewma_ms": 12.345,
                "outstanding": 1,
                "successes": 120,
                "failures": 1,
                "consecutive_failures": 1,
                "ejected_until": None,
                "times_ejected": 0,
                "probation": False,
                "success_rate": None,
                "ejected_by": None,
                "health": "healthy",
            },
            {
                "address": "10.0.0.6:15000",
                "weight": 1,
                "healthy": True,
                "tags": [],
                "meta": {},
                "idle_connections": 0,
                "ewma_ms": 250.0,
                "outstanding": 0,
                "successes": 40,
                "failures": 9,
                "consecutive_failures": 0,
                "ejected_until": 5123.4,
                "times_ejected": 2,
                "probation": False,
                "success_rate": None,
                "ejected_by": "consecutive_failures",
                "health": "ejected (outlier detection)",
            },
            {
                "address": "10.0.0.7:15000",
                "weight": 1,
                "healthy": False,
                "tags": [],
                "meta": {},
                "idle_connections": 0,
                "ewma_ms": 30.0,
                "outstanding": 0,
                "successes": 0,
                "failures": 0,
                "health": "unhealthy (discovery)",
            },
        ],
    },
    "reviews": {
        "resolved": False,
        "source": None,
        "age_s": None,
        "stale_reason": "consul: connection refused",
        "balancer": "round_robin",
        "panic": False,
        "circuit": {"connections": 0, "pending": 0, "requests": 0, "overflows": {}},
        "endpoints": [],
    },
}


def metrics_text(ok: int = 150, server_errors: int = 4, refused: int = 3, canary: int = 10) -> str:
    return f"""\
# HELP mesh_requests_total HTTP requests completed, by status class (1xx-5xx).
# TYPE mesh_requests_total counter
mesh_requests_total{{code_class="2xx",direction="outbound",upstream="api"}} {ok}.0
mesh_requests_total{{code_class="4xx",direction="outbound",upstream="api"}} 2.0
mesh_requests_total{{code_class="5xx",direction="outbound",upstream="api"}} {server_errors}.0
mesh_requests_total{{code_class="2xx",direction="outbound",upstream="reviews{{version=v2}}"}} {canary}.0
# HELP mesh_route_requests_total HTTP requests a route took.
# TYPE mesh_route_requests_total counter
mesh_route_requests_total{{code_class="2xx",destination="reviews{{version=v2}}",direction="outbound",\
listener="api",route="canary"}} {canary}.0
mesh_route_requests_total{{code_class="3xx",destination="",direction="outbound",listener="api",route="old-path"}} 1.0
# HELP mesh_errors_total Errors the mesh produced itself, by reason code.
# TYPE mesh_errors_total counter
mesh_errors_total{{direction="outbound",reason="connect_refused",upstream="api"}} {refused}.0
mesh_errors_created{{direction="outbound",reason="connect_refused",upstream="api"}} 1.765e+09
mesh_errors_total{{direction="outbound",reason="upstream_timeout",upstream="api"}} 0.0
# HELP mesh_config_version Version of the config in use.
# TYPE mesh_config_version gauge
mesh_config_version 3.0
"""


def answers(metrics: str | None = None, *, metrics_at: float = 100.0, **changes: Any) -> AdminAnswers:
    fields: dict[str, Any] = {
        "admin": "127.0.0.1:9901",
        "ready": (200, "ready"),
        "config": CONFIG,
        "clusters": CLUSTERS,
        "certs": CERTS,
        "metrics": metrics_text() if metrics is None else metrics,
        "metrics_at": metrics_at,
    }
    fields.update(changes)
    return AdminAnswers(**fields)


def table(*statuses: Any, colour: bool = False) -> str:
    return render_table(list(statuses), now=NOW, colour=colour)


def test_the_model_reads_every_admin_answer() -> None:
    status = build_status(answers())
    assert (status.service, status.ready, status.ready_reason) == ("web", True, "ready")
    assert (status.config_version, status.config_loaded_at, status.config_source) == (
        3,
        LOADED_AT,
        "/etc/mesh/web.yaml",
    )
    assert status.certificate is not None and status.certificate.seconds_until_expiry == 65_000.0
    api, reviews = status.clusters
    assert (api.name, api.connections, api.requests, api.overflows["max_requests"]) == ("api", 4, 2, 7)
    assert [(e.health, e.detail) for e in api.endpoints] == [
        ("healthy", "1 consecutive failure"),
        ("ejected", "by consecutive_failures, ejected 2 times"),
        ("unhealthy", "by discovery"),
    ]
    assert (reviews.resolved, reviews.stale_reason) == (False, "consul: connection refused")
    assert [(r.upstream, r.by_class, r.total, r.per_second) for r in status.requests] == [
        ("api", {"2xx": 150, "4xx": 2, "5xx": 4}, 156, None),
        ("reviews{version=v2}", {"2xx": 10}, 10, None),
    ]
    assert [(r.route, r.destination, r.total) for r in status.routes] == [
        ("canary", "reviews{version=v2}", 10),
        ("old-path", "", 1),
    ]
    # a reason that never happened (0) is left out; _created samples are not counts
    assert [(e.reason, e.count) for e in status.errors] == [("connect_refused", 3)]


def test_the_table_shows_one_block_per_sidecar() -> None:
    out = table(build_status(answers()))
    assert out.splitlines()[:4] == [
        "web  admin 127.0.0.1:9901",
        "  ready        yes",
        "  config       version 3, loaded 2025-12-06 05:46:40 UTC (2m 05s ago) from /etc/mesh/web.yaml",
        "  certificate  spiffe://mesh.local/ns/default/dc/dc1/svc/web, expires 2025-12-07 00:00:00 UTC "
        "(in 18h 03m), from files",
    ]
    lines = out.splitlines()
    start = lines.index(
        "  CLUSTER  SOURCE              AGE     ENDPOINTS    CONNS  PENDING  ACTIVE  OVERFLOWS       STALE"
    )
    assert lines[start + 1 : start + 6] == [
        "  api      file:registry.yaml  5m 12s  1/3 healthy  4      0        2       max_requests=7  yes",
        "  reviews  -                   -       unresolved   0      0        0       0               -",
        "  stale api: registry.yaml: line 3, column 1: could not find expected ':'",
        "  unresolved reviews: consul: connection refused",
        "",
    ]
    start = lines.index("  CLUSTER  ENDPOINT        HEALTH     EWMA     ACTIVE  IDLE  OK   FAILED  DETAIL")
    assert lines[start + 1 : start + 4] == [
        "  api      10.0.0.5:15000  healthy    12.3ms   1       2     120  1       1 consecutive failure",
        "           10.0.0.6:15000  ejected    250.0ms  0       0     40   9       "
        "by consecutive_failures, ejected 2 times",
        "           10.0.0.7:15000  unhealthy  30.0ms   0       0     0    0       by discovery",
    ]
    traffic = lines.index("  traffic: totals since start")
    assert lines[traffic + 1 :] == [
        "  DIRECTION  UPSTREAM             2xx  3xx  4xx  5xx  TOTAL",
        "  outbound   api                  150  0    2    4    156",
        "  outbound   reviews{version=v2}  10   0    0    0    10",
        "",
        "  LISTENER  ROUTE     DESTINATION          2xx  3xx  4xx  5xx  TOTAL",
        "  api       canary    reviews{version=v2}  10   0    0    0    10",
        "  api       old-path  -                    0    1    0    0    1",
        "",
        "  DIRECTION  UPSTREAM  MESH ERROR       COUNT",
        "  outbound   api       connect_refused  3",
    ]


def test_two_scrapes_give_rates_and_the_5xx_share() -> None:
    before = answers(metrics_text(ok=100, server_errors=0, refused=1, canary=10), metrics_at=100.0)
    after = answers(metrics_text(ok=140, server_errors=10, refused=3, canary=10), metrics_at=105.0)
    status = build_status(after, before)
    assert status.interval_s == 5.0
    api, canary = status.requests
    assert (api.per_second, api.error_rate) == (10.0, 0.2)  # 50 requests in 5 s, 10 of them 5xx
    assert (canary.per_second, canary.error_rate) == (0.0, None)  # none in the window: no share
    assert status.errors[0].per_second == 0.4
    lines = table(status).splitlines()
    assert "  traffic: totals since start; rates over the last 5.0s" in lines
    assert "  DIRECTION  UPSTREAM             2xx  3xx  4xx  5xx  TOTAL  REQ/S  5XX %" in lines
    assert "  outbound   api                  140  0    2    10   152    10.0   20.0" in lines
    assert "  outbound   api       connect_refused  3      0.4" in lines


def test_a_restarted_sidecar_counts_from_zero_instead_of_going_negative() -> None:
    before = answers(metrics_text(ok=500, server_errors=50), metrics_at=0.0)
    status = build_status(answers(metrics_text(ok=20, server_errors=4), metrics_at=2.0), before)
    assert status.requests[0].per_second == (20 + 4) / 2  # 2xx and 5xx went down: all new; 4xx stayed at 2


def test_a_sidecar_without_identity_or_traffic() -> None:
    certs = {"loaded": False, "reason": "no identity configured (every mesh hop is tls: off)"}
    status = build_status(answers("", clusters={}, certs=certs))
    lines = table(status).splitlines()
    assert "  certificate  none: no identity configured (every mesh hop is tls: off)" in lines
    assert lines[-2:] == ["  traffic: totals since start", "  no requests yet"]
    assert not any(line.startswith("  CLUSTER") for line in lines)


def test_not_ready_expired_and_missing_answers() -> None:
    certs = {**CERTS, "seconds_until_expiry": -600.0, "source": "ca", "last_error": "CA unreachable"}
    status = build_status(
        answers(ready=(503, "certificate not valid now (expired)"), certs=certs, problems=("/clusters: HTTP 500",))
    )
    assert not status.ready
    lines = table(status).splitlines()
    assert "  ready        no: certificate not valid now (expired)" in lines
    assert (
        "  certificate  spiffe://mesh.local/ns/default/dc/dc1/svc/web, expires 2025-12-07 00:00:00 UTC "
        "(expired 10m 00s ago), from ca; last error: CA unreachable"
    ) in lines
    assert "  problem      /clusters: HTTP 500" in lines


def test_a_ca_identity_still_waiting_for_its_first_certificate() -> None:
    certs = {"loaded": False, "spiffe_id": "spiffe://x", "source": "ca", "last_error": "connect refused"}
    line = next(ln for ln in table(build_status(answers(certs=certs))).splitlines() if "certificate" in ln)
    assert line == "  certificate  none: no certificate loaded yet; last error: connect refused"


def test_an_unreachable_sidecar_is_one_line() -> None:
    out = table(Unreachable("127.0.0.1:9902", "connection refused"), build_status(answers()))
    assert out.startswith("127.0.0.1:9902  unreachable: connection refused\n\nweb  admin 127.0.0.1:9901\n")


def test_colour_only_when_asked() -> None:
    status = build_status(answers())
    assert "\x1b[" not in table(status)
    coloured = table(status, colour=True)
    assert "\x1b[32myes\x1b[0m" in coloured and "\x1b[33mejected\x1b[0m" in coloured
    assert "\x1b[31munhealthy\x1b[0m" in coloured
    # the codes do not count towards column widths
    plain = next(line for line in table(status).splitlines() if "10.0.0.6" in line)
    painted = next(line for line in coloured.splitlines() if "10.0.0.6" in line)
    assert painted.replace("\x1b[33m", "").replace("\x1b[0m", "") == plain


def test_json_has_every_field_and_marks_the_unreachable() -> None:
    document = json.loads(render_json([build_status(answers()), Unreachable("127.0.0.1:9902", "no answer within 2s")]))
    web, gone = document["sidecars"]
    assert gone == {"admin": "127.0.0.1:9902", "reachable": False, "error": "no answer within 2s"}
    assert web["reachable"] is True and web["service"] == "web" and web["config_version"] == 3
    assert web["certificate"]["spiffe_id"] == "spiffe://mesh.local/ns/default/dc/dc1/svc/web"
    endpoint = web["clusters"][0]["endpoints"][1]
    assert endpoint == {
        "address": "10.0.0.6:15000",
        "health": "ejected",
        "detail": "by consecutive_failures, ejected 2 times",
        "weight": 1,
        "ewma_ms": 250.0,
        "outstanding": 0,
        "idle_connections": 0,
        "successes": 40,
        "failures": 9,
    }
    assert web["requests"][0]["by_class"] == {"2xx": 150, "4xx": 2, "5xx": 4}
    assert web["routes"][1] == {
        "direction": "outbound",
        "listener": "api",
        "route": "old-path",
        "destination": "",
        "by_class": {"3xx": 1},
        "total": 1,
        "per_second": None,
        "error_rate": None,
    }
    assert web["errors"] == [
        {"direction": "outbound", "upstream": "api", "reason": "connect_refused", "count": 3, "per_second": None}
    ]


# -- the registry -------------------------------------------------------------------------------------------------


def test_registry_entries_advertise_admin_addresses(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(
        "services:\n"
        "  api:\n"
        "    - {address: 127.0.0.1:15001, meta: {admin: 127.0.0.1:9902}}\n"
        "    - 127.0.0.1:15002\n"  # advertises nothing: skipped
        "  web: [{address: 127.0.0.1:15003, meta: {admin: '[::1]:9903', zone: a}}]\n"
    )
    assert registry_admins(str(path)) == [Address("127.0.0.1", 9902), Address("::1", 9903)]


def test_a_malformed_advertised_address_names_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text("services: {api: [{address: 127.0.0.1:15001, meta: {admin: localhost}}]}\n")
    with pytest.raises(ConfigError) as caught:
        registry_admins(str(path))
    assert caught.value.errors == [f"{path}: services.api[0].meta.admin: expected host:port (got 'localhost')"]


# -- wait-ready -----------------------------------------------------------------------------------------------------


class FakeSidecar:
    """Answers /ready from a script of (ready, reason), one per probe, on a clock that only sleeping moves."""

    def __init__(self, *script: tuple[bool, str]) -> None:
        self.script = list(script)
        self.now = 0.0
        self.probes: list[float] = []

    def probe(self, address: Address, timeout: float) -> tuple[bool, str]:
        self.probes.append(self.now)
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run_wait_ready(sidecar: FakeSidecar, timeout: float, interval: float = 0.5) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = wait_ready(
        Address("127.0.0.1", 9901),
        timeout=timeout,
        interval=interval,
        out=out,
        err=err,
        probe=sidecar.probe,
        clock=lambda: sidecar.now,
        sleep=sidecar.sleep,
    )
    return code, out.getvalue(), err.getvalue()


def test_wait_ready_prints_each_new_reason_then_ready() -> None:
    sidecar = FakeSidecar(
        (False, "unreachable: connection refused"),
        (False, "unreachable: connection refused"),
        (False, "starting"),
        (False, "no usable certificate"),
        (True, "ready"),
    )
    assert run_wait_ready(sidecar, timeout=10) == (
        0,
        "ready\n",
        "127.0.0.1:9901: waiting: unreachable: connection refused\n"
        "127.0.0.1:9901: waiting: starting\n"
        "127.0.0.1:9901: waiting: no usable certificate\n",
    )
    assert sidecar.probes == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_wait_ready_gives_up_at_the_timeout_with_the_last_reason() -> None:
    sidecar = FakeSidecar((False, "starting"), (False, "no usable certificate"))
    code, out, err = run_wait_ready(sidecar, timeout=2, interval=0.75)
    assert (code, out) == (1, "")
    assert err.splitlines()[-1] == "127.0.0.1:9901: not ready after 2s: no usable certificate"
    assert sidecar.probes == [0.0, 0.75, 1.5, 2.0]  # the last probe at the deadline itself


# -- the command line -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["status", "--help"], ["sidecar", "wait-ready", "--help"]])
def test_help_explains_with_examples(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: mesh" in out and "\nexamples:\n  mesh " in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "--admin", "localhost"], "argument --admin: expected host:port (got 'localhost')"),
        (["status", "--admin", "127.0.0.1:99999"], "argument --admin: port 99999 out of range"),
        (["status", "--admin", "127.0.0.1:9901", "--timeout", "soon"], "argument --timeout: "),
        (["status", "--admin", "127.0.0.1:9901", "--interval", "0"], "argument --interval: must be above 0"),
        (["sidecar", "wait-ready", "--admin", "127.0.0.1:9901"], "the following arguments are required: --timeout"),
        (["sidecar", "wait-ready", "--admin", "::1:9901", "--timeout", "5"], "put IPv6 addresses in brackets"),
    ],
)
def test_user_mistakes_are_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_status_needs_a_sidecar_to_read(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 2
    assert capsys.readouterr().err == "mesh status: no sidecar to read: give --admin HOST:PORT, or --registry FILE\n"


def test_status_with_a_registry_that_advertises_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text("services: {api: [127.0.0.1:15001]}\n")
    assert main(["status", "--registry", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: no entry advertises an admin address (meta admin: HOST:PORT)",
        "mesh status: no sidecar to read: give --admin HOST:PORT, or --registry FILE",
    ]


def test_status_with_a_missing_registry(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert main(["status", "--registry", str(path)]) == 1
    assert capsys.readouterr().err == f"{path}: cannot read file: No such file or directory\n"


def test_status_command_prints_what_it_read(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[list[Address]] = []

    def fetch_all(addresses: list[Address], timeout: float) -> list[Any]:
        read.append(list(addresses))
        return [answers(), Unreachable(str(addresses[1]), "no answer within 0.5s")]

    monkeypatch.setattr("mesh.status.fetch_all", fetch_all)
    argv = ["status", "--admin", "127.0.0.1:9901", "--admin", "http://127.0.0.1:9902/", "--timeout", "500ms"]
    assert main(argv) == 1
    assert read == [[Address("127.0.0.1", 9901), Address("127.0.0.1", 9902)]]
    out = capsys.readouterr().out
    assert out.startswith("web  admin 127.0.0.1:9901\n") and "\x1b[" not in out
    assert out.endswith("\n\n127.0.0.1:9902  unreachable: no answer within 0.5s\n")
    monkeypatch.setattr("mesh.status.fetch_all", lambda addresses, timeout: [answers()])
    assert main(["status", "--admin", "127.0.0.1:9901", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sidecars"][0]["service"] == "web"


def test_an_endpoint_failing_its_health_check_and_one_on_probation() -> None:
    endpoints = [
        {
            "address": "10.0.0.8:15000",
            "healthy": True,
            "health": "unhealthy (health check)",
            "health_check": "unhealthy",
            "health_check_failures": 3,
        },
        {
            "address": "10.0.0.9:15000",
            "healthy": True,
            "health": "healthy",
            "probation": True,
            "health_check": "unknown",
        },
    ]
    clusters = {"api": {**CLUSTERS["api"], "stale_reason": None, "endpoints": endpoints}}
    api = build_status(answers(clusters=clusters)).clusters[0]
    assert [(e.health, e.detail) for e in api.endpoints] == [
        ("unhealthy", "by health check, 3 failed checks"),
        ("healthy", "on probation after an ejection, not health-checked yet"),
    ]
