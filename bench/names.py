"""Egress by name, measured (issue 12): slipway alone, the same run.

In a namespace of its own (TEST-NET addresses on a veth link, no route
out) an echo server listens on 198.51.100.1 and .3, and dnsmasq on
198.51.100.53 answers echo.bench.test -> 198.51.100.3. `slipway run` in that
namespace, under `--allow-out 198.51.100.1/32 --allow-out '*.bench.test'
--deny-out ALL_TRAFFIC`, carries three kinds of TCP flow, each sending the
same ClientHello first and reading it back:

  cidr    to 198.51.100.1, allowed by its CIDR;
  pinned  to 198.51.100.3, allowed by the pin its DNS answer left (the
          ClientHello is checked for fronting before it goes out);
  dialed  to 198.51.100.9, an address nobody resolved: the stack reads the
          SNI, resolves the name (two queries) and dials it.

Then DNS queries per second to the stack's resolver (10.0.2.3): filtered
(the policy above) against plain forwarding (`--allow-out 0.0.0.0/0`).
Runs are interleaved; medians over the repetitions.

  bench/names.py [--reps 3] [--seconds 3] [--slipway PATH]"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import peers  # noqa: E402

NAMES_POLICY = ["--allow-out", "198.51.100.1/32", "--allow-out", "*.bench.test",
                "--deny-out", "ALL_TRAFFIC"]
PLAIN_POLICY = ["--allow-out", "0.0.0.0/0"]
KINDS = ("cidr", "pinned", "dialed")


class World:
    """The namespace, its echo server and dnsmasq; gone on `close`."""

    def __init__(self):
        self.ns = f"slwnames{os.getpid()}"
        # slipway's host sockets close first, so thousands of connections a
        # second leave their ports in TIME_WAIT: without reuse the later
        # repetitions run out of ports.
        peers.world_netns(self.ns, ["198.51.100.1", "198.51.100.3", "198.51.100.53"],
                          "sysctl -qw net.ipv4.tcp_tw_reuse=1")
        self.echo = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, os.path.join(HERE, "echo_server.py"),
             "--bind", "0.0.0.0", "--lifetime", "1800"],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        peers.register_group(self.echo)
        self.port = int(self.echo.stdout.readline())
        self.dns = peers.world_dnsmasq(self.ns, "198.51.100.53", {"echo.bench.test": "198.51.100.3"})
        time.sleep(0.3)

    def run(self, binary, policy, agent_args, timeout):
        cmd = (["ip", "netns", "exec", self.ns, binary, "run"] + policy
               + ["--dns-upstream", "198.51.100.53", "--", sys.executable,
                  os.path.join(HERE, "names_agent.py"), str(self.port)] + agent_args)
        env = dict(os.environ, RUST_LOG="warn")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        for line in reversed(out.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"slipway run gave no result (exit {out.returncode}): {out.stderr[-500:]}")

    def close(self):
        peers.kill_group(self.echo, grace=0.2)
        peers.kill_group(self.dns, grace=0.2)
        peers.netns_del(self.ns)


def measure(binary, reps=3, seconds=3.0, say=print):
    """Run the reps; returns {figure: [values]}."""
    if not shutil.which("dnsmasq"):
        raise RuntimeError("dnsmasq is missing (apt-get install dnsmasq-base)")
    w = World()
    got = {}
    try:
        for rep in range(1, reps + 1):
            say(f"  names rep {rep}/{reps}: flows")
            r = w.run(binary, NAMES_POLICY,
                      [str(seconds), "cidr=198.51.100.1", "pinned=echo.bench.test", "dialed=198.51.100.9"],
                      timeout=12 * seconds + 30)
            for k in KINDS:
                got.setdefault(f"{k}_crr", []).append(r[k]["crr"]["per_second"])
                got.setdefault(f"{k}_p50", []).append(r[k]["rr"]["p50"])
                got.setdefault(f"{k}_p99", []).append(r[k]["rr"]["p99"])
                if r[k]["crr"]["errors"]:
                    say(f"  {k}: {r[k]['crr']['errors']} failed connections")
            # Alternate which resolver goes first.
            order = [("filtered", NAMES_POLICY), ("plain", PLAIN_POLICY)]
            for name, pol in (order if rep % 2 else order[::-1]):
                say(f"  names rep {rep}/{reps}: DNS, {name}")
                r = w.run(binary, pol, [str(seconds), "dns=echo.bench.test"], timeout=4 * seconds + 30)
                got.setdefault(f"dns_{name}", []).append(r["dns"]["per_second"])
    finally:
        w.close()
    return got


def markdown(got):
    med = {k: statistics.median(v) for k, v in got.items() if v and None not in v}
    ratio = lambda a, b: f"{med[a] / med[b]:.2f}x" if med.get(b) else "?"  # noqa: E731
    rows = [
        "| flow (same ClientHello first) | connect+echo+close /s | vs CIDR | target | RTT p50 / p99 µs |",
        "|---|---|---|---|---|",
    ]
    targets = {"cidr": "", "pinned": "≥ 0.9x", "dialed": "≥ 0.5x"}
    for k in KINDS:
        rows.append(f"| {k} | {med.get(k + '_crr', 0):.0f} | {ratio(k + '_crr', 'cidr_crr')} | {targets[k]} "
                    f"| {med.get(k + '_p50', 0):.0f} / {med.get(k + '_p99', 0):.0f} |")
    rows += [
        "",
        "| resolver (sequential A queries to 10.0.2.3) | queries/s | vs plain | target |",
        "|---|---|---|---|",
        f"| plain forwarding (no names) | {med.get('dns_plain', 0):.0f} | 1.00x | |",
        f"| filtering resolver | {med.get('dns_filtered', 0):.0f} | {ratio('dns_filtered', 'dns_plain')} | ≥ 0.9x |",
    ]
    return "\n".join(rows) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--slipway", default=os.path.join(ROOT, "target", "release", "slipway"))
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/names.py: needs root (ip netns add)")
    try:
        got = measure(os.path.abspath(a.slipway), a.reps, a.seconds)
    finally:
        peers.cleanup_all()
    print(markdown(got))
    print(json.dumps(got))


if __name__ == "__main__":
    main()
