#!/usr/bin/env python3
"""Test backend for tests/ha/failover.sh (runs in the test's backends namespace).

Usage: backend.py NAME ADDRESS PORT
Answers every GET on ADDRESS:PORT with "NAME\n" (HTTP/1.1, keep-alive). Unlike
tests/system/http_backend.py it binds the given address: the balancers reach it over the
test's bridge, not over loopback.
"""
import http.server
import sys

NAME, ADDRESS, PORT = sys.argv[1], sys.argv[2], int(sys.argv[3])
BODY = (NAME + "\n").encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):  # noqa: N802 - http.server's naming
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


server = Server((ADDRESS, PORT), Handler)
server.serve_forever()
