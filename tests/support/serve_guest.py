#!/usr/bin/env python3
"""A guest's HTTP server for slipway serve's end-to-end tests (port 8000):
GET /slow?ms=N answers "slow-ok" after N ms; anything else "hello from <name>".
Prints "ready" once it listens."""
import http.server
import socketserver
import sys
import time
import urllib.parse

NAME = sys.argv[1] if len(sys.argv) > 1 else "guest"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        if url.path == "/slow":
            ms = int(urllib.parse.parse_qs(url.query).get("ms", ["1000"])[0])
            time.sleep(ms / 1000)
            body = b"slow-ok"
        else:
            body = f"hello from {NAME}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


srv = Server(("0.0.0.0", 8000), Handler)
print("ready", flush=True)
srv.serve_forever()
