#!/usr/bin/env python3
"""Bounded HTTP load for tests/system/deb-in-systemd.sh (runs inside the container).

Clients, each in its own thread, until the stop file appears or --duration
seconds have passed (whichever comes first):
  - --keepalive N clients reuse one HTTP/1.1 connection for as long as the server
    keeps it open (a response with "Connection: close" makes them reconnect, as
    any client would; a connection closed under them without notice is a failure);
  - --fresh N clients open a new connection for every request;
  - --slow N clients request --slow-path (the backend answers after 2 s) on a
    kept-alive connection, so that requests are in flight during a handoff: the
    process that gives up the sockets must still answer them;
  - --idle N clients wait --idle-pause seconds between requests on one
    connection, so that connections sit idle through a handoff. A server may
    close an idle keep-alive connection at any time (RFC 9112, 9.6), and clients
    retry an idempotent request that got no response at all on a reused
    connection (curl and browsers do): so does this one, once, on a new
    connection, counting it as "retried"; only a failed retry is a failure.
A request succeeds if it gets status 200 and a body starting with "backend-"
(each test backend serves its own name) within --timeout seconds.

With --unit, a monitor thread polls `systemctl show UNIT` every 0.25 s and
records every change of ActiveState/SubState/MainPID; a state other than
active/reloading is a failure.

Writes OUT.started once the first request succeeded, and the JSON summary to
OUT when done. Exit status 0 when nothing failed.
"""
import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/")
    ap.add_argument("--duration", type=float, required=True, help="hard upper bound, seconds")
    ap.add_argument("--stop-file", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--keepalive", type=int, default=2)
    ap.add_argument("--fresh", type=int, default=2)
    ap.add_argument("--slow", type=int, default=1)
    ap.add_argument("--slow-path", default="/slow")
    ap.add_argument("--idle", type=int, default=1)
    ap.add_argument("--idle-pause", type=float, default=1.5)
    ap.add_argument("--pause", type=float, default=0.01, help="seconds between requests per client")
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--unit", default=None)
    args = ap.parse_args()

    t0 = time.monotonic()
    deadline = t0 + args.duration
    lock = threading.Lock()
    stats = {"ok": 0, "failed": 0, "keepalive_ok": 0, "fresh_ok": 0, "slow_ok": 0, "idle_ok": 0,
             "idle_retried": 0, "backends": {}}
    failures = []
    states = []
    bad_states = []
    started_written = [False]
    stop = threading.Event()

    def should_stop():
        return stop.is_set() or time.monotonic() >= deadline

    def record_ok(kind, body):
        name = body.split(b"\n", 1)[0].decode("ascii", "replace").strip()
        with lock:
            stats["ok"] += 1
            stats[kind + "_ok"] += 1
            stats["backends"][name] = stats["backends"].get(name, 0) + 1
            if not started_written[0]:
                started_written[0] = True
                with open(args.out + ".started", "w") as f:
                    f.write("1\n")

    def record_fail(kind, err):
        with lock:
            stats["failed"] += 1
            if len(failures) < 50:
                failures.append({"t": round(time.monotonic() - t0, 3), "client": kind, "error": err})

    def check(resp, body):
        if resp.status != 200:
            return "status %d" % resp.status
        if not body.startswith(b"backend-"):
            return "unexpected body %r" % body[:60]
        return None

    # Errors meaning "the server closed this reused connection before answering".
    stale = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)

    def persistent_client(kind, path, pause, retry_stale):
        conn = None
        while not should_stop():
            reused = conn is not None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
                try:
                    conn.request("GET", path)
                    resp = conn.getresponse()
                except stale:
                    if not (retry_stale and reused):
                        raise
                    with lock:
                        stats["idle_retried"] += 1
                        stats.setdefault("idle_closes", {})
                        name = type(sys.exc_info()[1]).__name__
                        stats["idle_closes"][name] = stats["idle_closes"].get(name, 0) + 1
                    conn.close()
                    conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
                    conn.request("GET", path)
                    resp = conn.getresponse()
                body = resp.read()
                err = check(resp, body)
                if err:
                    record_fail(kind, err)
                else:
                    record_ok(kind, body)
                if resp.will_close:
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001 - every error is a failed request
                record_fail(kind, "%s: %s" % (type(e).__name__, e))
                if conn is not None:
                    conn.close()
                conn = None
            end = time.monotonic() + pause
            while not should_stop() and time.monotonic() < end:
                time.sleep(min(0.1, pause))
        if conn is not None:
            conn.close()

    def keepalive_client():
        persistent_client("keepalive", args.path, args.pause, False)

    def slow_client():
        persistent_client("slow", args.slow_path, args.pause, False)

    def idle_client():
        persistent_client("idle", args.path, args.idle_pause, True)

    def fresh_client():
        while not should_stop():
            conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
            try:
                conn.request("GET", args.path, headers={"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read()
                err = check(resp, body)
                if err:
                    record_fail("fresh", err)
                else:
                    record_ok("fresh", body)
            except Exception as e:  # noqa: BLE001
                record_fail("fresh", "%s: %s" % (type(e).__name__, e))
            finally:
                conn.close()
            time.sleep(args.pause)

    def monitor():
        last = None
        while not should_stop():
            try:
                out = subprocess.run(
                    ["systemctl", "show", "-p", "ActiveState", "-p", "SubState", "-p", "MainPID", args.unit],
                    capture_output=True, text=True, timeout=5,
                ).stdout
                props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
                cur = (props.get("ActiveState"), props.get("SubState"), props.get("MainPID"))
            except Exception as e:  # noqa: BLE001
                cur = ("error", str(e), None)
            if cur != last:
                entry = {"t": round(time.monotonic() - t0, 3), "active": cur[0], "sub": cur[1], "main_pid": cur[2]}
                with lock:
                    states.append(entry)
                    if cur[0] not in ("active", "reloading"):
                        bad_states.append(entry)
                last = cur
            time.sleep(0.25)

    threads = [threading.Thread(target=keepalive_client) for _ in range(args.keepalive)]
    threads += [threading.Thread(target=fresh_client) for _ in range(args.fresh)]
    threads += [threading.Thread(target=slow_client) for _ in range(args.slow)]
    threads += [threading.Thread(target=idle_client) for _ in range(args.idle)]
    if args.unit:
        threads.append(threading.Thread(target=monitor))
    for t in threads:
        t.start()
    stopped_by = "deadline"
    while time.monotonic() < deadline:
        if os.path.exists(args.stop_file):
            stopped_by = "stop-file"
            break
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=args.timeout + 10)

    summary = dict(stats)
    summary.update(
        seconds=round(time.monotonic() - t0, 2),
        stopped_by=stopped_by,
        failures=failures,
        main_pids=sorted({s["main_pid"] for s in states if s["main_pid"] not in (None, "0")}),
        bad_states=bad_states,
        states=states[:200],
    )
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.rename(tmp, args.out)
    return 0 if stats["failed"] == 0 and not bad_states else 1


if __name__ == "__main__":
    sys.exit(main())
