#!/usr/bin/env python3
"""Header injection, measured (issue 15): an intercepted HTTPS flow against
the same server spliced, in the same run.

In a namespace of its own (TEST-NET addresses on a veth link, no route out)
an HTTPS server (inject/examples/bench_upstream.rs: rustls, h2 and
http/1.1, one thread, a CA made at start) listens on 198.51.100.10:443 and
dnsmasq on 198.51.100.53 answers api.bench.test -> 198.51.100.10.
`slipway run` in that namespace, under `--allow-out api.bench.test
--deny-out ALL_TRAFFIC`, runs bench/inject_agent.py (curl) twice per
repetition, in alternating order:

  intercepted  with `--header-rule 'api.bench.test=Authorization: Bearer
               ${e2b.secrets.KEY}'`: slipway ends the guest's TLS with the
               sandbox's CA, opens verified TLS to the server (the server's
               CA through --upstream-ca) and adds the header to every request;
  spliced      no rule: the guest's TLS goes to the server byte for byte
               (its SNI read and allowed, the name dialed).

Figures: download throughput (one GET, HTTP/1.1 and HTTP/2), small requests
per second on a kept connection (h1, h2) and on a new connection each (h1),
what the first request of a fresh client costs (TLS handshake done, first
byte), and slipway's own CPU per GiB downloaded (utime+stime of the slipway
process around the download, from /proc). Medians over the repetitions.

  bench/inject.py [--reps 3] [--mib 256] [--requests 500] [--firsts 15]
                  [--slipway PATH] [--no-build]"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import peers  # noqa: E402

NAME = "api.bench.test"
SERVER = "198.51.100.10"
DNS = "198.51.100.53"
POLICY = ["--allow-out", NAME, "--deny-out", "ALL_TRAFFIC", "--dns-upstream", DNS]
MODES = ("intercepted", "spliced")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of one process (its threads, not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class World:
    """The namespace, the HTTPS server and dnsmasq; gone on `close`."""

    def __init__(self, server_bin, tmp):
        self.ns = f"slwinject{os.getpid()}"
        self.ca = os.path.join(tmp, "server-ca.pem")
        peers.world_netns(self.ns, [SERVER, DNS])
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, server_bin, f"{SERVER}:443", NAME, self.ca],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        peers.register_group(self.server)
        if self.server.stdout.readline().strip() != "ready":
            raise RuntimeError("the bench's HTTPS server did not start")
        self.dns = peers.world_dnsmasq(self.ns, DNS, {NAME: SERVER})
        time.sleep(0.3)

    def run(self, binary, mode, a):
        extra, cas = [], [self.ca]
        if mode == "intercepted":
            sandbox_ca = os.path.join(os.path.dirname(self.ca), "sandbox-ca.pem")
            extra = ["--header-rule", NAME + "=Authorization: Bearer ${e2b.secrets.KEY}",
                     "--secret", "KEY=env:BENCH_INJECT_KEY", "--upstream-ca", self.ca,
                     "--ca-out", sandbox_ca]
            cas.append(sandbox_ca)
        cmd = (["ip", "netns", "exec", self.ns, binary, "run"] + POLICY + extra
               + ["--", sys.executable, os.path.join(HERE, "inject_agent.py"), f"https://{NAME}",
                  ",".join(cas), str(a.mib), str(a.requests), str(a.firsts)])
        env = dict(os.environ, RUST_LOG="warn", BENCH_INJECT_KEY="sk-bench-not-a-secret")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
        peers.register_group(p)
        cpu, started, result = {}, {}, None
        deadline = time.monotonic() + 600
        for line in p.stdout:
            line = line.strip()
            if line.startswith("@start "):
                started[line[7:]] = cpu_seconds(p.pid)
            elif line.startswith("@end "):
                name = line[5:]
                cpu[name] = cpu_seconds(p.pid) - started[name]
            elif line.startswith("{"):
                result = json.loads(line)
            if time.monotonic() > deadline:
                break
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            peers.kill_group(p, grace=0.2)
        if result is None:
            raise RuntimeError(f"{mode}: no result (exit {p.returncode}): {p.stderr.read()[-800:]}")
        result["cpu"] = cpu
        return result

    def close(self):
        peers.kill_group(self.server, grace=0.2)
        peers.kill_group(self.dns, grace=0.2)
        peers.netns_del(self.ns)


def measure(binary, server_bin, a, say=print):
    """Run the reps; returns {figure: {mode: [values]}}."""
    got = {}
    tmp = tempfile.mkdtemp(prefix="slipway-bench-inject-")
    w = World(server_bin, tmp)
    add = lambda fig, mode, v: got.setdefault(fig, {}).setdefault(mode, []).append(v)  # noqa: E731
    try:
        for rep in range(1, a.reps + 1):
            for mode in (MODES if rep % 2 else MODES[::-1]):
                say(f"  inject rep {rep}/{a.reps}: {mode}")
                r = w.run(binary, mode, a)
                gib = (a.mib << 20) / (1 << 30)
                for v in ("h1", "h2"):
                    add(f"download_{v}", mode, r[f"download_{v}"]["bytes_per_second"] * 8 / 1e9)
                    add(f"cpu_per_gib_{v}", mode, r["cpu"][f"download_{v}"] / gib)
                    add(f"kept_{v}", mode, r[f"kept_{v}"]["per_second"])
                add("new_h1", mode, r["new_h1"]["per_second"])
                add("handshake_ms", mode, r["first"]["handshake_ms"])
                add("ttfb_ms", mode, r["first"]["ttfb_ms"])
                for fig in ("kept_h1", "kept_h2"):
                    if r[fig]["connects"] != 1:
                        say(f"  {mode} {fig}: {r[fig]['connects']} connections, not 1")
                say(f"    download h1 {r['download_h1']['bytes_per_second'] * 8 / 1e9:.2f} Gbit/s, "
                    f"h2 {r['download_h2']['bytes_per_second'] * 8 / 1e9:.2f} Gbit/s, "
                    f"kept h1 {r['kept_h1']['per_second']:.0f}/s, new h1 {r['new_h1']['per_second']:.0f}/s, "
                    f"first byte {r['first']['ttfb_ms']:.1f} ms")
    finally:
        w.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return got


ROWS = [
    ("download_h1", "HTTPS download, HTTP/1.1 (Gbit/s)", "≥ 0.5x"),
    ("download_h2", "HTTPS download, HTTP/2 (Gbit/s)", "≥ 0.5x"),
    ("cpu_per_gib_h1", "slipway CPU per GiB, HTTP/1.1 (s)", ""),
    ("cpu_per_gib_h2", "slipway CPU per GiB, HTTP/2 (s)", ""),
    ("kept_h1", "small GETs, kept connection, HTTP/1.1 (/s)", ""),
    ("kept_h2", "small GETs, kept connection, HTTP/2 (/s)", ""),
    ("new_h1", "small GETs, a new connection each (/s)", ""),
    ("handshake_ms", "fresh client: TLS handshake done (ms)", ""),
    ("ttfb_ms", "fresh client: first byte (ms)", ""),
]


def markdown(got):
    med = {fig: {m: statistics.median(v) for m, v in modes.items()} for fig, modes in got.items()}
    rows = ["| figure | intercepted | spliced | intercepted ÷ spliced | target |", "|---|---|---|---|---|"]
    for fig, label, target in ROWS:
        m = med.get(fig, {})
        i, s = m.get("intercepted"), m.get("spliced")
        if i is None or s is None:
            continue
        ratio = f"{i / s:.2f}x" if s else "?"
        if fig in ("handshake_ms", "ttfb_ms"):
            ratio += f" (+{i - s:.1f} ms)"
        rows.append(f"| {label} | {i:.2f} | {s:.2f} | {ratio} | {target} |")
    return "\n".join(rows) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256, help="MiB per download (default 256)")
    ap.add_argument("--requests", type=int, default=500, help="small GETs per figure (default 500)")
    ap.add_argument("--firsts", type=int, default=15, help="fresh clients for the first-request cost")
    ap.add_argument("--slipway", default=os.path.join(ROOT, "target", "release", "slipway"))
    ap.add_argument("--no-build", action="store_true",
                    help="use the binaries as they are (else cargo build --release first)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/inject.py: needs root (ip netns add)")
    for tool in ("dnsmasq", "curl"):
        if not shutil.which(tool):
            sys.exit(f"bench/inject.py: {tool} is missing")
    server_bin = os.path.join(ROOT, "target", "release", "examples", "bench_upstream")
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "slipway", "-p", "inject",
                        "--example", "bench_upstream"], cwd=ROOT, check=True)
    try:
        got = measure(os.path.abspath(a.slipway), server_bin, a)
    finally:
        peers.cleanup_all()
    print(markdown(got))
    print(json.dumps(got))


if __name__ == "__main__":
    main()
