"""Sans-io request-target normaliser: the one path that routes match and upstreams receive, or why it is refused.

Routing on a path the upstream reads differently is how path-based policy gets bypassed (`/public/../admin`,
`/admin%2fsecret`, `/a\\b` on a Windows backend). So the path is normalised once, before routing, and the normalised
path is also what is forwarded:

- an origin-form target (`/path?query`) is taken as is; an absolute-form target (`http://host/path?query`, which an
  HTTP/1.1 client may send to a proxy) contributes its path and query only: the host the request is routed by is its
  Host header or :authority, as the codec reports it; any other form (`*`, `host:port`) is refused;
- repeated slashes are merged (`/a//b` is `/a/b`);
- `.` and `..` segments are resolved as RFC 3986 section 5.2.4 says (`..` above the root stays at the root), and
  `%2E`/`%2e` counts as a dot (it is decoded to `.` wherever it appears, which RFC 3986 section 6.2.2.2 allows);
- `%2F`, `%5C`, `%00` (encoded `/`, `\\`, NUL), a raw `\\`, a malformed `%` escape and a `#` fragment are refused;
- every other byte, and every other escape, is kept as it is, undecoded; the query is not looked at.
"""

from __future__ import annotations

import re

__all__ = ["PathRejected", "normalize_target"]


class PathRejected(Exception):
    """A request target that is not forwarded; `reason` says why, in words fit for a 400 response."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})?")
_REFUSED_ESCAPES = {
    b"2f": "encoded slash (%2F) in the path",
    b"5c": "encoded backslash (%5C) in the path",
    b"00": "encoded NUL (%00) in the path",
}
_ABSOLUTE_SCHEMES = (b"http", b"https")


def normalize_target(target: bytes) -> tuple[bytes, bytes]:
    """Split a request target into its normalised path and its query (with the leading `?`, or b"" without one);
    raise PathRejected if it cannot be routed safely."""
    if b"#" in target:
        raise PathRejected("fragment (#) in the request target")
    if not target.startswith(b"/"):
        target = _origin_form(target)
    path, mark, query = target.partition(b"?")
    if b"//" in path or b"/." in path or b"%" in path or b"\\" in path:
        path = _normalize_path(path)
    return path, mark + query


def _origin_form(target: bytes) -> bytes:
    """The path and query of an absolute-form target (`http://host[:port]/path?query`)."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in _ABSOLUTE_SCHEMES:
        if target == b"*":
            raise PathRejected("the asterisk-form request target (*) is not routed")
        raise PathRejected("the request target must start with '/'")
    ends = [i for i in (rest.find(b"/"), rest.find(b"?")) if i != -1]
    end = min(ends) if ends else len(rest)
    if end == 0:
        raise PathRejected("absolute-form request target without a host")
    remainder = rest[end:]
    return remainder if remainder.startswith(b"/") else b"/" + remainder


def _normalize_path(path: bytes) -> bytes:
    if b"\\" in path:
        raise PathRejected("backslash in the path")
    if b"%" in path:
        path = _ESCAPE.sub(_check_escape, path)
    segments = path.split(b"/")[1:]  # the path starts with "/"
    kept: list[bytes] = []
    for segment in segments[:-1]:
        if segment == b"..":
            if kept:
                kept.pop()
        elif segment and segment != b".":
            kept.append(segment)
    last = segments[-1]
    directory = last in (b"", b".", b"..")  # the path ends with "/" once resolved
    if last == b".." and kept:
        kept.pop()
    elif not directory:
        kept.append(last)
    if not kept:
        return b"/"
    return b"/" + b"/".join(kept) + (b"/" if directory else b"")


def _check_escape(escape: re.Match[bytes]) -> bytes:
    code = escape.group(1)
    if code is None:
        raise PathRejected("malformed percent escape in the path")
    code = code.lower()
    if code == b"2e":
        return b"."
    reason = _REFUSED_ESCAPES.get(code)
    if reason is not None:
        raise PathRejected(reason)
    return escape.group(0)
