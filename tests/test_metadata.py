"""The metadata core, without any I/O. (The replication core has its own tests.)"""
from __future__ import annotations

import pytest

from zq.core import metadata as M
from zq.errors import InvalidRequest, NotEnoughReplicas, TopicExists, UnknownTopic
from zq.limits import DEFAULT


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
    # Any client's CreateTopic, not only zq's own: no node carries out key compaction yet.
    ("x", 1, 1, {"compact": True}, InvalidRequest, "compaction .* is not built yet"),
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


def test_reassign_sets_the_target_and_keeps_the_initial_set():
    s = _state_with("n1", "n2", "n3", "n4")
    for off, c in enumerate(M.plan_create_topic(s, "orders", 2, 3, {}, ["n1", "n2", "n3"], 5, DEFAULT), start=s.applied):
        s.apply(off, c)
    t = s.topic("orders")
    created = [list(r) for r in t.partitions]
    cmds = M.plan_reassign(s, "orders", 1, ["n4", "n2", "n3"], DEFAULT)
    assert cmds == [{"op": "reassign_partition", "name": "orders", "id": t.id, "partition": 1,
                     "replicas": ["n4", "n2", "n3"]}]
    s.apply(s.applied, cmds[0])
    assert t.partitions[1] == ["n4", "n2", "n3"] and t.partitions[0] == created[0]
    assert t.initial == created, "the set at offset 0 of every replica's log stays known"
    assert t.reassigned == {1}


@pytest.mark.parametrize("topic, partition, replicas, words", [
    ("nope", 0, ["n1"], "does not exist"),
    ("__meta", 0, ["n1"], "zq's own"),
    ("orders", 5, ["n1"], "partitions 0 to 1"),
    ("orders", 0, [], "at least one replica"),
    ("orders", 0, ["n1", "n1"], "twice"),
    ("orders", 0, ["n1", "n9"], "'n9' is not a member"),
])
def test_bad_reassignments_are_refused_with_a_sentence(topic, partition, replicas, words):
    s = _state_with("n1", "n2", "n3")
    for off, c in enumerate(M.plan_create_topic(s, "orders", 2, 3, {}, ["n1", "n2", "n3"], 5, DEFAULT), start=s.applied):
        s.apply(off, c)
    with pytest.raises((InvalidRequest, UnknownTopic)) as e:
        M.plan_reassign(s, topic, partition, replicas, DEFAULT)
    assert words in e.value.message


def test_replication_above_the_bound_is_refused():
    s = _state_with(*[f"n{i}" for i in range(9)])
    with pytest.raises(InvalidRequest, match="between 1 and 7"):
        M.plan_create_topic(s, "wide", 1, 8, {}, sorted(s.nodes), 5, DEFAULT)
