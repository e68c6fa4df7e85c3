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


class Drain:
    """Process-wide shutdown state shared by listeners and connection handlers.

    `start()` stops every listener from accepting, makes in-flight responses carry `Connection: close`,
    and closes idle keep-alive connections. A handler registers itself with `idle()` while it waits for
    the next request; `expire()` is then called on it when the drain begins."""

    def __init__(self) -> None:
        self.draining = False
        self.started = trio.Event()
        self._idle: set[Expiring] = set()

    def __repr__(self) -> str:
        return f"<Drain draining={self.draining} idle={len(self._idle)}>"

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


Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def serve_tcp(
    bind: Address,
    handler: Handler,
    *,
    name: str,
    drain: Drain,
    max_connections: int,
    drain_timeout: float,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections on `bind` and run `handler(stream)` for each, at most `max_connections` at once.

    Reports the bound address (useful with port 0) through `task_status`. When `drain.start()` is called the
    listening socket is closed (new connections are refused), then handlers get `drain_timeout` seconds to
    finish before they are cancelled; the function then returns. The handler owns and closes its stream;
    any exception it lets escape is logged and does not affect other connections."""
    try:
        listeners = await trio.open_tcp_listeners(bind.port, host=bind.host or None, backlog=4096)
    except OSError as exc:
        raise OSError(exc.errno, f"{name}: cannot listen on {bind}: {exc.strerror or exc}") from None
    sockname = listeners[0].socket.getsockname()
    bound = Address(sockname[0], sockname[1])
    limit = trio.Semaphore(max_connections)

    async def run_handler(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except Exception:
            log.exception("connection handler failed", listener=name)
        finally:
            limit.release()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

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
            handlers.cancel_scope.deadline = trio.current_time() + drain_timeout
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
