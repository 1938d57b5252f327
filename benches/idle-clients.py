#!/usr/bin/env python3
"""Idle keep-alive clients for benches/idle-memory.sh (standard library only).

    idle-clients.py --port P --connections N [--concurrency C] [--open-timeout S] [--hold S]

Opens N connections to 127.0.0.1:P, at most C at a time. On each one it sends one GET
request, reads the whole response (status 200, Content-Length or chunked body, no
`Connection: close`), and then leaves the connection open and idle: nothing more is sent,
and a pending read notices if the server closes it.

Lines on stdout (flushed; `key=value` fields):
  ready open=N failed=F seconds=T     every connection has had its response
  status open=N closed=K unexpected=U  on SIGUSR1: still open / closed by the server /
                                       sent unsolicited bytes
  error ...                            opening them all took longer than --open-timeout
Exits on SIGTERM or SIGINT (closing every connection), or --hold seconds after "ready"
(0: at once). Exit status 0, or 1 if a connection failed before its response was complete
or opening them took too long.
"""

import argparse
import asyncio
import signal
import sys
import time

REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: idle-clients\r\n\r\n"


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def read_response(reader):
    """Reads one whole HTTP/1.1 response; returns (status, headers dict)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip().lower()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, headers


class Clients:
    def __init__(self, port):
        self.port = port
        self.conns = []
        self.failed = 0
        self.first_error = None
        self.closed = 0
        self.unexpected = 0
        self.watchers = []

    async def open_one(self, sem):
        async with sem:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(REQUEST)
                await writer.drain()
                status, headers = await read_response(reader)
                if status != 200:
                    raise RuntimeError(f"status {status}")
                if "close" in headers.get("connection", ""):
                    raise RuntimeError("the server answered Connection: close")
                self.conns.append((reader, writer))
            except Exception as e:  # noqa: BLE001 - counted and reported
                self.failed += 1
                if self.first_error is None:
                    self.first_error = f"{type(e).__name__}: {e}"

    async def watch(self, reader):
        try:
            data = await reader.read(1)
        except Exception:  # noqa: BLE001 - a reset counts as closed
            data = b""
        if data:
            self.unexpected += 1
        else:
            self.closed += 1

    def close_all(self):
        for task in self.watchers:
            task.cancel()
        for _, writer in self.conns:
            writer.transport.abort()


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--open-timeout", type=float, default=60)
    ap.add_argument("--hold", type=float, default=300)
    args = ap.parse_args()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    clients = Clients(args.port)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(
        signal.SIGUSR1,
        lambda: say(
            f"status open={len(clients.conns) - clients.closed - clients.unexpected} "
            f"closed={clients.closed} unexpected={clients.unexpected}"
        ),
    )

    t0 = time.monotonic()
    sem = asyncio.Semaphore(args.concurrency)
    opening = asyncio.gather(*(clients.open_one(sem) for _ in range(args.connections)))
    try:
        await asyncio.wait_for(opening, timeout=args.open_timeout)
    except asyncio.TimeoutError:
        say(f"error opening took longer than {args.open_timeout} s ({len(clients.conns)} open)")
        clients.close_all()
        return 1
    clients.watchers = [loop.create_task(clients.watch(r)) for r, _ in clients.conns]
    say(f"ready open={len(clients.conns)} failed={clients.failed} seconds={time.monotonic() - t0:.2f}")
    if clients.first_error:
        print(f"idle-clients.py: first failure: {clients.first_error}", file=sys.stderr)
    if args.hold > 0:
        try:
            await asyncio.wait_for(stop.wait(), timeout=args.hold)
        except asyncio.TimeoutError:
            pass
    clients.close_all()
    return 1 if clients.failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
