"""Delivery state of a (group, partition): lattice laws, no loss, attempts never go down, encodings."""
from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zq.core.groupstate import (DLQ_DONE, DLQ_DUE, DeadLetter, Delivery, DeliveryState, Lease, OffsetState,
                                Retry, merge)
from zq.core.retry import BackoffPolicy, RetryPolicy
from zq.errors import ProtocolError

POLICY = RetryPolicy(max_deliveries=3, backoff=BackoffPolicy(initial_ms=100, max_ms=1_000, jitter=0.0))
WINDOW = 8
owners = st.sampled_from(["m1", "m2", "m3"])


@st.composite
def offset_states(draw):
    attempts = draw(st.integers(0, 4))
    failures = draw(st.sampled_from(sorted({attempts, max(attempts - 1, 0)})))
    lease = None
    if failures < attempts or (attempts and draw(st.booleans())):
        lease_attempt = attempts if failures < attempts else draw(st.integers(1, attempts))
        lease = Lease(lease_attempt, draw(st.integers(0, 50)), draw(owners))
    ff = draw(st.none() | st.integers(0, 50))
    return OffsetState(attempts=attempts, failures=failures, next_visible_ms=draw(st.integers(0, 50)),
                       lease=lease, acked=draw(st.booleans()), dead_letter=draw(st.integers(0, 2)),
                       error_attempt=draw(st.integers(0, failures)), error=draw(st.sampled_from(["", "x", "y"])),
                       first_failure_ms=ff, last_failure_ms=None if ff is None else ff + draw(st.integers(0, 9)))


@st.composite
def states(draw):
    committed = draw(st.integers(0, 4))
    offs = draw(st.dictionaries(st.integers(committed, committed + WINDOW - 1), offset_states(), max_size=5))
    return DeliveryState(draw(st.integers(0, 1)), committed, offs, offsets_tracked_max=WINDOW)


# ---- lattice laws


@settings(max_examples=100, deadline=None)
@given(states(), states())
def test_merge_is_commutative(a, b):
    assert merge(a, b) == merge(b, a)


@settings(max_examples=100, deadline=None)
@given(states(), states(), states())
def test_merge_is_associative(a, b, c):
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


@settings(max_examples=100, deadline=None)
@given(states())
def test_merge_is_idempotent_and_leaves_inputs_alone(a):
    before = a.to_dict()
    assert merge(a, a) == a
    assert a.to_dict() == before


@settings(max_examples=100, deadline=None)
@given(states())
def test_dict_form_round_trips_through_cbor(a):
    assert DeliveryState.from_dict(cbor2.loads(cbor2.dumps(a.to_dict())), offsets_tracked_max=WINDOW) == a


# ---- operations only move up the lattice; attempts never go down; nothing done that was not acked


op = st.one_of(
    st.tuples(st.just("lease"), st.lists(st.integers(0, 7), max_size=4), owners, st.integers(1, 30)),
    st.tuples(st.just("ack"), st.integers(0, 7)),
    st.tuples(st.just("ack_range"), st.integers(0, 7), st.integers(0, 12)),
    st.tuples(st.just("nack"), st.integers(0, 7), st.sampled_from(["boom", "bad"]), st.none() | st.integers(0, 40)),
    st.tuples(st.just("expire")),
    st.tuples(st.just("dlq_done"), st.integers(0, 7)),
    st.tuples(st.just("advance")),
    st.tuples(st.just("extend"), st.integers(0, 7), owners, st.integers(1, 60)),
    st.tuples(st.just("merge"), st.integers(0, 2)),
    st.tuples(st.just("tick"), st.integers(0, 40)),
    st.tuples(st.just("reset"), st.integers(0, 5)),
)


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), op), min_size=20, max_size=50), st.floats(0, 1, exclude_max=True))
def test_random_operations_on_three_copies(steps, rnd):
    replicas = [DeliveryState(offsets_tracked_max=WINDOW) for _ in range(3)]
    now_ms = 0
    done: set[tuple[int, int]] = set()        # (epoch, offset) acked or dead-lettered by some op
    base = {0: 0}                             # epoch -> highest offset a reset started it at
    for who, (kind, *args) in steps:
        s = replicas[who]
        before = s.copy()
        if kind == "lease":
            for d in s.lease(args[0], args[1], now_ms + args[2], now_ms):
                e = s.offsets[d.offset]
                assert isinstance(d, Delivery) and d.attempt == e.attempts == e.failures + 1
                assert e.lease is not None and e.lease.owner == args[1] and e.lease.attempt == d.attempt
        elif kind == "ack":
            if s.ack(args[0]):
                done.add((s.reset_epoch, args[0]))
        elif kind == "ack_range":
            for o in range(args[0], args[1]):
                if s.ack(o):
                    done.add((s.reset_epoch, o))
        elif kind == "nack":
            s.nack(args[0], reason=args[1], now_ms=now_ms, policy=POLICY, rnd=rnd, delay_ms=args[2])
        elif kind == "expire":
            s.expire(now_ms, POLICY, rnd)
        elif kind == "dlq_done":
            if s.on_dead_lettered(args[0]):
                done.add((s.reset_epoch, args[0]))
        elif kind == "advance":
            s.maybe_advance_committed()
        elif kind == "extend":
            s.extend(args[0], args[1], now_ms + args[2], now_ms)
        elif kind == "merge":
            s.merge_from(replicas[args[0]])
        elif kind == "tick":
            now_ms += args[0]
        elif kind == "reset":
            s.reset(args[0])
            base[s.reset_epoch] = max(base.get(s.reset_epoch, 0), args[0])
        if who != 2:   # the shell advances after each change; copy 2 only when told to
            s.maybe_advance_committed()
        # Every step moves the copy up: merging the old copy in changes nothing.
        assert merge(before, s) == s, (kind, args)
        if s.reset_epoch == before.reset_epoch:
            assert s.committed >= before.committed
            for o, e in before.offsets.items():
                if o >= s.committed:
                    assert s.offsets[o].attempts >= e.attempts
                    assert s.offsets[o].failures >= e.failures
        for o, e in s.offsets.items():
            assert e.failures <= e.attempts <= e.failures + 1
            assert e.attempts <= POLICY.max_deliveries
            assert s.committed <= o < s.committed + WINDOW
        # No loss: every offset below committed (since its epoch began) was acked or dead-lettered.
        for o in range(base.get(s.reset_epoch, 0), s.committed):
            assert (s.reset_epoch, o) in done, (o, s)


# ---- scenarios


def test_poison_message_is_dead_lettered_after_max_deliveries_and_the_partition_moves_on():
    s = DeliveryState()
    now = 1_000
    results = []
    for attempt in (1, 2, 3):
        deliveries = s.lease([0, 1], "m1", now + 30_000, now)
        assert Delivery(0, attempt, 0) in deliveries
        if attempt == 1:
            assert s.ack(1)
        results.append(s.nack(0, reason=f"boom {attempt}", now_ms=now, policy=POLICY, rnd=0.5))
        now += 5_000
    assert results[:2] == [Retry(0, 1, 1_100), Retry(0, 2, 6_200)]
    assert results[2] == DeadLetter(0, attempts=3, last_error="boom 3", first_failure_ms=1_000,
                                    last_failure_ms=11_000)
    assert s.lease([0], "m1", now + 1, now) == []             # due for the DLQ: never delivered again
    assert s.pending_dead_letters() == [results[2]]
    assert not s.maybe_advance_committed()                    # not done until the copy is acknowledged
    assert s.stats().dead_letter_due == 1
    assert s.on_dead_lettered(0)
    assert s.maybe_advance_committed() and s.committed == 2 and s.offsets == {}


def test_nack_waits_for_backoff_and_a_repeated_nack_counts_once():
    s = DeliveryState()
    s.lease([5], "m1", 100, 0)
    assert s.nack(5, reason="e", now_ms=10, policy=POLICY, rnd=0.0) == Retry(5, 1, 110)
    assert s.nack(5, reason="e", now_ms=11, policy=POLICY, rnd=0.0) is None
    assert s.offsets[5].failures == 1
    assert s.lease([5], "m2", 200, 109) == []
    assert s.lease([5], "m2", 200, 110) == [Delivery(5, 2, 0)]
    assert s.nack(5, reason="late", now_ms=120, policy=POLICY, rnd=0.0, attempt=1) is None   # stale attempt


def test_expired_lease_is_a_failed_attempt_and_redelivered_to_another_member():
    s = DeliveryState()
    assert s.lease([0, 1], "m1", 50, 0) == [Delivery(0, 1, 0), Delivery(1, 1, 0)]
    assert s.lease([0], "m2", 60, 10) == []                   # leased to m1, live
    assert s.lease([0], "m1", 80, 10) == [Delivery(0, 1, 0)]  # m1 asks again: same attempt, later deadline
    assert s.extend(1, "m1", 90, 20) and not s.extend(1, "m2", 95, 20)
    assert s.expire(79, POLICY, 0.5) == []
    [r] = s.expire(80, POLICY, 0.5)
    assert isinstance(r, Retry) and r.offset == 0 and r.attempt == 1
    assert s.offsets[0].error.startswith("lease of m1 expired")
    assert s.lease([0], "m2", 1_000, r.next_visible_ms) == [Delivery(0, 2, 0)]
    assert s.stats() == type(s.stats())(committed=0, in_flight=2, retrying=0, acked_ahead=0, dead_letter_due=0)


def test_expiry_reaches_the_dead_letter_topic_too():
    s = DeliveryState()
    now, out = 0, None
    for _ in range(POLICY.max_deliveries):
        [_d] = s.lease([0], "m1", now + 10, now)
        now += 10
        [out] = s.expire(now, POLICY, 0.3)
        now = getattr(out, "next_visible_ms", now)
    assert isinstance(out, DeadLetter) and out.attempts == 3 and s.offsets[0].dead_letter == DLQ_DUE


def test_window_bounds_what_may_be_delivered():
    s = DeliveryState(offsets_tracked_max=4)
    assert [d.offset for d in s.lease(range(10), "m", 10, 0)] == [0, 1, 2, 3]
    for o in (1, 2, 3):
        s.ack(o)
    assert not s.ack(4)                    # outside the window: ignored
    assert not s.maybe_advance_committed()  # offset 0 still in flight holds the window
    assert s.lease([4], "m", 10, 0) == []
    s.ack(0)
    assert s.maybe_advance_committed() and s.committed == 4
    assert [d.offset for d in s.lease(range(10), "m", 10, 0)] == [4, 5, 6, 7]


def test_lost_update_costs_a_redelivery_not_a_loss():
    a = DeliveryState()
    a.lease([0, 1], "m1", 100, 0)
    b = a.copy()                    # b is gossiped this much
    a.ack(0), a.ack(1)              # these acks are lost with a (a crashes before gossiping)
    a.maybe_advance_committed()
    assert a.committed == 2
    # b never learns of the acks: it redelivers after the leases expire, with a higher attempt.
    b.expire(100, POLICY, 0.0)
    assert b.committed == 0 and [d.attempt for d in b.lease([0, 1], "m2", 10_000, 1_000)] == [2, 2]
    # and if the acks do arrive later, they win and the attempt count stays.
    b.merge_from(a)
    assert b.committed == 2 and b.offsets == {}


def test_reset_epoch_wins_over_a_higher_committed_and_fences_old_acks():
    a = DeliveryState()
    for o in range(5):
        a.ack(o)
    a.maybe_advance_committed()
    b = a.copy()
    b.reset(1)                      # replay from offset 1
    a.ack(5)
    a.maybe_advance_committed()
    assert merge(a, b) == merge(b, a) == b and merge(a, b).committed == 1
    assert not b.ack(1, epoch=0)    # an ack of a delivery from before the replay
    assert b.ack(1, epoch=1)
    assert b.lease([0, 1, 2], "m", 10, 0) == [Delivery(2, 1, 1)]


def test_concurrent_leases_merge_to_the_later_deadline_and_both_acks_count():
    a, b = DeliveryState(), DeliveryState()
    a.lease([0], "m1", 100, 0)
    b.lease([0], "m2", 100, 0)
    m = merge(a, b)
    assert m.offsets[0].lease == Lease(1, 100, "m2") and m.offsets[0].attempts == 1
    b.lease([0], "m2", 200, 10)
    assert merge(a, b).offsets[0].lease == Lease(1, 200, "m2")
    a.ack(0)
    assert merge(a, b).offsets[0].done


def test_skip_to_drops_what_retention_deleted():
    s = DeliveryState()
    s.lease([0, 1, 7], "m", 10, 0)
    assert s.skip_to(5) and s.committed == 5 and list(s.offsets) == [7]
    assert not s.skip_to(3)


def test_next_deadline_is_the_earliest_lease_or_retry():
    s = DeliveryState()
    assert s.next_deadline_ms() is None
    s.lease([0, 1], "m", 500, 0)
    s.nack(1, reason="x", now_ms=10, policy=POLICY, rnd=0.0)
    assert s.next_deadline_ms() == 110
    s.ack(1)
    assert s.next_deadline_ms() == 500


def test_nack_delay_is_clamped_and_unknown_offsets_are_ignored():
    s = DeliveryState()
    assert s.nack(3, reason="x", now_ms=0, policy=POLICY, rnd=0.0) is None   # never delivered
    s.lease([3], "m", 10, 0)
    r = s.nack(3, reason="x", now_ms=0, policy=POLICY, rnd=0.0, delay_ms=-5)
    assert r == Retry(3, 1, 0)
    s.lease([3], "m", 10, 0)
    r = s.nack(3, reason="x", now_ms=0, policy=POLICY, rnd=0.0, delay_ms=10**15)
    assert r.next_visible_ms == DeliveryState.nack_delay_ms_max


@pytest.mark.parametrize("bad", [
    None, {"epoch": 0}, {"epoch": -1, "committed": 0, "offsets": []},
    {"epoch": 0, "committed": 5, "offsets": [[4, {}]]},
    {"epoch": 0, "committed": 0, "offsets": [[0, {"a": 1}]]},                # in progress without a lease
    {"epoch": 0, "committed": 0, "offsets": [[0, {"a": 1, "f": 2}]]},
    {"epoch": 0, "committed": 0, "offsets": [[0, {"zz": 1}]]},
    {"epoch": 0, "committed": 0, "offsets": [[0, {"k": 1}]]},
    {"epoch": 0, "committed": 0, "offsets": [[0, {"l": [1, 2]}]]},
    {"epoch": 0, "committed": 0, "offsets": [[0, {}], [0, {}]]},
    {"epoch": 0, "committed": 0, "offsets": [[10**6, {}]]},
])
def test_bad_peer_state_is_a_protocol_error(bad):
    with pytest.raises(ProtocolError):
        DeliveryState.from_dict(bad)


def test_dead_lettered_stage_constant_is_done():
    assert OffsetState(dead_letter=DLQ_DONE).done and not OffsetState(dead_letter=DLQ_DUE).done


def test_a_late_ack_of_an_offset_due_for_the_dead_letter_topic_changes_nothing():
    """Found by the groups simulator: the last delivery's lease ran out (the offset became due for
    the dead-letter topic and its copy started), then the slow consumer's ack came and was
    applied, so the message ended both acknowledged and dead-lettered."""
    s = DeliveryState()
    policy = RetryPolicy(max_deliveries=1, backoff=POLICY.backoff)
    assert [d.attempt for d in s.lease([0], "m1", 100, 0)] == [1]
    [dead] = s.expire(100, policy, 0.5)
    assert isinstance(dead, DeadLetter) and s.offsets[0].dead_letter == DLQ_DUE
    assert not s.ack(0)                                   # too late: the copy may be on its way
    assert not s.offsets[0].acked and [d.offset for d in s.pending_dead_letters()] == [0]
    assert s.on_dead_lettered(0) and s.maybe_advance_committed() and s.committed == 1


def test_reset_to_a_given_epoch():
    s = DeliveryState()
    s.reset(3, epoch=1_000)
    assert (s.reset_epoch, s.committed) == (1_000, 3)
    s.reset(1)
    assert s.reset_epoch == 1_001
    with pytest.raises(AssertionError):
        s.reset(0, epoch=1_001)                           # an epoch never goes back, nor repeats


@given(states())
def test_the_gossip_view_is_below_the_state_and_keeps_every_attempt_above_one_failure_ack_and_dead_letter(a):
    view = DeliveryState.from_dict(cbor2.loads(cbor2.dumps(a.gossip_dict())), offsets_tracked_max=WINDOW)
    assert merge(a, view) == a, "the view is a lower state: merging it into the state changes nothing"
    for o, e in a.offsets.items():
        kept = o in view.offsets
        assert kept == bool(e.attempts > 1 or e.failures or e.acked or e.dead_letter), (o, e)
        if kept:
            assert view.offsets[o] == e
