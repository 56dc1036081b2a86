"""The partition-log and metadata cores, without any I/O."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zq.core import metadata as M
from zq.core.partition import Append, Duplicate, PartitionLog
from zq.errors import InvalidRequest, NotEnoughReplicas, OffsetOutOfRange, OutOfOrderSequence, TopicExists, UnknownTopic
from zq.limits import DEFAULT


def test_offsets_are_consecutive_and_visible_only_when_durable():
    p = PartitionLog()
    a = p.on_produce(3, 0, 0, 1000)
    b = p.on_produce(2, 0, 0, 999)          # clock went back: append time does not
    assert (a.base_offset, b.base_offset, p.log_end) == (0, 3, 5)
    assert b.append_time_ms == 1000
    assert p.check_fetch(0) is False        # nothing durable yet: a fetch waits
    assert p.maybe_advance_high_watermark(3) and p.high_watermark == 3
    assert not p.maybe_advance_high_watermark(2) and p.high_watermark == 3   # never back
    assert p.check_fetch(2) is True
    with pytest.raises(OffsetOutOfRange):
        p.check_fetch(4)


def test_idempotent_producer_retry_is_not_written_twice():
    p = PartitionLog()
    first = p.on_produce(5, 42, 0, 1)
    again = p.on_produce(5, 42, 0, 2)
    assert isinstance(first, Append) and isinstance(again, Duplicate) and again.base_offset == first.base_offset
    assert p.log_end == 5
    nxt = p.on_produce(1, 42, 5, 3)
    assert nxt.base_offset == 5
    with pytest.raises(OutOfOrderSequence, match="skipped"):
        p.on_produce(1, 42, 9, 4)
    with pytest.raises(OutOfOrderSequence, match="older"):
        p.on_produce(1, 42, 2, 4)


def test_aborted_pass_gives_offsets_back():
    p = PartitionLog()
    p.on_produce(2, 0, 0, 1)
    p.maybe_advance_high_watermark(2)
    p.on_produce(3, 7, 0, 2)
    p.abort_appends(2, 1, {7})
    assert p.log_end == 2 and p.on_produce(3, 7, 0, 3).base_offset == 2


@given(st.lists(st.integers(1, 50), min_size=1, max_size=30), st.data())
def test_high_watermark_is_monotone_and_bounded(counts, data):
    p = PartitionLog()
    hw = 0
    for c in counts:
        p.on_produce(c, 0, 0, 0)
        p.maybe_advance_high_watermark(data.draw(st.integers(0, p.log_end + 10)))
        assert hw <= p.high_watermark <= p.log_end
        hw = p.high_watermark


def _state_with(*names):
    s = M.MetadataState()
    for i, n in enumerate(names):
        s.apply(i, {"op": "register_node", "name": n, "host": "127.0.0.1", "port": 7100 + 10 * i})
    return s


def test_create_topic_plans_topic_and_dead_letter_topic():
    s = _state_with("n1", "n2", "n3")
    cmds = M.plan_create_topic(s, "orders", 4, 2, {"max_deliveries": 3}, ["n1", "n2", "n3"], 5, DEFAULT)
    assert [c["name"] for c in cmds] == ["orders", "orders.dlq"]
    for off, c in enumerate(cmds, start=s.applied):
        s.apply(off, c)
    t = s.topic("orders")
    assert len(t.partitions) == 4 and all(len(r) == 2 for r in t.partitions)
    assert t.config["max_deliveries"] == 3 and t.config["durability"] == "fsync"
    assert s.topic("orders.dlq").id == t.id + 1
    with pytest.raises(TopicExists):
        M.plan_create_topic(s, "orders", 1, 1, {}, ["n1"], 5, DEFAULT)


@pytest.mark.parametrize("name, parts, repl, cfg, error, words", [
    ("bad name", 1, 1, {}, InvalidRequest, "not valid"),
    ("__x", 1, 1, {}, InvalidRequest, "reserved"),
    ("x.dlq", 1, 1, {}, InvalidRequest, "dead-letter"),
    ("x", 0, 1, {}, InvalidRequest, "partitions"),
    ("x", 1, 4, {}, NotEnoughReplicas, "lower --replication"),
    ("x", 1, 1, {"retention": 5}, InvalidRequest, "unknown topic setting"),
    ("x", 1, 1, {"durability": "maybe"}, InvalidRequest, "durability"),
    ("x", 1, 1, {"retention_ms": -1}, InvalidRequest, "retention_ms"),
])
def test_bad_creates_are_refused_with_a_sentence(name, parts, repl, cfg, error, words):
    with pytest.raises(error, match=words):
        M.plan_create_topic(_state_with("n1"), name, parts, repl, cfg, ["n1", "n2", "n3"], 0, DEFAULT)


def test_delete_takes_the_dead_letter_topic_and_ids_are_never_reused():
    s = _state_with("n1")
    for c in M.plan_create_topic(s, "a", 1, 1, {}, ["n1"], 0, DEFAULT):
        s.apply(s.applied, c)
    old = s.topic("a").id
    for c in M.plan_delete_topic(s, "a"):
        s.apply(s.applied, c)
    assert "a" not in s.topics and "a.dlq" not in s.topics
    with pytest.raises(UnknownTopic):
        s.topic("a")
    for c in M.plan_create_topic(s, "a", 1, 1, {}, ["n1"], 0, DEFAULT):
        s.apply(s.applied, c)
    assert s.topic("a").id > old + 1


def test_replaying_the_log_gives_the_same_state():
    s = _state_with("n1", "n2")
    log = [(i, {"op": "register_node", "name": n, "host": "h", "port": 1}) for i, n in enumerate(["n1", "n2"])]
    for c in M.plan_create_topic(s, "t", 3, 1, {}, ["n1", "n2"], 0, DEFAULT):
        log.append((s.applied, c))
        s.apply(s.applied, c)
    again = M.MetadataState()
    for off, c in log + log:          # applying twice is a no-op the second time
        again.apply(off, c)
    assert again.topics == s.topics and again.applied == s.applied
