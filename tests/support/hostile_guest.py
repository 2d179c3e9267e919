#!/usr/bin/env python3
"""A hostile guest for slipway's end-to-end tests, run by a real kernel (root
inside the sandbox's namespace). Crafted TCP segments go out through a raw
socket; the kernel itself answers the SYN-ACKs they provoke with RSTs, as it
does when no socket wants them.

  crash HOST PORT        the three frames that panicked slipway (issue 11), on tap0
  abort N HOST PORT      N handshakes the guest aborts (the kernel RSTs each SYN-ACK)
  panic IFACE            a frame that panics a test build's stack (fault injection)

Prints "sent" when done."""
import socket
import struct
import sys
import time


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def segment(src, dst, sport, dport, seq, flags):
    """A TCP header without options: flags as the byte (SYN 0x02, RST 0x04)."""
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, 0, 5 << 4, flags, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(hdr))
    csum = checksum(pseudo + hdr)
    return hdr[:16] + struct.pack("!H", csum) + hdr[18:]


SYN, RST = 0x02, 0x04
GUEST = "10.0.2.15"
GATEWAY_MAC = bytes.fromhex("52550a000202")


def raw():
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    return s


def send(s, host, port, sport, seq, flags):
    s.sendto(segment(GUEST, host, sport, port, seq, flags), (host, 0))


class Link:
    """Whole Ethernet frames straight onto the guest's interface, so that
    several land in the tap's queue back to back and slipway reads them in
    one batch."""

    def __init__(self, iface):
        self.s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self.s.bind((iface, 0))
        mac = open(f"/sys/class/net/{iface}/address").read().strip()
        self.mac = bytes.fromhex(mac.replace(":", ""))

    def frame(self, ethertype, payload):
        return GATEWAY_MAC + self.mac + struct.pack("!H", ethertype) + payload

    def tcp(self, host, port, sport, seq, flags):
        tcp = segment(GUEST, host, sport, port, seq, flags)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
                         socket.inet_aton(GUEST), socket.inet_aton(host))
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        self.s.send(self.frame(0x0800, ip + tcp))

    def junk(self, n):
        # A local experimental ethertype: slipway drops these, cheaply.
        for _ in range(n):
            self.s.send(self.frame(0x88B6, b"\0" * 46))


def crash(host, port):
    link = Link("tap0")
    # 1. SYNs with seq 2^31 to a server that keeps connections open. slipway
    #    connects and releases each SYN-ACK; this kernel (no socket on these
    #    ports) answers each with an RST of seq 2^31+1.
    for i in range(5):
        link.tcp(host, port, 41001 + i, 0x80000000, SYN)
    time.sleep(0.5)
    # 2. and 3. A SYN from another port and an RST with seq 2^31+1 right
    #    behind it, in one read batch: queued behind a burst of junk that
    #    keeps slipway busy while they arrive. Five tries.
    for i in range(5):
        link.junk(100)
        link.tcp(host, port, 42001 + i, 0, SYN)
        link.tcp(host, port, 42001 + i, 0x80000001, RST)
        time.sleep(0.1)
    time.sleep(0.5)


def abort(n, host, port):
    s = raw()
    for i in range(n):
        send(s, host, port, 42000 + i, 1000 + i, SYN)
        time.sleep(0.2)


def panic(iface):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    mac = open(f"/sys/class/net/{iface}/address").read().strip()
    src = bytes.fromhex(mac.replace(":", ""))
    frame = b"\xff" * 6 + src + b"\x88\xb5" + b"slipway-fault-injection: panic"
    s.send(frame + b"\0" * max(0, 60 - len(frame)))


def main():
    what = sys.argv[1]
    if what == "crash":
        crash(sys.argv[2], int(sys.argv[3]))
    elif what == "abort":
        abort(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    elif what == "panic":
        panic(sys.argv[2])
    else:
        sys.exit(f"unknown action {what}")
    print("sent", flush=True)


main()
