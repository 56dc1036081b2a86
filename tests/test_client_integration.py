"""The client against real nodes, in-process threads on 127.0.0.1 (zq.io.node.run_node)."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

import zq
from tests.nodeutil import start_nodes, wait_until
from zq.errors import NotLeader, TopicExists, UnknownTopic
from zq.hashing import partition_for_key


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    nodes = start_nodes(tmp_path_factory.mktemp("one"), 1, discovery=False)
    try:
        yield nodes[0]
    finally:
        for n in nodes:
            n.stop()


@pytest.fixture
def client(one_node):
    with zq.Client(one_node.address) as c:
        yield c


def read_all(consumer, n: int, timeout_s: float = 10.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n:
        assert time.monotonic() < deadline, f"read {len(got)} of {n} messages"
        got += consumer.poll(timeout=0.5, max_messages=1000)
    return got


def test_keyed_and_keyless_records_read_back_exactly(client):
    client.create_topic("exact", partitions=4)
    producer = client.producer(acks="quorum", linger_ms=2, batch_size=1024)
    keyed = [(b"k%d" % (i % 37), b"keyed-%d" % i) for i in range(2000)]
    f_keyed = [producer.send("exact", v, key=k, headers={"n": b"%d" % i}) for i, (k, v) in enumerate(keyed)]
    f_free = [producer.send("exact", b"free-%d" % i) for i in range(2000)]
    producer.flush(10)
    metas = [f.result(0) for f in f_keyed + f_free]
    for (k, _), m in zip(keyed, metas):
        assert m.partition == partition_for_key(k, 4)
    assert len({m.partition for m in metas[2000:]}) == 4  # keyless records spread over every partition
    assert len({(m.partition, m.offset) for m in metas}) == 4000  # no two records share an offset

    got = read_all(client.consumer("exact", start="earliest"), 4000)
    assert len(got) == 4000
    where = {(m.partition, m.offset): m for m in got}
    for (k, v), m in zip(keyed, metas):
        msg = where[(m.partition, m.offset)]
        assert (msg.key, msg.value) == (k, v)
    assert where[(metas[5].partition, metas[5].offset)].headers == {"n": b"5"}
    for p in range(4):  # each partition in offset order, no gaps (a leader's epoch marker may take offset 0)
        offsets = [m.offset for m in got if m.partition == p]
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets))) and offsets[0] <= 1
    # same key, same partition, in send order
    k0 = [m.value for m in got if m.key == b"k0"]
    assert k0 == [v for k, v in keyed if k == b"k0"]


def test_every_acks_level_is_readable(client):
    client.create_topic("acks", partitions=1)
    base = client.list_offsets("acks", 0, "latest").offset
    for acks in ("none", "leader", "quorum"):
        producer = client.producer(acks=acks, linger_ms=0)
        meta = producer.send("acks", acks.encode()).result(5)
        assert (meta.offset == -1) == (acks == "none")
        producer.flush(5)
    idem = client.producer(idempotent=True, linger_ms=0)
    assert [idem.send("acks", b"idem-%d" % i).result(5).offset - base for i in range(3)] == [3, 4, 5]
    wait_until(lambda: client.list_offsets("acks", 0, "latest").offset == base + 6, 5, "six records")
    values = [m.value for m in read_all(client.consumer("acks", start="earliest"), 6)]
    assert values == [b"none", b"leader", b"quorum", b"idem-0", b"idem-1", b"idem-2"]


def test_replay_from_offset_and_from_time(client):
    client.create_topic("replay", partitions=2)
    producer = client.producer(linger_ms=0)
    early = [producer.send("replay", b"early-%d" % i, partition=i % 2) for i in range(10)]
    producer.flush(5)
    time.sleep(0.05)
    middle = datetime.now(timezone.utc)
    time.sleep(0.05)
    for i in range(10):
        producer.send("replay", b"late-%d" % i, partition=i % 2)
    producer.flush(5)

    base = early[1].result().offset  # 0, or 1 after a leader's epoch marker
    consumer = client.consumer("replay", start=base + 3, partitions=[1])
    assert [m.value for m in read_all(consumer, 7)] == [b"early-7", b"early-9"] + [b"late-%d" % i for i in (1, 3, 5, 7, 9)]
    by_time = read_all(client.consumer("replay", start=middle), 10)
    assert sorted(m.value for m in by_time) == sorted(b"late-%d" % i for i in range(10))
    consumer.seek(1, base)
    assert len(read_all(consumer, 10)) == 10
    consumer.seek_to_time(middle)
    assert [m.value for m in read_all(consumer, 5)] == [b"late-%d" % i for i in (1, 3, 5, 7, 9)]
    first = early[0].result().offset
    assert client.list_offsets("replay", 0, "earliest").offset <= first
    assert client.list_offsets("replay", 0, middle).offset == first + 5
    latest = client.list_offsets("replay", 0, "latest")
    assert latest.offset == first + 10 == latest.high_watermark


def test_consumer_follows_new_messages(client):
    client.create_topic("follow", partitions=2)
    consumer = client.consumer("follow")  # latest: nothing yet
    assert consumer.poll(timeout=0.3) == []
    arrived = []

    def produce_later():
        time.sleep(0.3)
        p = client.producer(linger_ms=0)
        for i in range(3):
            p.send("follow", b"new-%d" % i, partition=i % 2).result(5)
            arrived.append(time.monotonic())

    t = threading.Thread(target=produce_later)
    t.start()
    got = []
    for msg in consumer:
        got.append((msg, time.monotonic()))
        if len(got) == 3:
            break
    t.join()
    assert sorted(m.value for m, _ in got) == [b"new-0", b"new-1", b"new-2"]
    # each delivered promptly after its ack, not at the end of a long-poll
    assert max(seen - arrived[-1] for _, seen in got) < 0.4


def test_topics_describe_delete(client):
    client.create_topic("admin", partitions=3, retention_ms=86_400_000)
    with pytest.raises(TopicExists):
        client.create_topic("admin", partitions=3)
    names = [t["name"] for t in client.topics()]
    assert "admin" in names
    summary = next(t for t in client.topics() if t["name"] == "admin")
    assert (summary["partitions"], summary["replication"]) == (3, 1)
    meta = client.producer(linger_ms=0).send("admin", b"x", partition=2).result(5)
    d = client.describe_topic("admin")
    assert d["name"] == "admin" and len(d["partitions"]) == 3
    rows = {p["partition"]: p for p in d["partitions"]}
    assert rows[2]["high_watermark"] == rows[2]["log_end"] == meta.offset + 1
    assert rows[0]["high_watermark"] == rows[2]["high_watermark"] - 1
    assert all(p["leader"] == "n1" for p in d["partitions"])
    assert client.status()["nodes"][0]["name"] == "n1"
    client.delete_topic("admin")
    assert "admin" not in [t["name"] for t in client.topics()]
    with pytest.raises(UnknownTopic):
        client.describe_topic("admin")
    with pytest.raises(UnknownTopic):
        client.producer(max_block_ms=200).send("admin", b"gone")


def test_three_nodes_redirects(tmp_path):
    nodes = start_nodes(tmp_path, 3, discovery=False)
    try:
        with zq.Client(nodes[0].address) as first:  # placement uses the metadata leader's (n1) view
            wait_until(lambda: list(first.refresh_metadata().node_states.values()) == ["alive"] * 3, 10, "three live nodes")
        with zq.Client(nodes[1].address) as client:  # n2: not the metadata leader
            client.create_topic("spread", partitions=6)  # NotLeader from n2, followed to n1
            meta = client.metadata
            assert set(meta.nodes) == {"n1", "n2", "n3"} and all(meta.leaders[("spread", p)] for p in range(6))
            # Point every partition at a wrong node: each produce meets NotLeader and follows its hint.
            addresses = sorted(meta.nodes.values())
            for p in range(6):
                right = meta.leader_address("spread", p)
                client.cluster_view.hint_leader("spread", p, next(a for a in addresses if a != right))
            producer = client.producer(linger_ms=0, retries=3)
            metas = [producer.send("spread", b"v%d" % i, partition=i % 6).result(10) for i in range(12)]
            assert [m.offset - metas[m.partition].offset for m in metas] == [0] * 6 + [1] * 6
            # a sync call meets NotLeader too, and follows it
            client.cluster_view.hint_leader("spread", 0, next(a for a in addresses if a != meta.leader_address("spread", 0)))
            assert client.list_offsets("spread", 0, "latest").offset == metas[0].offset + 2
            got = read_all(client.consumer("spread", start="earliest"), 12)
            assert sorted(m.value for m in got) == sorted(b"v%d" % i for i in range(12))
            d = client.describe_topic("spread")
            assert [p["high_watermark"] for p in d["partitions"]] == [metas[p].offset + 2 for p in range(6)]
            with pytest.raises(NotLeader):  # a produce that keeps meeting NotLeader gives up, bounded
                stubborn = client.producer(linger_ms=0, retries=0)
                client.cluster_view.hint_leader("spread", 1, next(a for a in addresses if a != meta.leader_address("spread", 1)))
                stubborn.send("spread", b"x", partition=1).result(10)
    finally:
        for n in nodes:
            n.stop()
