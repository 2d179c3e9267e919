#!/usr/bin/env python3
"""The "internet" of slipway's end-to-end tests, run inside a network namespace
the test made (TEST-NET addresses on a dummy link, no route out).

Serves, dual-stack on every address of the namespace:
  TCP 80   HTTP: GET /hello, GET /blob (the file given by --blob), GET /sse,
           PUT /upload (answers the SHA-256 of the body it streamed)
  TCP 7    echo
  UDP 7    echo
  UDP 53   DNS (on 192.0.2.53): NAME.test -> A 192.0.2.80 / AAAA 2001:db8::80 (world.test -> .1),
           anything else NXDOMAIN
Prints "ready" once every socket is bound. Standard library only.
"""
import argparse
import hashlib
import http.server
import socket
import socketserver
import struct
import sys
import threading

from httpkit import echo_forever, read_body, send_file


class DualStack(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    blob = None

    def log_message(self, *args):
        pass

    def _reply(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/hello":
            peer = self.client_address[0]
            return self._reply(200, f"hello from world, you are {peer}\n".encode())
        if self.path == "/blob" and self.blob:
            return send_file(self, self.blob)
        self._reply(404, b"not found\n")

    def do_PUT(self):
        h, n = hashlib.sha256(), 0
        for piece in read_body(self):
            h.update(piece)
            n += len(piece)
        self._reply(200, f"{h.hexdigest()} {n}\n".encode())


def tcp_echo(port):
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", port))
    srv.listen(64)
    echo_forever(srv)


def udp_socket(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    return s


def udp_echo(port):
    s = udp_socket(port)

    def loop():
        while True:
            data, peer = s.recvfrom(65535)
            s.sendto(data, peer)

    threading.Thread(target=loop, daemon=True).start()


def dns_answer(query):
    if len(query) < 12:
        return None
    tid, flags, qd = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qd != 1:
        return None
    i, labels = 12, []
    while i < len(query) and query[i] != 0:
        n = query[i]
        labels.append(query[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    if i + 5 > len(query):
        return None
    qtype, _qclass = struct.unpack("!HH", query[i + 1 : i + 5])
    question = query[12 : i + 5]
    name = ".".join(labels).lower()
    answers = []
    if name.endswith(".test") or name == "test":
        last = 1 if name == "world.test" else 0x80
        if qtype == 1:
            answers.append((1, bytes([192, 0, 2, last])))
        elif qtype == 28:
            answers.append((28, socket.inet_pton(socket.AF_INET6, f"2001:db8::{last:x}")))
        rcode = 0
    else:
        rcode = 3
    header = struct.pack("!HHHHHH", tid, 0x8180 | rcode, 1, len(answers), 0, 0)
    body = question
    for rtype, rdata in answers:
        body += struct.pack("!HHHIH", 0xC00C, rtype, 1, 60, len(rdata)) + rdata
    return header + body


def dns_server(addr, port):
    # Bound to its own address: a reply from the link's primary address
    # would not match the client's connected socket.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))

    def loop():
        while True:
            data, peer = s.recvfrom(4096)
            reply = dns_answer(data)
            if reply:
                s.sendto(reply, peer)

    threading.Thread(target=loop, daemon=True).start()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blob")
    args = ap.parse_args()
    Handler.blob = args.blob
    httpd = DualStack(("::", 80), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    tcp_echo(7)
    udp_echo(7)
    dns_server("192.0.2.53", 53)
    print("ready", flush=True)
    sys.stdin.read()  # live until the test closes our stdin (or kills us)


if __name__ == "__main__":
    main()
