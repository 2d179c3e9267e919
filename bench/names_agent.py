"""The egress-by-name benchmark's client, run inside `slipway run` (see
names.py). Every figure is bounded in time and count. Prints one JSON object.

  names_agent.py PORT SECONDS cidr=ADDR pinned=NAME dialed=ADDR [kinds=cidr,pinned,dialed]
  names_agent.py PORT SECONDS dns=NAME

Each connection sends the same first bytes: a TLS ClientHello naming the
pinned name (the echo server sends it back), so the three paths differ only
in how the stack decides the flow."""

import json
import socket
import struct
import sys
import time


def client_hello(sni):
    name = sni.encode()
    ext = struct.pack("!HHHBH", 0, len(name) + 5, len(name) + 3, 0, len(name)) + name
    ext += bytes([0x00, 0x2B, 0x00, 0x03, 0x02, 0x03, 0x04])
    body = b"\x03\x03" + b"\x42" * 32 + b"\x20" + b"\x24" * 32
    body += b"\x00\x02\x13\x01\x01\x00" + struct.pack("!H", len(ext)) + ext
    hs = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def read_exact(s, n):
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise OSError("closed early")
        got += chunk
    return got


def crr(host, port, first, seconds, max_count=20000):
    done = errors = 0
    start = time.monotonic()
    while done < max_count and time.monotonic() - start < seconds:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(first)
                read_exact(s, len(first))
            done += 1
        except OSError:
            errors += 1
            if errors > 20:
                break
    took = time.monotonic() - start
    return {"per_second": done / took if took else 0.0, "count": done, "errors": errors}


def rr(host, port, first, seconds, max_count=3000):
    samples = []
    with socket.create_connection((host, port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(first)
        read_exact(s, len(first))
        start = time.monotonic()
        while len(samples) < max_count + 50 and time.monotonic() - start < seconds:
            t0 = time.perf_counter_ns()
            s.send(b"p")
            read_exact(s, 1)
            samples.append((time.perf_counter_ns() - t0) / 1000.0)
    samples = sorted(samples[50:])
    if not samples:
        return {"p50": None, "p99": None}
    pct = lambda p: samples[min(len(samples) - 1, int(p / 100 * len(samples)))]  # noqa: E731
    return {"p50": pct(50), "p99": pct(99), "count": len(samples)}


def query(qid, name):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", 1, 1)


def dns_qps(name, seconds, max_count=50000):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect(("10.0.2.3", 53))
    done = lost = 0
    start = time.monotonic()
    while done < max_count and time.monotonic() - start < seconds:
        qid = done & 0xFFFF
        s.send(query(qid, name))
        try:
            while struct.unpack("!H", s.recv(512)[:2])[0] != qid:
                pass
            done += 1
        except socket.timeout:
            lost += 1
            if lost > 5:
                break
    took = time.monotonic() - start
    return {"per_second": done / took if took else 0.0, "count": done, "lost": lost}


def main():
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    opts = dict(a.split("=", 1) for a in sys.argv[3:])
    out = {}
    if "dns" in opts:
        out["dns"] = dns_qps(opts["dns"], seconds)
    else:
        pinned = opts["pinned"]
        first = client_hello(pinned)
        pinned_addr = socket.gethostbyname(pinned)  # through the filtering resolver: a pin
        only = opts.get("kinds", "cidr,pinned,dialed").split(",")
        for kind, host in (("cidr", opts["cidr"]), ("pinned", pinned_addr), ("dialed", opts["dialed"])):
            if kind in only:
                out[kind] = {"crr": crr(host, port, first, seconds), "rr": rr(host, port, first, seconds)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
