"""A small HTTP/1.1 test backend for the resilience scenario: fixed service time, optional failures.

    python backend.py --port 29001 --delay-ms 5 --fail-percent 50 [--fail-status 503] [--fail-pattern random|alternate]
                      [--seed 1] [--name flaky]

Every request (any method, any path) waits --delay-ms, then answers 200 with a short body, or
--fail-status for --fail-percent of the requests. The failure pattern is `random` (a PRNG seeded with
--seed, so a run is repeatable given the same request order) or `alternate` (deterministic: with 50 %
every other request fails; in general request n fails when floor(n*p) > floor((n-1)*p)).
`GET /__stats` is not counted and answers a JSON object with the counters since start:
{"name", "requests", "failed", "ok"}. Keep-alive, any number of concurrent connections (asyncio + h11).
Request bodies are read and discarded."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal

import h11


class Backend:
    def __init__(self, args: argparse.Namespace) -> None:
        self.name = args.name
        self.delay = args.delay_ms / 1000
        self.fail_fraction = args.fail_percent / 100
        self.fail_status = args.fail_status
        self.pattern = args.fail_pattern
        self.rng = random.Random(args.seed)
        self.requests = 0
        self.failed = 0

    def decide_failure(self) -> bool:
        """Called once per counted request, in arrival order."""
        self.requests += 1
        if self.fail_fraction <= 0:
            return False
        if self.pattern == "alternate":
            n, p = self.requests, self.fail_fraction
            fail = int(n * p) > int((n - 1) * p)
        else:
            fail = self.rng.random() < self.fail_fraction
        if fail:
            self.failed += 1
        return fail

    def stats(self) -> bytes:
        return json.dumps(
            {"name": self.name, "requests": self.requests, "failed": self.failed, "ok": self.requests - self.failed}
        ).encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._next_event(conn, reader)
                if not isinstance(request, h11.Request):
                    return
                while True:  # drain the body
                    event = await self._next_event(conn, reader)
                    if isinstance(event, h11.EndOfMessage):
                        break
                    if not isinstance(event, h11.Data):
                        return
                if request.target == b"/__stats":
                    status, body = 200, self.stats()
                else:
                    fail = self.decide_failure()
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    status = self.fail_status if fail else 200
                    body = f"{self.name} {'fail' if fail else 'ok'}\n".encode()
                headers = [("content-type", "text/plain"), ("content-length", str(len(body))), ("x-backend", self.name)]
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                writer.write(conn.send(h11.Data(data=body)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    @staticmethod
    async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await reader.read(65536)
            conn.receive_data(data)  # b"" is EOF: the next event is ConnectionClosed (or a ProtocolError mid-request)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="service time of every request")
    parser.add_argument("--fail-percent", type=float, default=0.0, help="share of requests that fail")
    parser.add_argument("--fail-status", type=int, default=503, help="status of a failed request (default 503)")
    parser.add_argument("--fail-pattern", choices=["random", "alternate"], default="random")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random failure pattern")
    parser.add_argument("--name", default="backend")
    args = parser.parse_args()
    backend = Backend(args)
    server = await asyncio.start_server(backend.handle, args.host, args.port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
