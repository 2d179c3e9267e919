#!/usr/bin/env python3
"""Guest side of slipway serve's end-to-end tests: hold one TCP connection to
an echo server and report how it ends. Prints "open" once the first echo is
back, then one of "reset" (ECONNRESET), "closed" (EOF) or the errno name."""
import errno
import socket
import sys
import time

host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=5)
s.sendall(b"x")
assert s.recv(1) == b"x"
print("open", flush=True)
s.settimeout(30)
while True:
    time.sleep(0.1)
    try:
        s.sendall(b"y")
        got = s.recv(1)
    except OSError as e:
        print("reset" if e.errno == errno.ECONNRESET else errno.errorcode.get(e.errno, str(e)), flush=True)
        break
    if not got:
        print("closed", flush=True)
        break
