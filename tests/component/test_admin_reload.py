"""`POST /reload` on the admin listener, over memory streams and a virtual clock: outcomes, methods, one reload at a
time, and request bodies on a kept-alive connection."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio
import trio.testing

from mesh.admin import AdminApp
from mesh.metrics import Metrics
from mesh.reload import ReloadRefused

POST_RELOAD = b"POST /reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n"
GET_LIVE = b"GET /live HTTP/1.1\r\nHost: admin\r\n\r\n"


def admin(reload: Callable[[], Awaitable[dict[str, Any]]] | None = None, **limits: Any) -> AdminApp:
    return AdminApp(
        metrics=Metrics(),
        ready=lambda: (True, "ready"),
        config=lambda: {"service": {"name": "web"}},
        clusters=dict,
        certs=dict,
        reload=reload,
        **limits,
    )


async def reload_ok() -> dict[str, Any]:
    return {"result": "ok", "version": 3}


class Client:
    """One connection to the app's handler (which runs in `nursery` and closes its end when it returns)."""

    def __init__(self, nursery: trio.Nursery, app: AdminApp) -> None:
        self.stream, server = trio.testing.memory_stream_pair()
        self.buffer = b""
        self.closed = trio.Event()

        async def serve() -> None:
            try:
                await app.handle(server)
            finally:
                await server.aclose()
                self.closed.set()

        nursery.start_soon(serve)

    async def request(self, data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        await self.stream.send_all(data)
        return await self.response()

    async def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """The next response: (status, headers, body); the body as long as its Content-Length says."""
        while b"\r\n\r\n" not in self.buffer:
            await self._more()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.split(b"\r\n")
        headers = {name.lower(): value for name, value in (line.split(b": ", 1) for line in lines)}
        length = int(headers.get(b"content-length", b"0"))
        while len(self.buffer) < length:
            await self._more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body

    async def at_eof(self) -> bool:
        return self.buffer == b"" and await self.stream.receive_some() == b""

    async def _more(self) -> None:
        data = await self.stream.receive_some()
        assert data, f"connection closed after {self.buffer!r}"
        self.buffer += data


async def test_a_reload_that_applies_answers_200_with_its_json(nursery: trio.Nursery) -> None:
    client = Client(nursery, admin(reload_ok))
    status, headers, body = await client.request(POST_RELOAD)
    assert status == 200
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body) == {"result": "ok", "version": 3}


async def test_a_refused_reload_answers_400_with_the_errors(nursery: trio.Nursery) -> None:
    errors = ["sidecar.yaml: upstreams[1].bind: port 70000 out of range", "sidecar.yaml: discovery: required"]

    async def refuse() -> dict[str, Any]:
        raise ReloadRefused(errors)

    client = Client(nursery, admin(refuse))
    status, headers, body = await client.request(POST_RELOAD)
    assert status == 400
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body) == {"result": "refused", "errors": errors}


async def test_reload_not_configured_answers_404(nursery: trio.Nursery) -> None:
    client = Client(nursery, admin(None))
    status, _, body = await client.request(POST_RELOAD)
    assert (status, body) == (404, b"reload not configured\n")


async def test_a_reload_that_fails_answers_500_and_is_logged(nursery: trio.Nursery) -> None:
    async def fail() -> dict[str, Any]:
        raise RuntimeError("disk on fire")

    client = Client(nursery, admin(fail))
    with structlog.testing.capture_logs() as logs:
        status, _, body = await client.request(POST_RELOAD)
    assert status == 500
    assert json.loads(body) == {"result": "error", "errors": ["RuntimeError: disk on fire"]}
    assert [entry["event"] for entry in logs] == ["config reload failed"]


async def test_other_methods_on_reload_answer_405_allowing_post(nursery: trio.Nursery) -> None:
    calls = []

    async def reload() -> dict[str, Any]:
        calls.append(1)
        return {"result": "ok"}

    client = Client(nursery, admin(reload))
    status, headers, body = await client.request(b"GET /reload HTTP/1.1\r\nHost: admin\r\n\r\n")
    assert (status, headers[b"allow"], body) == (405, b"POST", b"only POST is served here\n")
    status, headers, _ = await client.request(b"PUT /reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 2\r\n\r\n{}")
    assert (status, headers[b"allow"]) == (405, b"POST")
    await client.stream.send_all(b"HEAD /reload HTTP/1.1\r\nHost: admin\r\n\r\n")
    head = await client.stream.receive_some()
    assert head.startswith(b"HTTP/1.1 405 ") and b"allow: POST\r\n" in head and head.endswith(b"\r\n\r\n")
    assert calls == []


async def test_post_elsewhere_answers_405_allowing_get_and_head(nursery: trio.Nursery) -> None:
    client = Client(nursery, admin(reload_ok))
    status, headers, _ = await client.request(b"POST /live HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n")
    assert (status, headers[b"allow"]) == (405, b"GET, HEAD")


async def test_config_is_still_served_with_get(nursery: trio.Nursery) -> None:
    client = Client(nursery, admin(reload_ok))
    status, _, body = await client.request(b"GET /config HTTP/1.1\r\nHost: admin\r\n\r\n")
    assert (status, json.loads(body)) == (200, {"service": {"name": "web"}})


async def test_concurrent_reloads_run_one_after_the_other(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    running, spans = 0, []

    async def slow_reload() -> dict[str, Any]:
        nonlocal running
        running += 1
        assert running == 1, "two reloads at once"
        start = trio.current_time()
        await trio.sleep(1)
        running -= 1
        spans.append((start, trio.current_time()))
        return {"result": "ok", "version": len(spans) + 1}

    app = admin(slow_reload)
    first, second = Client(nursery, app), Client(nursery, app)
    start = trio.current_time()
    answers = {}

    async def post(name: str, client: Client) -> None:
        status, _, body = await client.request(POST_RELOAD)
        answers[name] = (status, json.loads(body), trio.current_time() - start)

    async with trio.open_nursery() as both:
        both.start_soon(post, "first", first)
        await trio.sleep(0.5)  # the first reload is running
        both.start_soon(post, "second", second)
    assert spans == [(start, start + 1), (start + 1, start + 2)]
    assert answers == {
        "first": (200, {"result": "ok", "version": 2}, 1),
        "second": (200, {"result": "ok", "version": 3}, 2),
    }


async def test_a_reload_with_a_body_keeps_the_connection_alive(nursery: trio.Nursery) -> None:
    client = Client(nursery, admin(reload_ok))
    body = b'{"ignored": true}'
    status, headers, _ = await client.request(
        b"POST /reload HTTP/1.1\r\nHost: admin\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert status == 200 and b"connection" not in headers
    chunked = b"POST /reload HTTP/1.1\r\nHost: admin\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    assert (await client.request(chunked))[0] == 200
    status, _, answer = await client.request(GET_LIVE)
    assert (status, answer) == (200, b"live\n")
    assert not client.closed.is_set()


async def test_a_body_sent_in_pieces_is_read_before_the_answer(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    client = Client(nursery, admin(reload_ok))
    await client.stream.send_all(b"POST /reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 4\r\n\r\nab")
    await trio.sleep(1)
    assert client.buffer == b""
    await client.stream.send_all(b"cd" + GET_LIVE)
    assert (await client.response())[0] == 200
    assert (await client.response())[2] == b"live\n"


async def test_expect_100_continue_gets_continue_before_the_answer(nursery: trio.Nursery) -> None:
    client = Client(nursery, admin(reload_ok))
    await client.stream.send_all(
        b"POST /reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    assert (await client.response())[0] == 100
    status, _, _ = await client.request(b"{}")
    assert status == 200


async def test_a_body_over_the_limit_gets_413_and_the_connection_closes(nursery: trio.Nursery) -> None:
    client = Client(nursery, admin(reload_ok))
    status, headers, _ = await client.request(
        b"POST /reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 1000000\r\n\r\n"
    )
    assert (status, headers[b"connection"]) == (413, b"close")
    assert await client.at_eof()
    chunked = Client(nursery, admin(reload_ok))
    await chunked.stream.send_all(b"POST /reload HTTP/1.1\r\nHost: admin\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(5):
        await chunked.stream.send_all(b"4000\r\n" + b"x" * 0x4000 + b"\r\n")
    status, headers, _ = await chunked.response()
    assert (status, headers[b"connection"]) == (413, b"close")


async def test_a_body_that_stops_arriving_gets_408_at_the_head_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    calls = []

    async def reload() -> dict[str, Any]:
        calls.append(1)
        return {"result": "ok"}

    client = Client(nursery, admin(reload, head_timeout=2.0))
    await client.stream.send_all(b"POST /reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 10\r\n\r\nabc")
    start = trio.current_time()
    status, headers, _ = await client.response()
    assert (status, headers[b"connection"], trio.current_time() - start) == (408, b"close", 2.0)
    assert calls == []
