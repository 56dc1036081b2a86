"""SWIM membership's embeddable simulation layer: N real membership services
(zq.node.membership.MembershipService, the very code a node runs, each around its real `Membership`
core), over a simulated network, with the discovery (zeroconf) model and the message deliveries,
driven by a heap of timed events of its own (a zq/sim/world.py `EventHeap`, whose trace hash its host
shares). It injects no faults: a host (zq/sim/members.py's
`MembersSim`, the cluster simulator zq/sim/cluster.py) calls its fault methods and reads its views.

Theory of operation
-------------------
This is the world around the services, not a copy of them. Per node the layer is the service's
three hosts (zq.node.services): `MembershipHost` (`send_to_address` puts the message on the
simulated network, `now_ms` is the simulated clock, `learn_address` is checked: a node routes only
to members its detector holds alive or suspect at that address), `DiscoverySource` (a queue of
the zeroconf records that reached the node; `update_incarnation` announces the node's record
again) and `MembershipEvents` (every MemberChanged goes to the host's `on_change` hooks; refused
peer input is a Violation, since every simulated peer is honest). The service decides when it
drains discovery, pings seeds, ticks its core and how long a goodbye flushes; the layer only wakes
it at `next_due_ms()` (plus up to `LOOP_LATENCY_MS_MAX`, a busy loop's lateness) and when a
message arrives.

Discovery model: a (re)started node announces its record `(name, address, incarnation)` to every
running node it can reach (multicast, so partitions and loss apply), and its browse returns the
cached records of every other node, including the last record of a node that crashed (a stale
record: zeroconf caches it until its TTL runs out) or left without its goodbye arriving. A record
reaches a node's queue up to `DISCOVERY_DRAIN_MS` after it is sent; the service drains the queue.
The host may feed a stale record at any time with `stale_hint`. Such a record must never bring a
node back (the `on_hint` hooks see each drained record with the node's row before and after).

Faults a host can apply (all take the simulated time): `crash(name)` (the process is gone; its
address goes quiet), `restart(name)` (a new process: a new service with incarnation
`EPOCH_MS + now`, the wall-clock milliseconds zq/io/node.py uses), `pause(name)` / `resume(name)`
(SIGSTOP: timers stop, messages queue up to `PAUSED_INBOX_MAX`; on resume the inbox and the
overdue tick run in an order the seed picks), `leave(name)` (the service leaves; the process exits
when the service says its goodbye has flushed), `start(name)` (a late joiner's first start), and
network faults through the shared `SimNetwork` (`net.blocked` holds directed pairs, so a cut may
be one-way).

Embedding API (`MembershipLayer`):

    layer = MembershipLayer(names, rng, net, now_ms, config=SIM_MEMBERSHIP, seeds={name: [address]},
                            discovery=True)
    layer.start(name, now_ms)                 # start a node (its first start, or a late joiner)
    layer.next_due_ms() -> int | None         # when the next membership event is due
    layer.step() -> set[str]                  # run one event (the earliest); returns the nodes touched
    layer.run_until(now_ms, after_step=None)  # run every event due at or before now_ms
    layer.crash/restart/pause/resume/leave(name, now_ms)
    layer.stale_hint(observer, node, now_ms)  # feed a cached record of `node` to `observer`
    layer.reannounce_all(now_ms)              # every running node browses again (every cached record)
    layer.forget_record(name)                 # a goodbye reached the caches: no more records of `name`
    layer.running() -> list[str]              # nodes with a process (paused ones included)
    layer.view(observer) -> dict[str, MemberView]   # its service's table (what `zq status` shows), itself excluded
    layer.state_in(observer, node) -> State | None
    layer.dead_in(observer) -> list[str]      # the members `observer` holds DEAD (what an operator acts on)
    layer.on_change: list[Callable[[int, str, MemberChanged], None]]   # every MemberChanged, as it happens
    layer.on_hint / layer.on_learn            # each drained discovery record / each learn_address (checks)

A host schedules one event of its own at `next_due_ms()` and calls `run_until(now)` there (or runs
the layer's events in its own loop with `step()`), so both heaps advance on one clock.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from zq.core.membership import (DISCOVERY_DRAIN_MS, NODE_MEMBERSHIP, Ack, MemberChanged, MemberView, Membership,
                                MembershipConfig, Ping, PingReq, State)
from zq.node.membership import MembershipService
from zq.sim.members_checks import Violation
from zq.sim.network import SimNetwork
from zq.sim.world import EventHeap

EPOCH_MS = 1_700_000_000_000   # incarnations are wall-clock ms at start, as in zq/io/node.py
PAUSED_INBOX_MAX = 1_000       # messages queued for a stopped process (socket buffers); the rest are lost
LOOP_LATENCY_MS_MAX = 5        # the node's loop wakes its service this late at most after it is due
EVENTS_PER_RUN_UNTIL_MAX = 1_000_000  # a host's run_until never loops forever
SIM_MEMBERSHIP = NODE_MEMBERSHIP       # the timing real nodes use: the bounds below are about that
PORT = 7100


def address_of(name: str) -> str:
    return f"{name}:{PORT}"


@dataclass(frozen=True, slots=True)
class Record:
    """A zeroconf record as a browser resolves it (the fields of zq.io.discovery.Peer the service reads)."""
    node: str
    host: str
    port: int
    incarnation: int


class _Process:
    """One node process as its service sees the world: its MembershipHost, DiscoverySource and
    MembershipEvents (zq.node.services), all backed by the layer."""

    def __init__(self, layer: MembershipLayer, m: MemberNode) -> None:
        self.layer = layer
        self.m = m
        self.name = m.name
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.found: list[Record] = []       # zeroconf's queue of found peers
        self.drained: list[tuple[str, int, MemberView | None]] = []   # (node, incarnation, row before)

    # ---- MembershipHost
    def now_ms(self) -> int:
        return self.layer.now

    def send_to_address(self, name: str | None, address: str, msg: Any, *frames: bytes) -> None:
        self.layer._send(self.m, address, msg)

    def learn_address(self, name: str, address: str) -> None:
        for hook in self.layer.on_learn:
            hook(self.m.name, name, address)

    # ---- DiscoverySource
    def drain(self, max_peers: int) -> list[Record]:
        out, self.found = self.found[:max_peers], self.found[max_peers:]
        if out:
            rows = {v.node: v for v in self.m.core.members(self.layer.now)}
            self.drained += [(r.node, r.incarnation, rows.get(r.node)) for r in out]
            self.layer.counters["hints"] += len(out)
        return out

    def pending(self) -> bool:
        return bool(self.found)

    def update_incarnation(self, incarnation: int) -> None:
        self.layer._announce(self.m, incarnation)   # an Updated record

    # ---- MembershipEvents
    def member_changed(self, change: MemberChanged, own: bool) -> None:
        for hook in self.layer.on_change:
            hook(self.layer.now, self.m.name, change)
        if own and change.state is State.ALIVE:
            self.m.incarnation_last = max(self.m.incarnation_last, change.incarnation)

    def input_refused(self, what: str, source: str, error: Exception) -> None:
        # Every simulated peer is honest: refused input is a bug in the core or the service.
        raise Violation("protocol error between honest members", f"{self.m.name}: a {what} from {source}: {error}")


@dataclass(slots=True)
class MemberNode:
    """One node: its current process (a service and its world), if any."""
    name: str
    address: str
    seeds: list[str]
    service: MembershipService | None = None
    process: _Process | None = None
    life: int = 0                      # bumped on every start, so events of an old process are dropped
    paused: bool = False
    leaving: bool = False              # left, flushing its goodbye before it exits
    inbox: list = field(default_factory=list)
    tick_at: int = -1
    incarnation_last: int = -1         # the incarnation of its latest (or current) process
    starts: list = field(default_factory=list)   # the incarnation each of its processes started with

    @property
    def core(self) -> Membership | None:
        return None if self.service is None else self.service.core


class MembershipLayer:
    """The services, their world (network, discovery) and deliveries. See the module docstring."""

    def __init__(self, names: list[str], rng: random.Random, net: SimNetwork, now_ms: int,
                 config: MembershipConfig = SIM_MEMBERSHIP, seeds: dict[str, list[str]] | None = None,
                 discovery: bool = True) -> None:
        self.rng = rng
        self.net = net
        self.now = now_ms
        self.config = config
        self.discovery = discovery
        seeds = seeds or {}
        self.nodes = {n: MemberNode(n, address_of(n), list(seeds.get(n, []))) for n in sorted(names)}
        self.by_address = {m.address: n for n, m in self.nodes.items()}
        self.records: dict[str, tuple[str, int]] = {}   # zeroconf caches: name -> (address, incarnation)
        self.events = EventHeap()   # its trace hash covers every event of the layer (and its host's)
        self.on_change: list[Callable[[int, str, MemberChanged], None]] = []
        self.on_hint: list[Callable[[str, str, int, MemberView | None, MemberView | None], None]] = []
        self.on_learn: list[Callable[[str, str, str], None]] = []
        self.counters = {"messages": 0, "delivered": 0, "inbox_dropped": 0, "hints": 0}
        self._touched: set[str] = set()

    # ---------------------------------------------------------------- queries

    def running(self) -> list[str]:
        return [n for n, m in self.nodes.items() if m.service is not None]

    def view(self, observer: str) -> dict[str, MemberView]:
        service = self.nodes[observer].service
        assert service is not None, f"{observer} is not running"
        return service.table()

    def state_in(self, observer: str, node: str) -> State | None:
        core = self.nodes[observer].core
        return None if core is None else core.state_of(node)

    def dead_in(self, observer: str) -> list[str]:
        return [n for n, v in self.view(observer).items() if v.state is State.DEAD]

    def next_due_ms(self) -> int | None:
        return self.events.next_ms()

    # ---------------------------------------------------------------- scheduling

    def at(self, time_ms: int, kind: str, *args) -> None:
        self.events.push(time_ms, kind, args)

    def step(self) -> set[str]:
        """Run the earliest event. Returns the nodes whose core it touched (for the checks)."""
        time_ms, kind, args = self.events.pop()
        self.now = max(self.now, time_ms)
        self.events.record(time_ms, kind, _trace_args(args))
        self._touched = set()
        getattr(self, "ev_" + kind)(*args)
        return self._touched

    def run_until(self, now_ms: int, after_step: Callable[[set[str]], None] | None = None) -> None:
        for _ in range(EVENTS_PER_RUN_UNTIL_MAX):
            if not self.events or self.events.next_ms() > now_ms:
                break
            touched = self.step()
            if after_step is not None:
                after_step(touched)
        self.now = max(self.now, now_ms)

    # ---------------------------------------------------------------- lifecycle (the host's faults)

    def start(self, name: str, now_ms: int) -> None:
        """Start a process for `name`: its first start, a late join, or a restart after a crash or leave."""
        self.now = max(self.now, now_ms)
        m = self.nodes[name]
        assert m.service is None, f"{name} is running"
        m.life += 1
        m.paused = m.leaving = False
        m.inbox = []
        m.tick_at = -1
        incarnation = EPOCH_MS + self.now   # as zq/io/node.py: the wall clock, nothing remembered
        m.incarnation_last = max(m.incarnation_last, incarnation)
        m.starts.append(incarnation)
        m.process = process = _Process(self, m)
        m.service = MembershipService(process, m.address, incarnation, m.seeds, random.Random(self.rng.random()),
                                      self.config, discovery=process if self.discovery else None, events=process)
        if self.discovery:   # Discovery.start: register our record, browse everyone's
            self._announce(m, incarnation)
            self._browse(m)
        self._after(m)

    def crash(self, name: str, now_ms: int) -> None:
        self.now = max(self.now, now_ms)
        m = self.nodes[name]
        m.service = m.process = None
        m.paused = m.leaving = False
        m.inbox = []

    restart = start

    def pause(self, name: str, now_ms: int) -> None:
        self.now = max(self.now, now_ms)
        m = self.nodes[name]
        assert m.service is not None and not m.paused
        m.paused = True

    def resume(self, name: str, now_ms: int) -> None:
        """SIGCONT: the overdue tick and the queued messages run, in an order the seed picks."""
        self.now = max(self.now, now_ms)
        m = self.nodes[name]
        if m.service is None or not m.paused:
            return
        m.paused = False
        m.tick_at = -1       # the wake-up it slept through is gone
        inbox, m.inbox = m.inbox, []
        tick_first = self.rng.random() < 0.5
        if tick_first:
            m.service.tick(self.now)
            self._drained(m)
        for msg in inbox:
            if m.service is not None:
                self.counters["delivered"] += 1
                m.service.on_message(msg)
        if not tick_first and m.service is not None:
            m.service.tick(self.now)
        self._after(m)

    def leave(self, name: str, now_ms: int) -> None:
        self.now = max(self.now, now_ms)
        m = self.nodes[name]
        assert m.service is not None and not m.paused
        m.leaving = True
        flushed_ms = m.service.leave(self.now)
        self._after(m)
        self.at(flushed_ms, "exit", name, m.life)

    def stale_hint(self, observer: str, node: str, now_ms: int) -> bool:
        """Feed `observer` the cached zeroconf record of `node` (stale if `node` is down). False if none."""
        self.now = max(self.now, now_ms)
        record = self.records.get(node)
        if record is None or self.nodes[observer].service is None or observer == node:
            return False
        self.at(self.now + self.rng.randint(1, DISCOVERY_DRAIN_MS), "hint", observer, self.nodes[observer].life,
                node, record[0], record[1])
        return True

    def reannounce_all(self, now_ms: int) -> None:
        """A browse's periodic query after a heal: every running node hears every cached record."""
        self.now = max(self.now, now_ms)
        if not self.discovery:
            return
        for name in self.running():
            self._browse(self.nodes[name])

    def forget_record(self, name: str) -> None:
        """A goodbye that arrived: caches drop the record."""
        self.records.pop(name, None)

    # ---------------------------------------------------------------- events

    def ev_deliver(self, dst: str, msg) -> None:
        m = self.nodes[dst]
        if m.service is None:
            return  # nobody listens at that address now
        if m.paused:
            if len(m.inbox) < PAUSED_INBOX_MAX:
                m.inbox.append(msg)
            else:
                self.counters["inbox_dropped"] += 1
            return
        self.counters["delivered"] += 1
        m.service.on_message(msg)
        self._after(m)

    def ev_tick(self, name: str, life: int, due: int) -> None:
        m = self.nodes[name]
        if m.service is None or m.life != life or m.tick_at != due or m.paused:
            return  # a paused process is woken when it resumes
        m.tick_at = -1
        m.service.tick(self.now)
        self._after(m)

    def ev_hint(self, observer: str, life: int, node: str, address: str, incarnation: int) -> None:
        """A record reaches `observer`'s zeroconf queue (a stopped process's too: it drains on resume)."""
        m = self.nodes[observer]
        if m.service is None or m.life != life or not self.discovery:
            return
        host, _, port = address.rpartition(":")
        m.process.found.append(Record(node, host, int(port), incarnation))
        self._wake(m)

    def ev_exit(self, name: str, life: int) -> None:
        m = self.nodes[name]
        if m.service is not None and m.life == life and m.leaving:
            self.crash(name, self.now)

    # ---------------------------------------------------------------- the world around a service

    def _after(self, m: MemberNode) -> None:
        """After the service ran: the checks' hooks, the incarnation we track, its next wake-up."""
        self._touched.add(m.name)
        if m.service is None:
            return
        self._drained(m)
        m.incarnation_last = max(m.incarnation_last, m.core.incarnation)
        self._wake(m)

    def _drained(self, m: MemberNode) -> None:
        """The `on_hint` hooks: each record the service drained in its last call, its row before and after."""
        process = m.process
        if process.drained:
            drained, process.drained = process.drained, []
            rows = {v.node: v for v in m.core.members(self.now)}
            for node, incarnation, before in drained:
                for hook in self.on_hint:
                    hook(m.name, node, incarnation, before, rows.get(node))

    def _wake(self, m: MemberNode) -> None:
        due = m.service.next_due_ms()
        if due is None or m.paused:
            return
        due = max(self.now, due)
        if due != m.tick_at:
            m.tick_at = due
            self.at(due + self.rng.randint(0, LOOP_LATENCY_MS_MAX), "tick", m.name, m.life, due)

    def _send(self, m: MemberNode, address: str, msg: Any) -> None:
        self.counters["messages"] += 1
        dst = self.by_address.get(address)
        if dst is None or dst == m.name:
            return
        for t in self.net.deliveries(self.now, m.name, dst, False):
            self.at(t, "deliver", dst, msg)

    def _announce(self, m: MemberNode, incarnation: int) -> None:
        self.records[m.name] = (m.address, incarnation)
        for other in self.running():
            if other == m.name:
                continue
            for t in self.net.deliveries(self.now, m.name, other, True):
                self.at(t + self.rng.randint(1, DISCOVERY_DRAIN_MS), "hint", other, self.nodes[other].life,
                        m.name, m.address, incarnation)
                break  # mDNS dedupes a repeated answer

    def _browse(self, m: MemberNode) -> None:
        for other, (address, incarnation) in sorted(self.records.items()):
            if other != m.name:
                self.at(self.now + self.rng.randint(1, DISCOVERY_DRAIN_MS), "hint", m.name, m.life, other,
                        address, incarnation)


def _trace_args(args: tuple) -> str:
    out = []
    for a in args:
        if isinstance(a, (int, str)):
            out.append(str(a))
        elif isinstance(a, (Ping, Ack, PingReq)):
            out.append(f"{type(a).__name__}:{a.sender}:{a.sender_incarnation}:{a.target}:{a.seq}:{len(a.updates)}")
        else:
            out.append(type(a).__name__)
    return ",".join(out)
