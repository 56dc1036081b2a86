"""The deterministic consumer-groups simulator: the shipped group service (zq/node/groups.py) on 3
simulated nodes, 1-4 simulated consumers, a simulated network, one thread, one `random.Random(seed)`.

    python -m zq.sim.groups --seed S [-v]          replay one seed, print its trace hash
    python -m zq.sim.groups --seeds N [--start K]  run N seeds from K, with progress and a summary

Theory of operation
-------------------
A heap of timed events `(time_ms, sequence, kind, args)` is the only scheduler (zq/sim/world.py's
`EventHeap`, as in every simulator): a message arriving, a node's pass (its service's tick every `TICK_MS`, a timer
the service set with `at`, a request timing out), a disk sync, a consumer's timer (heartbeat,
lease retry, ack flush, its application finishing a message), a dead-letter write finishing, a
produce, or a fault. After every step the checks in zq/sim/groups_checks.py hold, or the run
stops and prints the seed and the command that replays it.

Nodes. Each node runs the real `zq.node.groups.GroupService` through a `SimServiceHost`
(zq/sim/group_host.py): every message is a real group_protocol message, handled by the service's
own handler (an error becomes the error reply, as in the node), then the service ticks, the
pass's writes are committed to the simulated store, and the pass's messages go out. There is no
copy of the service's rules here. The store loses each write not yet synced (every `SYNC_MS`, or
at once when the service asks for an fsync) with probability one half on a crash; a restarted
node builds a new service from what its store holds.

The committed logs are modelled, not replicated: every node sees the same log per partition
(zq/sim/cluster.py proves the replication core), with a leader (None while electing) and a term
per partition, which the host reports as `leader_of`. A source partition's batch holds one
record; a leader change appends a control batch (the new leader's epoch marker). The dead-letter
partitions (`t.dlq`) have leaders too, move and fail over, and deduplicate an idempotent
producer's batch as zq/core/replication.py does: a batch of a producer id already in the log
with sequence 0 is answered as a duplicate of the one there; nothing else is deduplicated. A
dead-letter write is slow, fails, or fails after its copy committed (drawn per seed), and a
remote one is a real Produce to that partition's leader, whose answer the network may lose.

Consumers. Each simulated member drives the shipped consumer's rules, the pure core
`zq.core.consumer_rules.GroupConsumerCore`, as the client's I/O shell (zq/client/groups.py) does
(zq/sim/group_consumer.py: the first join through the nodes in turn, then the core's orders sent as
real group_protocol requests with timeouts, their answers and refusals fed back, a wake-up at the
core's next due time); no consumer rule is copied here. The application takes the core's chunks,
acks, or nacks poison messages (always) and transient failures (sometimes, with or without a
delay), is sometimes slower than the lease, extends long work, and leaves as `close()` does
(flush, wait for the acks' answers, LeaveGroup).

Faults, drawn per seed: message loss, delay, duplication; network partitions (a node from the
others and from some consumers); node crashes and restarts; leadership moving (of source and
dead-letter partitions); consumers
joining, leaving, crashing and coming back (a static id sometimes); resets (replay) to a random
offset, through the leader's ResetGroup handler, by an operator or by a member's seek (its core
hears the new epoch from the answer); dead-letter writes failing, slow, or unanswered. The safety
phase runs `steps` events.
The drain then heals everything, restarts every node, brings back a consumer for every group,
stops producing and faults, and runs until every (group, partition) has nothing pending (bounded
by `drain_ms_max` of simulated time); the final checks then run.
"""
from __future__ import annotations

import random
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from zq import batch as zbatch
from zq import group_protocol as G
from zq import protocol as P
from zq.core.metadata import MetadataState
from zq.core.repl_types import COMMITTED, Outcome
from zq.errors import LeaderNotAvailable, OutOfOrderSequence, ProtocolError, ZqError, from_wire
from zq.limits import DEFAULT
from zq.node.groups import GroupService
from zq.sim.group_consumer import ConsumerModel, Member
from zq.sim.group_host import DLQ_ID, NODES, SYNC_MS, TOPIC, TOPIC_ID, SimServiceHost
from zq.sim.groups_checks import DeadLetterRecord, GroupChecker, Violation
from zq.sim.network import NetworkFaults, SimNetwork
from zq.sim.world import EventHeap, main_guard, report_failure, run_seeds, seed_parser
from zq.types import TopicPartition

DLQ = TOPIC + ".dlq"
TICK_MS = 20                  # a node's loop pass with nothing to handle (the service's tick) this often
ELECTION_MS_MAX = 300         # a partition has no leader this long after its leader crashed
# The run.
DRAIN_MS_MAX = 120_000
DRAIN_CHECK_MS = 100
MEMBER_INCARNATIONS_MAX = 12   # consumers started in one run (joins and comebacks)


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
    seeks: int = 0          # resets a member asked for whose answer reached its core (on_reset)
    fenced_acks: int = 0
    attempt_drops: int = 0
    deliveries_over: int = 0
    drained_ms: int = 0
    trace_hash: str = ""


class GroupSim(ConsumerModel):
    def __init__(self, seed: int, steps: int = 1_500, verbose: bool = False, settings: Settings | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.s = settings or Settings.draw(self.rng)
        self.steps = steps
        self.verbose = verbose
        self.now = 0
        self.events = EventHeap()
        self.result = Result(seed)
        self.phase = "safety"
        self.net = SimNetwork(self.rng, self.s.faults)
        self.check = GroupChecker(self.s.max_deliveries)
        self.node_names = NODES
        self.meta = MetadataState()
        config = {"max_deliveries": self.s.max_deliveries, "backoff_initial_ms": self.s.backoff_initial_ms,
                  "backoff_max_ms": self.s.backoff_max_ms}
        for i, name in enumerate((TOPIC, DLQ)):
            self.meta.apply(i, {"op": "create_topic", "name": name, "id": TOPIC_ID + i, "config": config,
                                "partitions": [[NODES[(p + k) % len(NODES)] for k in range(len(NODES))]
                                               for p in range(self.s.partitions)]})
        self.nodes = {n: SimServiceHost(self, n, self.rng.randint(-self.s.clock_skew_ms_max, self.s.clock_skew_ms_max),
                                        self.meta) for n in NODES}
        # The abstract replicated logs: per partition a leader (None while electing), a term, and the
        # committed stored batches (one offset each); the dead-letter partitions hold records.
        self.leader: dict[TopicPartition, str | None] = {}
        self.term: dict[TopicPartition, int] = {}
        self.log: dict[int, list[bytes | None]] = {p: [] for p in range(self.s.partitions)}   # values (None: control)
        self.batches: dict[TopicPartition, list[bytes]] = {}
        self.dlq_producers: dict[TopicPartition, dict[int, int]] = {}   # producer id -> base offset (sequence 0)
        self.poison: set[tuple[int, int]] = set()
        self.groups = [f"g{i}" for i in range(self.s.groups)]
        self.members: dict[str, Member] = {}
        self.member_starts = 0
        self.next_req = 0
        self.lease_asks: dict[tuple[str, int], tuple[str, int]] = {}     # (endpoint, req id) -> (group, p)
        self.produce_tags: dict[tuple[str, int], int] = {}                # (node, req id) -> reset epoch
        for p in range(self.s.partitions):
            for topic_id in (TOPIC_ID, DLQ_ID):
                tp = TopicPartition(topic_id, p)
                self.batches[tp] = []
                self.term[tp] = 1
                self.leader[tp] = NODES[p % len(NODES)]
            self.dlq_producers[TopicPartition(DLQ_ID, p)] = {}
            self.check.on_leader_change(p)
            for g in self.groups:
                self.check.on_epoch(g, p, 0, 0)
        for host in self.nodes.values():
            host.service = GroupService(host)

    # ------------------------------------------------------------------ the loop

    def at(self, time_ms: int, kind: str, *args: Any) -> None:
        self.events.push(time_ms, kind, args)

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"{self.now:>7} {text}")

    def run(self) -> Result:
        r = self.result
        try:
            self.start()
            while r.steps < self.steps and self.events:
                self.one_step()
            self.begin_drain()
            while self.events and self.now <= self.drain_until and not self.drain_done:
                self.one_step()
            if not self.drained():
                raise Violation("drained in bounded time", self.drain_report())
            r.drained_ms = self.now - self.drain_began
            self.final_checks()
        except Violation as v:
            r.ok, r.invariant, r.detail, r.failed_step, r.phase = False, v.invariant, v.detail, r.steps, self.phase
        except Exception as e:   # a crash of the service, a core or the simulator fails the seed too
            where = traceback.extract_tb(e.__traceback__)[-1]
            r.ok, r.invariant, r.failed_step, r.phase = False, "no exception", r.steps, self.phase
            r.detail = f"{e.__class__.__name__}: {e} at {where.filename}:{where.lineno}"
        r.fenced_acks = self.check.fenced_acks
        r.attempt_drops = self.check.attempt_drops
        r.deliveries_over = self.check.deliveries_over
        r.dead_letters = len(self.check.dead_records)
        r.trace_hash = self.events.trace_hash()
        return r

    def one_step(self) -> None:
        time_ms, kind, args = self.events.pop()
        self.now = max(self.now, time_ms)
        self.result.steps += 1
        self.events.record(time_ms, kind, f"{args[0] if args else ''}|{args[1] if len(args) > 1 else ''}")
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

    def send(self, src: str, dst: str, kind: str, msg: Any, frames: tuple = ()) -> None:
        for t in self.net.deliveries(self.now, src, dst, broadcast=False):
            self.at(t, "arrive", dst, kind, src, msg, frames)

    def ev_arrive(self, dst: str, kind: str, src: str, msg: Any, frames: tuple) -> None:
        host = self.nodes.get(dst)
        if host is not None:
            if host.up:
                self.run_pass(host, lambda: self.node_receives(host, kind, src, msg, list(frames)))
            return
        m = self.members.get(dst)
        if m is not None and m.alive:
            self.on_reply(m, msg, frames)

    # ------------------------------------------------------------------ a node's pass

    def run_pass(self, host: SimServiceHost, work: Callable[[], None]) -> None:
        """What the node's loop does: handle, tick the service, commit, send; then the checks."""
        work()
        if not host.up:
            return
        host.service.tick(self.now)
        host.end_pass()
        for (group, topic_id, p), held in host.service.held.items():
            if topic_id == TOPIC_ID:
                self.check.check_state(host.name, group, p, held.state)

    def node_receives(self, host: SimServiceHost, kind: str, src: str, msg: Any, frames: list) -> None:
        if kind == "reply":
            on_reply = host.pending.pop(getattr(msg, "req_id", -1), None)
            if on_reply is not None:
                on_reply(from_wire(msg.code, msg.message, msg.data) if isinstance(msg, P.ErrorReply) else msg, frames)
            return
        identity = src.encode()
        try:
            if isinstance(msg, P.Produce):
                self.on_produce(host, src, identity, msg, frames)
                return
            handler = host.service.handlers.get(type(msg))
            if handler is None:
                raise ProtocolError(f"{type(msg).__name__} is not a request a node serves")
            if isinstance(msg, G.Ack):
                self.ack_with_oracle(host, identity, msg, frames, handler)
            else:
                handler(identity, msg, frames)
        except ZqError as e:   # as the node: an error reply, and nothing else happens
            if msg.req_id:
                host.reply_error(identity, msg.req_id, e)

    def ack_with_oracle(self, host: SimServiceHost, identity: bytes, msg: G.Ack, frames: list, handler: Any) -> None:
        """The service's on_ack, watched: an Ack from a member the leader's own membership copy does not
        see live and holding the partition changes nothing; the acks it applies are noted."""
        service = host.service
        p = msg.partition
        key = (msg.group, TOPIC_ID, p)
        m = service.memberships.get(msg.group)
        fenced = m is None or not m.is_live(msg.member_id) or (TOPIC, p) not in m.assignment_of(msg.member_id)
        held = service.held.get(key)
        before = held.state.copy() if held is not None else None
        try:
            handler(identity, msg, frames)
        finally:
            held = service.held.get(key)
            after = held.state if held is not None else None
            if fenced and host.leads(TOPIC, p):
                self.check.on_fenced_ack(before, after, f"{host.name}: Ack of {msg.member_id} for {p}")
            if after is not None and not fenced:
                for o in msg.acked:
                    if before is not None:
                        was = before.offsets.get(o)
                        if o < before.committed or (was is not None and (was.acked or was.done)):
                            continue
                    e = after.offsets.get(o)
                    if (e is not None and e.acked) or o < after.committed:
                        self.check.on_ack_applied(msg.group, p, after.reset_epoch, o)
                        self.result.acked += 1
                self.result.nacks += len(msg.nacks)

    def on_node_reply(self, host: SimServiceHost, endpoint: str, msg: Any, frames: tuple) -> None:
        """A node answers: a lease's deliveries are grants (checked when they are handed out)."""
        ask = self.lease_asks.get((endpoint, getattr(msg, "req_id", -1)))   # get: a duplicated Lease is answered twice
        if ask is not None and isinstance(msg, G.LeaseReply) and msg.deliveries:
            group, p = ask
            pairs = list(zip(msg.deliveries[::2], msg.deliveries[1::2]))
            for offset, attempt in pairs:
                self.check.on_grant(group, p, msg.reset_epoch, offset, attempt)
            self.result.deliveries += len(pairs)

    def on_node_request(self, host: SimServiceHost, dst: str, msg: Any, frames: tuple | list) -> None:
        if isinstance(msg, P.Produce):   # a dead-letter copy to the dead-letter partition's leader
            self.produce_tags[(host.name, msg.req_id)] = self.dead_letter_tag(
                host, zbatch.decode_records(frames[0], msg.flags))

    def ev_host_timer(self, name: str, incarnation: int, fn: Callable[[], None]) -> None:
        host = self.nodes[name]
        if host.up and host.incarnation == incarnation:
            self.run_pass(host, fn)

    def ev_host_timeout(self, name: str, incarnation: int, req_id: int) -> None:
        host = self.nodes[name]
        if host.up and host.incarnation == incarnation and req_id in host.pending:
            on_reply = host.pending.pop(req_id)
            self.run_pass(host, lambda: on_reply(LeaderNotAvailable(f"node did not answer request {req_id} in time"), []))

    def start_node_timers(self, host: SimServiceHost) -> None:
        inc = host.incarnation
        self.at(self.now + self.rng.randint(1, TICK_MS), "node_timer", host.name, inc, "tick")
        self.at(self.now + self.rng.randint(1, SYNC_MS), "node_timer", host.name, inc, "sync")

    def ev_node_timer(self, name: str, incarnation: int, what: str) -> None:
        host = self.nodes[name]
        if not host.up or host.incarnation != incarnation:
            return
        if what == "tick":
            self.at(self.now + TICK_MS, "node_timer", name, incarnation, what)
            self.run_pass(host, lambda: None)
        else:
            self.at(self.now + SYNC_MS, "node_timer", name, incarnation, what)
            host.store.sync()

    # ------------------------------------------------------------------ the replicated logs

    def leader_of(self, tp: TopicPartition) -> tuple[str | None, int]:
        return self.leader.get(tp), self.term.get(tp, 0)

    def high_watermark(self, tp: TopicPartition) -> int:
        return len(self.batches[tp])

    def read(self, tp: TopicPartition, offset: int, max_bytes: int) -> list[bytes]:
        out: list[bytes] = []
        size = 0
        for b in self.batches[tp][max(0, offset):]:
            if out and size + len(b) > max_bytes:
                break
            out.append(b)
            size += len(b)
        return out

    def offset_for_time(self, tp: TopicPartition, time_ms: int) -> int | None:
        for i, b in enumerate(self.batches[tp]):
            if zbatch.unpack_header(b).append_time_ms >= time_ms:
                return i
        return None

    def ev_produce(self, p: int) -> None:
        if self.phase != "safety":
            return
        self.append(p, f"{p}:{len(self.log[p])}".encode())
        if self.rng.random() < self.s.poison:
            self.poison.add((p, len(self.log[p]) - 1))

    def append(self, p: int, value: bytes | None) -> None:
        """A committed batch of one record (a leader's epoch marker, a control batch, when None)."""
        tp = TopicPartition(TOPIC_ID, p)
        base = len(self.batches[tp])
        if value is None:
            stored = zbatch.control_batch(base, self.term[tp], self.now)
        else:
            blob = zbatch.encode_records([[self.now, None, value, None]])
            stored = zbatch.make_stored(zbatch.FLAG_VERIFIED, base, 1, self.term[tp], self.now, 0, 0, zbatch.crc(blob),
                                        blob)
        self.batches[tp].append(stored)
        self.log[p].append(value)
        self.check.on_append(p, value)
        leader = self.leader[tp]
        if leader is not None and self.nodes[leader].up:
            host = self.nodes[leader]
            self.run_pass(host, lambda: host.service.on_high_watermark(TOPIC, p, base + 1))

    # ---- dead-letter partitions: an idempotent producer's batch, as zq/core/replication.py dedupes it

    def dead_letter_tag(self, host: SimServiceHost, records: list[list]) -> int:
        """The reset epoch of the source state whose dead letter this is, as the writer sends it (the
        checker's bookkeeping: the record does not carry it)."""
        headers = records[0][3] or {}
        key = (headers["zq-group"].decode(), TOPIC_ID, int(headers["zq-source-partition"]))
        held = host.service.held.get(key)
        return held.state.reset_epoch if held is not None else -1

    def produce(self, host: SimServiceHost, tp: TopicPartition, records: list[list], producer_id: int,
                base_sequence: int, done: Callable[[Any], None], tag: int) -> None:
        """A batch proposed at the dead-letter partition's leader `host`: committed (or a duplicate of
        one committed), answered after a delay; or failed, answered with an error, written or not."""
        assert tp.topic_id == DLQ_ID and len(records) == 1, "only dead-letter copies are produced here"
        inc = host.incarnation
        delay = self.rng.randint(1, self.s.dead_letter_slow_ms_max)
        producers = self.dlq_producers[tp]
        if producer_id and producer_id in producers:
            if base_sequence == 0:   # the retry of the one batch this producer id writes: a duplicate
                self.note_dead_letter(records[0], tag, appended=False)
                outcome = Outcome(0, COMMITTED, producers[producer_id], self.term[tp], host.name, True)
            else:
                outcome = OutOfOrderSequence(f"sequence {base_sequence} of producer {producer_id} is out of order")
            self.at(self.now + delay, "produced", host.name, inc, done, outcome)
            return
        fail = self.phase == "safety" and self.rng.random() < self.s.dead_letter_fail
        written = not fail or self.rng.random() < 0.3   # a failure may come after the copy committed
        base = len(self.batches[tp])
        if written:
            blob = zbatch.encode_records(records)
            self.batches[tp].append(zbatch.make_stored(zbatch.FLAG_VERIFIED, base, 1, self.term[tp], self.now,
                                                       producer_id, base_sequence, zbatch.crc(blob), blob))
            if producer_id:
                producers[producer_id] = base
            self.note_dead_letter(records[0], tag, appended=True)
        outcome = (Outcome(0, COMMITTED, base, self.term[tp], host.name) if not fail
                   else LeaderNotAvailable("the dead-letter partition's leader changed before the write committed"))
        self.at(self.now + delay, "produced", host.name, inc, done, outcome)

    def ev_produced(self, name: str, incarnation: int, done: Callable[[Any], None], outcome: Any) -> None:
        host = self.nodes[name]
        if host.up and host.incarnation == incarnation:   # else the writer crashed: a later sweep writes it again
            self.run_pass(host, lambda: done(outcome))

    def note_dead_letter(self, record: list, tag: int, appended: bool) -> None:
        h = record[3] or {}
        rec = DeadLetterRecord(h["zq-group"].decode(), int(h["zq-source-partition"]), int(h["zq-source-offset"]),
                               tag, int(h["zq-attempts"]), record[2] or b"")
        if appended:
            self.check.on_dead_letter(rec)
        else:
            self.check.on_dead_letter_duplicate(rec)

    def on_produce(self, host: SimServiceHost, src: str, identity: bytes, msg: P.Produce, frames: list) -> None:
        """The node's own Produce handler, for the dead-letter copies other nodes send it."""
        tp = host._must_lead(msg.topic, msg.partition)
        if len(frames) != 1:
            raise ProtocolError("Produce carries one payload frame (the batch)")
        records = zbatch.check_incoming(frames[0], msg.blob_crc, msg.count, DEFAULT.batch_bytes_max,
                                        DEFAULT.batch_records_max, msg.flags, msg.producer_id, msg.base_sequence)
        tag = self.produce_tags.get((src, msg.req_id), -1)   # get: the network may deliver it twice

        def answer(outcome: Any) -> None:
            if isinstance(outcome, ZqError):
                host.reply_error(identity, msg.req_id, outcome)
            else:
                host.reply(identity, P.ProduceReply(msg.req_id, outcome.base_offset, outcome.epoch, self.now, 0))
        self.produce(host, tp, records, msg.producer_id, msg.base_sequence, answer, tag)

    def reset(self, group: str, p: int) -> None:
        """A replay, through the leader's ResetGroup handler, asked by an operator or by a member of
        the group (whose core hears the new reset epoch from the answer)."""
        host = self.nodes[self.rng.choice(NODES)]
        tp = TopicPartition(TOPIC_ID, p)
        if not host.up or self.leader[tp] is None:
            return
        target = self.rng.randint(0, len(self.log[p]))
        leader = self.nodes[self.leader[tp]]
        if not leader.up:
            return
        held = leader.service.held.get((group, TOPIC_ID, p))
        epoch_before = held.state.reset_epoch if held is not None else None
        self.next_req += 1
        msg = G.ResetGroup(self.next_req, group, TOPIC, p, target, None, False, False)
        seekers = [e for e, m in sorted(self.members.items())
                   if m.alive and m.joined and not m.leaving and m.group == group]
        src = "operator"
        if seekers and self.rng.random() < 0.5:   # a member's seek(p, target): its answer reaches that member
            src = self.seek_sent(self.members[self.rng.choice(seekers)], msg)

        def work() -> None:
            self.node_receives(leader, "request", src, msg, [])
            held = leader.service.held.get((group, TOPIC_ID, p))
            if held is not None and held.state.reset_epoch != epoch_before:
                self.check.on_epoch(group, p, held.state.reset_epoch, min(target, len(self.log[p])))
                self.result.resets += 1
                self.say(f"reset {group} {p} to {target}, epoch {held.state.reset_epoch}")
        self.run_pass(leader, work)

    # ------------------------------------------------------------------ node faults

    def crash_node(self, host: SimServiceHost) -> None:
        host.up = False
        host.incarnation += 1
        self.result.node_crashes += 1
        host.store.crash(lambda: self.rng.random() < 0.5)
        host.service = None
        host.pending.clear()
        host.outbox.clear()
        host.pass_writes.clear()
        host.sync_asked = False
        self.say(f"crash {host.name}")
        for tp in sorted(self.leader):
            if self.leader[tp] == host.name:
                self.leader[tp] = None
                self.at(self.now + self.rng.randint(1, ELECTION_MS_MAX), "elect", tp)

    def restart_node(self, host: SimServiceHost) -> None:
        if host.up:
            return
        host.up = True
        host.service = GroupService(host)   # loads the states its store holds
        self.start_node_timers(host)
        self.say(f"restart {host.name}")
        for tp in sorted(self.leader):
            if self.leader[tp] is None:
                self.at(self.now + 1, "elect", tp)

    def ev_elect(self, tp: TopicPartition) -> None:
        if self.leader[tp] is not None and self.nodes[self.leader[tp]].up:
            return
        up = [n for n in NODES if self.nodes[n].up]
        if up:
            self.move_leader(tp, self.rng.choice(up))

    def move_leader(self, tp: TopicPartition, to: str) -> None:
        old = self.leader.get(tp)
        self.leader[tp] = to
        self.term[tp] += 1
        self.result.leader_moves += 1
        self.say(f"leader of {tp}: {old} -> {to}")
        if tp.topic_id == TOPIC_ID:
            self.check.on_leader_change(tp.partition)
            self.append(tp.partition, None)   # the new leader's epoch marker, a control record
            if old is not None and self.nodes[old].up:
                self.run_pass(self.nodes[old], lambda: self.nodes[old].service.on_high_watermark(TOPIC, tp.partition, 0))

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
            tp = TopicPartition(rng.choice((TOPIC_ID, TOPIC_ID, DLQ_ID)), rng.randrange(self.s.partitions))
            choices = [n for n in up if n != self.leader[tp]]
            if choices:
                self.move_leader(tp, rng.choice(choices))
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
        for tp in sorted(self.leader):
            if self.leader[tp] is None:
                self.move_leader(tp, NODES[tp.partition % len(NODES)])
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
                leader = self.leader.get(TopicPartition(TOPIC_ID, p))
                held = self.nodes[leader].service.held.get((g, TOPIC_ID, p)) if leader is not None else None
                if held is None or held.state.committed != len(self.log[p]):
                    return False
        return True

    def drain_report(self) -> str:
        rows = []
        for g in self.groups:
            for p in range(self.s.partitions):
                leader = self.leader.get(TopicPartition(TOPIC_ID, p))
                held = self.nodes[leader].service.held.get((g, TOPIC_ID, p)) if leader is not None else None
                rows.append(f"{g}/{p} leader {leader} hw {len(self.log[p])} state "
                            f"{held.state if held is not None else None}")
        live = [f"{m.endpoint}={m.member_id} gen {c.generation} holds {sorted(c.assigned)} in flight {c.in_flight} "
                f"leasing {sorted(c.leasing)} paused {list(c.paused)} queued {len(c.arrived)}+{len(m.ready)} "
                f"epochs {c.epochs} busy {m.busy} leaders {c.leaders} due {c.due_ms()}"
                for m in self.members.values() if m.alive for c in (m.core,)]
        live += [f"{n}: {sorted((g, mm.generation, sorted(mm.live_members())) for g, mm in (self.nodes[n].service.memberships if self.nodes[n].up else {}).items())}"
                 for n in NODES]
        return "; ".join(rows) + f"; consumers: {', '.join(live)}"

    def final_checks(self) -> None:
        for g in self.groups:
            for p in range(self.s.partitions):
                held = self.nodes[self.leader[TopicPartition(TOPIC_ID, p)]].service.held[(g, TOPIC_ID, p)]
                counts = self.check.check_final(g, p, held.state)
                self.result.acked_and_dead += counts["both"]


def replay_command(seed: int, steps: int = 1_500) -> str:
    return f"python -m zq.sim.groups --seed {seed}" + (f" --steps {steps}" if steps != 1_500 else "")


def run_seed(seed: int, steps: int = 1_500, verbose: bool = False) -> Result:
    return GroupSim(seed, steps=steps, verbose=verbose).run()


def main(argv: list[str] | None = None) -> int:
    ap = seed_parser("python -m zq.sim.groups", "deterministic consumer-groups simulator")
    ap.add_argument("--steps", type=int, default=1_500, help="events in the safety phase")
    args = ap.parse_args(argv)
    if args.seed is not None:
        sim = GroupSim(args.seed, steps=args.steps, verbose=args.verbose)
        print(f"seed {args.seed}: {sim.s.describe()}")
        r = sim.run()
        if not r.ok:
            report_failure(r, replay_command(r.seed, args.steps))
            return 1
        print(f"ok seed {r.seed}: {r.steps} steps, {r.deliveries} deliveries, {r.acked} acks, {r.nacks} nacks, "
              f"{r.dead_letters} dead letters, {r.node_crashes} node crashes, {r.member_crashes} consumer crashes, "
              f"{r.leader_moves} leader moves, {r.resets} resets ({r.seeks} by a member), {r.fenced_acks} fenced acks, "
              f"drained {r.drained_ms} ms after healing, trace {r.trace_hash}")
        return 0
    drained: list[int] = []
    run = run_seeds(lambda seed: run_seed(seed, args.steps), range(args.start, args.start + args.seeds),
                    ("steps", "deliveries", "acked", "nacks", "dead_letters", "acked_and_dead", "node_crashes",
                     "member_crashes", "leader_moves", "resets", "seeks", "fenced_acks", "attempt_drops",
                     "deliveries_over"),
                    lambda r: replay_command(r.seed, args.steps), 500, lambda r: drained.append(r.drained_ms))
    print(f"{run.summary()}; slowest drain {max([0, *drained])} ms (simulated)")
    run.print_replays(lambda r: replay_command(r.seed, args.steps))
    return run.exit_code()


if __name__ == "__main__":
    main_guard(main)
