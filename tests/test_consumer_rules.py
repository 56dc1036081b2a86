"""The group consumer's rules (zq.core.consumer_rules), driven without sockets or a clock."""
from __future__ import annotations

import sys

import pytest

from zq.core import consumer_rules as R
from zq.core.bounds import LIST_ITEMS_MAX

ADDRESSES = ["n1", "n2", "n3"]


def core(partitions=(0, 1), max_in_flight=100, **kw) -> R.GroupConsumerCore:
    c = R.GroupConsumerCore(R.ConsumerConfig("g", "t", "m1", max_in_flight=max_in_flight, heartbeat_ms=1_000,
                                             max_wait_ms=500, request_timeout_ms=2_000, **kw))
    c.on_joined("n1", 1, set(partitions), 0)
    return c


def of(effects, kind):
    return [e for e in effects if isinstance(e, kind)]


def leases(effects) -> dict[int, R.LeaseOrder]:
    return {o.partition: o for o in of(effects, R.LeaseOrder)}


def refusal(code, retriable=True, address=None):
    return R.Refusal(code, retriable, address, cause=None)


def deliver(c, order, offsets, epoch=0, now=1):
    c.on_lease_reply(order, {o: 1 for o in offsets}, epoch, ["frames"], None, now)


def test_the_core_loads_only_the_standard_library():
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.startswith("zq")}
    try:
        sys.modules.update(zmq=None, cbor2=None, rocksdict=None, zeroconf=None)
        import zq.core.consumer_rules  # noqa: F401
    finally:
        for k in ("zmq", "cbor2", "rocksdict", "zeroconf"):
            sys.modules.pop(k)
        sys.modules.update(saved)


def test_joined_member_leases_each_partition_a_fair_share_and_heartbeats_on_time():
    c = core(partitions=(0, 1, 2, 3), max_in_flight=100)
    got = leases(c.poll(0))
    assert sorted(got) == [0, 1, 2, 3]
    assert {o.max_messages for o in got.values()} == {25}
    assert c.in_flight == 100
    assert c.due_ms() == 1_000
    hb = of(c.poll(1_000), R.HeartbeatOrder)
    assert hb == [R.HeartbeatOrder("n1", 1, True, 1_000 + R.heartbeat_timeout_extra_ms)]


def test_one_lease_per_partition_at_a_time():
    c = core(partitions=(0,))
    (order,) = leases(c.poll(0)).values()
    c.resume(0)
    assert leases(c.poll(5)) == {}
    deliver(c, order, [0, 1], now=10)
    assert list(leases(c.poll(10))) == [0]


def test_acks_are_sent_under_the_epoch_of_their_delivery_and_the_current_generation():
    c = core(partitions=(0,))
    (order,) = leases(c.poll(0)).values()
    deliver(c, order, [5], epoch=7)
    chunk = c.take_chunk(1)
    assert (chunk.epoch, chunk.deliveries, chunk.payload) == (7, {5: 1}, ["frames"])
    c.on_heartbeat_reply(R.HeartbeatOrder("n1", 1, True, 1), 2, {0}, None, 2, ADDRESSES)   # a rebalance kept p0
    c.settle(0, 7, "ack", 5, 3, 0)
    acks = of(c.poll(3 + R.ack_flush_ms), R.AckOrder)
    assert [(a.partition, a.epoch, a.generation, a.acked) for a in acks] == [(0, 7, 2, [5])]


def test_acks_from_before_a_reset_are_dropped_not_sent():
    c = core(partitions=(0,))
    (order,) = leases(c.poll(0)).values()
    deliver(c, order, [5, 6], epoch=1)
    c.take_chunk(1)
    c.settle(0, 1, "ack", 5, 2, 1)
    c.on_reset({0: 2}, 3)
    c.settle(0, 2, "ack", 9, 4, 0)
    waiter = object()
    c.flush(5, waiter)
    effects = c.poll(5)
    acks = of(effects, R.AckOrder)
    assert [(a.epoch, a.acked) for a in acks] == [(2, [9])]
    c.on_ack_reply(acks[0], None, 6)
    assert of(c.poll(6), R.CommitDone) == [R.CommitDone(waiter, [])]


def test_a_chunk_of_an_older_epoch_is_dropped_and_its_room_freed():
    c = core(partitions=(0,), max_in_flight=10)
    (order,) = leases(c.poll(0)).values()
    deliver(c, order, [0, 1, 2], epoch=1)
    assert c.in_flight == 3
    assert c.on_reset({0: 4}, 2) == 3
    assert c.in_flight == 0 and c.take_chunk(3) is None


def test_a_fenced_lease_heartbeats_at_once_and_a_fenced_heartbeat_rejoins_dropping_the_old_sessions_work():
    c = core(partitions=(0, 1))
    got = leases(c.poll(0))
    deliver(c, got[0], [1, 2])        # queued, not yet handed out
    (again,) = leases(c.poll(1)).values()
    c.on_lease_reply(again, None, 0, None, refusal(R.FENCED, retriable=False), 2)
    assert [ch.partition for ch in c.arrived] == [0]   # a fence may be only a generation behind: kept for now
    effects = c.poll(2)
    assert of(effects, R.HeartbeatOrder) == [R.HeartbeatOrder("n1", 1, False, 2_000)]
    # The extra heartbeat is fenced too: the session is over, and the member joins again at the coordinator.
    c.on_heartbeat_reply(of(effects, R.HeartbeatOrder)[0], None, None, refusal(R.FENCED, False), 3, ADDRESSES)
    (join,) = of(c.poll(3), R.JoinOrder)
    assert join.address == "n1"
    assert of(c.poll(3), R.HeartbeatOrder) == []   # no regular heartbeat while joining
    c.on_join_reply(join, 5, {0, 1}, None, 4)
    assert (c.generation, c.assigned) == (5, {0, 1})
    assert list(c.arrived) == []                   # the old session's leases are failed by their leaders
    # partition 1's lease of the old session comes back: void, its room freed, and leasing goes on.
    deliver(c, got[1], [7], now=5)
    assert list(c.arrived) == [] and c.in_flight == 0
    assert sorted(leases(c.poll(2 + R.retry_backoff_ms))) == [0, 1]   # 0 after its fence's backoff
    assert of(c.poll(4 + 1_000), R.HeartbeatOrder)[0].generation == 5


def test_a_fenced_ack_is_dropped_not_retried_and_the_member_heartbeats_at_once():
    c = core(partitions=(0,))
    c.settle(0, 0, "ack", 1, 0, 0)
    waiter = object()
    c.flush(0, waiter)
    (ack,) = of(c.poll(0), R.AckOrder)
    assert c.on_ack_reply(ack, R.Refusal(R.FENCED, False, cause="fenced"), 22) is False
    effects = c.poll(22)
    assert of(effects, R.CommitDone) == [R.CommitDone(waiter, ["fenced"])]
    assert of(effects, R.HeartbeatOrder) == [R.HeartbeatOrder("n1", 1, False, 2_000)]
    assert of(c.poll(10_000), R.AckOrder) == []


def test_not_leader_with_an_address_is_retried_at_once_there_and_then_backs_off():
    c = core(partitions=(0,))
    (order,) = leases(c.poll(0)).values()
    c.on_lease_reply(order, None, 0, None, refusal(R.NOT_LEADER, address="n3"), 10)
    (again,) = leases(c.poll(10)).values()
    assert again.address == "n3"
    c.on_lease_reply(again, None, 0, None, refusal(R.NOT_LEADER, address="n2"), 20)
    assert leases(c.poll(20)) == {}
    assert of(c.poll(20), R.RefreshMetadata) == [] and c.due_ms() == 20 + 2 * R.retry_backoff_ms
    (third,) = leases(c.poll(20 + 2 * R.retry_backoff_ms)).values()
    assert third.address is None   # after a backoff the driver's refreshed metadata decides
    deliver(c, third, [0], now=400)
    assert c.failures[0] == 0


def test_an_ack_refused_with_not_leader_goes_to_the_named_leader():
    c = core(partitions=(0,))
    c.settle(0, 0, "ack", 1, 0, 0)
    (ack,) = of(c.poll(R.ack_flush_ms), R.AckOrder)
    assert c.on_ack_reply(ack, refusal(R.NOT_LEADER, address="n2"), 30) is True
    (again,) = of(c.poll(30 + R.retry_backoff_ms), R.AckOrder)
    assert (again.address, again.acked) == ("n2", [1])


def test_lease_retries_back_off_and_stop_at_the_deadline_with_the_error_for_the_application():
    c = core(partitions=(0,), lease_retry_ms_max=2_000)
    now, sends = 0.0, []
    for _ in range(100):
        orders = leases(c.poll(now))
        if 0 in orders:
            sends.append(now)
            c.on_lease_reply(orders[0], None, 0, None, refusal("leader_not_available"), now)
        if c.arrived:
            break
        now = c.due_ms()
    assert sends[:4] == [0, 100, 300, 700]   # 100, 200, 400, then capped at 500
    assert all(b - a <= R.retry_backoff_ms_max for a, b in zip(sends, sends[1:]))
    assert sends[-1] == 2_000 and max(sends) <= 2_000
    (chunk,) = c.arrived
    assert chunk.error == refusal("leader_not_available")
    assert c.take_chunk(now) is chunk
    # ... and the partition starts over: its failures are forgotten, the next lease waits the longest backoff.
    assert of(c.poll(now), R.RefreshMetadata) == [R.RefreshMetadata()]
    assert c.due_ms() == now + R.retry_backoff_ms_max and c.failures[0] == 0


def test_a_refusal_that_does_not_pass_goes_to_the_application_and_stops_the_partition():
    c = core(partitions=(0,))
    (order,) = leases(c.poll(0)).values()
    c.on_lease_reply(order, None, 0, None, R.Refusal("invalid_request", False, cause="boom"), 1)
    assert c.take_chunk(2).error == "boom"
    assert leases(c.poll(100_000)) == {}


def test_ack_retries_stop_at_their_deadline_and_the_commit_hears_why():
    c = core(partitions=(0,))
    c.settle(0, 0, "ack", 1, 0, 0)
    waiter = object()
    c.flush(0, waiter)
    now, tries = 0.0, 0
    done = []
    for _ in range(200):
        effects = c.poll(now)
        done += of(effects, R.CommitDone)
        for a in of(effects, R.AckOrder):
            tries += 1
            c.on_ack_reply(a, R.Refusal("leader_not_available", True, cause="no leader"), now)
        if done:
            break
        now = c.due_ms()
    assert done == [R.CommitDone(waiter, ["no leader"])]
    assert now <= R.ack_retry_ms_max and tries >= R.ack_retry_ms_max // R.retry_backoff_ms_max


def test_ack_batches_never_exceed_the_bound():
    assert R.ack_batch_max <= LIST_ITEMS_MAX
    c = core(partitions=(0,), max_in_flight=10_000)
    n = 2 * R.ack_batch_max + 7
    wakes = [c.settle(0, 0, "ack", i, 0, 1) for i in range(n - 3)]
    c.settle(0, 0, "nack", [n - 3, 1, None, "x"], 0, 1)
    c.settle(0, 0, "extend", [n - 2, 1_000], 0, 1)
    c.settle(0, 0, "nack", [n - 1, 1, 5, "y"], 0, 1)
    assert wakes[0] and wakes[R.ack_batch_max - 1]   # a full batch makes the flush due at once
    assert c.due_ms() == 0
    acks = of(c.poll(0), R.AckOrder)
    assert all(len(a) <= R.ack_batch_max for a in acks) and len(acks) == 3
    assert sum(len(a.acked) for a in acks) == n - 3
    assert [x[0] for a in acks for x in a.nacks] == [n - 3, n - 1]
    assert [x[0] for a in acks for x in a.extends] == [n - 2]


def test_a_partition_revoked_while_its_lease_is_out_discards_that_leases_messages():
    c = core(partitions=(0, 1), max_in_flight=100)
    got = leases(c.poll(0))
    deliver(c, got[1], [3])
    c.on_heartbeat_reply(R.HeartbeatOrder("n1", 1, True, 1), 2, {1}, None, 5, ADDRESSES)
    deliver(c, got[0], [7, 8, 9], now=6)
    assert [ch.partition for ch in c.arrived] == [1]
    assert c.in_flight == 1 + 0   # partition 1's delivered message; its next lease not yet sent
    assert 0 not in leases(c.poll(6))


def test_a_revoked_partitions_queued_chunks_go_but_its_settlements_still_do():
    c = core(partitions=(0, 1), max_in_flight=100)
    got = leases(c.poll(0))
    deliver(c, got[0], [1, 2])
    deliver(c, got[0 + 1], [4])
    c.settle(0, 0, "ack", 0, 2, 0)
    c.on_heartbeat_reply(R.HeartbeatOrder("n1", 1, True, 1), 2, {1}, None, 3, ADDRESSES)
    assert [ch.partition for ch in c.arrived] == [1]
    assert [a.acked for a in of(c.poll(2 + R.ack_flush_ms), R.AckOrder)] == [[0]]


def test_paused_partitions_resume_in_the_order_they_paused():
    """With room for fewer leases than partitions, each paused partition gets its turn (simulator seed 107)."""
    c = core(partitions=(3, 2, 1, 0), max_in_flight=2)
    got = leases(c.poll(0))
    assert sorted(got) == [0, 1] and list(c.paused) == [2, 3]
    deliver(c, got[0], [0])
    deliver(c, got[1], [0])
    c.take_chunk(2)
    c.take_chunk(2)
    c.settle(1, 0, "ack", 0, 3, 0)   # room for one lease: the first that paused takes it
    assert list(leases(c.poll(3))) == [2]
    assert list(c.paused) == [3, 0, 1]
    c.settle(0, 0, "ack", 0, 4, 0)
    assert list(leases(c.poll(4))) == [3]


def test_no_small_lease_while_the_application_has_messages_queued():
    c = core(partitions=(0,), max_in_flight=100)   # share 100, lease_min 25
    (order,) = leases(c.poll(0)).values()
    deliver(c, order, range(100))
    c.take_chunk(1)
    for i in range(10):
        c.settle(0, 0, "ack", i, 2, app_queued=90)
    assert leases(c.poll(2, app_queued=90)) == {} and list(c.paused) == [0]
    c.settle(0, 0, "ack", 10, 3, app_queued=0)   # nothing queued: what room there is is leased
    assert leases(c.poll(3, app_queued=0))[0].max_messages == 11


def test_an_empty_lease_answered_at_once_waits_before_the_next():
    c = core(partitions=(0,))
    (order,) = leases(c.poll(0)).values()
    c.on_lease_reply(order, {}, 0, [], None, 1)
    assert c.caught_up[0] and leases(c.poll(1)) == {}
    assert c.due_ms() == 1 + R.empty_lease_backoff_ms
    (slow,) = leases(c.poll(21)).values()
    c.on_lease_reply(slow, {}, 0, [], None, 521)   # a long-poll that waited: lease again at once
    assert list(leases(c.poll(521))) == [0]


@pytest.mark.parametrize("code, moves", [(R.TIMEOUT, True), (R.CONNECTION_FAILED, True),
                                         ("leader_not_available", False)])
def test_a_heartbeat_that_fails_moves_on_to_the_next_node_when_the_node_is_gone_or_after_three(code, moves):
    c = core(partitions=(0,))
    (hb,) = of(c.poll(1_000), R.HeartbeatOrder)
    c.on_heartbeat_reply(hb, None, None, refusal(code), 1_000, ADDRESSES)
    assert c.coordinator == ("n2" if moves else "n1")
    assert c.due_ms() == 1_000 + R.retry_backoff_ms
    for i in range(2):
        (hb,) = of(c.poll(c.due_ms()), R.HeartbeatOrder)
        c.on_heartbeat_reply(hb, None, None, refusal(code), 2_000 + i, ADDRESSES)
    assert c.coordinator == ("n1" if moves else "n2")   # moves: n2, n3, n1; else after the third miss


def test_a_join_that_fails_is_retried_at_the_same_node_after_the_backoff():
    c = core(partitions=(0,))
    (hb,) = of(c.poll(1_000), R.HeartbeatOrder)
    c.on_heartbeat_reply(hb, None, None, refusal(R.FENCED, False), 1_000, ADDRESSES)
    (join,) = of(c.poll(1_000), R.JoinOrder)
    c.on_join_reply(join, None, None, refusal(R.TIMEOUT), 1_010)
    assert of(c.poll(1_010 + R.retry_backoff_ms - 1), R.JoinOrder) == []
    assert of(c.poll(1_010 + R.retry_backoff_ms), R.JoinOrder) == [R.JoinOrder("n1", 2_000)]


def test_a_closed_core_sends_nothing_and_drops_what_arrives():
    c = core(partitions=(0,))
    (order,) = leases(c.poll(0)).values()
    c.close()
    deliver(c, order, [1, 2])
    assert c.poll(10_000) == [] and c.due_ms() is None and not c.arrived and c.in_flight == 0
