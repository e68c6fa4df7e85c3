"""A real backend process for integration tests: an h11 HTTP/1.1 app, a WebSocket echo and a TCP line echo.

Run as `python backend.py [--name NAME] [--delay S]`; prints one JSON line with its ports, then serves until killed.
HTTP routes (all count towards GET /__stats, which itself is not counted):
  /echo            body echoed back (streamed; chunked if the request was)
  /headers         the request head as JSON
  /bytes?n=N       N bytes streamed in 64 KiB pieces (Content-Length); with &key=K the progress is kept in
                   stats["streamed"][K]: bytes handed to the socket so far and state streaming/complete/aborted
  /consume         reads the body, answers its length and sha256
  /slow?s=S        waits S seconds, then answers "slow done"
  /trailers        chunked response with a trailer `x-checksum`
  /status?code=C   answers status C
  /truncate        promises 100000 bytes, sends 10, closes
  /close           answers, then closes the connection
  /stall           promises 10 bytes, sends 5, then sends nothing more (keeps the connection open)
  /hold?key=K      waits until /release?key=K (stats["held"][K]: arrived, stats["holding"][K]: waiting now)
  /count?id=I&s=S  reads the body, records I in stats["counted"], waits S seconds (default 0), answers "counted I"
  /release?key=K   lets every /hold of K answer "released", now and later
  /whoami[/...]?tag=T  counts T in stats["whoami"] (stats["whoami_active"]: waiting now), waits --delay seconds,
                   answers the backend's --name as the body and in `x-backend` (to tell endpoints apart)
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import threading
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from websockets.sync.server import serve as ws_serve

STATS = {"requests": 0, "connections": 0, "paths": [], "streamed": {}, "held": {}, "holding": {}, "counted": []}
STATS.update(whoami={}, whoami_active=0)
IDENTITY = {"name": "", "delay": 0.0}  # from the command line: what /whoami answers, and after how long
RELEASES: dict[str, trio.Event] = {}


async def _send(stream: trio.SocketStream, conn: h11.Connection, event: object) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> object:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                await _send(stream, conn, h11.InformationalResponse(status_code=100, headers=[]))
            conn.receive_data(await stream.receive_some(65536))
            continue
        return event


async def _respond(stream, conn, status, body=b"", headers=()):
    hs = [*headers] if status in (204, 304) else [("content-length", str(len(body))), *headers]
    await _send(stream, conn, h11.Response(status_code=status, headers=hs))
    if body and status not in (204, 304):
        await _send(stream, conn, h11.Data(data=body))
    await _send(stream, conn, h11.EndOfMessage())


async def handle_http(stream: trio.SocketStream) -> None:
    STATS["connections"] += 1
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = await _next_event(stream, conn)
            if isinstance(event, (h11.ConnectionClosed, h11.PAUSED)) or event is h11.PAUSED:
                return
            assert isinstance(event, h11.Request), event
            if not await route(stream, conn, event):
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def route(stream, conn, req: h11.Request) -> bool:
    url = urlsplit(req.target.decode())
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    path = url.path
    if path == "/__stats":
        await _drain_body(stream, conn)
        await _respond(stream, conn, 200, json.dumps(STATS).encode(), [("content-type", "application/json")])
        return True
    STATS["requests"] += 1
    STATS["paths"].append(path)
    if path == "/echo":
        chunked = any(k == b"transfer-encoding" for k, _ in req.headers)
        length = dict(req.headers).get(b"content-length")
        headers = [("transfer-encoding", "chunked")] if chunked or length is None else [("content-length", length)]
        await _send(stream, conn, h11.Response(status_code=200, headers=headers))
        trailers = []
        while True:
            event = await _next_event(stream, conn)
            if isinstance(event, h11.Data):
                await _send(stream, conn, h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                trailers = list(event.headers)
                break
        await _send(stream, conn, h11.EndOfMessage(headers=trailers if chunked else []))
        return True
    if path == "/headers":
        await _drain_body(stream, conn)
        head = {
            "method": req.method.decode(),
            "target": req.target.decode(),
            "headers": [[k.decode(), v.decode()] for k, v in req.headers],
        }
        await _respond(stream, conn, 200, json.dumps(head).encode(), [("content-type", "application/json")])
        return True
    if path == "/bytes":
        await _drain_body(stream, conn)
        n = int(query.get("n", "0"))
        progress = {"sent": 0, "state": "streaming"}
        if "key" in query:
            STATS["streamed"][query["key"]] = progress
        await _send(stream, conn, h11.Response(status_code=200, headers=[("content-length", str(n))]))
        piece = b"x" * 65536
        try:
            while n > 0 and req.method != b"HEAD":
                await _send(stream, conn, h11.Data(data=piece[: min(n, 65536)]))
                progress["sent"] += min(n, 65536)
                n -= 65536
            await _send(stream, conn, h11.EndOfMessage())
        except BaseException:
            progress["state"] = "aborted"
            raise
        progress["state"] = "complete"
        return True
    if path == "/consume":
        digest = hashlib.sha256()
        size = 0
        while True:
            event = await _next_event(stream, conn)
            if isinstance(event, h11.Data):
                digest.update(event.data)
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        body = json.dumps({"size": size, "sha256": digest.hexdigest()}).encode()
        await _respond(stream, conn, 200, body, [("content-type", "application/json")])
        return True
    if path == "/slow":
        await _drain_body(stream, conn)
        await trio.sleep(float(query.get("s", "1")))
        await _respond(stream, conn, 200, b"slow done")
        return True
    if path == "/stall":
        await _drain_body(stream, conn)
        await _send(stream, conn, h11.Response(status_code=200, headers=[("content-length", "10")]))
        await _send(stream, conn, h11.Data(data=b"12345"))
        await trio.sleep_forever()
    if path == "/hold":
        await _drain_body(stream, conn)
        key = query.get("key", "")
        STATS["held"][key] = STATS["held"].get(key, 0) + 1
        STATS["holding"][key] = STATS["holding"].get(key, 0) + 1
        try:
            await RELEASES.setdefault(key, trio.Event()).wait()
        finally:
            STATS["holding"][key] -= 1
        await _respond(stream, conn, 200, b"released")
        return True
    if path == "/count":
        await _drain_body(stream, conn)
        STATS["counted"].append(query.get("id", ""))
        if float(query.get("s", "0")):
            await trio.sleep(float(query["s"]))
        await _respond(stream, conn, 200, b"counted " + query.get("id", "").encode())
        return True
    if path == "/whoami" or path.startswith("/whoami/"):
        await _drain_body(stream, conn)
        tag = query.get("tag", "")
        STATS["whoami"][tag] = STATS["whoami"].get(tag, 0) + 1
        STATS["whoami_active"] += 1
        try:
            if IDENTITY["delay"]:
                await trio.sleep(IDENTITY["delay"])
        finally:
            STATS["whoami_active"] -= 1
        name = IDENTITY["name"]
        await _respond(stream, conn, 200, name.encode(), [("x-backend", name)])
        return True
    if path == "/release":
        await _drain_body(stream, conn)
        RELEASES.setdefault(query.get("key", ""), trio.Event()).set()
        await _respond(stream, conn, 200, b"released")
        return True
    if path == "/trailers":
        await _drain_body(stream, conn)
        await _send(
            stream,
            conn,
            h11.Response(status_code=200, headers=[("transfer-encoding", "chunked"), ("trailer", "x-checksum")]),
        )
        await _send(stream, conn, h11.Data(data=b"hello "))
        await _send(stream, conn, h11.Data(data=b"world"))
        await _send(stream, conn, h11.EndOfMessage(headers=[("x-checksum", "abc123")]))
        return True
    if path == "/status":
        await _drain_body(stream, conn)
        await _respond(stream, conn, int(query.get("code", "200")), b"status")
        return True
    if path == "/truncate":
        await _drain_body(stream, conn)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n0123456789")
        return False
    if path == "/close":
        await _drain_body(stream, conn)
        await _respond(stream, conn, 200, b"bye", [("connection", "close")])
        return False
    await _drain_body(stream, conn)
    await _respond(stream, conn, 404, b"no such route")
    return True


async def _drain_body(stream, conn) -> None:
    while True:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.EndOfMessage):
            return


async def handle_line_echo(stream: trio.SocketStream) -> None:
    """Echo bytes; after the client half-closes, send 'bye\\n' and close (so half-close is observable)."""
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                break
            await stream.send_all(data)
        await stream.send_all(b"bye\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def _ws_echo(ws) -> None:
    for message in ws:
        ws.send(message)


async def main() -> None:
    ws_server = ws_serve(_ws_echo, "127.0.0.1", 0)
    threading.Thread(target=ws_server.serve_forever, daemon=True).start()
    ws_port = ws_server.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        http = await nursery.start(functools.partial(trio.serve_tcp, handle_http, 0, host="127.0.0.1"))
        tcp = await nursery.start(functools.partial(trio.serve_tcp, handle_line_echo, 0, host="127.0.0.1"))
        ports = {
            "http": http[0].socket.getsockname()[1],
            "tcp": tcp[0].socket.getsockname()[1],
            "ws": ws_port,
        }
        print(json.dumps(ports), flush=True)
        sys.stdout.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="backend")
    parser.add_argument("--name", default="", help="what /whoami answers")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds /whoami waits before answering")
    args = parser.parse_args()
    IDENTITY.update(name=args.name, delay=args.delay)
    trio.run(main)
