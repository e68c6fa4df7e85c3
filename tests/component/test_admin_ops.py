"""The admin operations `POST /log-level`, `/drain` and `/shutdown`: what they answer and call, once only, over
memory streams; the loopback-only rule over real sockets (loopback, IPv4-mapped and this machine's own
non-loopback address); and an in-process sidecar that drains, stays up, then shuts down."""

from __future__ import annotations

import gc
import io
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from mesh import log as mesh_log
from mesh.admin import AdminApp, is_loopback, peer_address
from mesh.config import parse_config
from mesh.listener import Drain, serve_tcp
from mesh.metrics import Metrics
from sidecar.app import Sidecar
from tests.component.test_admin_reload import Client

NOT_LOOPBACK = {"error": "admin operations are answered to loopback clients only"}


def post(path: str, body: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: admin\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)


class Operations:
    """Fakes of the sidecar's callables, recording their calls."""

    def __init__(self, *, drain_begins: bool = True, shutdown_begins: bool = True) -> None:
        self.level = "info"
        self.levels: list[str] = []
        self.drains = 0
        self.shutdowns = 0
        self.reloads = 0
        self.drain_begins = drain_begins
        self.shutdown_begins = shutdown_begins

    def set_level(self, level: str) -> str:
        self.levels.append(level)
        was, self.level = self.level, level
        return was

    def drain(self) -> bool:
        self.drains += 1
        return self.drain_begins

    def shutdown(self) -> bool:
        self.shutdowns += 1
        return self.shutdown_begins

    async def reload(self) -> dict[str, Any]:
        self.reloads += 1
        return {"result": "ok"}

    def admin(self, **overrides: Any) -> AdminApp:
        kwargs: dict[str, Any] = {
            "metrics": Metrics(),
            "ready": lambda: (True, "ready"),
            "config": dict,
            "clusters": dict,
            "certs": dict,
            "reload": self.reload,
            "log_level": self.set_level,
            "drain": self.drain,
            "shutdown": self.shutdown,
        }
        return AdminApp(**{**kwargs, **overrides})


async def answer(client: Client, data: bytes) -> tuple[int, Any]:
    status, headers, body = await client.request(data)
    return status, json.loads(body) if headers.get(b"content-type") == b"application/json" else body


# --- POST /log-level ------------------------------------------------------------------------------------------------
async def test_log_level_from_a_form_body_answers_the_level_and_the_one_before(nursery: trio.Nursery) -> None:
    ops = Operations()
    client = Client(nursery, ops.admin())
    with structlog.testing.capture_logs() as logs:
        assert await answer(client, post("/log-level", b"level=debug")) == (200, {"level": "debug", "was": "info"})
    assert ops.levels == ["debug"]
    assert [(e["event"], e["log_level"], e["to"], e["was"]) for e in logs] == [
        ("log level changed", "warning", "debug", "info")
    ]


async def test_log_level_from_the_query_in_any_case(nursery: trio.Nursery) -> None:
    ops = Operations()
    client = Client(nursery, ops.admin())
    assert await answer(client, post("/log-level?level=WARNING")) == (200, {"level": "warning", "was": "info"})
    assert await answer(client, post("/log-level?level=info", b"level=info")) == (
        200,
        {"level": "info", "was": "warning"},
    )
    assert ops.levels == ["warning", "info"]


@pytest.mark.parametrize(
    ("target", "body"),
    [
        ("/log-level", b""),
        ("/log-level", b"level=loud"),
        ("/log-level", b"level=critical"),
        ("/log-level?level=", b""),
        ("/log-level?level=debug", b"level=error"),
        ("/log-level", b'{"level": "debug"}'),
    ],
)
async def test_a_missing_unknown_or_ambiguous_level_answers_400_naming_the_allowed_ones(
    nursery: trio.Nursery, target: str, body: bytes
) -> None:
    ops = Operations()
    client = Client(nursery, ops.admin())
    status, answered = await answer(client, post(target, body))
    assert status == 400
    assert answered["allowed"] == ["debug", "info", "warning", "error"]
    assert "debug, info, warning, error" in answered["error"]
    assert ops.levels == []


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The sidecar's logging (mesh.log.configure) into a StringIO, restored afterwards."""
    stream = io.StringIO()
    mesh_log.configure("info", stream)
    yield stream
    structlog.reset_defaults()
    mesh_log.reset_access_stream()
    mesh_log.set_level("info")


def _uncached() -> None:
    """From here, module loggers (mesh.admin's) first used do not keep this test's configuration for good."""
    structlog.configure(cache_logger_on_first_use=False)


async def test_a_change_to_error_is_logged_before_it_hides_warnings(
    nursery: trio.Nursery, json_log: io.StringIO
) -> None:
    _uncached()
    client = Client(nursery, Operations().admin(log_level=mesh_log.set_level))
    assert await answer(client, post("/log-level", b"level=error")) == (200, {"level": "error", "was": "info"})
    assert await answer(client, post("/log-level", b"level=info")) == (200, {"level": "info", "was": "error"})
    events = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert [(e["event"], e["level"], e["to"], e.get("was")) for e in events] == [
        ("log level changed", "warning", "error", None),  # logged before the change
        ("log level changed", "warning", "info", "error"),  # logged after it
    ]


async def test_a_logger_already_in_use_follows_the_new_level(nursery: trio.Nursery, json_log: io.StringIO) -> None:
    logger = mesh_log.get_logger("mesh.test")
    logger.debug("hidden")  # its first use: structlog caches it, with its level methods, from here
    _uncached()
    client = Client(nursery, Operations().admin(log_level=mesh_log.set_level))
    assert (await answer(client, post("/log-level?level=debug")))[0] == 200
    logger.debug("shown")
    assert mesh_log.current_level() == "debug"
    assert (await answer(client, post("/log-level?level=warning")))[0] == 200
    logger.info("hidden too")
    logger.warning("shown too")
    events = [json.loads(line)["event"] for line in json_log.getvalue().splitlines()]
    assert [e for e in events if e != "log level changed"] == ["shown", "shown too"]


# --- POST /drain and /shutdown ----------------------------------------------------------------------------------------
async def test_drain_answers_202_turns_ready_to_draining_and_refuses_reloads(nursery: trio.Nursery) -> None:
    ops = Operations()
    client = Client(nursery, ops.admin())
    assert (await client.request(b"GET /ready HTTP/1.1\r\nHost: a\r\n\r\n"))[0] == 200
    assert await answer(client, post("/drain")) == (202, {"result": "draining", "already": False})
    status, _, body = await client.request(b"GET /ready HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (status, body) == (503, b"draining\n")
    status, answered = await answer(client, post("/reload"))
    assert status == 400 and answered["result"] == "refused" and "POST /drain" in answered["errors"][0]
    assert (await client.request(b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n"))[2] == b"live\n"
    assert (ops.drains, ops.reloads, ops.shutdowns) == (1, 0, 0)


async def test_drain_and_shutdown_are_done_once_however_often_and_concurrently_asked(nursery: trio.Nursery) -> None:
    ops = Operations()
    app = ops.admin()
    answers: dict[str, list[tuple[int, Any]]] = {"/drain": [], "/shutdown": []}

    async def ask(path: str) -> None:
        answers[path].append(await answer(Client(nursery, app), post(path)))

    async with trio.open_nursery() as many:
        for _ in range(5):
            many.start_soon(ask, "/drain")
            many.start_soon(ask, "/shutdown")
    assert (ops.drains, ops.shutdowns) == (1, 1)
    assert (
        sorted(answers["/drain"], key=str)
        == [(202, {"result": "draining", "already": False})] + [(202, {"result": "draining", "already": True})] * 4
    )
    assert (
        sorted(answers["/shutdown"], key=str)
        == [(202, {"result": "shutting down", "already": False})]
        + [(202, {"result": "shutting down", "already": True})] * 4
    )


async def test_a_drain_or_shutdown_begun_elsewhere_answers_already(nursery: trio.Nursery) -> None:
    ops = Operations(drain_begins=False, shutdown_begins=False)  # e.g. SIGTERM came first
    client = Client(nursery, ops.admin())
    assert await answer(client, post("/shutdown")) == (202, {"result": "shutting down", "already": True})
    assert await answer(client, post("/drain")) == (202, {"result": "draining", "already": True})


@pytest.mark.parametrize("path", ["/log-level", "/drain", "/shutdown"])
async def test_other_methods_answer_405_allowing_post(nursery: trio.Nursery, path: str) -> None:
    ops = Operations()
    client = Client(nursery, ops.admin())
    for method in (b"GET", b"PUT", b"DELETE"):
        status, headers, _ = await client.request(method + b" %s HTTP/1.1\r\nHost: a\r\n\r\n" % path.encode())
        assert (status, headers[b"allow"]) == (405, b"POST")
    await client.stream.send_all(b"HEAD %s HTTP/1.1\r\nHost: a\r\n\r\n" % path.encode())
    head = await client.stream.receive_some()
    assert head.startswith(b"HTTP/1.1 405 ") and b"allow: POST\r\n" in head
    assert (ops.levels, ops.drains, ops.shutdowns) == ([], 0, 0)


async def test_operations_not_given_answer_404(nursery: trio.Nursery) -> None:
    client = Client(nursery, Operations().admin(log_level=None, drain=None, shutdown=None))
    for path in ("/log-level?level=debug", "/drain", "/shutdown"):
        assert (await client.request(post(path)))[0] == 404
    assert (await client.request(b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n"))[2].endswith(
        b"POST /reload /log-level /drain /shutdown\n"
    )


# --- loopback only ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:127.1.2.3", True),
        ("10.0.0.7", False),
        ("192.0.2.2", False),
        ("0.0.0.0", False),
        ("::", False),
        ("::ffff:10.0.0.7", False),
        ("fe80::1%eth0", False),
        ("128.0.0.1", False),
        ("unknown", False),
        ("", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


class _GonePeerSocket:
    family = socket.AF_INET

    def getpeername(self) -> tuple[str, int]:
        raise OSError(107, "Transport endpoint is not connected")


class _GonePeerStream:
    socket = _GonePeerSocket()


def test_a_peer_already_gone_is_not_loopback() -> None:
    peer = peer_address(_GonePeerStream())  # type: ignore[arg-type]
    assert peer == "unknown" and not is_loopback(peer)


def test_a_stream_that_is_not_a_socket_is_local() -> None:
    client, _ = trio.testing.memory_stream_pair()
    assert peer_address(client) is None


def _own_address(family: socket.AddressFamily, probe: str) -> str | None:
    """An address of this machine that is not loopback (the one a route to `probe` leaves from), or None."""
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((probe, 9))  # UDP: nothing is sent
            address = sock.getsockname()[0]
    except OSError:
        return None
    return None if is_loopback(address) else address


@pytest.fixture
def own_ipv4() -> str:
    address = _own_address(socket.AF_INET, "192.0.2.1")
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    return address


async def _listen(nursery: trio.Nursery, app: AdminApp, sock: trio.socket.SocketType) -> int:
    """Serve `app` on the bound socket `sock` as the sidecar does; its port."""
    sock.listen(16)
    await nursery.start(
        lambda task_status: serve_tcp(
            [trio.SocketListener(sock)],
            app.handle,
            name="admin",
            drain=Drain(),
            max_connections=app.max_connections,
            drain_timeout=1.0,
            task_status=task_status,
        )
    )
    return sock.getsockname()[1]


async def _tcp_listener(nursery: trio.Nursery, app: AdminApp, host: str) -> int:
    sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind((host, 0))
    return await _listen(nursery, app, sock)


async def _exchange(host: str, port: int, data: bytes, *, source: str | None = None) -> tuple[int, bytes]:
    """One request over a real TCP connection (from `source`, if given): (status, body)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with trio.fail_after(10):
        sock = trio.socket.socket(family)
        if source is not None:
            await sock.bind((source, 0))
        await sock.connect((host, port))
        stream = trio.SocketStream(sock)
        async with stream:
            head, body = data.split(b"\r\n\r\n", 1)
            await stream.send_all(head + b"\r\nConnection: close\r\n\r\n" + body)
            raw = b""
            while chunk := await stream.receive_some():
                raw += chunk
    head, _, answered = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), answered


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", id="ipv6")])
async def test_a_loopback_client_gets_its_operations_done(nursery: trio.Nursery, host: str) -> None:
    if host == "::1" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    ops = Operations()
    port = await _tcp_listener(nursery, ops.admin(), host)
    assert await _exchange(host, port, post("/log-level", b"level=debug")) == (
        200,
        json.dumps({"level": "debug", "was": "info"}, indent=2, sort_keys=True).encode() + b"\n",
    )
    assert (await _exchange(host, port, post("/drain")))[0] == 202
    assert (await _exchange(host, port, post("/shutdown")))[0] == 202
    assert (await _exchange(host, port, post("/reload")))[0] == 400  # refused: drained
    assert (ops.levels, ops.drains, ops.shutdowns) == (["debug"], 1, 1)


async def test_a_client_from_another_address_gets_403_for_every_operation(nursery: trio.Nursery, own_ipv4: str) -> None:
    ops = Operations()
    port = await _tcp_listener(nursery, ops.admin(), own_ipv4)
    with structlog.testing.capture_logs() as logs:
        for target, body in (("/log-level", b"level=debug"), ("/drain", b""), ("/shutdown", b""), ("/reload", b"")):
            status, answered = await _exchange(own_ipv4, port, post(target, body))
            assert (status, json.loads(answered)) == (403, NOT_LOOPBACK)
    assert (ops.levels, ops.drains, ops.shutdowns, ops.reloads) == ([], 0, 0, 0)
    assert {(e["event"], e["peer"]) for e in logs} == {("admin operation refused: not a loopback client", own_ipv4)}
    # GET endpoints answer it as before, and other methods on an operation still get 405
    assert await _exchange(own_ipv4, port, b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n") == (200, b"live\n")
    assert await _exchange(own_ipv4, port, b"GET /ready HTTP/1.1\r\nHost: a\r\n\r\n") == (200, b"ready\n")
    assert (await _exchange(own_ipv4, port, b"GET /drain HTTP/1.1\r\nHost: a\r\n\r\n"))[0] == 405


async def test_on_a_dual_stack_socket_mapped_loopback_is_served_and_mapped_others_are_not(
    nursery: trio.Nursery, own_ipv4: str
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    ops = Operations()
    sock = trio.socket.socket(socket.AF_INET6)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        await sock.bind(("::", 0))
    except OSError:
        pytest.skip("no dual-stack socket here")
    port = await _listen(nursery, ops.admin(), sock)
    # the peers are ::ffff:127.0.0.1 and ::ffff:<own address>
    assert (await _exchange("127.0.0.1", port, post("/drain")))[0] == 202
    assert (await _exchange(own_ipv4, port, post("/shutdown")))[0] == 403
    assert (ops.drains, ops.shutdowns) == (1, 0)


# --- a sidecar in process --------------------------------------------------------------------------------------------
@pytest.fixture
def unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()  # the sidecar freezes what it built once serving


async def _refused(host: str, port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def _wait_for(condition: Callable[[], Any], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not await condition():
            await trio.sleep(0.02)


async def test_a_drained_sidecar_stays_up_refusing_connections_until_post_shutdown(tmp_path: Path, unfreeze) -> None:
    config = parse_config(
        """
service: {name: web, app: "127.0.0.1:1"}
admin: {bind: "127.0.0.1:0"}
upstreams: [{service: api, bind: "127.0.0.1:0", tls: "off"}]
discovery: {static: {api: ["127.0.0.1:1"]}}
shutdown: {drain_timeout: 2s}
""",
        name="sidecar.yaml",
        base_dir=tmp_path,
    )
    sidecar = Sidecar(config)
    ended = trio.Event()

    async def serve(task_status: trio.TaskStatus[dict[str, Any]]) -> None:
        await sidecar.serve(task_status=task_status)
        ended.set()

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve)
        admin, upstream = bound["admin"], bound["upstreams[0]:api"]
        assert not await _refused(upstream.host, upstream.port)
        status, body = await _exchange(admin.host, admin.port, post("/drain"))
        assert (status, json.loads(body)) == (202, {"result": "draining", "already": False})
        await _wait_for(lambda: _refused(upstream.host, upstream.port))
        await trio.sleep(0.5)  # the listener has long finished draining (nothing was in flight)
        assert not ended.is_set() and not sidecar.stopping
        assert await _exchange(admin.host, admin.port, b"GET /ready HTTP/1.1\r\nHost: a\r\n\r\n") == (
            503,
            b"draining\n",
        )
        status, body = await _exchange(admin.host, admin.port, post("/shutdown"))
        assert (status, json.loads(body)) == (202, {"result": "shutting down", "already": False})
        with trio.fail_after(5):
            await ended.wait()
    assert sidecar.stopping
