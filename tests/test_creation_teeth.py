"""Teeth on the founding of a new partition (zq/core/replication.py, "Founding"): deliberate bugs
put into the SHIPPED replication core, each caught by the cluster simulator, which creates its
partitions founded and wipes disks soon after (`Settings.early_wipe`), within a bounded number of
seeds.

The rule under test: only a replica that provably never held its partition takes the founding
(`Replica._may_found`). Each bug lets a replica whose disk was lost take it too: the shell still
marks it recovering, as the node's birth marker does, and the core ignores that. The test runs
seeds from 0 until the first failure and asserts that one comes within SEEDS_MAX (at the time of
writing both are caught by seed 3 at most). The correct core passes every seed up to there.
"""
from __future__ import annotations

import pytest

from tests.test_node_teeth import SEEDS_MAX, STEPS, _first_failure
from zq.core.replication import Replica
from zq.sim.cluster import run_seed

PASSING_SEEDS = 40

SAFETY = {"protocol error between honest replicas", "two different batches at one offset", "two leaders in one epoch",
          "new leader lacks committed entries", "acknowledged write lost", "committed entry deleted",
          "acknowledged write not committed", "replica lacks committed entries"}


def _lost_ones_found_too(founders_only: bool):
    """A `_may_found` that also takes a hard state marked recovering with no log (a lost replica),
    of every member or of the founder alone (which then leads epoch 1 again, empty)."""
    def may_found(self: Replica, founder: str, hard_state, log_end: int) -> bool:
        lost = hard_state is not None and hard_state.recovering and (founder == self.node_id or not founders_only)
        return log_end == 0 and (hard_state is None or lost)
    return may_found


BUGS = {
    # Any replica that lost its disk re-applies the create_topic command as if it were new: an
    # empty voter that forgot its acknowledgements and its vote.
    "a replica that lost its disk takes the founding": _lost_ones_found_too(founders_only=False),
    # The founder that lost its disk leads epoch 1 again with an empty log, beside followers that
    # hold its first life's epoch-1 entries (two different entries at one epoch and offset).
    "a founder that lost its disk leads epoch 1 again": _lost_ones_found_too(founders_only=True),
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_simulator_catches_a_lost_replica_taking_the_founding(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Replica, "_may_found", BUGS[bug])
    failed = _first_failure()
    assert failed is not None, f"the simulator missed '{bug}' in {SEEDS_MAX} seeds"
    print(f"'{bug}' caught by seed {failed.seed}: {failed.invariant}")
    assert failed.invariant in SAFETY, (failed.seed, failed.invariant, failed.detail)


def test_the_shipped_founding_passes_the_seeds_the_bugs_fail() -> None:
    results = [run_seed(seed, steps=STEPS) for seed in range(PASSING_SEEDS)]
    assert not [(r.seed, r.invariant) for r in results if not r.ok]
    assert sum(r.early_wipes for r in results) > 5, "the seeds wipe disks soon after creation"
