"""Route, cluster and gRPC-retry configuration: parsing, defaults, dumps, and the exact wording of every error."""

import json
from pathlib import Path

import pytest
import yaml

from mesh.config import (
    GRPC_STATUS_CODES,
    ClusterFields,
    ClusterSettings,
    Destination,
    RetrySettings,
    Route,
    RouteMatch,
    StringMatch,
    UpstreamSettings,
    dump_config,
    parse_config,
)
from tests.unit.test_config import errors_of, parse

BASE = (
    "service: {name: web, app: 127.0.0.1:8080}\n"
    "discovery: {static: {api: [127.0.0.1:15001], reviews: [127.0.0.1:15002], ratings: [127.0.0.1:15003]}}\n"
)
ROUTED = """
upstreams:
  - service: api
    bind: 127.0.0.1:9001
    tls: off
    routes:
      - name: canary
        match: {path_prefix: /reviews, headers: {X-Canary: "1"}}
        to: {service: reviews, subset: {version: v2}}
      - match: {path_prefix: /reviews, methods: [get], query: {debug: {present: true}}}
        split: [{to: {service: reviews, subset: {version: v1}}, weight: 90},
                {to: {service: reviews, subset: {version: v2}}, weight: 10}]
        timeouts: {request: 2s}
        mirror: {to: {service: ratings}, percent: 5}
      - match: {host: ["Ratings.example.com", "*.ratings.internal"], path_regex: '/r/\\d+'}
        to: {service: ratings}
        rewrite: {host: ratings.internal}
        retries: {attempts: 1, grpc_statuses: [unavailable, resource_exhausted]}
        hash_on: {header: x-user}
      - match: {path: /old}
        redirect: {scheme: https, status: 301}
        response_headers: {add: {x-moved: "yes"}}
      - match: {path: /ping}
        direct_response: {status: 200, body: pong}
        fault: {delay: {percent: 10, duration: 50ms}, abort: {percent: 1, status: 503, grpc_status: 14}}
clusters:
  - service: reviews
    tls: off
  - service: ratings
    tls: off
    protocol: grpc
    balancer: {policy: ring_hash, hash_on: {header: x-tenant}}
"""


def routed(routes: str, *, upstream: str = "service: api, tls: off", extra: str = "") -> str:
    """A config with one upstream carrying these routes (YAML flow list), plus a reviews cluster."""
    return (
        BASE + f"upstreams: [{{{upstream}, bind: 127.0.0.1:9001, routes: {routes}}}]\n"
        "clusters: [{service: reviews, tls: off}]\n" + extra
    )


def inbound(routes: str) -> str:
    return "service: {name: web, app: 127.0.0.1:8080}\n" + f"inbound: {{tls: off, routes: {routes}}}\n"


# --- valid configs ---


def test_routes_and_clusters_load() -> None:
    cfg = parse(BASE + ROUTED)
    upstream = cfg.upstreams[0]
    canary, split, ratings, redirect, ping = upstream.routes
    assert canary.name == "canary" and canary.action == "to"
    assert canary.match.headers == {"x-canary": StringMatch(exact="1")}
    assert canary.to == Destination(service="reviews", subset={"version": "v2"})
    assert split.name is None and split.action == "split"
    assert split.match.methods == ["GET"]
    assert split.match.query == {"debug": StringMatch(present=True)}
    assert [entry.weight for entry in split.split or ()] == [90, 10]
    assert split.timeouts is not None and (split.timeouts.request, split.timeouts.per_try) == (2.0, None)
    assert ratings.match.host == ["ratings.example.com", "*.ratings.internal"]
    assert ratings.retries is not None and ratings.retries.grpc_statuses == ["unavailable", "resource_exhausted"]
    assert redirect.action == "redirect" and ping.action == "direct_response"
    assert [c.service for c in cfg.clusters] == ["reviews", "ratings"]
    assert cfg.clusters[1].protocol == "grpc"
    assert {name: type(entry) for name, entry in cfg.cluster_settings().items()} == {
        "api": UpstreamSettings,
        "reviews": ClusterSettings,
        "ratings": ClusterSettings,
    }


def test_a_route_with_nothing_matches_everything_and_goes_to_the_service() -> None:
    route = parse(routed("[{}]")).upstreams[0].routes[0]
    assert route == Route()
    assert route.match == RouteMatch()
    assert route.action is None


def test_routed_config_dumps_as_json_and_parses_back() -> None:
    cfg = parse(BASE + ROUTED)
    dumped = dump_config(cfg)
    assert json.loads(json.dumps(dumped)) == dumped
    assert parse_config(yaml.safe_dump(dumped), name="again.yaml", base_dir=Path("/elsewhere")) == cfg
    routes = dumped["upstreams"][0]["routes"]
    assert routes[2]["match"]["path_regex"] == "/r/\\d+"
    assert routes[1]["timeouts"] == {"request": "2s", "per_try": None}
    assert routes[4]["fault"]["delay"] == {"percent": 10.0, "duration": "50ms"}
    assert dumped["clusters"][0]["service"] == "reviews"
    assert "bind" not in dumped["clusters"][0] and "routes" not in dumped["clusters"][0]


def test_upstreams_and_clusters_share_their_cluster_fields() -> None:
    cluster = list(ClusterFields.model_fields)
    assert list(ClusterSettings.model_fields) == cluster
    assert list(UpstreamSettings.model_fields) == [*cluster, "bind", "upgrades", "limits", "routes"]
    assert cluster[:2] == ["service", "protocol"]


def test_grpc_retry_statuses() -> None:
    assert RetrySettings().grpc_statuses == ["unavailable"]
    assert GRPC_STATUS_CODES["unavailable"] == 14
    assert GRPC_STATUS_CODES["deadline_exceeded"] == 4
    assert GRPC_STATUS_CODES["ok"] == 0 and GRPC_STATUS_CODES["unauthenticated"] == 16
    retryable = RetrySettings.model_fields["grpc_statuses"].annotation.__args__[0].__args__  # type: ignore[union-attr]
    assert {name: GRPC_STATUS_CODES[name] for name in retryable} == {
        "cancelled": 1,
        "unknown": 2,
        "deadline_exceeded": 4,
        "resource_exhausted": 8,
        "aborted": 10,
        "internal": 13,
        "unavailable": 14,
    }
    assert errors_of(routed("[{retries: {grpc_statuses: [not_found]}}]")) == [
        "sidecar.yaml: upstreams[0].routes[0].retries.grpc_statuses[0]: must be one of: 'cancelled', 'unknown', "
        "'deadline_exceeded', 'resource_exhausted', 'aborted', 'internal', 'unavailable' (got 'not_found')"
    ]


def test_a_host_routing_listener_needs_no_service() -> None:
    cfg = parse(routed("[{match: {host: reviews.local}, to: {service: reviews}}]", upstream="timeouts: {idle: 1m}"))
    upstream = cfg.upstreams[0]
    assert upstream.service is None and upstream.timeouts.idle == 60.0
    assert set(cfg.cluster_settings()) == {"reviews"}
    dumped = yaml.safe_dump(dump_config(cfg))  # every default spelt out, cluster fields included, reads back
    assert parse_config(dumped, name="again.yaml", base_dir=Path("/elsewhere")) == cfg


def test_an_inbound_may_rewrite_answer_and_inject_faults() -> None:
    cfg = parse(
        inbound(
            "[{match: {path_prefix: /v1}, rewrite: {prefix: /}, request_headers: {set: {x-from: mesh}},"
            " timeouts: {request: 1s}, fault: {abort: {status: 500, percent: 1}}},"
            " {match: {path: /healthz}, direct_response: {status: 200}},"
            " {match: {path: /old}, redirect: {path: /new}}]"
        )
    )
    assert cfg.inbound is not None and len(cfg.inbound.routes) == 3


def test_a_header_value_may_be_matched_by_a_bare_string_or_a_mapping() -> None:
    match = RouteMatch.model_validate({"headers": {"A": "x", "b": {"prefix": "y"}, "c": {"present": False}}})
    assert match.headers == {
        "a": StringMatch(exact="x"),
        "b": StringMatch(prefix="y"),
        "c": StringMatch(present=False),
    }


# --- errors: one route ---


def routes_error(routes: str) -> list[str]:
    return errors_of(routed(routes))


AT = "sidecar.yaml: upstreams[0].routes[0]"


@pytest.mark.parametrize(
    ("route", "errors"),
    [
        (
            "{match: {path_regex: '/(a'}}",
            [
                f"{AT}.match.path_regex: invalid regular expression '/(a': missing ), unterminated subpattern at "
                "position 1"
            ],
        ),
        (
            "{match: {headers: {x-a: {regex: '['}}}}",
            [f"{AT}.match.headers.x-a.regex: invalid regular expression '[': unterminated character set at position 0"],
        ),
        (
            "{rewrite: {prefix: /v2}}",
            [f"{AT}.rewrite.prefix: needs match.path_prefix: it replaces the matched prefix"],
        ),
        (
            "{match: {path: /a}, redirect: {prefix_rewrite: /b}}",
            [f"{AT}.redirect.prefix_rewrite: needs match.path_prefix: it replaces the matched prefix"],
        ),
        (
            "{split: [{to: {service: reviews}, weight: 0}, {to: {service: api}, weight: 0}]}",
            [f"{AT}.split: the weights add up to 0: give at least one destination a weight above 0"],
        ),
        ("{split: []}", [f"{AT}.split: needs at least one destination"]),
        (
            "{split: [{to: {service: reviews}, weight: -1}]}",
            [f"{AT}.split[0].weight: must be at least 0 (got -1)"],
        ),
        (
            "{to: {service: reviews}, direct_response: {status: 200}}",
            [f"{AT}: set at most one of: to, split, direct_response, redirect (got to and direct_response)"],
        ),
        (
            "{match: {path: /a, path_prefix: /a}}",
            [f"{AT}.match: set at most one of: path, path_prefix, path_regex (got path and path_prefix)"],
        ),
        (
            "{match: {path: /a//b}}",
            [
                f"{AT}.match.path: '/a//b' is not in normal form: requests are routed after '//', '.', '..' and %2E "
                "are resolved (and %2F, %5C and %00 are refused)"
            ],
        ),
        ("{match: {path_prefix: api}}", [f"{AT}.match.path_prefix: a path must start with '/' (got 'api')"]),
        (
            "{match: {path: '/a?b'}}",
            [f"{AT}.match.path: a path must contain no whitespace, '?', '#' or '\\' (got '/a?b')"],
        ),
        (
            "{match: {host: [api.local, 'api.local:8080']}}",
            [
                f"{AT}.match.host[1]: invalid host 'api.local:8080': use a host name (api.example.com), a wildcard "
                "(*.example.com) or an IP address, without a port (ports are ignored)"
            ],
        ),
        (
            "{match: {host: 'a.*.com'}}",
            [
                f"{AT}.match.host[0]: invalid host 'a.*.com': use a host name (api.example.com), a wildcard "
                "(*.example.com) or an IP address, without a port (ports are ignored)"
            ],
        ),
        ("{match: {host: '*'}}", [f"{AT}.match.host[0]: '*' would match every host: leave match.host out instead"]),
        ("{match: {methods: ['GE T']}}", [f"{AT}.match.methods[0]: expected an HTTP method such as GET (got 'GE T')"]),
        (
            "{match: {headers: {x-a: 1}}}",
            [
                f"{AT}.match.headers.x-a: expected a string or a mapping of one of exact, prefix, regex, present "
                "(got 1): quote numbers"
            ],
        ),
        (
            "{match: {headers: {x-a: {exact: a, prefix: b}}}}",
            [f"{AT}.match.headers.x-a: set exactly one of: exact, prefix, regex, present"],
        ),
        (
            "{match: {headers: {x-a: '1', X-A: '2'}}}",
            [f"{AT}.match.headers: 'X-A' and 'x-a' name the same header (names ignore case)"],
        ),
        (
            "{match: {headers: {'x a': '1'}}}",
            [f"{AT}.match.headers.x a: invalid header name 'x a': use letters, digits and !#$%&'*+.^_`|~-"],
        ),
        (
            "{match: {headers: {Host: a}}}",
            [f"{AT}.match.headers.Host: match the authority (Host) with match.host"],
        ),
        (
            "{match: {headers: {':path': /a}}}",
            [
                f"{AT}.match.headers.:path: ':path' is a pseudo-header: match the authority with host, the method "
                "with methods, the path with path, path_prefix or path_regex"
            ],
        ),
        (
            "{match: {headers: {x-mesh-deadline: {present: true}}}}",
            [
                f"{AT}.match.headers.x-mesh-deadline: 'x-mesh-deadline' is removed from requests before they are "
                "routed, so it never matches"
            ],
        ),
        (
            "{request_headers: {set: {Transfer-Encoding: chunked}}}",
            [
                f"{AT}.request_headers.set.Transfer-Encoding: 'transfer-encoding' is a hop-by-hop header: the "
                "proxy sets it for each connection"
            ],
        ),
        (
            "{request_headers: {remove: [content-length]}}",
            [f"{AT}.request_headers.remove[0]: 'content-length' frames the body: the proxy sets it"],
        ),
        (
            "{response_headers: {add: {x-mesh-error: none}}}",
            [
                f"{AT}.response_headers.add.x-mesh-error: 'x-mesh-error': x-mesh-* headers are the mesh's own "
                "(docs/wire.md) and cannot be changed"
            ],
        ),
        (
            "{request_headers: {add: {':authority': a}}}",
            [
                f"{AT}.request_headers.add.:authority: ':authority' is a pseudo-header: change the path with "
                "rewrite.prefix and the authority with rewrite.host"
            ],
        ),
        (
            "{request_headers: {add: {'bad name': a}}}",
            [
                f"{AT}.request_headers.add.bad name: invalid header name 'bad name': use letters, digits and "
                "!#$%&'*+.^_`|~-"
            ],
        ),
        (
            "{request_headers: {set: {Host: a.local}, remove: [host]}}",
            [
                f"{AT}.request_headers.set.host: 'host' is also in remove: name each header in one place",
            ],
        ),
        (
            "{request_headers: {set: {Host: a.local}}}",
            [f"{AT}.request_headers.set.host: change the authority (Host) with rewrite.host"],
        ),
        (
            '{request_headers: {add: {x-a: "1\\r\\nx-b: 2"}}}',
            [f"{AT}.request_headers.add.x-a: a header value must not contain CR, LF or NUL"],
        ),
        (
            "{request_headers: {add: {x-a: 1}}}",
            [f"{AT}.request_headers.add.x-a: expected a string (got 1): quote numbers"],
        ),
        (
            "{name: default}",
            [f"{AT}.name: 'default' names the route of the requests that no route matches: choose another"],
        ),
        (
            "{name: 'a b'}",
            [f"{AT}.name: invalid route name 'a b': use 1-63 letters, digits, '.', '-' and '_'"],
        ),
        (
            "{direct_response: {status: 204, body: x}}",
            [f"{AT}.direct_response: a 204 response has no body: leave body out"],
        ),
        ("{direct_response: {status: 102}}", [f"{AT}.direct_response.status: must be at least 200 (got 102)"]),
        (
            "{redirect: {}}",
            [
                f"{AT}.redirect: set at least one of: scheme, host, port, path, prefix_rewrite (a redirect to the "
                "same URL would loop)"
            ],
        ),
        (
            "{redirect: {status: 200, host: a.local}}",
            [f"{AT}.redirect.status: must be one of: 301, 302, 303, 307, 308 (got 200)"],
        ),
        (
            "{redirect: {host: 'a.local:8443'}}",
            [f"{AT}.redirect.host: give the port in redirect.port, not in the host (got 'a.local:8443')"],
        ),
        (
            "{redirect: {path: /a, prefix_rewrite: /b}, match: {path_prefix: /x}}",
            [f"{AT}.redirect: set at most one of: path, prefix_rewrite"],
        ),
        (
            "{direct_response: {status: 404}, mirror: {to: {service: reviews}}, timeouts: {request: 1s}}",
            [
                f"{AT}.mirror: only a route that forwards uses it, and this one answers with its direct_response",
                f"{AT}.timeouts: only a route that forwards uses it, and this one answers with its direct_response",
            ],
        ),
        (
            "{redirect: {scheme: https}, rewrite: {host: a}, retries: {attempts: 0}}",
            [
                f"{AT}.rewrite: only a route that forwards uses it, and this one answers with its redirect",
                f"{AT}.retries: only a route that forwards uses it, and this one answers with its redirect",
            ],
        ),
        ("{rewrite: {}}", [f"{AT}.rewrite: set at least one of: prefix, host"]),
        ("{rewrite: {host: 'a b'}}", [f"{AT}.rewrite.host: expected host or host:port (got 'a b')"]),
        ("{fault: {}}", [f"{AT}.fault: set at least one of: abort, delay"]),
        ("{fault: {abort: {status: 200}}}", [f"{AT}.fault.abort.status: must be at least 400 (got 200)"]),
        (
            "{fault: {abort: {status: 503, grpc_status: 0}}}",
            [f"{AT}.fault.abort.grpc_status: must be at least 1 (got 0)"],
        ),
        (
            "{fault: {delay: {duration: 1s, percent: 101}}}",
            [f"{AT}.fault.delay.percent: must be at most 100.0 (got 101)"],
        ),
        ("{mirror: {to: {service: reviews}, percent: -1}}", [f"{AT}.mirror.percent: must be at least 0.0 (got -1)"]),
        (
            "{colour: blue}",
            [
                f"{AT}.colour: unknown field 'colour' (allowed: name, match, to, split, direct_response, redirect, "
                "mirror, rewrite, request_headers, response_headers, fault, timeouts, retries, hash_on)"
            ],
        ),
    ],
)
def test_route_errors(route: str, errors: list[str]) -> None:
    assert routes_error(f"[{route}]") == errors


# --- errors: across a listener and across the file ---


def test_route_names_are_unique_per_listener() -> None:
    assert routes_error("[{name: a}, {name: b}, {name: a}]") == [
        "sidecar.yaml: upstreams[0].routes[2].name: 'a' is already used by routes[0]"
    ]
    assert errors_of(inbound("[{name: a, match: {path: /x}, direct_response: {status: 200}}, {name: a}]")) == [
        "sidecar.yaml: inbound.routes[1].name: 'a' is already used by routes[0]"
    ]
    two_listeners = routed("[{name: a}]", extra="inbound: {tls: off, routes: [{name: a}]}\n")
    assert parse(two_listeners).inbound is not None


def test_destinations_must_be_known_http_services() -> None:
    text = BASE + (
        "upstreams:\n"
        "  - {service: api, bind: 127.0.0.1:9001, tls: off, routes: [{to: {service: reviews}},\n"
        "     {split: [{to: {service: reviews}, weight: 1}, {to: {service: nope}, weight: 1}]},\n"
        "     {mirror: {to: {service: db}}}, {to: {service: api}}]}\n"
        "  - {service: db, bind: 127.0.0.1:9002, protocol: tcp, tls: off}\n"
    )
    assert errors_of(text) == [
        "sidecar.yaml: upstreams[1].service: no endpoints for 'db' in discovery.static",
        "sidecar.yaml: upstreams[0].routes[0].to.service: unknown service 'reviews': add it to upstreams[] or "
        "clusters[]",
        "sidecar.yaml: upstreams[0].routes[1].split[0].to.service: unknown service 'reviews': add it to upstreams[] "
        "or clusters[]",
        "sidecar.yaml: upstreams[0].routes[1].split[1].to.service: unknown service 'nope': add it to upstreams[] or "
        "clusters[]",
        "sidecar.yaml: upstreams[0].routes[2].mirror.to.service: 'db' is a tcp upstream: routes carry HTTP requests",
    ]


@pytest.mark.parametrize(
    ("route", "field", "message"),
    [
        ("{to: {service: api}}", "to", "the inbound forwards only to the local app and never retries"),
        (
            "{split: [{to: {service: api}, weight: 1}]}",
            "split",
            "the inbound forwards only to the local app and never retries",
        ),
        ("{mirror: {to: {service: api}}}", "mirror", "the inbound forwards only to the local app and never retries"),
        ("{retries: {attempts: 1}}", "retries", "the inbound forwards only to the local app and never retries"),
        ("{hash_on: {header: x}}", "hash_on", "the inbound forwards only to the local app and never retries"),
        ("{timeouts: {per_try: 1s}}", "timeouts.per_try", "it never retries"),
    ],
)
def test_inbound_routes_cannot_choose_a_destination_or_retry(route: str, field: str, message: str) -> None:
    assert errors_of(inbound(f"[{route}]")) == [
        f"sidecar.yaml: inbound.routes[0].{field}: not allowed on the inbound: {message}"
    ]


def test_inbound_routes_need_an_http_app() -> None:
    text = "service: {name: web, app: 127.0.0.1:8080, protocol: tcp}\ninbound: {tls: off, routes: [{}]}\n"
    assert errors_of(text) == [
        "sidecar.yaml: inbound.routes: the local app speaks tcp (service.protocol): the inbound relays bytes and "
        "cannot route"
    ]


def test_a_listener_without_routes_needs_its_service() -> None:
    text = BASE + "upstreams: [{bind: 127.0.0.1:9001, tls: off}]\n"
    assert errors_of(text) == ["sidecar.yaml: upstreams[0].service: required field missing"]


def test_a_listener_without_a_service_sets_no_cluster_settings_and_every_route_names_a_destination() -> None:
    text = routed(
        "[{match: {path: /a}, to: {service: reviews}}, {match: {path: /b}}]",
        upstream="balancer: {policy: random}, retries: {attempts: 0}, timeouts: {connect: 2s, idle: 1m}",
    )
    cause = (
        "applies to the listener's service, and this listener has none: set it on the upstreams[] or clusters[] "
        "entry of each destination (a route's timeouts and retries replace the destination's)"
    )
    assert errors_of(text) == [
        f"sidecar.yaml: upstreams[0].balancer: {cause}",
        f"sidecar.yaml: upstreams[0].retries: {cause}",
        f"sidecar.yaml: upstreams[0].timeouts.connect: {cause}",
        "sidecar.yaml: upstreams[0].routes[1]: needs to, split, direct_response or redirect: this listener has no "
        "service to send the requests it matches to",
    ]


def test_a_tcp_listener_cannot_route() -> None:
    text = BASE + "upstreams: [{service: api, bind: 127.0.0.1:9001, protocol: tcp, tls: off, routes: [{}]}]\n"
    assert errors_of(text) == [
        "sidecar.yaml: upstreams[0].routes: a tcp listener relays bytes and cannot route: use http, http2 or grpc"
    ]


def test_hash_on_needs_a_hashing_destination() -> None:
    ring = "clusters: [{service: ratings, tls: off, balancer: {policy: maglev, hash_on: {cookie: s}}}]\n"
    text = BASE + (
        "upstreams: [{service: api, bind: 127.0.0.1:9001, tls: off, routes: [\n"
        "  {match: {path: /a}, hash_on: {header: x-user}},\n"
        "  {match: {path: /b}, to: {service: ratings}, hash_on: {header: x-user}}]}]\n" + ring
    )
    assert errors_of(text) == [
        "sidecar.yaml: upstreams[0].routes[0].hash_on: no destination of this route uses balancer policy ring_hash "
        "or maglev"
    ]


def test_a_service_is_configured_once_across_upstreams_and_clusters() -> None:
    text = routed("[]").replace(
        "clusters: [{service: reviews, tls: off}]", "clusters: [{service: reviews, tls: off}, {service: api, tls: off}]"
    )
    assert errors_of(text) == ["sidecar.yaml: clusters[1].service: 'api' is already configured by upstreams[0]"]


def test_clusters_need_discovery_endpoints_and_identity() -> None:
    minimal = "service: {name: web, app: 127.0.0.1:8080}\n"
    assert errors_of(minimal + "clusters: [{service: reviews, tls: off}]\n") == [
        "sidecar.yaml: discovery: required when clusters are configured"
    ]
    static = "discovery: {static: {api: [127.0.0.1:1]}}\n"
    assert errors_of(minimal + static + "clusters: [{service: reviews, tls: off}]\n") == [
        "sidecar.yaml: clusters[0].service: no endpoints for 'reviews' in discovery.static"
    ]
    errors = errors_of(minimal + "discovery: {static: {reviews: [127.0.0.1:1]}}\nclusters: [{service: reviews}]\n")
    assert len(errors) == 1 and errors[0].startswith("sidecar.yaml: clusters[0].tls: mutual TLS needs this sidecar's")


def test_cluster_fields() -> None:
    minimal = "service: {name: web, app: 127.0.0.1:8080}\ndiscovery: {file: r.yaml}\n"
    assert errors_of(minimal + "clusters: [{tls: off}]\n") == [
        "sidecar.yaml: clusters[0].service: required field missing"
    ]
    assert errors_of(minimal + "clusters: [{service: db, protocol: tcp}]\n") == [
        "sidecar.yaml: clusters[0].protocol: a cluster receives routed HTTP requests: use http, http2 or grpc (a tcp "
        "service needs an upstreams[] listener of its own)"
    ]
    assert errors_of(minimal + "clusters: [{service: db, tls: off, timeouts: {idle: 1m, connect: 2s}}]\n") == [
        "sidecar.yaml: clusters[0].timeouts.idle: a cluster has no listener: the listener a request arrives on sets "
        "this"
    ]
    assert errors_of(minimal + "clusters: [{service: db, bind: 127.0.0.1:1}]\n") == [
        "sidecar.yaml: clusters[0].bind: unknown field 'bind' (allowed: service, protocol, mesh_http2, tls, "
        "identity, timeouts, pool, balancer, outlier, circuit_breakers, retries, hedging, health_check)"
    ]
