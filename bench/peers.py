"""The stacks under test, each as a session: a namespace served by one stack
process, with the agent (agent.py) running inside it. Every process and
namespace a session makes is registered with `cleanup` so that it goes away
also when the run is interrupted."""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
AGENT = os.path.join(HERE, "agent.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Every namespace and process group the run made, so `cleanup_all` can end them.
_namespaces = set()
_netns_serial = 0
_groups = {}


def register_group(proc):
    _groups[proc.pid] = proc


def kill_group(proc, grace=2.0):
    """SIGTERM the process group, then SIGKILL whatever is left after `grace`."""
    _groups.pop(proc.pid, None)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    # The leader is gone; anything else in its group (an iperf3 mid-run) goes too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def netns_add(name):
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    _namespaces.add(name)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)


def world_netns(name, addrs, *extra):
    """A namespace for a bench's own "internet": a veth pair (this kernel
    has no dummy links) whose d0 holds each of `addrs` as a /24, no route
    out; `extra` commands (split on spaces) run inside it afterwards."""
    netns_add(name)
    cmds = ["ip link add d0 type veth peer name d1", "ip link set d1 up", "ip link set d0 up"]
    cmds += [f"ip addr add {a}/24 dev d0" for a in addrs]
    for cmd in cmds + list(extra):
        subprocess.run(["ip", "netns", "exec", name] + cmd.split(), check=True, capture_output=True)


def world_dnsmasq(ns, listen, records):
    """dnsmasq in `ns` on `listen`, answering only `records` (name -> address),
    uncached; registered for clean-up."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, "dnsmasq", "-k", "--no-resolv", "--no-hosts",
         "--bind-interfaces", f"--listen-address={listen}", "--user=root", "--pid-file=",
         "--cache-size=0"] + [f"--host-record={n},{a}" for n, a in records.items()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    register_group(proc)
    return proc


def netns_del(name):
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    _namespaces.discard(name)


def cleanup_all():
    for proc in list(_groups.values()):
        kill_group(proc, grace=0.5)
    for name in list(_namespaces):
        netns_del(name)


def proc_stats(pid):
    """(CPU seconds user+system, peak RSS in KiB) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    # Fields after "comm)": state is [0], utime [11], stime [12].
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, hwm


class AgentError(Exception):
    pass


class Session:
    """One stack serving one namespace, and the agent inside it.

    Subclasses set `target` (where the host's loopback is reached from
    inside), and start the stack in `_start_stack`, returning the command
    that runs the agent inside the namespace."""

    name = "?"
    target = "10.0.2.2"

    def __init__(self, mtu, logdir, tag):
        self.mtu = mtu
        self.log_path = os.path.join(logdir, f"{tag}.log")
        self.log = open(self.log_path, "w")
        self.stack = None
        self.agent = None
        self._buf = b""
        self.netns = None

    # -- life cycle ----------------------------------------------------
    def start(self, timeout=15.0):
        agent_cmd = self._start_stack(timeout)
        if self.agent is None:
            self.agent = self._popen(agent_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        hello = self._read_line(timeout)
        if not hello.get("ok"):
            raise AgentError(f"agent did not start: {hello}")

    def _popen(self, cmd, **kw):
        kw.setdefault("stdout", self.log)
        kw.setdefault("stderr", self.log)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(cmd, start_new_session=True, **kw)
        register_group(proc)
        return proc

    def close(self):
        if self.agent is not None:
            try:
                self.agent.stdin.close()
            except OSError:
                pass
            try:
                self.agent.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
            kill_group(self.agent)
        if self.stack is not None and self.stack is not self.agent:
            kill_group(self.stack)
        if self.netns:
            netns_del(self.netns)
        self.log.close()

    def log_tail(self, lines=8):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:]).strip()
        except OSError:
            return ""

    # -- measurements --------------------------------------------------
    def stack_stats(self):
        return proc_stats(self.stack.pid) if self.stack is not None else None

    def call(self, limit, **cmd):
        if self.agent.poll() is not None:
            raise AgentError(f"agent (or its stack) exited with status {self.agent.returncode}")
        try:
            self.agent.stdin.write((json.dumps(cmd) + "\n").encode())
            self.agent.stdin.flush()
        except OSError as e:
            raise AgentError(f"agent gone: {e}")
        return self._read_line(limit)

    def _read_line(self, timeout):
        deadline = time.monotonic() + timeout
        fd = self.agent.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"no answer from the agent within {timeout:.0f}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AgentError(f"agent exited (status {self.agent.wait()}); log: {self.log_tail(4)}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


class Slipway(Session):
    """`slipway run` makes its own namespace; slipway is the parent of the agent."""

    name = "slipway"

    def __init__(self, mtu, logdir, tag, binary, offload=True):
        super().__init__(mtu, logdir, tag)
        self.binary = binary
        self.offload = offload
        if not offload:
            self.name = "slipway-plain"

    def command(self, *inner):
        return [self.binary, "run", "--map-host-loopback", self.target, "--mtu", str(self.mtu),
                "--offload", "true" if self.offload else "false", "--", *inner]

    def _start_stack(self, timeout):
        self.agent = self._popen(self.command(sys.executable, AGENT),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.stack = self.agent
        return None


class SlipwaySocks(Slipway):
    """slipway with every TCP flow through microsocks (SOCKS5, no login) on
    the host's 127.0.0.1: the guest's 10.0.2.2 is mapped to the host's
    loopback, so microsocks connects to the same servers the direct path
    reaches. The proxy's address is internal: the operator opens it
    (--allow-internal 127.0.0.1/32). Stack CPU counts slipway only."""

    name = "slipway-socks"

    def __init__(self, mtu, logdir, tag, binary):
        super().__init__(mtu, logdir, tag, binary)
        self.socks = None
        self.socks_port = None

    def command(self, *inner):
        return [self.binary, "run", "--map-host-loopback", self.target, "--mtu", str(self.mtu),
                "--allow-internal", "127.0.0.1/32",
                "--egress-proxy", f"socks5://127.0.0.1:{self.socks_port}", "--", *inner]

    def _start_stack(self, timeout):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.socks_port = s.getsockname()[1]
        self.socks = self._popen(["microsocks", "-i", "127.0.0.1", "-p", str(self.socks_port)])
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.socks_port), timeout=1).close()
                break
            except OSError:
                if self.socks.poll() is not None or time.monotonic() > deadline:
                    raise AgentError(f"microsocks did not start: {self.log_tail(4)}")
                time.sleep(0.02)
        return super()._start_stack(timeout)

    def close(self):
        super().close()
        if self.socks is not None:
            kill_group(self.socks)


class NamespacePeer(Session):
    """A peer that serves a namespace made by `ip netns add` (TESTBEDS.md)."""

    def _start_stack(self, timeout):
        # Unique per session: several peers' sessions are open at once in
        # the interleaved phase (pasta and pasta-2025 share a prefix).
        global _netns_serial
        _netns_serial += 1
        self.netns = f"slwb{os.getpid()}n{_netns_serial}"
        netns_add(self.netns)
        self.stack = self._popen(self.stack_command())
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(["ip", "-n", self.netns, "-4", "-o", "route", "show", "default"],
                                 capture_output=True, text=True).stdout
            if "tap0" in out:
                break
            if self.stack.poll() is not None:
                raise AgentError(f"{self.name} exited with status {self.stack.returncode}: {self.log_tail(4)}")
            if time.monotonic() > deadline:
                raise AgentError(f"{self.name}: tap0 has no default route after {timeout}s")
            time.sleep(0.05)
        return ["ip", "netns", "exec", self.netns, sys.executable, AGENT]


class Pasta(NamespacePeer):
    name = "pasta"

    def stack_command(self):
        return ["pasta", "-f", "-q", "-4", "--runas", "0", "-m", str(self.mtu), "--config-net",
                "-I", "tap0", "-a", "10.0.2.100", "-n", "24", "-g", self.target,
                "-t", "none", "-u", "none", "-T", "none", "-U", "none", "--netns", self.netns]


class Pasta2025(Pasta):
    """The current pasta, built from Debian trixie's source by bench/build-pasta."""

    name = "pasta-2025"
    binary = os.path.join(HERE, "peers-bin", "pasta-trixie")

    def stack_command(self):
        return [self.binary] + super().stack_command()[1:]


class Slirp4netns(NamespacePeer):
    name = "slirp4netns"

    def stack_command(self):
        return ["slirp4netns", "--configure", f"--mtu={self.mtu}", "--disable-dns",
                "--netns-type=path", f"/run/netns/{self.netns}", "tap0"]


class Loopback(Session):
    """The limit: the agent on the host itself, talking to 127.0.0.1; no stack process."""

    name = "loopback"
    target = "127.0.0.1"

    def _start_stack(self, timeout):
        return [sys.executable, AGENT]
