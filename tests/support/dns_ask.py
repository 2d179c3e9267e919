#!/usr/bin/env python3
"""Ask SERVER:53 for NAME's A record and print
"dns-server NAME rcode=N answers=K from=ADDR", or "dns-server NAME timeout"
after SECONDS. The optional third argument is SECONDS (5 by default), or
"tcp": ask over TCP and print "dns-tcp NAME ..." instead."""
import socket
import struct
import sys

server, name = sys.argv[1], sys.argv[2]
third = sys.argv[3] if len(sys.argv) > 3 else "5"
q = struct.pack("!HHHHHH", 0x5157, 0x0100, 1, 0, 0, 0)
for label in name.split("."):
    q += bytes([len(label)]) + label.encode()
q += b"\0" + struct.pack("!HH", 1, 1)
if third == "tcp":
    try:
        with socket.create_connection((server, 53), timeout=5) as t:
            t.sendall(struct.pack("!H", len(q)) + q)
            data = b""
            while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
                chunk = t.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        print(f"dns-tcp {name} {type(e).__name__}", flush=True)
        sys.exit(0)
    data = data[2:]
    print(f"dns-tcp {name} rcode={data[3] & 15} answers={struct.unpack('!H', data[6:8])[0]} from={server}", flush=True)
    sys.exit(0)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(third))
s.sendto(q, (server, 53))
try:
    data, addr = s.recvfrom(4096)
except socket.timeout:
    print(f"dns-server {name} timeout", flush=True)
    sys.exit(0)
print(f"dns-server {name} rcode={data[3] & 15} answers={struct.unpack('!H', data[6:8])[0]} from={addr[0]}", flush=True)
