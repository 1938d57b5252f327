#!/usr/bin/env python3
"""Sums a flat perf profile of pingora-lb into the components the README's table names.

    perf record -F 4999 -e cpu-clock -p "$(pgrep -f 'pingora-lb -c')" -- sleep 5
    perf report --no-children --sort dso,sym --stdio | benches/profile-components.py [CPU_US_PER_REQ]

With the balancer's CPU time per request (from benches/run.sh) as argument, it prints each
component in microseconds per request as well as in percent of the samples.
"""
import re
import sys

# (component, test on "dso symbol"), first match wins.
COMPONENTS = [
    ("kernel (TCP loopback, wakeups, epoll)", lambda d, s: d.startswith("[kernel")),
    ("clock reads (vdso: timers, timeouts)", lambda d, s: d == "[vdso]"),
    ("allocation (mimalloc)", lambda d, s: "mi_" in s or "mimalloc" in s or "malloc" in s or "free" == s),
    ("pingora-lb fast path (parse, forward)", lambda d, s: "fast_path" in s or "header_edits" in s),
    ("httparse", lambda d, s: "httparse" in s),
    ("pingora-proxy state machine + hooks", lambda d, s: "pingora_proxy" in s),
    ("pingora h1 session logic", lambda d, s: "protocols::http" in s),
    ("pingora pool", lambda d, s: "pingora_pool" in s),
    ("pingora l4 Stream, digests, timeouts", lambda d, s: "pingora_core" in s or "pingora_timeout" in s),
    ("header maps, serialization (http, bytes)", lambda d, s: re.search(r"\bhttp::|bytes::|HeaderMap|pingora_http", s)),
    ("tokio scheduling, channels, timers", lambda d, s: "tokio" in s),
    ("pingora-lb's other code, async glue", lambda d, s: "pingora_lb" in s or "Future>::poll" in s),
    ("libc (memcpy, syscalls)", lambda d, s: "libc" in d),
    ("other", lambda d, s: True),
]

LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[[.kK]\]\s+(.*)$")


def main():
    per_request = float(sys.argv[1]) if len(sys.argv) > 1 else None
    totals = {name: 0.0 for name, _ in COMPONENTS}
    for line in sys.stdin:
        match = LINE.match(line)
        if not match:
            continue
        percent, dso, symbol = float(match[1]), match[2], match[3]
        for name, test in COMPONENTS:
            if test(dso, symbol):
                totals[name] += percent
                break
    header = "| component | share |" + (" µs/request |" if per_request else "")
    print(header)
    print("|---|---:|" + ("---:|" if per_request else ""))
    for name, _ in COMPONENTS:
        share = totals[name]
        if share < 0.05:
            continue
        row = f"| {name} | {share:.1f}% |"
        if per_request:
            row += f" {per_request * share / 100:.1f} |"
        print(row)


if __name__ == "__main__":
    main()
