"""Replica-set changes and drains in real nodes on loopback (in-process node threads).

`zq topic reassign` logs a target replica set in __meta; the partition's leader then moves the
partition one replica at a time in its own log (zq.core.replication: a new replica catches up as a
learner, then joins the voters; a replica that leaves goes when a quorum without it holds the
log). These tests check the shell's side of it: the learner replica is opened on the new node,
the removed one is deleted, nothing acknowledged is lost, and the new set really holds the data
(the partition keeps taking quorum writes after a node of the old set is gone). The network
namespace version with real processes is in tests/test_lan.py.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from tests.nodeutil import NodeThread, free_port_base, start_nodes, wait_until
from zq.client import Client
from zq.core.repl_types import LEADER
from zq.errors import NotEnoughReplicas
from zq.io.node import NodeConfig
from zq.types import TopicPartition

PRODUCE_MAX = 3_000          # messages the background producer sends at most
PRODUCE_S_MAX = 30.0         # and for at most this long
MOVE_TIMEOUT_S = 30.0        # bound on a reassignment completing on an idle 2-core machine


@contextmanager
def _cluster(tmp_path, n: int = 3, **overrides):
    """n in-process nodes; whichever are still running at the end are stopped."""
    nodes = start_nodes(tmp_path, n, **overrides)
    extra: list[NodeThread] = []
    try:
        yield nodes, extra
    finally:
        for node in [*nodes, *extra]:
            if node.thread.is_alive():
                node.stop()


def _client(nodes) -> Client:
    return Client(bootstrap=",".join(n.address for n in nodes))


def _create(client: Client, topic: str, partitions: int, **config) -> None:
    """Create once all three nodes have registered (they do within a second of starting)."""
    def created() -> bool:
        try:
            client.create_topic(topic, partitions=partitions, replication=3, **config)
            return True
        except NotEnoughReplicas:
            return False
    wait_until(created, 20, "three registered nodes")


def _row(client: Client, topic: str, partition: int) -> dict:
    return next(r for r in client.status()["partitions"] if r["topic"] == topic and r["partition"] == partition)


def _moved(client: Client, topic: str, partition: int, target: list[str]) -> bool:
    r = _row(client, topic, partition)
    return bool(r["leader"]) and sorted(r["replicas"]) == sorted(target) and not r["learners"]


class Background:
    """An idempotent quorum producer to one partition in a thread, bounded in count and time; it
    records every acknowledged (value, offset)."""

    def __init__(self, client: Client, topic: str, partition: int, tag: str):
        self.acked: list[tuple[str, int]] = []
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(client, topic, partition, tag), daemon=True)
        self.thread.start()

    def _run(self, client: Client, topic: str, partition: int, tag: str) -> None:
        producer = client.producer(acks="quorum", idempotent=True)
        deadline = time.monotonic() + PRODUCE_S_MAX
        i = 0
        while not self.stop.is_set() and i < PRODUCE_MAX and time.monotonic() < deadline:
            value = f"{tag}-{i}"
            try:
                meta = producer.send(topic, value.encode(), partition=partition).result(20)
                self.acked.append((value, meta.offset))
            except Exception as e:   # noqa: BLE001 - a failed send is not acknowledged; that is allowed
                self.failed.append(f"{value}: {e}")
            i += 1
            time.sleep(0.002)
        producer.close()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(PRODUCE_S_MAX + 30)
        assert not self.thread.is_alive()


def _read_all(client: Client, topic: str, partition: int, want: int, until: str | None = None) -> list[tuple[str, int]]:
    """At least `want` messages from the earliest kept, and on to the one whose value is `until`."""
    consumer = client.consumer(topic, start="earliest", partitions=[partition])
    got: list[tuple[str, int]] = []
    deadline = time.monotonic() + 30
    while ((len(got) < want or (until is not None and all(v != until for v, _ in got)))
           and time.monotonic() < deadline):
        got += [(m.value.decode(), m.offset) for m in consumer.poll(timeout=0.5)]
    consumer.close()
    return got


def _start_fourth(tmp_path, nodes, **overrides) -> NodeThread:
    base = free_port_base()
    cfg = NodeConfig(name="n4", port=base, data_dir=tmp_path / "n4", seeds=tuple(n.address for n in nodes),
                     voters=("n1", "n2", "n3"), discovery=False, metrics=False, **overrides)
    return NodeThread(cfg)


def test_a_fourth_node_takes_a_reassigned_partition_under_load_with_nothing_lost(tmp_path):
    with _cluster(tmp_path, 3) as (nodes, extra):
        with _client(nodes) as client:
            _create(client, "orders", 2)
            load = Background(client, "orders", 0, "m")
            wait_until(lambda: len(load.acked) >= 100, 20, "the producer to get going")
            n4 = _start_fourth(tmp_path, nodes)
            extra.append(n4)
            wait_until(lambda: any(n["name"] == "n4" and n["state"] == "alive" for n in client.status()["nodes"]),
                       20, "n4 to join the cluster")
            target = ["n4", "n2", "n3"]      # n1 leaves, n4 joins
            client.reassign_partition("orders", 0, target)
            wait_until(lambda: _moved(client, "orders", 0, target), MOVE_TIMEOUT_S, "the move to finish")
            time.sleep(0.3)                   # a few more writes on the new set
            load.finish()
            assert len(load.acked) > 100 and not load.failed, load.failed[:3]

            tp = TopicPartition(client.refresh_metadata().topics["orders"]["id"], 0)
            r4 = n4.node.parts[tp].replica
            assert r4.voters == ("n2", "n3", "n4")
            wait_until(lambda: tp not in nodes[0].node.parts, 10, "n1 to drop its copy")
            assert nodes[0].node.store.partition_state(tp) is None, "the removed replica's data is deleted"
            row = _row(client, "orders", 0)
            assert row["target"] == target and sorted(row["in_sync"]) == ["n2", "n3", "n4"], row

            # The new set holds the data: without n2, only n3 and n4 are left of it, a bare majority.
            nodes[1].stop()
            with Client(bootstrap=f"{nodes[2].address},{n4.address}") as survivor:
                last = survivor.producer(acks="quorum").send("orders", b"after-n2", partition=0).result(30)
                got = _read_all(survivor, "orders", 0, len(load.acked) + 1)
        values = [v for v, _ in got]
        assert len(values) == len(set(values)), "every message once"
        assert set(load.acked) <= set(got), "every acknowledged message, at its offset"
        assert ("after-n2", last.offset) in got


def test_drain_hands_leadership_away_then_the_node_leaves(tmp_path):
    with _cluster(tmp_path, 3) as (nodes, extra):
        with _client(nodes) as client:
            _create(client, "jobs", 6)
            wait_until(lambda: all(r["leader"] for r in client.status()["partitions"]), 20, "leaders everywhere")
            led = {n.config.name: sum(1 for p in n.node.parts.values() if p.replica and p.replica.role == LEADER)
                   for n in nodes}
            name = max(led, key=lambda k: led[k])
            victim = next(n for n in nodes if n.config.name == name)
            result = client.drain_node(name, wait_s=10, leave=True)
            assert result["led_before"] >= 1 and result["led_after"] == 0, result
            victim.thread.join(10)
            assert not victim.thread.is_alive(), "a drained node with --leave stops"
            others = [n for n in nodes if n is not victim]
        with _client(others) as client:
            wait_until(lambda: all(r["leader"] not in (None, name) for r in client.status()["partitions"]),
                       10, "every partition led by a node that stays")
            states = {n["name"]: n["state"] for n in client.status()["nodes"]}
            assert states[name] in ("left", "dead", "suspect"), states
            meta = client.producer(acks="quorum").send("jobs", b"still here", partition=0).result(20)
            assert meta.offset >= 0


def test_a_node_moved_away_and_back_starts_empty_in_a_later_epoch_and_catches_up(tmp_path):
    with _cluster(tmp_path, 3) as (nodes, extra):
        with _client(nodes) as client:
            _create(client, "back", 1)
            producer = client.producer(acks="quorum", idempotent=True)
            first = [(f"a-{i}", producer.send("back", f"a-{i}".encode(), partition=0).result(20).offset) for i in range(50)]
            client.reassign_partition("back", 0, ["n2", "n3"])
            wait_until(lambda: _moved(client, "back", 0, ["n2", "n3"]), MOVE_TIMEOUT_S, "n1 to be moved away")
            tp = TopicPartition(client.refresh_metadata().topics["back"]["id"], 0)
            wait_until(lambda: tp not in nodes[0].node.parts, 10, "n1 to drop its copy")
            second = [(f"b-{i}", producer.send("back", f"b-{i}".encode(), partition=0).result(20).offset) for i in range(50)]
            client.reassign_partition("back", 0, ["n1", "n2", "n3"])
            wait_until(lambda: _moved(client, "back", 0, ["n1", "n2", "n3"]), MOVE_TIMEOUT_S, "n1 to be back")
            r1 = nodes[0].node.parts[tp].replica
            assert r1.join_epoch > 0, "the new replica joined past the epochs its node had reached"
            producer.close()
        nodes[1].stop()     # n1 and n3 are a majority of the set: n1 must really hold the log
        with _client([nodes[0], nodes[2]]) as survivor:
            last = survivor.producer(acks="quorum").send("back", b"c", partition=0).result(30)
            got = _read_all(survivor, "back", 0, 101)
        assert set(first + second + [("c", last.offset)]) <= set(got)
        assert len(got) == len({v for v, _ in got})


def test_a_new_replica_starts_at_the_leaders_log_start_when_retention_deleted_the_beginning(tmp_path):
    """Retention deleted the first batches (by size here; time retention takes a leader's epoch
    marker at once, as its append time is 0): the new replica cannot copy from offset 0, so its
    leader tells it to start at the log start (StartAt) and it copies the rest; the partition then
    serves from the new set."""
    with _cluster(tmp_path, 3, retention_interval_ms=100) as (nodes, extra):
        with _client(nodes) as client:
            _create(client, "short", 1, retention_bytes=3_000)
            producer = client.producer(acks="quorum")
            for i in range(40):     # ~270 bytes a batch: most of them go
                producer.send("short", f"old-{i}-".encode() + b"x" * 200, partition=0).result(20)
            kept = [(f"new-{i}", producer.send("short", f"new-{i}".encode(), partition=0).result(20).offset)
                    for i in range(5)]
            wait_until(lambda: (_row(client, "short", 0)["log_start"] or 0) > 20, 10, "retention to delete old batches")
            n4 = _start_fourth(tmp_path, nodes, retention_interval_ms=100)
            extra.append(n4)
            wait_until(lambda: any(n["name"] == "n4" and n["state"] == "alive" for n in client.status()["nodes"]),
                       20, "n4 to join the cluster")
            client.reassign_partition("short", 0, ["n4", "n2", "n3"])
            wait_until(lambda: _moved(client, "short", 0, ["n4", "n2", "n3"]), MOVE_TIMEOUT_S, "the move to finish")
            assert n4.node.counters["log_resets"] == 1
            producer.close()
        nodes[1].stop()   # n3 and n4 alone: n4 must hold what is kept
        with Client(bootstrap=f"{nodes[2].address},{n4.address}") as survivor:
            last = survivor.producer(acks="quorum").send("short", b"last", partition=0).result(30)
            got = _read_all(survivor, "short", 0, len(kept) + 1, until="last")
        assert set(kept) | {("last", last.offset)} <= set(got)
        assert all(v.startswith(("old-", "new-", "last")) for v, _ in got)


def test_the_configuration_a_replica_opens_with() -> None:
    """zq.node.replicas.starting_configuration, which the node and the cluster simulator both run.
    An initial member that never wrote anything for a partition (down from its creation until
    after a reassignment) opens with the initial set, so it votes: the node used to give it none
    (it then neither stood nor voted, and a new set that counted it and lost its leader early
    stayed leaderless; the simulator, which gave it the initial set, did not run the node's rule)."""
    from zq.node.replicas import starting_configuration as start
    initial = ["n1", "n2", "n3"]
    assert start("n3", initial, reassigned=False, has_hard_state=False, removed_here=False) == initial
    assert start("n3", initial, reassigned=True, has_hard_state=False, removed_here=False) == initial
    assert start("n3", initial, reassigned=True, has_hard_state=True, removed_here=False) == initial
    # Made by the reassignment, or made again after a move deleted it here: no configuration.
    assert start("n4", initial, reassigned=True, has_hard_state=False, removed_here=False) == []
    assert start("n3", initial, reassigned=True, has_hard_state=False, removed_here=True) == []
    # With a hard state the core reads its configurations from there (the argument is unused).
    assert start("n4", initial, reassigned=True, has_hard_state=True, removed_here=False) == initial


def test_a_leader_tries_the_next_new_replica_when_its_learner_takes_nothing() -> None:
    """A leader catches up one new replica at a time. If that one takes nothing (down, or
    recovering and unable to end its poll, which may wait for another new replica to learn a
    configuration: simulator seed 822 --nodes 5), the leader tries the next after
    LEARNER_STALL_ELECTIONS election timeouts, instead of waiting for it for good."""
    import random

    from zq.core.repl_decisions import LEARNER_STALL_ELECTIONS
    from zq.core.replication import Replica
    from zq.sim.disk import SimDisk
    from tests.test_pass_cost import CONFIG

    disk = SimDisk([0])
    r = Replica("n1", ["n1"], disk.volatile[0], rng=random.Random(1), now_ms=0, config=CONFIG)
    now = r.next_timer_ms()
    r.tick(now)
    assert r.role == LEADER

    clock = [now]

    def pass_(until: int) -> None:
        """Passes every heartbeat interval up to `until` (a leader ticked late steps down)."""
        while True:
            clock[0] = min(until, clock[0] + CONFIG.heartbeat_interval_ms)
            r.tick(clock[0])
            rd = r.ready()
            disk.write(0, rd)
            disk.sync()
            r.advance()
            r.on_persisted(rd.log_end)
            r.ready()
            r.advance()
            if clock[0] >= until:
                return

    pass_(now)
    r.set_target(["n1", "n4", "n5"])
    pass_(now + 1)
    assert r.learners == ("n4",)
    stall = LEARNER_STALL_ELECTIONS * CONFIG.election_timeout_ms
    pass_(now + stall // 2)
    assert r.learners == ("n4",), "not before the stall"
    pass_(now + 2 + stall)
    assert r.learners == ("n5",), "n4 took nothing: the next one"
    pass_(now + 3 + 2 * stall)
    assert r.learners == ("n4",), "and round again"
