#!/usr/bin/env python3
"""Guest-side probe for slipway's end-to-end tests: one attempt, one line out,
"<result> <milliseconds>", where result is `connected`, `echo-ok`, `greet-ok`, `reply`, `burst-ok`,
`timeout` or the errno name (ECONNREFUSED, EHOSTUNREACH, EACCES, ...)."""
import errno
import socket
import sys
import time


def outcome(e):
    if isinstance(e, socket.timeout):
        return "timeout"
    return errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def main():
    what, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    start = time.monotonic()
    try:
        if what == "tcp":
            socket.create_connection((host, port), timeout=5).close()
            result = "connected"
        elif what == "tcp-echo":
            with socket.create_connection((host, port), timeout=5) as s:
                msg = b"slipway echo " * 1000
                s.sendall(msg)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                result = "echo-ok" if got == msg else f"echo-mismatch({len(got)})"
        elif what == "greet":
            # A server-first protocol: the server speaks, then we answer.
            with socket.create_connection((host, port), timeout=5) as s:
                f = s.makefile("rb")
                banner = f.readline()
                s.sendall(b"HELO guest\r\n")
                reply = f.readline()
                ok = banner.startswith(b"220") and reply.startswith(b"250 you said HELO")
                result = "greet-ok" if ok else f"greet-bad({banner!r},{reply!r})"
        elif what == "udp":
            with socket.socket(family(host), socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.connect((host, port))
                s.send(b"slipway udp")
                # A second send picks up an ICMP error that raced the first recv.
                got = s.recv(2048)
                result = "reply" if got == b"slipway udp" else "wrong-reply"
        elif what == "udp-burst":
            # Back to back, so that they reach the stack in one round: runs
            # of one size (which go out as one GSO send), a shorter one
            # ending a run, sizes that change every datagram, an empty one.
            sizes = [1200] * 20 + [700] + [300] * 5 + [1, 0, 900, 1000, 1100] + [1200] * 30
            sent = [(b"%04d" % i + bytes([i % 251]) * size)[:size] for i, size in enumerate(sizes)]
            with socket.socket(family(host), socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                s.settimeout(3)
                s.connect((host, port))
                for p in sent:
                    s.send(p)
                got = []
                while len(got) < len(sent):
                    try:
                        got.append(s.recv(2048))
                    except socket.timeout:
                        break
            if got == sent:
                result = "burst-ok"
            else:
                in_order = [g for g in got if g in sent] == [p for p in sent if p in got]
                result = f"burst-mismatch(got-{len(got)}-of-{len(sent)},in-order-{in_order})"
        else:
            raise SystemExit(f"unknown probe {what}")
    except OSError as e:
        result = outcome(e)
    print(f"{result} {int((time.monotonic() - start) * 1000)}", flush=True)


if __name__ == "__main__":
    main()
