"""A virtual LAN for tests: Linux network namespaces joined by a bridge, made and removed as root.

    with Lan(hosts=3) as lan:                 # namespaces zqt-<pid>-<rand>-h0..h2, addresses 10.77.0.1..3
        proc = lan.popen(0, [sys.executable, "-m", "zq.io.discovery", ...])
        lan.set_link(1, up=False)            # cut host 1 off the LAN (a network partition)

Nothing touches the host's own network: the bridge lives in a namespace of its own, each host
namespace reaches it by a veth pair made directly inside the namespaces, the 10.77.0.0/24
addresses exist only inside them, and each host namespace has its loopback up with multicast on.
`close()` (also on any exception, and from `cleanup_stale()` for namespaces a killed test run left
behind) kills the processes started here and deletes every namespace, which removes its links.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from typing import Any

PREFIX = "zqt"
SUBNET = "10.77.0"           # hosts are SUBNET.1 .. SUBNET.<hosts>, /24
HOSTS_MAX = 50               # a test LAN is small; bounds the setup loop
STOP_TIMEOUT_S = 5.0
ROOT_REASON = "needs root for network namespaces"


def is_root() -> bool:
    return os.geteuid() == 0


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_stale() -> list[str]:
    """Delete zqt-<pid>-* namespaces whose creating process is gone (a test run killed mid-way)."""
    removed = []
    for ns in _namespaces():
        parts = ns.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX and parts[1].isdigit() and not os.path.exists(f"/proc/{parts[1]}"):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
            removed.append(ns)
    return removed


class Lan:
    def __init__(self, hosts: int) -> None:
        assert 0 < hosts <= HOSTS_MAX
        self.hosts = hosts
        self.tag = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        self.bridge_ns = f"{self.tag}-br"
        self.names = [f"{self.tag}-h{i}" for i in range(hosts)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(hosts)]
        self._made: list[str] = []
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Lan:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        if not is_root():
            raise PermissionError(ROOT_REASON)
        cleanup_stale()
        _ip("netns", "add", self.bridge_ns)
        self._made.append(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            _ip("netns", "add", ns)
            self._made.append(ns)
            # The veth pair is born inside the namespaces: it never appears on the host.
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.bridge_ns, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "lo", "multicast", "on")  # so 127.0.0.1 nodes can use zeroconf too

    def popen(self, host: int, argv: list[str], **kw: Any) -> subprocess.Popen:
        """Start argv inside host's namespace; it is killed at close() if still running."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        env = dict(kw.pop("env", os.environ))
        env.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[host], *argv], env=env, **kw)
        self._procs.append(proc)
        return proc

    def run(self, host: int, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
        proc = self.popen(host, argv)
        out, err = proc.communicate(timeout=timeout_s)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def set_link(self, host: int, up: bool) -> None:
        _ip("-n", self.bridge_ns, "link", "set", f"p{host}", "up" if up else "down")

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=STOP_TIMEOUT_S)
            except Exception:
                pass
        self._procs.clear()
        errors = []
        for ns in reversed(self._made):
            result = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=10)
            if result.returncode != 0:
                errors.append(f"{ns}: {result.stderr.strip()}")
        self._made.clear()
        if errors:
            raise RuntimeError("could not delete network namespaces: " + "; ".join(errors))
