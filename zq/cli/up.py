"""`zq up`: run this host's nodes of a topology in the foreground, with a live status view.

The main thread owns the child processes (zq.supervisor.ProcessGroup) and the screen; a watcher
thread owns the zq.Client, because a client call may block for a request timeout and Ctrl-C must
still act at once. The watcher creates the topology's topics once the cluster accepts them
(retrying a refusal that may pass, such as too few nodes yet) and then fetches `status()` about
once a second into a snapshot the main thread draws.

On a terminal the view is a rich Live panel; otherwise (a pipe, a test, a service manager) the
same events are plain lines on stdout: started, serving, topics created, node died, stopping,
stopped. With --json they are JSON lines {"time_ms", "event"}.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zq import errors
from zq.cli import render
from zq.supervisor import DEFAULT_LIMITS, ProcessGroup, SupervisorLimits, ensure_topics, log_tail, node_argv, \
    ping, port_in_use


@dataclass(slots=True)
class Snapshot:
    """What the watcher learnt last; read by the main thread to draw."""

    serving: bool = False
    topics_done: bool = False
    topics_note: str = "waiting for the cluster"
    status: dict | None = None
    status_error: str = ""
    status_ms: int = 0
    events: list[str] = field(default_factory=list)


class Watcher(threading.Thread):
    def __init__(self, topology: Any, addresses: dict[str, str], limits: SupervisorLimits) -> None:
        super().__init__(name="zq-up-watcher", daemon=True)
        self.topology = topology
        self.addresses = addresses
        self.limits = limits
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.snapshot = Snapshot()
        self._client: Any = None

    def run(self) -> None:
        try:
            self._wait_serving()
            while not self.stop_event.is_set():
                self._step()
                self.stop_event.wait(self.limits.status_refresh_ms / 1000)
        finally:
            if self._client is not None:
                try:
                    self._client.close()
                except Exception:  # closing on the way out: nothing left to report it to
                    pass

    def _wait_serving(self) -> None:
        while not self.stop_event.is_set():
            if all(ping(a, self.limits.ping_timeout_ms) is not None for a in self.addresses.values()):
                with self.lock:
                    self.snapshot.serving = True
                    self.snapshot.events.append(f"serving: {', '.join(self.addresses.values())}")
                return
            self.stop_event.wait(0.2)

    def _step(self) -> None:
        try:
            if self._client is None:
                from zq.cli.options import _client
                self._client = _client(",".join(self.addresses.values()), self.topology.cluster.name)
            if not self.snapshot.topics_done:
                self._create_topics()
            status = render.as_dict(self._client.status())
            with self.lock:
                self.snapshot.status, self.snapshot.status_error = status, ""
                self.snapshot.status_ms = int(time.time() * 1000)
        except errors.ZqError as error:
            with self.lock:
                self.snapshot.status_error = error.message

    def _create_topics(self) -> None:
        try:
            created, skipped = ensure_topics(self._client, self.topology.topics)
        except errors.ZqError as error:
            with self.lock:
                if error.retriable:
                    # Not enough nodes registered yet, metadata spreading: try again next round.
                    self.snapshot.topics_note = f"waiting to create topics: {error.message}"
                else:
                    # The cluster refused (a bad setting): say so once and keep serving what runs.
                    self.snapshot.topics_done = True
                    self.snapshot.topics_note = f"could not create the topology's topics: {error.message}"
                    self.snapshot.events.append(f"topics: {self.snapshot.topics_note}")
            return
        note = "; ".join(x for x in (f"created {', '.join(created)}" if created else "",
                                       f"already there: {', '.join(skipped)}" if skipped else "") if x)
        with self.lock:
            self.snapshot.topics_done = True
            self.snapshot.topics_note = note or "none in the topology"
            self.snapshot.events.append(f"topics: {self.snapshot.topics_note}")


def _load(topology_path: Path):
    from zq.topology import load_topology
    if not topology_path.exists():
        raise errors.TopologyError(f"{topology_path}: no such topology file (give one: zq up PATH)")
    topo = load_topology(topology_path)
    nodes = list(topo.nodes_on_this_host())
    if not nodes:
        hosts = ", ".join(sorted({n.host for n in topo.nodes}))
        raise errors.TopologyError(f"{topology_path} places no node on this host (its hosts: {hosts})")
    for node in nodes:
        if port_in_use(node.host, node.port):
            raise errors.Rejected(f"port {node.port} on {node.host} for node {node.name} is in use: "
                                  "is another zq up or node running?")
    return topo, nodes


def run_up(topology_path: Path, json_lines: bool = False, limits: SupervisorLimits = DEFAULT_LIMITS) -> int:
    topo, nodes = _load(topology_path)
    data_dir = Path(topo.cluster.data_dir)
    stop = threading.Event()
    reason: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        reason.append(signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    group = ProcessGroup(limits)
    addresses = {n.name: f"{n.host}:{n.port}" for n in nodes}
    view = View(topology_path, topo, data_dir, group, not sys.stdout.isatty(), json_lines)
    watcher = Watcher(topo, addresses, limits)
    try:
        for node in nodes:
            pid = group.spawn(node.name, node_argv(node.name, topology_path.resolve()),
                              data_dir / node.name / "node.log")
            view.event(f"started {node.name} (pid {pid}) on {addresses[node.name]}, "
                       f"log {data_dir / node.name / 'node.log'}")
        watcher.start()
        view.run(stop, watcher)
    finally:
        watcher.stop_event.set()
        view.event(f"stopping {len(group.core.live())} node(s)" + (f" on {reason[0]}" if reason else ""))
        group.close()
        for s, handler in old.items():
            signal.signal(s, handler)
        watcher.join(timeout=limits.ping_timeout_ms / 1000 + 1)
    died = group.core.died()
    for name in died:
        view.event(f"node {name} had exited with code {group.returncode(name)}; see {group.logs[name]}")
    view.event("stopped" + (f"; {len(died)} node(s) died on their own" if died else ""))
    return group.exit_code()


class View:
    """The live view on a terminal, or plain event lines elsewhere."""

    def __init__(self, path: Path, topo: Any, data_dir: Path, group: ProcessGroup, plain: bool,
                 json_lines: bool = False) -> None:
        self.path, self.topo, self.data_dir, self.group = path, topo, data_dir, group
        self.plain = plain or json_lines
        self.json_lines = json_lines
        self._printed = 0
        self._reported_dead: set[str] = set()
        self._events: list[str] = []

    def event(self, text: str) -> None:
        if self.json_lines:
            sys.stdout.write(json.dumps({"time_ms": int(time.time() * 1000), "event": text}) + "\n")
            sys.stdout.flush()
        elif self.plain:
            sys.stdout.write(f"zq up: {text}\n")
            sys.stdout.flush()
        self._events.append(text)

    def run(self, stop: threading.Event, watcher: Watcher) -> None:
        if self.plain:
            self._run_plain(stop, watcher)
        else:
            self._run_live(stop, watcher)

    def _tick(self, watcher: Watcher) -> bool:
        """Reap children and relay the watcher's events; False when every node is gone."""
        self.group.poll()
        for name in self.group.core.left():
            if name not in self._reported_dead:
                self._reported_dead.add(name)
                self.event(f"node {name} left the cluster (drained) and exited")
        for name in self.group.core.died():
            if name not in self._reported_dead:
                self._reported_dead.add(name)
                self.event(f"node {name} exited on its own with code {self.group.returncode(name)}; "
                           f"its log {self.group.logs[name]} ends: {log_tail(self.group.logs[name], 3)!r}")
        with watcher.lock:
            new = watcher.snapshot.events[self._printed:]
            self._printed = len(watcher.snapshot.events)
        for text in new:
            self.event(text)
        return bool(self.group.core.live())

    def _run_plain(self, stop: threading.Event, watcher: Watcher) -> None:
        while not stop.is_set():
            if not self._tick(watcher):
                self.event("every node has exited")
                return
            stop.wait(0.2)

    def _run_live(self, stop: threading.Event, watcher: Watcher) -> None:
        from rich.live import Live
        try:
            with Live(self._render(watcher), refresh_per_second=4, screen=False) as live:
                while not stop.is_set():
                    alive = self._tick(watcher)
                    live.update(self._render(watcher))
                    if not alive:
                        return
                    stop.wait(0.25)
        finally:
            self.plain = True  # the view is gone: what happens next (stopping, stopped) goes as lines

    def _render(self, watcher: Watcher):
        from rich.console import Group
        from rich.text import Text
        with watcher.lock:
            snap = Snapshot(watcher.snapshot.serving, watcher.snapshot.topics_done, watcher.snapshot.topics_note,
                            watcher.snapshot.status, watcher.snapshot.status_error, watcher.snapshot.status_ms)
        head = Text.from_markup(
            f"[bold]zq up[/] {self.path} · cluster [bold]{self.topo.cluster.name}[/] · "
            f"{'[green]serving[/]' if snap.serving else '[yellow]starting[/]'} · topics: {snap.topics_note}")
        processes = {}
        for name, child in self.group.core.children.items():
            proc = f"pid {child.pid}" if child.state == "running" else f"{child.state} ({child.returncode})"
            processes[name] = {"process": proc}
        status_nodes = (snap.status or {}).get("nodes") or []
        known = {n.get("name") for n in status_nodes}
        rows = list(status_nodes) + [{"name": n, "address": "-", "state": "?"} for n in processes if n not in known]
        parts = [head, render.nodes_table(rows, processes)]
        parts.append(render.partitions_table((snap.status or {}).get("partitions") or [], rows_max=40))
        footer = f"logs: {self.data_dir}/<node>/node.log · Ctrl-C stops every node"
        if snap.status_error:
            footer = f"[red]status: {snap.status_error}[/]\n" + footer
        for text in self._events[-3:]:
            footer += f"\n{text}"
        parts.append(Text.from_markup(footer))
        return Group(*parts)
