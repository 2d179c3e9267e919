#!/usr/bin/env python3
"""A guest that floods its sandbox for slipway serve's isolation test, for
SECS seconds: `udp` (datagrams to ever new ports: new flows until the cap),
`syn` (non-blocking connects to ever new ports) or `frames` (junk Ethernet
frames straight onto the link, AF_PACKET). Prints how many it sent."""
import errno
import os
import socket
import sys
import time

mode, target, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
until = time.monotonic() + secs
sent = 0
if mode == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    port = 1024
    payload = b"f" * 512
    while time.monotonic() < until:
        for _ in range(256):
            port = 1024 + (port - 1023) % 60000
            try:
                s.sendto(payload, (target, port))
                sent += 1
            except OSError:
                pass
elif mode == "syn":
    port = 1024
    while time.monotonic() < until:
        socks = []
        for _ in range(200):
            port = 1024 + (port - 1023) % 60000
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            err = c.connect_ex((target, port))
            if err in (0, errno.EINPROGRESS):
                sent += 1
            socks.append(c)
        for c in socks:
            c.close()
elif mode == "frames":
    # target is the interface; broadcast frames of an unknown EtherType.
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((target, 0))
    frame = b"\xff" * 6 + b"\x52\x54\x00\xaa\xbb\xcc" + b"\x88\xb5" + os.urandom(1000)
    while time.monotonic() < until:
        for _ in range(256):
            try:
                s.send(frame)
                sent += 1
            except OSError:
                pass
print(f"{mode} sent {sent}", flush=True)
