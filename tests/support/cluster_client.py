#!/usr/bin/env python3
"""Clients for the cluster end-to-end tests, where curl does not reach.
Standard library only; every socket has a timeout.

  stream ADDR PORT HOST TOKEN SECS   GET /sse?n=10000&ms=100 with the token header
                                     ("-" for none); prints "open" at the first
                                     event, then "closed N" when the server ends
                                     the stream, or "still-open N" after SECS
"""
import socket
import sys
import time


def stream(addr, port, host, token, secs):
    s = socket.create_connection((addr, int(port)), timeout=10)
    extra = "" if token == "-" else f"e2b-traffic-access-token: {token}\r\n"
    # Connection: close: the end of the stream is the end of the connection.
    s.sendall(
        f"GET /sse?n=10000&ms=100 HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()
    )
    buf, events, opened = b"", 0, False
    deadline = time.monotonic() + float(secs)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"still-open {events}", flush=True)
            return 0
        s.settimeout(left)
        try:
            piece = s.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            piece = b""
        if not piece:
            if not opened:
                print(f"refused {buf[:200]!r}", flush=True)
            else:
                print(f"closed {events}", flush=True)
            return 0
        buf += piece
        events = buf.count(b"data: event")
        if events and not opened:
            opened = True
            print("open", flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    sys.exit({"stream": stream}[cmd](*args))
