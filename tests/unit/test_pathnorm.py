"""The request-target normaliser: merged slashes, resolved dot segments, refused escapes, and its invariants."""

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from mesh.pipeline.pathnorm import PathRejected, normalize_target


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"/", b"/", b""),
        (b"/api/v1/users", b"/api/v1/users", b""),
        (b"/api/v1/users?id=7&x=%2F", b"/api/v1/users", b"?id=7&x=%2F"),
        (b"/a?", b"/a", b"?"),
        (b"/a?b//c/../d", b"/a", b"?b//c/../d"),  # the query is not looked at
        (b"//a///b//", b"/a/b/", b""),
        (b"/a/./b", b"/a/b", b""),
        (b"/a/b/../c", b"/a/c", b""),
        (b"/a/b/..", b"/a/", b""),
        (b"/a/b/.", b"/a/b/", b""),
        (b"/..", b"/", b""),
        (b"/../../etc/passwd", b"/etc/passwd", b""),
        (b"/public/../admin", b"/admin", b""),
        (b"/a/%2e%2E/b", b"/b", b""),
        (b"/a/.%2e/b", b"/b", b""),
        (b"/a/%2e/b", b"/a/b", b""),
        (b"/file%2Etxt", b"/file.txt", b""),  # an encoded dot is a dot wherever it is
        (b"/a/...", b"/a/...", b""),
        (b"/a/.hidden", b"/a/.hidden", b""),
        (b"/caf%C3%A9/%41", b"/caf%C3%A9/%41", b""),  # other escapes stay as they are
        (b"/a%252e%252e/b", b"/a%252e%252e/b", b""),
        (b"/a;b/..;/c", b"/a;b/..;/c", b""),
        (b"http://api.local/a//b?x=1", b"/a/b", b"?x=1"),
        (b"HTTPS://api.local:8443", b"/", b""),
        (b"http://api.local?x", b"/", b"?x"),
    ],
)
def test_normalised(target: bytes, path: bytes, query: bytes) -> None:
    assert normalize_target(target) == (path, query)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (b"", "the request target must start with '/'"),
        (b"api/v1", "the request target must start with '/'"),
        (b"*", "the asterisk-form request target (*) is not routed"),
        (b"api.local:443", "the request target must start with '/'"),
        (b"ftp://host/file", "the request target must start with '/'"),
        (b"http:///path", "absolute-form request target without a host"),
        (b"/a#frag", "fragment (#) in the request target"),
        (b"/a?b#frag", "fragment (#) in the request target"),
        (b"/admin%2fsecret", "encoded slash (%2F) in the path"),
        (b"/admin%2Fsecret", "encoded slash (%2F) in the path"),
        (b"/a%5cb", "encoded backslash (%5C) in the path"),
        (b"/a%5Cb", "encoded backslash (%5C) in the path"),
        (b"/a\\b", "backslash in the path"),
        (b"/a%00b", "encoded NUL (%00) in the path"),
        (b"/a%", "malformed percent escape in the path"),
        (b"/a%4", "malformed percent escape in the path"),
        (b"/a%zz", "malformed percent escape in the path"),
    ],
)
def test_refused(target: bytes, reason: str) -> None:
    with pytest.raises(PathRejected) as caught:
        normalize_target(target)
    assert caught.value.reason == reason
    assert str(caught.value) == reason


def test_an_escape_in_the_query_is_not_checked() -> None:
    assert normalize_target(b"/a?q=100%&p=%2f") == (b"/a", b"?q=100%&p=%2f")


SEGMENTS = st.sampled_from(["a", "b", "", ".", "..", "%2e", "%2E", "%2e%2e", ".%2E", "...", "x.y", "%41", "%7e", ";"])
paths = st.lists(SEGMENTS, max_size=12).map(lambda segments: ("/" + "/".join(segments)).encode())
anything = st.binary(max_size=40).map(lambda raw: b"/" + raw) | st.text("/.%2eEfF5cC0\\?#ab", max_size=30).map(
    str.encode
)


def assert_normal(path: bytes) -> None:
    assert path.startswith(b"/")
    assert b"//" not in path
    assert b"/./" not in path and b"/../" not in path
    assert not path.endswith(b"/.") and not path.endswith(b"/..")
    assert b"%2e" not in path.lower()


@given(paths, st.sampled_from([b"", b"?", b"?a=1&b=/../"]))
@example(b"/%2e%2e/..", b"")
def test_normalising_is_idempotent_and_leaves_no_dot_segments(path: bytes, query: bytes) -> None:
    normal, rest = normalize_target(path + query)
    assert rest == query
    assert_normal(normal)
    assert normalize_target(normal + rest) == (normal, rest)


@given(anything)
def test_any_target_is_refused_or_normal(target: bytes) -> None:
    try:
        normal, query = normalize_target(target)
    except PathRejected as exc:
        assert exc.reason
    else:
        assert_normal(normal)
        assert normalize_target(normal + query) == (normal, query)
        assert b"\\" not in normal and b"#" not in normal + query
