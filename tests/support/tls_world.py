#!/usr/bin/env python3
"""More of the test world for egress by name, run inside the world namespace:
HTTPS on the given ports (certificate and key from files the test made with
its own CA), answering "hello over tls sni=NAME port=PORT"; and a
server-first greeter on TCP 25 that sends a banner, then echoes one line.
Prints "ready" once every socket listens. Standard library only."""
import argparse
import socket
import ssl
import threading


def https(port, ctx):
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", port))
    srv.listen(32)

    def serve(conn):
        seen = {}

        def on_sni(sock, name, _ctx):
            seen["sni"] = name

        try:
            ctx.sni_callback = on_sni
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(10)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = tls.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                body = f"hello over tls sni={seen.get('sni')} port={port}\n".encode()
                tls.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                    + body
                )
        except (OSError, ssl.SSLError):
            pass

    def loop():
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def greeter(port):
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", port))
    srv.listen(16)

    def serve(conn):
        with conn:
            conn.settimeout(10)
            try:
                conn.sendall(b"220 world greeter ready\r\n")
                line = conn.makefile("rb").readline()
                conn.sendall(b"250 you said " + line)
            except OSError:
                pass

    def loop():
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--port", type=int, action="append", default=[])
    a = ap.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    for p in a.port:
        https(p, ctx)
    greeter(25)
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
