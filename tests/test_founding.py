"""A new partition starts with a leader (the replication core's "Founding"): the create_topic
command names its set's first replica, which leads epoch 1 at once, as if every replica had voted
for it there. Scenario tests of the core (three real `Replica`s over the scripted network of
tests/test_replication_core.py), of the metadata command, and of three nodes on loopback.

The teeth (a replica that lost its disk taking the founding, caught by the simulator) are in
tests/test_creation_teeth.py.
"""
from __future__ import annotations

import dataclasses
import random
import time

import pytest

from tests.nodeutil import Raw, start_nodes, wait_until
from tests.test_replication_core import CFG, NAMES, Trio
from zq import protocol as P
from zq.core import metadata as meta
from zq.core.repl_types import (
    COMMITTED, FOLLOWER, LEADER, Append, AppendAck, HardState, RequestVote, Vote,
)
from zq.core.repl_roles import FOUNDING_GRACE_TIMEOUTS
from zq.core.replication import Replica
from zq.limits import DEFAULT
from zq.node.replicas import Part, early_messages
from zq.sim.disk import SimDisk
from zq.types import TopicPartition

ELECTION_MESSAGES = (RequestVote, Vote)


class Founded(Trio):
    """A Trio whose partition was created by a command naming `founder`: each replica boots with
    `founded_by`, as a node's shell does; those in `lost` boot recovering (their data was lost)."""

    def __init__(self, founder: str = "a", applied: bool = True, **kw) -> None:
        self.founder = founder
        self.lost: set[str] = set()
        self.sent: list[object] = []
        super().__init__(**kw)
        for n in self.names if applied else ():
            self.drain(n)

    def _boot(self, n: str) -> Replica:
        store = self.disks[n].volatile[0]
        hard = store.hard
        if n in self.lost:
            hard = dataclasses.replace(hard or HardState(), recovering=True)
            self.lost.discard(n)
        return Replica(n, self.initial[n], store, rng=self.rng, now_ms=self.now[n], config=CFG,
                       hard_state=hard, log_end=store.log_end, founded_by=self.founder)

    def deliver(self, drop=lambda src, dst, msg: False) -> None:
        self.sent += [m for _s, _d, m in self.queue]
        super().deliver(lambda src, dst, msg: self.sent.append(msg) or drop(src, dst, msg))

    def wipe(self, n: str) -> Replica:
        """n loses its disk and restarts with none: its shell knows it lost it (recovering)."""
        self.disks[n] = SimDisk([0])
        self.lost.add(n)
        self.restart(n)
        self.drain(n)
        return self.replicas[n]


def test_a_new_partition_is_led_by_its_founder_at_once_and_commits_without_an_election() -> None:
    t = Founded("b")
    assert [(t.replicas[n].role, t.replicas[n].epoch, t.replicas[n].leader, t.replicas[n].voted_for)
            for n in NAMES] == [(FOLLOWER, 1, "b", "b"), (LEADER, 1, "b", "b"), (FOLLOWER, 1, "b", "b")]
    pid = t.propose("b", b"first")
    t.deliver()
    t.heartbeat("b")
    assert t.outcomes[pid].status == COMMITTED and (t.outcomes[pid].base_offset, t.outcomes[pid].epoch) == (1, 1)
    for n in NAMES:
        assert [x[3] for x in t.log(n)] == [b"", b"first"] and t.replicas[n].high_watermark == 2
    assert not [m for m in t.sent if isinstance(m, ELECTION_MESSAGES)], "no election was needed"


def test_the_founding_is_durable_before_anything_is_sent() -> None:
    """The first Ready of every member writes epoch 1 and the vote for the founder, synced, and
    changes the role: the pass sends none of its messages before that commit (not even the
    leader's Appends, which otherwise go before its fsync)."""
    for n in NAMES:
        r = Replica(n, NAMES, SimDisk([0]).volatile[0], rng=random.Random(1), config=CFG, founded_by="a")
        rd = r.ready()
        assert r.founded and rd.must_sync and rd.role is not None
        assert (rd.hard_state.epoch, rd.hard_state.voted_for, rd.hard_state.recovering) == (1, "a", False)
        assert rd.messages, "the founder broadcasts its marker; a follower asks its leader for the log"
        assert early_messages(Part(0, "p0", r, sync=True), rd) == ((), rd.messages)
        if n != "a":
            kinds = sorted(type(o.message).__name__ for o in rd.messages)
            assert kinds == ["AppendAck", "Fetch"] and all(o.to == "a" for o in rd.messages)
            assert next(o.message for o in rd.messages if isinstance(o.message, AppendAck)).durable_end == 0


def test_a_founded_follower_takes_its_founders_appends_and_votes_for_no_one_else_in_epoch_1() -> None:
    t = Founded("a")
    b = t.replicas["b"]
    b.step(RequestVote(1, "c", 0, 0))
    rd = b.ready()
    b.advance()
    assert [o.message for o in rd.messages] == [Vote(1, "b", False)]
    b.step(Append(1, "a", 0, 0, 0, 1, [[0, 1, 1, -1, -1, b""]]))
    rd = b.ready()
    b.advance()
    assert b.log_end == 1 and b.leader == "a" and b.role == FOLLOWER and rd.entries


def test_a_replica_that_lost_its_data_does_not_take_the_founding() -> None:
    for n in NAMES:
        r = Replica(n, NAMES, SimDisk([0]).volatile[0], rng=random.Random(1), config=CFG,
                    hard_state=HardState(recovering=True), founded_by="a")
        assert not r.founded and r.recovering and r.role == FOLLOWER and r.epoch == 0 and r.leader is None
        rd = r.ready()
        assert sorted(type(o.message).__name__ for o in rd.messages) == ["RecoveryPoll", "RecoveryPoll"]


def test_a_replica_made_again_after_a_move_or_holding_a_log_does_not_take_the_founding() -> None:
    rng = random.Random(1)
    again = Replica("a", NAMES, SimDisk([0]).volatile[0], rng=rng, config=CFG,
                    hard_state=HardState(epoch=3, join_epoch=3), founded_by="a")
    assert not again.founded and again.role == FOLLOWER and again.epoch == 3
    t = Founded("a")
    t.propose("a", b"x")
    t.deliver()
    t.restart("a")
    a = t.replicas["a"]
    assert not a.founded and a.role == FOLLOWER and a.epoch == 1 and a.leader is None and a.log_end == 2


def test_a_founding_names_a_member_of_the_set_and_is_given_to_members() -> None:
    rng = random.Random(1)
    with pytest.raises(ValueError):
        Replica("a", NAMES, SimDisk([0]).volatile[0], rng=rng, founded_by="z")
    with pytest.raises(ValueError):
        Replica("z", NAMES, SimDisk([0]).volatile[0], rng=rng, founded_by="a")


def test_a_founder_that_crashed_before_its_founding_was_durable_sent_nothing_and_founds_again() -> None:
    t = Founded("a", applied=False)   # booted founded; no Ready applied yet
    rd = t.replicas["a"].ready()
    assert rd.messages and rd.must_sync   # ... which the shell sends only after the commit that never came
    t.restart("a")                         # power lost before the commit: the disk holds nothing
    a = t.replicas["a"]
    assert a.founded and a.role == LEADER and a.epoch == 1 and a.log_end == 1


def test_a_lost_founder_does_not_lead_epoch_1_again_and_nothing_committed_is_lost() -> None:
    """The dangerous case: the founder commits epoch-1 entries, loses its disk and re-applies
    the create_topic command. Taking the founding again would make it an empty epoch-1 leader
    beside logs holding other epoch-1 entries at the same offsets; it recovers instead."""
    t = Founded("a")
    t.propose("a", b"m1")
    t.propose("a", b"m2")
    t.deliver()
    t.heartbeat("a")
    assert t.replicas["b"].high_watermark == 3
    before = len(t.sent) + len(t.queue)
    a = t.wipe("a")
    assert not a.founded and a.recovering and a.role == FOLLOWER
    assert sorted(type(m).__name__ for s, _d, m in t.queue if s == "a") == ["RecoveryPoll", "RecoveryPoll"]
    for _ in range(60):
        for n in NAMES:
            t.tick(n, CFG.heartbeat_interval_ms)
        t.deliver()
    leader = next(n for n in NAMES if t.replicas[n].role == LEADER)
    assert leader != "a" and t.replicas[leader].epoch >= 2
    assert not t.replicas["a"].recovering
    for n in NAMES:
        assert [x[3] for x in t.log(n)][:3] == [b"", b"m1", b"m2"]
    assert not [m for m in t.sent[before:] if isinstance(m, Append) and m.sender == "a" and m.epoch == 1]


def test_a_lost_follower_polls_instead_of_following_its_founder_at_once() -> None:
    t = Founded("a")
    t.propose("a", b"m")
    t.deliver()
    b = t.wipe("b")
    assert not b.founded and b.recovering and b.epoch == 0 and b.leader is None
    t.deliver()   # the polls are answered: b follows a leader of epoch >= 1 and catches up
    t.heartbeat("a")
    t.heartbeat("a")
    assert not b.recovering and b.epoch == 1 and b.leader == "a" and t.log("b") == t.log("a")


# ------------------------------------------------------------------ the command


def test_create_topic_commands_found_their_partitions_and_older_ones_do_not() -> None:
    state = meta.MetadataState()
    commands = meta.plan_create_topic(state, "t", 2, 3, {}, ["n1", "n2", "n3"], 0, DEFAULT)
    assert all(c["founded"] is True for c in commands)
    for i, c in enumerate(commands):
        state.apply(i, c)
    assert state.topics["t"].founded and state.topics["t.dlq"].founded
    older = {k: v for k, v in commands[0].items() if k != "founded"} | {"name": "u", "id": 99}
    state.apply(5, older)
    assert not state.topics["u"].founded, "a command written before founding: its partitions elect"


# ------------------------------------------------------------------ three nodes on loopback


def test_a_new_rf3_topic_is_led_by_its_placements_first_node_with_no_election(tmp_path) -> None:
    nodes = start_nodes(tmp_path, 3)
    raws = {n.config.name: Raw(n.address) for n in nodes}
    try:
        any_raw = raws["n1"]
        wait_until(lambda: len([n for n in any_raw.rpc(P.MetadataRequest(any_raw.rid(), None))[0].nodes
                                if n["state"] == "alive"]) == 3, 10, "three nodes registered")
        wait_until(lambda: any(r.rpc(P.MetadataRequest(r.rid(), []))[0].topics[0]["partitions"][0]["epoch"] > 0
                               for r in raws.values()), 10, "a metadata leader elected")
        meta_leader = any_raw.rpc(P.MetadataRequest(any_raw.rid(), []))[0].topics[0]["partitions"][0]["leader"]
        assert isinstance(raws[meta_leader].create("t", 3, replication=3), P.OkReply)
        md = raws[meta_leader].rpc(P.MetadataRequest(raws[meta_leader].rid(), ["t"]))[0]
        topic = next(t for t in md.topics if t["name"] == "t")
        for p in topic["partitions"]:
            founder = p["replicas"][0]
            reply = raws[founder].produce("t", p["partition"], [b"first"], acks=2)
            for _ in range(50):   # a leader that has not yet heard a majority's clocks says retry (no election)
                if not (isinstance(reply, P.ErrorReply) and reply.code == "leader_not_available"):
                    break
                time.sleep(0.1)
                reply = raws[founder].produce("t", p["partition"], [b"first"], acks=2)
            assert isinstance(reply, P.ProduceReply) and reply.base_offset == 1, reply   # offset 0: the marker
            tp = TopicPartition(topic["id"], p["partition"])
            for n in nodes:
                r = n.node.parts[tp].replica
                # Epoch 1 on every replica: nobody stood (a candidate moves to epoch 2).
                assert (r.epoch, r.leader, r.founded) == (1, founder, True), (n.config.name, r.epoch, r.leader)
                assert r.role == (LEADER if n.config.name == founder else FOLLOWER)
    finally:
        for r in raws.values():
            r.close()
        for n in nodes:
            n.stop()


# ------------------------------------------------------------------ found on the way


def test_a_recovering_replica_keeps_no_leader_of_an_earlier_epoch_into_the_epoch_its_poll_takes() -> None:
    """Simulator seed 519 (with the founding and the clients' room both in): a leader handing off
    sent TimeoutNow to a voter that had just lost its disk; the recovering replica took the epoch
    and the leader from it, then its poll took a later epoch and kept that leader, so the later
    epoch's real leader was refused as a second one."""
    from zq.core.repl_types import RecoveryState, TimeoutNow
    b = Replica("b", NAMES, SimDisk([0]).volatile[0], rng=random.Random(1), config=CFG,
                hard_state=HardState(recovering=True))
    b.ready()
    b.advance()
    b.step(TimeoutNow(1, "a"))
    b.step(RecoveryState(1, "a", 3, 5, 1))
    b.step(RecoveryState(2, "c", 1, 5, 1))
    assert b.epoch == 2 and b.leader is None and b.recovering
    b.ready()
    b.advance()
    b.step(Append(2, "c", 0, 0, 1, 5, []))   # c leads epoch 2: taken, not refused
    assert b.leader == "c"


def test_a_diverging_answer_below_the_matched_prefix_cuts_at_that_prefix() -> None:
    """Simulator seed 50042 --nodes 5 (with the clients' room merged): a learner held a committed
    epoch-1 marker and a stale epoch-1 tail from an old leader; the current leader's history, its
    log restarted by a StartAt, no longer reached epoch 1, so its Diverging pointed below the
    learner's matched prefix, which the learner ignored as a stale duplicate, forever."""
    from tests.test_replication_core import _disk_with, _log_of
    from zq.core.repl_types import Diverging
    disk = _disk_with(_log_of([1, 1, 1, 1]), 1, "a")
    store = disk.volatile[0]
    store.hard = dataclasses.replace(store.hard, high_watermark=1)
    b = Replica("b", NAMES, store, rng=random.Random(1), config=CFG, hard_state=store.hard, log_end=4)
    assert b.high_watermark == 1
    b.step(Append(18, "c", 10, 18, 1, 10, []))     # the leader of epoch 18 (heartbeat): we fetch
    b.ready()
    b.advance()
    b.step(Diverging(18, "c", 0, 1))               # "my largest epoch <= 1 is 0, ending at 1"
    rd = b.ready()
    b.advance()
    assert b.log_end == 1 and rd.truncate_from == 1


def test_a_founder_stopped_past_an_election_timeout_steps_down_and_stamps_nothing_from_stale_clocks() -> None:
    """Simulator seed 334 (--nodes 5 --steps 1000): a founder was paused within its founding
    grace (no check-quorum step-down yet) before it read its followers' first acks; on resume it
    took their clocks, sent before the pause, as heard just now, and stamped a batch 254 ms
    behind the true time (retention would delete that early). A leader is ticked at least every
    heartbeat: a tick that jumps past an election timeout is a stall, and the leader steps down
    (and stands again) instead of trusting what waited in its inbox."""
    t = Founded("a", applied=False)
    base = 1_700_000_000_000
    for n in NAMES:                                     # each applies the creating command
        t.replicas[n].tick(t.now[n], base + t.now[n])
        t.drain(n)
    a = t.replicas["a"]
    stale, t.queue = [m for m in t.queue if m[1] == "a"], [m for m in t.queue if m[1] != "a"]
    assert a.role == LEADER and any(isinstance(m[2], AppendAck) and m[2].wall_ms for m in stale)
    t.now["a"] += CFG.election_timeout_ms + 10          # a is stopped, within its founding grace
    assert t.now["a"] < FOUNDING_GRACE_TIMEOUTS * CFG.election_timeout_ms
    a.tick(t.now["a"], base + t.now["a"])
    t.drain("a")
    for _src, _dst, msg in stale:                       # the answers it reads on resuming
        a.step(msg)
    t.drain("a")
    stamp = a.append_time_ms() if a.role == LEADER else None
    assert stamp is None, f"stamped {stamp - base - t.now['a']:+d} ms from the time"
    assert a.role == FOLLOWER and a.epoch == 1
