"""Sans-io route table: a listener's routes compiled into plain objects that match requests and say what to do.

Routes are tried in the order they are written; the first route whose conditions all hold takes the request (within a
route every condition given must hold, and a route without conditions matches everything). A table built with a
default destination ends with an implicit route named `default` that sends every request no route matched there,
unchanged; without a default, such a request matches nothing (the listener answers 404 `no route`).

Requests are matched as the codec and the path normaliser (mesh.pipeline.pathnorm) present them: lower-case header
names, a normalised path, the query with its leading `?`. Conditions:

- host: the authority without its port, lower-cased and without a trailing dot, equals a listed name, or ends with
  `.suffix` for a listed `*.suffix` (with something before it: `*.example.com` does not match `example.com`);
- path: equal; path_prefix: the path is the prefix or continues it with `/` (`/api` matches `/api`, `/api/`,
  `/api/v1`, not `/apis`; a trailing `/` of the prefix is ignored); path_regex: the whole path matches;
- methods: the method is one of them;
- headers: a header field (each field line is one value, commas are not split) matches exact/prefix/regex, or the
  header is present or absent; with several fields of one name, one matching field is enough;
- query: the same, on the parameters as urllib.parse.parse_qsl decodes them (`+` is a space, blank values kept).

Regular expressions are matched against text: header values and the path decoded as UTF-8 (undecodable bytes kept as
surrogate escapes).
"""

from __future__ import annotations

import enum
import re
import urllib.parse
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Protocol

from mesh import config

__all__ = ["Action", "Destination", "DirectResponse", "Rng", "Route", "RouteTable", "host_of"]


class Rng(Protocol):
    """What the router draws its random numbers from: random.Random, or a seeded one in tests."""

    def random(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Destination:
    """A service, or the subset of its endpoints whose meta has every (key, value) of `subset`; hashable, so it can
    key the cluster that serves it."""

    service: str
    subset: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "subset", tuple(sorted(self.subset)))

    @classmethod
    def of(cls, spec: config.Destination) -> Destination:
        """The destination a route's `to` names."""
        return cls(spec.service, tuple(spec.subset.items()))

    def selects(self, meta: Mapping[str, str]) -> bool:
        """Whether an endpoint with this meta belongs to the destination: its meta has every pair of the subset."""
        return all(meta.get(key) == value for key, value in self.subset)

    @property
    def label(self) -> str:
        """`reviews`, or `reviews{version=v2}` for a subset: for metrics and logs."""
        if not self.subset:
            return self.service
        return f"{self.service}{{{','.join(f'{key}={value}' for key, value in self.subset)}}}"


class Action(enum.Enum):
    """What a route does with the requests it takes."""

    FORWARD = "forward"  # to its destination (pick), or one of its split
    DIRECT_RESPONSE = "direct_response"  # answers itself (direct_response)
    REDIRECT = "redirect"  # answers with a redirect (redirect_status, redirect_location)


@dataclass(frozen=True, slots=True)
class DirectResponse:
    """A response a route gives itself; the proxy adds content-type and content-length."""

    status: int
    body: bytes
    content_type: bytes


_DEFAULT_PORTS = {b"http": 80, b"https": 443}
_SLASH = ord("/")


def host_of(authority: bytes) -> bytes:
    """The host of an authority, as routes match it: without the port, lower-cased, without a trailing dot."""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        host = authority[: end + 1] if end != -1 else authority
    else:
        host = authority.partition(b":")[0]
    return host.lower().rstrip(b".")


class _Request:
    """One request as the conditions see it; what some conditions need is worked out once, when first asked for."""

    __slots__ = ("_host", "_params", "_path_text", "authority", "headers", "method", "path", "query")

    def __init__(
        self, method: bytes, authority: bytes, path: bytes, query: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.method = method
        self.authority = authority
        self.path = path
        self.query = query
        self.headers = headers
        self._host: bytes | None = None
        self._params: list[tuple[str, str]] | None = None
        self._path_text: str | None = None

    def host(self) -> bytes:
        if self._host is None:
            self._host = host_of(self.authority)
        return self._host

    def params(self) -> list[tuple[str, str]]:
        if self._params is None:
            text = self.query.removeprefix(b"?").decode("utf-8", "surrogateescape")
            self._params = urllib.parse.parse_qsl(text, keep_blank_values=True)
        return self._params

    def path_text(self) -> str:
        if self._path_text is None:
            self._path_text = _text(self.path)
        return self._path_text


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


Condition = Callable[[_Request], bool]


def _header_test(spec: config.StringMatch) -> Callable[[bytes], bool] | None:
    """A test of one header value; None for a presence condition."""
    if spec.exact is not None:
        exact = spec.exact.encode()
        return lambda value: value == exact
    if spec.prefix is not None:
        prefix = spec.prefix.encode()
        return lambda value: value.startswith(prefix)
    if spec.regex is not None:
        pattern = re.compile(spec.regex)
        return lambda value: pattern.fullmatch(_text(value)) is not None
    return None


def _param_test(spec: config.StringMatch) -> Callable[[str], bool] | None:
    """A test of one decoded query parameter value; None for a presence condition."""
    if spec.exact is not None:
        exact = spec.exact
        return lambda value: value == exact
    if spec.prefix is not None:
        prefix = spec.prefix
        return lambda value: value.startswith(prefix)
    if spec.regex is not None:
        pattern = re.compile(spec.regex)
        return lambda value: pattern.fullmatch(value) is not None
    return None


def _header_condition(name: bytes, spec: config.StringMatch) -> Condition:
    test = _header_test(spec)
    if test is None:
        present = bool(spec.present)
        return lambda request: any(field == name for field, _ in request.headers) is present
    return lambda request: any(field == name and test(value) for field, value in request.headers)


def _query_condition(name: str, spec: config.StringMatch) -> Condition:
    test = _param_test(spec)
    if test is None:
        present = bool(spec.present)
        return lambda request: any(param == name for param, _ in request.params()) is present
    return lambda request: any(param == name and test(value) for param, value in request.params())


def _host_condition(patterns: Iterable[str]) -> Condition:
    exact = frozenset(p.encode() for p in patterns if not p.startswith("*."))
    suffixes = tuple(p[1:].encode() for p in patterns if p.startswith("*."))  # "*.example.com" -> ".example.com"

    def test(request: _Request) -> bool:
        host = request.host()
        return host in exact or any(host.endswith(s) and len(host) > len(s) for s in suffixes)

    return test


def _stripped_prefix(path_prefix: str) -> bytes:
    """A path_prefix as it is compared: without a trailing "/", so "/" is the empty prefix that matches every path."""
    return path_prefix.encode().rstrip(b"/")


def _conditions(match: config.RouteMatch) -> tuple[Condition, ...]:
    """The route's conditions, cheapest first."""
    conditions: list[Condition] = []
    if match.methods:
        methods = frozenset(method.encode() for method in match.methods)
        conditions.append(lambda request: request.method in methods)
    if match.path is not None:
        path = match.path.encode()
        conditions.append(lambda request: request.path == path)
    elif match.path_prefix is not None:
        prefix = _stripped_prefix(match.path_prefix)
        size = len(prefix)
        if size:
            conditions.append(
                lambda request: (
                    request.path.startswith(prefix) and (len(request.path) == size or request.path[size] == _SLASH)
                )
            )
    elif match.path_regex is not None:
        pattern = re.compile(match.path_regex)
        conditions.append(lambda request: pattern.fullmatch(request.path_text()) is not None)
    if match.host:
        conditions.append(_host_condition(match.host))
    conditions += [_header_condition(name.encode(), spec) for name, spec in match.headers.items()]
    conditions += [_query_condition(name, spec) for name, spec in match.query.items()]
    return tuple(conditions)


class _HeaderChanges:
    """A route's header changes, applied in the order remove, set, add."""

    __slots__ = ("_append", "_drop")

    def __init__(self, spec: config.HeaderChanges) -> None:
        self._drop = frozenset(name.encode() for name in [*spec.remove, *spec.set])
        self._append = tuple((name.encode(), value.encode()) for name, value in [*spec.set.items(), *spec.add.items()])

    def apply(self, headers: list[tuple[bytes, bytes]]) -> None:
        if self._drop:
            headers[:] = [field for field in headers if field[0] not in self._drop]
        headers.extend(self._append)


def _replace_prefix(path: bytes, matched: bytes, replacement: bytes) -> bytes:
    """`path` with `matched` (a path_prefix without its trailing "/") replaced: what follows the prefix is either
    nothing, and the result is `replacement` as written, or starts with "/", joined to `replacement` without doubling
    its slash."""
    if not path.startswith(matched):
        return path
    rest = path[len(matched) :]
    if not rest:
        return replacement
    return replacement.rstrip(b"/") + rest


def _draw(rng: Rng, percent: float) -> bool:
    """True for `percent` % of the calls; 0 and 100 take no draw."""
    if percent >= 100.0:
        return True
    return percent > 0.0 and rng.random() * 100.0 < percent


class Route:
    """A compiled route. `action` says whether it forwards (pick, mirror_to, rewrite_path, apply_request_headers,
    rewrite_authority, timeouts, retries, hash_on apply) or answers itself (direct_response, or redirect_status and
    redirect_location); faults and response header changes apply to either."""

    __slots__ = (
        "_abort",
        "_conditions",
        "_cumulative",
        "_delay",
        "_mirror_percent",
        "_prefix",
        "_redirect",
        "_request_changes",
        "_response_changes",
        "_rewrite_prefix",
        "_total",
        "action",
        "destinations",
        "direct_response",
        "hash_on",
        "mirror",
        "name",
        "redirect_status",
        "retries",
        "rewrite_authority",
        "timeout_per_try",
        "timeout_request",
    )

    def __init__(self, spec: config.Route, *, name: str, default: Destination | None) -> None:
        self.name = name
        self._conditions = _conditions(spec.match)
        self._prefix = None if spec.match.path_prefix is None else _stripped_prefix(spec.match.path_prefix)

        self.direct_response: DirectResponse | None = None
        self.redirect_status: int | None = None
        self._redirect: tuple[bytes | None, bytes | None, int | None, bytes | None, bytes | None] | None = None
        weights: list[int] = []
        if spec.direct_response is not None:
            answer = spec.direct_response
            self.action = Action.DIRECT_RESPONSE
            self.direct_response = DirectResponse(answer.status, answer.body.encode(), answer.content_type.encode())
            self.destinations: tuple[Destination, ...] = ()
        elif spec.redirect is not None:
            redirect = spec.redirect
            self.action = Action.REDIRECT
            self.redirect_status = redirect.status
            self._redirect = (
                _encoded(redirect.scheme),
                _encoded(redirect.host),
                redirect.port,
                _encoded(redirect.path),
                _encoded(redirect.prefix_rewrite),
            )
            self.destinations = ()
        else:
            self.action = Action.FORWARD
            if spec.split is not None:
                self.destinations = tuple(Destination.of(entry.to) for entry in spec.split)
                weights = [entry.weight for entry in spec.split]
            elif spec.to is not None:
                self.destinations = (Destination.of(spec.to),)
            elif default is not None:
                self.destinations = (default,)
            else:
                raise ValueError(f"route {name} names no destination and the table has no default")
        self._cumulative = list(accumulate(weights))
        self._total = self._cumulative[-1] if self._cumulative else 0

        self.mirror = None if spec.mirror is None else Destination.of(spec.mirror.to)
        self._mirror_percent = 0.0 if spec.mirror is None else spec.mirror.percent
        fault = spec.fault
        abort = None if fault is None else fault.abort
        self._abort = None if abort is None else (abort.percent, (abort.status, abort.grpc_status))
        delay = None if fault is None else fault.delay
        self._delay = None if delay is None else (delay.percent, delay.duration)

        rewrite = spec.rewrite
        self._rewrite_prefix = None if rewrite is None else _encoded(rewrite.prefix)
        self.rewrite_authority: bytes | None = None if rewrite is None else _encoded(rewrite.host)
        self._request_changes = None if spec.request_headers is None else _HeaderChanges(spec.request_headers)
        self._response_changes = None if spec.response_headers is None else _HeaderChanges(spec.response_headers)

        timeouts = spec.timeouts
        self.timeout_request: float | None = None if timeouts is None else timeouts.request
        self.timeout_per_try: float | None = None if timeouts is None else timeouts.per_try
        self.retries: config.RetrySettings | None = spec.retries
        self.hash_on: config.HashOn | None = spec.hash_on

    def __repr__(self) -> str:
        targets = ", ".join(destination.label for destination in self.destinations)
        return f"<Route {self.name!r} {self.action.value}{f' to {targets}' if targets else ''}>"

    @property
    def has_faults(self) -> bool:
        """The route delays or aborts some requests."""
        return self._abort is not None or self._delay is not None

    @property
    def changes_request(self) -> bool:
        """The route rewrites the path or host, or changes request headers."""
        changes = (self._rewrite_prefix, self.rewrite_authority, self._request_changes)
        return any(change is not None for change in changes)

    @property
    def changes_response(self) -> bool:
        """The route changes response headers."""
        return self._response_changes is not None

    def _matches(self, request: _Request) -> bool:
        return all(condition(request) for condition in self._conditions)

    def pick(self, rng: Rng) -> Destination | None:
        """Where this request goes: the destination, one of a split by weight, or None for a route that answers."""
        if self._total:
            return self.destinations[bisect_right(self._cumulative, rng.random() * self._total)]
        return self.destinations[0] if self.destinations else None

    def mirror_to(self, rng: Rng) -> Destination | None:
        """Where a copy of this request goes, for the mirror's percentage of the requests; else None."""
        if self.mirror is None:
            return None
        return self.mirror if _draw(rng, self._mirror_percent) else None

    def fault_abort(self, rng: Rng) -> tuple[int, int | None] | None:
        """(HTTP status, gRPC status or None) to answer this request with, for the abort's percentage; else None."""
        if self._abort is None:
            return None
        percent, answer = self._abort
        return answer if _draw(rng, percent) else None

    def fault_delay(self, rng: Rng) -> float:
        """Seconds to hold this request before going on, for the delay's percentage; else 0.0."""
        if self._delay is None:
            return 0.0
        percent, duration = self._delay
        return duration if _draw(rng, percent) else 0.0

    def rewrite_path(self, path: bytes) -> bytes:
        """The path to forward: with rewrite.prefix, the matched path_prefix replaced (see mesh.config.Rewrite)."""
        if self._rewrite_prefix is None or self._prefix is None:
            return path
        return _replace_prefix(path, self._prefix, self._rewrite_prefix)

    def apply_request_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Change the forwarded request's headers in place: remove, then set (replacing all), then add (append)."""
        if self._request_changes is not None:
            self._request_changes.apply(headers)

    def apply_response_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Change the response's headers in place, as apply_request_headers does."""
        if self._response_changes is not None:
            self._response_changes.apply(headers)

    def redirect_location(self, scheme: bytes, authority: bytes, path: bytes, query: bytes) -> bytes:
        """The Location of a redirect route's answer to a request for scheme://authority/path?query.

        The path becomes redirect.path, or the path with the matched prefix replaced by redirect.prefix_rewrite; the
        query is kept. Without scheme, host and port the authority is kept as sent; redirect.scheme or redirect.host
        replaces that part and drops the request's port; redirect.port sets the port (left out when it is the
        scheme's default). Without any authority to build on, the Location is the path and query alone."""
        if self._redirect is None:
            raise ValueError(f"route {self.name} does not redirect")
        new_scheme, new_host, new_port, new_path, new_prefix = self._redirect
        if new_path is not None:
            path = new_path
        elif new_prefix is not None and self._prefix is not None:
            path = _replace_prefix(path, self._prefix, new_prefix)
        if new_scheme is None and new_host is None and new_port is None:
            return b"%s://%s%s%s" % (scheme, authority, path, query) if authority else path + query
        scheme = new_scheme or scheme
        host = new_host or _host_as_sent(authority)
        if not host:
            return path + query
        if new_port is not None and new_port != _DEFAULT_PORTS.get(scheme):
            host += b":%d" % new_port
        return b"%s://%s%s%s" % (scheme, host, path, query)


def _encoded(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def _host_as_sent(authority: bytes) -> bytes:
    if authority.startswith(b"["):
        return authority[: authority.find(b"]") + 1]
    return authority.partition(b":")[0]


class RouteTable:
    """A listener's routes, compiled: `match` finds the route of a request (see the module docstring for the order
    and the conditions). `len()` counts the configured routes, not the implicit default."""

    __slots__ = ("_candidates", "default", "routes")

    def __init__(self, routes: Sequence[config.Route], *, default: Destination | None) -> None:
        self.default = default
        self.routes = tuple(
            Route(spec, name=spec.name or f"routes[{i}]", default=default) for i, spec in enumerate(routes)
        )
        names = [route.name for route in self.routes]
        if len(set(names)) != len(names) or config.FALLBACK_ROUTE in names:
            raise ValueError(f"route names must be unique and not {config.FALLBACK_ROUTE!r}: {names}")
        fallback = () if default is None else (Route(config.Route(), name=config.FALLBACK_ROUTE, default=default),)
        self._candidates = self.routes + fallback

    def __len__(self) -> int:
        return len(self.routes)

    def __repr__(self) -> str:
        default = "none" if self.default is None else self.default.label
        return f"<RouteTable {len(self.routes)} routes, default {default}>"

    def match(
        self, method: bytes, authority: bytes, path: bytes, query: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Route | None:
        """The first route whose conditions all hold for this request, or None (only without a default)."""
        request = _Request(method, authority, path, query, headers)
        for route in self._candidates:
            if route._matches(request):
                return route
        return None

    @property
    def all_routes(self) -> tuple[Route, ...]:
        """The configured routes, then the implicit `default` route when the table has a default."""
        return self._candidates

    def destinations(self) -> frozenset[Destination]:
        """Every destination the routes may send requests to: their destinations (zero-weight split entries
        included), mirrors, and the default if some route can fall back to it."""
        found: set[Destination] = set()
        for route in self._candidates:
            found.update(route.destinations)
            if route.mirror is not None:
                found.add(route.mirror)
        return frozenset(found)
