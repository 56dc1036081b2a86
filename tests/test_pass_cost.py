"""A loop pass costs what changed, not how many partitions the node hosts (issue 11).

The shipped pass (zq.node.replicas.ReplicaSet, run by the node and by the simulator) with real
replication cores, counted through a spy on the core's class: a pass over 1,000 idle replicas
asks none of them anything; a replica whose timer is due is still ticked (and only it); a replica
stepped in a pass has its deadline read again, so a timer a message moved is kept.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from zq.core.repl_types import Append, AppendAck, ReplicationConfig
from zq.core.replication import Replica
from zq.node.replicas import Part, ReplicaSet
from zq.sim.disk import SimDisk

PARTITIONS = 1000
CONFIG = ReplicationConfig(election_timeout_ms=1_000, heartbeat_interval_ms=100)


class _Storage:
    """zq.node.host.Storage on a simulated disk."""

    def __init__(self, disk: SimDisk) -> None:
        self.disk = disk

    def begin(self):
        return self.disk

    def write_ready(self, txn, key, reset_to, truncate_from, entries, hard_state) -> None:
        txn.write_batch(key, truncate_from, entries, hard_state, reset_to)

    def put_hard_state(self, txn, key, hard_state) -> None:
        txn.write_batch(key, None, (), hard_state, None)

    def commit(self, txn, sync: bool) -> bool:
        if sync:
            txn.sync()
        return True

    def sync(self) -> None:
        self.disk.sync()


class _Events:
    """zq.node.host.ReplicaEvents that records what went out."""

    def __init__(self) -> None:
        self.sent: list = []

    def route(self, part, out) -> None:
        self.sent.append((part.tp, out.to, out.message))

    def send_now(self) -> None:
        pass

    def after_durable(self, part, rd) -> None:
        pass

    def committed(self, part, high_watermark) -> bool:
        return False   # a moved high watermark comes with the rest, in after_durable

    def after_round(self) -> None:
        pass

    def write_failed(self, part) -> None:
        raise AssertionError("no write fails here")

    def fence(self, part, doing, error) -> None:
        raise error


@pytest.fixture
def hosted():
    """1,000 follower replicas (of three-node sets, no leader yet), opened and through their first pass."""
    disk = SimDisk(list(range(PARTITIONS)))
    rs = ReplicaSet(_Storage(disk), _Events(), defaultdict(int))
    rng = random.Random(7)
    for p in range(PARTITIONS):
        r = Replica("n1", ["n1", "n2", "n3"], disk.volatile[p], rng=rng, now_ms=0, config=CONFIG)
        rs.parts[p] = Part(p, f"p{p}", r, sync=True)
        rs.dirty.add(p)
    rs.finish_pass()
    return rs


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Every call of the core's methods a pass could make, counted by name."""
    counted: Counter = Counter()
    for name in ("tick", "ready", "advance", "step", "next_timer_ms", "on_persisted"):
        right = getattr(Replica, name)

        def spy(self, *args, _name=name, _right=right, **kwargs):
            counted[_name] += 1
            counted[(_name, self)] += 1
            return _right(self, *args, **kwargs)
        monkeypatch.setattr(Replica, name, spy)
    return counted


def test_every_replica_has_a_deadline_after_its_first_pass(hosted: ReplicaSet) -> None:
    assert len(hosted.deadlines) == PARTITIONS
    assert hosted.next_deadline() == min(hosted.deadlines.values())
    assert all(CONFIG.election_timeout_ms <= d < 2 * CONFIG.election_timeout_ms for d in hosted.deadlines.values())


def test_a_pass_with_idle_replicas_asks_none_of_them_anything(hosted: ReplicaSet, calls: Counter) -> None:
    now = hosted.next_deadline() - 1
    for _ in range(10):   # ten passes, nothing arrives and no timer is due
        assert hosted.tick_due(now) == 0
        hosted.finish_pass()
    assert sum(n for k, n in calls.items() if isinstance(k, str)) == 0, dict(calls)


def test_a_due_timer_is_still_run_and_only_its_replica_is_asked(hosted: ReplicaSet, calls: Counter) -> None:
    first = hosted.next_deadline()
    due = sorted(tp for tp, d in hosted.deadlines.items() if d <= first)
    assert due
    assert hosted.tick_due(first) == len(due)
    hosted.finish_pass()
    ticked = {hosted.parts[tp].replica for tp in due}
    assert calls["tick"] == len(due)
    assert {k[1] for k in calls if isinstance(k, tuple) and k[0] == "ready"} == ticked
    for tp in due:
        r = hosted.parts[tp].replica
        assert r._prevotes == {r.node_id}                 # its election timer fired: it asks first
        assert hosted.deadlines[tp] == r.next_timer_ms() > first   # and its next one is kept
    assert any(type(m).__name__ == "PreVote" for _, _, m in hosted.events.sent)
    assert hosted.next_deadline() > first


def test_a_stepped_replica_keeps_the_timer_the_message_moved(hosted: ReplicaSet, calls: Counter) -> None:
    tp = min(hosted.deadlines, key=hosted.deadlines.get)
    old = hosted.deadlines[tp]
    r = hosted.parts[tp].replica
    r.tick(old - 10)
    r.step(Append(1, "n2", 0, 0, 0, 0))   # a leader's heartbeat: the election timer starts again
    hosted.dirty.add(tp)
    hosted.finish_pass()
    assert hosted.deadlines[tp] == r.next_timer_ms() > old
    calls.clear()
    hosted.tick_due(old)   # its old deadline: the replica is not ticked
    assert calls[("tick", r)] == 0


def test_forgotten_and_fenced_replicas_have_no_timer(hosted: ReplicaSet) -> None:
    gone, fenced = sorted(hosted.deadlines, key=hosted.deadlines.get)[:2]
    hosted.forget(gone)
    hosted.fence(hosted.parts[fenced], "testing", RuntimeError("x"))
    assert gone not in hosted.deadlines and fenced not in hosted.deadlines
    assert hosted.next_deadline() not in (None,)
    ticked_before = hosted.parts[fenced].replica.now_ms
    hosted.tick_due(10_000)
    assert hosted.parts[fenced].replica.now_ms == ticked_before


# ---------------------------------------------------------------- passes per message (issue 11)
#
# Three nodes, each a shipped ReplicaSet with one replica of a three-node partition, wired by
# hand: a test delivers what one pass routed and counts the passes a message takes.

class _Wired:
    def __init__(self) -> None:
        self.now = 0
        self.rng = random.Random(3)
        self.names = ("n1", "n2", "n3")
        self.sets: dict[str, ReplicaSet] = {}
        self.events: dict[str, _Events] = {}
        self.high_watermarks: dict[str, list[int]] = {n: [] for n in self.names}
        for name in self.names:
            disk = SimDisk([0])
            events = _Events()
            events.after_durable = (lambda part, rd, name=name: rd.high_watermark is not None
                                    and self.high_watermarks[name].append(rd.high_watermark))
            rs = ReplicaSet(_Storage(disk), events, defaultdict(int))
            r = Replica(name, list(self.names), disk.volatile[0], rng=self.rng, now_ms=0, config=CONFIG)
            rs.parts[0] = Part(0, "p0", r, sync=True)
            rs.dirty.add(0)
            rs.finish_pass()
            self.sets[name], self.events[name] = rs, events

    def replica(self, name: str) -> Replica:
        return self.sets[name].parts[0].replica

    def taken(self, name: str) -> list:
        """What `name`'s passes routed since last asked, as (to, message)."""
        out, self.events[name].sent = self.events[name].sent, []
        return [(to, message) for _, to, message in out]

    def deliver(self, to: str, message) -> None:
        r = self.replica(to)
        r.tick(self.now)
        r.step(message)
        self.sets[to].dirty.add(0)

    def settle(self, rounds: int = 20) -> None:
        """Run passes and deliver everything until nothing moves."""
        for _ in range(rounds):
            moved = False
            for name in self.names:
                self.sets[name].finish_pass()
                for to, message in self.taken(name):
                    for dst in ([to] if to else [n for n in self.names if n != name]):
                        self.deliver(dst, message)
                        moved = True
            if not moved:
                return


@pytest.fixture
def wired() -> _Wired:
    w = _Wired()
    w.now = w.sets["n1"].next_deadline()
    w.sets["n1"].tick_due(w.now)   # n1 stands first and wins
    w.settle()
    assert w.replica("n1").role == "leader"
    return w


def test_follower_acks_in_the_pass_that_made_its_write_durable(wired: _Wired) -> None:
    leader = wired.replica("n1")
    leader.propose(1, 0, 0, b"x")
    wired.sets["n1"].dirty.add(0)
    wired.sets["n1"].finish_pass()
    appends = [m for to, m in wired.taken("n1") if type(m).__name__ == "Append" and m.entries]
    assert appends, "the leader's pass sends its Append"
    wired.deliver("n2", appends[0])
    wired.sets["n2"].finish_pass()   # ONE pass: write, fsync, then the ack
    acks = [m for to, m in wired.taken("n2") if isinstance(m, AppendAck)]
    assert acks and max(a.durable_end for a in acks) == leader.log_end
    assert wired.replica("n2").durable_end == leader.log_end


def _follower_ack(wired: _Wired, answer) -> AppendAck:
    """The leader n1 proposes a batch (`answer` is its producer) and n2 writes it: n2's ack, not yet delivered."""
    pid = wired.replica("n1").propose(1, 0, 0, b"x")
    wired.sets["n1"].parts[0].waiters[pid] = answer
    wired.sets["n1"].dirty.add(0)
    wired.sets["n1"].finish_pass()
    append = next(m for _, m in wired.taken("n1") if type(m).__name__ == "Append" and m.entries)
    wired.deliver("n2", append)
    wired.sets["n2"].finish_pass()
    return max((m for _, m in wired.taken("n2") if isinstance(m, AppendAck)), key=lambda a: a.durable_end)


def test_leader_answers_and_publishes_in_the_pass_the_quorum_ack_arrives(wired: _Wired) -> None:
    leader, outcomes = wired.replica("n1"), []
    ack = _follower_ack(wired, outcomes.append)
    assert not outcomes
    wired.high_watermarks["n1"].clear()
    wired.deliver("n1", ack)
    wired.sets["n1"].finish_pass()   # ONE pass: the producer is answered, the high watermark published
    assert [o.status for o in outcomes] == ["committed"]
    assert wired.high_watermarks["n1"] == [leader.log_end]   # the node serves its parked fetches here


# ---------------------------------------------------------------- the node's loop: bounded, and no idle wait

class _Endless:
    """A socket with always another message waiting (a peer that never stops sending)."""

    def __init__(self) -> None:
        self.received = 0

    def recv_multipart(self, flags=0, copy=True):
        self.received += 1
        return [b"frame"]


class _Loop:
    """The state LoopMixin's drain and poll timeout read, without sockets or a store."""

    def __init__(self, replica_set: ReplicaSet | None = None) -> None:
        from zq.limits import Limits
        self.limits = Limits(inbox_drain_max=50)
        self.counters: Counter = Counter()
        self.timers: list = []
        self.replica_set = replica_set or ReplicaSet(None, None, Counter())
        self.dirty = self.replica_set.dirty


def test_a_drain_is_bounded_by_count_and_time_whatever_a_peer_sends() -> None:
    import time

    from zq.io.node_loop import LoopMixin
    loop, sock, handled = _Loop(), _Endless(), []
    LoopMixin._drain(loop, sock, handled.append, until=time.monotonic() + 3600)
    assert len(handled) == sock.received == 50                       # the count
    handled.clear()
    LoopMixin._drain(loop, sock, handled.append, until=time.monotonic() - 1)
    assert len(handled) == 1 and loop.counters["requests_deferred"] == 1   # the time: one, then the next pass


def test_the_loop_does_not_wait_while_a_replica_is_dirty_and_wakes_for_a_replica_timer(hosted: ReplicaSet) -> None:
    from zq.io import node_loop
    loop = _Loop(hosted)
    hosted.deadlines.clear()
    hosted._deadline_heap.clear()
    assert node_loop.LoopMixin._poll_timeout_ms(loop) == node_loop.POLL_TIMEOUT_MS_MAX
    hosted._read_deadline(0)   # replica 0's timer, due long ago in the node's clock
    assert node_loop.LoopMixin._poll_timeout_ms(loop) == 0
    hosted.deadlines.clear()
    hosted._deadline_heap.clear()
    hosted.dirty.add(0)
    assert node_loop.LoopMixin._poll_timeout_ms(loop) == 0


def test_the_composition_may_step_another_replica_that_wrote_in_the_same_pass(wired: _Wired) -> None:
    """What a Ready leads to (applying __meta's committed reassignment: `set_target` on another
    partition's replica) may step a replica whose Ready this pass wrote: every Ready of the pass is
    applied (`advance`) before the composition acts on any. Acting on a Ready that wrote nothing
    before the others' commit broke this (a reassignment fenced __meta: tests/test_reassign.py)."""
    ack = _follower_ack(wired, lambda outcome: None)
    storage = wired.sets["n1"].storage
    disk = storage.disk
    disk.add_partition(1)
    other = Replica("n1", ["n1"], disk.volatile[1], rng=random.Random(1), now_ms=0, config=CONFIG)
    other.tick(other.next_timer_ms())   # a one-node partition n1 leads
    wired.sets["n1"].parts[1] = Part(1, "p1", other, sync=True)
    events = wired.events["n1"]
    events.after_durable = lambda part, rd: part.tp == 0 and other.set_target(["n1"])
    # One pass of n1: the quorum ack for partition 0 arrives (its Ready writes nothing), and the
    # other partition writes.
    wired.deliver("n1", ack)
    other.propose(1, 0, 0, b"b")
    wired.sets["n1"].dirty.add(1)
    wired.sets["n1"].finish_pass()
    assert not wired.sets["n1"].fenced, wired.sets["n1"].fenced


def test_leader_answers_what_committed_before_the_fsync_of_what_it_proposed_in_the_same_pass(wired: _Wired) -> None:
    """A pass in which a quorum ack arrives and a new batch is proposed: the producer of the
    committed batch is answered, and the high watermark published, between the pass's write and
    its fsync (which only the new batch needs), not after it (issue 11)."""
    order: list[str] = []
    ack = _follower_ack(wired, lambda outcome: order.append(f"answered {outcome.status}"))
    storage = wired.sets["n1"].storage
    write, sync = storage.commit, storage.sync
    storage.commit = lambda txn, synced: order.append(f"write synced={synced}") or write(txn, synced)
    storage.sync = lambda: order.append("fsync") or sync()
    wired.events["n1"].committed = lambda part, hw: order.append(f"high watermark {hw}") or True
    committed = ack.durable_end
    wired.deliver("n1", ack)
    wired.replica("n1").propose(1, 0, 1, b"y")   # the same producer's next batch
    wired.sets["n1"].dirty.add(0)
    wired.sets["n1"].finish_pass()
    assert order[:4] == ["write synced=False", "answered committed", f"high watermark {committed}", "fsync"], order
