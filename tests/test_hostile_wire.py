"""The wire trust boundary (issue 12, finding 1 and the wire part of 7): a message whose fields are
out of range is refused where it enters, with `invalid_request` where a reply is possible, and
nothing else happens; an error inside one partition fences that partition, never the loop."""
from __future__ import annotations

import time

import cbor2
import pytest
import zmq

from tests.nodeutil import NodeThread, Raw, start_nodes, wait_until
from zq import group_protocol as G
from zq import protocol as P
from zq.core import bounds as B
from zq.core import repl_types as RT
from zq.core.metadata import MetadataState, plan_create_topic
from zq.errors import InvalidRequest
from zq.io import replicas as R
from zq.limits import DEFAULT
from zq.types import TopicPartition

# ---------------------------------------------------------------------------- pure checks


@pytest.mark.parametrize("msg, field", [
    (RT.RequestVote(2**40, "evil", 2**40, 2**62), "epoch"),
    (RT.RequestVote(1, "evil", 1, 2**63), "last_end"),
    (RT.Append(1, "n1", 0, 0, 0, 2**64, []), "leader_end"),
    (RT.Vote(2**32, "n1", True), "epoch"),
    (RT.StartAt(1, "n1", 5, 1, ["b", "a\n"]), "voters"),
    (RT.AppendAck(1, "n1\n", 0), "sender"),
    (P.Produce(1, "t", 0, 1, 1, 0, 2**64, 0, 0), "producer_id"),
    (P.Produce(1, "t", 0, 1, 1, 0, 1, 2**31, 0), "base_sequence"),
    (P.Produce(1, "t", 0, 7, 1, 0, 0, 0, 0), "acks"),
    (P.Produce(1, "t", 0, 1, 0, 0, 0, 0, 0), "count"),
    (P.ListOffsets(1, "t", 0, 2**100), "spec"),
    (P.ListOffsets(1, "t", 0, "soon"), "spec"),
    (P.CreateTopic(1, "name\n", 1, 1, {}), "name"),
    (P.CreateTopic(1, ".", 1, 1, {}), "name"),
    (P.CreateTopic(1, "..", 1, 1, {}), "name"),
    (P.CreateTopic(1, "", 1, 1, {}), "name"),
    (P.CreateTopic(1, "x" * 201, 1, 1, {}), "name"),
    (P.RegisterNode(1, "n\x00", "127.0.0.1", 1, 1), "name"),
    (P.NodeHeartbeat(1, "n1", "127.0.0.1:1", 1, [[1, 0, 2**40]], 0), "leaders"),
    (G.Ack(1, "g", "m", 1, "t", 0, 0, [-1], [], []), "acked"),
    (G.Lease(1, "g\n", "m", 1, "t", 0, 10, 1000, 0, "earliest"), "group"),
])
def test_every_out_of_range_field_is_refused_by_name_on_decoding(msg, field):
    with pytest.raises(InvalidRequest, match=rf"{type(msg).__name__}\.{field}:"):
        P.decode(P.encode(msg))
    with pytest.raises(InvalidRequest):
        B.check_message(msg)   # the same check, for the simulator and the cores


def test_the_largest_values_in_range_still_pass():
    for msg in (RT.RequestVote(B.EPOCH_MAX, "n1", B.EPOCH_MAX, B.OFFSET_MAX),
                P.Produce(2**63 - 1, "a.b_c-9", 9_999, 2, 100_000, 2**32 - 1, 2**63 - 1, 2**31 - 1, 0xFFFF),
                P.ListOffsets(1, "t", 0, B.TIME_MS_MAX), P.CreateTopic(1, "x" * 200, 1, 1, {}),
                P.CreateTopic(1, "...", 1, 1, {})):
        assert P.decode(P.encode(msg))[0] == msg


def test_an_entry_past_the_stored_widths_is_refused():
    for entry in ([0, 1, 2**40, -1, -1, b""], [2**63 - 1, 2, 1, -1, -1, b"x"], [0, 1, 1, 2**64, 0, b"x"],
                  [0, 1, 1, 5, 2**32, b"x"], [0, 10**6, 1, -1, -1, b"x"]):
        with pytest.raises(Exception, match="out of range"):
            RT.Entry.from_wire(entry)


@pytest.mark.parametrize("name", ["name\n", ".", "..", "", "a/b", "x" * 201, "tab\there"])
def test_create_topic_refuses_names_that_are_not_plain(name):
    with pytest.raises(InvalidRequest, match="not valid"):
        plan_create_topic(MetadataState(), name, 1, 1, {}, ["n1"], 0, DEFAULT)


def test_a_decoding_error_repeats_the_request_id():
    frames = [P.SIGNATURE, cbor2.dumps([P.Produce.CODE, 77, "t", 0, 1, 1, 0, 2**64, 0, 0])]
    with pytest.raises(InvalidRequest) as info:
        P.decode(frames)
    assert info.value.req_id == 77


# ---------------------------------------------------------------------------- real nodes


def _create(raws: list[Raw], name: str, partitions: int, replication: int) -> None:
    def created() -> bool:
        return any(isinstance(r.create(name, partitions, replication), P.OkReply) or
                   r.create(name, partitions, replication).code == "topic_exists" for r in raws)
    wait_until(created, 20, f"topic {name} created")


def _leader(nodes: list[NodeThread], tp: TopicPartition) -> NodeThread:
    found: list[NodeThread] = []

    def one() -> bool:
        found[:] = [n for n in nodes if n.node and tp in n.node.parts and n.node.parts[tp].replica is not None
                    and n.node.parts[tp].replica.role == "leader" and tp not in n.node.fenced]
        return len(found) == 1
    wait_until(one, 20, f"a leader of {tp}")
    return found[0]


def _hostile_items(tid: int) -> list:
    return [[tid, 0, P.to_array(RT.RequestVote(2**40, "evil", 2**40, 2**62))],
            [tid, 0, P.to_array(RT.Vote(2**40, "evil", True))],
            [tid, 0, P.to_array(RT.Append(2**33, "evil", 0, 0, 2**63, 2**63, []))],
            [tid, 0, [24, 2**31, "evil", 1, 1]],          # in range, from a stranger: ignored by the core
            [tid, 0, [24, 1, "n1\n", 1, 1]]]


def _read_all(raw: Raw, count: int) -> list[bytes]:
    reply, records = raw.fetch("t", 0, 0)
    return [r.value for r in records][:count] if isinstance(reply, P.FetchReply) else []


def test_a_huge_term_vote_sent_to_every_node_changes_nothing_even_after_a_restart(tmp_path):
    nodes = start_nodes(tmp_path, 3)
    raws = [Raw(n.address) for n in nodes]
    evil = zmq.Context.instance().socket(zmq.DEALER)
    evil.setsockopt(zmq.LINGER, 0)
    try:
        _create(raws, "t", 1, 3)
        wait_until(lambda: all(n.node.meta.topics.get("t") for n in nodes), 10, "every node to know t")
        tid = nodes[0].node.meta.topic("t").id
        tp = TopicPartition(tid, 0)
        leader = _leader(nodes, tp)
        lraw = raws[nodes.index(leader)]
        assert isinstance(lraw.produce("t", 0, [b"a", b"b"], acks=2), P.ProduceReply)
        epochs = {n.config.name: n.node.parts[tp].replica.epoch for n in nodes}
        items, frames = R.pack_items(_hostile_items(tid))
        for n in nodes:
            evil.connect(f"tcp://{n.address}")
        time.sleep(0.3)
        for _ in range(3):   # DEALER round-robins its peers: each node gets every item
            evil.send_multipart(P.encode(P.Replicate(0, "evil", items), *frames))
        evil.send_multipart(P.encode(P.Replicate(0, "evil", [[tid, 0, [24, 2**40, "evil", 2**40, 2**62]]])))
        wait_until(lambda: sum(n.node.counters["replication_dropped"] + n.node.counters["invalid_requests"]
                               for n in nodes) >= 3, 10, "the hostile messages to be dropped")
        time.sleep(0.5)
        for n in nodes:
            assert n.thread.is_alive() and not n.errors, n.errors
            assert not n.node.fenced
            replica = n.node.parts[tp].replica
            assert replica.epoch == epochs[n.config.name], "a stranger moved an epoch"
            assert replica.epoch <= B.EPOCH_MAX
        assert _leader(nodes, tp) is leader
        assert isinstance(lraw.produce("t", 0, [b"c"], acks=2), P.ProduceReply)
        assert _read_all(lraw, 3) == [b"a", b"b", b"c"]
        # Nothing of it was persisted: every node comes back, and the partition still serves.
        for i, n in enumerate(nodes):
            n.stop()
            nodes[i] = NodeThread(n.config)
        wait_until(lambda: all(n.node for n in nodes), 10, "restarted nodes")
        leader = _leader(nodes, tp)
        lraw = Raw(leader.address)
        raws.append(lraw)
        wait_until(lambda: isinstance(lraw.produce("t", 0, [b"d"], acks=2), P.ProduceReply), 20, "produce after restart")
        wait_until(lambda: _read_all(lraw, 4)[:3] == [b"a", b"b", b"c"], 10, "the data after the restart")
        assert all(n.thread.is_alive() and not n.errors for n in nodes)
        assert all(n.node.parts[tp].replica.epoch < 2**20 for n in nodes)
    finally:
        evil.close(0)
        for r in raws:
            r.close()
        for n in nodes:
            n.stop()


def test_bad_fields_from_a_client_get_invalid_request_with_their_request_id(tmp_path):
    [nt] = start_nodes(tmp_path, 1)
    raw = Raw(nt.address)
    try:
        wait_until(lambda: isinstance(raw.create("t", 1, 1), P.OkReply), 10, "create")
        for msg in (P.ListOffsets(raw.rid(), "t", 0, 2**100), P.CreateTopic(raw.rid(), "..", 1, 1, {}),
                    P.CreateTopic(raw.rid(), "name\n", 1, 1, {}),
                    P.Produce(raw.rid(), "t", 0, 1, 1, 0, 2**64, 0, 0)):
            raw.sock.send_multipart([P.SIGNATURE, cbor2.dumps(P.to_array(msg)), b"x"])
            reply, _ = raw.recv()
            assert reply.req_id == msg.req_id and reply.code == "invalid_request", reply
        assert nt.node.counters["invalid_requests"] == 4
        assert [t for t in nt.node.meta.topics if not t.startswith("t")] == []
        assert isinstance(raw.produce("t", 0, [b"ok"]), P.ProduceReply)
    finally:
        raw.close()
        nt.stop()


def test_an_internal_error_in_one_partition_fences_it_and_the_others_keep_serving(tmp_path, monkeypatch, caplog):
    [nt] = start_nodes(tmp_path, 1)
    raw = Raw(nt.address)
    try:
        wait_until(lambda: isinstance(raw.create("t", 2, 1), P.OkReply), 10, "create")
        wait_until(lambda: isinstance(raw.produce("t", 1, [b"x"]), P.ProduceReply), 10, "a leader of t/1")
        tid = nt.node.meta.topic("t").id
        real = R.stored_from_entry

        def broken(entry):
            if b"poison" in entry.payload:
                raise RuntimeError("a bug of ours, for this test")
            return real(entry)
        monkeypatch.setattr(R, "stored_from_entry", broken)
        import zq.batch as ZB
        blob = ZB.encode_records([[1, None, b"poison", None]])
        reply = raw.rpc(P.Produce(raw.rid(), "t", 0, 1, 1, ZB.crc(blob), 0, 0, 0), blob)[0]
        assert reply.code == "partition_fenced" and "check that node's log" in reply.message, reply
        assert TopicPartition(tid, 0) in nt.node.fenced and nt.node.counters["partitions_fenced"] == 1
        assert any("t/0 is fenced" in r.getMessage() and "RuntimeError" in r.getMessage() for r in caplog.records)
        assert raw.produce("t", 0, [b"y"]).code == "partition_fenced"
        assert isinstance(raw.produce("t", 1, [b"z"]), P.ProduceReply)
        assert [r.value for r in raw.fetch("t", 1, 0)[1]] == [b"x", b"z"]
        assert nt.thread.is_alive() and not nt.errors
    finally:
        raw.close()
        nt.stop()
