"""Open-loop (fixed-rate) HTTP/1.1 load generator for the resilience scenario.

    python loadgen.py --target 127.0.0.1:29010 --rate 200 --duration 30 [--connections 128] [--timeout 5]
                      [--label NAME] [--backend-stats 127.0.0.1:29001,...] [--json-out FILE]

Request i is *scheduled* at start + i/rate, whatever happened to earlier requests (open loop: a slow
proxy does not slow the sender down). Its latency is measured from that scheduled time, so time spent
waiting for a free connection or behind a late event loop is counted (no coordinated omission).
Requests are `GET /` over a keep-alive pool of at most --connections connections (in-flight requests
never exceed that). A request that has no complete response --timeout seconds after its scheduled
time is a failure (`timeout`); its connection is closed. Success = a 2xx response.

Latency percentiles are over all sent requests (a failed request counts with the time its answer
took, a timeout with the time until it was given up). The JSON output also has the ok-only
percentiles, the status counts, the x-backend header of the final answers, the client's own CPU use
and how late it sent (schedule_lag_ms; if that grows past a few ms the client, not the proxy, is the limit).
--backend-stats reads each backend's `GET /__stats` before and after the run to count the requests
each backend really received (retries included)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import sys
import time


def split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Response:
    __slots__ = ("headers", "keep_alive", "status")

    def __init__(self, status: int, headers: dict[str, str], keep_alive: bool) -> None:
        self.status = status
        self.headers = headers
        self.keep_alive = keep_alive


async def read_response(reader: asyncio.StreamReader) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection and version == "HTTP/1.1"
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:  # (no trailers expected; the final CRLF was read above)
                break
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    else:
        await reader.read()  # body delimited by EOF
        keep_alive = False
    return Response(int(status), headers, keep_alive)


class Pool:
    """At most `size` requests in flight; idle keep-alive connections are reused, last in first out."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port = host, port
        self.slots = asyncio.Semaphore(size)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        self.opened += 1
        return await asyncio.open_connection(self.host, self.port, limit=1 << 20)


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        host, port = split_hostport(args.target)
        self.pool = Pool(host, port, args.connections)
        self.request = (
            f"GET {args.path} HTTP/1.1\r\nHost: {args.host_header}\r\nUser-Agent: resilience-loadgen\r\n\r\n".encode()
        )
        self.results: list[tuple[str, float]] = []  # (outcome, latency s); outcome = status code or error kind
        self.backend_answers: collections.Counter[str] = collections.Counter()
        self.lags: list[float] = []

    async def one(self, scheduled: float) -> None:
        loop = asyncio.get_running_loop()
        outcome = "error"
        conn = None
        reusable = False
        try:
            async with asyncio.timeout_at(scheduled + self.args.timeout):
                async with self.pool.slots:
                    try:
                        conn = await self.pool.connect()
                    except OSError:
                        outcome = "connect_error"
                        raise
                    reader, writer = conn
                    writer.write(self.request)
                    response = await read_response(reader)
                    outcome = str(response.status)
                    self.backend_answers[response.headers.get("x-backend", "-")] += 1
                    reusable = response.keep_alive
                    if reusable:
                        self.pool.idle.append(conn)
        except TimeoutError:
            outcome = "timeout"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            if outcome not in ("connect_error",):
                outcome = "conn_error"
        finally:
            if conn is not None and not reusable:
                conn[1].close()
        self.results.append((outcome, loop.time() - scheduled))

    async def run(self) -> dict:
        loop = asyncio.get_running_loop()
        total = round(self.args.rate * self.args.duration)
        interval = 1.0 / self.args.rate
        tasks = set()
        before = await self.backend_stats()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        wall0 = time.monotonic()
        start = loop.time() + 0.05
        for i in range(total):
            scheduled = start + i * interval
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.lags.append(loop.time() - scheduled)
            task = asyncio.create_task(self.one(scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        send_end = loop.time()
        while tasks:
            await asyncio.wait(set(tasks))
        wall = time.monotonic() - wall0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        for _reader, writer in self.pool.idle:
            writer.close()
        after = await self.backend_stats()
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        return self.summary(total, send_end - start, wall, cpu, before, after)

    async def backend_stats(self) -> dict[str, dict]:
        stats: dict[str, dict] = {}
        for target in filter(None, (self.args.backend_stats or "").split(",")):
            host, port = split_hostport(target)
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
                writer.write(f"GET /__stats HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                _head, _, body = (await asyncio.wait_for(reader.read(), 2)).partition(b"\r\n\r\n")
                writer.close()
                data = json.loads(body)
                stats[data.get("name", target)] = data
            except (OSError, TimeoutError, ValueError) as exc:
                stats[target] = {"error": repr(exc)}
        return stats

    def summary(self, total: int, send_time: float, wall: float, cpu: float, before: dict, after: dict) -> dict:
        outcomes = collections.Counter(o for o, _ in self.results)
        ok = sum(n for o, n in outcomes.items() if o.isdigit() and 200 <= int(o) < 300)
        all_lat = sorted(lat for _, lat in self.results)
        ok_lat = sorted(lat for o, lat in self.results if o.isdigit() and 200 <= int(o) < 300)
        backends = {}
        for name, data in after.items():
            if "requests" in data and "requests" in before.get(name, {}):
                backends[name] = {k: data[k] - before[name][k] for k in ("requests", "ok", "failed")}
        return {
            "label": self.args.label,
            "target": self.args.target,
            "rate": self.args.rate,
            "duration": self.args.duration,
            "timeout_s": self.args.timeout,
            "connections_max": self.args.connections,
            "sent": total,
            "ok": ok,
            "success_pct": round(100.0 * ok / total, 3) if total else 0.0,
            "outcomes": dict(sorted(outcomes.items())),
            "latency_ms": percentiles(all_lat),
            "ok_latency_ms": percentiles(ok_lat),
            "final_answer_by_backend": dict(sorted(self.backend_answers.items())),
            "backend_received": backends,
            "client": {
                "cpu_s": round(cpu, 3),
                "cpu_pct": round(100.0 * cpu / wall, 1) if wall else 0.0,
                "wall_s": round(wall, 3),
                "send_window_s": round(send_time, 3),
                "achieved_send_rate": round((total - 1) / send_time, 1) if send_time > 0 else None,
                "schedule_lag_ms": percentiles(sorted(self.lags)),
                "connections_opened": self.pool.opened,
            },
        }


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}

    def rank(q: float) -> float:  # nearest rank
        index = min(len(values) - 1, max(0, int(-(-q * len(values) // 1)) - 1))
        return round(values[index] * 1000, 2)

    return {
        "n": len(values),
        "p50": rank(0.5),
        "p90": rank(0.9),
        "p99": rank(0.99),
        "p999": rank(0.999),
        "max": round(values[-1] * 1000, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="host:port of the proxy listener")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of sending (default 30)")
    parser.add_argument("--connections", type=int, default=128, help="most connections / requests in flight")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout from its scheduled time")
    parser.add_argument("--path", default="/")
    parser.add_argument("--host-header", default="api")
    parser.add_argument("--label", default="run")
    parser.add_argument("--backend-stats", default="", help="comma-separated host:port of backends with /__stats")
    parser.add_argument("--json-out", help="write the summary here (else stdout)")
    args = parser.parse_args()
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    summary = asyncio.run(Run(args).run())
    text = json.dumps(summary, indent=2)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    lat, lag = summary["latency_ms"], summary["client"]["schedule_lag_ms"]
    print(
        f"{args.label}: sent {summary['sent']} ok {summary['ok']} ({summary['success_pct']:.2f} %) "
        f"p50 {lat.get('p50')} p99 {lat.get('p99')} max {lat.get('max')} ms; outcomes {summary['outcomes']}; "
        f"client CPU {summary['client']['cpu_pct']} %, send lag p99 {lag.get('p99')} max {lag.get('max')} ms",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
