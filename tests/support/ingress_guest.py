#!/usr/bin/env python3
"""Servers inside the sandbox for the public URL gateway's end-to-end tests.
Standard library only. Prints "ready" once every socket listens.

  TCP 8000  HTTP/1.1:
            ANY /headers        -> JSON {method, path, headers: [[name, value]...], body_len}
            GET /blob           -> the file given by --blob
            PUT|POST /upload    -> "<sha256> <bytes>" of the body it streamed
            GET /sse?n=N&ms=M   -> N server-sent events, M ms apart, each flushed
            GET /set-cookie?c=C&c=…  -> "ok", with one Set-Cookie: C per c (latin-1, so any byte)
            GET /ws             -> WebSocket echo (text, binary, ping; close ends it)
  TCP 7000  reads a PROXY protocol v2 header, answers "proxy SRC -> DST\\n", then echoes
  TCP 7001  echo
  TCP 8443  with --tls-cert/--tls-key: the same as 8000 over TLS (ALPN offers h2 first, then
            http/1.1); /headers also says {"tls": {"sni", "alpn"}}: what the client's
            ClientHello named and the protocol agreed
"""
import argparse
import base64
import hashlib
import http.server
import json
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import urllib.parse

from httpkit import echo_forever, read_body, send_file

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    blob = None

    def log_message(self, *args):
        pass

    def send_text(self, code, text, ctype="text/plain"):
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def headers_echo(self):
        n = sum(len(p) for p in read_body(self))
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body_len": n,
        }
        if isinstance(self.connection, ssl.SSLSocket):
            seen["tls"] = {
                "sni": getattr(self.connection, "sni_name", None),
                "alpn": self.connection.selected_alpn_protocol(),
            }
        self.send_text(200, json.dumps(seen), "application/json")

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/headers":
            return self.headers_echo()
        if url.path == "/blob":
            return send_file(self, self.blob)
        if url.path == "/sse":
            n, ms = int(q.get("n", "3")), int(q.get("ms", "100"))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            try:
                for i in range(n):
                    self.wfile.write(f"id: {i}\ndata: event {i}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(ms / 1000)
            except OSError:
                pass
            self.close_connection = True
            return
        if url.path == "/ws":
            return self.websocket()
        if url.path == "/set-cookie":
            body = b"ok\n"
            self.send_response(200)
            for name, value in urllib.parse.parse_qsl(url.query, encoding="latin-1"):
                if name == "c":
                    self.send_header("Set-Cookie", value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_text(404, "no such path\n")

    def do_PUT(self):
        if self.path == "/upload":
            h, n = hashlib.sha256(), 0
            for piece in read_body(self):
                h.update(piece)
                n += len(piece)
            return self.send_text(200, f"{h.hexdigest()} {n}\n")
        if self.path == "/headers":
            return self.headers_echo()
        self.send_text(404, "no such path\n")

    do_POST = do_PUT

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key")
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            return self.send_text(400, "not a websocket request\n")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        r, w = self.rfile, self.wfile
        while True:
            head = r.read(2)
            if len(head) < 2:
                return
            op, ln = head[0] & 0x0F, head[1] & 0x7F
            if ln == 126:
                ln = struct.unpack(">H", r.read(2))[0]
            elif ln == 127:
                ln = struct.unpack(">Q", r.read(8))[0]
            mask = r.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytearray(r.read(ln))
            for i in range(len(data)):
                data[i] ^= mask[i % 4]
            if op == 0x8:
                w.write(b"\x88\x00")
                w.flush()
                return
            reply_op = 0xA if op == 0x9 else op
            w.write(ws_frame(reply_op, bytes(data)))
            w.flush()


class TlsServer(Server):
    """HTTPS: the handshake runs in the request's own thread, so a client
    that never finishes it holds up no other."""

    def __init__(self, addr, handler, cert, key):
        super().__init__(addr, handler)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.set_alpn_protocols(["h2", "http/1.1"])
        self.ctx.sni_callback = lambda conn, name, ctx: setattr(conn, "sni_name", name)

    def get_request(self):
        conn, addr = self.socket.accept()
        return self.ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request, client_address):
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError):
            return  # plain HTTP to a TLS port: the client sees the close
        super().finish_request(request, client_address)


def ws_frame(op, data):
    n = len(data)
    if n < 126:
        head = bytes([0x80 | op, n])
    elif n < 65536:
        head = bytes([0x80 | op, 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x80 | op, 127]) + struct.pack(">Q", n)
    return head + data


def recv_exact(conn, n):
    buf = b""
    while len(buf) < n:
        piece = conn.recv(n - len(buf))
        if not piece:
            raise EOFError
        buf += piece
    return buf


def proxy_v2(conn):
    head = recv_exact(conn, 16)
    if head[:12] != b"\r\n\r\n\0\r\nQUIT\n" or head[12] != 0x21:
        return "no-proxy-header"
    fam, ln = head[13], struct.unpack(">H", head[14:16])[0]
    body = recv_exact(conn, ln)
    if fam == 0x11:
        src = socket.inet_ntop(socket.AF_INET, body[0:4])
        dst = socket.inet_ntop(socket.AF_INET, body[4:8])
        sp, dp = struct.unpack(">HH", body[8:12])
    elif fam == 0x21:
        src = socket.inet_ntop(socket.AF_INET6, body[0:16])
        dst = socket.inet_ntop(socket.AF_INET6, body[16:32])
        sp, dp = struct.unpack(">HH", body[32:36])
    else:
        return f"family-{fam:#x}"
    return f"{src}:{sp} -> {dst}:{dp}"


def tcp_server(port, with_proxy):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)

    def greet(conn):
        conn.sendall(f"proxy {proxy_v2(conn)}\n".encode())

    echo_forever(srv, greet if with_proxy else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blob", default="/dev/null")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    args = ap.parse_args()
    Handler.blob = args.blob
    httpd = Server(("0.0.0.0", 8000), Handler)
    if args.tls_cert:
        https = TlsServer(("0.0.0.0", 8443), Handler, args.tls_cert, args.tls_key)
        threading.Thread(target=https.serve_forever, daemon=True).start()
    tcp_server(7000, True)
    tcp_server(7001, False)
    print("ready", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
