"""The replication core over a log whose first entries retention deleted (log start > 0)."""
from __future__ import annotations

import random

from zq.core.replication import Replica
from zq.core.repl_types import NO_PRODUCER, Entry, HardState


class TailReader:
    """A stable log whose entries below `start` are gone: a read below it starts at the first kept."""

    def __init__(self, entries: list[Entry], start: int):
        self.entries = [e for e in entries if e.base_offset >= start]

    def read(self, offset: int, max_bytes: int) -> list[Entry]:
        out = [e for e in self.entries if e.end_offset > offset]
        return out[:1] if max_bytes <= 0 else out


def test_a_replica_restarts_over_a_log_whose_start_was_deleted():
    entries = [Entry(0, 1, 1, NO_PRODUCER, NO_PRODUCER, b"")] + [
        Entry(1 + 2 * i, 2, 1, 7, 2 * i, b"batch%d" % i) for i in range(4)]
    reader = TailReader(entries, start=1)      # the epoch marker at offset 0 was deleted by retention
    hs = HardState(epoch=1, voted_for="a", epoch_history=((1, 0),), high_watermark=9)
    r = Replica("a", ["a", "b", "c"], reader, rng=random.Random(1), hard_state=hs, log_end=9)
    assert r.log_end == 9 and r.high_watermark == 9
    # The idempotent producer's batches were found from the first kept entry on: a retry of the
    # last one is answered with its original offset once this replica leads.
    assert r._producers[7][-1][:3] == (6, 2, 7)


def test_a_replica_restarts_over_a_log_that_retention_emptied():
    reader = TailReader([Entry(0, 1, 1, NO_PRODUCER, NO_PRODUCER, b"")], start=1)   # only the marker, deleted
    hs = HardState(epoch=1, voted_for="a", epoch_history=((1, 0),), high_watermark=1)
    r = Replica("a", ["a", "b", "c"], reader, rng=random.Random(1), hard_state=hs, log_end=1)
    assert r.log_end == 1 and r.high_watermark == 1 and not r._producers


# ------------------------------------------------------------------ catching up by StartAt

import pytest  # noqa: E402

from zq.core.repl_types import FOLLOWER, LEADER, MESSAGE_TYPES, Fetch, StartAt  # noqa: E402
from zq.errors import ProtocolError  # noqa: E402
from tests.test_replication_core import CFG, NAMES, QUAD, Trio, _settle, _target  # noqa: E402


def _retain(t: Trio, n: str, offset: int) -> None:
    """Retention on node n: its entries below `offset` deleted (durably), and the core told."""
    t.disks[n].sync()
    t.disks[n].retain(0, offset)
    t.replicas[n].on_log_start(offset)
    t.drain(n)


def _boundary_at_or_below(t: Trio, n: str, offset: int) -> int:
    return max(e.base_offset for e in t.replicas[n].entries(0, 10_000, 1 << 30) if e.base_offset <= offset)


def _no_c(src, dst, msg) -> bool:
    return "c" in (src, dst)


def test_a_follower_below_the_leaders_log_start_starts_there_and_catches_up() -> None:
    t = Trio()
    t.elect("a")
    t.propose("a", b"early")
    t.deliver()
    _settle(t, "a")
    c = t.replicas["c"]
    c_end = c.log_end
    for i in range(8):  # c hears nothing of these
        t.propose("a", b"m%d" % i, count=2)
        t.deliver(_no_c)
    _settle(t, "a", drop=_no_c)
    a = t.replicas["a"]
    start = _boundary_at_or_below(t, "a", a.high_watermark - 3)
    assert start > c_end
    _retain(t, "a", start)
    _retain(t, "b", start)
    assert a.log_start == start
    # c asks from its log end, which the leader no longer holds: it is told to start at ours.
    t.queue.clear()
    a.step(Fetch(a.epoch, "c", c_end, c.epoch_at(c_end - 1)))
    rd = a.ready()
    a.advance()
    [out] = rd.messages
    assert out.to == "c" and out.message == StartAt(a.epoch, "a", start, a.epoch_at(start - 1), list(NAMES))
    c.step(out.message)
    rd = c.ready()
    assert rd.reset_to == start and rd.truncate_from is None and rd.hard_state is not None
    assert rd.hard_state.high_watermark == start and rd.hard_state.epoch_history == ((a.epoch_at(start - 1), start - 1),)
    t.disks["c"].write(0, rd)
    t.disks["c"].sync()
    c.advance()
    t.queue += [("c", out.to, out.message) for out in rd.messages]   # its Fetch from there
    c.on_persisted(rd.log_end)
    t.drain("c")
    assert (c.log_start, c.log_end, c.high_watermark, c.match_end) == (start, start, start, start)
    assert c.voters == NAMES and c.epoch_at(start - 1) == a.epoch_at(start - 1)
    t.deliver()
    _settle(t, "a")
    assert c.log_end == a.log_end and c.high_watermark == a.high_watermark
    assert c.entries(0, 10_000, 1 << 30) == a.entries(start, 10_000, 1 << 30)
    assert t.disks["c"].durable[0].start == start
    # A restart keeps it: the log starts there, and everything there is committed.
    t.restart("c")
    c = t.replicas["c"]
    assert (c.log_start, c.log_end, c.high_watermark, c.voters) == (start, a.log_end, a.high_watermark, NAMES)
    # And c can lead: a follower that fell behind everything now gets a StartAt from c.
    pid = t.propose("a", b"late")
    t.deliver()
    _settle(t, "a")
    assert t.outcomes[pid].status == "committed"


def test_a_follower_down_past_the_retention_window_catches_up_through_the_normal_loop() -> None:
    t = Trio()
    t.elect("a")
    for i in range(4):
        t.propose("a", b"x%d" % i)
    t.deliver(_no_c)
    _settle(t, "a", drop=_no_c)
    a = t.replicas["a"]
    _retain(t, "a", a.high_watermark)   # retention emptied the leader's log: start == end
    assert a.log_start == a.log_end
    _settle(t, "a")
    c = t.replicas["c"]
    assert (c.log_start, c.log_end, c.high_watermark) == (a.log_end, a.log_end, a.high_watermark)
    pid = t.propose("a", b"after")
    t.deliver()
    _settle(t, "a")
    assert t.outcomes[pid].status == "committed" and c.log_end == a.log_end
    assert [e.payload for e in c.entries(0, 10, 1 << 30)] == [b"after"]


def test_a_new_learner_onto_a_log_with_a_start_is_promoted_and_knows_the_configuration() -> None:
    """`zq topic reassign` onto a new node, for a topic whose retention deleted its start (and
    even the leader's restated configuration entry)."""
    t = Trio(names=QUAD, initial=NAMES)
    t.initial["d"] = ()
    t.replicas["d"] = t._boot("d")  # noqa: SLF001
    t.elect("a")
    for i in range(5):
        t.propose("a", b"y%d" % i)
    _settle(t, "a")
    a = t.replicas["a"]
    _target(t, QUAD)
    _settle(t, "a", rounds=1, drop=lambda s, dst, m: "d" in (s, dst))  # a takes d, restates the configuration
    assert a.learners == ("d",)
    for _ in range(3):
        t.propose("a", b"z")
    _settle(t, "a", drop=lambda s, dst, m: "d" in (s, dst))
    start = _boundary_at_or_below(t, "a", a.high_watermark - 1)
    assert start > a.config_history[-1][0]  # the restated configuration is deleted too
    for n in NAMES:
        _retain(t, n, start)
    _settle(t, "a")
    d = t.replicas["d"]
    assert a.voters == QUAD and d.voters == QUAD and d.log_start == start
    assert d.log_end == a.log_end and d.high_watermark == a.high_watermark
    # A voter now: it counts in the majority.
    pid = t.propose("a", b"w")
    t.deliver(drop=lambda s, dst, m: dst in ("b", "c"))
    _settle(t, "a", rounds=2, drop=lambda s, dst, m: dst in ("b", "c"))
    assert pid not in t.outcomes
    _settle(t, "a")
    assert t.outcomes[pid].status == "committed"


def test_start_at_is_taken_only_from_the_leader_of_our_epoch_and_only_below_it() -> None:
    t = Trio()
    t.elect("a")
    for i in range(3):
        t.propose("a", b"v%d" % i)
    _settle(t, "a")
    t.elect("b")
    _settle(t, "b")
    c = t.replicas["c"]
    epoch, end = c.epoch, c.log_end
    assert epoch == 2 and c.leader == "b"

    def applied(msg) -> bool:
        c.step(msg)
        rd = c.ready()
        c.advance()
        return rd.reset_to is not None

    assert not applied(StartAt(epoch, "b", end, 1, list(NAMES)))         # our log reaches it
    assert not applied(StartAt(epoch - 1, "a", end + 5, 1, list(NAMES)))  # a stale leader
    assert not applied(StartAt(epoch, "a", end + 5, 1, list(NAMES)))      # not our leader
    assert c.log_end == end and c.leader == "b"
    for bad in (StartAt(epoch, "b", 9, epoch + 1, []), StartAt(epoch, "b", 0, 1, []),
                StartAt(epoch, "b", 9, 0, []), StartAt(epoch, "b", 9, 1, ["b", "a"]),
                StartAt(epoch, "b", 9, 1, ["a", "a"]), StartAt(epoch, "b", 9, 1, ["a", 3]),
                StartAt(epoch, "b", 9, 1, "ab")):
        with pytest.raises(ProtocolError):
            c.step(bad)
    assert StartAt in MESSAGE_TYPES and c.log_end == end
    assert applied(StartAt(epoch, "b", end + 5, 2, list(NAMES)))
    assert (c.log_start, c.log_end, c.high_watermark, c.epoch_at(end + 4), c.voters) == (end + 5, end + 5, end + 5, 2, NAMES)


def test_retention_above_the_high_watermark_is_refused() -> None:
    t = Trio()
    t.elect("a")
    a = t.replicas["a"]
    with pytest.raises(ValueError):
        a.on_log_start(a.high_watermark + 1)
    assert a.role == LEADER and t.replicas["b"].role == FOLLOWER
    assert CFG.election_timeout_ms > 0


def test_entries_below_a_followers_log_start_from_a_new_leader_are_taken_as_held() -> None:
    """Simulator seed 2525: c started at the leader's log start by StartAt; then b, whose own
    retention had not yet run, led and sent from offset 0. Those entries are committed, so c holds
    them as its log start says: it skips them, never "replaces" them below its matched prefix."""
    from zq.core.repl_types import Append
    t = Trio()
    t.elect("a")
    for i in range(4):
        t.propose("a", b"m%d" % i, count=2)
        t.deliver(_no_c)
    _settle(t, "a", drop=_no_c)
    a, b, c = (t.replicas[n] for n in NAMES)
    start = _boundary_at_or_below(t, "a", a.high_watermark - 2)
    _retain(t, "a", start)
    t.queue.clear()
    a.step(Fetch(a.epoch, "c", c.log_end, c.epoch_at(c.log_end - 1)))
    t.drain("a")
    t.deliver()
    _settle(t, "a")
    assert c.log_start == start and c.log_end == a.log_end and b.log_start == 0
    held = c.entries(start, 10_000, 1 << 30)
    every = b.entries(0, 10_000, 1 << 30)          # b's log, from 0: what a new leader b sends
    c.step(Append(a.epoch + 1, "b", 0, 0, b.high_watermark, b.log_end, [e.to_wire() for e in every], 0))
    t.drain("c")
    assert c.entries(start, 10_000, 1 << 30) == held and c.log_start == start and c.leader == "b"
