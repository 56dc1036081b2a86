"""The `__meta` follower simulator: the shipped `MetaFollower` (zq.node.meta) on a seeded network.

    python -m zq.sim.meta --seed S [-v]     replay one seed
    python -m zq.sim.meta --seeds N         run N seeds

Theory of operation
-------------------
One `random.Random(seed)`, one heap of timed events (zq/sim/world.py). A model of `__meta`'s voters (v1, v2, v3)
keeps the log: a committed prefix and its current leader's uncommitted tail. Now and then a
command is proposed (topics created, deleted, moved; other nodes registered) and commits a little
later; now and then the leader changes (or there is none for a while): the old leader's
uncommitted tail is dropped or carried on, and the new leader appends a control batch (one
offset, no command). A leader serves a Fetch only up to its high watermark (the committed end),
parks it when there is nothing new (a long poll, answered on the next commit or after its wait),
and answers RegisterNode once the registration commits; any other voter answers NotLeader with
a hint.

Followers (one or two nodes that do not vote) run the shipped `MetaFollower` through a host made
as zq/io/node_meta.py's: a request table with timeouts, a disk (a volatile view and a durable one;
a pass's writes are committed before its commands are applied), a belief of who leads (from
NotLeader hints and heartbeats). Faults: replies lost, delayed (so reordered), duplicated; a
duplicate that arrives after its request was settled is handed to the follower anyway (the
follower must not count on its host to weed them out); a voter cut off for a while; a commit
that fails (disk full); a crash, losing the pass's unsynced writes and every request in flight,
then a restart from the stored log, sometimes on a new port. One more node votes and applies
`__meta` as its replica commits it (`apply_committed`), its high watermark moving unevenly and
falling back to a stale hint on a restart.

Checks (a `Violation` stops the run): every command is applied once, in log order, none skipped,
none above the high watermark and none that was not committed; the stored copy of `__meta` is
always a prefix of the committed log, written in place; after each applying pass, the follower's
effects have opened a replica of every partition its metadata places on it and closed those of
deleted topics. After the faults stop and a quiet
period: every follower is registered at its current address, stores and has applied the whole
committed log.

tests/test_meta_follower.py runs a few hundred seeds; tests/test_meta_teeth.py breaks the shipped
follower and shows these checks catch it.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
import random
from dataclasses import dataclass, field
from typing import Any

from zq.core.metadata import MetadataState
from zq.node import meta as M
from zq.sim.checks import Violation
from zq.sim.world import EventHeap, main_guard, run_seeds, seed_parser
from zq.types import TopicPartition

VOTERS = ("v1", "v2", "v3")
APPLIER = "v1"                    # the voter whose applying of committed commands is checked
RUN_MS = 15_000                   # the faulty phase, simulated
QUIET_MS = 10_000                 # then no faults: everything must settle within this
REQUEST_TIMEOUT_MS = 3_000        # the model's peer request timeout (past a fetch's long poll)
HEARTBEAT_MS = 250                # how often the leader's heartbeat may tell a follower who leads
EVENTS_MAX = 200_000              # a run that does not end by then is a livelock (a failure)


@dataclass(frozen=True, slots=True)
class Batch:
    base: int
    records: tuple[tuple[int, dict], ...]   # () for a control batch (one offset, no command)

    @property
    def next(self) -> int:
        return self.base + max(1, len(self.records))


@dataclass(frozen=True, slots=True)
class FetchReply:
    batches: tuple[Batch, ...]
    log_end: int


@dataclass(frozen=True, slots=True)
class NotLeader:
    leader: str | None


@dataclass(frozen=True, slots=True)
class Refused:
    why: str


@dataclass(frozen=True, slots=True)
class Ok:
    pass


@dataclass
class MetaSettings:
    followers: int
    loss: float
    duplicate: float
    delay_ms_max: int
    leader_change_ms: int          # mean time between leader changes
    proposal_ms: int               # mean time between proposals
    crash_ms: int                  # mean time between follower crashes (0: none)
    new_port: float                # chance a restart comes back on another port
    disk_full: float               # chance a commit fails
    cut: float                     # chance per leader change that a voter is cut off for a while

    @classmethod
    def draw(cls, rng: random.Random) -> MetaSettings:
        return cls(followers=rng.choice((1, 2)), loss=rng.choice((0.0, 0.05, 0.2)),
                   duplicate=rng.choice((0.0, 0.1, 0.3)), delay_ms_max=rng.choice((5, 50, 400)),
                   leader_change_ms=rng.choice((1_500, 5_000, 15_000)), proposal_ms=rng.choice((100, 400)),
                   crash_ms=rng.choice((0, 3_000, 10_000)), new_port=rng.choice((0.0, 0.5)),
                   disk_full=rng.choice((0.0, 0.05)), cut=rng.choice((0.0, 0.5)))


@dataclass
class MetaResult:
    seed: int
    ok: bool = True
    invariant: str = ""
    detail: str = ""
    events: int = 0
    committed: int = 0
    applied: int = 0
    fetches: int = 0
    redelivered: int = 0
    leader_changes: int = 0
    crashes: int = 0
    registrations: int = 0
    failed_writes: int = 0


class _Log:
    """A follower's copy of `__meta` as the follower sees it (zq.node.meta.LearnerLog)."""

    def __init__(self, end: int) -> None:
        self.learner_end = end


@dataclass
class Follower:
    """A node that does not vote: its disk, its host state, and the shipped MetaFollower."""
    name: str
    port: int
    durable: list[Batch] = field(default_factory=list)
    volatile: list[Batch] = field(default_factory=list)
    incarnation: int = 0
    alive: bool = False
    belief: str | None = None
    pending: dict[int, str] = field(default_factory=dict)     # req id -> "fetch" | "register"
    settled: set[int] = field(default_factory=set)             # req ids answered or timed out
    follower: M.MetaFollower | None = None
    pos: int = 0                                               # the checker's: next offset to be applied
    held: set = field(default_factory=set)

    @property
    def stored_end(self) -> int:
        return self.durable[-1].next if self.durable else 0


class MetaSim:
    def __init__(self, seed: int, verbose: bool = False) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.s = MetaSettings.draw(self.rng)
        self.verbose = verbose
        self.now = 0
        self.events = EventHeap()   # its sequence also numbers the followers' requests
        self.r = MetaResult(seed)
        self.quiet = False
        # the voters' model of __meta
        self.committed: list[Batch] = []
        self.commands: dict[int, dict] = {}                    # committed offset -> command
        self.command_offsets: list[int] = []                   # the same offsets, in order
        self.batch_ends: list[int] = []                        # next offset of each committed batch
        self.tail: list[Batch] = []
        self.leader: str | None = "v1"
        self.epoch = 1
        self.leader_meta = MetadataState()                     # the committed commands, applied
        self.parked: list[tuple[str, int, int, int]] = []      # (follower, incarnation, req id, deadline)
        self.reg_waiters: list[tuple[int, str, int, int]] = []  # (batch end, follower, incarnation, req id)
        self.cut: set[str] = set()
        self.next_topic = 1
        self.followers = {f"f{i}": Follower(f"f{i}", 7200 + 10 * i) for i in range(1, self.s.followers + 1)}
        # the applying voter: its replica's high watermark, and the MetaFollower applying it
        self.v_hw = 0
        self.v_pos = 0
        self.v_follower = M.MetaFollower(APPLIER, ("127.0.0.1", 7100), 1, MetadataState(), _Log(0))
        self.v_register_at = 0                                 # when the voter looks at its registration again

    # ------------------------------------------------------------ the event heap

    def at(self, when: int, kind: str, *args: Any) -> None:
        self.events.push(when, kind, args)

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"{self.now:>7} {text}")

    def run(self) -> MetaResult:
        try:
            self._run()
        except Violation as v:
            self.r.ok, self.r.invariant, self.r.detail = False, v.invariant, v.detail
        self.r.committed = self.hw
        return self.r

    def _run(self) -> None:
        for f in self.followers.values():
            self.at(self.rng.randint(0, 300), "start", f.name)
        self.at(self.rng.randint(0, self.s.proposal_ms), "propose")
        self.at(self._exp(self.s.leader_change_ms), "leader_change")
        self.at(HEARTBEAT_MS, "heartbeat")
        self.at(10, "voter_commit")
        if self.s.crash_ms:
            self.at(self._exp(self.s.crash_ms), "crash")
        self._append(())   # the first leader's control batch
        while self.events:
            when, kind, args = self.events.pop()
            if when > RUN_MS + QUIET_MS:
                break
            if when > RUN_MS and not self.quiet:
                self._heal()
            self.now = max(self.now, when)
            self.r.events += 1
            if self.r.events > EVENTS_MAX:
                raise Violation("livelock", f"more than {EVENTS_MAX} events")
            getattr(self, f"_on_{kind}")(*args)
        self.now = RUN_MS + QUIET_MS
        self._check_settled()

    def _exp(self, mean: int) -> int:
        return self.now + 1 + int(self.rng.expovariate(1 / mean))

    def _heal(self) -> None:
        self.quiet = True
        self.say("healed: no more faults")
        self.cut.clear()
        if self.leader is None:
            self._elect(self.rng.choice(VOTERS))
        for f in self.followers.values():
            if not f.alive:
                self.at(self.now, "start", f.name)

    # ------------------------------------------------------------ the voters' model

    @property
    def hw(self) -> int:
        return self.committed[-1].next if self.committed else 0

    @property
    def log_end(self) -> int:
        return self.tail[-1].next if self.tail else self.hw

    def _append(self, commands: tuple[dict, ...]) -> Batch:
        base = self.log_end
        batch = Batch(base, tuple((base + i, c) for i, c in enumerate(commands)))
        self.tail.append(batch)
        self.at(self.now + self.rng.randint(2, 60), "commit", self.epoch)
        return batch

    def _on_propose(self) -> None:
        if not self.quiet:
            self.at(self._exp(self.s.proposal_ms), "propose")
        if self.leader is None:
            return
        commands = []
        for _ in range(self.rng.choice((1, 1, 2, 3))):
            kind = self.rng.random()
            topics = sorted(self.leader_meta.topics.values(), key=lambda t: t.id)
            if kind < 0.4 or not topics:
                name = f"t{self.next_topic}"
                commands.append({"op": "create_topic", "name": name, "id": self.next_topic, "config": {},
                                 "created_ms": self.now, "partitions": [self.rng.sample(
                                     [*VOTERS, *self.followers], 3) for _ in range(self.rng.randint(1, 3))]})
                self.next_topic += 1
            elif kind < 0.55:
                commands.append({"op": "delete_topic", "name": self.rng.choice(topics).name})
            elif kind < 0.85:
                t = self.rng.choice(topics)
                commands.append({"op": "reassign_partition", "id": t.id, "partition": 0,
                                 "replicas": self.rng.sample([*VOTERS, *self.followers], 3)})
            else:
                commands.append({"op": "register_node", "name": f"x{self.rng.randint(1, 3)}", "host": "127.0.0.1",
                                 "port": self.rng.randint(8000, 8100), "incarnation": self.now})
        self._append(tuple(commands))

    def _on_commit(self, epoch: int) -> None:
        if epoch != self.epoch or not self.tail:
            return
        batch = self.tail.pop(0)
        self.committed.append(batch)
        self.batch_ends.append(batch.next)
        for offset, command in batch.records:
            self.commands[offset] = command
            self.command_offsets.append(offset)
            self.leader_meta.apply(offset, command)
        self.leader_meta.skip_to(batch.next)
        for end, name, inc, req_id in [w for w in self.reg_waiters if w[0] <= self.hw]:
            self.reg_waiters.remove((end, name, inc, req_id))
            self._reply(self.leader, name, inc, req_id, Ok())
        parked, self.parked = self.parked, []
        for name, inc, req_id, offset in parked:
            self._serve_fetch(name, inc, req_id, offset)

    def _on_leader_change(self) -> None:
        if self.quiet:
            return
        self.at(self._exp(self.s.leader_change_ms), "leader_change")
        self.r.leader_changes += 1
        old = self.leader
        self.leader = None
        self.epoch += 1
        if self.rng.random() < 0.5:
            self.tail.clear()   # the old leader's uncommitted entries are lost (their registrations are not answered)
        self.reg_waiters = [w for w in self.reg_waiters if w[0] <= self.log_end]
        self.cut.clear()
        if self.rng.random() < self.s.cut:
            self.cut.add(self.rng.choice(VOTERS))
        for name, inc, req_id, _offset in self.parked:
            self._reply(old, name, inc, req_id, NotLeader(None))
        self.parked = []
        self.say(f"leader {old} gone (epoch {self.epoch}); cut {sorted(self.cut)}")
        self.at(self.now + self.rng.choice((0, 50, 300, 1_500)), "elect", self.epoch)

    def _on_elect(self, epoch: int) -> None:
        if epoch == self.epoch and self.leader is None:
            self._elect(self.rng.choice(VOTERS))

    def _elect(self, name: str) -> None:
        self.leader = name
        for _ in self.tail:
            self.at(self.now + self.rng.randint(2, 60), "commit", self.epoch)
        self._append(())
        self.say(f"{name} leads __meta in epoch {self.epoch}")

    # ------------------------------------------------------------ requests and replies

    def _send(self, src: str, dst: str) -> int | None:
        """The delay of a message, or None if it is lost."""
        if src in self.cut or dst in self.cut:
            return None
        if not self.quiet and self.rng.random() < self.s.loss:
            return None
        return self.rng.randint(0, self.s.delay_ms_max if not self.quiet else 5)

    def _reply(self, voter: str | None, name: str, inc: int, req_id: int, reply: Any) -> None:
        if voter is None:
            return
        delay = self._send(voter, name)
        if delay is None:
            return
        self.at(self.now + delay, "reply", name, inc, req_id, reply)
        if not self.quiet and self.rng.random() < self.s.duplicate:
            self.at(self.now + delay + self.rng.randint(0, 2_000), "reply", name, inc, req_id, reply)

    def _on_request(self, voter: str, name: str, inc: int, req_id: int, kind: str, arg: Any) -> None:
        if voter != self.leader:
            self._reply(voter, name, inc, req_id, NotLeader(self.leader))
        elif kind == "fetch":
            self._serve_fetch(name, inc, req_id, arg)
        else:
            host, port = arg
            known = self.leader_meta.nodes.get(name)
            if known is not None and (known.host, known.port) == (host, port):
                self._reply(voter, name, inc, req_id, Ok())
                return
            batch = self._append(({"op": "register_node", "name": name, "host": host, "port": port,
                                   "incarnation": inc},))
            self.reg_waiters.append((batch.next, name, inc, req_id))

    def _serve_fetch(self, name: str, inc: int, req_id: int, offset: int) -> None:
        if offset > self.hw:
            self._reply(self.leader, name, inc, req_id, Refused(f"offset {offset} is past the end {self.hw}"))
            return
        if offset == self.hw:
            self.parked.append((name, inc, req_id, offset))
            self.at(self.now + M.META_FETCH_WAIT_MS, "poll_expired", self.epoch, name, inc, req_id)
            return
        first = bisect_right(self.batch_ends, offset)
        out = self.committed[first:first + self.rng.randint(1, 4)]
        self._reply(self.leader, name, inc, req_id, FetchReply(tuple(out), self.log_end))

    def _on_poll_expired(self, epoch: int, name: str, inc: int, req_id: int) -> None:
        for p in self.parked:
            if p[:3] == (name, inc, req_id):
                self.parked.remove(p)
                self._reply(self.leader, name, inc, req_id, FetchReply((), self.log_end))
                return

    def _on_heartbeat(self) -> None:
        self.at(self.now + HEARTBEAT_MS, "heartbeat")
        for f in self.followers.values():
            if f.alive and self.leader is not None and self._send(self.leader, f.name) is not None:
                f.belief = self.leader

    # ------------------------------------------------------------ a follower's host (as zq/io/node_meta.py)

    def _on_start(self, name: str) -> None:
        f = self.followers[name]
        if f.alive:
            return
        f.alive = True
        f.incarnation += 1
        if f.incarnation > 1 and self.rng.random() < self.s.new_port:
            f.port += 1
        f.volatile = list(f.durable)
        f.pending.clear()
        f.settled.clear()
        f.belief = self.rng.choice((None, *VOTERS))
        meta = MetadataState()
        for batch in f.durable:   # what the node's start-up applies: its stored copy of __meta
            for offset, command in batch.records:
                meta.apply(offset, command)
        f.pos = f.stored_end
        f.held = {tp for tp, target in self._targets(meta) if name in target}   # the start-up opens these
        f.follower = M.MetaFollower(name, ("127.0.0.1", f.port), f.incarnation, meta, _Log(f.stored_end))
        self.say(f"{name} starts (incarnation {f.incarnation}, port {f.port}) from stored offset {f.stored_end}")
        self.at(self.now, "follow", name, f.incarnation)

    def _on_crash(self) -> None:
        if self.quiet:
            return
        self.at(self._exp(self.s.crash_ms), "crash")
        f = self.followers[self.rng.choice(sorted(self.followers))]
        if not f.alive:
            return
        self.r.crashes += 1
        f.alive = False
        f.volatile = list(f.durable)
        self.say(f"{f.name} crashes")
        self.at(self.now + self.rng.randint(10, 2_000), "start", f.name)

    def _request(self, f: Follower, kind: str, to: str, arg: Any) -> None:
        req_id = self.events.next_seq()
        f.pending[req_id] = kind
        delay = self._send(f.name, to)
        if delay is not None:
            self.at(self.now + delay, "request", to, f.name, f.incarnation, req_id, kind, arg)
        timeout = REQUEST_TIMEOUT_MS + (M.META_FETCH_WAIT_MS if kind == "fetch" else 0)
        self.at(self.now + timeout, "timeout", f.name, f.incarnation, req_id)

    def _on_timeout(self, name: str, inc: int, req_id: int) -> None:
        f = self.followers[name]
        if f.alive and f.incarnation == inc and req_id in f.pending:
            self._answered(f, f.pending.pop(req_id), Refused("timed out"))

    def _on_reply(self, name: str, inc: int, req_id: int, reply: Any) -> None:
        f = self.followers[name]
        if not f.alive or f.incarnation != inc:
            return   # a reply to an earlier incarnation: its connection is gone
        kind = f.pending.pop(req_id, None)
        if kind is not None:
            self._answered(f, kind, reply)
        elif isinstance(reply, FetchReply) and reply.batches:
            self.r.redelivered += 1     # settled already: the follower gets it anyway
            self._fetched(f, reply)

    def _answered(self, f: Follower, kind: str, reply: Any) -> None:
        if isinstance(reply, NotLeader) and reply.leader:
            f.belief = reply.leader
        if kind == "register":
            step = f.follower.on_register_reply(isinstance(reply, Ok))
            if isinstance(step, M.Registered):
                self.r.registrations += 1
            elif isinstance(step, M.Wait):
                self.at(self.now + step.delay_ms, "register", f.name, f.incarnation)
            return
        if not isinstance(reply, FetchReply):
            self.at(self.now + f.follower.on_fetch_failed().delay_ms, "follow", f.name, f.incarnation)
            return
        self.r.fetches += 1
        if self._fetched(f, reply):
            self.at(self.now, "follow", f.name, f.incarnation)

    def _fetched(self, f: Follower, reply: FetchReply) -> bool:
        """One pass: write what the follower takes, commit, apply. False: the node crashed."""
        batches = [M.FetchedBatch(b.base, b.next, b, lambda b=b: list(b.records)) for b in reply.batches]
        for batch in f.follower.on_fetched(batches):
            b = batch.value
            end = f.volatile[-1].next if f.volatile else 0
            if b.base != end:
                raise Violation("written in place", f"{f.name} wrote the batch at {b.base} onto a log ending at {end}")
            if len(f.volatile) >= len(self.committed) or self.committed[len(f.volatile)] != b:
                raise Violation("stored a prefix of the committed log", f"{f.name} stored a batch at {b.base} "
                                "the leader never committed there")
            f.volatile.append(b)
        if len(f.volatile) == len(f.durable):
            return True
        if not self.quiet and self.s.crash_ms and self.rng.random() < 0.05:
            self._crash_now(f)
            return False
        if not self.quiet and self.rng.random() < self.s.disk_full:
            self.r.failed_writes += 1
            f.volatile = list(f.durable)
            f.follower.write_failed(f.stored_end)
            return True
        f.durable = list(f.volatile)
        self._applied(f.name, f.follower.apply_learned(lambda tp: tp in f.held), f, None)
        self._check_held(f)
        return True

    def _crash_now(self, f: Follower) -> None:
        self.r.crashes += 1
        f.alive = False
        f.volatile = list(f.durable)
        self.say(f"{f.name} crashes inside its commit")
        self.at(self.now + self.rng.randint(10, 2_000), "start", f.name)

    def _on_follow(self, name: str, inc: int) -> None:
        f = self.followers[name]
        if not f.alive or f.incarnation != inc:
            return
        step = f.follower.follow_step(False, VOTERS, f.belief, f.belief is not None)
        if isinstance(step, M.Wait):
            self.at(self.now + step.delay_ms, "follow", name, inc)
        elif isinstance(step, M.RegisterFirst):
            self._on_register(name, inc)
            self.at(self.now + step.delay_ms, "follow", name, inc)
        elif isinstance(step, M.Fetch):
            self._request(f, "fetch", step.leader, step.offset)

    def _on_register(self, name: str, inc: int) -> None:
        f = self.followers[name]
        if not f.alive or f.incarnation != inc or "register" in f.pending.values():
            return
        step = f.follower.register_step(False, False, f.belief, f.belief is not None)
        if isinstance(step, M.Wait):
            self.at(self.now + step.delay_ms, "register", name, inc)
        elif isinstance(step, M.SendRegistration):
            self._request(f, "register", step.leader, (f.follower.host, f.follower.port))

    # ------------------------------------------------------------ the applying voter

    def _on_voter_commit(self) -> None:
        self.at(self.now + self.rng.randint(5, 300), "voter_commit")
        if self.rng.random() < 0.03 and not self.quiet:
            # a restart: the stored high-watermark hint may lag; the start-up applies up to it
            hint = self.rng.choice([0, *self.batch_ends[:bisect_right(self.batch_ends, self.v_hw)]])
            meta = MetadataState()
            for b in self.committed:
                for offset, command in b.records:
                    if offset < hint:
                        meta.apply(offset, command)
            self.v_follower = M.MetaFollower(APPLIER, ("127.0.0.1", 7100), self.v_follower.incarnation + 1, meta,
                                             _Log(0))
            self.v_hw = self.v_pos = hint
            self.v_register_at = self.now
            return
        if self.v_hw < self.hw:
            self.v_hw = self.rng.choice(self.batch_ends[bisect_right(self.batch_ends, self.v_hw):])
        upto = self.v_hw
        self._applied(APPLIER, self.v_follower.apply_committed(upto, self._read_voter_log, lambda tp: False),
                      None, upto)
        if self.now >= self.v_register_at:
            self._voter_registers()

    def _voter_registers(self) -> None:
        """The voter's registration, as a node's `_register_self`: appended by itself when it
        leads, else sent to the leader (whose answer it does not need: it applies the command)."""
        leader = self.leader if APPLIER not in self.cut else None
        step = self.v_follower.register_step(False, self.leader == APPLIER, leader, leader is not None)
        if isinstance(step, M.AppendRegistration):
            self._append((step.command,))
            self.v_register_at = self.now + step.recheck_ms
        elif isinstance(step, M.SendRegistration):
            if self._send(APPLIER, step.leader) is not None and self._send(step.leader, APPLIER) is not None:
                known = self.leader_meta.nodes.get(APPLIER)
                if known is None or (known.host, known.port) != (self.v_follower.host, self.v_follower.port):
                    self._append((self.v_follower.registration_command(),))
            self.v_register_at = self.now + REQUEST_TIMEOUT_MS
        elif isinstance(step, M.Wait):
            self.v_register_at = self.now + step.delay_ms

    def _read_voter_log(self, start: int, upto: int) -> list[tuple[int, dict]]:
        """The voter's stored log from the batch holding `start` on (uncommitted entries included:
        the store's read is bounded by `upto`, but the follower must not count on it)."""
        first = bisect_right(self.batch_ends, start)
        return [rec for b in [*self.committed[first:], *self.tail] for rec in b.records]

    # ------------------------------------------------------------ checks

    def _applied(self, name: str, effects: Any, f: Follower | None, hw: int | None) -> None:
        """Check each effect as the host would act on it: once, in order, committed, below the watermark."""
        pos = f.pos if f is not None else self.v_pos
        for effect in effects:
            if isinstance(effect, M.Noted):
                offset = effect.offset
                want = self._next_command(pos)
                if offset != want:
                    raise Violation("applied once, in order", f"{name} applied the command at {offset}; the next one "
                                    f"to apply was at {want} (applied up to {pos})")
                if self.commands.get(offset) != effect.command:
                    raise Violation("applied only what committed", f"{name} applied {effect.command} at {offset}; "
                                    f"the committed log has {self.commands.get(offset)}")
                if hw is not None and offset >= hw:
                    raise Violation("never above the high watermark", f"{name} applied {offset}, high watermark {hw}")
                pos = offset + 1
                self.r.applied += 1
            elif isinstance(effect, M.Applied):
                skipped = self._next_command(pos)
                if skipped is not None and skipped < effect.applied:
                    raise Violation("applied once, in order", f"{name} says applied to {effect.applied} but never "
                                    f"applied the command at {skipped}")
                if effect.applied > self.hw or (hw is not None and effect.applied > hw):
                    raise Violation("never above the high watermark", f"{name} applied to {effect.applied}")
                pos = max(pos, effect.applied)
            elif f is not None:
                self._track_held(f, effect)
        if f is not None:
            f.pos = pos
        else:
            self.v_pos = pos

    def _track_held(self, f: Follower, effect: Any) -> None:
        if isinstance(effect, M.OpenTopic):
            f.held |= {TopicPartition(effect.topic.id, p) for p, r in enumerate(effect.topic.partitions) if f.name in r}
        elif isinstance(effect, M.CloseTopic):
            f.held -= {TopicPartition(effect.topic.id, p) for p in range(len(effect.topic.partitions))}
        elif isinstance(effect, M.OpenMoved):
            f.held.add(TopicPartition(effect.topic.id, effect.partition))

    @staticmethod
    def _targets(meta: MetadataState) -> list[tuple[TopicPartition, list[str]]]:
        return [(TopicPartition(t.id, p), target) for t in meta.topics.values() for p, target in enumerate(t.partitions)]

    def _check_held(self, f: Follower) -> None:
        """The replicas the follower's effects opened: every partition its metadata places on it,
        and none of a deleted topic."""
        meta = f.follower.meta
        missing = sorted(tp for tp, target in self._targets(meta) if f.name in target and tp not in f.held)
        stale = sorted(tp for tp in f.held if tp.topic_id not in meta.topics_by_id)
        if missing or stale:
            raise Violation("opens and closes what __meta says", f"{f.name}: not opened {missing}, not closed {stale}")

    def _next_command(self, pos: int) -> int | None:
        i = bisect_left(self.command_offsets, pos)
        return self.command_offsets[i] if i < len(self.command_offsets) else None

    def _check_settled(self) -> None:
        if not self.v_follower.is_registered():
            raise Violation("registered once the leader is reachable", f"{APPLIER} is in __meta as "
                            f"{self.v_follower.meta.nodes.get(APPLIER)}")
        for f in self.followers.values():
            meta = f.follower.meta
            known = meta.nodes.get(f.name)
            if known is None or (known.host, known.port) != ("127.0.0.1", f.port):
                raise Violation("registered once the leader is reachable",
                                f"{f.name} (port {f.port}) is in __meta as {known}")
            if f.stored_end != self.hw or f.pos < self.hw:
                raise Violation("caught up once the leader is reachable",
                                f"{f.name} stores to {f.stored_end}, applied to {f.pos}; committed end {self.hw}")


PROGRESS_EVERY = 100   # seeds between progress lines


def run_seed(seed: int, verbose: bool = False) -> MetaResult:
    return MetaSim(seed, verbose).run()


def main(argv: list[str] | None = None) -> int:
    args = seed_parser("python -m zq.sim.meta", "the __meta follower simulator").parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    progress_every = 0 if args.seed is not None else PROGRESS_EVERY
    run = run_seeds(lambda seed: run_seed(seed, args.verbose), seeds,
                    ("events", "committed", "applied", "fetches", "redelivered", "leader_changes", "crashes",
                     "registrations", "failed_writes"),
                    lambda r: f"python -m zq.sim.meta --seed {r.seed}", progress_every)
    print(run.summary())
    return run.exit_code()


if __name__ == "__main__":
    main_guard(main)
