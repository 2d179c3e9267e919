#!/usr/bin/env python3
"""Public clients for the gateway's end-to-end tests, where curl does not
reach: WebSocket, server-sent event timing, holding connections open, and
hostile clients. Standard library only; every socket has a timeout.

  ws ADDR PORT HOST              WebSocket echo: text, 300 KB binary, ping, close
  sse ADDR PORT HOST N MS        time the events of /sse; "sse-ok N first_ms last_ms"
  hold ADDR PORT HOST N          hold N /sse streams open, then one more request:
                                 "held N extra STATUS"
  slowloris ADDR PORT HOST       headers a byte every 0.5 s: "closed-after SECS" (or "open")
  bighead ADDR PORT HOST KB      a KB-kilobyte header: "status CODE" (or "closed")
  smuggle ADDR PORT HOST         Content-Length and Transfer-Encoding together
  double_length ADDR PORT HOST   two different Content-Lengths: "status CODE" (or "closed")
  idle ADDR PORT N SECS          N silent connections: "closed K of N within SECS"
  tcp ADDR PORT TEXT             send TEXT, print every line that comes back
  percap ADDR PORT HOST N        hold N silent connections from 127.0.0.1, then ask from
                                 127.0.0.1 (JSON, then HTML) and 127.0.0.2; free one, ask again
"""
import base64
import hashlib
import os
import socket
import struct
import sys
import time


def connect(addr, port, timeout=10):
    s = socket.create_connection((addr, int(port)), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_head(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        piece = s.recv(4096)
        if not piece:
            break
        buf += piece
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def status_of(head):
    parts = head.split(" ", 2)
    return parts[1] if len(parts) > 1 else "none"


def recv_exact(s, n, pre=b""):
    buf = pre
    while len(buf) < n:
        piece = s.recv(n - len(buf))
        if not piece:
            raise EOFError("closed")
        buf += piece
    return buf


def ws_send(s, op, data):
    mask = os.urandom(4)
    n = len(data)
    if n < 126:
        head = bytes([0x80 | op, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | op, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x80 | op, 0x80 | 127]) + struct.pack(">Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    s.sendall(head + mask + masked)


class Reader:
    def __init__(self, s, pre):
        self.s, self.buf = s, pre

    def take(self, n):
        while len(self.buf) < n:
            piece = self.s.recv(1 << 16)
            if not piece:
                raise EOFError("closed")
            self.buf += piece
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self):
        head = self.take(2)
        op, ln = head[0] & 0x0F, head[1] & 0x7F
        if ln == 126:
            ln = struct.unpack(">H", self.take(2))[0]
        elif ln == 127:
            ln = struct.unpack(">Q", self.take(8))[0]
        return op, self.take(ln)


def ws(addr, port, host):
    s = connect(addr, port)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head, rest = read_head(s)
    want = base64.b64encode(
        hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    ).decode()
    if status_of(head) != "101" or want not in head:
        print(f"ws-bad-handshake {head!r}")
        return 1
    r = Reader(s, rest)
    big = os.urandom(300 * 1024)
    checks = [(0x1, b"hello through the gateway"), (0x2, big), (0x9, b"ping!")]
    for op, data in checks:
        ws_send(s, op, data)
        got_op, got = r.frame()
        want_op = 0xA if op == 0x9 else op
        if got_op != want_op or got != data:
            print(f"ws-bad-echo op={got_op} len={len(got)}")
            return 1
    ws_send(s, 0x8, b"")
    op, _ = r.frame()
    print("ws-ok" if op == 0x8 else f"ws-bad-close {op}")
    return 0


def sse(addr, port, host, n, ms):
    s = connect(addr, port)
    start = time.monotonic()
    s.sendall(f"GET /sse?n={n}&ms={ms} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head, rest = read_head(s)
    if status_of(head) != "200":
        print(f"sse-bad {head!r}")
        return 1
    times, buf, seen = [], rest, 0
    while seen < int(n):
        while buf.count(b"\n\n") > seen:
            seen += 1
            times.append(time.monotonic() - start)
        if seen >= int(n):
            break
        piece = s.recv(4096)
        if not piece:
            break
        buf += piece
    print(f"sse-ok {seen} {int(times[0] * 1000)} {int(times[-1] * 1000)}")
    return 0


def hold(addr, port, host, n):
    held = []
    for _ in range(int(n)):
        s = connect(addr, port)
        s.sendall(f"GET /sse?n=200&ms=100 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head, _ = read_head(s)
        if status_of(head) != "200":
            print(f"hold-failed {head!r}")
            return 1
        held.append(s)
    s = connect(addr, port)
    s.sendall(f"GET /headers HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    head, rest = read_head(s)
    body = rest
    try:
        while True:
            piece = s.recv(4096)
            if not piece:
                break
            body += piece
    except OSError:
        pass
    print(f"held {len(held)} extra {status_of(head)} {body.decode(errors='replace').strip()}")
    for h in held:
        h.close()
    return 0


def slowloris(addr, port, host):
    s = connect(addr, port, timeout=1)
    start = time.monotonic()
    s.sendall(f"GET /headers HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode())
    while time.monotonic() - start < 30:
        try:
            s.sendall(b"a")
        except OSError:
            break
        try:
            if s.recv(4096) == b"":
                break
        except socket.timeout:
            continue
        except OSError:
            break
    took = time.monotonic() - start
    print(f"closed-after {took:.1f}" if took < 30 else "open")
    return 0


def bighead(addr, port, host, kb):
    s = connect(addr, port)
    try:
        s.sendall(
            f"GET /headers HTTP/1.1\r\nHost: {host}\r\nX-Big: {'a' * (int(kb) * 1024)}\r\n\r\n".encode()
        )
    except OSError:
        pass
    try:
        head, _ = read_head(s)
        print(f"status {status_of(head)}" if head else "closed")
    except OSError:
        print("closed")
    return 0


def smuggle(addr, port, host):
    s = connect(addr, port)
    body = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n"
    s.sendall(
        (
            f"POST /headers HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + body
    )
    data = b""
    try:
        while True:
            piece = s.recv(65536)
            if not piece:
                break
            data += piece
    except socket.timeout:
        print("connection-left-open")
    text = data.decode(errors="replace")
    print(f"responses {text.count('HTTP/1.1 ')}")
    print(text)
    return 0


def double_length(addr, port, host):
    """Two different Content-Lengths: the request must be refused."""
    s = connect(addr, port)
    s.sendall(
        (
            f"POST /headers HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n"
            "Content-Length: 30\r\n\r\nabc"
        ).encode()
    )
    head, _ = read_head(s)
    print(f"status {status_of(head)}" if head else "closed")
    return 0


def idle(addr, port, n, secs):
    socks = [connect(addr, port) for _ in range(int(n))]
    deadline = time.monotonic() + float(secs)
    closed = 0
    for s in socks:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if s.recv(1) == b"":
                closed += 1
        except socket.timeout:
            pass
        except OSError:
            closed += 1
    print(f"closed {closed} of {n} within {secs}")
    return 0


def tcp(addr, port, text):
    s = connect(addr, port)
    s.sendall(text.encode() + b"\n")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        piece = s.recv(4096)
        if not piece:
            break
        data += piece
    sys.stdout.write(data.decode(errors="replace"))
    return 0


def ask_from(src, addr, port, host, accept=None):
    """One GET /headers from the source address SRC: (status, body)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.bind((src, 0))
    s.connect((addr, int(port)))
    extra = f"Accept: {accept}\r\n" if accept else ""
    s.sendall(f"GET /headers HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
    data = b""
    try:
        while True:
            piece = s.recv(65536)
            if not piece:
                break
            data += piece
    except OSError as e:
        return f"error-{type(e).__name__}", data.decode(errors="replace")
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return status_of(head.decode("latin-1")), body.decode(errors="replace").strip()


def percap(addr, port, host, n):
    held = []
    for _ in range(int(n)):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(10)
        s.bind(("127.0.0.1", 0))
        s.connect((addr, int(port)))
        held.append(s)
    time.sleep(0.3)
    print("over", *ask_from("127.0.0.1", addr, port, host))
    code, page = ask_from("127.0.0.1", addr, port, host, "text/html")
    print("over-html", code, "page" if page.startswith("<!doctype html>") else page)
    print("other", ask_from("127.0.0.2", addr, port, host)[0])
    held.pop().close()
    code, deadline = "none", time.monotonic() + 5
    while time.monotonic() < deadline:
        code = ask_from("127.0.0.1", addr, port, host)[0]
        if code == "200":
            break
        time.sleep(0.05)
    print("freed", code)
    for s in held:
        s.close()
    return 0


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    sys.exit(globals()[cmd](*args))
