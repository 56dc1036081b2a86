"""The node-side groups service, spoken to with the raw protocol (tests/nodeutil.py), no client library."""
from __future__ import annotations

import time

import cbor2
import pytest

from zq import batch as B
from zq import group_protocol as G
from zq import protocol as P
from zq.core.grouplead import reset_epoch_floor
from zq.node.groups import GroupService
from tests.nodeutil import NodeThread, Raw, start_nodes, wait_until

SERVICES = ("zq.io.groups",)


@pytest.fixture
def one(tmp_path):
    nodes = start_nodes(tmp_path, 1, services=SERVICES)
    raw = Raw(nodes[0].address)
    yield nodes[0], raw
    raw.close()
    for n in nodes:
        n.stop()


def create(raw: Raw, name: str, partitions: int = 1, replication: int = 1, **config) -> None:
    wait_until(lambda: isinstance(raw.create(name, partitions, replication, **config), P.OkReply)
               or name in _topics(raw), 20, f"topic {name}")
    if replication == 1:
        wait_until(lambda: all(isinstance(_offsets(raw, name, p), P.OffsetsReply) for p in range(partitions)), 20,
                   f"leaders of {name}")


def _topics(raw: Raw) -> set[str]:
    reply, _ = raw.rpc(P.MetadataRequest(raw.rid(), None))
    return {t["name"] for t in reply.topics}


def _offsets(raw: Raw, topic: str, p: int):
    return raw.rpc(P.ListOffsets(raw.rid(), topic, p, "latest"))[0]


def produce(raw: Raw, topic: str, values: list[bytes], partition: int = 0, headers=None) -> int:
    blob = B.encode_records([[int(time.time() * 1000), b"k", v, headers] for v in values])
    reply = raw.rpc(P.Produce(raw.rid(), topic, partition, 2, len(values), B.crc(blob), 0, 0, 0), blob)[0]
    assert isinstance(reply, P.ProduceReply), reply
    return reply.base_offset


def join(raw: Raw, member: str, topics=("t",), group: str = "g", timeout_ms: int = 5_000) -> G.GroupReply:
    reply = raw.rpc(G.JoinGroup(raw.rid(), group, member, list(topics), timeout_ms, False))[0]
    assert isinstance(reply, G.GroupReply), reply
    return reply


def lease(raw: Raw, member: str, generation: int, partition: int = 0, n: int = 100, lease_ms: int = 5_000,
          wait_ms: int = 0, topic: str = "t", group: str = "g", start="earliest"):
    """(reply, {offset: (attempt, value)}) or (error reply, {})."""
    reply, frames = raw.rpc(G.Lease(raw.rid(), group, member, generation, topic, partition, n, lease_ms, wait_ms,
                                    start), timeout_s=wait_ms / 1000 + 5)
    if not isinstance(reply, G.LeaseReply):
        return reply, {}
    attempts = dict(zip(reply.deliveries[::2], reply.deliveries[1::2]))
    got = {r.offset: (attempts[r.offset], r.value) for f in frames for r in B.iter_records(f)
           if r.offset in attempts}
    assert set(got) == set(attempts), "every leased offset travels in the reply's batches"
    return reply, got


def ack(raw: Raw, member: str, generation: int, acked=(), nacks=(), extends=(), partition: int = 0, epoch: int = 0,
        topic: str = "t", group: str = "g"):
    return raw.rpc(G.Ack(raw.rid(), group, member, generation, topic, partition, epoch, list(acked),
                         [list(n) for n in nacks], [list(e) for e in extends]))[0]


def service(thread: NodeThread) -> GroupService:
    return next(s for s in thread.node.services if isinstance(s, GroupService))


def test_join_assigns_every_partition_and_a_second_member_takes_half(one):
    node, raw = one
    create(raw, "t", partitions=4)
    a = join(raw, "a")
    assert sorted(map(tuple, a.partitions)) == [("t", 0), ("t", 1), ("t", 2), ("t", 3)]
    b = join(raw, "b")
    assert b.generation > a.generation
    beat = raw.rpc(G.GroupHeartbeat(raw.rid(), "g", "a", a.generation))[0]
    assert beat.generation == b.generation
    assert len(beat.partitions) == 2 and len(b.partitions) == 2
    assert {tuple(x) for x in beat.partitions}.isdisjoint({tuple(x) for x in b.partitions})
    assert isinstance(raw.rpc(G.LeaveGroup(raw.rid(), "g", "b"))[0], P.OkReply)
    beat = raw.rpc(G.GroupHeartbeat(raw.rid(), "g", "a", b.generation))[0]
    assert len(beat.partitions) == 4 and beat.generation > b.generation
    gone = raw.rpc(G.GroupHeartbeat(raw.rid(), "g", "b", beat.generation))[0]
    assert isinstance(gone, P.ErrorReply) and gone.code == "fenced"


def test_lease_ack_commit_and_nothing_more(one):
    node, raw = one
    create(raw, "t")
    base = produce(raw, "t", [b"a", b"b", b"c"])
    gen = join(raw, "m").generation
    reply, got = lease(raw, "m", gen)
    assert {o: v for o, (_, v) in got.items()} == {base: b"a", base + 1: b"b", base + 2: b"c"}
    assert all(a == 1 for a, _ in got.values())
    done = ack(raw, "m", gen, acked=got)
    assert done.data["committed"] == base + 3
    again, more = lease(raw, "m", gen)
    assert isinstance(again, G.LeaseReply) and more == {}
    # A long-poll lease is answered when a new message commits.
    raw.send(G.Lease(raw.rid(), "g", "m", gen, "t", 0, 10, 5_000, 3_000, "earliest"))
    time.sleep(0.2)
    other = Raw(node.address)
    produce(other, "t", [b"d"])
    other.close()
    reply, frames = raw.recv(timeout_s=3)
    assert isinstance(reply, G.LeaseReply) and reply.deliveries == [base + 3, 1]


def test_nack_redelivers_after_its_delay_with_the_next_attempt(one):
    node, raw = one
    create(raw, "t", backoff_initial_ms=5_000, backoff_max_ms=10_000)
    base = produce(raw, "t", [b"a", b"b"])
    gen = join(raw, "m").generation
    _, got = lease(raw, "m", gen)
    ack(raw, "m", gen, acked=[base + 1], nacks=[[base, 1, 400, "downstream is down"]])
    _, early = lease(raw, "m", gen)
    assert early == {}, "a nacked message waits out its delay"
    time.sleep(0.5)
    _, late = lease(raw, "m", gen)
    assert late == {base: (2, b"a")}
    done = ack(raw, "m", gen, acked=[base])
    assert done.data["committed"] == base + 2
    assert node.node.counters["group_retries"] == 1


def test_an_expired_lease_is_a_redelivery(one):
    node, raw = one
    create(raw, "t", backoff_initial_ms=1, backoff_max_ms=1)
    base = produce(raw, "t", [b"a"])
    gen = join(raw, "m").generation
    _, got = lease(raw, "m", gen, lease_ms=200)
    assert got == {base: (1, b"a")}
    reply, again = lease(raw, "m", gen, wait_ms=2_000)
    assert again == {base: (2, b"a")}, "the lease ran out, so the message comes back with attempt 2"
    assert node.node.counters["group_lease_expiries"] >= 1


def test_extend_keeps_a_lease_alive(one):
    node, raw = one
    create(raw, "t", backoff_initial_ms=1, backoff_max_ms=1)
    base = produce(raw, "t", [b"a"])
    gen = join(raw, "m").generation
    lease(raw, "m", gen, lease_ms=300)
    ack(raw, "m", gen, extends=[[base, 3_000]])
    time.sleep(0.5)
    _, again = lease(raw, "m", gen)
    assert again == {}, "an extended lease does not expire at its first deadline"


def test_poison_message_goes_to_the_dead_letter_topic_and_the_rest_flow(one):
    node, raw = one
    create(raw, "t", max_deliveries=3, backoff_initial_ms=1, backoff_max_ms=1)
    base = produce(raw, "t", [b"ok1", b"poison", b"ok2"], headers={"trace": b"xyz"})
    gen = join(raw, "m").generation
    attempts = []
    delivered_ok = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, got = lease(raw, "m", gen, wait_ms=200)
        acks, nacks = [], []
        for o, (attempt, value) in got.items():
            if value == b"poison":
                attempts.append(attempt)
                nacks.append([o, attempt, 0, f"cannot parse (attempt {attempt})"])
            else:
                delivered_ok.add(value)
                acks.append(o)
        if got:
            ack(raw, "m", gen, acked=acks, nacks=nacks)
        if raw.fetch("t.dlq", 0, 0)[1] and delivered_ok == {b"ok1", b"ok2"}:
            break
    assert attempts == [1, 2, 3], "exactly max_deliveries attempts"
    assert delivered_ok == {b"ok1", b"ok2"}
    reply, records = raw.fetch("t.dlq", 0, 0)
    dead = [r for r in records]
    assert len(dead) == 1 and dead[0].value == b"poison" and dead[0].key == b"k"
    h = dead[0].headers
    assert h["zq-source-topic"] == b"t" and h["zq-source-partition"] == b"0"
    assert h["zq-source-offset"] == str(base + 1).encode() and h["zq-attempts"] == b"3"
    assert h["zq-last-error"] == b"cannot parse (attempt 3)" and h["trace"] == b"xyz"
    assert int(h["zq-first-failure-ms"]) <= int(h["zq-last-failure-ms"])
    wait_until(lambda: ack(raw, "m", gen).data["committed"] == base + 3, 5, "commit past the dead letter")
    doc = raw.rpc(G.DescribeGroups(raw.rid(), "g"))[0].data["groups"][0]
    row = doc["partitions"][0]
    assert row["dead_lettered"] == 1 and row["lag"] == 0 and row["committed"] == base + 3


def test_an_old_generation_is_fenced(one):
    node, raw = one
    create(raw, "t", partitions=2)
    base = produce(raw, "t", [b"a"], partition=0)
    produce(raw, "t", [b"b"], partition=1)
    first = join(raw, "a").generation
    _, got = lease(raw, "a", first, partition=0)
    assert got
    second = join(raw, "b")
    refused, _ = lease(raw, "a", first, partition=1)
    assert isinstance(refused, P.ErrorReply) and refused.code == "fenced"
    moved = ("t", 0) in [tuple(x) for x in second.partitions]
    late = ack(raw, "a", first, acked=[base], partition=0)
    if moved:
        assert isinstance(late, P.ErrorReply) and late.code == "fenced", "the old owner's acks fail"
        _, again = lease(raw, "b", second.generation, partition=0, lease_ms=5_000)
        assert again == {}, "the old owner's lease still runs"
    else:
        assert isinstance(late, P.OkReply), "a partition that did not move keeps its owner's acks"
    ahead = lease(raw, "a", second.generation + 5, partition=0)[0]
    assert isinstance(ahead, P.ErrorReply) and ahead.code == "rebalance_in_progress"
    stranger = lease(raw, "nobody", 0, partition=0)[0]
    assert isinstance(stranger, P.ErrorReply) and stranger.code == "fenced"


def test_reset_replays_and_acks_of_the_old_epoch_are_ignored(one):
    node, raw = one
    create(raw, "t")
    t0 = int(time.time() * 1000)
    base = produce(raw, "t", [b"a", b"b"])
    time.sleep(0.05)
    middle = int(time.time() * 1000)
    time.sleep(0.05)
    produce(raw, "t", [b"c"])
    gen = join(raw, "m").generation
    _, got = lease(raw, "m", gen)
    assert ack(raw, "m", gen, acked=got).data["committed"] == base + 3
    before_ms = int(time.time() * 1000)
    reply = raw.rpc(G.ResetGroup(raw.rid(), "g", "t", None, None, None, True, False))[0]
    [row] = reply.data["partitions"]
    epoch = row["epoch"]   # the reset epoch it opened: numbered by the leader's clock and name
    assert row["offset"] == 0 and epoch >> 10 >= before_ms and epoch == reset_epoch_floor(epoch >> 10, node.config.name)
    r, again = lease(raw, "m", gen)
    assert r.reset_epoch == epoch and [v for _, v in again.values()] == [b"a", b"b", b"c"]
    stale = ack(raw, "m", gen, acked=list(again), epoch=0)
    assert stale.data["committed"] == base, "acks from before the replay do not count (below base: the epoch marker)"
    assert ack(raw, "m", gen, acked=list(again), epoch=epoch).data["committed"] == base + 3
    reply = raw.rpc(G.ResetGroup(raw.rid(), "g", "t", None, None, middle, False, False))[0]
    assert reply.data["partitions"][0]["offset"] == base + 2 and reply.data["partitions"][0]["epoch"] > epoch
    _, from_time = lease(raw, "m", gen)
    assert [v for _, v in from_time.values()] == [b"c"]
    assert t0 > 0
    bad = raw.rpc(G.ResetGroup(raw.rid(), "g", "t", None, 1, None, True, False))[0]
    assert isinstance(bad, P.ErrorReply) and bad.code == "invalid_request"


def test_group_state_survives_a_restart(tmp_path):
    nodes = start_nodes(tmp_path, 1, services=SERVICES)
    raw = Raw(nodes[0].address)
    try:
        create(raw, "t")
        base = produce(raw, "t", [b"a", b"b", b"c"])
        gen = join(raw, "m").generation
        _, got = lease(raw, "m", gen)
        ack(raw, "m", gen, acked=[base], nacks=[[base + 1, 1, 0, "later"]])
        time.sleep(0.2)
    finally:
        raw.close()
        nodes[0].stop()
    again = NodeThread(nodes[0].config)
    raw = Raw(again.address)
    try:
        wait_until(lambda: isinstance(_offsets(raw, "t", 0), P.OffsetsReply), 20, "leader after restart")
        gen = join(raw, "m2").generation
        # A redelivery waits (parked) until a majority of the replicas, here its own disk, holds
        # the restarted leader's copy (quorum for retries, zq/core/grouplead.py).
        _, got = lease(raw, "m2", gen, lease_ms=5_000, wait_ms=3_000)
        assert got.get(base + 1) == (2, b"b"), "the nack survived: attempt 2"
        assert base not in got, "the ack survived"
        assert got.get(base + 2, (None,))[0] in (None, 1), "offset base+2's lease may still run"
    finally:
        raw.close()
        again.stop()


def test_leader_gossips_state_to_replicas_and_bad_gossip_is_dropped(tmp_path):
    nodes = start_nodes(tmp_path, 3, services=SERVICES)
    raws = [Raw(n.address) for n in nodes]
    try:
        create(raws[0], "t", replication=3)
        leader = wait_until_leader(raws, "t")
        raw = raws[leader]
        base = produce(raw, "t", [b"a", b"b"])
        gen = join(raws[0], "m").generation
        wait_until(lambda: isinstance(lease(raw, "m", gen)[0], G.LeaseReply), 5, "gossip of the membership")
        # The leader serves once it has merged a majority's copies (a long-poll waits for that).
        _, got = lease(raw, "m", gen, wait_ms=3_000)
        assert sorted(got) == [base, base + 1]
        ack(raw, "m", gen, acked=[base, base + 1])
        for i, n in enumerate(nodes):
            if i != leader:
                wait_until(lambda n=n: any(h.state.committed == base + 2 for h in service(n).held.values()), 5,
                           f"state on replica {n.config.name}")
        before = nodes[0].node.counters["protocol_errors"]
        raws[0].send(G.GroupStateGossip(0, "evil", 0, [["g", 1, 0, 0, 1]]), cbor2.dumps({"epoch": -1}))
        raws[0].send(G.GroupGossip(0, "evil", ["g"]), b"\xff not cbor")
        wait_until(lambda: nodes[0].node.counters["protocol_errors"] >= before + 2, 5, "bad gossip counted")
        assert raws[0].rpc(P.MetadataRequest(raws[0].rid(), None))[0].cluster, "the node still serves"
    finally:
        for r in raws:
            r.close()
        for n in nodes:
            n.stop()


def wait_until_leader(raws: list[Raw], topic: str) -> int:
    found = []

    def probe() -> bool:
        for i, r in enumerate(raws):
            if isinstance(_offsets(r, topic, 0), P.OffsetsReply):
                found.append(i)
                return True
        return False
    wait_until(probe, 20, f"leader of {topic}")
    return found[-1]


def test_describe_shows_members_and_lag(one):
    node, raw = one
    create(raw, "t", partitions=2)
    produce(raw, "t", [b"a", b"b"], partition=0)
    gen = join(raw, "m").generation
    doc = raw.rpc(G.DescribeGroups(raw.rid(), None))[0].data
    g = doc["groups"][0]
    assert g["group"] == "g" and g["generation"] == gen
    assert g["members"] == [{"id": "m", "partitions": [{"topic": "t", "partition": 0}, {"topic": "t", "partition": 1}]}]
    rows = {r["partition"]: r for r in g["partitions"]}
    assert rows[0]["lag"] == 3 and rows[0]["committed"] is None and rows[1]["lag"] == 1   # with the epoch markers
    assert set(rows[0]) >= {"topic", "partition", "committed", "lag", "lag_seconds", "in_flight", "retrying",
                            "dead_lettered"}
    assert raw.rpc(G.DescribeGroups(raw.rid(), "other"))[0].data == {"groups": []}


def test_consumer_lag_and_replication_lag_are_prometheus_metrics(tmp_path):
    import urllib.request
    nodes = start_nodes(tmp_path, 1, services=SERVICES, metrics=True)
    raw = Raw(nodes[0].address)
    try:
        create(raw, "t")
        produce(raw, "t", [b"a", b"b", b"c", b"d"])
        gen = join(raw, "m").generation
        _, got = lease(raw, "m", gen, n=4)
        assert len(got) >= 2
        ack(raw, "m", gen, acked=sorted(got)[:1])
        url = f"http://127.0.0.1:{nodes[0].config.port + 2}/metrics"

        def sample(name: str, **labels) -> float | None:
            for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
                if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                    return float(line.rsplit(" ", 1)[1])
            return None
        # committed moves past the marker and one acked message; three of the four are not committed
        wait_until(lambda: sample("zq_group_lag_messages", group="g", topic="t", partition="0") == 3, 10,
                   "the group's lag in /metrics")
        assert sample("zq_group_in_flight", group="g", topic="t", partition="0") == len(got) - 1
        assert sample("zq_replication_lag_messages", topic="t", partition="0") == 0
        assert sample("zq_partition_in_sync_replicas", topic="t", partition="0") == 1
    finally:
        raw.close()
        nodes[0].stop()


def test_the_real_node_is_a_service_host(one):
    """zq.node.services.ServiceHost names exactly what a service may use; the real node has all of it
    (the simulator's host is checked the same way in tests/test_sim_groups.py)."""
    from zq.node.services import ServiceHost
    node, _raw = one
    wait_until(lambda: node.node is not None, 10, "the node")
    names = {n for n in ServiceHost.__dict__ if not n.startswith("_")} | set(ServiceHost.__annotations__)
    assert {"reply", "request_peer", "write", "scan_meta", "get_meta", "offset_for_time", "random_bits",
            "produce_local", "meta", "counters", "name"} <= names
    missing = [n for n in sorted(names) if not hasattr(node.node, n)]
    assert not missing, missing
    assert node.node.random_bits(62) != node.node.random_bits(62)
