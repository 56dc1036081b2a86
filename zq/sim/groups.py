"""The deterministic consumer-groups simulator: the real group cores on 3 simulated nodes, 1-4
simulated consumers, a simulated network, one thread, one `random.Random(seed)`.

    python -m zq.sim.groups --seed S [-v]          replay one seed, print its trace hash
    python -m zq.sim.groups --seeds N [--start K]  run N seeds from K, with progress and a summary

Theory of operation
-------------------
A heap of timed events `(time_ms, sequence, kind, args)` is the only scheduler, as in
zq/sim/cluster.py: a message arriving, a node's timer (sweep, membership gossip, state gossip,
disk sync), a consumer's timer (heartbeat, lease retry, ack flush, its application finishing a
message), a request timing out, a dead-letter write finishing, a produce, or a fault. After
every step the checks in zq/sim/groups_checks.py hold, or the run stops and prints the seed and
the command that replays it.

Nodes. Each of the 3 nodes runs what zq/io/groups.py runs, with the same cores: a
`GroupMembership` per group (join, heartbeat, leave, expiry, gossip and merge every
`membership_gossip_ms` and soon after a change) and, per (group, partition), a `PartitionLead`
(zq/core/grouplead.py) that the partition's leader drives (fencing with `check_member`, leases,
Acks, the sweep, dead-letter writes) and that the other replicas merge from state gossip. What
the service does around the cores is re-done here in a few lines each: parking a lease until
the high watermark moves or its wait runs out, reading the planned range (control records are
done at once), writing dead-letter copies (slow, failing, or written but unanswered, drawn per
seed), persisting. The store is a page cache and a disk: a changed state is written to the cache
in the pass that changed it and reaches the disk at the next sync; a crash loses each unsynced
write with probability one half (a lost update is a redelivery). Memberships are not persisted:
a restarted node learns them by gossip.

The committed log of each partition is modelled, not replicated: every node sees the same log
(zq/sim/cluster.py proves the replication core). A leader change appends a control record (the
new leader's epoch marker); the new leader serves no lease until it has merged its own copy and
another node's (`state_pull`, asked again every `GATHER_WAIT_MS`). Quorum for retries, as the
service: a state a redelivery waits on is gossiped asking for acks; a replica acknowledges
(`state_ack`) only the partition's leader, and only at its next sync (once the merge is on its
disk); the leader's own copy counts at its own sync. The bugs "no_majority_read" and
"no_retry_quorum" take away either half, to show that the checks catch a lower attempt number.

Consumers. The client (zq/client/groups.py) is threads and sockets, not a pure core, so its rules
are modelled here one for one: join through a node, heartbeat every `session_timeout_ms // 4`,
rejoin when Fenced, move to the next node after 3 missed heartbeats; one long-poll lease
outstanding per held partition, sized by `max_in_flight` (its backpressure), following
NotLeader hints, backing off on Fenced / RebalanceInProgress (and heartbeating at once on
Fenced); lease replies of an older reset epoch than seen are dropped; settlements batched per
(partition, epoch) every `ack_flush_ms`, an Ack refused as Fenced dropped (redelivery follows),
retried with backoff on NotLeader / RebalanceInProgress / timeouts / no leader known for up to
`ack_retry_ms_max`; messages of a
partition lost in a rebalance kept and settled (their acks are then fenced). The application
acks, or nacks poison messages (always) and transient failures (sometimes, with or without a
delay), is sometimes slower than the lease, and extends long work.

Faults, drawn per seed: message loss, delay, duplication; network partitions (a node from the
others and from some consumers); node crashes and restarts; leadership moving; consumers
joining, leaving, crashing and coming back (a static id sometimes); resets (replay) to a random
offset; dead-letter writes failing, slow, or unanswered. The safety phase runs `steps` events.
The drain then heals everything, restarts every node, brings back a consumer for every group,
stops producing and faults, and runs until every (group, partition) has nothing pending (bounded
by `drain_ms_max` of simulated time); the final checks then run.
"""
from __future__ import annotations

import hashlib
import heapq
import random
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from zq.core.grouplead import (FENCED, DeadLetterWrite, PartitionLead, check_member, reset_epoch_floor,
                               unknown_member)
from zq.core.groups import GroupMembership, membership_gossip_interval_ms
from zq.core.groupstate import EMPTY as _NOT_ACKED, DeliveryState
from zq.core.retry import BackoffPolicy, RetryPolicy
from zq.sim.groups_checks import DeadLetterRecord, GroupChecker, Violation
from zq.sim.network import NetworkFaults, SimNetwork

TOPIC = "t"
NODES = ("n1", "n2", "n3")
# Node timing, as zq/io/groups.py.
SWEEP_MS = 100
MEMBERSHIP_GOSSIP_MS = 500
MEMBERSHIP_GOSSIP_MS_MIN = 20
STATE_GOSSIP_MS = 200
GATHER_WAIT_MS = 300          # a new leader asks the replicas that have not answered again after this
UNKNOWN_MEMBER_MS = 3 * MEMBERSHIP_GOSSIP_MS
SYNC_MS = 50                  # the store's page cache reaches the disk this often
LEASE_MESSAGES_MAX = 5_000
ELECTION_MS_MAX = 300         # a partition has no leader this long after its leader crashed
# Consumer timing, as zq/client/groups.py.
ACK_FLUSH_MS = 20
ACK_RETRY_MS_MAX = 8_000     # an Ack refused for a passing reason is sent again, with backoff, this long
RETRY_BACKOFF_MS = 100
RETRY_BACKOFF_MS_MAX = 500
EMPTY_LEASE_BACKOFF_MS = 20
LEASE_ASK_MAX = 2_500         # messages one lease asks for (the client's lease_messages_max)
REQUEST_TIMEOUT_MS = 1_000
MAX_WAIT_MS = 200
# The run.
DRAIN_MS_MAX = 120_000
DRAIN_CHECK_MS = 100
PARKED_MAX = 1_000
MEMBER_INCARNATIONS_MAX = 12   # consumers started in one run (joins and comebacks)


class Refused(Exception):
    """An error reply: kind is fenced, rebalance_in_progress, not_leader, leader_not_available, timeout."""

    def __init__(self, kind: str, hint: str | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.hint = hint


@dataclass(frozen=True)
class Settings:
    partitions: int
    groups: int
    members: int
    max_deliveries: int
    backoff_initial_ms: int
    backoff_max_ms: int
    lease_ms: int
    session_timeout_ms: int
    max_in_flight: int
    messages_per_partition: int
    poison: float
    transient: float
    slow: float
    dead_letter_fail: float
    dead_letter_slow_ms_max: int
    fault_every_ms: int
    faults: NetworkFaults
    clock_skew_ms_max: int

    @staticmethod
    def draw(rng: random.Random) -> Settings:
        initial = rng.choice((0, 5, 20, 50))
        return Settings(
            partitions=rng.randint(1, 3), groups=rng.randint(1, 2), members=rng.randint(1, 4),
            max_deliveries=rng.randint(1, 4), backoff_initial_ms=initial,
            backoff_max_ms=initial + rng.choice((0, 50, 300)), lease_ms=rng.choice((150, 300, 800)),
            session_timeout_ms=rng.choice((300, 600, 1_200)), max_in_flight=rng.choice((1, 3, 10, 50)),
            messages_per_partition=rng.randint(5, 40), poison=rng.choice((0.0, 0.05, 0.15)),
            transient=rng.choice((0.0, 0.1, 0.3)), slow=rng.choice((0.0, 0.05, 0.2)),
            dead_letter_fail=rng.choice((0.0, 0.2, 0.5)), dead_letter_slow_ms_max=rng.choice((5, 100, 600)),
            fault_every_ms=rng.choice((150, 400, 1_000)),
            faults=NetworkFaults(loss=rng.choice((0.0, 0.02, 0.1)), duplicate=rng.choice((0.0, 0.02, 0.1)),
                                 delay_ms_max=rng.choice((2, 10, 40))),
            clock_skew_ms_max=rng.choice((0, 20, 100)))

    def describe(self) -> str:
        f = self.faults
        return (f"{self.partitions} partitions, {self.groups} groups, {self.members} consumers, "
                f"max_deliveries {self.max_deliveries}, backoff {self.backoff_initial_ms}-{self.backoff_max_ms} ms, "
                f"lease {self.lease_ms} ms, session {self.session_timeout_ms} ms, in flight {self.max_in_flight}, "
                f"{self.messages_per_partition} msgs/partition, poison {self.poison}, transient {self.transient}, "
                f"slow {self.slow}, dlq fail {self.dead_letter_fail}, dlq slow {self.dead_letter_slow_ms_max} ms, "
                f"fault every {self.fault_every_ms} ms, loss {f.loss}, dup {f.duplicate}, delay {f.delay_ms_max} ms, "
                f"skew {self.clock_skew_ms_max} ms")


@dataclass
class Result:
    seed: int
    ok: bool = True
    invariant: str = ""
    detail: str = ""
    failed_step: int = 0
    phase: str = "safety"
    steps: int = 0
    deliveries: int = 0
    acked: int = 0
    nacks: int = 0
    dead_letters: int = 0
    acked_and_dead: int = 0
    node_crashes: int = 0
    member_crashes: int = 0
    leader_moves: int = 0
    resets: int = 0
    fenced_acks: int = 0
    attempt_drops: int = 0
    deliveries_over: int = 0
    drained_ms: int = 0
    trace_hash: str = ""


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Req:
    """A request from a consumer endpoint to a node; the node answers `Reply(req_id, ...)`."""

    src: str
    req_id: int
    kind: str        # join, heartbeat, leave, lease, ack
    group: str
    member_id: str
    generation: int = 0
    partition: int = 0
    max_messages: int = 0
    epoch: int = 0
    acked: tuple = ()
    nacks: tuple = ()
    extends: tuple = ()
    static: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    req_id: int
    error: Refused | None = None
    generation: int = 0
    partitions: tuple = ()
    epoch: int = 0
    deliveries: tuple = ()      # ((offset, attempt), ...)


# ---------------------------------------------------------------------------- nodes


@dataclass
class Node:
    name: str
    skew_ms: int
    up: bool = True
    incarnation: int = 0
    memberships: dict[str, GroupMembership] = field(default_factory=dict)
    held: dict[tuple[str, int], PartitionLead] = field(default_factory=dict)
    parked: list[tuple[int, Req]] = field(default_factory=list)    # (deadline, lease request)
    cache: dict[tuple[str, int], tuple[dict, int]] = field(default_factory=dict)   # written, not synced
    disk: dict[tuple[str, int], tuple[dict, int]] = field(default_factory=dict)
    next_gossip_ms: int = 0
    last_gossip_ms: int = 0
    gossip_soon: bool = False
    unknown_since: dict = field(default_factory=dict)   # (group, member) -> first request seen
    failed: set = field(default_factory=set)   # states with a failed delivery not yet gossiped
    gathered: dict[int, int] = field(default_factory=dict)    # partition -> leader term its majority read is of
    gathering: dict[int, tuple[int, set, int]] = field(default_factory=dict)   # p -> (term, replied, last ask)
    acks_due: list = field(default_factory=list)   # (leader, boot, key, version): acked once on disk


# ---------------------------------------------------------------------------- consumers


@dataclass
class Member:
    endpoint: str           # unique per start: replies to an earlier start of the same member are lost
    member_id: str
    group: str
    static: bool
    heartbeat_ms: int
    coordinator: int = 0
    generation: int = 0
    joined: bool = False
    alive: bool = True
    leaving: bool = False
    hb_failures: int = 0
    assigned: set[int] = field(default_factory=set)
    leasing: set[int] = field(default_factory=set)
    paused: dict[int, None] = field(default_factory=dict)   # in the order they paused
    failures: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    epochs: dict[int, int] = field(default_factory=dict)
    arrived: deque = field(default_factory=deque)      # (p, epoch, ((offset, attempt), ...))
    ready: deque = field(default_factory=deque)        # (p, epoch, offset, attempt)
    busy: bool = False
    pending: dict[tuple[int, int], tuple[list, list, list]] = field(default_factory=dict)
    flush_scheduled: bool = False
    leaders: dict[int, str] = field(default_factory=dict)
    requests: dict[int, tuple[str, Any]] = field(default_factory=dict)


class GroupSim:
    def __init__(self, seed: int, steps: int = 1_500, verbose: bool = False, settings: Settings | None = None,
                 bugs: frozenset[str] = frozenset()) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.s = settings or Settings.draw(self.rng)
        self.steps = steps
        self.verbose = verbose
        self.bugs = bugs              # deliberately broken rules, to show that the checks have teeth
        self.now = 0
        self.seq = 0
        self.heap: list = []
        self.trace = hashlib.blake2b(digest_size=16)
        self.result = Result(seed)
        self.phase = "safety"
        self.net = SimNetwork(self.rng, self.s.faults)
        self.policy = RetryPolicy(self.s.max_deliveries, BackoffPolicy(self.s.backoff_initial_ms,
                                                                       self.s.backoff_max_ms))
        self.check = GroupChecker(self.s.max_deliveries)
        self.nodes = {n: Node(n, self.rng.randint(-self.s.clock_skew_ms_max, self.s.clock_skew_ms_max))
                      for n in NODES}
        self.leader: dict[int, str | None] = {}
        self.log: dict[int, list[bytes | None]] = {p: [] for p in range(self.s.partitions)}
        self.poison: set[tuple[int, int]] = set()
        self.groups = [f"g{i}" for i in range(self.s.groups)]
        self.members: dict[str, Member] = {}
        self.member_starts = 0
        self.next_req = 0
        for p in range(self.s.partitions):
            self.leader[p] = NODES[p % len(NODES)]
            self.check.on_leader_change(p)
            self.nodes[self.leader[p]].gathered[p] = self.check.leader_terms[p]   # nothing to read yet
            for g in self.groups:
                self.check.on_epoch(g, p, 0, 0)

    # ------------------------------------------------------------------ the loop

    def at(self, time_ms: int, kind: str, *args: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (time_ms, self.seq, kind, args))

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"{self.now:>7} {text}")

    def run(self) -> Result:
        r = self.result
        try:
            self.start()
            while r.steps < self.steps and self.heap:
                self.one_step()
            self.begin_drain()
            while self.heap and self.now <= self.drain_until and not self.drain_done:
                self.one_step()
            if not self.drained():
                raise Violation("drained in bounded time", self.drain_report())
            r.drained_ms = self.now - self.drain_began
            self.final_checks()
        except Violation as v:
            r.ok, r.invariant, r.detail, r.failed_step, r.phase = False, v.invariant, v.detail, r.steps, self.phase
        except Exception as e:   # a crash of a core or of the simulator is a failure of the seed too
            where = traceback.extract_tb(e.__traceback__)[-1]
            r.ok, r.invariant, r.failed_step, r.phase = False, "no exception", r.steps, self.phase
            r.detail = f"{e.__class__.__name__}: {e} at {where.filename}:{where.lineno}"
        r.fenced_acks = self.check.fenced_acks
        r.attempt_drops = self.check.attempt_drops
        r.deliveries_over = self.check.deliveries_over
        r.dead_letters = len(self.check.dead_records)
        r.trace_hash = self.trace.hexdigest()
        return r

    def one_step(self) -> None:
        time_ms, _seq, kind, args = heapq.heappop(self.heap)
        self.now = max(self.now, time_ms)
        self.result.steps += 1
        self.trace.update(f"{time_ms}|{kind}|{args[0] if args else ''}|{args[1] if len(args) > 1 else ''};".encode())
        getattr(self, "ev_" + kind)(*args)

    def start(self) -> None:
        for n in NODES:
            self.start_node_timers(self.nodes[n])
        for _ in range(self.s.members):
            self.start_member(self.rng.choice(self.groups), static=self.rng.random() < 0.5)
        span_ms = max(2_000, self.steps * 4)
        for p in range(self.s.partitions):
            for _ in range(self.s.messages_per_partition):
                self.at(self.rng.randrange(span_ms), "produce", p)
        self.at(self.s.fault_every_ms, "fault")

    # ------------------------------------------------------------------ network

    def send(self, src: str, dst: str, kind: str, *args: Any) -> None:
        for t in self.net.deliveries(self.now, src, dst, broadcast=False):
            self.at(t, "arrive", dst, kind, args)

    def ev_arrive(self, dst: str, kind: str, args: tuple) -> None:
        node = self.nodes.get(dst)
        if node is not None:
            if node.up:
                getattr(self, "on_" + kind)(node, *args)
                self.after_node_step(node)
            return
        m = self.members.get(dst)
        if m is not None and m.alive:
            self.on_reply(m, *args)

    # ------------------------------------------------------------------ producing

    def ev_produce(self, p: int) -> None:
        if self.phase != "safety":
            return
        self.append(p, f"{p}:{len(self.log[p])}".encode())
        if self.rng.random() < self.s.poison:
            self.poison.add((p, len(self.log[p]) - 1))
        leader = self.leader[p]
        if leader is not None and self.nodes[leader].up:
            self.serve_parked(self.nodes[leader])
            self.after_node_step(self.nodes[leader])

    def append(self, p: int, value: bytes | None) -> None:
        self.log[p].append(value)
        self.check.on_append(p, value)

    # ------------------------------------------------------------------ node shell

    def wall(self, node: Node) -> int:
        return max(0, self.now + node.skew_ms)

    def start_node_timers(self, node: Node) -> None:
        inc = node.incarnation
        self.at(self.now + self.rng.randint(1, SWEEP_MS), "node_timer", node.name, inc, "sweep")
        self.at(self.now + self.rng.randint(1, MEMBERSHIP_GOSSIP_MS), "node_timer", node.name, inc, "gossip")
        self.at(self.now + self.rng.randint(1, STATE_GOSSIP_MS), "node_timer", node.name, inc, "state_gossip")
        self.at(self.now + self.rng.randint(1, SYNC_MS), "node_timer", node.name, inc, "sync")

    def ev_node_timer(self, name: str, incarnation: int, what: str) -> None:
        node = self.nodes[name]
        if not node.up or node.incarnation != incarnation:
            return
        if what == "sweep":
            self.at(self.now + SWEEP_MS, "node_timer", name, incarnation, what)
            self.expire_members(node)
            self.retry_gathering(node)
            self.sweep(node)
            self.serve_parked(node)
        elif what == "gossip":
            if self.now >= node.next_gossip_ms or node.gossip_soon:
                self.gossip_memberships(node)
            self.at(node.next_gossip_ms, "node_timer", name, incarnation, what)
        elif what == "state_gossip":
            self.at(self.now + STATE_GOSSIP_MS, "node_timer", name, incarnation, what)
            node.failed.clear()
            self.gossip_states(node, node.held)
        else:
            self.at(self.now + SYNC_MS, "node_timer", name, incarnation, what)
            self.sync(node)
        self.after_node_step(node)

    def sync(self, node: Node) -> None:
        """The page cache reaches the disk: the leader's own copies count as held, and the acks
        that waited for the replica's write go out (quorum for retries, grouplead.py)."""
        confirmed = False
        for key, (d, dead, version) in sorted(node.cache.items()):
            node.disk[key] = (d, dead, version)
            held = node.held.get(key)
            if held is not None and self.leads(node, key[1]):
                confirmed |= held.note_held(node.name, version, NODES)
        node.cache.clear()
        acks, node.acks_due = node.acks_due, []
        by_leader: dict[tuple[str, Any], list] = {}
        for leader, boot, key, version in acks:
            by_leader.setdefault((leader, boot), []).append((key, version))
        for (leader, boot), items in sorted(by_leader.items()):
            self.send(node.name, leader, "state_ack", node.name, boot, items)
        if confirmed:
            self.serve_parked(node)

    def on_state_ack(self, node: Node, sender: str, boot: Any, items: list) -> None:
        if boot != (node.name, node.incarnation):
            return   # an ack of a copy an earlier start of this node sent: versions started over since
        confirmed = False
        for key, version in items:
            held = node.held.get(key)
            if held is not None:
                confirmed |= held.note_held(sender, version, NODES)
        if confirmed:
            self.serve_parked(node)

    # ---- a new leader's majority read

    def start_gathering(self, node: Node, p: int) -> None:
        term = self.check.leader_terms.get(p, 0)
        if "no_majority_read" in self.bugs:
            node.gathered[p] = term
            return
        node.gathering[p] = (term, set(), self.now)
        for peer in NODES:
            if peer != node.name:
                self.send(node.name, peer, "state_pull", node.name, p, term)

    def retry_gathering(self, node: Node) -> None:
        for p, (term, replied, asked) in sorted(node.gathering.items()):
            if not self.leads(node, p) or term != self.check.leader_terms.get(p, 0):
                del node.gathering[p]
            elif self.now >= asked + GATHER_WAIT_MS:
                node.gathering[p] = (term, replied, self.now)
                for peer in NODES:
                    if peer != node.name and peer not in replied:
                        self.send(node.name, peer, "state_pull", node.name, p, term)

    def on_state_pull(self, node: Node, leader: str, p: int, term: int) -> None:
        items = [(key, held.state.gossip_dict(), held.dead_lettered) for key, held in sorted(node.held.items())
                 if key[1] == p]
        self.send(node.name, leader, "state_pulled", node.name, p, term, items)

    def on_state_pulled(self, node: Node, sender: str, p: int, term: int, items: list) -> None:
        entry = node.gathering.get(p)
        if entry is None or entry[0] != term or not self.leads(node, p):
            return
        self.merge_items(node, items)
        entry[1].add(sender)
        if 1 + len(entry[1]) >= len(NODES) // 2 + 1:
            del node.gathering[p]
            node.gathered[p] = term
            for key in sorted(node.held):
                if key[1] == p:
                    node.held[key].on_taken_over()
                    node.failed.add(key)   # to the replicas at once: retries wait for a majority to hold it
            self.say(f"{node.name} gathered the states of {p} (term {term})")
            self.serve_parked(node)

    def gathered(self, node: Node, p: int) -> bool:
        return node.gathered.get(p) == self.check.leader_terms.get(p, 0)

    def after_node_step(self, node: Node) -> None:
        """What the service's loop pass ends with: persist what changed (to the page cache); and
        the checks on every state of this node."""
        for key, held in node.held.items():
            if held.dirty:
                held.dirty = False
                node.cache[key] = (held.to_dict(), held.dead_lettered, held.version)
            self.check.check_state(node.name, key[0], key[1], held.state)
        if node.failed and "no_failure_gossip" not in self.bugs:   # as the service: failures go at once
            failed, node.failed = node.failed, set()
            self.gossip_states(node, failed)
        if node.gossip_soon and self.now >= node.last_gossip_ms + MEMBERSHIP_GOSSIP_MS_MIN:
            self.at(self.now + 1, "node_timer", node.name, node.incarnation, "gossip")

    def membership(self, node: Node, group: str) -> GroupMembership:
        m = node.memberships.get(group)
        if m is None:
            m = node.memberships[group] = GroupMembership(group, node.name)
        return m

    def rebalance(self, node: Node, m: GroupMembership) -> None:
        if m.maybe_rebalance([(TOPIC, p) for p in range(self.s.partitions)] if m.live_members() else []):
            node.gossip_soon = True

    def reply(self, node: Node, req: Req, **kw: Any) -> None:
        self.send(node.name, req.src, "reply", Reply(req.req_id, **kw))

    def refuse(self, node: Node, req: Req, error: Refused) -> None:
        self.reply(node, req, error=error)

    def group_reply(self, node: Node, req: Req, m: GroupMembership) -> None:
        parts = tuple(p for t, p in m.assignment_of(req.member_id))
        self.reply(node, req, generation=m.generation, partitions=parts)

    def on_request(self, node: Node, req: Req) -> None:
        getattr(self, "on_" + req.kind)(node, req)

    def on_join(self, node: Node, req: Req) -> None:
        m = self.membership(node, req.group)
        before = m.generation
        m.on_join(req.member_id, topics=[TOPIC], session_timeout_ms=self.s.session_timeout_ms, static=req.static,
                  now_ms=self.wall(node))
        self.rebalance(node, m)
        if m.generation != before:
            node.gossip_soon = True
        self.group_reply(node, req, m)

    def on_heartbeat(self, node: Node, req: Req) -> None:
        m = node.memberships.get(req.group)
        refusal = unknown_member(m, req.member_id, req.generation, self.long_unknown(node, req.group, req.member_id),
                                 node.name)
        if refusal is not None:
            return self.refuse(node, req, Refused(refusal.kind))
        assert m is not None
        if not m.on_heartbeat(req.member_id, self.wall(node)):
            return self.refuse(node, req, Refused(FENCED))
        self.rebalance(node, m)
        self.group_reply(node, req, m)

    def on_leave(self, node: Node, req: Req) -> None:
        m = node.memberships.get(req.group)
        if m is not None and m.on_leave(req.member_id, self.wall(node)):
            self.rebalance(node, m)
            node.gossip_soon = True
            self.sweep(node)   # the service sweeps at once: the member's leases fail now
        self.reply(node, req)

    def expire_members(self, node: Node) -> None:
        now = self.wall(node)
        for group in sorted(node.memberships):
            m = node.memberships[group]
            if m.expire(now):
                self.rebalance(node, m)
                node.gossip_soon = True

    def gossip_memberships(self, node: Node) -> None:
        node.next_gossip_ms = self.now + membership_gossip_interval_ms(node.memberships.values(),
                                                                       MEMBERSHIP_GOSSIP_MS, MEMBERSHIP_GOSSIP_MS_MIN)
        node.last_gossip_ms = self.now
        node.gossip_soon = False
        for peer in NODES:
            if peer != node.name:
                copies = [node.memberships[g].to_dict() for g in sorted(node.memberships)]
                self.send(node.name, peer, "group_gossip", copies)

    def on_group_gossip(self, node: Node, copies: list) -> None:
        for d in copies:
            other = GroupMembership.from_dict(d, node.name)
            m = self.membership(node, other.group)
            before = (m.generation, m.assignment)
            m.merge_from(other)
            if (m.generation, m.assignment) != before:
                self.rebalance(node, m)
                self.sweep(node)   # a member may have left: its leases fail now

    def gossip_states(self, node: Node, keys: Any) -> None:
        """As the service: `gossip_dict`, without plain first-delivery leases."""
        items = []
        want_ack = False
        for key in sorted(keys):
            held = node.held.get(key)
            if held is None:
                continue
            wants = held.wants_confirmation() and self.leads(node, key[1])
            if held.changed or wants:
                held.changed = False
                want_ack |= wants
                items.append((key, held.state.gossip_dict(), held.dead_lettered, held.version))
        if items:
            boot = (node.name, node.incarnation) if want_ack else None
            for peer in NODES:
                if peer != node.name:
                    self.send(node.name, peer, "state_gossip", node.name, boot, items)

    def on_state_gossip(self, node: Node, sender: str, boot: Any, items: list) -> None:
        self.merge_items(node, [(key, d, dead) for key, d, dead, _v in items])
        if boot is not None:
            # Acknowledged once on disk (the next sync), and only to the partition's leader: a
            # deposed leader's copy must not count towards a majority the new one did not read.
            node.acks_due.extend((sender, boot, key, version) for key, _d, _dead, version in items
                                 if self.leader.get(key[1]) == sender)

    def merge_items(self, node: Node, items: list) -> None:
        for key, d, dead_lettered in items:
            other = DeliveryState.from_dict(d)
            held = node.held.get(key)
            if held is None:
                held = node.held[key] = PartitionLead.from_state(other, dead_lettered)
                held.dirty = True
            elif "merge_resets_attempts" in self.bugs:
                held.state = other
                held.recompute_cursor()
                held.dirty = True
            else:
                held.merge_from(other, dead_lettered)

    def long_unknown(self, node: Node, group: str, member_id: str) -> bool:
        """As the service's _long_unknown."""
        m = node.memberships.get(group)
        if m is not None and member_id in m.records:
            return False
        key = (group, member_id)
        since = node.unknown_since.get(key)
        if since is None or self.now - since > 10 * UNKNOWN_MEMBER_MS:
            since = node.unknown_since[key] = self.now
        return self.now - since >= UNKNOWN_MEMBER_MS

    def leads(self, node: Node, p: int) -> bool:
        return self.leader.get(p) == node.name

    def not_leader(self, node: Node, p: int) -> Refused:
        leader = self.leader.get(p)
        if leader is None or leader == node.name:
            return Refused("leader_not_available")
        return Refused("not_leader", hint=leader)

    def held_or_new(self, node: Node, key: tuple[str, int], start: int) -> PartitionLead:
        held = node.held.get(key)
        if held is None:
            held = node.held[key] = PartitionLead.fresh(start)
        return held

    def on_lease(self, node: Node, req: Req) -> None:
        p = req.partition
        if not self.leads(node, p):
            return self.refuse(node, req, self.not_leader(node, p))
        refusal = check_member(node.memberships.get(req.group), req.member_id, req.generation, (TOPIC, p), True,
                               self.long_unknown(node, req.group, req.member_id))
        if refusal is not None:
            return self.refuse(node, req, Refused(refusal.kind))
        if self.gathered(node, p):
            self.held_or_new(node, (req.group, p), 0)
            if self.serve_lease(node, req):
                return
        if len(node.parked) >= PARKED_MAX:
            held = node.held.get((req.group, p))
            return self.reply(node, req, epoch=held.state.reset_epoch if held is not None else 0)
        node.parked.append((self.now + MAX_WAIT_MS, req))

    def serve_lease(self, node: Node, req: Req) -> bool:
        p = req.partition
        held = node.held[(req.group, p)]
        if "no_retry_quorum" in self.bugs:
            held.confirmed = max(held.confirmed, held.needed)   # redeliveries served before a majority holds them
        now = self.wall(node)
        log = self.log[p]
        plan = held.plan_lease(now, min(req.max_messages, LEASE_MESSAGES_MAX), 0, len(log))
        new: list[int] = []
        o = plan.start
        while o < plan.end:   # runs of records, and of control records, as stored batches would be
            control = log[o] is None
            hi = o + 1
            while hi < plan.end and (log[hi] is None) == control and hi - o < 4:
                hi += 1
            if not control:
                new.extend(range(o, hi))
            held.on_read(o, hi, control)
            o = hi
        if not plan.retries and not new:
            return False
        deliveries = held.grant(plan.retries + new, req.member_id, self.s.lease_ms, now)
        if not deliveries:
            return False
        for d in deliveries:
            self.check.on_grant(req.group, p, d.reset_epoch, d.offset, d.attempt)
        self.result.deliveries += len(deliveries)
        self.reply(node, req, epoch=held.state.reset_epoch,
                   deliveries=tuple((d.offset, d.attempt) for d in deliveries))
        return True

    def serve_parked(self, node: Node) -> None:
        keep = []
        for deadline, req in node.parked:
            p = req.partition
            if not self.leads(node, p):
                self.refuse(node, req, self.not_leader(node, p))
                continue
            if not self.gathered(node, p):   # a new leader still reading a majority's copies
                if self.now >= deadline:
                    held = node.held.get((req.group, p))
                    self.reply(node, req, epoch=held.state.reset_epoch if held is not None else 0)
                else:
                    keep.append((deadline, req))
                continue
            held = self.held_or_new(node, (req.group, p), 0)
            refusal = check_member(node.memberships.get(req.group), req.member_id, req.generation, (TOPIC, p), True,
                               self.long_unknown(node, req.group, req.member_id))
            if refusal is not None:
                self.refuse(node, req, Refused(refusal.kind))
                continue
            if held.ready(len(self.log[p]), self.wall(node)) and self.serve_lease(node, req):
                continue
            if self.now >= deadline:
                self.reply(node, req, epoch=held.state.reset_epoch)
                continue
            keep.append((deadline, req))
        node.parked = keep

    def on_ack(self, node: Node, req: Req) -> None:
        p = req.partition
        if not self.leads(node, p):
            return self.refuse(node, req, self.not_leader(node, p))
        m = node.memberships.get(req.group)
        refusal = check_member(m, req.member_id, req.generation, (TOPIC, p), False,
                               self.long_unknown(node, req.group, req.member_id))
        if "ack_from_fenced" in self.bugs and refusal is not None and refusal.kind == FENCED:
            refusal = None
        key = (req.group, p)
        # The oracle, written from the rule rather than from check_member: a member that the
        # leader's copy does not see live and holding the partition must change nothing.
        fenced = m is None or not m.is_live(req.member_id) or (TOPIC, p) not in m.assignment_of(req.member_id)
        before = node.held[key].state.copy() if fenced and key in node.held else None
        if refusal is None:
            held = self.held_or_new(node, key, 0)
            st = held.state
            fresh = [o for o in req.acked if o >= st.committed and not st.offsets.get(o, _NOT_ACKED).done]
            out = held.on_ack(req.member_id, req.epoch, list(req.acked), [list(n) for n in req.nacks],
                              [list(e) for e in req.extends], self.wall(node), self.policy, self.rng.random)
            self.result.acked += out.acked
            if out.nacked:
                node.failed.add(key)
            if out.acked:
                for o in fresh:
                    e = st.offsets.get(o)
                    if (e is not None and e.acked) or o < st.committed:
                        self.check.on_ack_applied(req.group, p, st.reset_epoch, o)
            self.result.nacks += out.nacked
            if out.dead_letters_due:
                for write in held.take_dead_letters():
                    self.write_dead_letter(node, key, write)
        if fenced:
            after = node.held[key].state if key in node.held else None
            self.check.on_fenced_ack(before, after, f"{node.name}: Ack of {req.member_id} for {p}")
        if refusal is not None:
            return self.refuse(node, req, Refused(refusal.kind))
        self.reply(node, req, epoch=node.held[key].state.reset_epoch)

    def sweep(self, node: Node) -> None:
        for key in sorted(node.held):
            group, p = key
            if not self.leads(node, p):
                continue
            out = node.held[key].sweep(self.wall(node), node.memberships.get(group), (TOPIC, p), self.policy,
                                       self.rng.random)
            if out.expired or out.departed:
                node.failed.add(key)
            for write in out.writes:
                self.write_dead_letter(node, key, write)

    def write_dead_letter(self, node: Node, key: tuple[str, int], write: DeadLetterWrite) -> None:
        """Produce the copy to TOPIC.dlq with acks=quorum: slow, failing, or written but unanswered."""
        done_ms = self.now + self.rng.randint(1, self.s.dead_letter_slow_ms_max)
        fail = self.phase == "safety" and self.rng.random() < self.s.dead_letter_fail
        written = not fail or self.rng.random() < 0.3   # a failure may come after the copy committed
        if "done_before_dead_letter" in self.bugs:
            node.held[key].on_dead_letter_written(write, True)   # the source counts as done before its copy exists
        self.at(done_ms, "dead_letter_done", node.name, node.incarnation, key, write, not fail, written)

    def ev_dead_letter_done(self, name: str, incarnation: int, key: tuple[str, int], write: DeadLetterWrite,
                            ok: bool, written: bool) -> None:
        group, p = key
        d = write.letter
        if written:   # the copy is in the dead-letter topic whether or not its writer hears so
            self.check.on_dead_letter(DeadLetterRecord(group, p, d.offset, write.epoch, d.attempts,
                                                       self.log[p][d.offset] or b""))
        node = self.nodes[name]
        if not node.up or node.incarnation != incarnation:
            return   # the writer crashed: a later sweep (its own or another leader's) writes it again
        held = node.held.get(key)
        if held is not None:
            held.on_dead_letter_written(write, ok)
        self.after_node_step(node)

    def reset(self, group: str, p: int) -> None:
        leader = self.leader.get(p)
        if leader is None or not self.nodes[leader].up:
            return
        node = self.nodes[leader]
        target = self.rng.randint(0, len(self.log[p]))
        held = self.held_or_new(node, (group, p), target)
        held.reset(target, reset_epoch_floor(self.wall(node), node.name))
        self.check.on_epoch(group, p, held.state.reset_epoch, target)
        self.result.resets += 1
        self.say(f"reset {group} {p} to {target}, epoch {held.state.reset_epoch}")
        self.after_node_step(node)

    # ------------------------------------------------------------------ node faults

    def crash_node(self, node: Node) -> None:
        node.up = False
        node.incarnation += 1
        self.result.node_crashes += 1
        for key, saved in node.cache.items():   # unsynced writes: each lost or not
            if self.rng.random() < 0.5:
                node.disk[key] = saved
        node.cache.clear()
        node.memberships.clear()
        node.held.clear()
        node.parked.clear()
        node.failed.clear()
        node.unknown_since.clear()
        node.gathered.clear()
        node.gathering.clear()
        node.acks_due.clear()
        self.say(f"crash {node.name}")
        for p in sorted(self.leader):
            if self.leader[p] == node.name:
                self.leader[p] = None
                self.at(self.now + self.rng.randint(1, ELECTION_MS_MAX), "elect", p)

    def restart_node(self, node: Node) -> None:
        if node.up:
            return
        node.up = True
        for key in sorted(node.disk):
            d, _dead, _version = node.disk[key]
            node.held[key] = PartitionLead.from_dict(d)   # the stored form, read back as the service does
        node.next_gossip_ms = self.now
        self.start_node_timers(node)
        self.say(f"restart {node.name}")
        for p in sorted(self.leader):
            if self.leader[p] is None:
                self.at(self.now + 1, "elect", p)

    def ev_elect(self, p: int) -> None:
        if self.leader[p] is not None and self.nodes[self.leader[p]].up:
            return
        up = [n for n in NODES if self.nodes[n].up]
        if up:
            self.move_leader(p, self.rng.choice(up))

    def move_leader(self, p: int, to: str) -> None:
        old = self.leader.get(p)
        self.leader[p] = to
        self.check.on_leader_change(p)
        self.result.leader_moves += 1
        self.append(p, None)   # the new leader's epoch marker, a control record
        self.say(f"leader of {p}: {old} -> {to}")
        if old is not None and self.nodes[old].up:
            self.serve_parked(self.nodes[old])   # its parked leases learn where to go
        new = self.nodes[to]   # it reads a majority's copies before it serves a lease
        self.start_gathering(new, p)
        self.serve_parked(new)
        self.after_node_step(new)

    # ------------------------------------------------------------------ faults

    def ev_fault(self) -> None:
        if self.phase != "safety":
            return
        self.at(self.now + self.rng.randint(1, 2 * self.s.fault_every_ms), "fault")
        rng = self.rng
        roll = rng.random()
        up = [n for n in NODES if self.nodes[n].up]
        live = [m for m in sorted(self.members) if self.members[m].alive and not self.members[m].leaving]
        if roll < 0.12 and len(up) == len(NODES):
            self.crash_node(self.nodes[rng.choice(up)])
            self.at(self.now + rng.randint(50, 2_000), "restart", rng.choice([n for n in NODES]))
        elif roll < 0.24:
            p = rng.randrange(self.s.partitions)
            choices = [n for n in up if n != self.leader[p]]
            if choices:
                self.move_leader(p, rng.choice(choices))
        elif roll < 0.32 and self.member_starts < MEMBER_INCARNATIONS_MAX:
            self.start_member(rng.choice(self.groups), static=rng.random() < 0.5)
        elif roll < 0.42 and live:
            m = self.members[rng.choice(live)]
            self.crash_member(m)
            if rng.random() < 0.7 and self.member_starts < MEMBER_INCARNATIONS_MAX:
                self.at(self.now + rng.randint(10, 2 * self.s.session_timeout_ms), "comeback", m.endpoint)
        elif roll < 0.47 and len(live) > 1:
            self.leave_member(self.members[rng.choice(live)])
        elif roll < 0.55:
            self.reset(rng.choice(self.groups), rng.randrange(self.s.partitions))
        elif roll < 0.65:
            cut = rng.choice(NODES)
            others = [n for n in NODES if n != cut]
            side = [m for m in live if rng.random() < 0.5]
            self.net.cut([cut], others + side)
            self.say(f"partition {cut} from {others + side}")
            self.at(self.now + rng.randint(50, 3 * self.s.session_timeout_ms), "heal")
        elif roll < 0.7:
            self.net.heal()

    def ev_restart(self, name: str) -> None:
        for n in NODES:
            if not self.nodes[n].up:
                self.restart_node(self.nodes[n])

    def ev_heal(self) -> None:
        self.net.heal()

    def ev_comeback(self, endpoint: str) -> None:
        old = self.members[endpoint]
        if self.phase == "safety" or self.member_starts < MEMBER_INCARNATIONS_MAX:
            self.start_member(old.group, static=old.static, member_id=old.member_id if old.static else None)

    # ------------------------------------------------------------------ consumers

    def start_member(self, group: str, static: bool, member_id: str | None = None) -> Member:
        self.member_starts += 1
        endpoint = f"c{self.member_starts}"
        m = Member(endpoint, member_id or f"m{self.member_starts}", group, static,
                   heartbeat_ms=max(50, self.s.session_timeout_ms // 4), coordinator=self.rng.randrange(len(NODES)))
        self.members[endpoint] = m
        self.say(f"start {endpoint} as {m.member_id} in {group}{' (static)' if static else ''}")
        self.send_join(m)
        return m

    def crash_member(self, m: Member) -> None:
        m.alive = False
        self.result.member_crashes += 1
        self.say(f"crash {m.endpoint} ({m.member_id})")

    def leave_member(self, m: Member) -> None:
        """close(): flush what is settled, then leave (the leases it holds fail at once)."""
        m.leaving = True
        self.flush(m)
        self.at(self.now + ACK_FLUSH_MS, "member_timer", m.endpoint, "leave", None)

    def request(self, m: Member, node: str, kind: str, ctx: Any, timeout_ms: int, **fields: Any) -> None:
        self.next_req += 1
        rid = self.next_req
        m.requests[rid] = (kind, ctx)
        self.send(m.endpoint, node, "request", Req(m.endpoint, rid, kind, m.group, m.member_id, **fields))
        self.at(self.now + timeout_ms, "member_timer", m.endpoint, "timeout", rid)

    def ev_member_timer(self, endpoint: str, what: str, arg: Any) -> None:
        m = self.members[endpoint]
        if not m.alive:
            return
        if what == "timeout":
            if arg in m.requests:
                kind, ctx = m.requests.pop(arg)
                self.on_answer(m, kind, ctx, None, Refused("timeout"))
        elif what == "heartbeat":
            self.send_heartbeat(m, regular=True)
        elif what == "lease":
            self.lease(m, arg)
        elif what == "flush":
            self.flush(m)
        elif what == "ack_retry":
            p, epoch, items, attempt, first_ms = arg
            self.send_ack(m, p, epoch, items, attempt, first_ms)
        elif what == "rejoin":
            self.send_join(m, arg)
        elif what == "handled":
            self.handled(m, arg)
        elif what == "leave":
            m.alive = False
            self.request(m, NODES[m.coordinator], "leave", None, REQUEST_TIMEOUT_MS)

    def on_reply(self, m: Member, reply: Reply) -> None:
        entry = m.requests.pop(reply.req_id, None)
        if entry is None:
            return   # a duplicate, or an answer after the timeout
        kind, ctx = entry
        self.on_answer(m, kind, ctx, reply, reply.error)

    def on_answer(self, m: Member, kind: str, ctx: Any, reply: Reply | None, error: Refused | None) -> None:
        getattr(self, "answer_" + kind)(m, ctx, reply, error)

    # ---- membership

    def send_join(self, m: Member, node: int | None = None) -> None:
        if node is not None:
            m.coordinator = node
        self.request(m, NODES[m.coordinator], "join", m.coordinator, REQUEST_TIMEOUT_MS,
                     static=m.static)

    def answer_join(self, m: Member, node: int, reply: Reply | None, error: Refused | None) -> None:
        if error is None and reply is not None:
            m.coordinator = node
            m.joined = True
            self.apply_assignment(m, reply)
            self.at(self.now + m.heartbeat_ms, "member_timer", m.endpoint, "heartbeat", None)
            return
        # _join tries the nodes in turn; _io_rejoin retries the same one after retry_backoff_ms.
        nxt = (node + 1) % len(NODES) if not m.joined else node
        self.at(self.now + RETRY_BACKOFF_MS, "member_timer", m.endpoint, "rejoin", nxt)

    def send_heartbeat(self, m: Member, regular: bool) -> None:
        if m.leaving:
            return
        timeout = m.heartbeat_ms + 1_000 if regular else REQUEST_TIMEOUT_MS
        self.request(m, NODES[m.coordinator], "heartbeat", (m.coordinator, regular), timeout,
                     generation=m.generation)

    def answer_heartbeat(self, m: Member, ctx: tuple[int, bool], reply: Reply | None, error: Refused | None) -> None:
        node, regular = ctx
        if not regular:   # _io_heartbeat_once: only a reply matters
            if error is None and reply is not None:
                self.apply_assignment(m, reply)
            return
        delay = m.heartbeat_ms
        if error is None and reply is not None:
            m.hb_failures = 0
            self.apply_assignment(m, reply)
        elif error.kind == FENCED:
            self.send_join(m, node)
            return
        else:
            m.hb_failures += 1
            if error.kind == "timeout" or m.hb_failures >= 3:
                m.coordinator = (node + 1) % len(NODES)
            delay = min(m.heartbeat_ms, RETRY_BACKOFF_MS * m.hb_failures)
        self.at(self.now + delay, "member_timer", m.endpoint, "heartbeat", None)

    def apply_assignment(self, m: Member, reply: Reply) -> None:
        parts = set(reply.partitions)
        added = parts - m.assigned
        m.generation = reply.generation
        m.assigned = parts
        for p in sorted(added):
            m.failures[p] = 0
            self.lease(m, p)

    def answer_leave(self, m: Member, ctx: Any, reply: Reply | None, error: Refused | None) -> None:
        pass

    # ---- leasing

    def lease_size(self, m: Member) -> int:
        room = self.s.max_in_flight - m.in_flight
        share = max(1, self.s.max_in_flight // max(1, len(m.assigned)))
        lease_min = max(1, min(share, LEASE_ASK_MAX) // 4)
        n = min(room, LEASE_ASK_MAX, share)
        if n < lease_min and (m.arrived or m.ready):
            return 0
        return n

    def lease(self, m: Member, p: int) -> None:
        if m.leaving or p not in m.assigned or p in m.leasing:
            return
        n = self.lease_size(m)
        if n <= 0:
            m.paused[p] = None
            return
        leader = m.leaders.get(p) or self.leader.get(p)
        if leader is None:
            return self.lease_retry(m, p)
        m.leaders[p] = leader
        m.in_flight += n
        m.leasing.add(p)
        self.request(m, leader, "lease", (p, n, self.now), MAX_WAIT_MS + REQUEST_TIMEOUT_MS, partition=p,
                     max_messages=n, generation=m.generation)

    def resume_order(self, m: Member) -> list[int]:
        """Paused partitions, in the order they paused, as the client's `_paused` (an ordered set).
        The client used to resume them sorted by partition, which starved the highest ones when
        `max_in_flight` is below the number of partitions held (found by this simulator, seed 107;
        the bug "client_sorted_resume" brings that rule back)."""
        return sorted(m.paused) if "client_sorted_resume" in self.bugs else list(m.paused)

    def lease_retry(self, m: Member, p: int) -> None:
        m.failures[p] = m.failures.get(p, 0) + 1
        m.leaders.pop(p, None)   # refresh metadata: the next lease asks the current leader
        delay = min(RETRY_BACKOFF_MS_MAX, RETRY_BACKOFF_MS * 2 ** min(m.failures[p] - 1, 10))
        self.at(self.now + delay, "member_timer", m.endpoint, "lease", p)

    def answer_lease(self, m: Member, ctx: tuple[int, int, int], reply: Reply | None, error: Refused | None) -> None:
        p, n, sent = ctx
        m.leasing.discard(p)
        got = len(reply.deliveries) if error is None and reply is not None else 0
        m.in_flight -= n - got
        paused = self.resume_order(m) if n > got else []
        for q in paused:
            del m.paused[q]
        if error is None and got:
            m.epochs[p] = max(m.epochs.get(p, 0), reply.epoch)
            m.arrived.append((p, reply.epoch, reply.deliveries))
            self.maybe_handle(m)
        for q in paused:
            self.lease(m, q)
        if error is None:
            m.failures[p] = 0
            if got == 0 and self.now - sent < 5:
                self.at(self.now + EMPTY_LEASE_BACKOFF_MS, "member_timer", m.endpoint, "lease", p)
            else:
                self.lease(m, p)
        elif error.kind == "not_leader" and error.hint and m.failures.get(p, 0) == 0:
            m.leaders[p] = error.hint
            m.failures[p] = 1
            self.lease(m, p)
        elif error.kind in (FENCED, "rebalance_in_progress"):
            if error.kind == FENCED:
                self.send_heartbeat(m, regular=False)
            m.failures[p] = m.failures.get(p, 0) + 1
            self.at(self.now + min(RETRY_BACKOFF_MS * m.failures[p], RETRY_BACKOFF_MS_MAX), "member_timer",
                    m.endpoint, "lease", p)
        else:
            self.lease_retry(m, p)

    # ---- the application

    def maybe_handle(self, m: Member) -> None:
        if m.busy or not m.alive:
            return
        while not m.ready and m.arrived:
            p, epoch, deliveries = m.arrived.popleft()
            if epoch < m.epochs.get(p, 0):
                m.in_flight -= len(deliveries)   # a seek made them stale (the client's _release)
                for q in self.resume_order(m):
                    del m.paused[q]
                    self.lease(m, q)
                continue
            m.ready.extend((p, epoch, o, a) for o, a in deliveries)
        if not m.ready:
            return
        msg = m.ready.popleft()
        m.busy = True
        rng = self.rng
        handle_ms = rng.randint(0, 5)
        if rng.random() < self.s.slow:
            handle_ms += rng.randint(self.s.lease_ms // 2, self.s.lease_ms * 2)
        self.at(self.now + handle_ms, "member_timer", m.endpoint, "handled", (msg, handle_ms))

    def handled(self, m: Member, arg: tuple) -> None:
        (p, epoch, offset, attempt), handle_ms = arg
        m.busy = False
        rng = self.rng
        poison = (p, offset) in self.poison
        if poison or (self.phase == "safety" and rng.random() < self.s.transient):
            delay = None if rng.random() < 0.5 else rng.randint(0, 100) / 1000
            delay_ms = None if delay is None else int(delay * 1000)
            self.settle(m, p, epoch, "nack", (offset, attempt, delay_ms, "poison" if poison else "transient"))
        else:
            if handle_ms > self.s.lease_ms // 2 and rng.random() < 0.5:
                self.settle(m, p, epoch, "extend", (offset, self.s.lease_ms))
            self.check.on_handled(m.group, p, epoch, offset)
            self.settle(m, p, epoch, "ack", offset)
        self.maybe_handle(m)

    def settle(self, m: Member, p: int, epoch: int, kind: str, item: Any) -> None:
        acked, nacks, extends = m.pending.setdefault((p, epoch), ([], [], []))
        if kind == "ack":
            acked.append(item)
        elif kind == "nack":
            nacks.append(item)
        else:
            extends.append(item)
        if kind != "extend":
            m.in_flight -= 1
            if m.paused:
                for q in self.resume_order(m):
                    del m.paused[q]
                    self.lease(m, q)
        if not m.flush_scheduled:
            m.flush_scheduled = True
            self.at(self.now + ACK_FLUSH_MS, "member_timer", m.endpoint, "flush", None)

    def flush(self, m: Member) -> None:
        pending, m.pending = m.pending, {}
        m.flush_scheduled = False
        for (p, epoch), items in sorted(pending.items()):
            self.send_ack(m, p, epoch, items, 0, self.now)

    def send_ack(self, m: Member, p: int, epoch: int, items: tuple, attempt: int, first_ms: int) -> None:
        leader = m.leaders.get(p) or self.leader.get(p)
        if leader is None:
            delay = min(RETRY_BACKOFF_MS_MAX, RETRY_BACKOFF_MS * 2 ** min(attempt, 10))
            if self.now + delay - first_ms < ACK_RETRY_MS_MAX:
                self.at(self.now + delay, "member_timer", m.endpoint, "ack_retry", (p, epoch, items, attempt + 1,
                                                                                  first_ms))
            return   # else the acks are dropped: the messages will be delivered again
        acked, nacks, extends = items
        self.request(m, leader, "ack", (p, epoch, items, attempt, first_ms), REQUEST_TIMEOUT_MS,
                     generation=m.generation, partition=p, epoch=epoch, acked=tuple(acked), nacks=tuple(nacks),
                     extends=tuple(extends))

    def answer_ack(self, m: Member, ctx: tuple, reply: Reply | None, error: Refused | None) -> None:
        if error is None:
            return
        p, epoch, items, attempt, first_ms = ctx
        delay = min(RETRY_BACKOFF_MS_MAX, RETRY_BACKOFF_MS * 2 ** min(attempt, 10))
        retry = self.now + delay - first_ms < ACK_RETRY_MS_MAX and error.kind in (
            "not_leader", "leader_not_available", "timeout", "rebalance_in_progress")
        if error.kind == "not_leader" and error.hint:
            m.leaders[p] = error.hint
        if error.kind == FENCED:
            self.send_heartbeat(m, regular=False)
        if retry:
            if error.kind != "not_leader":
                m.leaders.pop(p, None)
            self.at(self.now + delay, "member_timer", m.endpoint, "ack_retry", (p, epoch, items, attempt + 1, first_ms))

    # ------------------------------------------------------------------ the drain

    def begin_drain(self) -> None:
        self.phase = "drain"
        self.drain_done = False
        self.drain_began = self.now
        self.drain_until = self.now + DRAIN_MS_MAX
        self.net.heal()
        self.net.faults = NetworkFaults(delay_ms_max=self.s.faults.delay_ms_max)
        for n in NODES:
            self.restart_node(self.nodes[n])
        for p in sorted(self.leader):
            if self.leader[p] is None:
                self.move_leader(p, NODES[p % len(NODES)])
        for g in self.groups:
            if not any(m.alive and not m.leaving and m.group == g for m in self.members.values()):
                self.start_member(g, static=False)
        self.at(self.now + DRAIN_CHECK_MS, "drain_check")

    def ev_drain_check(self) -> None:
        self.drain_done = self.drained()
        self.at(self.now + DRAIN_CHECK_MS, "drain_check")

    def drained(self) -> bool:
        for g in self.groups:
            for p in range(self.s.partitions):
                leader = self.leader.get(p)
                held = self.nodes[leader].held.get((g, p)) if leader is not None else None
                if held is None or held.state.committed != len(self.log[p]):
                    return False
        return True

    def drain_report(self) -> str:
        rows = []
        for g in self.groups:
            for p in range(self.s.partitions):
                leader = self.leader.get(p)
                held = self.nodes[leader].held.get((g, p)) if leader is not None else None
                rows.append(f"{g}/{p} leader {leader} hw {len(self.log[p])} state "
                            f"{held.state if held is not None else None}")
        live = [f"{m.endpoint}={m.member_id} gen {m.generation} holds {sorted(m.assigned)} in flight {m.in_flight} "
                f"leasing {sorted(m.leasing)} paused {sorted(m.paused)} queued {len(m.arrived)}+{len(m.ready)} "
                f"epochs {m.epochs} busy {m.busy} leaders {m.leaders}"
                for m in self.members.values() if m.alive]
        live += [f"{n}: {sorted((g, mm.generation, sorted(mm.live_members())) for g, mm in self.nodes[n].memberships.items())}"
                 for n in NODES]
        return "; ".join(rows) + f"; consumers: {', '.join(live)}"

    def final_checks(self) -> None:
        for g in self.groups:
            for p in range(self.s.partitions):
                held = self.nodes[self.leader[p]].held[(g, p)]
                counts = self.check.check_final(g, p, held.state)
                self.result.acked_and_dead += counts["both"]


def replay_command(seed: int, steps: int = 1_500) -> str:
    return f"python -m zq.sim.groups --seed {seed}" + (f" --steps {steps}" if steps != 1_500 else "")


def run_seed(seed: int, steps: int = 1_500, verbose: bool = False, bugs: frozenset[str] = frozenset()) -> Result:
    return GroupSim(seed, steps=steps, verbose=verbose, bugs=bugs).run()


def _report_failure(r: Result, steps: int) -> None:
    print(f"FAIL seed {r.seed}: invariant '{r.invariant}' broken at step {r.failed_step} ({r.phase} phase)")
    print(f"  {r.detail}")
    print(f"  replay: {replay_command(r.seed, steps)}")


def main(argv: list[str] | None = None) -> int:
    import sys
    import time

    from zq.sim.cli import seed_parser
    ap = seed_parser("python -m zq.sim.groups", "deterministic consumer-groups simulator")
    ap.add_argument("--steps", type=int, default=1_500, help="events in the safety phase")
    args = ap.parse_args(argv)
    if args.seed is not None:
        sim = GroupSim(args.seed, steps=args.steps, verbose=args.verbose)
        print(f"seed {args.seed}: {sim.s.describe()}")
        r = sim.run()
        if not r.ok:
            _report_failure(r, args.steps)
            return 1
        print(f"ok seed {r.seed}: {r.steps} steps, {r.deliveries} deliveries, {r.acked} acks, {r.nacks} nacks, "
              f"{r.dead_letters} dead letters, {r.node_crashes} node crashes, {r.member_crashes} consumer crashes, "
              f"{r.leader_moves} leader moves, {r.resets} resets, {r.fenced_acks} fenced acks, drained "
              f"{r.drained_ms} ms after healing, trace {r.trace_hash}")
        return 0
    began = time.monotonic()
    failures: list[Result] = []
    totals = {k: 0 for k in ("steps", "deliveries", "acked", "nacks", "dead_letters", "acked_and_dead", "node_crashes",
                             "member_crashes", "leader_moves", "resets", "fenced_acks", "attempt_drops", "deliveries_over")}
    drained_max = 0
    for i, seed in enumerate(range(args.start, args.start + args.seeds), 1):
        r = run_seed(seed, args.steps)
        for k in totals:
            totals[k] += getattr(r, k)
        drained_max = max(drained_max, r.drained_ms)
        if not r.ok:
            failures.append(r)
            _report_failure(r, args.steps)
        if i % 500 == 0 or i == args.seeds:
            print(f"  {i}/{args.seeds} seeds, {len(failures)} failed, {time.monotonic() - began:.1f} s", flush=True)
    summary = ", ".join(f"{v} {k}" for k, v in totals.items())
    print(f"{args.seeds} seeds in {time.monotonic() - began:.1f} s: {len(failures)} failed; {summary}; "
          f"slowest drain {drained_max} ms (simulated)")
    for r in failures:
        print(f"  {replay_command(r.seed, args.steps)}   # {r.invariant}")
    sys.stdout.flush()
    return 1 if failures else 0


if __name__ == "__main__":
    import sys
    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
