#!/usr/bin/env python3
"""Client load and its analysis for tests/ha/failover.sh.

  client.py run --host VIP --port 80 --out FILE --stop-file FILE [--interval 0.05]
                [--timeout 1] [--duration 120] [--max-requests 4000]
      Until the stop file appears, --duration seconds have passed or --max-requests requests
      were made (whichever comes first), two kinds of clients request "/":
        fresh      a new connection per request, one started every --interval seconds
                   whatever the previous ones are doing (so a stalled request does not
                   hide when service came back);
        keepalive  one HTTP/1.1 connection reused while the server keeps it open,
                   a request every --interval seconds; after an error it reconnects.
      Every request gets --timeout seconds. Each one is a line in FILE, written as it ends:
        KIND <tab> START <tab> END <tab> OK <tab> SERVED_BY <tab> DETAIL
      (epoch seconds; OK is 1 for status 200 with a backend's body; SERVED_BY is the
      X-Served-By response header or "-"; DETAIL the backend's name or the error).

  client.py first --out FILE --after T --node NAME
      Prints the END of the first successful fresh request answered by NAME that ended
      at or after T; exits 1 if there is none yet.

  client.py phase --out FILE --start T0 --end T1 --node NAME --label LABEL
      Prints one tab-separated line for the requests that ended between T0 and T1:
      LABEL, seconds from T0 to the first fresh answer from NAME, fresh requests,
      fresh failures, longest time between two successful fresh answers (counting from
      the last success before T0), keep-alive requests, keep-alive failures, answers by
      another node than NAME after the first from NAME, and the failures by kind of error.
"""
import argparse
import collections
import http.client
import os
import sys
import threading
import time


def run(args):
    t0 = time.monotonic()
    deadline = t0 + args.duration
    lock = threading.Lock()
    out = open(args.out, "a", buffering=1)
    count = [0]
    stop = threading.Event()

    def should_stop():
        return stop.is_set() or time.monotonic() >= deadline or os.path.exists(args.stop_file)

    def take_ticket():
        with lock:
            if count[0] >= args.max_requests:
                return False
            count[0] += 1
            return True

    def record(kind, start, ok, served_by, detail):
        end = time.time()
        detail = " ".join(str(detail).split())[:120]
        with lock:
            out.write("%s\t%.3f\t%.3f\t%d\t%s\t%s\n" % (kind, start, end, ok, served_by or "-", detail))

    def check(resp, body):
        if resp.status != 200:
            return "status %d" % resp.status
        if not body.startswith(b"backend-"):
            return "unexpected body %r" % body[:40]
        return None

    def fresh_request():
        start = time.time()
        conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read()
            err = check(resp, body)
            served_by = resp.getheader("X-Served-By")
            if err:
                record("fresh", start, 0, served_by, err)
            else:
                record("fresh", start, 1, served_by, body.decode("ascii", "replace").strip())
        except Exception as e:  # noqa: BLE001 - every error is a failed request
            record("fresh", start, 0, None, "%s: %s" % (type(e).__name__, e))
        finally:
            conn.close()

    def fresh_scheduler():
        workers = []
        next_at = time.monotonic()
        while not should_stop() and take_ticket():
            t = threading.Thread(target=fresh_request, daemon=True)
            t.start()
            workers.append(t)
            workers = [w for w in workers if w.is_alive()]
            next_at += args.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        for w in workers:
            w.join(args.timeout + 2)

    def keepalive_client():
        conn = None
        while not should_stop() and take_ticket():
            start = time.time()
            began = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read()
                err = check(resp, body)
                served_by = resp.getheader("X-Served-By")
                if err:
                    record("keepalive", start, 0, served_by, err)
                else:
                    record("keepalive", start, 1, served_by, body.decode("ascii", "replace").strip())
                if resp.will_close:
                    conn.close()
                    conn = None
            except Exception as e:  # noqa: BLE001
                record("keepalive", start, 0, None, "%s: %s" % (type(e).__name__, e))
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(max(0.0, args.interval - (time.monotonic() - began)))
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=fresh_scheduler), threading.Thread(target=keepalive_client)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    out.close()
    return 0


def read(path):
    rows = []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 6:
                continue  # a line still being written
            kind, start, end, ok, served_by, detail = parts
            rows.append((kind, float(start), float(end), ok == "1", served_by, detail))
    rows.sort(key=lambda r: r[2])
    return rows


def first(args):
    for kind, _start, end, ok, served_by, _detail in read(args.out):
        if kind == "fresh" and ok and served_by == args.node and end >= args.after:
            print("%.3f" % end)
            return 0
    return 1


def error_kind(detail):
    return detail.split(":", 1)[0]


def phase(args):
    rows = read(args.out)
    inside = [r for r in rows if args.start <= r[2] <= args.end]
    fresh = [r for r in inside if r[0] == "fresh"]
    keepalive = [r for r in inside if r[0] == "keepalive"]
    switched = next((r[2] for r in fresh if r[3] and r[4] == args.node), None)
    # Successful fresh answers, with the last one before the phase, for the longest gap.
    before = [r[2] for r in rows if r[0] == "fresh" and r[3] and r[2] < args.start][-1:]
    ok_times = before + [r[2] for r in fresh if r[3]]
    gaps = [b - a for a, b in zip(ok_times, ok_times[1:])]
    if ok_times:
        gaps.append(args.end - ok_times[-1])  # a phase that ended without service
    other = sum(1 for r in inside if r[3] and switched is not None and r[2] > switched and r[4] != args.node)
    errors = collections.Counter("%s %s" % (r[0], error_kind(r[5])) for r in inside if not r[3])
    print("\t".join([
        args.label,
        "%.2f" % (switched - args.start) if switched is not None else "none",
        str(len(fresh)),
        str(sum(1 for r in fresh if not r[3])),
        "%.2f" % max(gaps) if gaps else "none",
        str(len(keepalive)),
        str(sum(1 for r in keepalive if not r[3])),
        str(other),
        ", ".join("%s x%d" % kv for kv in sorted(errors.items())) or "-",
    ]))
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--host", required=True)
    r.add_argument("--port", type=int, default=80)
    r.add_argument("--out", required=True)
    r.add_argument("--stop-file", required=True)
    r.add_argument("--interval", type=float, default=0.05)
    r.add_argument("--timeout", type=float, default=1.0)
    r.add_argument("--duration", type=float, default=120.0)
    r.add_argument("--max-requests", type=int, default=4000)
    f = sub.add_parser("first")
    f.add_argument("--out", required=True)
    f.add_argument("--after", type=float, required=True)
    f.add_argument("--node", required=True)
    p = sub.add_parser("phase")
    p.add_argument("--out", required=True)
    p.add_argument("--start", type=float, required=True)
    p.add_argument("--end", type=float, required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--label", required=True)
    args = ap.parse_args()
    return {"run": run, "first": first, "phase": phase}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
