"""The benchmark's client side, run inside the namespace under test (or on
the host for the loopback limit). It reads one JSON command per line on stdin
and answers one JSON line on stdout, so the driver can read the stack
process's /proc counters between commands. It exits when stdin closes.

Every operation is bounded in time (and in count where it loops)."""

import json
import os
import socket
import subprocess
import sys
import time


def wait_ready(host, port, timeout):
    """Connect-and-echo until it works: the namespace's link is up."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                s.settimeout(2.0)
                s.sendall(b"x")
                if s.recv(1) == b"x":
                    return {"ok": True, "waited": timeout - (deadline - time.monotonic())}
                last = "echo server sent nothing back"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    return {"ok": False, "error": f"{host}:{port} not reachable after {timeout}s: {last}"}


def iperf(host, args, timeout):
    """One iperf3 client run; returns its JSON report (or the failure)."""
    cmd = ["iperf3", "-c", host, "-J", "--connect-timeout", "3000"] + args
    started = time.monotonic()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"iperf3 did not finish within {timeout}s (stalled?)",
                "took": time.monotonic() - started}
    try:
        report = json.loads(out.stdout)
    except ValueError:
        return {"ok": False, "error": f"iperf3 exit {out.returncode}: {out.stderr.strip()[:300]}"}
    if "error" in report:
        return {"ok": False, "error": f"iperf3: {report['error']}", "took": time.monotonic() - started}
    return {"ok": True, "report": report, "took": time.monotonic() - started}


def crr(host, port, seconds, max_count, size):
    """Connect, send `size` bytes, read them back, close; as many as fit."""
    req = b"q" * size
    done = errors = 0
    first_error = None
    started = time.monotonic()
    deadline = started + seconds
    while done < max_count and time.monotonic() < deadline:
        try:
            s = socket.create_connection((host, port), timeout=2.0)
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(req)
                got = 0
                while got < size:
                    chunk = s.recv(size - got)
                    if not chunk:
                        raise OSError("server closed early")
                    got += len(chunk)
            finally:
                s.close()
            done += 1
        except OSError as e:
            errors += 1
            first_error = first_error or str(e)
            if errors > 50:
                break
    took = time.monotonic() - started
    res = {"ok": done > 0 and errors == 0, "count": done, "errors": errors,
           "seconds": took, "per_second": done / took if took > 0 else 0.0}
    if errors:
        res["error"] = f"{errors} failed connections (first: {first_error}) after {done} good ones"
    return res


def connect(host, port, seconds, max_count):
    """Connect and close, one after another: how long each connect() takes
    (the SYN-ACK waits for the stack's host connect, or its whole dial
    through an egress proxy); µs."""
    samples = []
    errors = 0
    first_error = None
    deadline = time.monotonic() + seconds
    while len(samples) < max_count and time.monotonic() < deadline:
        t0 = time.perf_counter_ns()
        try:
            s = socket.create_connection((host, port), timeout=2.0)
        except OSError as e:
            errors += 1
            first_error = first_error or str(e)
            if errors > 50:
                break
            continue
        t1 = time.perf_counter_ns()
        s.close()
        samples.append((t1 - t0) / 1000.0)
    if not samples:
        return {"ok": False, "error": f"no connection (first error: {first_error})"}
    samples.sort()

    def pct(p):
        return samples[min(len(samples) - 1, int(p / 100.0 * len(samples)))]

    res = {"ok": errors == 0, "count": len(samples), "p50": pct(50), "p99": pct(99)}
    if errors:
        res["error"] = f"{errors} failed connects (first: {first_error}) after {len(samples)} good ones"
    return res


def rr(host, port, seconds, max_count, samples=False):
    """1-byte request/response over one connection; round-trip times in µs."""
    raw = samples
    samples = []
    try:
        s = socket.create_connection((host, port), timeout=2.0)
    except OSError as e:
        return {"ok": False, "error": f"connect: {e}"}
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(2.0)
        deadline = time.monotonic() + seconds
        warmup = 50
        i = 0
        while i < max_count + warmup and time.monotonic() < deadline:
            t0 = time.perf_counter_ns()
            s.send(b"p")
            if s.recv(1) != b"p":
                return {"ok": False, "error": "echo server closed the connection"}
            t1 = time.perf_counter_ns()
            if i >= warmup:
                samples.append((t1 - t0) / 1000.0)
            i += 1
    except OSError as e:
        return {"ok": False, "error": f"after {len(samples)} round trips: {e}"}
    finally:
        s.close()
    if not samples:
        return {"ok": False, "error": "no round trip completed"}
    samples.sort()

    def pct(p):
        return samples[min(len(samples) - 1, int(p / 100.0 * len(samples)))]

    res = {"ok": True, "count": len(samples), "p50": pct(50), "p99": pct(99), "max": samples[-1]}
    if raw:
        res["samples"] = [round(x, 1) for x in samples]
    return res


def main():
    ops = {"ready": wait_ready, "iperf": iperf, "crr": crr, "rr": rr, "connect": connect}
    print(json.dumps({"ok": True, "hello": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = ops[cmd.pop("op")]
        try:
            res = op(**cmd)
        except Exception as e:  # answer, never die: the driver is waiting
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
