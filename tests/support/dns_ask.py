#!/usr/bin/env python3
"""Ask SERVER:53 (UDP) for NAME's A record and print
"dns-server NAME rcode=N answers=K from=ADDR", or "dns-server NAME timeout"
after SECONDS (an optional third argument; 5 by default)."""
import socket
import struct
import sys

server, name = sys.argv[1], sys.argv[2]
q = struct.pack("!HHHHHH", 0x5157, 0x0100, 1, 0, 0, 0)
for label in name.split("."):
    q += bytes([len(label)]) + label.encode()
q += b"\0" + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]) if len(sys.argv) > 3 else 5)
s.sendto(q, (server, 53))
try:
    data, addr = s.recvfrom(4096)
except socket.timeout:
    print(f"dns-server {name} timeout", flush=True)
    sys.exit(0)
print(f"dns-server {name} rcode={data[3] & 15} answers={struct.unpack('!H', data[6:8])[0]} from={addr[0]}", flush=True)
