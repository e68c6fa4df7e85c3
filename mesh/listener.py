"""TCP listeners with separate accept and handler nurseries, a connection limit, and graceful drain."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

import structlog
import trio

from mesh.config import Address
from mesh.timers import Expiring

log = structlog.get_logger("mesh.listener")

# Accept errors that mean "out of resources right now": wait and retry rather than die (as trio does).
_SLEEP_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


# How long the exchanges cut at the drain deadline get to write their answers before their connections close.
CUT_GRACE = 1.0


class Drain:
    """Process-wide shutdown state shared by listeners and connection handlers.

    `start()` stops every listener from accepting, makes in-flight responses carry `Connection: close`,
    and closes idle keep-alive connections. A handler registers itself with `idle()` while it waits for
    the next request; `expire()` is then called on it when the drain begins. An exchange in flight registers
    with `active()`; when the drain deadline passes, `cut()` expires each one so that it answers its client
    (saying whether the request may have run) instead of vanishing with its connection."""

    def __init__(self) -> None:
        self.draining = False
        self.cutting = False
        self.started = trio.Event()
        self._idle: set[Expiring] = set()
        self._active: set[Expiring] = set()

    def __repr__(self) -> str:
        return f"<Drain draining={self.draining} idle={len(self._idle)} active={len(self._active)}>"

    def start(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.started.set()
        for item in list(self._idle):
            item.expire()
        self._idle.clear()

    def idle(self, item: Expiring) -> None:
        """Register an idle connection; it expires at once if the drain has begun."""
        if self.draining:
            item.expire()
        else:
            self._idle.add(item)

    def busy(self, item: Expiring) -> None:
        self._idle.discard(item)

    def active(self, item: Expiring) -> None:
        """Register an exchange in flight (until `finished`); once the drain deadline has passed it is cut at once."""
        if self.cutting:
            item.expire()
        else:
            self._active.add(item)

    def finished(self, item: Expiring) -> None:
        self._active.discard(item)

    def cut(self) -> None:
        """The drain deadline passed: expire every exchange still in flight (each answers with its reason)."""
        if self.cutting:
            return
        self.cutting = True
        for item in list(self._active):
            item.expire()
        self._active.clear()


Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def open_listeners(bind: Address, *, name: str) -> list[trio.SocketListener]:
    """Listen on `bind`; the caller owns the listeners (hand them to serve_tcp, which closes them).

    OSError "<name>: cannot listen on <bind>: <reason>" when the address cannot be bound."""
    try:
        return await trio.open_tcp_listeners(bind.port, host=bind.host or None, backlog=4096)
    except OSError as exc:
        raise OSError(exc.errno, f"{name}: cannot listen on {bind}: {exc.strerror or exc}") from None


async def serve_tcp(
    bind: Address | list[trio.SocketListener],
    handler: Handler,
    *,
    name: str,
    drain: Drain,
    max_connections: int,
    drain_timeout: float,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on `bind` and run `handler(stream)` for each, at most `max_connections` at once.

    `bind` is an address to listen on, or listeners from `open_listeners` (so that a process can bind all its
    addresses before it serves any), which serve_tcp then owns. Reports the bound address (useful with port 0)
    through `task_status`. When `drain.start()` is called the listening socket is closed (new connections are
    refused), then handlers get `drain_timeout` seconds to finish; at that deadline `drain.cut()` lets the
    exchanges still in flight answer (for CUT_GRACE seconds) before the handlers are cancelled; the function then
    returns. The handler owns and closes its stream; any exception it lets escape is logged and does not affect
    other connections."""
    listeners = bind if isinstance(bind, list) else await open_listeners(bind, name=name)
    sockname = listeners[0].socket.getsockname()
    bound = Address(sockname[0], sockname[1])
    limit = trio.Semaphore(max_connections)
    running = 0
    none_running = trio.Event()  # set when the last handler ends

    async def run_handler(stream: trio.SocketStream) -> None:
        nonlocal running, none_running
        running += 1
        if none_running.is_set():
            none_running = trio.Event()
        try:
            await handler(stream)
        except Exception:
            log.exception("connection handler failed", listener=name)
        finally:
            limit.release()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            running -= 1
            if not running:
                none_running.set()

    try:
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(_accept_loop, listener, handlers, run_handler, limit, name)
                task_status.started(bound)
                log.info("listening", listener=name, address=str(bound))
                await drain.started.wait()
                acceptors.cancel_scope.cancel()
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            log.info("draining", listener=name, timeout_s=drain_timeout)
            if running:
                with trio.move_on_after(drain_timeout):
                    await none_running.wait()
            if running:  # the drain deadline: what is still in flight answers with its reason, then goes
                log.warning("drain deadline passed; cutting what is in flight", listener=name, connections=running)
                drain.cut()
                with trio.move_on_after(CUT_GRACE):
                    await none_running.wait()
                handlers.cancel_scope.cancel()
    finally:  # also when cancelled without a drain: never leak the listening sockets
        for listener in listeners:
            listener.socket.close()


async def _accept_loop(
    listener: trio.SocketListener,
    handlers: trio.Nursery,
    run_handler: Handler,
    limit: trio.Semaphore,
    name: str,
) -> None:
    while True:
        await limit.acquire()
        try:
            stream = await listener.accept()
        except OSError as exc:
            limit.release()
            if exc.errno in _SLEEP_ERRNOS:
                log.error("accept failed; retrying in 100 ms", listener=name, error=exc.strerror)
                await trio.sleep(0.1)
                continue
            raise
        except BaseException:
            limit.release()
            raise
        handlers.start_soon(run_handler, stream)
