#!/usr/bin/env python3
"""Test backend for tests/system/deb-in-systemd.sh (runs inside the container).

Usage: http_backend.py NAME PORT
Answers every GET on 127.0.0.1:PORT with "NAME\n" (HTTP/1.1, keep-alive); GET /slow answers
after 2 seconds, so that requests are in flight while the load balancer hands over.
"""
import http.server
import sys
import time

NAME, PORT = sys.argv[1], int(sys.argv[2])
BODY = (NAME + "\n").encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm and
    # the peer's delayed ACK add 40 ms to every response on a kept-alive connection.
    disable_nagle_algorithm = True

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.startswith("/slow"):
            time.sleep(2)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
server.daemon_threads = True
server.serve_forever()
