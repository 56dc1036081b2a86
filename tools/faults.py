#!/usr/bin/env python3
"""Operator fault injector: kill, pause, resume or cut off one node of a running zq cluster.

    python tools/faults.py list      TOPOLOGY                   # nodes, their pids and process states
    python tools/faults.py kill      TOPOLOGY NODE [--signal TERM]   # SIGKILL by default
    python tools/faults.py pause     TOPOLOGY NODE [--for 5]    # SIGSTOP; with --for, SIGCONT after 5 s
    python tools/faults.py resume    TOPOLOGY NODE              # SIGCONT
    python tools/faults.py partition TOPOLOGY NODE [--for 5]    # take the node's LAN link down (netns only)
    python tools/faults.py heal      TOPOLOGY NODE              # bring it back up

TOPOLOGY is the topology file the nodes were started with (`zq node start --name N --topology F`);
a `zq.testing.LocalCluster` writes its own as `<data_dir>/topology.toml`. A node is found by its
command line: the one process whose arguments are exactly `... node start --name NODE --topology
TOPOLOGY ...` (the path compared after resolving it), so nothing else on the machine is touched,
and an ambiguous or missing match is an error, never a guess.

`partition`/`heal` work on clusters in the network namespaces of `tests/netns.py` (`Lan`): the
node's process says which namespace it runs in (`ip netns identify PID`: `<tag>-h<i>`), and the
link taken down is that host's port `p<i>` on the bridge in `<tag>-br`, exactly as
`Lan.set_link(i, up)` does. Nodes on 127.0.0.1 share the loopback and cannot be cut off this way;
pause one instead (a paused process answers nothing, which peers cannot tell from a partition).
Needs root for namespaces; signals need the right to signal the node's process.

Exit status: 0 done, 1 the node or its namespace was not found (or was ambiguous), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zq.errors import ZqError  # noqa: E402
from zq.topology import load_topology  # noqa: E402

NAMESPACE_PREFIX = "zqt-"     # tests/netns.py's Lan names its namespaces zqt-<pid>-<hex>-h<i> / -br
IP_TIMEOUT_S = 10
HOLD_S_MAX = 3_600            # --for: a fault is held at most an hour, then undone


class FaultError(Exception):
    """The node, its process or its namespace cannot be found: one sentence for the operator."""


# ---------------------------------------------------------------------------- processes

def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None  # gone, or not ours to read
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def _same_path(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


def is_node_process(argv: list[str], name: str, topology: Path) -> bool:
    """Whether argv runs `zq node start` for node `name` of `topology` (and is not `ip netns exec`
    wrapping it: the signal must reach the node itself)."""
    if not argv or os.path.basename(argv[0]) == "ip":
        return False
    try:
        i = argv.index("node")
    except ValueError:
        return False
    if argv[i + 1:i + 2] != ["start"]:
        return False
    rest = argv[i + 2:]
    pairs = {rest[k]: rest[k + 1] for k in range(len(rest) - 1) if rest[k].startswith("--")}
    return pairs.get("--name") == name and _same_path(pairs.get("--topology", ""), topology)


def find_node_pid(topology: Path, name: str) -> int:
    """The pid of node `name` of `topology`; FaultError if none or more than one runs."""
    found = []
    for entry in sorted(os.listdir("/proc")):
        if entry.isdigit():
            argv = _cmdline(int(entry))
            if argv and is_node_process(argv, name, topology):
                found.append(int(entry))
    if not found:
        raise FaultError(f"no running process is node {name} of {topology}; is it started (or already killed)?")
    if len(found) > 1:
        raise FaultError(f"{len(found)} processes claim to be node {name} of {topology} ({found}); "
                         "signal the right one by hand")
    return found[0]


def process_state(pid: int) -> str:
    """The kernel's one-letter state (R, S, T for stopped, Z, ...) or '-' if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "-"
    return stat.rsplit(")", 1)[1].split()[0]


def signal_node(topology: Path, name: str, sig: int) -> int:
    pid = find_node_pid(topology, name)
    os.kill(pid, sig)
    return pid


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process_state(pid) in ("-", "Z"):
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------- network namespaces

def _ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if result.returncode != 0:
        raise FaultError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


def lan_port_of(pid: int) -> tuple[str, str]:
    """(bridge namespace, bridge port) of the Lan host whose namespace runs process `pid`:
    ("<tag>-br", "p<i>"). The process itself says where it lives (`ip netns identify`), so a
    namespace of someone else's that merely holds the same address is never touched."""
    ns = _ip("netns", "identify", str(pid)).strip()
    tag, sep, index = ns.rpartition("-h")
    if not (ns.startswith(NAMESPACE_PREFIX) and sep and index.isdigit()):
        raise FaultError(f"process {pid} does not run in a {NAMESPACE_PREFIX}*-h<i> network namespace "
                         f"({ns or 'it runs in the host network'}): `partition` works on clusters in "
                         "tests/netns.py namespaces; pause a node on 127.0.0.1 instead")
    bridge_ns = f"{tag}-br"
    if bridge_ns not in _ip("netns", "list").split():
        raise FaultError(f"namespace {ns} has no bridge namespace {bridge_ns}")
    return bridge_ns, f"p{index}"


def set_node_link(topology: Path, name: str, up: bool) -> tuple[str, str]:
    bridge_ns, port = lan_port_of(find_node_pid(topology, name))
    _ip("-n", bridge_ns, "link", "set", port, "up" if up else "down")
    return bridge_ns, port


# ---------------------------------------------------------------------------- commands

def list_nodes(topology: Path) -> list[dict]:
    rows = []
    for node in load_topology(topology).nodes:
        try:
            pid = find_node_pid(topology, node.name)
            state = process_state(pid)
        except FaultError:
            pid, state = None, "-"
        rows.append({"name": node.name, "address": f"{node.host}:{node.port}", "pid": pid,
                     "state": {"T": "paused", "-": "not running", "Z": "exited"}.get(state, "running")})
    return rows


def _hold(seconds: float | None, undo, what: str) -> None:
    if seconds is None:
        return
    seconds = min(max(0.0, seconds), HOLD_S_MAX)
    print(f"holding for {seconds:g} s, then {what} (Ctrl-C undoes it at once)", flush=True)
    try:
        time.sleep(seconds)
    finally:
        undo()
        print(what + ": done", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Kill, pause, resume or partition one node of a zq cluster.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="the topology's nodes, with pid and process state")
    p_list.add_argument("topology", type=Path)
    p_list.add_argument("--json", action="store_true")
    for command, text in (("kill", "send a signal (SIGKILL by default) and wait until it is gone"),
                          ("pause", "SIGSTOP"), ("resume", "SIGCONT"),
                          ("partition", "take the node's LAN link down (netns clusters)"),
                          ("heal", "bring the node's LAN link back up")):
        p = sub.add_parser(command, help=text)
        p.add_argument("topology", type=Path)
        p.add_argument("node")
        if command == "kill":
            p.add_argument("--signal", default="KILL", help="signal name: KILL (default), TERM, INT, ...")
        if command in ("pause", "partition"):
            p.add_argument("--for", dest="hold_s", type=float, metavar="SECONDS",
                           help="undo the fault after this long (at most an hour)")
    args = parser.parse_args(argv)
    topology: Path = args.topology
    try:
        if args.command == "list":
            rows = list_nodes(topology)
            if args.json:
                print(json.dumps({"nodes": rows}))
            else:
                for r in rows:
                    print(f"{r['name']:<12} {r['address']:<22} {str(r['pid'] or '-'):>8}  {r['state']}")
        elif args.command == "kill":
            sig = signal.Signals["SIG" + args.signal.upper().removeprefix("SIG")]
            pid = signal_node(topology, args.node, sig)
            gone = wait_gone(pid, 10.0) if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT) else False
            print(f"{args.node} (pid {pid}): sent {sig.name}" + (", exited" if gone else ""))
        elif args.command == "pause":
            pid = signal_node(topology, args.node, signal.SIGSTOP)
            print(f"{args.node} (pid {pid}): paused", flush=True)
            _hold(args.hold_s, lambda: os.kill(pid, signal.SIGCONT), f"{args.node} resumed")
        elif args.command == "resume":
            pid = signal_node(topology, args.node, signal.SIGCONT)
            print(f"{args.node} (pid {pid}): resumed")
        elif args.command == "partition":
            ns, port = set_node_link(topology, args.node, up=False)
            print(f"{args.node}: link {port} in {ns} down", flush=True)
            _hold(args.hold_s, lambda: set_node_link(topology, args.node, up=True), f"{args.node} healed")
        elif args.command == "heal":
            ns, port = set_node_link(topology, args.node, up=True)
            print(f"{args.node}: link {port} in {ns} up")
    except KeyError as e:
        print(f"unknown signal {e}", file=sys.stderr)
        return 2
    except (FaultError, ZqError) as e:
        print(getattr(e, "message", None) or str(e), file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"not allowed: {e}; signalling a node or changing links may need root", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
