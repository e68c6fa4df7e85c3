"""`mesh status` and `mesh sidecar wait-ready`: read sidecars' admin listeners and show what they report."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from mesh.config import Address, ConfigError, load_registry, parse_address

DEFAULT_TIMEOUT = 2.0
"""Seconds each request to an admin listener may take (connect, and each read)."""

ADMIN_META_KEY = "admin"
"""The registry meta key in which a registration advertises its sidecar's admin address ("host:port")."""

_JSON_PATHS = ("/config", "/clusters", "/certs")
_ERROR_CLASS = "5xx"


# -- fetching ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminAnswers:
    """What one admin listener answered: /ready's status and text, the JSON of /config, /clusters and /certs, the
    /metrics text and the monotonic time it was read. A path that did not answer 200 is None, with a line in
    `problems` saying why."""

    admin: str
    ready: tuple[int, str]
    config: dict[str, Any] | None = None
    clusters: dict[str, Any] | None = None
    certs: dict[str, Any] | None = None
    metrics: str | None = None
    metrics_at: float = 0.0
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unreachable:
    """An admin listener that could not be read, and why in plain words."""

    admin: str
    reason: str


class _Failed(Exception):
    """One request to an admin listener failed; the message says why."""


class _AdminConnection:
    """GET requests to one admin listener over one keep-alive connection (reopened if the listener closes it)."""

    def __init__(self, address: Address, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._conn = http.client.HTTPConnection(address.host, address.port, timeout=timeout)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            self._conn.request("GET", path)
            response = self._conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise _Failed(_failure(exc, self.address, self.timeout)) from None

    def close(self) -> None:
        self._conn.close()


def _failure(exc: BaseException, address: Address, timeout: float) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {address.host!r}"
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError):
        return "the connection was closed without an answer (is this an admin listener?)"
    if isinstance(exc, http.client.HTTPException):
        return "not an HTTP answer (is this an admin listener?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def fetch_admin(address: Address, timeout: float = DEFAULT_TIMEOUT) -> AdminAnswers | Unreachable:
    """Read /ready, /config, /clusters, /certs and /metrics from one admin listener. Unreachable if /ready cannot
    be read, or answers anything but 200 or 503 (then it is no mesh admin listener)."""
    admin = str(address)
    conn = _AdminConnection(address, timeout)
    try:
        try:
            status, body = conn.get("/ready")
        except _Failed as exc:
            return Unreachable(admin, str(exc))
        if status not in (200, 503):
            return Unreachable(admin, f"not a mesh admin listener: /ready answered HTTP {status}")
        problems: list[str] = []
        documents: dict[str, dict[str, Any] | None] = {}
        for path in _JSON_PATHS:
            documents[path] = _json_document(conn, path, problems)
        metrics: str | None = None
        try:
            metrics_status, metrics_body = conn.get("/metrics")
            metrics_at = time.monotonic()
            if metrics_status == 200:
                metrics = metrics_body.decode("utf-8", errors="replace")
            else:
                problems.append(f"/metrics: HTTP {metrics_status}")
        except _Failed as exc:
            metrics_at = time.monotonic()
            problems.append(f"/metrics: {exc}")
        return AdminAnswers(
            admin,
            (status, body.decode("utf-8", errors="replace").strip()),
            config=documents["/config"],
            clusters=documents["/clusters"],
            certs=documents["/certs"],
            metrics=metrics,
            metrics_at=metrics_at,
            problems=tuple(problems),
        )
    finally:
        conn.close()


def _json_document(conn: _AdminConnection, path: str, problems: list[str]) -> dict[str, Any] | None:
    try:
        status, body = conn.get(path)
    except _Failed as exc:
        problems.append(f"{path}: {exc}")
        return None
    if status != 200:
        problems.append(f"{path}: HTTP {status}")
        return None
    try:
        document = json.loads(body)
    except ValueError:
        problems.append(f"{path}: the answer is not JSON")
        return None
    if not isinstance(document, dict):
        problems.append(f"{path}: the answer is not a JSON object")
        return None
    return document


def fetch_all(addresses: Sequence[Address], timeout: float = DEFAULT_TIMEOUT) -> list[AdminAnswers | Unreachable]:
    """fetch_admin for each address, all at once (so several silent ones cost one timeout), in the given order."""
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(addresses)))) as pool:
        return list(pool.map(lambda address: fetch_admin(address, timeout), addresses))


def probe_ready(address: Address, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, str]:
    """(ready, reason) from one GET /ready: its text, or why the listener could not be asked."""
    conn = _AdminConnection(address, timeout)
    try:
        status, body = conn.get("/ready")
    except _Failed as exc:
        return False, f"unreachable: {exc}"
    finally:
        conn.close()
    text = body.decode("utf-8", errors="replace").strip()
    if status == 200:
        return True, text or "ready"
    if status == 503:
        return False, text or "not ready"
    return False, f"not a mesh admin listener: /ready answered HTTP {status}"


def registry_admins(path: str) -> list[Address]:
    """The admin addresses that a registry file's entries advertise in meta `admin`, in file order; ConfigError
    (lines naming the file and entry) if the file is unreadable or invalid or an advertised address is malformed."""
    registry = load_registry(path)
    found: list[Address] = []
    errors: list[str] = []
    for service, endpoints in registry.services.items():
        for index, endpoint in enumerate(endpoints):
            advertised = endpoint.meta.get(ADMIN_META_KEY)
            if advertised is None:
                continue
            try:
                found.append(parse_address(advertised))
            except ValueError as exc:
                errors.append(f"{path}: services.{service}[{index}].meta.{ADMIN_META_KEY}: {exc}")
    if errors:
        raise ConfigError(errors)
    return found


# -- the model (sans-io) ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """One endpoint of a cluster: `health` is healthy, ejected or unhealthy; `detail` says why, or what is odd."""

    address: str
    health: str
    detail: str
    weight: int | None
    ewma_ms: float | None
    outstanding: int | None
    idle_connections: int | None
    successes: int | None
    failures: int | None


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """One cluster: where its endpoints come from and how old they are, its circuit breaker, its endpoints."""

    name: str
    resolved: bool
    source: str | None
    age_s: float | None
    stale_reason: str | None
    balancer: str | None
    panic: bool
    connections: int
    pending: int
    requests: int
    overflows: dict[str, int]
    endpoints: list[EndpointStatus]


@dataclass(frozen=True, slots=True)
class CertificateStatus:
    """The sidecar's certificate, or why it has none (`reason`); `problem` is the CA's last error, if any."""

    loaded: bool
    spiffe_id: str | None
    not_after: str | None
    seconds_until_expiry: float | None
    source: str | None
    reason: str | None
    problem: str | None


@dataclass(frozen=True, slots=True)
class RequestCounts:
    """Requests to one upstream by status class (`by_class`: "2xx": 10, ...). `per_second` and `error_rate` (the
    5xx share) are over the interval between two scrapes; None with one scrape or no requests in it."""

    direction: str
    upstream: str
    by_class: dict[str, int]
    total: int
    per_second: float | None = None
    error_rate: float | None = None


@dataclass(frozen=True, slots=True)
class RouteCounts:
    """Requests a route took, by status class, as RequestCounts; `destination` is empty for a route that answers
    itself (direct response, redirect)."""

    direction: str
    listener: str
    route: str
    destination: str
    by_class: dict[str, int]
    total: int
    per_second: float | None = None
    error_rate: float | None = None


@dataclass(frozen=True, slots=True)
class ErrorCount:
    """Errors the mesh made itself for one (direction, upstream, reason code)."""

    direction: str
    upstream: str
    reason: str
    count: int
    per_second: float | None = None


@dataclass(frozen=True, slots=True)
class SidecarStatus:
    """What `mesh status` shows of one reachable sidecar."""

    admin: str
    service: str | None
    ready: bool
    ready_reason: str
    config_version: int | None
    config_loaded_at: float | None
    config_source: str | None
    certificate: CertificateStatus | None
    clusters: list[ClusterStatus]
    requests: list[RequestCounts]
    routes: list[RouteCounts]
    errors: list[ErrorCount]
    interval_s: float | None
    problems: list[str]


def build_status(answers: AdminAnswers, before: AdminAnswers | None = None) -> SidecarStatus:
    """The status of one sidecar from its answers; with `before` (an earlier scrape of the same sidecar), request
    and error rates over the time between the two /metrics reads."""
    config = answers.config or {}
    loaded = config.get("loaded") if isinstance(config.get("loaded"), dict) else {}
    service = config.get("service") if isinstance(config.get("service"), dict) else {}
    ready_status, ready_text = answers.ready
    now_counts = parse_metrics(answers.metrics or "")
    interval: float | None = None
    earlier: _Counts | None = None
    if before is not None and before.metrics is not None and answers.metrics is not None:
        if answers.metrics_at > before.metrics_at:
            interval = answers.metrics_at - before.metrics_at
            earlier = parse_metrics(before.metrics)
    requests, routes, errors = _traffic(now_counts, earlier, interval)
    return SidecarStatus(
        admin=answers.admin,
        service=service.get("name"),
        ready=ready_status == 200,
        ready_reason=ready_text or ("ready" if ready_status == 200 else f"HTTP {ready_status}"),
        config_version=loaded.get("version"),
        config_loaded_at=loaded.get("loaded_at"),
        config_source=loaded.get("source"),
        certificate=_certificate(answers.certs) if answers.certs is not None else None,
        clusters=[_cluster(name, state) for name, state in sorted((answers.clusters or {}).items())],
        requests=requests,
        routes=routes,
        errors=errors,
        interval_s=interval,
        problems=list(answers.problems),
    )


def _certificate(certs: dict[str, Any]) -> CertificateStatus:
    loaded = bool(certs.get("loaded"))
    reason = certs.get("reason")
    if not loaded and reason is None:
        reason = "no certificate loaded yet"
    return CertificateStatus(
        loaded=loaded,
        spiffe_id=certs.get("spiffe_id"),
        not_after=certs.get("not_after"),
        seconds_until_expiry=certs.get("seconds_until_expiry"),
        source=certs.get("source"),
        reason=reason,
        problem=certs.get("last_error"),
    )


def _cluster(name: str, state: dict[str, Any]) -> ClusterStatus:
    circuit = state.get("circuit") or {}
    return ClusterStatus(
        name=name,
        resolved=bool(state.get("resolved")),
        source=state.get("source"),
        age_s=state.get("age_s"),
        stale_reason=state.get("stale_reason"),
        balancer=state.get("balancer"),
        panic=bool(state.get("panic")),
        connections=int(circuit.get("connections", 0)),
        pending=int(circuit.get("pending", 0)),
        requests=int(circuit.get("requests", 0)),
        overflows={limit: int(count) for limit, count in sorted((circuit.get("overflows") or {}).items())},
        endpoints=[_endpoint(e) for e in state.get("endpoints") or ()],
    )


def _endpoint(state: dict[str, Any]) -> EndpointStatus:
    """Health in one word, and the detail: which rule keeps the endpoint out, or what is notable while it is in."""
    health_text = str(state.get("health", "healthy" if state.get("healthy", True) else "unhealthy (discovery)"))
    word, _, why = health_text.partition(" (")
    why = why.rstrip(")")
    details: list[str] = []
    if word == "ejected":
        times = state.get("times_ejected") or 1
        details.append(f"by {state.get('ejected_by') or why}, ejected {times} time{'s' if times != 1 else ''}")
    elif word == "unhealthy":
        if why:
            details.append(f"by {why}")
        if state.get("health_check") == "unhealthy" and (failed := state.get("health_check_failures")):
            details.append(f"{failed} failed check{'s' if failed != 1 else ''}")
    else:
        if state.get("probation"):
            details.append("on probation after an ejection")
        if consecutive := state.get("consecutive_failures"):
            details.append(f"{consecutive} consecutive failure{'s' if consecutive != 1 else ''}")
        if state.get("health_check") == "unknown":
            details.append("not health-checked yet")
    return EndpointStatus(
        address=str(state.get("address", "?")),
        health=word,
        detail=", ".join(details),
        weight=state.get("weight"),
        ewma_ms=state.get("ewma_ms"),
        outstanding=state.get("outstanding"),
        idle_connections=state.get("idle_connections"),
        successes=state.get("successes"),
        failures=state.get("failures"),
    )


@dataclass(frozen=True, slots=True)
class _Counts:
    requests: dict[tuple[str, str, str], float]  # (direction, upstream, code_class)
    routes: dict[tuple[str, str, str, str, str], float]  # (direction, listener, route, destination, code_class)
    errors: dict[tuple[str, str, str], float]  # (direction, upstream, reason)


def parse_metrics(text: str) -> _Counts:
    """The counters `mesh status` shows, from a Prometheus text exposition."""
    requests: dict[tuple[str, str, str], float] = {}
    routes: dict[tuple[str, str, str, str, str], float] = {}
    errors: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "mesh_requests_total":
                requests[(labels["direction"], labels["upstream"], labels["code_class"])] = sample.value
            elif sample.name == "mesh_route_requests_total":
                key = (labels["direction"], labels["listener"], labels["route"], labels["destination"])
                routes[(*key, labels["code_class"])] = sample.value
            elif sample.name == "mesh_errors_total":
                errors[(labels["direction"], labels["upstream"], labels["reason"])] = sample.value
    return _Counts(requests, routes, errors)


def _traffic(
    now: _Counts, earlier: _Counts | None, interval: float | None
) -> tuple[list[RequestCounts], list[RouteCounts], list[ErrorCount]]:
    requests = _grouped(now.requests, earlier.requests if earlier else None, interval)
    routes = _grouped(now.routes, earlier.routes if earlier else None, interval)
    errors = [
        ErrorCount(
            direction,
            upstream,
            reason,
            int(count),
            _rate(count, earlier.errors.get((direction, upstream, reason), 0.0), interval) if earlier else None,
        )
        for (direction, upstream, reason), count in sorted(now.errors.items())
        if count
    ]
    return (
        [RequestCounts(key[0], key[1], *rest) for key, rest in requests],
        [RouteCounts(*key, *rest) for key, rest in routes],
        errors,
    )


def _grouped(
    now: dict[Any, float], earlier: dict[Any, float] | None, interval: float | None
) -> list[tuple[tuple[str, ...], tuple[dict[str, int], int, float | None, float | None]]]:
    """Counters keyed (..., code_class) grouped by the rest of the key: (by_class, total, per_second, error_rate)."""
    groups: dict[tuple[str, ...], dict[str, float]] = {}
    for (*key, code_class), count in now.items():
        groups.setdefault(tuple(key), {})[code_class] = count
    rows = []
    for key, classes in sorted(groups.items()):
        total = sum(classes.values())
        per_second = error_rate = None
        if earlier is not None and interval:
            before = {c: earlier.get((*key, c), 0.0) for c in classes}
            delta = {c: _delta(classes[c], before[c]) for c in classes}
            window = sum(delta.values())
            per_second = window / interval
            error_rate = delta.get(_ERROR_CLASS, 0.0) / window if window else None
        rows.append((key, ({c: int(n) for c, n in sorted(classes.items())}, int(total), per_second, error_rate)))
    return rows


def _delta(now: float, before: float) -> float:
    """A counter's increase; a counter that went down was reset (the sidecar restarted): all of it is new."""
    return now - before if now >= before else now


def _rate(now: float, before: float, interval: float | None) -> float | None:
    return _delta(now, before) / interval if interval else None


# -- rendering (sans-io) ------------------------------------------------------------------------------------------

_SGR = {"good": "32", "warn": "33", "bad": "31", "bold": "1"}

Cell = str | tuple[str, str]
"""A table cell: its text, or (text, style) with a style from _SGR ("" for none)."""


def render_json(statuses: Sequence[SidecarStatus | Unreachable]) -> str:
    """`mesh status --json`: {"sidecars": [...]}, each with `reachable`; an unreachable one has only `admin` and
    `error`."""
    sidecars: list[dict[str, Any]] = []
    for status in statuses:
        if isinstance(status, Unreachable):
            sidecars.append({"admin": status.admin, "reachable": False, "error": status.reason})
        else:
            sidecars.append({"reachable": True, **asdict(status)})
    return json.dumps({"sidecars": sidecars}, indent=2) + "\n"


def render_table(statuses: Sequence[SidecarStatus | Unreachable], *, now: float, colour: bool = False) -> str:
    """`mesh status` for people: one block per sidecar, one line for each that could not be reached. `now` (unix
    time) dates the config's age; `colour` adds ANSI colours (for a terminal)."""
    blocks = [_unreachable_line(s, colour) if isinstance(s, Unreachable) else _block(s, now, colour) for s in statuses]
    return "\n\n".join(blocks) + "\n"


def _paint(text: str, style: str, colour: bool) -> str:
    return f"\x1b[{_SGR[style]}m{text}\x1b[0m" if colour and style and text else text


def _unreachable_line(status: Unreachable, colour: bool) -> str:
    return f"{status.admin}  {_paint('unreachable', 'bad', colour)}: {status.reason}"


def _block(status: SidecarStatus, now: float, colour: bool) -> str:
    lines = [f"{_paint(status.service or '(unknown service)', 'bold', colour)}  admin {status.admin}"]
    ready = _paint("yes", "good", colour) if status.ready else f"{_paint('no', 'bad', colour)}: {status.ready_reason}"
    lines.append(f"  ready        {ready}")
    lines.append(f"  config       {_config_line(status, now)}")
    lines.append(f"  certificate  {_certificate_line(status.certificate, colour)}")
    for problem in status.problems:
        lines.append(f"  {_paint('problem', 'warn', colour)}      {problem}")
    if status.clusters:
        lines.append("")
        lines.extend(_table(_CLUSTER_HEADER, [_cluster_row(c) for c in status.clusters], colour))
        lines.extend(_discovery_notes(status.clusters, colour))
        endpoint_rows = [row for c in status.clusters for row in _endpoint_rows(c)]
        if endpoint_rows:
            lines.append("")
            lines.extend(_table(_ENDPOINT_HEADER, endpoint_rows, colour))
    lines.append("")
    lines.extend(_traffic_lines(status, colour))
    return "\n".join(lines)


def _config_line(status: SidecarStatus, now: float) -> str:
    if status.config_version is None:
        return "unknown"
    text = f"version {status.config_version}"
    if status.config_loaded_at is not None:
        loaded = datetime.fromtimestamp(status.config_loaded_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        text += f", loaded {loaded} ({_duration(now - status.config_loaded_at)} ago)"
    if status.config_source:
        text += f" from {status.config_source}"
    return text


def _certificate_line(cert: CertificateStatus | None, colour: bool) -> str:
    if cert is None:
        return "unknown"
    if not cert.loaded:
        configured = not (cert.reason or "").startswith("no identity configured")
        text = f"{_paint('none', 'bad' if configured else '', colour)}: {cert.reason}"
    else:
        left = cert.seconds_until_expiry
        expiry = _timestamp(cert.not_after) if cert.not_after else "?"
        if left is None:
            when, style = "", ""
        elif left < 0:
            when, style = f" (expired {_duration(-left)} ago)", "bad"
        else:
            when, style = f" (in {_duration(left)})", "warn" if left < 3600 else "good"
        text = f"{cert.spiffe_id or '?'}, expires {_paint(expiry + when, style, colour)}"
        if cert.source:
            text += f", from {cert.source}"
    if cert.problem:
        text += f"; last error: {cert.problem}"
    return text


_CLUSTER_HEADER = ["CLUSTER", "SOURCE", "AGE", "ENDPOINTS", "CONNS", "PENDING", "ACTIVE", "OVERFLOWS", "STALE"]
_ENDPOINT_HEADER = ["CLUSTER", "ENDPOINT", "HEALTH", "EWMA", "ACTIVE", "IDLE", "OK", "FAILED", "DETAIL"]
_HEALTH_STYLE = {"healthy": "good", "ejected": "warn", "unhealthy": "bad"}


def _cluster_row(cluster: ClusterStatus) -> list[Cell]:
    healthy = sum(e.health == "healthy" for e in cluster.endpoints)
    total = len(cluster.endpoints)
    if not cluster.resolved:
        endpoints: Cell = ("unresolved", "bad")
    else:
        style = "good" if healthy == total and total else "warn" if healthy else "bad"
        endpoints = (f"{healthy}/{total} healthy" + (", panic" if cluster.panic else ""), style)
    overflows = ", ".join(f"{limit}={count}" for limit, count in cluster.overflows.items() if count)
    return [
        cluster.name,
        _source(cluster.source),
        _duration(cluster.age_s) if cluster.age_s is not None else "-",
        endpoints,
        str(cluster.connections),
        str(cluster.pending),
        str(cluster.requests),
        (overflows, "warn") if overflows else "0",
        ("yes", "warn") if cluster.resolved and cluster.stale_reason else "-",
    ]


def _discovery_notes(clusters: Sequence[ClusterStatus], colour: bool) -> list[str]:
    """One line per reason discovery gave, naming the clusters it concerns: why their endpoints may be old, or
    (unresolved) why they have none."""
    notes: dict[tuple[str, str], list[str]] = {}
    for cluster in clusters:
        if cluster.stale_reason:
            what = "stale" if cluster.resolved else "unresolved"
            notes.setdefault((what, cluster.stale_reason), []).append(cluster.name)
    return [
        f"  {_paint(what, 'warn' if what == 'stale' else 'bad', colour)} {', '.join(names)}: {reason}"
        for (what, reason), names in notes.items()
    ]


def _source(source: str | None) -> str:
    """Where a cluster's endpoints come from; a registry file by its name alone (/clusters has its path)."""
    if source is None:
        return "-"
    if source.startswith("file:"):
        return "file:" + source.removeprefix("file:").rsplit("/", 1)[-1]
    return source


def _endpoint_rows(cluster: ClusterStatus) -> list[list[Cell]]:
    rows: list[list[Cell]] = []
    for index, e in enumerate(cluster.endpoints):
        rows.append(
            [
                cluster.name if index == 0 else "",
                e.address,
                (e.health, _HEALTH_STYLE.get(e.health, "")),
                f"{e.ewma_ms:.1f}ms" if e.ewma_ms is not None else "-",
                _number(e.outstanding),
                _number(e.idle_connections),
                _number(e.successes),
                _number(e.failures),
                e.detail,
            ]
        )
    return rows


def _traffic_lines(status: SidecarStatus, colour: bool) -> list[str]:
    rates = status.interval_s is not None
    heading = "traffic: totals since start"
    if status.interval_s is not None:
        heading += f"; rates over the last {status.interval_s:.1f}s"
    lines = [f"  {heading}"]
    if not status.requests and not status.routes and not status.errors:
        return [*lines, "  no requests yet"]
    rate_header = ["REQ/S", "5XX %"] if rates else []
    if status.requests:
        classes = _classes(status.requests)
        header = ["DIRECTION", "UPSTREAM", *classes, "TOTAL", *rate_header]
        rows = [[r.direction, r.upstream, *_count_cells(r, classes, rates)] for r in status.requests]
        lines.extend(_table(header, rows, colour))
    if status.routes:
        classes = _classes(status.routes)
        header = ["LISTENER", "ROUTE", "DESTINATION", *classes, "TOTAL", *rate_header]
        rows = [[r.listener, r.route, r.destination or "-", *_count_cells(r, classes, rates)] for r in status.routes]
        lines.append("")
        lines.extend(_table(header, rows, colour))
    if status.errors:
        header = ["DIRECTION", "UPSTREAM", "MESH ERROR", "COUNT", *(["PER S"] if rates else [])]
        rows = [
            [e.direction, e.upstream, (e.reason, "warn"), str(e.count), *([_per_second(e.per_second)] if rates else [])]
            for e in status.errors
        ]
        lines.append("")
        lines.extend(_table(header, rows, colour))
    return lines


def _classes(rows: Iterable[RequestCounts | RouteCounts]) -> list[str]:
    """The status classes to show: 2xx to 5xx always, and any other class a row has (1xx, 0xx: no response)."""
    return sorted({"2xx", "3xx", "4xx", "5xx"}.union(*(r.by_class for r in rows)))


def _count_cells(row: RequestCounts | RouteCounts, classes: list[str], rates: bool) -> list[Cell]:
    """A row's count per status class (5xx in red when not 0), its total, and with `rates` its req/s and 5xx %."""
    cells: list[Cell] = []
    for code_class in classes:
        count = row.by_class.get(code_class, 0)
        cells.append((str(count), "bad") if code_class == _ERROR_CLASS and count else str(count))
    cells.append(str(row.total))
    if rates:
        cells.append(_per_second(row.per_second))
        if row.error_rate is None:
            cells.append("-")
        else:
            cells.append((f"{row.error_rate * 100:.1f}", "bad" if row.error_rate else ""))
    return cells


def _per_second(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Cell]], colour: bool) -> list[str]:
    """Left-aligned columns two spaces apart, indented by two; only the text counts towards widths."""
    cells = [[(h, "bold") for h in header], *([(c, "") if isinstance(c, str) else c for c in row] for row in rows)]
    widths = [max(len(row[i][0]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [_paint(text, style, colour) + " " * (widths[i] - len(text)) for i, (text, style) in enumerate(row)]
        lines.append(("  " + "  ".join(parts)).rstrip())
    return lines


def _duration(seconds: float) -> str:
    """A short human duration: 0.4s, 12s, 3m 05s, 2h 10m, 4d 3h."""
    if seconds < 10:
        return f"{max(seconds, 0.0):.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600}h"


def _timestamp(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return iso


# -- the commands -------------------------------------------------------------------------------------------------


def show_status(
    addresses: Sequence[Address],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    interval: float | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """`mesh status`: read every sidecar (twice, `interval` seconds apart, for rates), print their status on `out`;
    1 if any could not be reached, else 0. `out` and `err` default to sys.stdout and sys.stderr."""
    out, err = out or sys.stdout, err or sys.stderr
    answers = fetch_all(addresses, timeout)
    before: list[AdminAnswers | Unreachable | None] = [None] * len(answers)
    if interval:
        if err.isatty():
            print(f"measuring rates over {interval:g}s ...", file=err)
        time.sleep(interval)
        before, answers = list(answers), fetch_all(addresses, timeout)
    statuses: list[SidecarStatus | Unreachable] = []
    for now_answers, earlier in zip(answers, before, strict=True):
        if isinstance(now_answers, Unreachable):
            statuses.append(now_answers)
        else:
            statuses.append(build_status(now_answers, earlier if isinstance(earlier, AdminAnswers) else None))
    if as_json:
        out.write(render_json(statuses))
    else:
        colour = out.isatty() and "NO_COLOR" not in os.environ
        out.write(render_table(statuses, now=time.time(), colour=colour))
    return 1 if any(isinstance(s, Unreachable) for s in statuses) else 0


def wait_ready(
    address: Address,
    *,
    timeout: float,
    interval: float = 0.5,
    out: TextIO | None = None,
    err: TextIO | None = None,
    probe: Callable[[Address, float], tuple[bool, str]] = probe_ready,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """`mesh sidecar wait-ready`: poll /ready every `interval` until it answers 200 (print `ready` on `out`, 0) or
    `timeout` passes (print the last reason on `err`, 1). Each new reason is printed on `err` as it appears.
    `out` and `err` default to sys.stdout and sys.stderr."""
    out, err = out or sys.stdout, err or sys.stderr
    deadline = clock() + timeout
    last = None
    while True:
        ready, reason = probe(address, max(0.1, min(DEFAULT_TIMEOUT, deadline - clock())))
        if ready:
            print("ready", file=out)
            return 0
        remaining = deadline - clock()
        if remaining <= 0:
            print(f"{address}: not ready after {timeout:g}s: {reason}", file=err)
            return 1
        if reason != last:
            print(f"{address}: waiting: {reason}", file=err)
            last = reason
        sleep(min(interval, remaining))
