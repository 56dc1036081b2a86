"""Group membership core: generations, expiry, static members, fencing, gossip merges (no cluster)."""
from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zq.core.groups import GroupMembership
from zq.errors import InvalidRequest, ProtocolError

PARTS = [("orders", p) for p in range(6)]


def join(g, m, now_ms=0, topics=("orders",), timeout_ms=10_000, static=False):
    return g.on_join(m, topics=topics, session_timeout_ms=timeout_ms, static=static, now_ms=now_ms)


def test_generation_moves_on_every_change_of_the_live_set_and_only_then():
    g = GroupMembership("billing", "n1")
    assert g.generation == 0
    assert join(g, "a") == 1 and join(g, "b") == 2
    assert g.on_heartbeat("a", 5_000) and g.generation == 2
    assert join(g, "a", now_ms=6_000) == 2            # a repeated join is a heartbeat
    assert join(g, "a", topics=("orders", "refunds")) == 3   # a new subscription is a change
    assert g.on_leave("b", 7_000) and g.generation == 4
    assert not g.on_leave("b", 7_000) and g.generation == 4
    assert not g.on_heartbeat("b", 8_000)               # b must join again
    assert join(g, "b", now_ms=8_000) == 5 and g.records["b"].incarnation == 2


def test_session_timeout_expires_and_moves_partitions():
    g = GroupMembership("billing", "n1")
    join(g, "a", timeout_ms=1_000), join(g, "b", timeout_ms=5_000)
    g.maybe_rebalance(PARTS)
    gen = g.generation
    assert len(g.assignment_of("a")) == 3
    g.on_heartbeat("a", 900)
    assert g.next_deadline_ms() == 1_900
    assert g.expire(1_899) == [] and g.generation == gen
    assert g.expire(1_900) == ["a"] and g.generation == gen + 1
    assert g.maybe_rebalance(PARTS)
    assert g.assignment_of("b") == PARTS and g.assignment_of("a") == []
    assert g.is_fenced("b", gen) and not g.is_fenced("b", gen + 1) and g.is_fenced("a", gen + 1)
    assert g.is_ahead(gen + 2) and not g.is_ahead(gen + 1)


def test_static_member_restart_within_session_keeps_partitions_and_generation():
    g = GroupMembership("billing", "n1")
    for m in ("s1", "s2", "s3"):
        join(g, m, static=True)
    g.maybe_rebalance(PARTS)
    before = (g.generation, g.assignment)
    # s2's process restarts and joins again under its static id, within its session timeout.
    assert join(g, "s2", now_ms=4_000, static=True) == before[0]
    assert not g.maybe_rebalance(PARTS)
    assert (g.generation, g.assignment) == before


def test_new_partitions_are_a_new_generation():
    g = GroupMembership("billing", "n1")
    join(g, "a"), join(g, "b")
    g.maybe_rebalance(PARTS)
    gen = g.generation
    assert g.maybe_rebalance(PARTS + [("orders", 6)])
    assert g.generation == gen + 1 == g.assignment.generation
    assert sum(len(g.assignment_of(m)) for m in "ab") == 7


def test_group_size_is_bounded():
    g = GroupMembership("billing", "n1")
    g.members_max = 2
    join(g, "a"), join(g, "b")
    with pytest.raises(InvalidRequest):
        join(g, "c")
    with pytest.raises(InvalidRequest):
        join(g, "", now_ms=0)


def test_departed_records_are_bounded_oldest_first():
    g = GroupMembership("billing", "n1")
    g.departed_kept_max = 2
    for i, m in enumerate("abcd"):
        join(g, m, now_ms=i)
        g.on_leave(m, now_ms=i)
    assert sorted(g.records) == ["c", "d"] and g.generation == 8


def test_two_nodes_converge_on_members_generation_and_assignment():
    n1, n2 = GroupMembership("billing", "n1"), GroupMembership("billing", "n2")
    join(n1, "a"), join(n2, "b"), join(n2, "c")
    n1.maybe_rebalance(PARTS), n2.maybe_rebalance(PARTS)
    assert n1.generation == 1 and n2.generation == 2            # concurrent changes, each its own
    n1.merge_from(n2), n2.merge_from(n1)
    assert n1.generation == n2.generation == 3                  # the merge is above both
    n1.maybe_rebalance(PARTS), n2.maybe_rebalance(PARTS)
    assert n1 == n2.copy() or (n1.assignment == n2.assignment and n1.records == n2.records)
    assert sorted(tp for m in "abc" for tp in n1.assignment_of(m)) == PARTS
    # A member left on n2 while n1 still saw it heartbeat: the leave wins, once.
    n1.on_heartbeat("b", 3_000)
    n2.on_leave("b", 2_000)
    n1.merge_from(n2)
    assert not n1.is_live("b") and n1.generation == 4


def test_expired_member_rejoining_elsewhere_wins_over_the_old_incarnation():
    n1, n2 = GroupMembership("g", "n1"), GroupMembership("g", "n2")
    join(n1, "a", timeout_ms=100)
    n2.merge_from(n1)
    n1.expire(200)                        # n1 expires a ...
    join(n2, "a", now_ms=150, timeout_ms=100)   # ... while a reconnects to n2 (a heartbeat there)
    n2.on_leave("a", 160)
    join(n2, "a", now_ms=170, timeout_ms=100)   # and rejoins: incarnation 2
    n1.merge_from(n2)
    assert n1.is_live("a") and n1.records["a"].incarnation == 2


def test_round_trip_and_bad_input():
    g = GroupMembership("billing", "n1")
    join(g, "a", static=True), join(g, "b")
    g.on_leave("b", 3)
    g.maybe_rebalance(PARTS)
    back = GroupMembership.from_dict(cbor2.loads(cbor2.dumps(g.to_dict())), "n1")
    assert back == g and back.generation == g.generation
    for bad in [None, {"group": "g"}, dict(g.to_dict(), members=[["a", 0, [], 1, False, 0, False]]),
                dict(g.to_dict(), changes=[["n1", -1]]), dict(g.to_dict(), assignment=[1, [["t"]], []])]:
        with pytest.raises(ProtocolError):
            GroupMembership.from_dict(bad, "n1")
    with pytest.raises(ProtocolError):
        g.merge_from(GroupMembership("other", "n2"))


# ---- gossip properties: random operations on three nodes, merged in random orders

op = st.one_of(
    st.tuples(st.just("join"), st.sampled_from("abcd"), st.sampled_from([("orders",), ("orders", "x")]),
              st.booleans()),
    st.tuples(st.just("heartbeat"), st.sampled_from("abcd")),
    st.tuples(st.just("leave"), st.sampled_from("abcd")),
    st.tuples(st.just("expire")),
    st.tuples(st.just("tick"), st.integers(0, 400)),
    st.tuples(st.just("rebalance")),
    st.tuples(st.just("merge"), st.integers(0, 2)),
)


def run(steps):
    nodes = [GroupMembership("g", f"n{i}") for i in range(3)]
    now_ms = 0
    for who, (kind, *args) in steps:
        g = nodes[who]
        gen, live = g.generation, g.live_members()
        if kind == "join":
            join(g, args[0], now_ms=now_ms, topics=args[1], timeout_ms=500, static=args[2])
        elif kind == "heartbeat":
            g.on_heartbeat(args[0], now_ms)
        elif kind == "leave":
            g.on_leave(args[0], now_ms)
        elif kind == "expire":
            g.expire(now_ms)
        elif kind == "tick":
            now_ms += args[0]
        elif kind == "rebalance":
            g.maybe_rebalance(PARTS)
        elif kind == "merge":
            g.merge_from(nodes[args[0]])
        assert g.generation >= gen
        if g.live_members() != live:
            assert g.generation > gen, (kind, args)
    return nodes


def merged(a, b):
    out = a.copy()
    out.merge_from(b)
    out.node_id = "x"
    return out


steps_st = st.lists(st.tuples(st.integers(0, 2), op), min_size=5, max_size=40)


@settings(max_examples=100, deadline=None)
@given(steps_st)
def test_merge_laws_and_convergence(steps):
    a, b, c = run(steps)
    assert merged(a, b) == merged(b, a)
    assert merged(merged(a, b), c) == merged(a, merged(b, c))
    assert merged(a, a) == merged(a, GroupMembership("g", "n9"))
    # After everyone has heard from everyone, all agree on members, generation and assignment.
    for _ in range(2):
        for x in (a, b, c):
            for y in (a, b, c):
                x.merge_from(y)
    for x in (a, b, c):
        x.maybe_rebalance(PARTS)
    for x in (a, b, c):
        for y in (a, b, c):
            x.merge_from(y)
    assert a.generation == b.generation == c.generation
    assert a.live_members() == b.live_members() == c.live_members()
    assert a.assignment == b.assignment == c.assignment
    if a.live_members():
        assert a.assignment.generation == a.generation
        assert sorted(tp for m in a.live_members() for tp in a.assignment_of(m)) == PARTS


def test_a_stale_copy_never_lowers_the_generation_or_revives_a_member():
    n1 = GroupMembership("g", "n1")
    join(n1, "a")
    stale = n1.copy()
    join(n1, "b"), n1.on_leave("a", 5)
    gen = n1.generation
    n1.merge_from(stale)
    assert n1.generation == gen == 3 and not n1.is_live("a") and n1.is_live("b")


# ---- the leader-side rules (zq/core/grouplead.py)

from zq.core.grouplead import (FENCED, REBALANCING, PartitionLead, check_member,  # noqa: E402
                               reset_epoch_floor)
from zq.core.groups import membership_gossip_interval_ms  # noqa: E402
from zq.core.groupstate import DeliveryState  # noqa: E402
from zq.core.retry import BackoffPolicy, RetryPolicy  # noqa: E402

POLICY = RetryPolicy(max_deliveries=2, backoff=BackoffPolicy(initial_ms=0, max_ms=0, jitter=0.0))


def _settled(*members: str) -> GroupMembership:
    g = GroupMembership("g", "n1")
    for m in members:
        join(g, m)
    g.maybe_rebalance(PARTS)
    return g


def test_check_member_fences_stale_generations_and_members_without_the_partition():
    g = _settled("a", "b")
    tp_a, tp_b = g.assignment_of("a")[0], g.assignment_of("b")[0]
    assert check_member(g, "a", g.generation, tp_a, strict=True) is None
    r = check_member(g, "a", g.generation - 1, tp_a, strict=True)
    assert r.kind == FENCED and r.counted and r.generation == g.generation
    assert check_member(g, "a", g.generation - 1, tp_a, strict=False) is None   # an ack of work done
    assert check_member(g, "a", g.generation, tp_b, strict=False).kind == FENCED
    assert check_member(g, "a", g.generation + 1, tp_b, strict=False).kind == REBALANCING
    assert check_member(g, "zed", g.generation, tp_a, strict=False).kind == FENCED
    assert check_member(g, "zed", g.generation + 1, tp_a, strict=False).kind == REBALANCING
    assert check_member(None, "a", 1, tp_a, strict=True).kind == REBALANCING
    g.on_leave("a", 1)
    assert check_member(g, "a", g.generation, tp_a, strict=False).kind == FENCED


def _held_by_majority(lead: PartitionLead) -> None:
    assert lead.note_held("n1", lead.version, ["n1"])


def test_lease_plan_takes_due_retries_first_then_new_offsets_and_control_records_are_done():
    lead = PartitionLead.fresh(0)
    plan = lead.plan_lease(0, 10, 0, 4)
    assert (plan.retries, plan.start, plan.end) == ([], 0, 4)
    lead.on_read(0, 1, control=True)                       # a leader's epoch marker
    lead.on_read(1, 4, control=False)
    assert lead.state.committed == 1 and lead.cursor == 4
    assert [(d.offset, d.attempt) for d in lead.grant([1, 2, 3], "a", 1_000, 0)] == [(1, 1), (2, 1), (3, 1)]
    out = lead.on_ack("a", 0, [1], [[2, 1, 0, "boom"]], [], 10, POLICY, lambda: 0.5)
    assert (out.acked, out.nacked, out.retries, out.dead_letters_due) == (1, 1, 1, 0)
    assert lead.plan_lease(10, 10, 0, 6).retries == [] and not lead.ready(4, 10)   # no majority holds the failure
    _held_by_majority(lead)
    plan = lead.plan_lease(10, 10, 0, 6)
    assert (plan.retries, plan.start, plan.end) == ([2], 4, 6)
    assert lead.ready(6, 10) and not PartitionLead.fresh(6).ready(6, 10)


def test_sweep_fails_leases_of_departed_members_and_dead_letters_wait_for_their_copy():
    g = _settled("a")
    tp = ("orders", 0)
    lead = PartitionLead.fresh(0)
    lead.grant([0], "a", 10_000, 0)
    g.on_leave("a", 5)
    g.maybe_rebalance(PARTS)
    out = lead.sweep(10, g, tp, POLICY, lambda: 0.5)
    assert out.departed == 1 and out.retries == 1 and not out.writes
    _held_by_majority(lead)
    lead.grant([0], "b", 10_000, 20)
    out = lead.sweep(10_020, g, tp, POLICY, lambda: 0.5)   # b's lease ran out: the second failure
    assert out.expired == 1 and out.dead_letters_due == 1 and [w.letter.offset for w in out.writes] == [0]
    assert lead.state.committed == 0, "not done before its copy is acknowledged"
    assert not lead.sweep(10_021, g, tp, POLICY, lambda: 0.5).writes   # in flight: not started twice
    assert lead.on_dead_letter_written(out.writes[0], ok=True) and lead.state.committed == 1
    assert lead.dead_lettered == 1


def test_a_dead_letter_write_finishing_after_a_reset_does_not_count_in_the_new_epoch():
    lead = PartitionLead.fresh(0)
    lead.grant([0], "a", 100, 0)
    [write] = lead.sweep(100, None, ("orders", 0), RetryPolicy(1, POLICY.backoff), lambda: 0.5).writes
    lead.reset(0, 50)
    lead.grant([0], "a", 100, 100)
    [again] = lead.sweep(200, None, ("orders", 0), RetryPolicy(1, POLICY.backoff), lambda: 0.5).writes
    assert not lead.on_dead_letter_written(write, ok=True)   # the old epoch's copy
    assert lead.state.committed == 0 and lead.on_dead_letter_written(again, ok=True)


def test_merge_moves_committed_over_offsets_done_in_either_copy():
    """Found by the groups simulator (seed 19): one copy had offset 1 acked, the other had offset 0
    acked; the join had committed 0 with both done, and since no later ack came, the
    partition stalled with everything acknowledged."""
    a, b = PartitionLead.fresh(0), PartitionLead.fresh(0)
    for lead in (a, b):
        lead.grant([0, 1], "m", 1_000, 0)
    a.on_ack("m", 0, [1], [], [], 1, None, lambda: 0.5)
    b.on_ack("m", 0, [0], [], [], 1, None, lambda: 0.5)
    assert (a.state.committed, b.state.committed) == (0, 1)
    a.merge_from(b.state.copy(), 0)
    assert a.state.committed == 2 and not a.state.offsets
    loaded = PartitionLead.from_state(DeliveryState(0, 0, dict(PartitionLead.fresh(0).state.offsets)))
    assert loaded.state.committed == 0


def test_resets_at_two_nodes_never_share_an_epoch():
    """Found by the groups simulator (seed 22): a reset at a new leader that had not yet merged an
    earlier reset opened the same epoch number with another start, and merging mixed the two."""
    a, b = PartitionLead.fresh(0), PartitionLead.fresh(0)
    a.reset(4, reset_epoch_floor(1_000, "n1"))
    b.reset(9, reset_epoch_floor(1_000, "n2"))
    assert a.state.reset_epoch != b.state.reset_epoch
    b.reset(2, reset_epoch_floor(1_001, "n2"))
    a.merge_from(b.state.copy(), 0)
    assert (a.state.reset_epoch, a.state.committed) == (b.state.reset_epoch, 2), "the later reset wins whole"
    a.reset(7, reset_epoch_floor(5, "n1"))               # a slow clock still moves the epoch on
    assert a.state.reset_epoch == b.state.reset_epoch + 1


def test_membership_gossip_comes_often_enough_for_the_shortest_session():
    """Found by the groups simulator (seed 186): with 300 ms sessions and 500 ms gossip, the nodes a
    member did not heartbeat at expired it between rounds, and the group rebalanced without end."""
    g = GroupMembership("g", "n1")
    assert membership_gossip_interval_ms([g], 500, 20) == 500
    join(g, "a", timeout_ms=300)
    join(g, "b", timeout_ms=10_000)
    assert membership_gossip_interval_ms([g], 500, 20) == 75
    join(g, "c", timeout_ms=40)
    assert membership_gossip_interval_ms([g], 500, 20) == 20
    g.on_leave("c", 1)
    g.on_leave("a", 1)
    assert membership_gossip_interval_ms([g], 500, 20) == 500


def test_a_member_no_copy_knows_is_fenced_once_it_stayed_unknown_for_a_few_gossip_rounds():
    """Found by the groups simulator (seed 1652): every node that knew a group restarted
    (memberships are not stored), and its members' heartbeats were answered "retry shortly"
    for ever. A member that stays unknown for a few gossip rounds is fenced, so it joins again;
    a member just unknown (it joined through another node) is told to retry, so its first acks
    are not dropped."""
    from zq.core.grouplead import unknown_member
    g = _settled("a")
    assert unknown_member(g, "a", 99, long_unknown=True, where="n1") is None
    assert unknown_member(None, "a", 3, long_unknown=False, where="n1").kind == REBALANCING
    assert unknown_member(None, "a", 3, long_unknown=True, where="n1").kind == FENCED
    assert unknown_member(g, "zed", g.generation + 1, long_unknown=False, where="n1").kind == REBALANCING
    assert unknown_member(g, "zed", g.generation + 1, long_unknown=True, where="n1").kind == FENCED
    assert check_member(None, "a", 3, ("orders", 0), strict=True, long_unknown=True).kind == FENCED


def test_a_loaded_state_leases_offsets_below_one_acked_out_of_order():
    """Found by the groups simulator (seed 4309): a new leader got an ack for offset 6 before it
    leased anything, and after a restart it started leasing past the highest tracked offset, so
    offsets 0-5 were never delivered and the partition stalled."""
    lead = PartitionLead.fresh(0)
    lead.on_ack("m", 0, [6], [], [], 1, None, lambda: 0.5)
    loaded = PartitionLead.from_dict(cbor2.loads(cbor2.dumps(lead.to_dict())))
    plan = loaded.plan_lease(10, 100, 0, 10)
    assert (plan.start, plan.end) == (0, 10)
    loaded.on_read(0, 10, control=False)
    assert [d.offset for d in loaded.grant(list(range(10)), "m", 1_000, 10)] == [0, 1, 2, 3, 4, 5, 7, 8, 9]


# ---- quorum for retries: attempt numbers never go down across leader changes

REPLICAS = ["n1", "n2", "n3"]


def _failed_once(lead: PartitionLead) -> None:
    [d] = lead.grant([0], "a", 1_000, 0)
    assert d.attempt == 1   # a first delivery waits for nobody
    lead.on_ack("a", 0, [], [[0, 1, 0, "boom"]], [], 10, POLICY, lambda: 0.5)


def test_a_redelivery_waits_until_a_majority_of_the_replicas_holds_its_failure():
    lead = PartitionLead.fresh(0)
    _failed_once(lead)
    v = lead.version
    assert lead.wants_confirmation()
    assert lead.grant([0], "a", 1_000, 20) == [] and lead.plan_lease(20, 10, 0, 1).retries == []
    assert not lead.note_held("n1", v, REPLICAS)          # the leader's own disk: 1 of 3
    assert not lead.note_held("n9", v, REPLICAS)          # not a replica of this partition
    assert not lead.note_held("n2", v + 1, REPLICAS)      # a version this copy never had
    lead.note_held("n2", v - 1, REPLICAS)                 # an older copy, without the failure
    assert lead.grant([0], "a", 1_000, 20) == []
    assert lead.note_held("n3", v, REPLICAS)              # 2 of 3 hold a copy with the failure
    assert not lead.wants_confirmation() and lead.plan_lease(20, 10, 0, 1).retries == [0]
    assert [(d.offset, d.attempt) for d in lead.grant([0], "a", 1_000, 20)] == [(0, 2)]


def test_a_new_leader_hands_out_at_least_the_attempt_any_consumer_saw():
    """The old leader served attempt 2 only once n2 held the failure of attempt 1; the new leader
    n3 reads n2's copy (any majority holds one that has it), so it hands out 2 again, never 1."""
    old = PartitionLead.fresh(0)
    _failed_once(old)
    n2 = PartitionLead.from_state(old.state.copy())       # gossip: n2 merged the failure
    old.note_held("n1", old.version, REPLICAS)
    old.note_held("n2", old.version, REPLICAS)
    assert [d.attempt for d in old.grant([0], "a", 100, 20)] == [2]
    new = PartitionLead.fresh(0)                          # n3 never heard of offset 0
    new.merge_from(n2.state.copy(), 0)                    # the majority read: its own copy and n2's
    new.on_taken_over()
    assert new.grant([0], "b", 100, 200) == [], "the merged copy is not yet held by a majority"
    new.note_held("n3", new.version, REPLICAS)
    new.note_held("n2", new.version, REPLICAS)
    assert [d.attempt for d in new.grant([0], "b", 100, 200)] == [2]


def test_a_merge_or_a_load_closes_the_gate_until_a_majority_holds_the_copy():
    lead = PartitionLead.fresh(0)
    _failed_once(lead)
    loaded = PartitionLead.from_dict(cbor2.loads(cbor2.dumps(lead.to_dict())))
    assert loaded.wants_confirmation() and loaded.grant([0], "a", 1_000, 20) == []
    loaded.note_held("n1", loaded.version, REPLICAS)
    loaded.note_held("n2", loaded.version, REPLICAS)
    assert [d.attempt for d in loaded.grant([0], "a", 1_000, 20)] == [2]
    loaded.merge_from(DeliveryState(0, 0), 0)
    assert loaded.wants_confirmation()
    assert not loaded.retry_ok(0)
    lone = PartitionLead.fresh(0)                         # one replica: its own disk is a majority
    _failed_once(lone)
    assert lone.note_held("n1", lone.version, ["n1"]) and [d.attempt for d in lone.grant([0], "a", 100, 20)] == [2]


def test_the_sweep_skips_the_offsets_until_a_lease_may_have_run_out_and_still_sees_every_expiry():
    lead = PartitionLead.fresh(0)
    lead.grant([0], "a", 10_000, 0)
    assert lead.sweep(100, None, ("orders", 0), POLICY, lambda: 0.5).expired == 0
    assert lead.expire_due_ms == 10_000
    lead.grant([1], "a", 100, 200)                     # a shorter lease after a longer one
    assert lead.expire_due_ms == 300
    out = lead.sweep(400, None, ("orders", 0), POLICY, lambda: 0.5)
    assert out.expired == 1 and lead.state.offsets[1].failures == 1 and lead.state.offsets[0].failures == 0
    lead.merge_from(DeliveryState(0, 0), 0)            # a merge may bring leases: look again
    assert lead.expire_due_ms == 0


def test_departed_leases_fail_after_every_membership_change_even_though_the_sweep_skips_unchanged_views():
    g = _settled("a", "b")
    tp = ("orders", 0)
    owner = next(m for m in ("a", "b") if tp in g.assignment_of(m))
    lead = PartitionLead.fresh(0)
    lead.grant([0, 1], owner, 60_000, 0)
    for t in range(1, 25):                             # a settled, unchanged view: nothing fails
        assert lead.sweep(t * 100, g, tp, POLICY, lambda: 0.5).departed == 0
    g.on_leave(owner, 2_500)
    g.maybe_rebalance(PARTS)
    assert lead.sweep(2_600, g, tp, POLICY, lambda: 0.5).departed == 2


def test_a_lease_failed_because_its_partition_moved_comes_back_at_once_one_of_a_member_that_left_after_backoff():
    slow = RetryPolicy(max_deliveries=5, backoff=BackoffPolicy(initial_ms=1_000, max_ms=1_000, jitter=0.0))
    g = _settled("a")
    lead = PartitionLead.fresh(0)
    lead.grant([0, 1], "a", 60_000, 0)
    join(g, "b", now_ms=10)
    join(g, "c", now_ms=10)
    g.maybe_rebalance(PARTS)
    moved = [t for t in PARTS if t not in g.assignment_of("a")]
    assert moved, "three members: partitions left a"
    tp = moved[0]
    out = lead.sweep(20, g, tp, slow, lambda: 0.5)
    assert out.departed == 2 and out.retries == 2
    assert [lead.state.offsets[o].next_visible_ms for o in (0, 1)] == [20, 20]   # no backoff: nothing failed
    assert lead.state.offsets[0].error.endswith("lost the partition in a rebalance")

    g2 = _settled("a")
    lead2 = PartitionLead.fresh(0)
    lead2.grant([0], "a", 60_000, 0)
    g2.on_leave("a", 5)
    g2.maybe_rebalance(PARTS)
    assert lead2.sweep(20, g2, ("orders", 0), slow, lambda: 0.5).departed == 1
    assert lead2.state.offsets[0].next_visible_ms == 20 + 1_000   # it may have crashed on the message
