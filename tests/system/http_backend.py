#!/usr/bin/env python3
"""Test backend for tests/system/deb-in-systemd.sh (inside the container) and
tests/ha/failover.sh (in the test's backends namespace).

Usage: http_backend.py NAME PORT [ADDRESS]
Answers every GET on ADDRESS:PORT (default 127.0.0.1) with "NAME\n" (HTTP/1.1, keep-alive);
GET /slow answers after 2 seconds, so that requests are in flight while the load balancer
hands over.
"""
import http.server
import sys
import time

NAME, PORT = sys.argv[1], int(sys.argv[2])
ADDRESS = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
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


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a balancer closing a pooled connection is not news


Server((ADDRESS, PORT), Handler).serve_forever()
