"""Teeth on the shipped pass: deliberate bugs put into the PRODUCTION persist-then-send pipeline
(zq.node.replicas, which the real node runs), each caught by the cluster simulator, which runs
that very pass, within a bounded number of seeds.

Each bug is monkeypatched into `zq.node.replicas` (never a simulator switch); the test runs seeds
from 0 until the first failure and asserts that one comes within SEEDS_MAX (at the time of
writing each is caught by seed 33: the test prints where). The correct code passes every seed up
to there (the last test here; tests/test_sim.py runs far more).
"""
from __future__ import annotations

import dataclasses

import pytest

from zq.node import replicas
from zq.sim.cluster import run_seed

SEEDS_MAX = 100    # seeds tried per bug before the test says the simulator missed it
STEPS = 1000       # as tests/test_sim.py runs them


def _first_failure(seeds: int = SEEDS_MAX):
    for seed in range(seeds):
        r = run_seed(seed, steps=STEPS)
        if not r.ok:
            return r
    return None


def _sync_unless(skip):
    """The shipped `needs_sync`, except that it says no for the Readys `skip` picks."""
    right = replicas.needs_sync

    def needs_sync(part, rd) -> bool:
        return False if skip(part, rd) else right(part, rd)
    return needs_sync


def _follower(part, rd) -> bool:
    return part.replica.role != "leader" and not rd.must_sync


def _leader(part, rd) -> bool:
    return part.replica.role == "leader" and not rd.must_sync


def _vote(part, rd) -> bool:
    return rd.must_sync and not rd.entries


BUGS = {
    # A follower reports its entries persisted (and so acknowledges them) without their fsync.
    "follower acks before its write is durable": lambda mp: mp.setattr(replicas, "needs_sync", _sync_unless(_follower)),
    # The leader counts its own copy of a batch towards the quorum before the fsync.
    "leader counts a write before its fsync": lambda mp: mp.setattr(replicas, "needs_sync", _sync_unless(_leader)),
    # A vote (or a new epoch) goes out before it is durable: after a power loss the node votes again.
    "vote sent before it is durable": lambda mp: mp.setattr(replicas, "needs_sync", _sync_unless(_vote)),
}


def _entries_acted_on_but_not_written(mp) -> None:
    """The pass hands a Ready's entries to no storage, yet acts on them as durable."""
    right = replicas.ReplicaSet.write_ready

    def write_ready(self, part, rd) -> None:
        if part.replica.role != "leader":
            rd = dataclasses.replace(rd, entries=())
        right(self, part, rd)
    mp.setattr(replicas.ReplicaSet, "write_ready", write_ready)


BUGS["follower acts on entries it never wrote"] = _entries_acted_on_but_not_written


def _timer_read_only_when_it_fired(mp) -> None:
    """The pass reads a replica's next deadline again only after its timer fired, not after a
    message moved it (a new leader's heartbeats, a vote's election timer): timers come late."""
    right = replicas.ReplicaSet._read_deadline

    def read_deadline(self, tp) -> None:
        if tp not in self.deadlines:
            right(self, tp)
    mp.setattr(replicas.ReplicaSet, "_read_deadline", read_deadline)


BUGS["a moved timer is not read again"] = _timer_read_only_when_it_fired


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_simulator_catches_a_bug_in_the_shipped_pass(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    BUGS[bug](monkeypatch)
    failed = _first_failure()
    assert failed is not None, f"the simulator missed '{bug}' in {SEEDS_MAX} seeds"
    print(f"{bug}: caught at seed {failed.seed}: {failed.invariant}")


def test_the_shipped_pass_passes_the_seeds_the_bugs_fail() -> None:
    """Without a bug, every seed up to the last one a bug is caught on passes (the catch is the bug's)."""
    bad = [(r.seed, r.invariant) for r in (run_seed(seed, steps=STEPS) for seed in range(40)) if not r.ok]
    assert not bad
