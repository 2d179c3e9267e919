"""Runs inside `slipway run` for bench/inject.py: curl against the bench's
HTTPS server, the same way for the intercepted and the spliced flow.

  inject_agent.py BASE_URL CA_FILES MEGABYTES REQUESTS FIRSTS

Phases (each announced on stdout as `@start NAME` / `@end NAME` so that the
bench can read slipway's CPU around it), then one JSON line:
  download_h1, download_h2  one GET of MEGABYTES MiB, bytes/s
  kept_h1, kept_h2          REQUESTS small GETs on one kept connection
  new_h1                    REQUESTS small GETs, a new connection each
                            (Connection: close; curl's TLS session cache on)
  first                     FIRSTS fresh curl processes, one GET each: TLS
                            handshake done and first byte, ms from start
curl trusts exactly CA_FILES (comma-separated: the server's CA, and the
sandbox's when intercepted), not the system bundle `slipway run` installs:
curl parses its CA file during the first round trip, and the whole bundle
(about 30 ms here) would hide what the network path costs."""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def phase(name, fn):
    print(f"@start {name}", flush=True)
    t0 = time.monotonic()
    out = fn()
    elapsed = time.monotonic() - t0
    print(f"@end {name}", flush=True)
    return out, elapsed


def curl(ca, *args, timeout=300):
    cmd = ["curl", "-sS", "--fail", "--cacert", ca, "-o", "/dev/null"] + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-300:]}")
    return r.stdout


def main():
    base, ca_files, mib, reqs, firsts = sys.argv[1:6]
    mib, reqs, firsts = int(mib), int(reqs), int(firsts)
    bundle = tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False)
    for path in ca_files.split(","):
        with open(path) as f:
            bundle.write(f.read())
    bundle.close()
    ca = bundle.name
    res = {}
    size = mib << 20
    for v, flag in (("h1", "--http1.1"), ("h2", "--http2")):
        out, _ = phase(f"download_{v}", lambda: curl(
            ca, flag, "-w", "%{speed_download} %{size_download} %{http_version}",
            f"{base}/bytes/{size}"))
        speed, got, version = out.split()
        if int(got) != size:
            raise RuntimeError(f"download {v}: {got} bytes of {size}")
        res[f"download_{v}"] = {"bytes_per_second": float(speed), "http_version": version}
    for v, flag in (("h1", "--http1.1"), ("h2", "--http2")):
        out, secs = phase(f"kept_{v}", lambda: curl(
            ca, flag, "-w", "%{http_code} %{num_connects}\n", f"{base}/small?[1-{reqs}]"))
        lines = out.split()
        codes, connects = lines[0::2], lines[1::2]
        ok = sum(c == "200" for c in codes)
        res[f"kept_{v}"] = {"per_second": ok / secs, "ok": ok,
                            "connects": sum(int(c) for c in connects)}
    out, secs = phase("new_h1", lambda: curl(
        ca, "--http1.1", "-H", "Connection: close", "-w", "%{http_code} %{num_connects}\n",
        f"{base}/small?[1-{reqs}]"))
    lines = out.split()
    ok = sum(c == "200" for c in lines[0::2])
    res["new_h1"] = {"per_second": ok / secs, "ok": ok,
                     "connects": sum(int(c) for c in lines[1::2])}
    hs, ttfb = [], []

    def firsts_run():
        for _ in range(firsts):
            a, b = curl(ca, "--http1.1", "-w", "%{time_appconnect} %{time_starttransfer}",
                        f"{base}/small").split()
            hs.append(float(a) * 1e3)
            ttfb.append(float(b) * 1e3)
    phase("first", firsts_run)
    res["first"] = {"handshake_ms": statistics.median(hs), "ttfb_ms": statistics.median(ttfb),
                    "n": len(hs)}
    os.unlink(ca)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
