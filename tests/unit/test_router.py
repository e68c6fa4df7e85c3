"""The compiled route table: match order, every condition, weighted picks, mirrors, faults, rewrites, header
changes and redirects, with seeded randomness."""

import random
from collections import Counter
from typing import Any

import pytest
import yaml

from mesh import config
from mesh.pipeline.router import Action, Destination, DirectResponse, Route, RouteTable, host_of

API = Destination("api")


def routes(text: str) -> list[config.Route]:
    return [config.Route.model_validate(spec) for spec in yaml.safe_load(text)]


def table(text: str, default: Destination | None = API) -> RouteTable:
    return RouteTable(routes(text), default=default)


def match(
    t: RouteTable,
    path: bytes = b"/",
    *,
    method: bytes = b"GET",
    authority: bytes = b"api.local",
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Route | None:
    return t.match(method, authority, path, query, headers or [])


def name_of(t: RouteTable, path: bytes = b"/", **request: Any) -> str | None:
    route = match(t, path, **request)
    return None if route is None else route.name


def only_a(match: str) -> RouteTable:
    """A table of one route, `a`, with this match, and no default."""
    return table(f"[{{name: a, to: {{service: web}}, match: {match}}}]", default=None)


def one(text: str) -> Route:
    return table(f"[{text}]").routes[0]


# --- destinations ---


def test_a_destination_sorts_its_subset_and_labels_itself() -> None:
    d = Destination("reviews", (("zone", "a"), ("version", "v2")))
    assert d == Destination("reviews", (("version", "v2"), ("zone", "a")))
    assert hash(d) == hash(Destination("reviews", (("version", "v2"), ("zone", "a"))))
    assert d.label == "reviews{version=v2,zone=a}"
    assert Destination("reviews").label == "reviews"
    assert Destination.of(config.Destination(service="reviews", subset={"version": "v2"})).subset == (
        ("version", "v2"),
    )


def test_a_destination_selects_endpoints_by_meta() -> None:
    d = Destination("reviews", (("version", "v2"),))
    assert d.selects({"version": "v2", "zone": "a"})
    assert not d.selects({"version": "v1"})
    assert not d.selects({})
    assert Destination("reviews").selects({})


# --- match order ---


def test_routes_are_tried_in_the_order_written_and_the_first_match_wins() -> None:
    t = table(
        """
        - {name: canary, match: {path_prefix: /reviews, headers: {x-canary: "1"}}, to: {service: reviews}}
        - {name: reviews, match: {path_prefix: /reviews}, to: {service: reviews, subset: {version: v1}}}
        - {name: everything, to: {service: web}}
        - {name: unreachable, match: {path: /x}, to: {service: web}}
        """
    )
    assert name_of(t, b"/reviews/1", headers=[(b"x-canary", b"1")]) == "canary"
    assert name_of(t, b"/reviews/1") == "reviews"
    assert name_of(t, b"/x") == "everything"
    assert len(t) == 4


def test_unmatched_requests_take_the_default_route_or_nothing() -> None:
    text = "[{match: {path: /a}, to: {service: web}}]"
    with_default = table(text)
    route = match(with_default, b"/b")
    assert route is not None and route.name == "default" and route.action is Action.FORWARD
    assert route.pick(random.Random(1)) == API
    assert (route.timeout_request, route.timeout_per_try, route.retries, route.hash_on) == (None, None, None, None)
    assert match(table(text, default=None), b"/b") is None
    assert len(with_default) == 1


def test_unnamed_routes_are_named_by_their_index() -> None:
    t = table("[{match: {path: /a}}, {name: b, match: {path: /b}}, {match: {path: /c}}]")
    assert [route.name for route in t.routes] == ["routes[0]", "b", "routes[2]"]


def test_a_route_without_an_action_forwards_to_the_default() -> None:
    route = one("{match: {path: /a}}")
    assert route.action is Action.FORWARD and route.pick(random.Random(1)) == API
    with pytest.raises(ValueError, match="no destination"):
        table("[{match: {path: /a}}]", default=None)


def test_destinations_lists_every_target_mirror_and_the_default() -> None:
    t = table(
        """
        - to: {service: reviews, subset: {version: v2}}
          mirror: {to: {service: shadow}, percent: 5}
        - split: [{to: {service: reviews, subset: {version: v1}}, weight: 1}, {to: {service: old}, weight: 0}]
        - direct_response: {status: 204}
        """
    )
    assert t.destinations() == {
        Destination("reviews", (("version", "v2"),)),
        Destination("shadow"),
        Destination("reviews", (("version", "v1"),)),
        Destination("old"),
        API,
    }
    assert table("[{to: {service: web}}]", default=None).destinations() == {Destination("web")}


# --- conditions ---


def test_exact_path() -> None:
    t = only_a("{path: /a}")
    assert name_of(t, b"/a") == "a"
    assert name_of(t, b"/a/") is None
    assert name_of(t, b"/A") is None
    assert name_of(t, b"/a", query=b"?x=1") == "a"  # the query is not part of the path


@pytest.mark.parametrize("prefix", ["/reviews", "/reviews/"])
def test_path_prefix_is_segment_aware_and_ignores_a_trailing_slash(prefix: str) -> None:
    t = only_a(f"{{path_prefix: '{prefix}'}}")
    assert [name_of(t, path) for path in (b"/reviews", b"/reviews/", b"/reviews/1/x")] == ["a", "a", "a"]
    assert [name_of(t, path) for path in (b"/reviewsx", b"/review", b"/", b"/x/reviews")] == [None] * 4


def test_path_prefix_slash_matches_every_path() -> None:
    t = only_a("{path_prefix: /}")
    assert name_of(t, b"/") == name_of(t, b"/anything/at/all") == "a"


def test_path_regex_must_match_the_whole_path() -> None:
    t = only_a(r"{path_regex: '/users/\d+'}")
    assert name_of(t, b"/users/42") == "a"
    assert name_of(t, b"/users/42/x") is None
    assert name_of(t, b"/v1/users/42") is None


def test_path_regex_sees_utf8_text() -> None:
    t = only_a("{path_regex: '/caf.'}")
    assert name_of(t, "/café".encode()) == "a"


def test_methods() -> None:
    t = only_a("{methods: [get, HEAD]}")
    assert name_of(t, method=b"GET") == name_of(t, method=b"HEAD") == "a"
    assert name_of(t, method=b"POST") is None


@pytest.mark.parametrize(
    ("authority", "matched"),
    [
        (b"api.example.com", True),
        (b"API.Example.COM", True),
        (b"api.example.com:8080", True),
        (b"api.example.com.", True),
        (b"www.example.com", False),
        (b"a.b.example.org", True),
        (b"b.example.org:443", True),
        (b"example.org", False),
        (b".example.org", False),
        (b"[::1]:9001", True),
        (b"[::2]", False),
        (b"", False),
    ],
)
def test_host_names_wildcards_and_ports(authority: bytes, matched: bool) -> None:
    t = only_a("{host: [api.example.com, '*.Example.org', '[::1]']}")
    assert (name_of(t, authority=authority) == "a") is matched


def test_host_of_strips_the_port_and_lowercases() -> None:
    assert host_of(b"API.local:9001") == b"api.local"
    assert host_of(b"[::1]:9001") == b"[::1]"
    assert host_of(b"[::1]") == b"[::1]"
    assert host_of(b"api.local.") == b"api.local"


def test_a_single_host_may_be_a_string() -> None:
    t = only_a("{host: api.local}")
    assert name_of(t, authority=b"api.local:80") == "a"


@pytest.mark.parametrize(
    ("condition", "headers", "matched"),
    [
        ("x-v: v2", [(b"x-v", b"v2")], True),
        ("x-v: v2", [(b"x-v", b"V2")], False),
        ("x-v: v2", [(b"x-v", b"v1"), (b"x-v", b"v2")], True),  # any value of a repeated header
        ("x-v: v2", [(b"x-v", b"v1, v2")], False),  # a field line is one value
        ("x-v: v2", [], False),
        ("x-v: {exact: v2}", [(b"x-v", b"v2")], True),
        ("x-v: {prefix: v}", [(b"x-v", b"v9")], True),
        ("x-v: {prefix: v}", [(b"x-v", b"w9")], False),
        (r"x-v: {regex: 'v\d'}", [(b"x-v", b"v9")], True),
        (r"x-v: {regex: 'v\d'}", [(b"x-v", b"v99")], False),
        (r"x-v: {regex: 'v\d'}", [(b"x-v", b"xv9")], False),
        ("x-v: {present: true}", [(b"x-v", b"")], True),
        ("x-v: {present: true}", [(b"x-w", b"1")], False),
        ("x-v: {present: false}", [(b"x-w", b"1")], True),
        ("x-v: {present: false}", [(b"x-v", b"1")], False),
        ("{X-V: '1', x-w: {present: true}}", [(b"x-v", b"1"), (b"x-w", b"")], True),
        ("{X-V: '1', x-w: {present: true}}", [(b"x-v", b"1")], False),  # every condition must hold
    ],
)
def test_header_conditions(condition: str, headers: list[tuple[bytes, bytes]], matched: bool) -> None:
    cond = condition if condition.startswith("{") else f"{{{condition}}}"
    t = only_a(f"{{headers: {cond}}}")
    assert (name_of(t, headers=headers) == "a") is matched


@pytest.mark.parametrize(
    ("condition", "query", "matched"),
    [
        ("debug: '1'", b"?debug=1", True),
        ("debug: '1'", b"?debug=0&debug=1", True),
        ("debug: '1'", b"?debug=0", False),
        ("debug: '1'", b"", False),
        ("q: a b", b"?q=a+b", True),  # decoded as a form
        ("q: a/b", b"?q=a%2Fb", True),
        ("q: é", b"?q=%C3%A9", True),
        ("q: ''", b"?q=", True),  # blank values are kept
        ("q: {prefix: ab}", b"?x=1&q=abc", True),
        (r"q: {regex: '\d+'}", b"?q=123", True),
        (r"q: {regex: '\d+'}", b"?q=123x", False),
        ("q: {present: true}", b"?q", True),
        ("q: {present: false}", b"?qq=1", True),
        ("q: {present: false}", b"?q=1", False),
    ],
)
def test_query_conditions(condition: str, query: bytes, matched: bool) -> None:
    t = only_a(f"{{query: {{{condition}}}}}")
    assert (name_of(t, query=query) == "a") is matched


def test_every_condition_of_a_route_must_hold() -> None:
    t = only_a("{host: api.local, path_prefix: /v1, methods: [POST], headers: {x-a: '1'}, query: {b: '2'}}")
    request: dict[str, Any] = {
        "method": b"POST",
        "authority": b"api.local",
        "query": b"?b=2",
        "headers": [(b"x-a", b"1")],
    }
    assert name_of(t, b"/v1/x", **request) == "a"
    for key, other in [("method", b"GET"), ("authority", b"web"), ("query", b"?b=3"), ("headers", [])]:
        assert name_of(t, b"/v1/x", **{**request, key: other}) is None
    assert name_of(t, b"/v2", **request) is None


# --- picks, mirrors and faults, with a seeded rng ---


def test_a_split_picks_by_weight() -> None:
    route = one(
        "{split: [{to: {service: reviews, subset: {version: v1}}, weight: 90},"
        " {to: {service: reviews, subset: {version: v2}}, weight: 10}, {to: {service: old}, weight: 0}]}"
    )
    rng = random.Random(2024)
    picks = Counter(route.pick(rng) for _ in range(10_000))
    v1, v2 = Destination("reviews", (("version", "v1"),)), Destination("reviews", (("version", "v2"),))
    assert set(picks) == {v1, v2}
    assert abs(picks[v2] / 10_000 - 0.10) <= 0.01
    assert route.destinations == (v1, v2, Destination("old"))


def test_a_single_destination_needs_no_draw() -> None:
    class NoDraws:
        def random(self) -> float:
            raise AssertionError("drew a number")

    route = one("{to: {service: reviews}}")
    assert route.pick(NoDraws()) == Destination("reviews")
    assert route.mirror_to(NoDraws()) is None
    assert route.fault_abort(NoDraws()) is None
    assert route.fault_delay(NoDraws()) == 0.0
    full = one("{mirror: {to: {service: shadow}}, fault: {abort: {status: 503}, delay: {duration: 1s}}}")
    assert full.mirror_to(NoDraws()) == Destination("shadow")
    assert full.fault_abort(NoDraws()) == (503, None)
    assert full.fault_delay(NoDraws()) == 1.0


def test_mirror_percentage() -> None:
    route = one("{to: {service: reviews}, mirror: {to: {service: shadow}, percent: 25}}")
    rng = random.Random(7)
    mirrored = sum(route.mirror_to(rng) == Destination("shadow") for _ in range(10_000))
    assert abs(mirrored / 10_000 - 0.25) <= 0.01
    assert route.mirror == Destination("shadow")


def test_fault_percentages() -> None:
    route = one(
        "{fault: {abort: {percent: 10, status: 503, grpc_status: 14}, delay: {percent: 50.5, duration: 250ms}}}"
    )
    rng = random.Random(11)
    aborts = Counter(route.fault_abort(rng) for _ in range(10_000))
    assert set(aborts) == {None, (503, 14)}
    assert abs(aborts[(503, 14)] / 10_000 - 0.10) <= 0.01
    delays = Counter(route.fault_delay(rng) for _ in range(10_000))
    assert set(delays) == {0.0, 0.25}
    assert abs(delays[0.25] / 10_000 - 0.505) <= 0.01
    never = one("{fault: {abort: {percent: 0, status: 500}}}")
    assert all(never.fault_abort(rng) is None for _ in range(1000))


# --- what a route does to the request ---


@pytest.mark.parametrize(
    ("prefix", "replacement", "path", "rewritten"),
    [
        ("/reviews", "/", "/reviews/x", "/x"),
        ("/reviews", "/", "/reviews/x/y/", "/x/y/"),
        ("/reviews", "/", "/reviews", "/"),
        ("/reviews", "/", "/reviews/", "/"),
        ("/reviews", "/v2", "/reviews/x", "/v2/x"),
        ("/reviews", "/v2", "/reviews", "/v2"),
        ("/reviews", "/v2", "/reviews/", "/v2/"),
        ("/reviews", "/v2/", "/reviews/x", "/v2/x"),
        ("/reviews", "/v2/", "/reviews", "/v2/"),
        ("/reviews/", "/v2", "/reviews/x", "/v2/x"),
        ("/", "/api", "/x", "/api/x"),
        ("/", "/api", "/", "/api/"),
    ],
)
def test_rewrite_prefix(prefix: str, replacement: str, path: str, rewritten: str) -> None:
    route = one(f"{{match: {{path_prefix: '{prefix}'}}, rewrite: {{prefix: '{replacement}'}}}}")
    assert route.rewrite_path(path.encode()) == rewritten.encode()


def test_without_a_prefix_rewrite_the_path_is_kept() -> None:
    route = one("{match: {path_prefix: /a}, rewrite: {host: reviews.internal:8080}}")
    assert route.rewrite_path(b"/a/b") == b"/a/b"
    assert route.rewrite_authority == b"reviews.internal:8080"
    assert one("{}").rewrite_authority is None


def test_header_changes_remove_then_set_then_add() -> None:
    route = one(
        """
        {request_headers: {remove: [x-drop, X-Gone], set: {x-set: new}, add: {x-add: more, x-keep: two}},
         response_headers: {set: {cache-control: no-store}}}
        """
    )
    headers = [
        (b"x-drop", b"1"),
        (b"x-keep", b"one"),
        (b"x-set", b"old1"),
        (b"x-gone", b"a"),
        (b"x-set", b"old2"),
        (b"x-drop", b"2"),
        (b"x-add", b"first"),
    ]
    route.apply_request_headers(headers)
    assert headers == [
        (b"x-keep", b"one"),
        (b"x-add", b"first"),
        (b"x-set", b"new"),
        (b"x-add", b"more"),
        (b"x-keep", b"two"),
    ]
    response = [(b"cache-control", b"max-age=60"), (b"content-type", b"text/plain")]
    route.apply_response_headers(response)
    assert response == [(b"content-type", b"text/plain"), (b"cache-control", b"no-store")]


def test_no_header_changes_leave_the_headers_alone() -> None:
    headers = [(b"a", b"1")]
    route = one("{}")
    route.apply_request_headers(headers)
    route.apply_response_headers(headers)
    assert headers == [(b"a", b"1")]


def test_per_route_settings() -> None:
    route = one(
        "{timeouts: {request: 2s, per_try: 500ms}, retries: {attempts: 1, grpc_statuses: [unavailable, internal]},"
        " hash_on: {header: x-user}}"
    )
    assert (route.timeout_request, route.timeout_per_try) == (2.0, 0.5)
    assert route.retries is not None and route.retries.attempts == 1
    assert route.retries.grpc_statuses == ["unavailable", "internal"]
    assert route.hash_on == config.HashOn(header="x-user")
    assert one("{timeouts: {request: 0s}}").timeout_request == 0.0
    assert one("{timeouts: {request: 1s}}").timeout_per_try is None


# --- routes that answer themselves ---


def test_direct_response() -> None:
    route = one("{match: {path: /healthz}, direct_response: {status: 200, body: ok ✓}}")
    assert route.action is Action.DIRECT_RESPONSE
    assert route.direct_response == DirectResponse(200, "ok ✓".encode(), b"text/plain; charset=utf-8")
    assert route.pick(random.Random(1)) is None
    assert route.destinations == ()
    typed = one("{direct_response: {status: 503, body: '{}', content_type: application/json}}")
    assert typed.direct_response == DirectResponse(503, b"{}", b"application/json")


@pytest.mark.parametrize(
    ("redirect", "scheme", "authority", "path", "query", "location"),
    [
        ("{scheme: https}", b"http", b"api.local:8080", b"/a", b"?x=1", b"https://api.local/a?x=1"),
        ("{scheme: https, port: 8443}", b"http", b"api.local:8080", b"/a", b"", b"https://api.local:8443/a"),
        ("{scheme: https, port: 443}", b"http", b"api.local", b"/a", b"", b"https://api.local/a"),
        ("{host: new.example}", b"https", b"old.example:8443", b"/a", b"", b"https://new.example/a"),
        ("{port: 9000}", b"http", b"api.local:8080", b"/a", b"", b"http://api.local:9000/a"),
        ("{port: 9000}", b"http", b"[::1]:8080", b"/a", b"", b"http://[::1]:9000/a"),
        ("{path: /new}", b"http", b"api.local:8080", b"/old/x", b"?q", b"http://api.local:8080/new?q"),
        ("{path: /new}", b"http", b"", b"/old", b"?q", b"/new?q"),
        ("{scheme: https}", b"http", b"", b"/old", b"", b"/old"),
        ("{host: a.example, port: 80}", b"http", b"", b"/x", b"", b"http://a.example/x"),
    ],
)
def test_redirect_location(
    redirect: str, scheme: bytes, authority: bytes, path: bytes, query: bytes, location: bytes
) -> None:
    route = one(f"{{redirect: {redirect}}}")
    assert route.action is Action.REDIRECT and route.redirect_status == 302
    assert route.redirect_location(scheme, authority, path, query) == location


def test_redirect_with_a_prefix_rewrite_and_a_status() -> None:
    route = one("{match: {path_prefix: /old}, redirect: {status: 308, prefix_rewrite: /new}}")
    assert route.redirect_status == 308
    assert route.redirect_location(b"http", b"api.local", b"/old/x", b"?a") == b"http://api.local/new/x?a"
    assert route.redirect_location(b"http", b"api.local", b"/old", b"") == b"http://api.local/new"


def test_only_a_redirect_route_builds_a_location() -> None:
    with pytest.raises(ValueError, match="does not redirect"):
        one("{}").redirect_location(b"http", b"a", b"/", b"")


def test_route_and_table_reprs() -> None:
    t = table("[{name: r, split: [{to: {service: a}, weight: 1}, {to: {service: b, subset: {v: '2'}}, weight: 1}]}]")
    assert repr(t.routes[0]) == "<Route 'r' forward to a, b{v=2}>"
    assert repr(t) == "<RouteTable 1 routes, default api>"
    assert repr(one("{direct_response: {status: 404}}")) == "<Route 'routes[0]' direct_response>"
