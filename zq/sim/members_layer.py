"""SWIM membership's embeddable simulation layer: N real `Membership` cores, each behind a shell
that does what zq/io/membership.py does, over a simulated network, with the discovery
(zeroconf) model and the message deliveries, driven by a heap of timed events of its own. It
injects no faults: a host (zq/sim/members.py's `MembersSim`, the cluster simulator
zq/sim/cluster.py) calls its fault methods and reads its views.

Theory of operation
-------------------
The shell, per node, as in zq/io/membership.py: a peer message goes to `core.on_message`; the core
is ticked when its `next_deadline_ms()` is due (plus a little loop latency); every `SEED_RETRY_MS`
the seeds that no ALIVE or SUSPECT member holds are pinged with `core.join`; discovery records
are handed to `core.on_discovered` at the next drain (every `DISCOVERY_DRAIN_MS`). Our own
incarnation changing (a refutation) re-announces our zeroconf record. A graceful leave calls
`core.leave`, keeps serving for `LEAVE_FLUSH_MS`, then the process exits.

Discovery model: a (re)started node announces its record `(name, address, incarnation)` to every
running node it can reach (multicast, so partitions and loss apply), and its browse returns the
cached records of every other node, including the last record of a node that crashed (a stale
record: zeroconf caches it until its TTL runs out) or left without its goodbye arriving. The host
may feed a stale record at any time with `stale_hint`. Such a record must never bring a node back.

Faults a host can apply (all take the simulated time): `crash(name)` (the process is gone; its
address goes quiet), `restart(name)` (a new process: a new core with incarnation `EPOCH_MS + now`,
the wall-clock milliseconds zq/io/node.py uses), `pause(name)` / `resume(name)` (SIGSTOP: timers
stop, messages queue up to `PAUSED_INBOX_MAX`; on resume the inbox and the overdue tick run in an
order the seed picks), `leave(name)`, `start(name)` (a late joiner's first start), and network
faults through the shared `SimNetwork` (`net.blocked` holds directed pairs, so a cut may be one-way).

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
    layer.view(observer) -> dict[str, MemberView]   # its table, itself excluded
    layer.state_in(observer, node) -> State | None
    layer.dead_in(observer) -> list[str]      # the members `observer` holds DEAD (what an operator acts on)
    layer.on_change: list[Callable[[int, str, MemberChanged], None]]   # every MemberChanged, as it happens

A host schedules one event of its own at `next_due_ms()` and calls `run_until(now)` there (or runs
the layer's events in its own loop with `step()`), so both heaps advance on one clock.
"""
from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field
from typing import Callable

from zq.core.membership import (Ack, MemberChanged, MemberView, Membership, MembershipConfig, Ping, PingReq,
                                Send, State)
from zq.errors import ProtocolError
from zq.core.membership import DISCOVERY_DRAIN_MS, LEAVE_FLUSH_MS, NODE_MEMBERSHIP, SEED_RETRY_MS, SEEDS_PER_PASS_MAX
from zq.sim.members_checks import Violation
from zq.sim.network import SimNetwork

EPOCH_MS = 1_700_000_000_000   # incarnations are wall-clock ms at start, as in zq/io/node.py
PAUSED_INBOX_MAX = 1_000       # messages queued for a stopped process (socket buffers); the rest are lost
LOOP_LATENCY_MS_MAX = 5        # a shell ticks its core this late at most after the core's deadline
EVENTS_PER_RUN_UNTIL_MAX = 1_000_000  # a host's run_until never loops forever
SIM_MEMBERSHIP = NODE_MEMBERSHIP       # the timing real nodes use: the bounds below are about that
PORT = 7100


def address_of(name: str) -> str:
    return f"{name}:{PORT}"


@dataclass(slots=True)
class MemberNode:
    """One node's process as the shell sees it."""
    name: str
    address: str
    seeds: list[str]
    core: Membership | None = None
    life: int = 0                      # bumped on every start, so events of an old process are dropped
    paused: bool = False
    leaving: bool = False              # left, flushing its goodbye before it exits
    inbox: list = field(default_factory=list)
    tick_at: int = -1
    incarnation_last: int = -1         # the incarnation of its latest (or current) process
    starts: list = field(default_factory=list)   # the incarnation each of its processes started with


class MembershipLayer:
    """The cores, shells, discovery and deliveries. See the module docstring."""

    def __init__(self, names: list[str], rng: random.Random, net: SimNetwork, now_ms: int,
                 config: MembershipConfig = SIM_MEMBERSHIP, seeds: dict[str, list[str]] | None = None,
                 discovery: bool = True) -> None:
        self.rng = rng
        self.net = net
        self.now = now_ms
        self.config = config
        self.discovery = discovery
        seeds = seeds or {}
        self.nodes = {n: MemberNode(n, address_of(n), [s for s in seeds.get(n, []) if s != address_of(n)])
                      for n in sorted(names)}
        self.by_address = {m.address: n for n, m in self.nodes.items()}
        self.records: dict[str, tuple[str, int]] = {}   # zeroconf caches: name -> (address, incarnation)
        self.heap: list = []
        self.seq = 0
        self.on_change: list[Callable[[int, str, MemberChanged], None]] = []
        self.on_hint: list[Callable[[str, str, int, MemberView | None, MemberView | None], None]] = []
        self.trace = hashlib.blake2b(digest_size=16)
        self.counters = {"messages": 0, "delivered": 0, "inbox_dropped": 0, "hints": 0, "stale_hints": 0}
        self._touched: set[str] = set()

    # ---------------------------------------------------------------- queries

    def running(self) -> list[str]:
        return [n for n, m in self.nodes.items() if m.core is not None]

    def view(self, observer: str) -> dict[str, MemberView]:
        core = self.nodes[observer].core
        assert core is not None, f"{observer} is not running"
        return {v.node: v for v in core.members(self.now) if v.node != observer}

    def state_in(self, observer: str, node: str) -> State | None:
        core = self.nodes[observer].core
        return None if core is None else core.state_of(node)

    def dead_in(self, observer: str) -> list[str]:
        return [n for n, v in self.view(observer).items() if v.state is State.DEAD]

    def next_due_ms(self) -> int | None:
        return self.heap[0][0] if self.heap else None

    # ---------------------------------------------------------------- scheduling

    def at(self, time_ms: int, kind: str, *args) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (time_ms, self.seq, kind, args))

    def step(self) -> set[str]:
        """Run the earliest event. Returns the nodes whose core it touched (for the checks)."""
        time_ms, _seq, kind, args = heapq.heappop(self.heap)
        self.now = max(self.now, time_ms)
        self.trace.update(f"{time_ms}|{kind}|{_trace_args(args)};".encode())
        self._touched = set()
        getattr(self, "ev_" + kind)(*args)
        return self._touched

    def run_until(self, now_ms: int, after_step: Callable[[set[str]], None] | None = None) -> None:
        for _ in range(EVENTS_PER_RUN_UNTIL_MAX):
            if not self.heap or self.heap[0][0] > now_ms:
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
        assert m.core is None, f"{name} is running"
        m.life += 1
        m.paused = m.leaving = False
        m.inbox = []
        m.tick_at = -1
        incarnation = EPOCH_MS + self.now   # as zq/io/node.py: the wall clock, nothing remembered
        m.incarnation_last = max(m.incarnation_last, incarnation)
        m.starts.append(incarnation)
        m.core = Membership(name, m.address, incarnation, random.Random(self.rng.random()), self.now, self.config)
        self._touched.add(name)
        self._schedule_tick(m)
        if m.seeds:
            self.at(self.now, "seeds", name, m.life)
        if self.discovery:
            self._announce(m)
            self._browse(m)

    def crash(self, name: str, now_ms: int) -> None:
        self.now = max(self.now, now_ms)
        m = self.nodes[name]
        m.core = None
        m.paused = m.leaving = False
        m.inbox = []

    restart = start

    def pause(self, name: str, now_ms: int) -> None:
        self.now = max(self.now, now_ms)
        m = self.nodes[name]
        assert m.core is not None and not m.paused
        m.paused = True

    def resume(self, name: str, now_ms: int) -> None:
        """SIGCONT: the overdue tick and the queued messages run, in an order the seed picks."""
        self.now = max(self.now, now_ms)
        m = self.nodes[name]
        if m.core is None or not m.paused:
            return
        m.paused = False
        inbox, m.inbox = m.inbox, []
        tick_first = self.rng.random() < 0.5
        if tick_first:
            self._tick(m)
        for msg in inbox:
            if m.core is not None:
                self._deliver(m, msg)
        if not tick_first and m.core is not None:
            self._tick(m)
        if m.core is not None and m.seeds:
            self.at(self.now, "seeds", name, m.life)

    def leave(self, name: str, now_ms: int) -> None:
        self.now = max(self.now, now_ms)
        m = self.nodes[name]
        assert m.core is not None and not m.paused
        m.leaving = True
        self._apply(m, m.core.leave(self.now))
        self.at(self.now + LEAVE_FLUSH_MS, "exit", name, m.life)

    def stale_hint(self, observer: str, node: str, now_ms: int) -> bool:
        """Feed `observer` the cached zeroconf record of `node` (stale if `node` is down). False if none."""
        self.now = max(self.now, now_ms)
        record = self.records.get(node)
        if record is None or self.nodes[observer].core is None or observer == node:
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
        if m.core is None:
            return  # nobody listens at that address now
        if m.paused:
            if len(m.inbox) < PAUSED_INBOX_MAX:
                m.inbox.append(msg)
            else:
                self.counters["inbox_dropped"] += 1
            return
        self._deliver(m, msg)

    def ev_tick(self, name: str, life: int, due: int) -> None:
        m = self.nodes[name]
        if m.core is None or m.life != life or m.tick_at != due or m.paused:
            return  # a paused process ticks when it resumes
        self._tick(m)

    def ev_seeds(self, name: str, life: int) -> None:
        """zq/io/membership.py `_maybe_join_seeds`: ping every seed no live member answers for."""
        m = self.nodes[name]
        if m.core is None or m.life != life or m.paused or m.leaving:
            return
        live = {v.address for v in m.core.members(self.now)
                if v.node != name and v.state in (State.ALIVE, State.SUSPECT)}
        lonely = [s for s in m.seeds if s not in live][:SEEDS_PER_PASS_MAX]
        if lonely:
            self._apply(m, m.core.join(lonely, self.now))
        self.at(self.now + SEED_RETRY_MS, "seeds", name, life)

    def ev_hint(self, observer: str, life: int, node: str, address: str, incarnation: int) -> None:
        m = self.nodes[observer]
        if m.core is None or m.life != life:
            return
        if m.paused:
            self.at(self.now + DISCOVERY_DRAIN_MS, "hint", observer, life, node, address, incarnation)
            return  # zeroconf's queue waits for the loop to drain it
        self.counters["hints"] += 1
        before = m.core.members(self.now)
        self._apply(m, m.core.on_discovered(node, address, incarnation, self.now))
        after = m.core.members(self.now)
        for hook in self.on_hint:
            hook(observer, node, incarnation, _row(before, node), _row(after, node))

    def ev_exit(self, name: str, life: int) -> None:
        m = self.nodes[name]
        if m.core is not None and m.life == life and m.leaving:
            self.crash(name, self.now)

    # ---------------------------------------------------------------- the shell

    def _tick(self, m: MemberNode) -> None:
        m.tick_at = -1
        self._apply(m, m.core.tick(self.now))

    def _deliver(self, m: MemberNode, msg) -> None:
        self.counters["delivered"] += 1
        try:
            effects = m.core.on_message(msg, self.now)
        except ProtocolError as e:
            # Every simulated peer is honest: a refused message is a bug in the core.
            raise Violation("protocol error between honest members", f"{m.name}: {e}") from None
        self._apply(m, effects)

    def _apply(self, m: MemberNode, effects: list) -> None:
        self._touched.add(m.name)
        for effect in effects:
            if isinstance(effect, Send):
                self._send(m, effect)
            else:
                assert isinstance(effect, MemberChanged)
                for hook in self.on_change:
                    hook(self.now, m.name, effect)
                if effect.node == m.name and effect.state is State.ALIVE:
                    m.incarnation_last = max(m.incarnation_last, effect.incarnation)
                    if self.discovery:
                        self._announce(m)   # Discovery.update_incarnation: an Updated record
        if m.core is not None:
            m.incarnation_last = max(m.incarnation_last, m.core.incarnation)
            self._schedule_tick(m)

    def _send(self, m: MemberNode, effect: Send) -> None:
        self.counters["messages"] += 1
        dst = self.by_address.get(effect.address)
        if dst is None or dst == m.name:
            return
        for t in self.net.deliveries(self.now, m.name, dst, False):
            self.at(t, "deliver", dst, effect.message)

    def _schedule_tick(self, m: MemberNode) -> None:
        due = max(self.now, m.core.next_deadline_ms())
        if due != m.tick_at:
            m.tick_at = due
            self.at(due + self.rng.randint(0, LOOP_LATENCY_MS_MAX), "tick", m.name, m.life, due)

    def _announce(self, m: MemberNode) -> None:
        self.records[m.name] = (m.address, m.core.incarnation)
        for other in self.running():
            if other == m.name:
                continue
            for t in self.net.deliveries(self.now, m.name, other, True):
                self.at(t + self.rng.randint(1, DISCOVERY_DRAIN_MS), "hint", other, self.nodes[other].life,
                        m.name, m.address, m.core.incarnation)
                break  # mDNS dedupes a repeated answer

    def _browse(self, m: MemberNode) -> None:
        for other, (address, incarnation) in sorted(self.records.items()):
            if other != m.name:
                self.at(self.now + self.rng.randint(1, DISCOVERY_DRAIN_MS), "hint", m.name, m.life, other,
                        address, incarnation)


def _row(rows: list[MemberView], node: str) -> MemberView | None:
    return next((v for v in rows if v.node == node), None)


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
