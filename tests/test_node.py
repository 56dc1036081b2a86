"""The node on loopback, spoken to in the raw protocol: storage, long-poll, restart, retention, bad input."""
from __future__ import annotations

import time

import pytest
import zmq

from tests.nodeutil import NodeThread, Raw, start_nodes, wait_until
from zq import protocol as P


@pytest.fixture
def one(tmp_path):
    nodes = start_nodes(tmp_path, 1)
    raw = Raw(nodes[0].address)
    yield nodes[0], raw
    raw.close()
    for n in nodes:
        n.stop()


def test_produce_then_fetch_from_any_offset(one):
    node, raw = one
    assert isinstance(raw.create("t", 2), P.OkReply)
    r1 = raw.produce("t", 0, [b"a", b"b", b"c"])
    r2 = raw.produce("t", 0, [b"d", b"e"])
    # Offset 0 holds the leader's epoch marker (a control batch consumers never see).
    assert (r1.base_offset, r2.base_offset) == (1, 4)
    reply, recs = raw.fetch("t", 0, 0)
    assert reply.high_watermark == 6 and [r.value for r in recs] == [b"a", b"b", b"c", b"d", b"e"]
    _, recs = raw.fetch("t", 0, 5)          # from inside the second batch
    assert [(r.offset, r.value) for r in recs] == [(5, b"e")]
    _, recs = raw.fetch("t", 0, 2)          # from inside the first
    assert [r.offset for r in recs] == [2, 3, 4, 5]
    reply, recs = raw.fetch("t", 1, 0)      # other partition holds only its marker
    assert recs == [] and reply.high_watermark == 1


def test_bad_requests_get_clear_errors_and_the_node_keeps_serving(one):
    node, raw = one
    raw.create("t", 1)
    raw.produce("t", 0, [b"x"])
    err = raw.produce("missing", 0, [b"x"])
    assert isinstance(err, P.ErrorReply) and err.code == "unknown_topic" and "zq topic create" in err.message
    assert raw.produce("t", 5, [b"x"]).code == "unknown_partition"
    assert raw.fetch("t", 0, 99)[0].code == "offset_out_of_range"
    assert raw.fetch("t", 0, 3)[0].code == "offset_out_of_range"
    assert raw.fetch("t", 0, -1)[0].code == "offset_out_of_range"
    bad_crc = raw.rpc(P.Produce(raw.rid(), "t", 0, 1, 1, 12345, 0, 0, 0), b"\x81\x84\x01\xf6\x41x\xf6")[0]
    assert bad_crc.code == "invalid_request" and "checksum" in bad_crc.message
    big = raw.rpc(P.Produce(raw.rid(), "t", 0, 1, 1, 0, 0, 0, 0), b"x" * (5 * 1024 * 1024))[0]
    assert big.code == "message_too_large"
    # Garbage from a stranger gets silence; a zq frame of another version gets an error naming it.
    raw.sock.send_multipart([b"GET / HTTP/1.1\r\n\r\n"])
    raw.sock.send_multipart([b"ZQ\x02", b"whatever"])
    reply, _ = raw.recv()
    assert reply.code == "unsupported_version"
    raw.sock.send_multipart([P.SIGNATURE, b"\xff\xfe garbage"])
    assert raw.recv()[0].code == "protocol_error"
    # A plain TCP client writing junk at the port does not hurt either.
    import socket
    with socket.create_connection(("127.0.0.1", node.config.port)) as s:
        s.sendall(b"\x00" * 1000 + b"junk" * 1000)
    _, recs = raw.fetch("t", 0, 0)
    assert [r.value for r in recs] == [b"x"]


def test_long_poll_fetch_wakes_when_data_arrives(one):
    node, raw = one
    raw.create("t", 1)
    waiter = Raw(node.address)
    try:
        wait_until(lambda: raw.rpc(P.ListOffsets(raw.rid(), "t", 0, "latest"))[0].offset == 1, 5, "leader marker")
        waiter.send(P.Fetch(waiter.rid(), "t", 0, 1, 1 << 20, 5000, None))
        time.sleep(0.2)
        assert not waiter.sock.poll(0), "a fetch with no data must wait"
        t0 = time.monotonic()
        raw.produce("t", 0, [b"hello"])
        reply, frames = waiter.recv(3)
        assert time.monotonic() - t0 < 2.5 and reply.high_watermark == 2 and len(frames) == 1
        # With nothing new, the fetch answers empty when its wait runs out.
        t0 = time.monotonic()
        reply, recs = waiter.fetch("t", 0, 2, wait_ms=300)
        assert recs == [] and 0.25 <= time.monotonic() - t0
    finally:
        waiter.close()


def test_fetch_many_answers_each_partition_as_its_own_fetch_and_waits_for_any(one):
    """FetchMany: each partition answered as a Fetch of it alone (its batches, or its error in
    `errors`), parked while none has data and woken by any one of them; a partition named twice
    is refused."""
    node, raw = one
    raw.create("t", 3)
    waiter = Raw(node.address)
    try:
        for p in range(3):
            wait_until(lambda p=p: raw.rpc(P.ListOffsets(raw.rid(), "t", p, "latest"))[0].offset == 1, 5, "marker")
        raw.produce("t", 0, [b"a", b"b"])
        reply, frames = waiter.rpc(P.FetchMany(waiter.rid(), "t", [[0, 1], [1, 1], [2, 9]], 1 << 20, 5000))
        assert isinstance(reply, P.FetchManyReply), reply
        assert reply.results == [[0, 3, 0, 3, 1], [1, 1, 0, 1, 0]] and len(frames) == 1
        assert [e[:2] for e in reply.errors] == [[2, "offset_out_of_range"]]
        assert reply.errors[0][3] == {"log_start": 0, "high_watermark": 1}
        # Nothing anywhere: held until one partition has something, then every partition answered.
        waiter.send(P.FetchMany(waiter.rid(), "t", [[0, 3], [1, 1], [2, 1]], 1 << 20, 5000))
        time.sleep(0.2)
        assert not waiter.sock.poll(0), "a FetchMany with no data anywhere must wait"
        raw.produce("t", 2, [b"late"])
        reply, frames = waiter.recv(3)
        assert reply.results == [[0, 3, 0, 3, 0], [1, 1, 0, 1, 0], [2, 2, 0, 2, 1]] and len(frames) == 1
        twice = waiter.rpc(P.FetchMany(waiter.rid(), "t", [[0, 1], [0, 2]], 1 << 20, 0))[0]
        assert twice.code == "invalid_request" and "twice" in twice.message
        unknown = waiter.rpc(P.FetchMany(waiter.rid(), "t", [[0, 1], [7, 0]], 1 << 20, 0))[0]
        assert unknown.results == [[0, 3, 0, 3, 1]] and [e[:2] for e in unknown.errors] == [[7, "unknown_partition"]]
    finally:
        waiter.close()


def test_list_offsets_by_time_and_ends(one):
    node, raw = one
    raw.create("t", 1)
    raw.produce("t", 0, [b"a", b"b"])
    time.sleep(0.05)
    middle = int(time.time() * 1000)
    time.sleep(0.05)
    raw.produce("t", 0, [b"c"])
    q = lambda spec: raw.rpc(P.ListOffsets(raw.rid(), "t", 0, spec))[0]
    assert q("earliest").offset == 0 and q("latest").offset == 4
    assert q(middle).offset == 3
    assert q(0).offset == 0
    assert q(middle + 10**9).offset == 4


def test_restart_keeps_data_and_offsets(tmp_path):
    nodes = start_nodes(tmp_path, 1)
    raw = Raw(nodes[0].address)
    raw.create("t", 1)
    for i in range(20):
        raw.produce("t", 0, [b"m%d" % i])
    raw.close()
    nodes[0].stop()
    from tests.nodeutil import NodeThread
    again = NodeThread(nodes[0].config)
    raw = Raw(again.address)
    try:
        wait_until(lambda: raw.rpc(P.MetadataRequest(raw.rid(), None), timeout_s=1)[0], what="node back")
        _, recs = raw.fetch("t", 0, 0)
        assert [r.value for r in recs] == [b"m%d" % i for i in range(20)]
        # offsets 0 and 21 are the markers of the leader's first and second epoch
        assert [r.offset for r in recs] == list(range(1, 21))
        assert raw.produce("t", 0, [b"next"]).base_offset == 22
    finally:
        raw.close()
        again.stop()


def test_retention_deletes_old_batches(tmp_path):
    nodes = start_nodes(tmp_path, 1, retention_interval_ms=100)
    raw = Raw(nodes[0].address)
    try:
        raw.create("t", 1, retention_ms=300)
        old = int(time.time() * 1000) - 10_000
        raw.produce("t", 0, [b"old1", b"old2"])
        time.sleep(0.5)
        raw.produce("t", 0, [b"new"])
        wait_until(lambda: raw.rpc(P.ListOffsets(raw.rid(), "t", 0, "earliest"))[0].offset == 3, 5,
                   "retention to move the log start")
        assert raw.fetch("t", 0, 0)[0].code == "offset_out_of_range"
        _, recs = raw.fetch("t", 0, 3)
        assert [r.value for r in recs] == [b"new"]
        assert old  # kept for readability of the scenario
    finally:
        raw.close()
        nodes[0].stop()


def test_a_node_restarts_over_logs_whose_start_retention_deleted(tmp_path):
    """Time retention takes a leader's marker at once (it is stored with append time 0): a partition
    holding nothing else is empty with log start 1, another starts past its first batches. A restart
    reads both (it used to stop on an assertion rebuilding the producer table)."""
    nodes = start_nodes(tmp_path, 1, retention_interval_ms=100)
    raw = Raw(nodes[0].address)
    try:
        raw.create("empty", 1, retention_ms=60_000)
        raw.create("t", 1, retention_ms=300)
        raw.produce("t", 0, [b"old1", b"old2"], producer_id=7, seq=0)
        time.sleep(0.5)
        raw.produce("t", 0, [b"new"], producer_id=7, seq=2)
        wait_until(lambda: raw.rpc(P.ListOffsets(raw.rid(), "t", 0, "earliest"))[0].offset == 3, 5,
                   "retention to move the log start")
        wait_until(lambda: raw.rpc(P.ListOffsets(raw.rid(), "empty", 0, "earliest"))[0].offset == 1, 5,
                   "retention to take the marker")
    finally:
        raw.close()
        nodes[0].stop()
    again = NodeThread(nodes[0].config)
    raw = Raw(again.address)
    try:
        wait_until(lambda: isinstance(raw.rpc(P.ListOffsets(raw.rid(), "t", 0, "earliest"))[0], P.OffsetsReply),
                   10, "the restarted node to lead again")
        start = raw.rpc(P.ListOffsets(raw.rid(), "t", 0, "earliest"))[0].offset
        assert start >= 3, "what retention deleted stays deleted"
        after = raw.produce("t", 0, [b"after"]).base_offset
        # Read from `after` itself: retention (300 ms) may take the restart's own marker, and so move
        # the log start past `start`, between the ListOffsets above and this fetch (seen under load).
        reply, recs = raw.fetch("t", 0, after)
        assert isinstance(reply, P.FetchReply), reply
        assert [r.value for r in recs] == [b"after"] and recs[-1].offset == after
        assert raw.produce("empty", 0, [b"first"]).base_offset >= 1
    finally:
        raw.close()
        again.stop()


def test_full_disk_refuses_produce_and_keeps_serving_reads(tmp_path):
    nodes = start_nodes(tmp_path, 1, disk_free_bytes_min=1 << 62)
    raw = Raw(nodes[0].address)
    try:
        raw.create("t", 1)
        err = raw.produce("t", 0, [b"x"])
        assert err.code == "storage_full" and "nothing was written" in err.message
        reply, recs = raw.fetch("t", 0, 0)
        assert reply.high_watermark == 1 and recs == []
    finally:
        raw.close()
        nodes[0].stop()


def test_three_nodes_share_metadata_and_redirect(tmp_path):
    nodes = start_nodes(tmp_path, 3)
    raws = [Raw(n.address) for n in nodes]
    try:
        wait_until(lambda: len([n for n in raws[0].rpc(P.MetadataRequest(raws[0].rid(), None))[0].nodes
                                if n["state"] == "alive"]) == 3, 10, "three nodes registered")
        wait_until(lambda: any(r.rpc(P.MetadataRequest(r.rid(), []))[0].topics[0]["partitions"][0]["epoch"] > 0
                               for r in raws), 10, "a metadata leader elected")
        leader = raws[0].rpc(P.MetadataRequest(raws[0].rid(), []))[0].topics[0]["partitions"][0]["leader"]
        by_name = {n.config.name: r for n, r in zip(nodes, raws)}
        follower = next(r for name, r in by_name.items() if name != leader)
        err = follower.create("t", 6)
        assert err.code == "not_leader" and err.data["leader"] == leader
        assert isinstance(by_name[leader].create("t", 6), P.OkReply)
        # Once create returns, every node knows the topic.
        for r in raws:
            md = r.rpc(P.MetadataRequest(r.rid(), ["t"]))[0]
            parts = [t for t in md.topics if t["name"] == "t"][0]["partitions"]
            assert len(parts) == 6
        assert {p["leader"] for p in parts} == {"n1", "n2", "n3"}   # preferred leaders, balanced
        wait_until(lambda: all(p["epoch"] == 1 for t in raws[0].rpc(P.MetadataRequest(raws[0].rid(), ["t"]))[0].topics
                               if t["name"] == "t" for p in t["partitions"]), 10, "every partition led")
        for p in parts:
            wrong = next(r for name, r in by_name.items() if name != p["leader"])
            err = wrong.produce("t", p["partition"], [b"x"])
            assert err.code == "not_leader" and err.data["leader"] == p["leader"]
            assert by_name[p["leader"]].produce("t", p["partition"], [b"x"]).base_offset == 1
        status = raws[2].rpc(P.StatusRequest(raws[2].rid()))[0].status
        assert {n["name"]: n["state"] for n in status["nodes"]} == {"n1": "alive", "n2": "alive", "n3": "alive"}
        rows = [r for r in status["partitions"] if r["topic"] == "t"]
        assert [r["high_watermark"] for r in rows] == [2] * 6
    finally:
        for r in raws:
            r.close()
        for n in nodes:
            n.stop()


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="needs root to mount a small tmpfs as a full disk")
def test_a_really_full_disk_loses_no_acknowledged_message(tmp_path):
    import os
    import subprocess
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        nodes = start_nodes(disk, 1, disk_free_bytes_min=0)   # no early refusal: RocksDB itself hits ENOSPC
        raw = Raw(nodes[0].address)
        raw.create("t", 1)
        acked, refused = 0, 0
        value = os.urandom(1000)
        for _ in range(5_000):                   # bounded: 50 MB offered to a 16 MB disk
            r = raw.produce("t", 0, [value] * 10)
            if isinstance(r, P.ProduceReply):
                assert r.base_offset >= acked           # a new epoch's marker may take one offset
                acked = r.base_offset + 10
            else:
                assert r.code == "storage_full" and "nothing was written" in r.message
                refused += 1
                if refused >= 3:
                    break
        assert refused >= 3 and acked > 0
        offset, seen = 0, []
        while offset < acked:                    # every acknowledged message is still there, once
            reply, recs = raw.fetch("t", 0, offset, max_bytes=4 << 20)
            assert recs
            seen += [r.offset for r in recs]
            offset = recs[-1].offset + 1
        assert len(seen) == len(set(seen)) and reply.high_watermark >= acked
        raw.close()
        nodes[0].stop()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_deleting_a_replicated_topic_under_traffic_leaves_every_node_serving(tmp_path):
    """Reproducer: a partition closed by a topic deletion in the same pass as its last replication
    messages made the node stop (KeyError in routing)."""
    nodes = start_nodes(tmp_path, 3)
    raws = [Raw(n.address) for n in nodes]
    try:
        wait_until(lambda: sum(n["state"] == "alive" for n in raws[0].rpc(P.MetadataRequest(raws[0].rid(), None))[0].nodes) == 3,
                   10, "three nodes registered")
        leader = lambda: raws[0].rpc(P.MetadataRequest(raws[0].rid(), []))[0].topics[0]["partitions"][0]  # noqa: E731
        wait_until(lambda: leader()["epoch"] > 0, 10, "a metadata leader")
        by_name = {n.config.name: r for n, r in zip(nodes, raws)}

        def admin(make):
            """An admin request to the metadata leader, following it if an election moves it."""
            for _ in range(50):
                r = by_name[leader()["leader"]]
                reply = r.rpc(make(r))[0]
                if not (isinstance(reply, P.ErrorReply) and reply.code in ("not_leader", "leader_not_available")):
                    return reply
                time.sleep(0.1)
            return reply
        meta_leader = by_name[leader()["leader"]]
        for round_ in range(3):
            assert isinstance(admin(lambda r: P.CreateTopic(r.rid(), f"t{round_}", 3, 3, {})), P.OkReply)
            def write_everywhere(name=f"t{round_}") -> bool:
                parts = [t for t in meta_leader.rpc(P.MetadataRequest(meta_leader.rid(), [name]))[0].topics
                         if t["name"] == name][0]["partitions"]
                return all(isinstance(by_name[p["leader"]].produce(name, p["partition"], [b"x"], acks=2),
                                      P.ProduceReply) for p in parts)
            wait_until(write_everywhere, 15, "writes to every partition")
            assert isinstance(admin(lambda r: P.DeleteTopic(r.rid(), f"t{round_}")), P.OkReply)
        for n, r in zip(nodes, raws):
            assert n.thread.is_alive(), f"{n.config.name} stopped"
            assert isinstance(r.rpc(P.MetadataRequest(r.rid(), None))[0], P.MetadataReply)
    finally:
        for r in raws:
            r.close()
        for n in nodes:
            n.stop()


def test_founding_decision_lowest_named_waiting_node_founds() -> None:
    """zq.node.founding: the lowest-named of the waiting nodes founds; the others ask it again;
    a node that learnt voters (or stops) decides nothing."""
    from zq.node.founding import FOUND_WAIT_MS, decide_founding
    assert decide_founding("n1", (), ["n3", "n2"]).found
    later = decide_founding("n2", (), ["n3", "n1"])
    assert not later.found and later.ask == ("n1", "n3") and later.retry_ms == FOUND_WAIT_MS // 2
    assert decide_founding("n2", (), []).found                       # alone: it founds
    assert decide_founding("n1", ("n9",), ["n2"]) == decide_founding("n1", (), [], stopping=True)
    assert not decide_founding("n1", ("n9",), ["n2"]).found and not decide_founding("n1", ("n9",), []).retry_ms
