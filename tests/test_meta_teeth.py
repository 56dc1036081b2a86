"""Teeth on the shipped `__meta` follower and drain: deliberate bugs put into the PRODUCTION
rooms (zq.node.meta, zq.node.drain, which the real node runs), each caught by the simulator that
runs that very code (zq/sim/meta.py, zq/sim/drain.py) within the seeds tests/test_meta_follower.py
runs. Each bug is monkeypatched into the shipped module (never a simulator switch); the test
runs seeds from 0 until the first failure and prints where (at the time of writing: seeds 8, 0,
40, 0 and, for the drain, 0). The correct code passes those seeds (tests/test_meta_follower.py)."""
from __future__ import annotations

import pytest

from zq.node import drain as D
from zq.node import meta as M
from zq.sim import drain as drain_sim
from zq.sim import meta as meta_sim

META_SEEDS_MAX = 300    # as tests/test_meta_follower.py runs them
DRAIN_SEEDS_MAX = 50


def _takes_held_batches(mp: pytest.MonkeyPatch) -> None:
    """A batch the follower already holds (a duplicate or late reply) is taken again: only a gap is skipped."""
    def on_fetched(self, batches):
        take = []
        for batch in batches:
            if batch is M.BAD_BATCH:
                break
            if batch.base_offset > self.log.learner_end:
                continue
            take.append(batch)
            self.log.learner_end = batch.next_offset
            self.learned.extend(batch.records())
        return take
    mp.setattr(M.MetaFollower, "on_fetched", on_fetched)


def _registered_by_name(mp: pytest.MonkeyPatch) -> None:
    """A node counts as registered when __meta knows its name, whatever address it has now
    (a node restarted on another port is never found there)."""
    mp.setattr(M.MetaFollower, "is_registered", lambda self: self.name in self.meta.nodes)


def _fetches_from_applied(mp: pytest.MonkeyPatch) -> None:
    """The follower fetches from the offset after its last applied command, not from its stored
    log end: after a restart whose stored log ends in a control batch, it asks below its log end."""
    right = M.MetaFollower.follow_step

    def follow_step(self, *args):
        step = right(self, *args)
        return M.Fetch(step.leader, self.meta.applied) if isinstance(step, M.Fetch) else step
    mp.setattr(M.MetaFollower, "follow_step", follow_step)


def _moved_partition_not_opened(mp: pytest.MonkeyPatch) -> None:
    """A partition reassigned onto this node is not opened here (only a held replica is retargeted)."""
    right = M.MetaFollower._reassigned

    def reassigned(self, command, holds):
        return (e for e in right(self, command, holds) if not isinstance(e, M.OpenMoved))
    mp.setattr(M.MetaFollower, "_reassigned", reassigned)


def _answers_with_one_left(mp: pytest.MonkeyPatch) -> None:
    """A drain counts itself done when one partition is left to hand off."""
    right = D.check_drain

    def check_drain(drain, me, parts, now_ms):
        if len(D.led_elsewhere_possible(parts)) == 1:
            drain = D.PendingDrain(drain.req_id, now_ms, drain.answer_to, drain.led_before, drain.leave)
        return right(drain, me, parts, now_ms)
    mp.setattr(D, "check_drain", check_drain)


META_BUGS = {
    "a duplicate reply's batch is taken again": _takes_held_batches,
    "registered by name, not by address": _registered_by_name,
    "fetches from the applied offset after a restart": _fetches_from_applied,
    "a partition moved here is not opened": _moved_partition_not_opened,
}


@pytest.mark.parametrize("bug", sorted(META_BUGS))
def test_the_follower_simulator_catches_a_bug_in_the_shipped_follower(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    META_BUGS[bug](monkeypatch)
    failed = next((r for r in map(meta_sim.run_seed, range(META_SEEDS_MAX)) if not r.ok), None)
    assert failed is not None, f"the follower simulator missed '{bug}' in {META_SEEDS_MAX} seeds"
    print(f"{bug}: caught at seed {failed.seed}: {failed.invariant}: {failed.detail}")


def test_the_drain_simulator_catches_a_drain_that_answers_early(monkeypatch: pytest.MonkeyPatch) -> None:
    _answers_with_one_left(monkeypatch)
    failed = next((r for r in map(drain_sim.run_seed, range(DRAIN_SEEDS_MAX)) if not r.ok), None)
    assert failed is not None, f"the drain simulator missed it in {DRAIN_SEEDS_MAX} seeds"
    print(f"caught at seed {failed.seed}: {failed.invariant}: {failed.detail}")
