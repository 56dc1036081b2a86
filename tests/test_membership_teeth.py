"""Teeth on the shipped membership service: deliberate bugs put into the PRODUCTION service
(zq.node.membership.MembershipService, which the real node runs through zq/io/membership.py),
each caught by the membership simulator, which runs that very service, within a bounded number
of seeds.

Each bug is monkeypatched into `zq.node.membership` (never a simulator switch); the test runs
seeds from 0 until the first failure and asserts that one comes within SEEDS_MAX, on the
invariant the broken rule keeps (at the time of writing: seed 17 for the seeds, 3 for the
re-announce, 1 for the stale record; the test prints where). The correct service passes every
seed up to there (the last test here; tests/test_sim_membership.py runs far more).
"""
from __future__ import annotations

import pytest

from zq.core.membership import State
from zq.node import membership
from zq.sim.members import run_seed

SEEDS_MAX = 40     # seeds tried per bug before the test says the simulator missed it
Service = membership.MembershipService


def _first_failure(seeds: int = SEEDS_MAX):
    for seed in range(seeds):
        r = run_seed(seed)
        if not r.ok:
            return r
    return None


def _seeds_pinged_once(mp: pytest.MonkeyPatch) -> None:
    """Seeds are pinged at start only: a node whose first pings were lost, or whose seeds were
    on the far side of a partition, never asks them again."""
    right = Service._join_seeds

    def join_seeds(self, now_ms: int) -> None:
        if not getattr(self, "_seeds_pinged", False):
            self._seeds_pinged = True
            right(self, now_ms)
    mp.setattr(Service, "_join_seeds", join_seeds)


def _refutation_not_reannounced(mp: pytest.MonkeyPatch) -> None:
    """Our own incarnation changes (a refutation) but zeroconf keeps announcing the old one."""
    right = Service._on_member_changed

    def on_member_changed(self, change, final: bool) -> None:
        discovery, self.discovery = self.discovery, None
        try:
            right(self, change, final)
        finally:
            self.discovery = discovery
    mp.setattr(Service, "_on_member_changed", on_member_changed)


def _stale_record_believed(mp: pytest.MonkeyPatch) -> None:
    """A discovery record of a member held suspect, dead or left is believed (the node routes to
    it) instead of handed to the core, which would ping it."""

    def drain_discovery(self, now_ms: int) -> None:
        if self.discovery is None:
            return
        effects: list = []
        for peer in self.discovery.drain(membership.DISCOVERED_PER_PASS_MAX):
            address = f"{peer.host}:{peer.port}"
            if self.core.state_of(peer.node) in (State.SUSPECT, State.DEAD, State.LEFT):
                self.host.learn_address(peer.node, address)
                continue
            effects += self.core.on_discovered(peer.node, address, peer.incarnation, now_ms)
        if effects:
            self._apply(effects, now_ms)
    mp.setattr(Service, "_drain_discovery", drain_discovery)


BUGS = {
    "seeds never pinged again": (_seeds_pinged_once, "no convergence"),
    "refutation not re-announced": (_refutation_not_reannounced, "no convergence"),
    "stale record of a suspect or dead member believed": (_stale_record_believed, "routing follows the detector"),
}


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_simulator_catches_a_bug_in_the_shipped_service(bug: str, monkeypatch: pytest.MonkeyPatch) -> None:
    apply, invariant = BUGS[bug]
    apply(monkeypatch)
    failed = _first_failure()
    assert failed is not None, f"the membership simulator missed '{bug}' in {SEEDS_MAX} seeds"
    print(f"{bug}: caught at seed {failed.seed}: {failed.invariant}: {failed.detail[:200]}")
    assert failed.invariant == invariant, f"seed {failed.seed}: {failed.invariant}: {failed.detail}"


def test_the_shipped_service_passes_the_seeds_the_bugs_fail() -> None:
    """Without a bug, every seed the bugs are tried on passes (the catch is the bug's)."""
    bad = [(r.seed, r.invariant) for r in (run_seed(seed) for seed in range(SEEDS_MAX)) if not r.ok]
    assert not bad
