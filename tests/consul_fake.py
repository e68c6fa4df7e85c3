"""A stateful fake Consul agent that speaks Consul's documented HTTP API, for tests (no Consul binary can run here).

It models one `consul agent -dev` (server and client in one process, one node, no data dir): sidecar processes talk to
it over real HTTP/1.1 on 127.0.0.1 (HTTPS when given `tls=`), and tests steer it through the Python API or
`PUT /_fake/...`.

Covered (Consul's field names and casing; error statuses and bodies follow Consul's):
- `PUT /v1/agent/service/register` (PascalCase or snake_case keys, matched case-insensitively as Consul does; `Check`,
  `Checks`, `Kind: connect-proxy` + `Proxy`, `Weights`, `?replace-existing-checks`), `.../deregister/<id>`,
  `GET /v1/agent/services`, `/v1/agent/service/<id>`, `/v1/agent/checks`, `/v1/agent/self`;
- `PUT /v1/agent/check/register|deregister/<id>|pass|warn|fail/<id>|update/<id>`: updating an unknown check answers
  404 `Unknown check ID "x". ...`, a known non-TTL check 500 `CheckID "x" does not have associated TTL` (current
  Consul; older agents answered 500 for both);
- checks start `critical` unless `Status` is given; TTL expiry ("TTL expired"); alias checks (worst status of the
  aliased service's checks, "Service x could not be found on node y" when it is missing); the node's `serfHealth`;
  `DeregisterCriticalServiceAfter` (never below one minute, as Consul; `min_deregister_critical` lowers it);
- `GET /v1/health/service/<name>` and `/v1/health/connect/<name>` (`passing` parsed like Go's ParseBool, only
  `passing` passes; repeatable `tag`, all must match, case-insensitively as Consul's tag filter; `dc`: another
  datacenter answers 500 "No path to datacenter"), `GET /v1/catalog/services`, `GET/PUT/DELETE /v1/kv/<key>`
  (`raw`, `recurse`, `keys`, `separator`, `cas`, `flags`), `/v1/status/leader|peers`;
- blocking queries (`index` + `wait`, default 5m, max 10m, plus up to wait/16 jitter): a query returns once the result
  of *that* endpoint changed after `index` (Consul's per-service index); `X-Consul-Index` (never below 1),
  `X-Consul-KnownLeader`, `X-Consul-LastContact`; the Raft-like index only ever grows;
- ACLs as a single token: a missing token answers 403 "Permission denied", a wrong one 403 "ACL not found".

Deliberately simplified:
- HTTP/TCP/gRPC/script checks are stored but never run: they keep their initial status until `set_check_status()`;
- registrations are visible in the catalog at once (a real agent syncs within milliseconds); TTL expiry and the
  critical-service reaper act exactly on time (Consul's reaper runs every 30 s); re-registering a check resets its
  status, as a dev agent does (an agent with a data dir may restore a persisted TTL status);
- the index of a blocking endpoint is the global index at which its result was first seen changed, not the exact
  Raft index of the write; unknown query parameters (`filter`, `near`, `stale`, `cached`, `hash`...) are ignored;
- ACLs are all-or-nothing (a real agent filters lists instead of refusing them); `/v1/status/*` needs no token;
- KV sessions/locks, namespaces, partitions, peering, the `consul` service itself and the connect CA are absent, and
  `Connect.SidecarService` is ignored (register the proxy explicitly);
- `restart()` models a dev agent restart: services, checks and KV are lost, open connections are cut, the index
  keeps growing; `advance()` moves the fake clock (TTL, reaper, blocking `wait`: a wait ends on whichever of the fake
  and the real clock reaches it first); request bodies need a Content-Length (no chunked uploads).

Faults (`fake.fault = ...` or `PUT /_fake/fault?mode=...`): "refuse" closes the listener and cuts connections (None
re-binds the same port), "500" answers every API call 500, "hang" accepts and never answers until cleared (or 10
minutes, then the connection is cut), "index_backwards" makes X-Consul-Index restart near 1 as after a Raft reset
(data unchanged; a stale higher `index` then blocks for the whole `wait`, as on a real server), "empty" makes health
endpoints answer [] with a higher index. Other controls over HTTP (for a test driving a separate process):
`PUT /_fake/advance?seconds=`, `/_fake/restart`, `/_fake/node_check?status=&output=`, `/_fake/check/<id>?status=`,
`GET /_fake/state`; they bypass ACLs and faults other than "refuse". `fake.requests` logs every API request as
(method, path, query). Run standalone: `python -m tests.consul_fake --port 8500` (prints its address).
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import random
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATUSES = (PASSING, WARNING, CRITICAL)
FAULTS = (None, "refuse", "500", "hang", "index_backwards", "empty")
_NO_LEADER = "rpc error making call: No cluster leader"
DEFAULT_WAIT, MAX_WAIT, HANG_LIMIT = 300.0, 600.0, 600.0
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_TRUE, _FALSE = {"1", "t", "T", "TRUE", "true", "True"}, {"0", "f", "F", "FALSE", "false", "False"}
_JSON = {"Content-Type": "application/json"}
_CHECK_KINDS = ("http", "tcp", "grpc", "h2ping", "udp", "args", "scriptargs", "dockercontainerid", "osservice")


def parse_duration(value: Any) -> float:
    """Seconds from a Go duration ("10s", "1m30s", "250ms"); a bare JSON number is nanoseconds, as in Go."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value / 1e9
    text = str(value).strip()
    sign, text = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    if text == "0":
        return 0.0
    total, pos = 0.0, 0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total, pos = total + float(match.group(1)) * _UNITS[match.group(2)], match.end()
    if not text or pos != len(text):
        raise ValueError(f"time: invalid duration {value!r}")
    return sign * total


class _Drop(Exception):
    """Close the connection without answering."""


class HTTPError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


class Request(NamedTuple):
    method: str
    path: str
    query: dict[str, list[str]]


class RequestLog:
    """A thread-safe log of the API requests the fake received (control requests under /_fake/ excluded)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Request] = []

    def append(self, item: Request) -> None:
        with self._lock:
            self._items.append(item)

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def count(self, path_prefix: str = "", method: str | None = None, blocking: bool | None = None) -> int:
        """How many requests match; `blocking=True` counts only those with a nonzero `index` query parameter."""
        return sum(
            1
            for r in self.snapshot()
            if r.path.startswith(path_prefix)
            and (method is None or r.method == method)
            and (blocking is None or blocking == (r.query.get("index", ["0"])[0] not in ("", "0")))
        )

    def __iter__(self) -> Iterator[Request]:
        return iter(self.snapshot())

    def __len__(self) -> int:
        return len(self.snapshot())

    def __getitem__(self, i: int) -> Request:
        return self.snapshot()[i]


@dataclass
class _Service:
    id: str
    name: str
    kind: str
    tags: list[str]
    meta: dict[str, str] | None
    address: str
    port: int
    weights: dict[str, int]
    proxy: dict[str, Any] | None
    connect: dict[str, Any] | None
    enable_tag_override: bool
    create_index: int = 0
    modify_index: int = 0


@dataclass
class _Check:
    id: str
    name: str
    status: str
    service_id: str = ""
    notes: str = ""
    output: str = ""
    type: str = ""
    ttl: float | None = None
    interval: str = ""
    timeout: str = ""
    deregister_after: float | None = None
    alias_service: str = ""
    alias_node: str = ""
    definition: dict[str, Any] = field(default_factory=dict)
    ttl_deadline: float | None = None
    critical_since: float | None = None
    create_index: int = 0
    modify_index: int = 0


def _serf_health() -> _Check:
    serf = _Check("serfHealth", "Serf Health Status", PASSING, output="Agent alive and reachable")
    serf.create_index = serf.modify_index = 5
    return serf


def _norm(raw: Any, what: str) -> dict[str, Any]:
    """Consul decodes keys case-insensitively and accepts snake_case aliases: `check_id`, `CheckID`, `checkid`."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise HTTPError(400, f"Request decode failed: {what} must be an object")
    return {str(k).replace("_", "").lower(): v for k, v in raw.items()}


def _bare(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("CreateIndex", "ModifyIndex")}


def _duration(value: Any, name: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise HTTPError(400, f"Request decode failed: {name}: {exc}") from None


def _go_bool(query: dict[str, list[str]], name: str) -> bool:
    if name not in query:
        return False
    value = query[name][0]
    if value == "" or value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise HTTPError(400, f"Invalid value for ?{name}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeConsul
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is not None:  # the handshake runs in the connection's thread, on its first read
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:  # a client that went away is not news
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeConsul"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.fake._serve(self)

    do_PUT = do_POST = do_DELETE = do_GET


class FakeConsul:
    """One fake Consul agent node; see the module docstring. Thread-safe; all state sits behind one Condition."""

    def __init__(
        self,
        node: str = "node1",
        address: str = "127.0.0.1",
        datacenter: str = "dc1",
        acl_token: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_deregister_critical: float = 60.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.node, self.node_address, self.datacenter, self.acl_token = node, address, datacenter, acl_token
        self.min_deregister_critical = min_deregister_critical
        self.tls = tls  # a server context: the agent then speaks HTTPS (as with Consul's `ports.https`)
        self.requests = RequestLog()
        self._clock, self._offset = clock, 0.0
        self._cond = threading.Condition()
        self._index = 10  # a fresh agent has done a few Raft writes already
        self._node_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node}.{datacenter}.fake-consul"))
        self._services: dict[str, _Service] = {}
        self._checks: dict[str, _Check] = {}
        self._kv: dict[str, dict[str, Any]] = {}
        self._views: dict[tuple[str, ...], tuple[Any, int]] = {}
        self._serf = _serf_health()
        self._fault: str | None = None
        self._index_offset = 0
        self._epoch = 0  # bumped whenever open connections must die (refuse, restart, stop)
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._port = 0
        self._stopped = threading.Event()
        self._reaper: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------------

    def start(self, port: int = 0) -> FakeConsul:
        self._stopped.clear()
        self._listen(port)
        self._reaper = threading.Thread(target=self._reap_loop, name="fake-consul-reaper", daemon=True)
        self._reaper.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._cut_connections()
        self._unlisten()
        if self._reaper is not None:
            self._reaper.join(timeout=5)

    def __enter__(self) -> FakeConsul:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    @property
    def index(self) -> int:
        """The real (never decreasing) index, whatever the faults report."""
        with self._cond:
            return self._index

    # ---- test controls ---------------------------------------------------------------------------------------------

    @property
    def fault(self) -> str | None:
        return self._fault

    @fault.setter
    def fault(self, mode: str | None) -> None:
        self._set_fault(mode)

    def advance(self, seconds: float) -> None:
        """Move the fake clock: TTLs expire, critical services are reaped, blocked queries re-evaluate."""
        with self._cond:
            self._offset += seconds
            self._settle()
            self._cond.notify_all()

    def restart(self, _keep: socket.socket | None = None) -> None:
        """The agent restarted without persisted state: services, checks and KV are gone; the index keeps growing."""
        with self._cond:
            self._services.clear()
            self._checks.clear()
            self._kv.clear()
            self._serf = _serf_health()
            self._write()
        self._cut_connections(_keep)

    def set_node_check(self, status: str, output: str = "") -> None:
        """Set the node's serfHealth check (critical: no service on this node passes)."""
        self._set_check(self._serf, status, output)

    def set_check_status(self, check_id: str, status: str, output: str = "") -> None:
        """Set any agent check's status (the only way HTTP/TCP checks ever change); KeyError if unknown."""
        with self._cond:
            check = self._checks[check_id]
        self._set_check(check, status, output)

    def _set_check(self, check: _Check, status: str, output: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        with self._cond:
            self._set_status(check, status, output)
            self._settle()

    def _set_fault(self, mode: str | None, keep: socket.socket | None = None) -> None:
        if mode not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        with self._cond:
            old, self._fault = self._fault, mode
            self._index_offset = self._index - 1 if mode == "index_backwards" else 0
            if "empty" in (old, mode) and old != mode:
                self._write()
            self._cond.notify_all()
        if mode == "refuse" and old != "refuse":
            self._cut_connections(keep)
            self._unlisten()
        elif old == "refuse" and mode != "refuse" and not self._stopped.is_set():
            self._listen(self._port)

    # ---- state machinery (call with self._cond held) ---------------------------------------------------------------

    def _now(self) -> float:
        return self._clock() + self._offset

    def _write(self) -> int:
        self._index += 1
        self._cond.notify_all()
        return self._index

    def _report(self, index: int) -> int:
        return max(1, index - self._index_offset)

    def _set_status(self, check: _Check, status: str, output: str, at: float | None = None) -> bool:
        if check.status == status and check.output == output:
            return False
        if status == CRITICAL and check.status != CRITICAL:
            check.critical_since = self._now() if at is None else at
        elif status != CRITICAL:
            check.critical_since = None
        check.status, check.output = status, output
        check.modify_index = self._write()
        return True

    def _settle(self) -> None:
        """Apply everything time or other checks imply: TTL expiry, alias checks, the critical-service reaper."""
        now = self._now()
        for _ in range(16):
            changed = False
            for check in list(self._checks.values()):
                deadline = check.ttl_deadline
                if deadline is not None and now >= deadline:
                    check.ttl_deadline = None
                    last = check.output
                    out = f"TTL expired (last output before timeout follows): {last}" if last else "TTL expired"
                    changed |= self._set_status(check, CRITICAL, out, at=deadline)
            for check in list(self._checks.values()):
                if check.type == "alias":
                    changed |= self._set_status(check, *self._alias_status(check))
            for check in list(self._checks.values()):
                after = check.deregister_after
                if after is None or check.critical_since is None or check.service_id not in self._services:
                    continue
                if now - check.critical_since >= max(after, self.min_deregister_critical):
                    self._remove_service(check.service_id)
                    changed = True
            if not changed:
                return

    def _alias_status(self, alias: _Check) -> tuple[str, str]:
        # Consul's CheckAlias.processChecks: the aliased service's checks and the node's checks, worst status wins.
        if alias.alias_node and alias.alias_node != self.node:
            if alias.alias_service:
                return CRITICAL, f"Service {alias.alias_service} could not be found on node {alias.alias_node}"
            return PASSING, "No checks found."
        checks = [c for c in self._checks.values() if c is not alias and c.service_id in ("", alias.alias_service)]
        if alias.alias_node:
            checks.insert(0, self._serf)
        health, message, found = PASSING, "No checks found.", False
        for check in checks:
            found |= bool(check.service_id)
            if check.status in (WARNING, CRITICAL):
                health, message = check.status, f'Aliased check "{check.name}" failing: {check.output}'
                if check.status == CRITICAL:
                    break
            elif health == PASSING:
                message = "All checks passing."
        if alias.alias_service and not found and alias.alias_service not in self._services:
            return CRITICAL, f"Service {alias.alias_service} could not be found on node {alias.alias_node}"
        return health, message

    def _remove_service(self, service_id: str) -> None:
        del self._services[service_id]
        for check_id in [c.id for c in self._checks.values() if c.service_id == service_id]:
            del self._checks[check_id]
        self._write()

    def _view(self, key: tuple[str, ...], compute: Callable[[], Any]) -> tuple[int, Any]:
        """(index, value) of one endpoint's result: the index moves only when the result changed."""
        value = compute()
        seen = self._views.get(key)
        if seen is None or seen[0] != value:
            self._views[key] = (value, self._index)
            return self._index, value
        return seen[1], value

    # ---- JSON shapes -----------------------------------------------------------------------------------------------

    def _node_json(self) -> dict[str, Any]:
        a = self.node_address
        return {
            "ID": self._node_id,
            "Node": self.node,
            "Address": a,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": a, "lan_ipv4": a, "wan": a, "wan_ipv4": a},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": 5,
            "ModifyIndex": 5,
        }

    def _service_json(self, s: _Service, agent: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"Kind": s.kind} if s.kind else {}
        out |= {"ID": s.id, "Service": s.name, "Tags": list(s.tags), "Address": s.address, "Port": s.port}
        out |= {"Meta": dict(s.meta) if s.meta else ({} if agent else None), "Weights": dict(s.weights)}
        out["EnableTagOverride"] = s.enable_tag_override
        if agent:
            out["Datacenter"] = self.datacenter
            out |= {"Proxy": s.proxy} if s.proxy else {}
            out |= {"Connect": s.connect} if s.connect else {}
        else:
            out["Proxy"] = s.proxy or {"MeshGateway": {}, "Expose": {}}
            out["Connect"] = s.connect or {}
        return out | {"CreateIndex": s.create_index, "ModifyIndex": s.modify_index}

    def _check_json(self, c: _Check) -> dict[str, Any]:
        service = self._services.get(c.service_id)
        return {
            "Node": self.node,
            "CheckID": c.id,
            "Name": c.name,
            "Status": c.status,
            "Notes": c.notes,
            "Output": c.output,
            "ServiceID": c.service_id,
            "ServiceName": service.name if service else "",
            "ServiceTags": list(service.tags) if service else [],
            "Type": c.type,
            "Interval": c.interval,
            "Timeout": c.timeout,
            "ExposedPort": 0,
            "Definition": dict(c.definition),
            "CreateIndex": c.create_index,
            "ModifyIndex": c.modify_index,
        }

    def _health(self, name: str, connect: bool) -> list[dict[str, Any]]:
        if self._fault == "empty":
            return []
        node_checks = [self._serf] + [c for c in self._checks.values() if not c.service_id]
        entries = []
        for s in sorted(self._services.values(), key=lambda s: s.id):
            if connect:
                proxy_for = s.kind == "connect-proxy" and (s.proxy or {}).get("DestinationServiceName") == name
                if not (proxy_for or (s.name == name and (s.connect or {}).get("Native"))):
                    continue
            elif s.name != name:
                continue
            checks = node_checks + [c for c in self._checks.values() if c.service_id == s.id]
            checks_json = [self._check_json(c) for c in checks]
            entries.append({"Node": self._node_json(), "Service": self._service_json(s), "Checks": checks_json})
        return entries

    # ---- parsing registrations -------------------------------------------------------------------------------------

    def _parse_check(self, raw: Any, service: _Service | None, default_id: str, default_name: str) -> _Check:
        d = _norm(raw, "check")
        status = d.get("status") or ""
        if status and status not in STATUSES:
            raise HTTPError(400, "Status for checks must 'passing', 'warning', 'critical'")
        kinds = [k for k in _CHECK_KINDS if d.get(k)]
        if d.get("ttl"):
            kind = "ttl"
        elif d.get("aliasservice") or d.get("aliasnode"):
            kind = "alias"
        elif kinds and d.get("interval"):
            kind = "script" if kinds[0] in ("args", "scriptargs") else kinds[0]
        else:
            raise HTTPError(400, "Invalid check: Must provide TTL or Script/DockerContainerID/HTTP/TCP and Interval")
        after = d.get("deregistercriticalserviceafter")
        return _Check(
            id=str(d.get("checkid") or d.get("id") or default_id),
            name=str(d.get("name") or default_name),
            status=status or CRITICAL,
            service_id=service.id if service else str(d.get("serviceid") or ""),
            notes=str(d.get("notes") or ""),
            type=kind,
            ttl=_duration(d["ttl"], "TTL") if kind == "ttl" else None,
            interval=str(d.get("interval") or ""),
            timeout=str(d.get("timeout") or ""),
            deregister_after=_duration(after, "DeregisterCriticalServiceAfter") if after else None,
            alias_service=str(d.get("aliasservice") or ""),
            alias_node=str(d.get("aliasnode") or ""),
            definition={k.upper(): d[k] for k in ("http", "tcp", "grpc") if d.get(k)},
        )

    def _parse_service(self, body: Any) -> tuple[_Service, list[_Check]]:
        d = _norm(body, "service")
        name = str(d.get("name") or "")
        if not name:
            raise HTTPError(400, "Missing service name")
        address = str(d.get("address") or "")
        try:
            if address and ipaddress.ip_address(address).is_unspecified:
                raise HTTPError(400, "Invalid service address")
        except ValueError:
            pass  # a hostname
        kind, proxy = str(d.get("kind") or ""), None
        if kind == "connect-proxy":
            p = _norm(d.get("proxy"), "Proxy")
            if not str(p.get("destinationservicename") or "").strip():
                raise HTTPError(
                    400, "Validation failed: Proxy.DestinationServiceName must be non-empty for Connect proxy services"
                )
            if not d.get("port"):
                raise HTTPError(400, "Validation failed: Port or SocketPath must be set for a Connect proxy")
            proxy = {
                "DestinationServiceName": str(p["destinationservicename"]),
                "DestinationServiceID": str(p.get("destinationserviceid") or ""),
                "LocalServiceAddress": str(p.get("localserviceaddress") or ""),
                "LocalServicePort": int(p.get("localserviceport") or 0),
                "Mode": str(p.get("mode") or ""),
                "Config": p.get("config") or {},
                "Upstreams": p.get("upstreams") or [],
                "MeshGateway": {},
                "Expose": {},
            }
        weights = {"Passing": 1, "Warning": 1}
        if d.get("weights") is not None:
            w = _norm(d["weights"], "Weights")
            weights = {"Passing": int(w.get("passing") or 0), "Warning": int(w.get("warning") or 0)}
            if weights["Passing"] < 1:
                raise HTTPError(400, "Invalid Weights: Passing must be greater than 0")
        native = bool(_norm(d.get("connect"), "Connect").get("native"))
        service = _Service(
            id=str(d.get("id") or name),
            name=name,
            kind=kind,
            tags=[str(t) for t in d.get("tags") or []],
            meta={str(k): str(v) for k, v in (d.get("meta") or {}).items()} or None,
            address=address,
            port=int(d.get("port") or 0),
            weights=weights,
            proxy=proxy,
            connect={"Native": True} if native else None,
            enable_tag_override=bool(d.get("enabletagoverride")),
        )
        raw_checks = ([d["check"]] if d.get("check") else []) + list(d.get("checks") or [])
        checks = []
        for i, raw in enumerate(raw_checks, 1):
            default_id = f"service:{service.id}" + (f":{i}" if len(raw_checks) > 1 else "")
            checks.append(self._parse_check(raw, service, default_id, f"Service '{name}' check"))
        return service, checks

    def _add(self, service: _Service | None, checks: list[_Check], replace_checks: bool = False) -> None:
        """Register (or re-register) atomically; the index moves only for what visibly changed."""
        with self._cond:
            now = self._now()
            if service is not None:
                old = self._services.get(service.id)
                if old is not None and _bare(self._service_json(old)) == _bare(self._service_json(service)):
                    service = old
                else:
                    service.modify_index = self._write()
                    service.create_index = old.create_index if old else service.modify_index
                self._services[service.id] = service
                keep = {c.id for c in checks}
                stale = [c.id for c in self._checks.values() if c.service_id == service.id and c.id not in keep]
                for check_id in stale if replace_checks else []:  # otherwise Consul keeps checks left out
                    del self._checks[check_id]
                    self._write()
            for check in checks:
                old_check = self._checks.get(check.id)
                check.ttl_deadline = now + check.ttl if check.ttl else None
                if check.type == "alias":
                    check.status, check.output = self._alias_status(check)
                check.critical_since = now if check.status == CRITICAL else None
                if old_check is not None and _bare(self._check_json(old_check)) == _bare(self._check_json(check)):
                    check.create_index, check.modify_index = old_check.create_index, old_check.modify_index
                    check.critical_since = old_check.critical_since
                else:
                    check.modify_index = self._write()
                    check.create_index = old_check.create_index if old_check else check.modify_index
                self._checks[check.id] = check
            self._settle()

    # ---- HTTP ------------------------------------------------------------------------------------------------------

    def _listen(self, port: int) -> None:
        server = _Server(("127.0.0.1", port), _Handler)
        server.fake = self
        server.tls = self.tls
        self._server, self._port = server, server.server_address[1]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            (self._conns.add if add else self._conns.discard)(conn)

    def _cut_connections(self, keep: socket.socket | None = None) -> None:
        with self._cond:
            self._epoch += 1
            conns = [c for c in self._conns if c is not keep]
            self._cond.notify_all()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _reap_loop(self) -> None:
        while not self._stopped.wait(0.05):
            with self._cond:
                self._settle()

    def _dead(self, epoch: int) -> bool:
        return self._epoch != epoch or self._fault == "refuse" or self._stopped.is_set()

    def _serve(self, h: _Handler) -> None:
        epoch = self._epoch
        split = urlsplit(h.path)
        path, query = unquote(split.path), parse_qs(split.query, keep_blank_values=True)
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if self._dead(epoch):
            h.close_connection = True  # drop without an answer, like a dead agent
            return
        if path.startswith("/_fake/"):
            return self._respond(h, *self._control(h, path, query))
        self.requests.append(Request(h.command, path, query))
        try:
            if self._hang(epoch):
                raise _Drop
            if self._fault == "500":
                raise HTTPError(500, _NO_LEADER)
            self._authorize(h, path, query)
            status, payload, headers = self._route(h.command, path, query, body, epoch)
            if self._fault == "500":  # switched on while the query was blocked
                raise HTTPError(500, _NO_LEADER)
            if self._hang(epoch) or self._dead(epoch):
                raise _Drop
        except HTTPError as exc:
            status, payload, headers = exc.status, exc.text, {}
        except _Drop:
            h.close_connection = True  # no answer at all, like a dead or wedged agent
            return
        except Exception as exc:  # a bug in the fake, or a malformed request it does not model: say so
            status, payload, headers = 500, f"fake consul: {exc!r}", {}
        self._respond(h, status, payload, headers)

    def _hang(self, epoch: int) -> bool:
        """While the "hang" fault is on, hold the request; True if it must be dropped (still hanging, or dead)."""
        with self._cond:
            deadline = time.monotonic() + HANG_LIMIT
            while self._fault == "hang" and not self._dead(epoch) and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return self._fault == "hang" or self._dead(epoch)

    def _respond(self, h: _Handler, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        if isinstance(payload, bytes):
            data, ctype = payload, "application/octet-stream"
        elif isinstance(payload, str):
            data, ctype = payload.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        headers = dict(headers or {})
        ctype = headers.pop("Content-Type", ctype)
        try:
            h.send_response(status)
            h.send_header("Content-Type", ctype)
            for name, value in headers.items():
                h.send_header(name, value)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except OSError:
            h.close_connection = True

    def _control(self, h: _Handler, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        arg = {k: v[0] for k, v in query.items()}
        try:
            if path == "/_fake/fault":
                mode = arg.get("mode") or None
                self._set_fault(None if mode == "none" else mode, keep=h.connection)
            elif path == "/_fake/advance":
                self.advance(float(arg["seconds"]))
            elif path == "/_fake/restart":
                self.restart(_keep=h.connection)
            elif path == "/_fake/node_check":
                self.set_node_check(arg["status"], arg.get("output", ""))
            elif path.startswith("/_fake/check/"):
                self.set_check_status(path.removeprefix("/_fake/check/"), arg["status"], arg.get("output", ""))
            elif path != "/_fake/state":
                return 404, "unknown fake control endpoint"
        except (KeyError, ValueError) as exc:
            return 400, f"bad fake control request: {exc!r}"
        return 200, {"Index": self.index, "Fault": self._fault, "Address": self.address}

    def _authorize(self, h: _Handler, path: str, query: dict[str, list[str]]) -> None:
        if self.acl_token is None or path.startswith("/v1/status/"):
            return
        token = query.get("token", [""])[0] or h.headers.get("X-Consul-Token", "")
        scheme, _, value = h.headers.get("Authorization", "").partition(" ")
        if not token and scheme.lower() == "bearer":
            token = value.strip()
        if not token:
            raise HTTPError(403, "Permission denied")
        if token != self.acl_token:
            raise HTTPError(403, "ACL not found")

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes, epoch: int) -> tuple:
        routes: list[tuple[str, str, Callable[..., tuple]]] = [
            ("PUT", "/v1/agent/service/register", self._api_register_service),
            ("PUT", "/v1/agent/service/deregister/", self._api_deregister_service),
            ("GET", "/v1/agent/services", self._api_services),
            ("GET", "/v1/agent/service/", self._api_service),
            ("GET", "/v1/agent/checks", self._api_checks),
            ("PUT", "/v1/agent/check/register", self._api_register_check),
            ("PUT", "/v1/agent/check/deregister/", self._api_deregister_check),
            ("PUT", "/v1/agent/check/pass/", self._api_check_ttl),
            ("PUT", "/v1/agent/check/warn/", self._api_check_ttl),
            ("PUT", "/v1/agent/check/fail/", self._api_check_ttl),
            ("PUT", "/v1/agent/check/update/", self._api_check_ttl),
            ("GET", "/v1/agent/self", self._api_self),
            ("GET", "/v1/health/service/", self._api_health),
            ("GET", "/v1/health/connect/", self._api_health),
            ("GET", "/v1/catalog/services", self._api_catalog_services),
            ("GET", "/v1/status/leader", lambda *a: (200, json.dumps(f"{self.node_address}:8300").encode(), _JSON)),
            ("GET", "/v1/status/peers", lambda *a: (200, [f"{self.node_address}:8300"], {})),
            ("GET PUT DELETE", "/v1/kv/", self._api_kv),
        ]
        for methods, prefix, handler in routes:
            exact = not prefix.endswith("/")
            if (path == prefix) if exact else (path.startswith(prefix) and (path != prefix or prefix == "/v1/kv/")):
                if method not in methods.split():
                    raise HTTPError(405, f"method {method} not allowed")
                return handler(method, path, path.removeprefix(prefix), query, body, epoch)
        raise HTTPError(404, "")

    def _read(self, query: dict[str, list[str]], key: tuple[str, ...], compute: Callable[[], Any], epoch: int) -> tuple:
        """A read, blocking if asked until the result moved past `index` or `wait` ran out: (value, headers)."""
        if query.get("dc", [""])[0] not in ("", self.datacenter):
            raise HTTPError(500, "No path to datacenter")
        try:
            min_index = int(query.get("index", ["0"])[0] or 0)
        except ValueError:
            raise HTTPError(400, "Invalid index") from None
        wait = DEFAULT_WAIT
        if query.get("wait", [""])[0]:
            try:
                wait = min(parse_duration(query["wait"][0]), MAX_WAIT)
            except ValueError:
                raise HTTPError(400, "Invalid wait time") from None
        wait += random.uniform(0, wait / 16)
        with self._cond:
            self._settle()
            index, value = self._view(key, compute)
            fake_start, real_start = self._now(), time.monotonic()
            while min_index > 0 and self._report(index) <= min_index and not self._dead(epoch):
                left = wait - max(self._now() - fake_start, time.monotonic() - real_start)
                if left <= 0 or self._fault == "500":
                    break
                self._cond.wait(left)
                self._settle()
                index, value = self._view(key, compute)
            headers = {"X-Consul-Index": str(self._report(index)), "X-Consul-KnownLeader": "true"}
            return value, headers | {"X-Consul-LastContact": "0"}

    # ---- endpoints -------------------------------------------------------------------------------------------------

    def _json_body(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"null")
        except ValueError as exc:
            raise HTTPError(400, f"Request decode failed: {exc}") from None

    def _api_register_service(self, method, path, rest, query, body, epoch) -> tuple:
        service, checks = self._parse_service(self._json_body(body))
        self._add(service, checks, replace_checks=_go_bool(query, "replace-existing-checks"))
        return 200, b"", {}

    def _api_deregister_service(self, method, path, service_id, query, body, epoch) -> tuple:
        with self._cond:
            if service_id not in self._services:
                msg = f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.'
                raise HTTPError(404, msg)
            self._remove_service(service_id)
            self._settle()
        return 200, b"", {}

    def _api_services(self, method, path, rest, query, body, epoch) -> tuple:
        with self._cond:
            self._settle()
            return 200, {s.id: self._service_json(s, agent=True) for s in self._services.values()}, {}

    def _api_service(self, method, path, service_id, query, body, epoch) -> tuple:
        with self._cond:
            self._settle()
            if service_id not in self._services:
                raise HTTPError(404, f"unknown service ID: {service_id}")
            return 200, self._service_json(self._services[service_id], agent=True), {}

    def _api_checks(self, method, path, rest, query, body, epoch) -> tuple:
        with self._cond:
            self._settle()
            return 200, {c.id: self._check_json(c) for c in self._checks.values()}, {}

    def _api_register_check(self, method, path, rest, query, body, epoch) -> tuple:
        raw = self._json_body(body)
        name = _norm(raw, "check").get("name")
        if not name:
            raise HTTPError(400, "Missing check name")
        check = self._parse_check(raw, None, str(name), str(name))
        with self._cond:
            if check.service_id and check.service_id not in self._services:
                raise HTTPError(500, f'ServiceID "{check.service_id}" does not exist')
        self._add(None, [check])
        return 200, b"", {}

    def _api_deregister_check(self, method, path, check_id, query, body, epoch) -> tuple:
        with self._cond:
            self._known_check(check_id)
            del self._checks[check_id]
            self._write()
            self._settle()
        return 200, b"", {}

    def _known_check(self, check_id: str) -> _Check:
        if check_id not in self._checks:
            msg = f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            raise HTTPError(404, msg)
        return self._checks[check_id]

    def _api_check_ttl(self, method, path, check_id, query, body, epoch) -> tuple:
        verb = path.split("/")[4]
        if verb == "update":
            update = _norm(self._json_body(body), "update")
            status, output = str(update.get("status") or ""), str(update.get("output") or "")
            if status not in STATUSES:
                raise HTTPError(400, f"Invalid check status: '{status}'")
        else:
            status = {"pass": PASSING, "warn": WARNING, "fail": CRITICAL}[verb]
            output = query.get("note", [""])[0]
        with self._cond:
            self._settle()
            check = self._known_check(check_id)
            if check.type != "ttl":
                raise HTTPError(500, f'CheckID "{check_id}" does not have associated TTL')
            check.ttl_deadline = self._now() + (check.ttl or 0)
            self._set_status(check, status, output)
            self._settle()
        return 200, b"", {}

    def _api_self(self, method, path, rest, query, body, epoch) -> tuple:
        config = {"Datacenter": self.datacenter, "NodeName": self.node, "NodeID": self._node_id, "Server": True}
        member = {"Name": self.node, "Addr": self.node_address, "Port": 8301, "Status": 1}
        member["Tags"] = {"dc": self.datacenter, "id": self._node_id, "role": "consul"}
        config |= {"Version": "1.17.0", "Revision": "fake"}
        return 200, {"Config": config, "Member": member, "Meta": {"consul-network-segment": ""}}, {}

    def _api_health(self, method, path, name, query, body, epoch) -> tuple:
        connect = path.startswith("/v1/health/connect/")
        passing, tags = _go_bool(query, "passing"), [t.lower() for t in query.get("tag", [])]
        key = ("connect" if connect else "health", name)
        entries, headers = self._read(query, key, lambda: self._health(name, connect), epoch)
        entries = [e for e in entries if all(t in [x.lower() for x in e["Service"]["Tags"]] for t in tags)]
        if passing:
            entries = [e for e in entries if all(c["Status"] == PASSING for c in e["Checks"])]
        return 200, entries, headers

    def _api_catalog_services(self, method, path, rest, query, body, epoch) -> tuple:
        def compute() -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for s in self._services.values():
                out[s.name] = sorted(set(out.get(s.name, [])) | set(s.tags))
            return out

        value, headers = self._read(query, ("catalog",), compute, epoch)
        return 200, value, headers

    def _api_kv(self, method, path, key, query, body, epoch) -> tuple:
        if method == "GET":
            return self._kv_get(key, query, epoch)
        if not key and (method == "PUT" or "recurse" not in query):
            raise HTTPError(400, "Missing key name")
        if query.get("dc", [""])[0] not in ("", self.datacenter):
            raise HTTPError(500, "No path to datacenter")
        cas = query.get("cas", [""])[0]
        with self._cond:
            entry = self._kv.get(key)
            if cas and int(cas) != (entry["ModifyIndex"] if entry else 0):
                return 200, False, {}
            if method == "DELETE":
                doomed = [k for k in self._kv if k.startswith(key)] if "recurse" in query else [key]
                if [self._kv.pop(k) for k in doomed if k in self._kv]:
                    self._write()
                return 200, True, {}
            index = self._write()
            flags = int(query.get("flags", ["0"])[0] or 0)
            created = entry["CreateIndex"] if entry else index
            self._kv[key] = {"LockIndex": 0, "Key": key, "Flags": flags, "Value": body, "CreateIndex": created}
            self._kv[key]["ModifyIndex"] = index
        return 200, True, {}

    def _kv_get(self, key: str, query: dict[str, list[str]], epoch: int) -> tuple:
        listing, keys_only = "recurse" in query, "keys" in query
        separator = query.get("separator", [""])[0]

        def compute() -> list[Any]:
            if listing or keys_only:
                found = [e for k, e in sorted(self._kv.items()) if k.startswith(key)]
            else:
                found = [self._kv[key]] if key in self._kv else []
            if keys_only:
                names = []
                for e in found:
                    cut = e["Key"].find(separator, len(key)) if separator else -1
                    names.append(e["Key"][: cut + len(separator)] if cut >= 0 else e["Key"])
                return sorted(set(names))
            return [e | {"Value": base64.b64encode(e["Value"]).decode() if e["Value"] else None} for e in found]

        mode = "keys" + separator if keys_only else ("recurse" if listing else "key")
        value, headers = self._read(query, ("kv", mode, key), compute, epoch)
        if not value:
            return 404, b"", headers
        if "raw" in query and not keys_only:
            return 200, base64.b64decode(value[0]["Value"] or ""), headers
        return 200, value, headers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the fake Consul agent (tests/consul_fake.py) standalone.")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--node", default="node1")
    parser.add_argument("--node-address", default="127.0.0.1")
    parser.add_argument("--datacenter", default="dc1")
    parser.add_argument("--acl-token", default=None)
    args = parser.parse_args(argv)
    fake = FakeConsul(args.node, args.node_address, args.datacenter, args.acl_token).start(args.port)
    print(fake.address, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
