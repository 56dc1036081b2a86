"""Replica hosting and the persist-then-send pipeline: one implementation, run by the real node
(zq/io/node.py, through RocksDB) and by the cluster simulator (zq/sim/cluster.py, through its
simulated disk and network).

A pass of a node's loop steps its replicas' cores (`zq.core.replication.Replica`) with what
arrived and marks them dirty; `ReplicaSet.finish_pass` then, for up to `READY_ROUNDS_MAX` rounds:

1. collects every dirty core's `Ready` and writes its effects (reset, truncation, entries, hard
   state) into the pass's ONE storage transaction, asking for an fsync when any of it must be
   (`needs_sync`: a vote or an epoch, or entries of a topic with durability = fsync); a leader's
   Appends go out at once, before the commit (`early_messages`, below);
2. commits the transaction (the host makes it durable before `commit` returns; or, when a
   Ready has effects that may act before the fsync, writes it, acts on those, then fsyncs), and
   `advance()`s every core that handed out a Ready;
3. only then, per core: reports durability (`on_persisted`), which frees acks and commits for the
   next round, sends its messages, answers the producers whose batches committed (`waiters`) or
   were written (`leader_acks`), and hands the rest (role, high watermark, removal) to the
   composition (`ReplicaEvents.after_durable`).

Nothing is sent or answered before the write it depends on is durable: a follower's ack and a
leader's answer to a producer are effects of a round after the one whose commit made the entries
durable. The one exception is the Raft thesis' section 10.2.1 (etcd's raft does the same): a
leader sends its Appends while its own write of those entries is still being made durable, so
its fsync runs in parallel with the followers'. That is safe because an Append promises nothing
about the leader's disk: the core counts the leader towards a commit only from `on_persisted`
(its `durable_end`), like any follower's ack, and a leader that crashes before its fsync restarts
as a follower of a later epoch (the simulator crashes leaders inside that fsync:
`Settings.crash_in_sync`). Only a leader's Appends of a Ready that changes neither its role nor
anything that must be synced before it acts (a vote, an epoch) go early, and what a Ready says
was committed acts before the fsync (below); everything else waits. A failed commit (disk full)
acts on no core's writes: those cores are reopened from the disk (`ReplicaEvents.write_failed`).
An unexpected error on one core fences that one replica.

A Ready that only moves the high-watermark hint need not be on disk before anything is sent (a
restarted replica just serves less until its leader tells it more): it waits in
`lazy_hard_states` and rides along with the next write.

What a Ready says was committed acts between the pass's write and its fsync
(`commit_effects_early`): its outcomes (answers to producers whose batches a majority holds
durably, or refusals) and a moved high watermark (parked fetches). Neither depends on this pass's
writes: the core counts its own copy towards a commit only from `on_persisted`. Without this, a
leader's answers waited for the fsync of the next entries, proposed in the same pass.

A pass costs what changed, not how many replicas the node hosts. Only dirty replicas (stepped,
ticked or told something this pass) are asked for a Ready; and timers are kept per replica as a
heap of deadlines (`deadlines`): a replica's `next_timer_ms` is read again each time it went
through a pass's Ready (every event that can move a core's timer dirties it first), and
`tick_due` ticks only the replicas whose deadline has come, so a node with 1,000 idle
partitions touches none of them in a pass. `next_deadline` is when the host must run a pass
even if nothing arrives (the node's poll timeout; the simulator's one timer event per node).

Standard library only; the host's store and the composition's reactions come in as Protocols
(zq/node/host.py).
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

from zq.core.repl_types import LEADER, Append
from zq.node.host import Counters, ReplicaEvents, Storage

if TYPE_CHECKING:
    from zq.core.replication import Replica

READY_ROUNDS_MAX = 4   # write-then-send rounds per pass (acks after durability need one more)


@dataclass(slots=True)
class Part:
    """A partition this node holds a replica of."""
    tp: Hashable                  # the node's TopicPartition; the simulator's partition number
    name: str
    replica: Replica | None       # None: a learner's copy of __meta (no vote, no acks)
    sync: bool                    # durability = fsync
    log_start: int = 0
    learner_end: int = 0          # learner only: its log end (= its high watermark)
    waiters: dict[int, Callable[[Any], None]] = field(default_factory=dict)   # proposal id -> callback
    leader_acks: list[tuple[int, Callable[[Any], None]]] = field(default_factory=list)  # (end, callback): acks=leader

    @property
    def high_watermark(self) -> int:
        return self.replica.high_watermark if self.replica else self.learner_end

    @property
    def log_end(self) -> int:
        return self.replica.log_end if self.replica else self.learner_end

    @property
    def epoch(self) -> int:
        return self.replica.epoch if self.replica else 0


def starting_configuration(node: str, initial: Sequence[str], *, reassigned: bool, has_hard_state: bool,
                           removed_here: bool) -> list[str]:
    """The configuration a replica of a partition opens with, before its log says more (the
    core keeps it in the hard state once it has one): the set the partition was created with,
    unless the partition was ever reassigned and this replica has no hard state and either was
    made by the reassignment (its node is not in the initial set) or was deleted here by an
    earlier move (`removed_here`). Such a replica knows no configuration (`[]`): it neither
    stands nor votes until a configuration entry reaches it, because its node may have been a
    member whose log is gone. An initial member that never wrote anything for the partition
    (it was down from the topic's creation until after a reassignment) keeps the initial set:
    with an empty log it cannot win in it, and it must vote, or a set that counts it and lost
    its leader early never elects again (simulator, `--nodes 5`: tests/test_node_teeth.py)."""
    if reassigned and not has_hard_state and (node not in initial or removed_here):
        return []
    return list(initial)


def needs_sync(part: Part, rd: Any) -> bool:
    """Whether a Ready's writes must be fsynced before anything depending on them goes out: the
    core asks (a vote, a new epoch), or it appends entries of a topic with durability = fsync.
    (With durability = replicated a write counts once written: the operating system keeps it
    through a process crash, and only a majority losing power at once loses it.)"""
    return rd.must_sync or (part.sync and bool(rd.entries))


def acts_early(part: Part, rd: Any) -> bool:
    """Whether parts of this Ready may act before the pass's fsync: it changes neither the
    replica's role nor anything that must be durable before it acts (a vote, an epoch), and it
    neither truncates nor restarts the log."""
    return (part.replica is not None and rd.role is None and not rd.must_sync and rd.truncate_from is None
            and rd.reset_to is None)


def has_early_effects(part: Part, rd: Any) -> bool:
    """Whether a Ready has effects that may act between the pass's write and its fsync
    (`ReplicaSet.commit_effects_early`): outcomes or a moved high watermark, when it may act early."""
    return bool(rd.outcomes or rd.high_watermark is not None) and acts_early(part, rd)


def early_messages(part: Part, rd: Any) -> tuple[tuple, tuple]:
    """(messages that may go before the pass's commit, the rest): a leader's Appends, when the
    Ready neither changes its role nor writes anything that must be durable before it acts."""
    if not acts_early(part, rd) or part.replica.role != LEADER:
        return (), rd.messages
    early = tuple(out for out in rd.messages if type(out.message) is Append)
    if not early:
        return (), rd.messages
    return early, tuple(out for out in rd.messages if type(out.message) is not Append)


def hint_only(rd: Any) -> bool:
    """A Ready whose only write is the hard state's high-watermark hint (see the module doc)."""
    return (rd.truncate_from is None and rd.reset_to is None and not rd.entries and not rd.must_sync
            and rd.hard_state is not None)


class ReplicaSet:
    """The replicas a node hosts and the pass that persists their effects, then sends them."""

    def __init__(self, storage: Storage, events: ReplicaEvents, counters: Counters,
                 rounds_max: int = READY_ROUNDS_MAX) -> None:
        self.storage = storage
        self.events = events
        self.counters = counters
        self.rounds_max = rounds_max
        self.parts: dict[Hashable, Part] = {}
        self.dirty: set[Hashable] = set()                    # replicas to ask for a Ready this pass
        self.fenced: dict[Hashable, str] = {}                # set aside after an internal error: why
        self.lazy_hard_states: dict[Hashable, Any] = {}      # high-watermark hints awaiting the next write
        self.txn: Any = None                                 # this pass's transaction, once anything wrote
        self.sync_needed = False
        self._sync_due = False                               # written, and its fsync still to come (sync())
        # Timers: each replica's next_timer_ms as last read, and a heap of (deadline, seq, tp) whose
        # entries are current only while they match `deadlines` (the others are skipped, lazily).
        self.deadlines: dict[Hashable, int] = {}
        self._deadline_heap: list[tuple[int, int, Hashable]] = []
        self._deadline_seq = itertools.count()
        self._readied: set[Hashable] = set()                 # asked for a Ready this pass: timers read again

    # ---------------------------------------------------------------- the pass's transaction

    def begin(self) -> Any:
        """The pass's write transaction (one per pass; the composition and services write into it too)."""
        if self.txn is None:
            self.txn = self.storage.begin()
        return self.txn

    def clear(self) -> None:
        """Forget every replica and the pass's writes (the store was set aside)."""
        self.parts.clear()
        self.dirty.clear()
        self.lazy_hard_states.clear()
        self.txn = None
        self.sync_needed = False
        self._sync_due = False
        self.deadlines.clear()
        self._deadline_heap.clear()
        self._readied.clear()

    def forget(self, tp: Hashable) -> Part | None:
        """Stop hosting a replica (its data is the caller's to delete); nothing more of it is written."""
        self.lazy_hard_states.pop(tp, None)
        self.dirty.discard(tp)
        self.deadlines.pop(tp, None)
        self._readied.discard(tp)
        return self.parts.pop(tp, None)

    # ---------------------------------------------------------------- timers

    def tick_due(self, now_ms: int, wall_ms: int | None = None) -> int:
        """Tick the replicas whose timer is due at `now_ms`, and only those (marked dirty, so their
        Ready is taken and their next deadline read); returns how many were ticked."""
        heap, ticked = self._deadline_heap, 0
        while heap and heap[0][0] <= now_ms:
            due, _, tp = heapq.heappop(heap)
            if self.deadlines.get(tp) != due:
                continue   # read again since: a later entry is the current one
            del self.deadlines[tp]
            part = self.parts.get(tp)
            if part is None or part.replica is None or tp in self.fenced:
                continue
            if part.replica.next_timer_ms() <= now_ms:
                part.replica.tick(now_ms, wall_ms)
                ticked += 1
            self.dirty.add(tp)
        return ticked

    def peer_lost(self, node: str, now_ms: int, wall_ms: int | None = None) -> int:
        """The host's connection to `node` closed (a hint: see Replica.peer_lost): every replica
        following it brings its election forward. Returns how many were told."""
        told = 0
        for tp, part in self.parts.items():
            replica = part.replica
            if replica is None or tp in self.fenced or replica.leader != node or replica.role == LEADER:
                continue
            replica.tick(now_ms, wall_ms)
            replica.peer_lost(node)
            self.dirty.add(tp)   # its next deadline is read again in the pass
            told += 1
        return told

    def next_deadline(self) -> int | None:
        """The earliest replica timer (monotonic ms), None if no replica has one."""
        heap = self._deadline_heap
        while heap and self.deadlines.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _read_deadline(self, tp: Hashable) -> None:
        part = self.parts.get(tp)
        if part is None or part.replica is None or tp in self.fenced:
            self.deadlines.pop(tp, None)
            return
        due = part.replica.next_timer_ms()
        if self.deadlines.get(tp) == due:
            return
        self.deadlines[tp] = due
        heap = self._deadline_heap
        if len(heap) > 2 * len(self.deadlines) + 64:
            # Mostly superseded entries: rebuild from the current ones (amortised over as many reads).
            heap[:] = [(d, next(self._deadline_seq), t) for t, d in self.deadlines.items() if t != tp]
            heapq.heapify(heap)
        heapq.heappush(heap, (due, next(self._deadline_seq), tp))

    # ---------------------------------------------------------------- persist, then send

    def finish_pass(self) -> None:
        """Write what the cores (and the composition) produced as one transaction, then act on it;
        then read the timers of the replicas that went through it again."""
        try:
            self._rounds()
        finally:
            readied, self._readied = self._readied, set()
            for tp in readied:
                self._read_deadline(tp)

    def _rounds(self) -> None:
        for _ in range(self.rounds_max):
            readys = self.collect_readys()
            if self.txn is None and not readys:
                break
            early = any(has_early_effects(part, rd) for part, rd in readys)
            # With effects that may act before the fsync, the write and the fsync are two steps
            # (RocksDB: a write, then a WAL sync; as dear as one synced write, measured).
            ok = self.commit(sync_now=not early)
            for part, rd in readys:
                part.replica.advance()
            if ok and early:
                acted = ((part, self.commit_effects_early(part, rd)) for part, rd in readys)
                readys = [(part, rd) for part, rd in acted if rd is not None]
                self.sync()
            for part, rd in readys:
                if ok or not rd.has_writes:
                    try:
                        self.after_durable(part, rd)
                    except Exception as e:
                        self.events.fence(part, "acting on its durable writes", e)
                else:
                    self.events.write_failed(part)
            if not ok:
                break
            self.events.after_round()

    def collect_readys(self) -> list[tuple[Part, Any]]:
        out = []
        sent_early = False
        dirty = sorted(self.dirty)
        self.dirty.clear()
        for tp in dirty:
            part = self.parts.get(tp)
            if part is None or part.replica is None or tp in self.fenced:
                continue
            self._readied.add(tp)
            try:
                rd = part.replica.ready()
                if rd.empty:
                    part.replica.advance()
                    continue
                if hint_only(rd):
                    self.lazy_hard_states[tp] = rd.hard_state
                    rd = dataclasses.replace(rd, hard_state=None)
                if rd.has_writes:
                    self.write_ready(part, rd)
                early, rest = early_messages(part, rd)
                if early:
                    for message in early:
                        self.events.route(part, message)
                    rd = dataclasses.replace(rd, messages=rest)
                    sent_early = True
            except Exception as e:
                self.events.fence(part, "preparing its writes", e)
                continue
            out.append((part, rd))
        if sent_early:
            self.events.send_now()   # the leaders' Appends leave while the commit below is made durable
        return out

    def commit_effects_early(self, part: Part, rd: Any) -> Any | None:
        """Act on what a Ready says was committed, between the pass's write and its fsync: its
        outcomes (each a batch committed at a majority, so durable there whatever this pass
        writes, or a refusal) and a high watermark that moved (what lies below it is durable at
        a majority), when the Ready has such effects (`has_early_effects`). Without this a
        leader's answers to producers and to parked fetches waited for the fsync of the next
        entries, proposed in the same pass (issue 11). Returns the rest of the Ready (None: the
        replica was fenced)."""
        if not has_early_effects(part, rd):
            return rd
        try:
            for outcome in rd.outcomes:
                callback = part.waiters.pop(outcome.proposal_id, None)
                if callback is not None:
                    callback(outcome)
            hw = rd.high_watermark
            if hw is not None and self.events.committed(part, hw):
                hw = None
        except Exception as e:
            self.events.fence(part, "acting on what it committed", e)
            return None
        return dataclasses.replace(rd, outcomes=(), high_watermark=hw)

    def write_ready(self, part: Part, rd: Any) -> None:
        # The host prepares (restamps, verifies, encodes) before its first write into the shared
        # transaction, so a failure fences this replica without half its writes in the pass.
        self.storage.write_ready(self.begin(), part.tp, rd.reset_to, rd.truncate_from, rd.entries, rd.hard_state)
        if rd.reset_to is not None:
            # Our log ended below the leader's log start: it starts again there, empty (StartAt).
            part.log_start = rd.reset_to
            self.counters["log_resets"] += 1
        if rd.truncate_from is not None:
            self.counters["truncations"] += 1
        if rd.hard_state is not None:
            self.lazy_hard_states.pop(part.tp, None)
        self.sync_needed |= needs_sync(part, rd)

    def commit(self, sync_now: bool = True) -> bool:
        """Write the pass's transaction (with the waiting hints), fsynced at once if it asked and
        `sync_now`, else by `sync()`; False: nothing of it was stored."""
        if self.txn is None:
            return True
        if self.lazy_hard_states:
            for tp, hs in self.lazy_hard_states.items():
                if tp in self.parts:
                    self.storage.put_hard_state(self.txn, tp, hs)
            self.lazy_hard_states.clear()
        txn, self.txn = self.txn, None
        sync, self.sync_needed = self.sync_needed, False
        ok = self.storage.commit(txn, sync and sync_now)
        self._sync_due = ok and sync and not sync_now
        return ok

    def sync(self) -> None:
        """Make the pass's write durable, if it asked to be and `commit` left that for later."""
        if self._sync_due:
            self._sync_due = False
            self.storage.sync()

    def after_durable(self, part: Part, rd: Any) -> None:
        """The Ready's writes are durable: report it, send, answer, and let the composition react."""
        replica = part.replica
        if rd.has_writes:
            replica.on_persisted(rd.log_end)
            self.dirty.add(part.tp)          # acks and commits that durability allows come next round
            while part.leader_acks and part.leader_acks[0][0] <= rd.log_end:
                part.leader_acks.pop(0)[1](None)
        for out in rd.messages:
            self.events.route(part, out)
        for outcome in rd.outcomes:
            callback = part.waiters.pop(outcome.proposal_id, None)
            if callback is not None:
                callback(outcome)
        self.events.after_durable(part, rd)

    # ---------------------------------------------------------------- failures

    def fence(self, part: Part, doing: str, error: Exception) -> bool:
        """Set a replica aside after an unexpected error: its core is never stepped, ticked or
        written again (until a restart rebuilds it from the disk). False if it already was."""
        tp = part.tp
        if tp in self.fenced:
            return False
        self.fenced[tp] = f"{doing}: {error.__class__.__name__}: {error}"
        self.counters["partitions_fenced"] += 1
        self.dirty.discard(tp)
        self.deadlines.pop(tp, None)          # never ticked again
        self.lazy_hard_states.pop(tp, None)   # nothing more of it reaches the disk
        part.replica.advance()   # a Ready handed out is never applied: the core must not wait for it
        return True
