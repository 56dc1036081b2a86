"""Teeth on the shipped code: each deliberate bug is applied to a PRODUCTION module (the group
service's rooms zq.node.group_replication, zq.node.group_membership and zq.node.group_dead_letters,
where the names patched are called; zq.core.grouplead; zq.core.consumer_rules), not to a simulator
switch, and the groups simulator, which runs that very service (zq/sim/group_host.py) and drives
that very consumer core (zq/sim/group_consumer.py), must catch it within the seeds `make test` runs
(tests/test_sim_groups.py: SEEDS seeds of STEPS steps from 0). Each test stops at the first seed
that fails (measured: the majority read at seed 30, the fenced ack at 2, the dead-letter producer
id at 8, the retry quorum at 460; the consumer core's sorted resume at 24, and 16 of the 500 seeds
catch it).
"""
from __future__ import annotations

import pytest

import zq.node.group_dead_letters as dead_letters
import zq.node.group_membership as membership
import zq.node.group_replication as replication
from zq.core import consumer_rules, grouplead, quorum
from zq.sim.groups import run_seed
from tests.test_sim_groups import SEEDS, STEPS


def _first_failure() -> tuple[int, str, str]:
    for seed in range(SEEDS):
        r = run_seed(seed, STEPS)
        if not r.ok:
            return seed, r.invariant, r.detail
    return -1, "", "no seed failed"


def test_a_majority_read_one_reply_short_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new leader that serves after merging one copy fewer than a majority (its own alone, of 3)."""
    monkeypatch.setattr(replication, "has_majority", lambda granted, voters: len(set(granted)) >= quorum.majority(voters) - 1)
    seed, invariant, detail = _first_failure()
    assert invariant == "attempts never go down", (seed, invariant, detail)


def test_an_ack_applied_from_a_fenced_member_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The leader applies an Ack of a member it sees as no longer holding the partition."""
    check_member = membership.check_member

    def lets_fenced_acks_through(m, member_id, generation, tp, strict, long_unknown=False):
        refusal = check_member(m, member_id, generation, tp, strict, long_unknown)
        return None if refusal is not None and not strict and refusal.kind == grouplead.FENCED else refusal

    monkeypatch.setattr(membership, "check_member", lets_fenced_acks_through)
    seed, invariant, detail = _first_failure()
    assert invariant == "fenced acks change nothing", (seed, invariant, detail)


def test_a_dead_letter_write_without_its_idempotent_producer_id_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service as it shipped before: producer id 0, so a retry whose first answer was lost (or a
    second leader of the source partition) writes the copy again."""
    monkeypatch.setattr(dead_letters, "dead_letter_producer_id", lambda group, topic_id, partition, offset: 0)
    seed, invariant, detail = _first_failure()
    assert invariant == "at most one dead letter per source message", (seed, invariant, detail)


def test_a_redelivery_before_a_majority_holds_its_failure_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quorum for retries switched off in the core the service drives."""
    monkeypatch.setattr(grouplead.PartitionLead, "retry_ok", lambda self, offset: True)
    seed, invariant, detail = _first_failure()
    assert invariant == "attempts never go down", (seed, invariant, detail)


def test_paused_partitions_resumed_sorted_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer core resumes the partitions that waited for room sorted by number, not in the
    order they paused (as the client once did, found by this simulator at seed 107): with
    `max_in_flight` below the partitions held, the highest ones starve and never drain."""
    def resume_sorted(self: consumer_rules.GroupConsumerCore, now_ms: float) -> None:
        for p in sorted(self.paused):
            del self.paused[p]
            self._schedule_lease(p, now_ms, resumed=True)

    monkeypatch.setattr(consumer_rules.GroupConsumerCore, "resume", resume_sorted)
    seed, invariant, detail = _first_failure()
    assert invariant == "drained in bounded time", (seed, invariant, detail)

