"""Sidecar config parsing: defaults, value syntaxes, cross-field checks and the exact wording of errors."""

import json
from pathlib import Path

import pydantic
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from mesh.config import (
    IDENTITY_REQUIRED,
    Address,
    ConfigError,
    EndpointSpec,
    InboundDefault,
    InboundSettings,
    Limits,
    SidecarConfig,
    Timeouts,
    dump_config,
    format_duration,
    format_size,
    inbound_default,
    load_config,
    load_registry,
    parse_config,
    parse_duration,
    parse_size,
    redact,
    unreadable_files,
)
from mesh.proxy import h2_limits

FIXTURES = Path(__file__).parent.parent / "fixtures" / "configs"
MINIMAL = "service: {name: web, app: 127.0.0.1:8080}\n"
NAME_RULE = "use 1-63 lowercase letters, digits and '-', starting with a letter"


def parse(text: str) -> SidecarConfig:
    return parse_config(text, name="sidecar.yaml", base_dir=Path("/etc/mesh"))


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return caught.value.errors


@pytest.fixture
def in_fixtures(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(FIXTURES)
    return FIXTURES


# --- valid configs ---


def test_full_example_loads() -> None:
    cfg = load_config(FIXTURES / "valid-web.yaml")
    assert cfg.service.name == "web"
    assert cfg.service.app == Address("127.0.0.1", 8080)
    assert cfg.inbound is not None
    assert cfg.inbound.tls == "off"  # YAML 1.1 would have read `off` as false
    assert cfg.inbound.allow == ["frontend", "spiffe://mesh.local/ns/default/dc/dc1/svc/gateway"]
    assert cfg.inbound.timeouts == Timeouts(request_headers=5.0, idle=1800.0)
    assert cfg.inbound.limits.max_body_bytes == 10 * 1024 * 1024
    api, db = cfg.upstreams
    assert (api.service, api.bind, api.timeouts.connect, api.timeouts.request) == (
        "api",
        Address("127.0.0.1", 9001),
        0.25,
        1.5,
    )
    assert api.pool.max_idle_per_endpoint == 16
    assert api.pool.idle_timeout == 90.0
    assert (db.protocol, db.bind, str(db.bind)) == ("tcp", Address("::1", 9002), "[::1]:9002")
    assert cfg.discovery is not None
    assert cfg.discovery.file == FIXTURES.resolve() / "registry.yaml"
    assert (cfg.log.level, cfg.log.access_log) == ("debug", False)
    assert cfg.shutdown.drain_timeout == 60.0


def test_dump_round_trips() -> None:
    cfg = load_config(FIXTURES / "valid-web.yaml")
    dumped = dump_config(cfg)
    assert json.loads(json.dumps(dumped)) == dumped
    assert parse_config(yaml.safe_dump(dumped), name="again.yaml", base_dir=Path("/elsewhere")) == cfg
    assert dumped["upstreams"][0]["timeouts"] == {
        "connect": "250ms",
        "request_headers": "10s",
        "request": "1.5s",
        "idle": "1h",
    }
    assert dumped["inbound"]["limits"]["max_body_bytes"] == "10MiB"
    assert dumped["upstreams"][1]["bind"] == "[::1]:9002"
    assert dumped["discovery"]["file"] == str(FIXTURES.resolve() / "registry.yaml")


def test_relative_registry_path_resolves_against_the_config_directory(in_fixtures: Path) -> None:
    cfg = load_config("valid-web.yaml")
    assert cfg.discovery is not None
    assert cfg.discovery.file == in_fixtures.resolve() / "registry.yaml"
    cfg = parse("service: {name: web, app: 127.0.0.1:8080}\ndiscovery: {file: ../reg/r.json}\n")
    assert cfg.discovery is not None
    assert cfg.discovery.file == Path("/etc/reg/r.json")


def test_client_only_sidecar_with_static_endpoints() -> None:
    cfg = load_config(FIXTURES / "valid-static.yaml")
    assert cfg.inbound is None
    assert cfg.discovery is not None and cfg.discovery.static is not None
    assert cfg.discovery.static["api"] == [
        EndpointSpec(address=Address("127.0.0.1", 15001)),
        EndpointSpec(address=Address("127.0.0.1", 15011), weight=2),
    ]


def test_defaults() -> None:
    cfg = parse(MINIMAL)
    assert (cfg.mesh.trust_domain, cfg.mesh.namespace, cfg.mesh.datacenter) == (
        "mesh.local",
        "default",
        "dc1",
    )
    assert cfg.service.protocol == "http"
    assert cfg.inbound is None
    assert cfg.upstreams == []
    assert cfg.discovery is None
    assert cfg.admin.bind == Address("127.0.0.1", 9901)
    assert (cfg.log.level, cfg.log.access_log) == ("info", False)
    assert cfg.shutdown.drain_timeout == 15.0

    inbound = InboundSettings()
    assert (inbound.bind, inbound.tls, inbound.allow) == (Address("0.0.0.0", 15000), "mutual", [])
    assert Timeouts() == Timeouts(connect=1.0, request_headers=10.0, request=15.0, idle=3600.0)
    assert Limits() == Limits(max_connections=10000, max_header_bytes=65536, max_header_count=100)
    assert Limits().max_body_bytes is None
    assert dump_config(cfg) == {
        "mesh": {"trust_domain": "mesh.local", "namespace": "default", "datacenter": "dc1", "default_policy": "allow"},
        "service": {"name": "web", "app": "127.0.0.1:8080", "protocol": "http"},
        "inbound": None,
        "upstreams": [],
        "clusters": [],
        "discovery": None,
        "consul": None,
        "registration": None,
        "identity": None,
        "admin": {"bind": "127.0.0.1:9901"},
        "log": {"level": "info", "access_log": False},
        "telemetry": {"bind": None, "tracing": None},
        "shutdown": {"drain_timeout": "15s"},
    }


def test_upstream_defaults_are_dumped_in_their_compact_forms() -> None:
    cfg = parse(
        MINIMAL + "upstreams: [{service: api, bind: 127.0.0.1:9001, tls: off}]\n"
        "discovery: {static: {api: [127.0.0.1:15001]}}\n"
    )
    upstream = dump_config(cfg)["upstreams"][0]
    assert upstream == {
        "service": "api",
        "bind": "127.0.0.1:9001",
        "protocol": "http",
        "mesh_http2": False,
        "tls": "off",
        "identity": None,
        "upgrades": ["websocket"],
        "timeouts": {"connect": "1s", "request_headers": "10s", "request": "15s", "idle": "1h"},
        "limits": {
            "max_connections": 10000,
            "max_header_bytes": "64KiB",
            "max_header_count": 100,
            "max_body_bytes": None,
            "request_buffer": "64KiB",
            "http2": {
                "max_concurrent_streams": 100,
                "stream_window": "1MiB",
                "connection_window": "16MiB",
                "max_frame_size": "16KiB",
            },
        },
        "pool": {"max_idle_per_endpoint": 1024, "idle_timeout": "1m"},
        "balancer": {"policy": "p2c_ewma", "rtt": "30ms", "decay": "10s", "hash_on": None},
        "outlier": {
            "consecutive_failures": 5,
            "base_ejection": "30s",
            "max_ejection": "5m",
            "max_ejected_percent": 50,
            "success_rate": None,
        },
        "circuit_breakers": {"max_connections": 1024, "max_pending": 1024, "max_requests": 1024},
        "retries": {
            "attempts": 2,
            "on": ["connect_failure", "reset", "per_try_timeout"],
            "statuses": [502, 503, 504],
            "grpc_statuses": ["unavailable"],
            "methods": "idempotent",
            "per_try_timeout": "0s",
            "backoff_base": "25ms",
            "backoff_max": "250ms",
            "retry_after_max": "1s",
            "max_body_bytes": "64KiB",
            "budget": {"percent": 20, "min_per_second": 10.0, "window": "10s"},
        },
        "hedging": None,
        "health_check": None,
        "routes": [],
    }


def test_models_are_frozen_and_reject_unknown_fields() -> None:
    cfg = parse(MINIMAL)
    with pytest.raises(pydantic.ValidationError):
        cfg.service.name = "other"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        Timeouts(conect=1.0)  # type: ignore[call-arg]


# --- durations, sizes, addresses ---


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("0s", 0.0),
        ("0", 0.0),
        ("10", 10.0),
        ("0.5", 0.5),
        (7, 7.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_duration_forms(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert Timeouts(connect=text).connect == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.25, "250ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (90.0, "1m30s"),
        (120.0, "2m"),
        (3600.0, "1h"),
        (5400.0, "1h30m"),
        (0.0005, "0.0005s"),
    ],
)
def test_duration_is_written_compactly(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**12))
def test_duration_text_reads_back(micros: int) -> None:
    seconds = micros / 1_000_000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1s", "duration must not be negative (got '-1s')"),
        ("-3", "duration must not be negative (got -3)"),
        ("1x", "invalid duration '1x' (use e.g. 250ms, 1.5s, 2m, 1h30m or a number of seconds)"),
        ("1h-30m", "invalid duration '1h-30m' (use e.g. 250ms, 1.5s, 2m, 1h30m or a number of seconds)"),
        ("''", "invalid duration '' (use e.g. 250ms, 1.5s, 2m, 1h30m or a number of seconds)"),
        ("true", "expected a duration, use e.g. 250ms, 1.5s, 2m, 1h30m or a number of seconds (got true)"),
    ],
)
def test_bad_durations(value: str, message: str) -> None:
    assert errors_of(MINIMAL + f"shutdown: {{drain_timeout: {value}}}\n") == [
        f"sidecar.yaml: shutdown.drain_timeout: {message}"
    ]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64KiB", 65536),
        ("10MiB", 10 << 20),
        ("1GiB", 1 << 30),
        ("1000", 1000),
        (1000, 1000),
        ("1.5KiB", 1536),
    ],
)
def test_size_forms(text: str | int, size: int) -> None:
    assert parse_size(text) == size
    assert Limits(max_body_bytes=text).max_body_bytes == size  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("size", "text"), [(65536, "64KiB"), (10 << 20, "10MiB"), (1 << 30, "1GiB"), (1000, "1000B"), (0, "0B")]
)
def test_size_is_written_in_the_largest_unit(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10MB", "invalid size '10MB' (use a number of bytes or KiB, MiB, GiB, e.g. 64KiB)"),
        ("-1", "size must not be negative (got '-1')"),
        ("0.5B", "size '0.5B' is not a whole number of bytes"),
        ("0", "must be at least 1 (got '0')"),
    ],
)
def test_bad_sizes(value: str, message: str) -> None:
    text = MINIMAL + f"inbound: {{tls: off, limits: {{max_header_bytes: '{value}'}}}}\n"
    assert errors_of(text) == [f"sidecar.yaml: inbound.limits.max_header_bytes: {message}"]


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:80", Address("127.0.0.1", 80)),
        ("localhost:8080", Address("localhost", 8080)),
        ("0.0.0.0:0", Address("0.0.0.0", 0)),
        ("[::1]:80", Address("::1", 80)),
        ("[::]:65535", Address("::", 65535)),
    ],
)
def test_address_forms(text: str, address: Address) -> None:
    assert parse(f"service: {{name: web, app: '{text}'}}").service.app == address
    assert str(address) == text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("'127.0.0.1:99999'", "port 99999 out of range"),
        ("127.0.0.1", "expected host:port (got '127.0.0.1')"),
        ("8080", "expected host:port (got 8080)"),
        ("':8080'", "expected host:port, the host is empty (got ':8080')"),
        ("'::1:80'", "put IPv6 addresses in brackets, e.g. [::1]:80 (got '::1:80')"),
        ("'[::1]80'", "expected [ipv6]:port (got '[::1]80')"),
        ("'[nope]:80'", "invalid IPv6 address 'nope'"),
        ("'web:http'", "expected host:port, 'http' is not a port number"),
        ("'my host:80'", "invalid host 'my host'"),
    ],
)
def test_bad_addresses(value: str, message: str) -> None:
    assert errors_of(f"service: {{name: web, app: {value}}}") == [f"sidecar.yaml: service.app: {message}"]


# --- broken configs: one exact line each ---


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("broken-port.yaml", ["upstreams[1].bind: port 99999 out of range"]),
        (
            "broken-unknown-key.yaml",
            [
                "upstreams[0].timeout: unknown field 'timeout' "
                "(allowed: service, protocol, mesh_http2, tls, identity, timeouts, pool, balancer, outlier, "
                "circuit_breakers, retries, hedging, health_check, bind, upgrades, limits, routes)"
            ],
        ),
        ("broken-protocol.yaml", ["upstreams[0].protocol: must be one of: 'http', 'http2', 'grpc', 'tcp' (got 'udp')"]),
        (
            "broken-duplicate-bind.yaml",
            ["upstreams[1].bind: 127.0.0.1:9001 is already used by upstreams[0].bind"],
        ),
        ("broken-missing-discovery.yaml", ["discovery: required when upstreams are configured"]),
        ("broken-yaml-syntax.yaml", ["line 3, column 8: mapping values are not allowed here"]),
        (
            "broken-tls-mutual.yaml",
            [f"inbound.tls: {IDENTITY_REQUIRED}"],
        ),
        (
            "broken-static-missing-service.yaml",
            ["upstreams[1].service: no endpoints for 'db' in discovery.static"],
        ),
    ],
)
def test_broken_fixture(in_fixtures: Path, fixture: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(fixture)
    assert caught.value.errors == [f"{fixture}: {line}" for line in expected]
    assert str(caught.value) == "\n".join(caught.value.errors)


def test_error_prefix_is_the_path_as_given() -> None:
    path = FIXTURES / "broken-port.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == [f"{path}: upstreams[1].bind: port 99999 out of range"]


def test_every_problem_is_reported() -> None:
    text = """
mesh: {colour: blue}
service: {name: Web_1, app: 127.0.0.1:8080, protocol: udp}
inbound: {tls: false, allow: [Frontend], limits: {max_connections: 0}}
log: {access_log: maybe}
"""
    assert errors_of(text) == [
        "sidecar.yaml: mesh.colour: unknown field 'colour' "
        "(allowed: trust_domain, namespace, datacenter, default_policy)",
        f"sidecar.yaml: service.name: invalid service name 'Web_1': {NAME_RULE}",
        "sidecar.yaml: service.protocol: must be one of: 'http', 'http2', 'grpc', 'tcp' (got 'udp')",
        "sidecar.yaml: inbound.tls: must be one of: 'mutual', 'off' (got false)",
        "sidecar.yaml: inbound.allow[0]: expected a service name or a spiffe:// ID (got 'Frontend')",
        "sidecar.yaml: inbound.limits.max_connections: must be at least 1 (got 0)",
        "sidecar.yaml: log.access_log: must be true or false (got 'maybe')",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["the top level must be a mapping of settings (got an empty document)"]),
        ("- web\n", ["the top level must be a mapping of settings (got a list)"]),
        ("service: {}\n", ["service.name: required field missing", "service.app: required field missing"]),
        ("{}", ["service: required field missing"]),
        (
            MINIMAL + "colour: blue\n",
            [
                "colour: unknown field 'colour' "
                "(allowed: mesh, service, inbound, upstreams, clusters, discovery, consul, registration, identity, "
                "admin, log, telemetry, shutdown)"
            ],
        ),
        ("service: {name: web, name: api, app: 127.0.0.1:1}\n", ["line 1, column 22: duplicate key 'name'"]),
        ("service: [web]\n", ["service: must be a mapping (got a list)"]),
        (MINIMAL + "upstreams:\n", ["upstreams: must be a list (got null)"]),
        (MINIMAL + "discovery: {}\n", ["discovery: set exactly one of: static, file, consul"]),
        (
            MINIMAL + "discovery: {file: r.yaml, static: {}}\n",
            ["discovery: set exactly one of: static, file, consul"],
        ),
        (
            MINIMAL + "discovery: {static: {API: [127.0.0.1:1]}}\n",
            [f"discovery.static.API: invalid service name 'API': {NAME_RULE}"],
        ),
        (
            MINIMAL + "discovery: {static: {api: [{address: 127.0.0.1:1, weight: 1001}]}}\n",
            ["discovery.static.api[0].weight: must be at most 1000 (got 1001)"],
        ),
        (
            MINIMAL + "upstreams: [{service: api, bind: 127.0.0.1:1, tls: off, balancer: {policy: p2c}}]\n"
            "discovery: {file: r.yaml}\n",
            [
                "upstreams[0].balancer.policy: must be one of: 'p2c_ewma', 'round_robin', 'random', "
                "'least_request', 'ring_hash', 'maglev' (got 'p2c')"
            ],
        ),
        (
            MINIMAL + "inbound: {tls: off, allow: ['spiffe://']}\n",
            ["inbound.allow[0]: invalid SPIFFE ID 'spiffe://': expected spiffe://<trust-domain>/<path>"],
        ),
        (
            "mesh: {trust_domain: Mesh.Local}\n" + MINIMAL,
            ["mesh.trust_domain: invalid trust domain 'Mesh.Local': use lowercase letters, digits, '.', '-' and '_'"],
        ),
    ],
)
def test_error_wording(text: str, expected: list[str]) -> None:
    assert errors_of(text) == [f"sidecar.yaml: {line}" for line in expected]


def test_cross_field_checks_name_the_offending_field() -> None:
    text = """
service: {name: web, app: 127.0.0.1:8080}
inbound: {bind: 0.0.0.0:9001, tls: off}
upstreams:
  - {service: api, bind: 127.0.0.1:9001, tls: off}
  - {service: api, bind: 127.0.0.1:9002}
  - {service: db, bind: 127.0.0.1:9901, tls: off}
"""
    assert errors_of(text) == [
        "sidecar.yaml: upstreams[1].service: 'api' is already configured by upstreams[0]",
        "sidecar.yaml: upstreams[0].bind: 127.0.0.1:9001 overlaps 0.0.0.0:9001 used by inbound.bind",
        "sidecar.yaml: admin.bind: 127.0.0.1:9901 is already used by upstreams[2].bind",
        "sidecar.yaml: discovery: required when upstreams are configured",
        f"sidecar.yaml: upstreams[1].tls: {IDENTITY_REQUIRED}",
    ]


def test_port_zero_binds_never_collide() -> None:
    cfg = parse(
        MINIMAL + "inbound: {bind: 0.0.0.0:0, tls: off}\nadmin: {bind: 127.0.0.1:0}\n"
        "upstreams: [{service: api, bind: 127.0.0.1:0, tls: off}]\ndiscovery: {file: r.yaml}\n"
    )
    assert cfg.admin.bind.port == 0


def test_mutual_tls_needs_an_identity() -> None:
    text = MINIMAL + "inbound: {}\nupstreams: [{service: api, bind: 127.0.0.1:9001}]\ndiscovery: {file: r.yaml}\n"
    assert errors_of(text) == [
        f"sidecar.yaml: inbound.tls: {IDENTITY_REQUIRED}",
        f"sidecar.yaml: upstreams[0].tls: {IDENTITY_REQUIRED}",
    ]
    cfg = parse(text + "identity: {files: {cert: certs/cert.pem, key: certs/key.pem, bundle: certs/bundle.pem}}\n")
    assert cfg.identity.files.cert.name == "cert.pem" and cfg.identity.files.cert.is_absolute()
    assert cfg.inbound.tls == "mutual" and cfg.upstreams[0].identity is None


def test_identity_from_the_ca() -> None:
    cfg = parse(MINIMAL + "identity: {ca: {url: https://127.0.0.1:8400/, token_file: web.token, bundle: ca.pem}}\n")
    ca = cfg.identity.ca
    assert cfg.identity.files is None
    assert (ca.url, ca.token_file, ca.bundle, ca.fingerprint) == (
        "https://127.0.0.1:8400",
        Path("/etc/mesh/web.token"),
        Path("/etc/mesh/ca.pem"),
        None,
    )
    assert (ca.ttl, ca.renew_at, ca.bundle_refresh) == (86400.0, 0.7, 300.0)
    dumped = dump_config(cfg)["identity"]["ca"]
    assert dumped["ttl"] == "24h" and dumped["bundle_refresh"] == "5m"
    assert redact(dump_config(cfg))["identity"]["ca"]["token_file"] == "<redacted>"

    colons = ":".join(["3D"] * 32)  # as `mesh ca inspect` and openssl print it
    text = f"identity: {{ca: {{url: 'https://ca.internal', token_file: t, fingerprint: '{colons}', ttl: 1h, "
    cfg = parse(MINIMAL + text + "renew_at: 0.5, bundle_refresh: 30s}}\n")
    assert cfg.identity.ca.fingerprint == "3d" * 32 and cfg.identity.ca.bundle is None
    assert (cfg.identity.ca.ttl, cfg.identity.ca.renew_at, cfg.identity.ca.bundle_refresh) == (3600.0, 0.5, 30.0)


@pytest.mark.parametrize(
    ("identity", "error"),
    [
        ("{}", "identity: set exactly one of: files: {cert, key, bundle}, ca: {url, token_file, bundle}"),
        (
            "{files: {cert: c, key: k, bundle: b}, ca: {url: 'https://ca', token_file: t, bundle: b}}",
            "identity: set exactly one of: files: {cert, key, bundle}, ca: {url, token_file, bundle}",
        ),
        (
            "{ca: {url: 'https://ca', token_file: t}}",
            "identity.ca: set exactly one of: bundle (a file of CA roots), fingerprint (of one CA root)",
        ),
        (
            f"{{ca: {{url: 'https://ca', token_file: t, bundle: b, fingerprint: '{'a' * 64}'}}}}",
            "identity.ca: set exactly one of: bundle (a file of CA roots), fingerprint (of one CA root)",
        ),
        (
            "{ca: {url: 'http://ca:8400', token_file: t, bundle: b}}",
            "identity.ca.url: the CA is reached over HTTPS: use https://host:port (got 'http://ca:8400')",
        ),
        (
            "{ca: {url: 'https://ca:99999', token_file: t, bundle: b}}",
            "identity.ca.url: invalid port in 'https://ca:99999'",
        ),
        (
            "{ca: {url: 'https://u:p@ca?x=1', token_file: t, bundle: b}}",
            "identity.ca.url: expected https://host[:port][/path] without credentials, query or fragment "
            "(got 'https://u:p@ca?x=1')",
        ),
        ("{ca: {token_file: t, bundle: b}}", "identity.ca.url: required field missing"),
        (
            "{ca: {url: 'https://ca', token_file: t, fingerprint: 'ab:cd'}}",
            "identity.ca.fingerprint: expected a root's SHA-256 fingerprint: 64 hex digits, colons allowed, as "
            "`mesh ca inspect` prints it (got 'ab:cd')",
        ),
        (
            "{ca: {url: 'https://ca', token_file: t, bundle: b, ttl: 0s}}",
            "identity.ca.ttl: must be more than 0 (got '0s')",
        ),
        (
            "{ca: {url: 'https://ca', token_file: t, bundle: b, renew_at: 1}}",
            "identity.ca.renew_at: must be less than 1.0 (got 1)",
        ),
        (
            "{ca: {url: 'https://ca', token_file: t, bundle: b, bundle_refresh: 0}}",
            "identity.ca.bundle_refresh: must be more than 0 (got 0)",
        ),
        (
            "{ca: {url: 'https://ca', token_file: t, bundle: b, token: x}}",
            "identity.ca.token: unknown field 'token' (allowed: url, token_file, bundle, fingerprint, ttl, renew_at, "
            "bundle_refresh)",
        ),
    ],
)
def test_identity_errors(identity: str, error: str) -> None:
    assert errors_of(MINIMAL + f"identity: {identity}\n") == [f"sidecar.yaml: {error}"]


def test_direct_model_validation_still_names_paths() -> None:
    with pytest.raises(pydantic.ValidationError, match=r"discovery: required when upstreams are configured"):
        SidecarConfig.model_validate(
            {
                "service": {"name": "web", "app": "127.0.0.1:8080"},
                "upstreams": [{"service": "api", "bind": "127.0.0.1:9001", "tls": "off"}],
            }
        )


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert caught.value.errors == [f"{missing}: cannot read file: No such file or directory"]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError) as caught:
        load_config(binary)
    assert caught.value.errors == [f"{binary}: cannot read file: it is not UTF-8 text"]


# --- registry files ---


def test_registry_file() -> None:
    registry = load_registry(FIXTURES / "registry.yaml")
    assert registry.services["api"] == [
        EndpointSpec(address=Address("127.0.0.1", 15001), weight=3, tags=("v1",), meta={"zone": "a"}),
        EndpointSpec(address=Address("127.0.0.1", 15011)),
    ]
    assert registry.services["db"] == [EndpointSpec(address=Address("127.0.0.1", 15002))]


def test_registry_file_may_be_json(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"services": {"api": [{"address": "[::1]:15001", "tags": ["v2"]}]}}))
    assert load_registry(path).services["api"][0] == EndpointSpec(address=Address("::1", 15001), tags=("v2",))


def test_broken_registry(in_fixtures: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_registry("broken-registry.yaml")
    assert caught.value.errors == [
        "broken-registry.yaml: services.api[0].weight: must be at least 1 (got 0)",
        "broken-registry.yaml: services.api[1].address: expected host:port (got 'localhost')",
    ]


# --- redaction ---


def test_redact_hides_secret_values_only() -> None:
    data = {
        "identity": {"ca": {"url": "https://ca:8400", "token_file": "web.token", "password": None}},
        "list": [{"client_secret": "s3cret", "name": "x"}],
        "files": {"key_file": "key.pem", "cert": "cert.pem"},
        "max_idle_per_endpoint": 1024,
    }
    assert redact(data) == {
        "identity": {"ca": {"url": "https://ca:8400", "token_file": "<redacted>", "password": None}},
        "list": [{"client_secret": "<redacted>", "name": "x"}],
        "files": {"key_file": "<redacted>", "cert": "cert.pem"},
        "max_idle_per_endpoint": 1024,
    }
    assert data["files"]["key_file"] == "key.pem"  # the input is left alone


CONSUL_USER = MINIMAL + (
    "inbound: {bind: 127.0.0.1:15000, tls: off}\n"
    "upstreams: [{service: api, bind: 127.0.0.1:9001, tls: off}]\n"
    "discovery: {consul: {}}\n"
)


def test_consul_defaults_come_from_consuls_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "https://10.0.0.5:8501")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cret")
    monkeypatch.setenv("CONSUL_CACERT", "/etc/consul/ca.pem")
    cfg = parse(CONSUL_USER)
    assert cfg.consul is not None
    assert (cfg.consul.address, cfg.consul.base_url) == ("https://10.0.0.5:8501", "https://10.0.0.5:8501")
    assert (cfg.consul.token, cfg.consul.ca_file) == ("s3cret", Path("/etc/consul/ca.pem"))
    assert redact(dump_config(cfg))["consul"]["token"] == "<redacted>"
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "10.0.0.5:8500")
    monkeypatch.setenv("CONSUL_HTTP_SSL", "true")
    assert parse(CONSUL_USER).consul.base_url == "https://10.0.0.5:8500"  # type: ignore[union-attr]


def test_a_bad_consul_environment_is_an_error_only_where_consul_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "http://bad:port")
    assert parse(MINIMAL).consul is None  # not used: the environment is not read
    with pytest.raises(ConfigError) as caught:
        parse(CONSUL_USER)
    assert caught.value.errors == [
        "sidecar.yaml: consul.address: from the environment: invalid port in 'http://bad:port'"
    ]


def test_registration_needs_an_inbound_and_a_ttl_above_the_interval() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(MINIMAL + "registration: {}\n")
    assert caught.value.errors == [
        "sidecar.yaml: registration: needs inbound: the registration advertises the inbound listener"
    ]
    with pytest.raises(ConfigError) as caught:
        parse(CONSUL_USER + "registration: {ttl: 5s, health: {interval: 10s}}\n")
    assert caught.value.errors == [
        "sidecar.yaml: registration: ttl must be longer than health.interval, or the check expires between refreshes"
    ]


def test_http2_limits_are_configured_per_listener_and_checked() -> None:
    cfg = parse(
        MINIMAL + "inbound: {tls: off, limits: {max_header_count: 50, http2: {max_concurrent_streams: 8, "
        "stream_window: 256KiB, connection_window: 4MiB, max_frame_size: 64KiB}}}\n"
    )
    assert cfg.inbound is not None
    limits = h2_limits(cfg.inbound.limits)
    assert (limits.max_concurrent_streams, limits.initial_window_size) == (8, 256 * 1024)
    assert (limits.connection_window_size, limits.max_frame_size) == (4 * 1024 * 1024, 64 * 1024)
    assert (limits.max_header_count, limits.max_header_list_size) == (50, 64 * 1024)  # the HTTP/1.1 header limits
    [error] = errors_of(MINIMAL + "inbound: {tls: off, limits: {http2: {stream_window: 1KiB}}}\n")
    assert error == "sidecar.yaml: inbound.limits.http2.stream_window: must be at least 65535 (got '1KiB')"


# --- the default policy and what a valid config leaves open ---


MTLS_INBOUND = MINIMAL + (
    "inbound: {bind: 127.0.0.1:15000}\n"
    "identity: {files: {cert: certs/cert.pem, key: certs/key.pem, bundle: certs/bundle.pem}}\n"
)


def test_default_policy_is_allow_and_takes_deny() -> None:
    assert parse(MINIMAL).mesh.default_policy == "allow"
    assert parse("mesh: {default_policy: deny}\n" + MINIMAL).mesh.default_policy == "deny"
    assert errors_of("mesh: {default_policy: block}\n" + MINIMAL) == [
        "sidecar.yaml: mesh.default_policy: must be one of: 'allow', 'deny' (got 'block')"
    ]


def test_an_mtls_inbound_without_allow_says_what_it_admits() -> None:
    assert inbound_default(parse(MTLS_INBOUND)) == InboundDefault(
        setting="inbound.allow",
        admits="every identity of trust domain 'mesh.local': inbound.allow is empty and mesh.default_policy is allow",
        restrict="list the callers in inbound.allow, or set mesh.default_policy: deny to admit none by default",
    )
    assert inbound_default(parse("mesh: {default_policy: deny}\n" + MTLS_INBOUND)) == InboundDefault(
        setting="inbound.allow",
        admits="no caller: inbound.allow is empty and mesh.default_policy is deny",
        restrict="list the callers in inbound.allow",
    )


@pytest.mark.parametrize(
    "text",
    [
        MINIMAL,  # no inbound
        MTLS_INBOUND.replace("bind: 127.0.0.1:15000", "bind: 127.0.0.1:15000, allow: [frontend]"),
        MINIMAL + "inbound: {bind: 127.0.0.1:15000, tls: off}\n",  # no identities to admit by
    ],
)
def test_no_inbound_default_where_allow_decides_or_there_is_no_mtls_inbound(text: str) -> None:
    assert inbound_default(parse(text)) is None


def test_unreadable_files_names_each_missing_file_and_what_it_costs(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "key.pem").write_text("key")
    (tmp_path / "bundle.pem").mkdir()  # a directory where a file belongs
    text = (
        MINIMAL
        + "upstreams: [{service: api, bind: 127.0.0.1:9001}]\n"
        + "discovery: {file: registry.yaml}\n"
        + "identity: {files: {cert: certs/cert.pem, key: certs/key.pem, bundle: bundle.pem}}\n"
    )
    cfg = parse_config(text, name="sidecar.yaml", base_dir=tmp_path)
    certificate = "the sidecar is not ready, and refuses mutual TLS, until it can read it"
    assert unreadable_files(cfg) == [
        (
            "discovery.file",
            f"{tmp_path}/registry.yaml does not exist: the upstream services stay unresolved "
            "(503 discovery unavailable) until it can be read",
        ),
        ("identity.files.cert", f"{tmp_path}/certs/cert.pem does not exist: {certificate}"),
        ("identity.files.bundle", f"{tmp_path}/bundle.pem is not a file: {certificate}"),
    ]


def test_unreadable_files_checks_the_ca_and_consul_files_too(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + "identity: {ca: {url: https://127.0.0.1:8400, token_file: web.token, bundle: ca.pem}}\n"
        + "consul: {ca_file: consul-ca.pem, token_file: consul.token}\n"
    )
    cfg = parse_config(text, name="sidecar.yaml", base_dir=tmp_path)
    assert [setting for setting, _ in unreadable_files(cfg)] == [
        "identity.ca.token_file",
        "identity.ca.bundle",
        "consul.ca_file",
        "consul.token_file",
    ]
    assert unreadable_files(parse(MINIMAL)) == []
