"""Sidecar configuration: YAML files parsed into frozen, validated pydantic models with plain-word errors."""

from __future__ import annotations

import ipaddress
import os
import re
import types
import typing
import urllib.parse
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "FALLBACK_ROUTE",
    "GRPC_STATUS_CODES",
    "IDENTITY_REQUIRED",
    "Address",
    "AddressField",
    "AdminSettings",
    "BalancerSettings",
    "CircuitBreakers",
    "ClusterFields",
    "ClusterSettings",
    "ConfigError",
    "Destination",
    "DirectResponse",
    "DiscoverySettings",
    "Duration",
    "Endpoint",
    "EndpointSpec",
    "Fault",
    "FaultAbort",
    "FaultDelay",
    "HashOn",
    "HeaderChanges",
    "IdentityFiles",
    "IdentityFromCA",
    "IdentitySettings",
    "InboundDefault",
    "InboundSettings",
    "Limits",
    "LogSettings",
    "MeshSettings",
    "Mirror",
    "OutlierSettings",
    "PoolSettings",
    "Redirect",
    "RegistryFile",
    "RetrySettings",
    "RetryableGrpcStatus",
    "Rewrite",
    "Route",
    "RouteMatch",
    "RouteTimeouts",
    "ServiceName",
    "ServiceSettings",
    "ShutdownSettings",
    "SidecarConfig",
    "Size",
    "StringMatch",
    "TelemetrySettings",
    "Timeouts",
    "TracingSettings",
    "UpstreamSettings",
    "WeightedDestination",
    "dump_config",
    "format_duration",
    "format_size",
    "inbound_default",
    "load_config",
    "load_registry",
    "parse_address",
    "parse_config",
    "parse_duration",
    "parse_registry",
    "parse_size",
    "redact",
    "unreadable_files",
]


class ConfigError(Exception):
    """A configuration (or registry) file could not be used; `errors` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --- scalar types ---


class Address(NamedTuple):
    """A host and TCP port; IPv6 hosts are stored without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]+")


def parse_address(value: object) -> Address:
    """Parse "host:port" ("[v6]:port" for IPv6) into an Address; raise ValueError in plain words."""
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected host:port (got {_show(value)})")
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [ipv6]:port (got {value!r})")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r}") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected host:port (got {value!r})")
        if ":" in host:
            raise ValueError(f"put IPv6 addresses in brackets, e.g. [::1]:80 (got {value!r})")
        if not host:
            raise ValueError(f"expected host:port, the host is empty (got {value!r})")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"invalid host {host!r}")
    if not port_text.isdigit():
        raise ValueError(f"expected host:port, {port_text!r} is not a port number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} out of range")
    return Address(host, port)


AddressField = Annotated[Address, BeforeValidator(parse_address), PlainSerializer(str)]
"""An Address accepted from YAML as "host:port" and written back the same way."""

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")
_DURATION_UNITS = {"h": 3600, "m": 60, "s": 1}
_DURATION_HELP = "use e.g. 250ms, 1.5s, 2m, 1h30m or a number of seconds"


def parse_duration(value: object) -> float:
    """Parse "250ms", "1.5s", "2m", "1h30m" or a bare number of seconds into float seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration, {_DURATION_HELP} (got {_show(value)})")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"duration must not be negative (got {value!r})")
        try:
            seconds = float(text)
        except ValueError:
            seconds = _sum_duration_parts(text, value)
    else:
        seconds = float(value)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError(f"expected a finite duration (got {_show(value)})")
    if seconds < 0:
        raise ValueError(f"duration must not be negative (got {_show(value)})")
    return seconds


def _sum_duration_parts(text: str, original: str) -> float:
    position, seconds = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        number, unit = match.groups()
        seconds += float(number) / 1000 if unit == "ms" else float(number) * _DURATION_UNITS[unit]
        position = match.end()
    if not text or position != len(text):
        raise ValueError(f"invalid duration {original!r} ({_DURATION_HELP})")
    return seconds


def format_duration(seconds: float) -> str:
    """Write seconds compactly ("0s", "250ms", "1.5s", "1h30m"); parse_duration reads it back."""
    micros = round(seconds * 1_000_000)
    hours, micros = divmod(micros, 3_600_000_000)
    minutes, micros = divmod(micros, 60_000_000)
    parts = [f"{hours}h"] if hours else []
    if minutes:
        parts.append(f"{minutes}m")
    if micros % 1_000_000 == 0:
        if micros or not parts:
            parts.append(f"{micros // 1_000_000}s")
    elif micros < 1_000_000 and micros % 1000 == 0:
        parts.append(f"{micros // 1000}ms")
    else:
        parts.append(f"{micros / 1_000_000:.6f}".rstrip("0") + "s")
    return "".join(parts)


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
"""Seconds as a float, accepted as "250ms", "1.5s", "2m", "1h30m" or a bare number; written back compactly."""

_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(B|KiB|MiB|GiB|TiB)?")
_SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE_HELP = "use a number of bytes or KiB, MiB, GiB, e.g. 64KiB"


def parse_size(value: object) -> int:
    """Parse "64KiB", "10MiB", "1GiB", "1000" or a bare integer into a whole number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"size must not be negative (got {value})")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size, {_SIZE_HELP} (got {_show(value)})")
    if value.strip().startswith("-"):
        raise ValueError(f"size must not be negative (got {value!r})")
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise ValueError(f"invalid size {value!r} ({_SIZE_HELP})")
    number, unit = match.groups()
    size = Fraction(number) * _SIZE_UNITS[unit or "B"]
    if size.denominator != 1:
        raise ValueError(f"size {value!r} is not a whole number of bytes")
    return int(size)


def format_size(size: int) -> str:
    """Write bytes in the largest binary unit that divides them ("64KiB", "1000B"); parse_size reads it."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size)]
"""Bytes as an int, accepted as "64KiB", "10MiB", "1GiB" or a bare number; written back as "64KiB"."""

_SERVICE_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")


def _check_service_name(value: object) -> str:
    if not isinstance(value, str) or not _SERVICE_NAME.fullmatch(value):
        raise ValueError(
            f"invalid service name {_show(value)}: use 1-63 lowercase letters, digits and '-', starting with a letter"
        )
    return value


ServiceName = Annotated[str, BeforeValidator(_check_service_name)]
"""A mesh service name (part of its SPIFFE ID): 1-63 lowercase letters, digits and '-', letter first."""

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,63}")


def _check_trust_domain(value: object) -> str:
    if not isinstance(value, str) or not _TRUST_DOMAIN.fullmatch(value):
        raise ValueError(f"invalid trust domain {_show(value)}: use lowercase letters, digits, '.', '-' and '_'")
    return value


def _check_path_segment(value: object) -> str:
    if not isinstance(value, str) or not _PATH_SEGMENT.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"invalid name {_show(value)}: use 1-63 letters, digits, '.', '-' and '_'")
    return value


def _check_upgrade(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", value):
        raise ValueError(f"must be an Upgrade protocol name such as 'websocket' (got {_show(value)})")
    if value.lower() == "h2c":
        raise ValueError("'h2c' cannot be tunnelled: the sidecar speaks HTTP/2 itself (prior knowledge or ALPN h2)")
    return value.lower()


UpgradeList = Annotated[
    list[Annotated[str, BeforeValidator(_check_upgrade)]],
    Field(description="Upgrade protocols tunnelled after a 101; any other Upgrade header is removed."),
]


def _check_allowed_peer(value: object) -> str:
    if isinstance(value, str) and value.startswith("spiffe://"):
        trust_domain, _, path = value.removeprefix("spiffe://").partition("/")
        if not _TRUST_DOMAIN.fullmatch(trust_domain) or not path:
            raise ValueError(f"invalid SPIFFE ID {value!r}: expected spiffe://<trust-domain>/<path>")
        return value
    if not isinstance(value, str) or not _SERVICE_NAME.fullmatch(value):
        raise ValueError(f"expected a service name or a spiffe:// ID (got {_show(value)})")
    return value


def _endpoint_from_string(value: object) -> object:
    return {"address": value} if isinstance(value, str) else value


def _check_http_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c in value for c in " \r\n\t"):
        raise ValueError(f"an HTTP path must start with '/' and contain no whitespace (got {_show(value)})")
    return value


HttpPath = Annotated[str, BeforeValidator(_check_http_path)]
"""A request path for a health check, e.g. /healthz."""


def _from_config_dir(path: Path, info: ValidationInfo) -> Path:
    """A path from a config file, made absolute: relative paths are taken from the config file's directory."""
    base_dir = (info.context or {}).get("base_dir", Path.cwd())
    return Path(os.path.abspath(Path(base_dir) / path))


# --- models ---


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MeshSettings(_Model):
    """Mesh-wide identity settings (together with a service name they form its SPIFFE ID) and default policy."""

    trust_domain: Annotated[str, BeforeValidator(_check_trust_domain)] = Field(
        "mesh.local", description="SPIFFE trust domain shared by every sidecar of the mesh."
    )
    namespace: Annotated[str, BeforeValidator(_check_path_segment)] = Field(
        "default",
        description="Namespace part of the SPIFFE IDs (spiffe://<trust_domain>/ns/<namespace>/...).",
    )
    datacenter: Annotated[str, BeforeValidator(_check_path_segment)] = Field(
        "dc1", description="Datacenter part of the SPIFFE IDs (.../dc/<datacenter>/svc/<service>)."
    )
    default_policy: Literal["allow", "deny"] = Field(
        "allow",
        description="Who an mTLS inbound with an empty allow list admits: allow, any identity of the trust domain "
        "(Consul's default without ACLs); deny, nobody.",
    )


class Timeouts(_Model):
    """Time limits of one listener or upstream."""

    connect: Duration = Field(1.0, description="Longest wait for a TCP (and TLS) connection to be established.")
    request_headers: Duration = Field(10.0, description="Longest wait for a client to send the request head.")
    request: Duration = Field(
        15.0,
        description="Deadline for the response head, counted from when the request body has been forwarded, "
        "including retries; 0 turns it off. While the body streams, `idle` applies to its progress.",
    )
    idle: Duration = Field(3600.0, description="An idle client connection is closed after this long.")


class Http2Settings(_Model):
    """HTTP/2 settings: what a listener advertises to its clients, and the windows of its HTTP/2 upstream
    connections. Buffered body bytes stay bounded by the windows: a slow reader holds back its writer."""

    max_concurrent_streams: int = Field(
        100, ge=1, le=2**31 - 1, description="Streams one client may have open; the excess stream gets REFUSED_STREAM."
    )
    stream_window: Annotated[Size, Field(ge=65535, le=2**31 - 1)] = Field(
        1024 * 1024, description="Flow-control window per stream (request bodies in, responses from upstreams)."
    )
    connection_window: Annotated[Size, Field(ge=65535, le=2**31 - 1)] = Field(
        16 * 1024 * 1024, description="Flow-control window per connection, shared by its streams."
    )
    max_frame_size: Annotated[Size, Field(ge=16384, le=16777215)] = Field(
        16384, description="Largest frame payload accepted; a longer frame ends the connection (FRAME_SIZE_ERROR)."
    )


class Limits(_Model):
    """Resource limits of one listener or upstream."""

    max_connections: int = Field(10000, ge=1, description="Most client connections open at once per listener.")
    max_header_bytes: Annotated[Size, Field(ge=1)] = Field(
        64 * 1024, description="Largest request or response head; a larger request head gets 431."
    )
    max_header_count: int = Field(100, ge=1, description="Most header fields in one head; more gets 431.")
    max_body_bytes: Size | None = Field(
        None, description="Largest request body; a larger one gets 413. null means unlimited."
    )
    request_buffer: Size = Field(
        64 * 1024,
        description="Request body bytes read before a request is sent on (all of it if it is shorter), so that a "
        "client trickling its body holds no upstream connection or circuit-breaker slot; 0 sends at once. "
        "Not applied to gRPC or to requests that wait for 100 Continue.",
    )
    http2: Http2Settings = Field(default_factory=Http2Settings, description="HTTP/2 streams, windows and frames.")


class PoolSettings(_Model):
    """Reuse of upstream connections."""

    max_idle_per_endpoint: int = Field(
        1024, ge=0, description="Most idle connections kept open per endpoint (as many as the circuit breaker allows)."
    )
    idle_timeout: Duration = Field(60.0, description="An idle pooled connection is closed after this long.")


class HashOn(_Model):
    """What a consistent-hash balancer hashes: one request header or one cookie."""

    header: str | None = Field(None, description="Hash this request header's value (e.g. x-user-id).")
    cookie: str | None = Field(None, description="Hash this cookie's value.")

    @model_validator(mode="after")
    def _one(self) -> HashOn:
        if (self.header is None) == (self.cookie is None):
            raise ValueError("set exactly one of: header, cookie")
        return self


class BalancerSettings(_Model):
    """How requests are spread over an upstream's endpoints."""

    policy: Literal["p2c_ewma", "round_robin", "random", "least_request", "ring_hash", "maglev"] = Field(
        "p2c_ewma",
        description="p2c_ewma: the lower of two random endpoints' latency x outstanding (Linkerd's default); "
        "round_robin, random, least_request; ring_hash and maglev keep a key on one endpoint (sticky).",
    )
    rtt: Duration = Field(0.030, description="The latency a new endpoint is assumed to have (p2c_ewma).")
    decay: Duration = Field(10.0, description="How fast latency samples age (p2c_ewma).")
    hash_on: HashOn | None = Field(None, description="What ring_hash and maglev hash (required for them).")

    @model_validator(mode="after")
    def _hash_needs_key(self) -> BalancerSettings:
        if self.policy in ("ring_hash", "maglev") and self.hash_on is None:
            raise ValueError(f"policy {self.policy} needs hash_on: {{header: NAME}} or {{cookie: NAME}}")
        return self


class SuccessRateSettings(_Model):
    """Envoy's success-rate outlier rule: every interval, endpoints far below the mean success rate are ejected."""

    interval: Duration = Field(10.0, description="How often success rates are compared.")
    min_hosts: int = Field(5, ge=1, description="Endpoints that must have enough requests for the rule to run.")
    request_volume: int = Field(100, ge=1, description="Requests an endpoint needs in an interval to be judged.")
    stdev_factor: float = Field(
        1.9, gt=0, description="Eject below mean - stdev_factor x stdev of the endpoints' success rates."
    )


class CircuitBreakers(_Model):
    """Per-cluster limits; overflow answers 503 `circuit open (<limit>)` at once."""

    max_connections: int = Field(1024, ge=1, description="Upstream connections open at once.")
    max_pending: int = Field(1024, ge=1, description="Requests waiting for a new connection at once.")
    max_requests: int = Field(1024, ge=1, description="Requests in flight at once.")


class OutlierSettings(_Model):
    """Passive health: endpoints that keep failing are ejected for a while (Envoy's defaults)."""

    consecutive_failures: int = Field(
        5, ge=0, description="Failures in a row (5xx, connect error, reset) that eject an endpoint; 0 turns it off."
    )
    base_ejection: Duration = Field(30.0, description="First ejection time; multiplied by the times ejected.")
    max_ejection: Duration = Field(300.0, description="Longest ejection.")
    max_ejected_percent: int = Field(50, ge=0, le=100, description="Never eject more than this share of endpoints.")
    success_rate: SuccessRateSettings | None = Field(
        None, description="Also eject endpoints whose success rate is far below their peers' (off by default)."
    )


class RetryBudget(_Model):
    """How many retries an upstream may get on top of its requests (Linkerd's and Finagle's budget)."""

    percent: int = Field(20, ge=0, le=1000, description="Retries may add this share of the requests in the window.")
    min_per_second: float = Field(10.0, ge=0, description="Retries per second allowed whatever the request rate.")
    window: Duration = Field(10.0, description="How long a request or retry counts towards the budget.")


RetryReason = Literal["connect_failure", "reset", "per_try_timeout"]

GRPC_STATUS_CODES: Mapping[str, int] = types.MappingProxyType(
    {
        "ok": 0,
        "cancelled": 1,
        "unknown": 2,
        "invalid_argument": 3,
        "deadline_exceeded": 4,
        "not_found": 5,
        "already_exists": 6,
        "permission_denied": 7,
        "resource_exhausted": 8,
        "failed_precondition": 9,
        "aborted": 10,
        "out_of_range": 11,
        "unimplemented": 12,
        "internal": 13,
        "unavailable": 14,
        "data_loss": 15,
        "unauthenticated": 16,
    }
)
"""The gRPC status codes by their lower-case names, as `grpc-status` carries them (unavailable: 14)."""

RetryableGrpcStatus = Literal[
    "cancelled", "unknown", "deadline_exceeded", "resource_exhausted", "aborted", "internal", "unavailable"
]


class RetrySettings(_Model):
    """Which failed requests are tried again, on another endpoint, and how often."""

    attempts: int = Field(2, ge=0, le=10, description="Retries after the first try; 0 turns retries off.")
    on: list[RetryReason] = Field(
        default_factory=lambda: ["connect_failure", "reset", "per_try_timeout"],
        description="Failures without a response that are retried: connect_failure (the request never left), "
        "reset (closed or reset before any response byte), per_try_timeout.",
    )
    statuses: list[Annotated[int, Field(ge=500, le=599)]] = Field(
        default_factory=lambda: [502, 503, 504], description="Response statuses that are retried."
    )
    grpc_statuses: list[RetryableGrpcStatus] = Field(
        default_factory=lambda: ["unavailable"],
        description="For gRPC requests: the grpc-status values of a trailers-only answer (the status in the "
        "response head) that are retried; gRPC answers errors with HTTP 200, so `statuses` never applies to it. "
        "gRPC calls are POSTs: they are re-sent only with `methods: all`.",
    )
    methods: Literal["idempotent", "all"] = Field(
        "idempotent",
        description="idempotent: a request that may have reached the upstream is re-sent only for GET, HEAD, "
        "OPTIONS, TRACE, PUT and DELETE; all: the upstream declares every request safe to repeat.",
    )
    per_try_timeout: Duration = Field(0.0, description="Longest wait for each try's response head; 0 turns it off.")
    backoff_base: Duration = Field(0.025, description="Full-jitter backoff: the first retry waits up to this long.")
    backoff_max: Duration = Field(0.25, description="Longest backoff between tries.")
    retry_after_max: Duration = Field(
        1.0, description="A Retry-After up to this long is waited for; a longer one is not retried. 0 ignores it."
    )
    max_body_bytes: Size = Field(64 * 1024, description="Requests with a larger body are never re-sent.")
    budget: RetryBudget = Field(default_factory=RetryBudget, description="The cap on retries under failure.")

    @model_validator(mode="after")
    def _backoff_order(self) -> RetrySettings:
        if self.backoff_max < self.backoff_base:
            raise ValueError("backoff_max must not be below backoff_base")
        return self


class HedgeSettings(_Model):
    """Hedged requests: a second try sent to another endpoint when the first is slow; the first answer wins."""

    delay: Literal["p95"] | Duration = Field(
        "p95", description="When to send the hedge: p95 (this upstream's recent 95th percentile latency) or a duration."
    )
    min_delay: Duration = Field(0.005, description="Never hedge sooner than this (p95 mode).")


class HealthCheckSettings(_Model):
    """Active health checks: each endpoint probed on an interval; combined with discovery and outlier ejection."""

    interval: Duration = Field(10.0, description="Time between probes of one endpoint.")
    timeout: Duration = Field(1.0, description="A probe not answered in this time fails.")
    http_path: HttpPath | None = Field(
        None, description="Probe with GET on this path (2xx passes); null probes with a TCP (and TLS) connect."
    )
    unhealthy_threshold: int = Field(3, ge=1, description="Failed probes in a row that mark an endpoint unhealthy.")
    healthy_threshold: int = Field(2, ge=1, description="Passed probes in a row that mark it healthy again.")


# --- routes ---

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
_ROUTE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_HOST_PATTERN = re.compile(r"(?:\*\.)?[a-z0-9_-]+(?:\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]")
_HOST_OR_IP_PATTERN = r"(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*|\[[0-9A-Fa-f:.]+\])"
_HOST_OR_IP = re.compile(_HOST_OR_IP_PATTERN)
_AUTHORITY = re.compile(_HOST_OR_IP_PATTERN + r"(?::\d{1,5})?")
_NOT_NORMAL_ESCAPE = re.compile(r"%(?:2[eEfF]|5[cC]|00)")
FALLBACK_ROUTE = "default"
"""The name of a listener's implicit last route, which sends what no route matched to the listener's service."""


def _header_name(value: object, *, pseudo: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a header name (got {_show(value)})")
    if value.startswith(":"):
        raise ValueError(f"'{value}' is a pseudo-header: {pseudo}")
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"invalid header name {value!r}: use letters, digits and !#$%&'*+.^_`|~-")
    return value.lower()


def _check_matched_header(value: object) -> str:
    name = _header_name(
        value,
        pseudo="match the authority with host, the method with methods, the path with path, path_prefix or path_regex",
    )
    if name == "host":
        raise ValueError("match the authority (Host) with match.host")
    if name in _HOP_BY_HOP or name.startswith("x-mesh-"):
        raise ValueError(f"'{name}' is removed from requests before they are routed, so it never matches")
    return name


def _check_changed_header(value: object) -> str:
    name = _header_name(value, pseudo="change the path with rewrite.prefix and the authority with rewrite.host")
    if name in _HOP_BY_HOP:
        raise ValueError(f"'{name}' is a hop-by-hop header: the proxy sets it for each connection")
    if name == "content-length":
        raise ValueError("'content-length' frames the body: the proxy sets it")
    if name.startswith("x-mesh-"):
        raise ValueError(f"'{name}': x-mesh-* headers are the mesh's own (docs/wire.md) and cannot be changed")
    return name


def _check_header_value(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string (got {_show(value)}): quote numbers")
    if any(c in value for c in "\r\n\0"):
        raise ValueError("a header value must not contain CR, LF or NUL")
    return value


def _distinct_names(value: object) -> object:
    """Header names are case-insensitive: refuse a mapping that names one header twice in different cases."""
    if isinstance(value, dict):
        seen: dict[str, object] = {}
        for key in value:
            if isinstance(key, str):
                if key.lower() in seen:
                    raise ValueError(f"'{key}' and '{seen[key.lower()]}' name the same header (names ignore case)")
                seen[key.lower()] = key
    return value


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
    return value


def _check_route_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"a path must start with '/' (got {_show(value)})")
    if any(c in value for c in " \t\r\n?#\\"):
        raise ValueError(f"a path must contain no whitespace, '?', '#' or '\\' (got {value!r})")
    segments = value.split("/")[1:]
    if "" in segments[:-1] or "." in segments or ".." in segments or _NOT_NORMAL_ESCAPE.search(value):
        raise ValueError(
            f"{value!r} is not in normal form: requests are routed after '//', '.', '..' and %2E are resolved "
            "(and %2F, %5C and %00 are refused)"
        )
    return value


RoutePath = Annotated[str, BeforeValidator(_check_route_path)]
"""A path as requests are matched and rewritten: starting with '/', without '//', '.' or '..' segments."""


def _check_host_pattern(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a host name (got {_show(value)})")
    host = value.strip().lower()
    if host == "*":
        raise ValueError("'*' would match every host: leave match.host out instead")
    host = host.removesuffix(".")
    if not _HOST_PATTERN.fullmatch(host):
        raise ValueError(
            f"invalid host {value!r}: use a host name (api.example.com), a wildcard (*.example.com) or an IP "
            "address, without a port (ports are ignored)"
        )
    return host


def _one_or_more(value: object) -> object:
    return [value] if isinstance(value, str) else value


def _check_method(value: object) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError(f"expected an HTTP method such as GET (got {_show(value)})")
    return value.upper()


def _check_authority(value: object) -> str:
    if not isinstance(value, str) or not _AUTHORITY.fullmatch(value):
        raise ValueError(f"expected host or host:port (got {_show(value)})")
    return value


def _check_redirect_host(value: object) -> str:
    if isinstance(value, str) and _AUTHORITY.fullmatch(value) and not _HOST_OR_IP.fullmatch(value):
        raise ValueError(f"give the port in redirect.port, not in the host (got {value!r})")
    if not isinstance(value, str) or not _HOST_OR_IP.fullmatch(value):
        raise ValueError(f"expected a host name or IP address (got {_show(value)})")
    return value


def _check_route_name(value: object) -> str:
    if not isinstance(value, str) or not _ROUTE_NAME.fullmatch(value):
        raise ValueError(f"invalid route name {_show(value)}: use 1-63 letters, digits, '.', '-' and '_'")
    if value == FALLBACK_ROUTE:
        raise ValueError(f"'{FALLBACK_ROUTE}' names the route of the requests that no route matches: choose another")
    return value


def _string_match_shorthand(value: object) -> object:
    if isinstance(value, str):
        return {"exact": value}
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(
            f"expected a string or a mapping of one of exact, prefix, regex, present (got {value!r}): quote numbers"
        )
    return value


MatchedHeader = Annotated[str, BeforeValidator(_check_matched_header)]
ChangedHeader = Annotated[str, BeforeValidator(_check_changed_header)]
HeaderValue = Annotated[str, BeforeValidator(_check_header_value)]


class StringMatch(_Model):
    """A condition on a header or query parameter: exactly one field. A bare string means {exact: ...}."""

    exact: str | None = Field(None, description="A value equals this string (case-sensitive).")
    prefix: str | None = Field(None, description="A value starts with this string (case-sensitive).")
    regex: str | None = Field(None, description="A whole value matches this Python regular expression.")
    present: bool | None = Field(None, description="true: there is a value, whatever it is; false: there is none.")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        return None if value is None else _check_regex(value)

    @model_validator(mode="after")
    def _one(self) -> StringMatch:
        if sum(value is not None for value in (self.exact, self.prefix, self.regex, self.present)) != 1:
            raise ValueError("set exactly one of: exact, prefix, regex, present")
        return self


Matcher = Annotated[StringMatch, BeforeValidator(_string_match_shorthand)]
"""A StringMatch, also accepted as a bare string meaning {exact: ...}."""


class RouteMatch(_Model):
    """What a request must have for its route to be taken: every condition given must hold; none given matches all."""

    host: Annotated[list[Annotated[str, BeforeValidator(_check_host_pattern)]], BeforeValidator(_one_or_more)] = Field(
        default_factory=list,
        description="The request's authority (Host), without its port and ignoring case, is one of these: a name, "
        "or *.suffix for any name ending in .suffix. A single name may be given as a string.",
    )
    path: RoutePath | None = Field(None, description="The path (without the query) equals this.")
    path_prefix: RoutePath | None = Field(
        None,
        description="The path is this or continues it with '/': /api matches /api, /api/ and /api/v1, not /apis. "
        "A trailing '/' is ignored; / matches every path.",
    )
    path_regex: str | None = Field(None, description="The whole path matches this Python regular expression.")
    methods: list[Annotated[str, BeforeValidator(_check_method)]] = Field(
        default_factory=list, description="The method is one of these (upper-case); empty: any method."
    )
    headers: Annotated[dict[MatchedHeader, Matcher], BeforeValidator(_distinct_names)] = Field(
        default_factory=dict,
        description="Header name -> condition; a header given several times matches if any of its values does.",
    )
    query: dict[str, Matcher] = Field(
        default_factory=dict,
        description="Query parameter -> condition on its decoded value; a parameter given several times matches if "
        "any of its values does.",
    )

    @field_validator("path_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        return None if value is None else _check_regex(value)

    @model_validator(mode="after")
    def _one_path_condition(self) -> RouteMatch:
        given = [name for name in ("path", "path_prefix", "path_regex") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"set at most one of: path, path_prefix, path_regex (got {' and '.join(given)})")
        return self


class Destination(_Model):
    """Where a route sends requests: a service with cluster settings (upstreams[] or clusters[]), or part of it."""

    service: ServiceName = Field(description="The destination service: an upstreams[] or clusters[] service.")
    subset: dict[str, str] = Field(
        default_factory=dict,
        description="Only the endpoints whose meta has every one of these key/value pairs (e.g. version: v2); "
        "empty: all of them.",
    )


class WeightedDestination(_Model):
    """One destination of a traffic split."""

    to: Destination = Field(description="The destination.")
    weight: int = Field(ge=0, description="Its share: weight / the sum of the split's weights.")


class DirectResponse(_Model):
    """An answer the sidecar gives itself, without any upstream."""

    status: int = Field(ge=200, le=599, description="The response status.")
    body: str = Field("", description="The response body (UTF-8).")
    content_type: HeaderValue = Field("text/plain; charset=utf-8", description="The body's content-type.")

    @model_validator(mode="after")
    def _bodyless(self) -> DirectResponse:
        if self.body and self.status in (204, 304):
            raise ValueError(f"a {self.status} response has no body: leave body out")
        return self


class Redirect(_Model):
    """Answer with a redirect to the request's URL with the given parts replaced."""

    status: Literal[301, 302, 303, 307, 308] = Field(302, description="The redirect status.")
    scheme: Literal["http", "https"] | None = Field(None, description="Replaces the scheme.")
    host: Annotated[str, BeforeValidator(_check_redirect_host)] | None = Field(
        None, description="Replaces the host (without a port: see port)."
    )
    port: int | None = Field(
        None, ge=1, le=65535, description="The port; without it, a new scheme or host drops the request's port."
    )
    path: RoutePath | None = Field(None, description="Replaces the whole path (the query is kept).")
    prefix_rewrite: RoutePath | None = Field(
        None, description="Replaces the part of the path that match.path_prefix matched, as rewrite.prefix does."
    )

    @model_validator(mode="after")
    def _changes_something(self) -> Redirect:
        if self.path is not None and self.prefix_rewrite is not None:
            raise ValueError("set at most one of: path, prefix_rewrite")
        if all(getattr(self, name) is None for name in ("scheme", "host", "port", "path", "prefix_rewrite")):
            raise ValueError(
                "set at least one of: scheme, host, port, path, prefix_rewrite (a redirect to the same URL would loop)"
            )
        return self


class Mirror(_Model):
    """Copies of requests sent to another destination; their responses are discarded."""

    to: Destination = Field(description="Where the copies go.")
    percent: float = Field(100.0, ge=0, le=100, description="The share of the route's requests that is copied.")


class Rewrite(_Model):
    """Changes to a request before it is forwarded."""

    prefix: RoutePath | None = Field(
        None,
        description="Replaces the part of the path that match.path_prefix matched: with prefix /reviews, "
        "rewrite /v2 sends /reviews/1 as /v2/1, and rewrite / sends it as /1 and /reviews as /.",
    )
    host: Annotated[str, BeforeValidator(_check_authority)] | None = Field(
        None, description="Replaces the authority (Host or :authority), as host or host:port."
    )

    @model_validator(mode="after")
    def _something(self) -> Rewrite:
        if self.prefix is None and self.host is None:
            raise ValueError("set at least one of: prefix, host")
        return self


class HeaderChanges(_Model):
    """Header changes, applied in the order remove, set, add."""

    add: Annotated[dict[ChangedHeader, HeaderValue], BeforeValidator(_distinct_names)] = Field(
        default_factory=dict, description="Headers appended, beside any of the same name."
    )
    set: Annotated[dict[ChangedHeader, HeaderValue], BeforeValidator(_distinct_names)] = Field(
        default_factory=dict, description="Headers that replace every header of the same name."
    )
    remove: list[ChangedHeader] = Field(default_factory=list, description="Headers removed (every value).")

    @model_validator(mode="after")
    def _each_name_once(self) -> HeaderChanges:
        problems: list[_Problem] = []
        seen: dict[str, str] = {}
        named = [("remove", i, name) for i, name in enumerate(self.remove)]
        named += [("set", name, name) for name in self.set] + [("add", name, name) for name in self.add]
        for part, key, name in named:
            if name in seen:
                problems.append(((part, key), f"'{name}' is also in {seen[name]}: name each header in one place"))
            else:
                seen[name] = part
        _raise_problems(problems)
        return self


class FaultAbort(_Model):
    """Answer a share of the requests with an error instead of forwarding them."""

    percent: float = Field(100.0, ge=0, le=100, description="The share of the route's requests that is aborted.")
    status: int = Field(ge=400, le=599, description="The HTTP status of the answer.")
    grpc_status: int | None = Field(
        None, ge=1, le=16, description="For gRPC requests: the grpc-status of the answer (HTTP 200, trailers-only)."
    )


class FaultDelay(_Model):
    """Hold a share of the requests before forwarding them."""

    percent: float = Field(100.0, ge=0, le=100, description="The share of the route's requests that is delayed.")
    duration: Duration = Field(description="How long they are held.")


class Fault(_Model):
    """Injected faults, for testing how callers cope; delay and abort are drawn independently."""

    abort: FaultAbort | None = Field(None, description="Answer with an error instead of forwarding.")
    delay: FaultDelay | None = Field(None, description="Wait before forwarding (or before the abort).")

    @model_validator(mode="after")
    def _something(self) -> Fault:
        if self.abort is None and self.delay is None:
            raise ValueError("set at least one of: abort, delay")
        return self


class RouteTimeouts(_Model):
    """Time limits of one route's requests; a limit left out is the destination's."""

    request: Duration | None = Field(
        None, description="Replaces the destination's timeouts.request (retries included); 0 turns it off."
    )
    per_try: Duration | None = Field(
        None, description="Replaces the destination's retries.per_try_timeout; 0 turns it off."
    )


_ACTIONS = ("to", "split", "direct_response", "redirect")
_FORWARDING_ONLY = ("mirror", "rewrite", "request_headers", "timeouts", "retries", "hash_on")


class Route(_Model):
    """One route of a listener: requests that match are forwarded to its destination, or answered by it."""

    name: Annotated[str, BeforeValidator(_check_route_name)] | None = Field(
        None,
        description="The route's name in metrics, logs and the admin API; unique in its listener. Default: "
        "routes[<index>], which changes when routes are added above it.",
    )
    match: RouteMatch = Field(default_factory=RouteMatch, description="What a request must have; default: anything.")
    to: Destination | None = Field(None, description="Forward to this destination.")
    split: list[WeightedDestination] | None = Field(
        None, description="Forward each request to one of these, in proportion to their weights."
    )
    direct_response: DirectResponse | None = Field(None, description="Answer without forwarding.")
    redirect: Redirect | None = Field(None, description="Answer with a redirect.")
    mirror: Mirror | None = Field(None, description="Also send copies of the requests here (responses discarded).")
    rewrite: Rewrite | None = Field(None, description="Change the path prefix or the authority before forwarding.")
    request_headers: HeaderChanges | None = Field(None, description="Header changes before forwarding.")
    response_headers: HeaderChanges | None = Field(None, description="Header changes of the response to the client.")
    fault: Fault | None = Field(None, description="Injected delays and errors (off by default).")
    timeouts: RouteTimeouts | None = Field(None, description="Time limits replacing the destination's.")
    retries: RetrySettings | None = Field(
        None, description="Retry settings replacing the destination's (all of them) for this route's requests."
    )
    hash_on: HashOn | None = Field(
        None, description="What a ring_hash or maglev destination hashes for this route, instead of its own hash_on."
    )

    @property
    def action(self) -> str | None:
        """to, split, direct_response or redirect: the action given; None: forward to the listener's service."""
        return next((name for name in _ACTIONS if getattr(self, name) is not None), None)

    @model_validator(mode="after")
    def _consistent(self) -> Route:
        problems: list[_Problem] = []
        actions = [name for name in _ACTIONS if getattr(self, name) is not None]
        if len(actions) > 1:
            problems.append(
                ((), f"set at most one of: to, split, direct_response, redirect (got {' and '.join(actions)})")
            )
        if self.split == []:
            problems.append((("split",), "needs at least one destination"))
        elif self.split is not None and sum(entry.weight for entry in self.split) == 0:
            problems.append((("split",), "the weights add up to 0: give at least one destination a weight above 0"))
        if self.match.path_prefix is None:
            if self.rewrite is not None and self.rewrite.prefix is not None:
                problems.append((("rewrite", "prefix"), "needs match.path_prefix: it replaces the matched prefix"))
            if self.redirect is not None and self.redirect.prefix_rewrite is not None:
                problems.append(
                    (("redirect", "prefix_rewrite"), "needs match.path_prefix: it replaces the matched prefix")
                )
        answer = "direct_response" if self.direct_response is not None else "redirect" if self.redirect else None
        if answer is not None:
            problems += [
                ((name,), f"only a route that forwards uses it, and this one answers with its {answer}")
                for name in _FORWARDING_ONLY
                if getattr(self, name) is not None
            ]
        if self.request_headers is not None:
            changes = self.request_headers
            located = [("add", "host")] * ("host" in changes.add) + [("set", "host")] * ("host" in changes.set)
            located += [("remove", i) for i, name in enumerate(changes.remove) if name == "host"]
            problems += [
                (("request_headers", *loc), "change the authority (Host) with rewrite.host") for loc in located
            ]
        _raise_problems(problems)
        return self


def _route_list_problems(routes: list[Route]) -> list[_Problem]:
    problems: list[_Problem] = []
    named: dict[str, int] = {}
    for i, route in enumerate(routes):
        if route.name is None:
            continue
        if route.name in named:
            problems.append((("routes", i, "name"), f"'{route.name}' is already used by routes[{named[route.name]}]"))
        named.setdefault(route.name, i)
    return problems


class ServiceSettings(_Model):
    """The local application this sidecar sits beside."""

    name: ServiceName = Field(description="The service's mesh name; peers address it by this name.")
    app: AddressField = Field(description="Where the local application listens (the inbound forwards here).")
    protocol: Literal["http", "http2", "grpc", "tcp"] = Field(
        "http",
        description="What the application speaks: http (HTTP/1.1), http2 or grpc (HTTP/2 with prior knowledge), tcp.",
    )


class InboundSettings(_Model):
    """The listener peers (and the gateway) connect to; it forwards to the local application."""

    bind: AddressField = Field(Address("0.0.0.0", 15000), description="Address the inbound listener binds.")
    tls: Literal["mutual", "off"] = Field(
        "mutual",
        description="mutual: peers must present mesh certificates; off: plaintext (local trials only).",
    )
    allow: list[Annotated[str, BeforeValidator(_check_allowed_peer)]] = Field(
        default_factory=list,
        description="Callers allowed in: service names or full spiffe:// IDs; empty: as mesh.default_policy says.",
    )
    deny: list[Annotated[str, BeforeValidator(_check_allowed_peer)]] = Field(
        default_factory=list, description="Callers refused even if allowed: service names or full spiffe:// IDs."
    )
    upgrades: UpgradeList = Field(default_factory=lambda: ["websocket"])
    timeouts: Timeouts = Field(default_factory=Timeouts, description="Time limits of inbound requests.")
    limits: Limits = Field(default_factory=Limits, description="Resource limits of the inbound listener.")
    pool: PoolSettings = Field(default_factory=PoolSettings, description="Connections kept to the local app.")
    routes: list[Route] = Field(
        default_factory=list,
        description="L7 routes tried in order before requests reach the local app: rewrites, header changes, "
        "timeouts, faults, direct responses and redirects; a request no route matches goes to the app unchanged.",
    )

    @model_validator(mode="after")
    def _local_routes(self) -> InboundSettings:
        problems = _route_list_problems(self.routes)
        for i, route in enumerate(self.routes):
            problems += [
                (("routes", i, name), f"not allowed on the inbound: {_INBOUND_FORWARDS}")
                for name in ("to", "split", "mirror", "retries", "hash_on")
                if getattr(route, name) is not None
            ]
            if route.timeouts is not None and route.timeouts.per_try is not None:
                problems.append((("routes", i, "timeouts", "per_try"), "not allowed on the inbound: it never retries"))
        _raise_problems(problems)
        return self


_INBOUND_FORWARDS = "the inbound forwards only to the local app and never retries"


class ClusterFields(_Model):
    """The settings of a destination service's cluster (its endpoints, connections and policies), shared by
    upstreams[] and clusters[] entries."""

    service: ServiceName | None = Field(None, description="The mesh service.")
    protocol: Literal["http", "http2", "grpc", "tcp"] = Field(
        "http",
        description="What the application speaks to the listener: http, http2 or grpc (HTTP/1.1 and HTTP/2 are both "
        "accepted on any HTTP listener), or tcp (upstreams[] only); http2 and grpc make the mesh hop HTTP/2.",
    )
    mesh_http2: bool = Field(
        False,
        description="For protocol http: carry the requests over HTTP/2 on the mTLS mesh hop (one multiplexed "
        "connection per peer) instead of pooled HTTP/1.1 connections. http2 and grpc upstreams always use HTTP/2.",
    )
    tls: Literal["mutual", "off"] = Field(
        "mutual",
        description="mutual: the mesh hop uses mesh certificates; off: plaintext (local trials only).",
    )
    identity: Annotated[str, BeforeValidator(_check_allowed_peer)] | None = Field(
        None,
        description="The SPIFFE ID the peers must present; default: the service's ID in this mesh.",
    )
    timeouts: Timeouts = Field(default_factory=Timeouts, description="Time limits of requests to this service.")
    pool: PoolSettings = Field(default_factory=PoolSettings, description="Connections kept to peer sidecars.")
    balancer: BalancerSettings = Field(
        default_factory=BalancerSettings, description="How requests are spread over the endpoints."
    )
    outlier: OutlierSettings = Field(
        default_factory=OutlierSettings, description="Ejection of endpoints that keep failing."
    )
    circuit_breakers: CircuitBreakers = Field(
        default_factory=CircuitBreakers, description="Limits on connections and requests to this service."
    )
    retries: RetrySettings = Field(default_factory=RetrySettings, description="Which failed requests are re-sent.")
    hedging: HedgeSettings | None = Field(
        None, description="Send a second try for slow idempotent requests (off by default)."
    )
    health_check: HealthCheckSettings | None = Field(None, description="Active health checks (off by default).")


_LISTENER_TIMEOUTS = ("request_headers", "idle")


def _changed(model: BaseModel, names: tuple[str, ...]) -> list[str]:
    """The fields among `names` whose values differ from their defaults (a dumped config, which spells out every
    default, must read back)."""
    fields = type(model).model_fields
    return [name for name in names if getattr(model, name) != fields[name].get_default(call_default_factory=True)]


class ClusterSettings(ClusterFields):
    """A destination service that routes send requests to, with no listener of its own."""

    service: ServiceName = Field(description="The mesh service.")

    @field_validator("protocol")
    @classmethod
    def _http_only(cls, protocol: str) -> str:
        if protocol == "tcp":
            raise ValueError(
                "a cluster receives routed HTTP requests: use http, http2 or grpc (a tcp service needs an "
                "upstreams[] listener of its own)"
            )
        return protocol

    @model_validator(mode="after")
    def _no_listener_timeouts(self) -> ClusterSettings:
        _raise_problems(
            [
                (("timeouts", name), "a cluster has no listener: the listener a request arrives on sets this")
                for name in _changed(self.timeouts, _LISTENER_TIMEOUTS)
            ]
        )
        return self


class UpstreamSettings(ClusterFields):
    """A local listener the application calls to reach one mesh service, or, with routes, several."""

    service: ServiceName | None = Field(
        None,
        description="The mesh service this listener leads to; requests that no route matches go there. "
        "Required unless routes are given; without it, a request that no route matches gets 404.",
    )
    bind: AddressField = Field(description="Local address the application calls for this service.")
    upgrades: UpgradeList = Field(default_factory=lambda: ["websocket"])
    limits: Limits = Field(default_factory=Limits, description="Resource limits of this listener.")
    routes: list[Route] = Field(
        default_factory=list,
        description="L7 routes, tried in order: the first route whose conditions all hold takes the request; "
        "without routes every request goes to service.",
    )

    @model_validator(mode="after")
    def _routes_or_service(self) -> UpstreamSettings:
        problems = _route_list_problems(self.routes)
        if self.routes and self.protocol == "tcp":
            problems.append((("routes",), "a tcp listener relays bytes and cannot route: use http, http2 or grpc"))
        if self.service is None and not self.routes:
            problems.append((("service",), "required field missing"))
        elif self.service is None:
            problems += [((name,), _NO_SERVICE) for name in _changed(self, _SERVICE_ONLY)]
            problems += [(("timeouts", name), _NO_SERVICE) for name in _changed(self.timeouts, ("connect", "request"))]
            problems += [
                (
                    ("routes", i),
                    "needs to, split, direct_response or redirect: this listener has no service to "
                    "send the requests it matches to",
                )
                for i, route in enumerate(self.routes)
                if route.action is None
            ]
        _raise_problems(problems)
        return self


_NO_SERVICE = (
    "applies to the listener's service, and this listener has none: set it on the upstreams[] or clusters[] entry "
    "of each destination (a route's timeouts and retries replace the destination's)"
)
_SERVICE_ONLY = tuple(name for name in ClusterFields.model_fields if name not in ("service", "protocol", "timeouts"))


class EndpointSpec(_Model):
    """One instance of a service: a peer sidecar's inbound listener."""

    address: AddressField = Field(description="The peer sidecar's inbound address.")
    weight: int = Field(1, ge=1, le=1000, description="Relative share of traffic, 1-1000.")
    tags: tuple[str, ...] = Field((), description="Free-form labels, e.g. a version.")
    meta: dict[str, str] = Field(default_factory=dict, description="Free-form key/value metadata, e.g. a zone.")


Endpoint = Annotated[EndpointSpec, BeforeValidator(_endpoint_from_string)]
"""An EndpointSpec, also accepted from YAML as a bare "host:port" string."""


class RegistryFile(_Model):
    """The contents of a `file` discovery registry."""

    services: dict[ServiceName, list[Endpoint]] = Field(
        default_factory=dict, description="The endpoints of each service."
    )


def _consul_address_default() -> str:
    return os.environ.get("CONSUL_HTTP_ADDR") or "127.0.0.1:8500"


def _check_consul_address(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected host:port or http(s)://host:port (got {_show(value)})")
    text = value.strip().rstrip("/")
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme not in ("http", "https") or not rest or "/" in rest:
            raise ValueError(f"expected http://host:port or https://host:port (got {value!r})")
    else:
        rest = text
    try:
        urllib.parse.urlsplit(f"//{rest}").port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"invalid port in {value!r}") from None
    return text


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


class ConsulSettings(_Model):
    """The local Consul agent; the defaults come from Consul's own environment variables."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)  # defaults from the environment

    address: Annotated[str, BeforeValidator(_check_consul_address)] = Field(
        default_factory=_consul_address_default,
        description="host:port or http(s)://host:port of the local agent; default $CONSUL_HTTP_ADDR, else "
        "127.0.0.1:8500.",
    )
    ca_file: Path | None = Field(
        default_factory=lambda: _env_path("CONSUL_CACERT"),
        description="CA certificate to verify an https agent; default $CONSUL_CACERT.",
    )
    token: str | None = Field(
        default_factory=lambda: os.environ.get("CONSUL_HTTP_TOKEN") or None,
        description="ACL token, sent as X-Consul-Token and never logged; default $CONSUL_HTTP_TOKEN.",
    )
    token_file: Path | None = Field(
        default_factory=lambda: _env_path("CONSUL_HTTP_TOKEN_FILE"),
        description="A file holding the ACL token (read at start); default $CONSUL_HTTP_TOKEN_FILE.",
    )
    datacenter: str | None = Field(None, description="Datacenter to query and register in; default the agent's.")
    timeout: Duration = Field(10.0, description="Longest wait for a registration or check update call.")

    @field_validator("ca_file", "token_file")
    @classmethod
    def _resolve(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _from_config_dir(path, info)

    @property
    def base_url(self) -> str:
        """http(s)://host:port; plain host:port means http unless $CONSUL_HTTP_SSL is true (as Consul's CLI)."""
        if "://" in self.address:
            return self.address
        ssl = os.environ.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true")
        return f"{'https' if ssl else 'http'}://{self.address}"


class ConsulDiscoverySettings(_Model):
    """Endpoints from Consul's health API, kept fresh with blocking queries (the agent in `consul`)."""

    connect: bool = Field(
        True,
        description="true: /v1/health/connect/<service> (the services' sidecar proxies, i.e. their inbound "
        "listeners); false: /v1/health/service/<service> (the service instances themselves).",
    )
    tags: list[str] = Field(default_factory=list, description="Only instances carrying every one of these tags.")
    wait: Duration = Field(60.0, description="How long one blocking query may wait for a change (Consul's `wait`).")
    min_interval: Duration = Field(0.1, description="Never query one service more often than this.")
    retry_max: Duration = Field(5.0, description="Longest pause between attempts while Consul fails (jittered).")

    @field_validator("wait")
    @classmethod
    def _wait_range(cls, value: float) -> float:
        if not 1 <= value <= 600:
            raise ValueError("wait must be between 1s and 10m (Consul caps it at 10m)")
        return value


class DiscoverySettings(_Model):
    """Where the endpoints of upstream services come from: exactly one source."""

    static: dict[ServiceName, list[Endpoint]] | None = Field(None, description="Endpoints listed inline, per service.")
    file: Path | None = Field(
        None, description="A registry file (YAML or JSON), watched for changes; relative to the config file."
    )
    consul: ConsulDiscoverySettings | None = Field(
        None, description="Endpoints from the Consul agent configured in `consul`."
    )

    @field_validator("file")
    @classmethod
    def _resolve_file(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _from_config_dir(path, info)

    @model_validator(mode="after")
    def _one_source(self) -> DiscoverySettings:
        if sum(source is not None for source in (self.static, self.file, self.consul)) != 1:
            raise ValueError("set exactly one of: static, file, consul")
        return self


class IdentityFiles(_Model):
    """Certificate files of this sidecar's identity, watched and reloaded when they change."""

    cert: Path = Field(description="The sidecar's certificate (PEM; the leaf first, then any intermediates).")
    key: Path = Field(description="Its private key (PEM).")
    bundle: Path = Field(description="The trust bundle: the mesh CA root certificates (PEM).")

    @field_validator("cert", "key", "bundle")
    @classmethod
    def _resolve(cls, path: Path, info: ValidationInfo) -> Path:
        return _from_config_dir(path, info)


_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def _check_ca_url(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an https:// URL (got {_show(value)})")
    parts = urllib.parse.urlsplit(value.strip())
    if parts.scheme != "https":
        raise ValueError(f"the CA is reached over HTTPS: use https://host:port (got {value!r})")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError:
        raise ValueError(f"invalid port in {value!r}") from None
    if not parts.hostname or parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"expected https://host[:port][/path] without credentials, query or fragment (got {value!r})")
    return value.strip().rstrip("/")


def _check_fingerprint(value: object) -> str:
    text = value.replace(":", "").lower() if isinstance(value, str) else ""
    if not _FINGERPRINT.fullmatch(text):
        raise ValueError(
            f"expected a root's SHA-256 fingerprint: 64 hex digits, colons allowed, as `mesh ca inspect` prints it "
            f"(got {_show(value)})"
        )
    return text


class IdentityFromCA(_Model):
    """This sidecar's certificate from the mesh CA's signing API (`mesh ca serve`), renewed before it expires."""

    url: Annotated[str, BeforeValidator(_check_ca_url)] = Field(
        description="The CA's signing API, e.g. https://127.0.0.1:8400."
    )
    token_file: Path = Field(
        description="File holding this service's bootstrap token (`mesh ca token`), used for the first certificate."
    )
    bundle: Path | None = Field(
        None, description="The CA's trust bundle (PEM roots) to verify the CA with at start; or give fingerprint."
    )
    fingerprint: Annotated[str, BeforeValidator(_check_fingerprint)] | None = Field(
        None, description="Instead of bundle: the SHA-256 fingerprint of one CA root, to bootstrap trust from."
    )
    ttl: Annotated[Duration, Field(gt=0)] = Field(
        86400.0, description="Certificate lifetime asked for (the CA caps it)."
    )
    renew_at: float = Field(
        0.7, gt=0, lt=1, description="Fraction of the lifetime after which the certificate is renewed (±10 % jitter)."
    )
    bundle_refresh: Annotated[Duration, Field(gt=0)] = Field(
        300.0, description="How often the trust bundle is fetched again from the CA, independently of renewal."
    )

    @field_validator("token_file", "bundle")
    @classmethod
    def _resolve(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _from_config_dir(path, info)

    @model_validator(mode="after")
    def _one_trust_anchor(self) -> IdentityFromCA:
        if (self.bundle is None) == (self.fingerprint is None):
            raise ValueError("set exactly one of: bundle (a file of CA roots), fingerprint (of one CA root)")
        return self


class IdentitySettings(_Model):
    """Where this sidecar's certificate comes from."""

    files: IdentityFiles | None = Field(None, description="Certificate, key and bundle files.")
    ca: IdentityFromCA | None = Field(None, description="The mesh CA's signing API (`mesh ca serve`).")

    @model_validator(mode="after")
    def _one_source(self) -> IdentitySettings:
        if (self.files is None) == (self.ca is None):
            raise ValueError("set exactly one of: files: {cert, key, bundle}, ca: {url, token_file, bundle}")
        return self


class AdminSettings(_Model):
    """The admin listener: health, metrics and the running config."""

    bind: AddressField = Field(Address("127.0.0.1", 9901), description="Address the admin listener binds.")


class LogSettings(_Model):
    """Logging."""

    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")
    access_log: bool = Field(
        False,
        description="Log one JSON event per request or TCP connection (off by default, as in Envoy and Linkerd).",
    )


def _check_collector_url(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an http:// or https:// URL (got {_show(value)})")
    parts = urllib.parse.urlsplit(value.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"expected an OTLP/HTTP URL such as http://127.0.0.1:4318/v1/traces (got {value!r})")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError:
        raise ValueError(f"invalid port in {value!r}") from None
    if not parts.hostname or parts.username or parts.password or parts.fragment:
        raise ValueError(f"expected http(s)://host[:port]/path without credentials or fragment (got {value!r})")
    return value.strip()


class TracingSettings(_Model):
    """Distributed tracing: a span per hop (a server span on the inbound, a client span per try on the outbound),
    trace context forwarded (W3C always, and B3 as it arrived), spans exported to an OpenTelemetry collector."""

    collector: Annotated[str, BeforeValidator(_check_collector_url)] = Field(
        description="The collector's OTLP/HTTP traces URL, e.g. http://127.0.0.1:4318/v1/traces (Jaeger, Tempo and "
        "the OpenTelemetry Collector accept it)."
    )
    sampling: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of new traces recorded (0.0-1.0); a request that arrives with a sampling decision keeps "
        "it (parent-based). Lower it on busy services.",
    )
    max_queue: int = Field(2048, ge=1, description="Spans waiting for export at most; more are dropped and counted.")


class TelemetrySettings(_Model):
    """What the sidecar reports beyond its admin listener."""

    bind: AddressField | None = Field(
        None,
        description="A read-only telemetry listener (GET /metrics, GET /status) that Prometheus and `mesh status` "
        "can reach from other hosts, e.g. 0.0.0.0:9902; off by default. A registration advertises it in the "
        "service's meta as `mesh-telemetry`.",
    )
    tracing: TracingSettings | None = Field(None, description="Distributed tracing (off by default).")


class ShutdownSettings(_Model):
    """Graceful shutdown."""

    drain_timeout: Duration = Field(15.0, description="How long in-flight work may finish after a stop signal.")


IDENTITY_REQUIRED = (
    "mutual TLS needs this sidecar's certificate: set identity: {files: {cert, key, bundle}} "
    "(mesh ca issue writes them) or identity: {ca: {url, token_file, bundle}} (from mesh ca serve), "
    "or tls: off for a plaintext mesh hop (local trials only)"
)


class AppHealthSettings(_Model):
    """How the sidecar checks its local application before it tells Consul the service is healthy."""

    http_path: HttpPath | None = Field(
        None, description="GET this path on the application (a 2xx passes); null: a TCP connect to `service.app`."
    )
    interval: Duration = Field(10.0, description="Time between checks; each passing check refreshes the TTL.")
    timeout: Duration = Field(2.0, description="A check not answered in this time fails.")


class RegistrationSettings(_Model):
    """Registration in the local Consul agent: the application's service, with a TTL check this sidecar keeps
    passing while the application answers its health check, and this sidecar as its connect-proxy."""

    id: str | None = Field(None, description="The service ID; default <service>-<inbound port>.")
    address: str | None = Field(
        None,
        description="The address peers reach the inbound listener on; default the inbound bind address, or "
        "the agent's node address when that is a wildcard (0.0.0.0 or ::).",
    )
    tags: list[str] = Field(default_factory=list, description="Tags of both registrations (e.g. v2).")
    meta: dict[str, str] = Field(default_factory=dict, description="Meta of both registrations (e.g. zone: a).")
    health: AppHealthSettings = Field(default_factory=AppHealthSettings, description="The application's check.")
    ttl: Duration = Field(30.0, description="TTL of the service's check; it turns critical if not refreshed.")
    deregister_critical_after: Duration = Field(
        60.0, description="Consul removes the registration after it was critical this long (Consul's minimum: 1m)."
    )

    @model_validator(mode="after")
    def _ttl_above_interval(self) -> RegistrationSettings:
        if self.ttl <= self.health.interval:
            raise ValueError("ttl must be longer than health.interval, or the check expires between refreshes")
        return self


class SidecarConfig(_Model):
    """One sidecar: its service, its inbound listener, its upstreams and where their endpoints come from."""

    mesh: MeshSettings = Field(default_factory=MeshSettings, description="Mesh-wide identity settings.")
    service: ServiceSettings = Field(description="The local application this sidecar serves.")
    inbound: InboundSettings | None = Field(None, description="The listener for peers; null for a client-only sidecar.")
    upstreams: list[UpstreamSettings] = Field(default_factory=list, description="Services the application calls.")
    clusters: list[ClusterSettings] = Field(
        default_factory=list, description="Further services that routes send to, without listeners of their own."
    )
    discovery: DiscoverySettings | None = Field(None, description="Where upstream endpoints come from.")
    consul: ConsulSettings | None = Field(
        None,
        description="The local Consul agent, for discovery.consul and registration; when they are used and this "
        "is not set, the defaults (from $CONSUL_HTTP_ADDR and friends) apply.",
    )
    registration: RegistrationSettings | None = Field(
        None, description="Register the service and this sidecar in Consul; null: do not register."
    )
    identity: IdentitySettings | None = Field(
        None, description="This sidecar's certificate; required when any mesh hop uses tls: mutual."
    )
    admin: AdminSettings = Field(default_factory=AdminSettings, description="The admin listener.")
    log: LogSettings = Field(default_factory=LogSettings, description="Logging.")
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings, description="Tracing.")
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings, description="Graceful shutdown.")

    @model_validator(mode="after")
    def _check_consistency(self) -> SidecarConfig:
        _raise_problems([*_conflicts(self), *_route_problems(self), *_identity_missing(self), *_consul_defaults(self)])
        return self

    def cluster_settings(self) -> dict[str, UpstreamSettings | ClusterSettings]:
        """The cluster settings of every service that requests can be sent to, by service: the upstreams[] entries
        that name a service, and the clusters[] entries."""
        found: dict[str, UpstreamSettings | ClusterSettings] = {}
        for entry in [*self.upstreams, *self.clusters]:
            if entry.service is not None:
                found.setdefault(entry.service, entry)
        return found


_Problem = tuple[tuple[str | int, ...], str]


def _raise_problems(problems: list[_Problem]) -> None:
    """Report problems found across fields, each at its own path below the model being validated."""
    if problems:
        text = "\n".join(f"{_format_loc(loc)}: {message}" for loc, message in problems)
        raise PydanticCustomError("config_conflict", text, {"problems": tuple(problems)})


def _destination_entries(cfg: SidecarConfig) -> list[tuple[tuple[str | int, ...], ClusterFields]]:
    """(location, entry) of every upstreams[] entry with a service, then every clusters[] entry."""
    entries: list[tuple[tuple[str | int, ...], ClusterFields]] = [
        (("upstreams", i), upstream) for i, upstream in enumerate(cfg.upstreams) if upstream.service is not None
    ]
    return entries + [(("clusters", i), cluster) for i, cluster in enumerate(cfg.clusters)]


def _conflicts(cfg: SidecarConfig) -> list[_Problem]:
    problems: list[_Problem] = []
    first_use: dict[str, tuple[str | int, ...]] = {}
    for loc, entry in _destination_entries(cfg):
        service = typing.cast(str, entry.service)
        if service in first_use:
            problems.append(
                ((*loc, "service"), f"'{service}' is already configured by {_format_loc(first_use[service])}")
            )
        first_use.setdefault(service, loc)

    binds: list[tuple[tuple[str | int, ...], Address]] = []
    if cfg.inbound is not None:
        binds.append((("inbound", "bind"), cfg.inbound.bind))
    binds += [(("upstreams", i, "bind"), upstream.bind) for i, upstream in enumerate(cfg.upstreams)]
    binds.append((("admin", "bind"), cfg.admin.bind))
    if cfg.telemetry.bind is not None:
        binds.append((("telemetry", "bind"), cfg.telemetry.bind))
    for n, (loc, address) in enumerate(binds):
        same = [earlier_loc for earlier_loc, earlier in binds[:n] if earlier == address and address.port != 0]
        overlapping = [(earlier_loc, earlier) for earlier_loc, earlier in binds[:n] if _overlaps(address, earlier)]
        if same:
            problems.append((loc, f"{address} is already used by {_format_loc(same[0])}"))
        elif overlapping:
            earlier_loc, earlier = overlapping[0]
            problems.append((loc, f"{address} overlaps {earlier} used by {_format_loc(earlier_loc)}"))

    if cfg.registration is not None and cfg.inbound is None:
        problems.append((("registration",), "needs inbound: the registration advertises the inbound listener"))
    destinations = _destination_entries(cfg)
    if destinations and cfg.discovery is None:
        configured = "upstreams are" if destinations[0][0][0] == "upstreams" else "clusters are"
        problems.append((("discovery",), f"required when {configured} configured"))
    elif cfg.discovery is not None and cfg.discovery.static is not None:
        problems += [
            ((*loc, "service"), f"no endpoints for '{entry.service}' in discovery.static")
            for loc, entry in destinations
            if not cfg.discovery.static.get(typing.cast(str, entry.service))
        ]
    return problems


_HASHING = frozenset({"ring_hash", "maglev"})


def _route_problems(cfg: SidecarConfig) -> list[_Problem]:
    """Every destination a route names has cluster settings that can carry it; hash_on reaches a hashing balancer."""
    problems: list[_Problem] = []
    clusters = cfg.cluster_settings()

    def known(loc: tuple[str | int, ...], destination: Destination) -> bool:
        entry = clusters.get(destination.service)
        if entry is None:
            problems.append(
                ((*loc, "service"), f"unknown service '{destination.service}': add it to upstreams[] or clusters[]")
            )
        elif entry.protocol == "tcp":
            problems.append(
                ((*loc, "service"), f"'{destination.service}' is a tcp upstream: routes carry HTTP requests")
            )
        return entry is not None

    for i, upstream in enumerate(cfg.upstreams):
        for j, route in enumerate(upstream.routes):
            at: tuple[str | int, ...] = ("upstreams", i, "routes", j)
            targets = [route.to] if route.to is not None else [entry.to for entry in route.split or ()]
            located = [((*at, "to"), route.to)] if route.to is not None else []
            located += [((*at, "split", k, "to"), entry.to) for k, entry in enumerate(route.split or ())]
            located += [((*at, "mirror", "to"), route.mirror.to)] if route.mirror is not None else []
            resolved = all([known(loc, destination) for loc, destination in located])
            services = [target.service for target in targets]
            if route.action is None and upstream.service is not None:
                services = [upstream.service]
            if (
                route.hash_on is not None
                and resolved
                and not any(clusters[service].balancer.policy in _HASHING for service in services)
            ):
                problems.append(
                    ((*at, "hash_on"), "no destination of this route uses balancer policy ring_hash or maglev")
                )
    if cfg.inbound is not None and cfg.inbound.routes and cfg.service.protocol == "tcp":
        problems.append(
            (
                ("inbound", "routes"),
                "the local app speaks tcp (service.protocol): the inbound relays bytes and cannot route",
            )
        )
    return problems


_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})


def _overlaps(a: Address, b: Address) -> bool:
    """A wildcard bind takes its port on every local address, so it collides with any bind of that port."""
    return a.port == b.port != 0 and (a.host in _WILDCARD_HOSTS or b.host in _WILDCARD_HOSTS)


def _consul_defaults(cfg: SidecarConfig) -> list[_Problem]:
    """Fill in `consul` from the environment when discovery or registration needs the agent and it is unset."""
    uses_consul = cfg.registration is not None or (cfg.discovery is not None and cfg.discovery.consul is not None)
    if not uses_consul or cfg.consul is not None:
        return []
    try:
        consul = ConsulSettings()
    except ValidationError as exc:
        return [
            (("consul", *error["loc"]), f"from the environment: {error['msg'].removeprefix('Value error, ')}")
            for error in exc.errors()
        ]
    object.__setattr__(cfg, "consul", consul)  # the model is frozen; this runs while it is being built
    return []


def _identity_missing(cfg: SidecarConfig) -> list[_Problem]:
    if cfg.identity is not None:
        return []
    problems: list[_Problem] = []
    if cfg.inbound is not None and cfg.inbound.tls == "mutual":
        problems.append((("inbound", "tls"), IDENTITY_REQUIRED))
    problems += [
        ((*loc, "tls"), IDENTITY_REQUIRED) for loc, entry in _destination_entries(cfg) if entry.tls == "mutual"
    ]
    return problems


# --- loading ---


class _Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (so `tls: off` stays the word "off"), refusing duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _load_yaml(text: str, name: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        context = f" ({exc.context})" if exc.problem and exc.context else ""
        raise ConfigError([f"{name}: {where}{problem}{context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{name}: invalid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        got = "an empty document" if data is None else _show(data)
        raise ConfigError([f"{name}: the top level must be a mapping of settings (got {got})"])
    return data


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{os.fspath(path)}: cannot read file: it is not UTF-8 text"]) from None
    except OSError as exc:
        raise ConfigError([f"{os.fspath(path)}: cannot read file: {exc.strerror or exc}"]) from None


def parse_config(text: str, *, name: str, base_dir: Path) -> SidecarConfig:
    """Validate YAML text as a sidecar config; `name` prefixes errors, relative paths join base_dir."""
    data = _load_yaml(text, name)
    try:
        return SidecarConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, SidecarConfig, name)) from None


def load_config(path: str | Path) -> SidecarConfig:
    """Read and validate a sidecar config file; errors are prefixed with the path as given."""
    return parse_config(_read(path), name=os.fspath(path), base_dir=Path(path).parent)


def parse_registry(text: str, *, name: str) -> RegistryFile:
    """Validate YAML or JSON text as a `file` discovery registry; `name` prefixes errors."""
    data = _load_yaml(text, name)
    try:
        return RegistryFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, RegistryFile, name)) from None


def load_registry(path: str | Path) -> RegistryFile:
    """Read and validate a registry file (YAML or JSON); errors are prefixed with the path as given."""
    return parse_registry(_read(path), name=os.fspath(path))


def dump_config(cfg: SidecarConfig) -> dict[str, Any]:
    """The normalised config as JSON-able data: durations "15s", sizes "64KiB", addresses "host:port"."""
    return cfg.model_dump(mode="json")


_SECRET_KEY = re.compile(r"token|password|passwd|secret|key_file|private_key|credential", re.IGNORECASE)


def redact(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of dumped config with the values of secret-like keys (token, password, key_file...) hidden."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                key: "<redacted>"
                if isinstance(key, str) and _SECRET_KEY.search(key) and item is not None
                else walk(item)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return [walk(item) for item in value]
        return value

    return walk(d)


# --- valid, but worth a warning ---


class InboundDefault(NamedTuple):
    """What an mTLS inbound admits when no allow entry names the caller, and how to restrict it."""

    setting: str
    admits: str
    restrict: str


def inbound_default(cfg: SidecarConfig) -> InboundDefault | None:
    """Whom an mTLS inbound with an empty allow list admits (mesh.default_policy decides); None when there is no
    mTLS inbound or its allow list names the callers."""
    inbound = cfg.inbound
    if inbound is None or inbound.tls != "mutual" or inbound.allow:
        return None
    if cfg.mesh.default_policy == "deny":
        return InboundDefault(
            "inbound.allow",
            "no caller: inbound.allow is empty and mesh.default_policy is deny",
            "list the callers in inbound.allow",
        )
    return InboundDefault(
        "inbound.allow",
        f"every identity of trust domain '{cfg.mesh.trust_domain}': inbound.allow is empty and "
        "mesh.default_policy is allow",
        "list the callers in inbound.allow, or set mesh.default_policy: deny to admit none by default",
    )


_NOT_READY = "the sidecar is not ready, and refuses mutual TLS, until it can read it"


def unreadable_files(cfg: SidecarConfig) -> list[tuple[str, str]]:
    """(setting, message) for each file the config names that is not there now. A valid config may name files
    that appear later (the sidecar waits for them), so these are warnings; each message says what it costs."""
    files: list[tuple[str, Path | None, str]] = []
    if cfg.discovery is not None:
        unresolved = "the upstream services stay unresolved (503 discovery unavailable) until it can be read"
        files.append(("discovery.file", cfg.discovery.file, unresolved))
    if cfg.identity is not None and cfg.identity.files is not None:
        certs = cfg.identity.files.model_dump()  # cert, key, bundle: absolute paths
        files += [(f"identity.files.{name}", path, _NOT_READY) for name, path in certs.items()]
    if cfg.identity is not None and cfg.identity.ca is not None:
        ca = cfg.identity.ca
        files.append(("identity.ca.token_file", ca.token_file, "the CA issues no first certificate without it"))
        files.append(("identity.ca.bundle", ca.bundle, "the CA cannot be verified, so no certificate is asked for"))
    if cfg.consul is not None:
        files.append(("consul.ca_file", cfg.consul.ca_file, "the sidecar stops at its first call to the Consul agent"))
        files.append(("consul.token_file", cfg.consul.token_file, "the sidecar does not start without it"))
    problems = []
    for setting, path, cost in files:
        if path is None or path.is_file():
            continue
        state = "is not a file" if path.exists() else "does not exist"
        problems.append((setting, f"{path} {state}: {cost}"))
    return problems


# --- error wording ---


def _describe(exc: ValidationError, root: type[BaseModel], name: str) -> list[str]:
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        if error["type"] == "config_conflict":
            problems = [(loc + sub_loc, message) for sub_loc, message in error["ctx"]["problems"]]
        else:
            problems = [(loc, _message(error, root))]
        for problem_loc, message in problems:
            path = _format_loc(problem_loc)
            lines.append(f"{name}: {path}: {message}" if path else f"{name}: {message}")
    return lines


def _message(error: Any, root: type[BaseModel]) -> str:
    kind, loc, ctx, got = error["type"], tuple(error["loc"]), error.get("ctx", {}), _show(error["input"])
    if kind in ("value_error", "assertion_error"):
        return str(ctx["error"])
    if kind == "missing":
        return "required field missing"
    if kind == "extra_forbidden":
        model = _type_at(root, loc[:-1])
        allowed = ", ".join(model.model_fields) if _is_model(model) else ""
        return f"unknown field '{loc[-1]}' (allowed: {allowed})" if allowed else f"unknown field '{loc[-1]}'"
    if kind == "literal_error":
        literal = _type_at(root, loc)
        if typing.get_origin(literal) is Literal:
            choices = ", ".join(repr(choice) for choice in typing.get_args(literal))
        else:
            choices = ctx.get("expected", "")
        return f"must be one of: {choices} (got {got})"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {
            "greater_than_equal": ("at least", "ge"),
            "greater_than": ("more than", "gt"),
            "less_than_equal": ("at most", "le"),
            "less_than": ("less than", "lt"),
        }[kind]
        return f"must be {bound[0]} {ctx[bound[1]]} (got {got})"
    plain = _PLAIN.get(kind)
    if plain:
        return f"{plain} (got {got})"
    message = str(error["msg"]).replace("Input should be", "must be")
    return f"{message[:1].lower()}{message[1:]} (got {got})"


_PLAIN = {
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "path_type": "must be a file path",
}


def _format_loc(loc: tuple[str | int, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "[key]":  # a bad mapping key: the message names it, the path already ends with it
            path += f".{part}" if path else str(part)
    return path


def _is_model(tp: object) -> typing.TypeGuard[type[BaseModel]]:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional so the walk sees the model, list or dict underneath."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [arg for arg in typing.get_args(tp) if arg is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _type_at(root: type[BaseModel], loc: tuple[str | int, ...]) -> Any:
    """The declared type at an error location, to name allowed fields and choices."""
    tp: Any = root
    for part in loc:
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if _is_model(tp) and isinstance(part, str) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        elif origin in (list, tuple) and isinstance(part, int):
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    return _unwrap(tp)


def _show(value: object) -> str:
    """A YAML value as a user would recognise it in a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)
