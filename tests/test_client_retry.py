"""Clients ride through elections (issue 9): a consumer (plain and group) and `zq consume` made
right after create_topic, before its partitions have leaders, and right after the leader of their
partition is SIGKILLed, wait for the election and then read every message. One 3-node cluster for
the module; the test that kills a node runs last and restarts it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from zq.testing import LocalCluster

MESSAGES = 40
READ_WAIT_S_MAX = 30.0     # bound of every read loop: an election (~2 s) plus a loaded machine
CLI_WAIT_S_MAX = 60.0


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(3) as c:
        yield c


def produce(cluster, topic: str, n: int = MESSAGES) -> None:
    with cluster.client() as client:
        producer = client.producer(acks="quorum")
        for i in range(n):
            producer.send(topic, b"m%d" % i, key=b"k%d" % i)
        producer.flush(30)


def read_values(consumer, n: int, ack: bool = False) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + READ_WAIT_S_MAX
    while len(got) < n and time.monotonic() < deadline:
        for m in consumer.poll(timeout=0.2):
            got.append(m.value)
            if ack:
                m.ack()
    return got


def every_message() -> list[bytes]:
    return sorted(b"m%d" % i for i in range(MESSAGES))


def create_then(cluster, topic: str):
    """Create `topic` (4 partitions, RF 3) with one client and hand back a second, fresh client, as
    another process would be: its first calls meet partitions whose leaders are being elected."""
    with cluster.client() as admin:
        admin.create_topic(topic, partitions=4, replication=3)
    return cluster.client()


def test_a_consumer_made_right_after_create_topic_waits_for_the_leaders(cluster):
    with create_then(cluster, "fresh") as client:
        consumer = client.consumer("fresh", start="earliest")   # list_offsets per partition, during elections
        produce(cluster, "fresh")
        assert sorted(read_values(consumer, MESSAGES)) == every_message()


def test_a_group_member_made_right_after_create_topic_waits_for_the_leaders(cluster):
    with create_then(cluster, "fresh-group") as client:
        consumer = client.consumer("fresh-group", group="g")
        produce(cluster, "fresh-group")
        assert sorted(read_values(consumer, MESSAGES, ack=True)) == every_message()
        consumer.close()


def zq_consume(cluster, topic: str, *args: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "zq", "consume", topic, "--bootstrap", cluster.bootstrap, "--cluster", cluster.name,
            "--max", str(MESSAGES), "--timeout", str(READ_WAIT_S_MAX), *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))


def cli_values(proc: subprocess.Popen) -> list[bytes]:
    out, err = proc.communicate(timeout=CLI_WAIT_S_MAX)
    assert proc.returncode == 0, err.decode()
    return sorted(json.loads(line)["value"].encode() for line in out.decode().splitlines())


def test_zq_consume_started_right_after_create_topic_waits_then_reads(cluster):
    with cluster.client() as admin:
        admin.create_topic("fresh-cli", partitions=4, replication=3)
    proc = zq_consume(cluster, "fresh-cli", "--from", "earliest")
    produce(cluster, "fresh-cli")
    assert cli_values(proc) == every_message()


def leader_of(cluster, topic: str, partition: int) -> str:
    with cluster.client() as client:
        for _ in range(100):   # bounded: the leader is known within a few refreshes
            meta = client.refresh_metadata()
            for p in meta.topics[topic]["partitions"]:
                if p["partition"] == partition and p.get("leader"):
                    return p["leader"]
            time.sleep(0.1)
    raise AssertionError(f"{topic}/{partition} has no leader")


def test_consumers_made_right_after_their_leader_is_killed_wait_and_read_everything(cluster):
    with cluster.client() as admin:
        admin.create_topic("killed", partitions=1, replication=3)
    produce(cluster, "killed")
    victim = leader_of(cluster, "killed", 0)
    cluster.kill(victim)
    try:
        proc = zq_consume(cluster, "killed", "--from", "earliest")
        with cluster.client() as client:
            plain = client.consumer("killed", start="earliest")
            group = client.consumer("killed", group="after-kill")
            assert sorted(read_values(plain, MESSAGES)) == every_message()
            assert sorted(read_values(group, MESSAGES, ack=True)) == every_message()
            group.close()
        assert cli_values(proc) == every_message()
    finally:
        cluster.restart(victim)
