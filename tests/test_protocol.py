"""The wire encoding, the batch format and the stable hashes."""
from __future__ import annotations

import zlib

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zq import batch as B
from zq import hashing
from zq import protocol as P
from zq.errors import CorruptData, InvalidRequest, MessageTooLarge, ProtocolError, UnsupportedVersion


def test_every_message_round_trips():
    samples = [
        P.MetadataRequest(1, None), P.MetadataRequest(2, ["a"]),
        P.MetadataReply(3, "c", [{"name": "n1"}], []),
        P.CreateTopic(4, "t", 3, 1, {"retention_ms": 5}), P.DeleteTopic(5, "t"),
        P.OkReply(6, {}), P.ErrorReply(7, "not_leader", "x", {"leader": "n2"}),
        P.Produce(8, "t", 0, 1, 10, 123, 0, 0, 0), P.ProduceReply(9, 5, 0, 1000, 0),
        P.Fetch(10, "t", 1, 0, 1024, 100, None), P.FetchReply(11, 10, 0, 10),
        P.ListOffsets(12, "t", 0, "earliest"), P.ListOffsets(13, "t", 0, 1234), P.OffsetsReply(14, 1, 0, 2),
        P.StatusRequest(15), P.StatusReply(16, {"nodes": []}), P.RegisterNode(17, "n", "h", 1, 2),
        P.LocalStatusRequest(18), P.LocalStatusReply(19, {}, []),
        P.FetchMany(20, "t", [[0, 5], [3, -1]], 1024, 100),
        P.FetchManyReply(21, [[0, 9, 0, 9, 2]], [[3, "not_leader", "n2 leads t/3", {"leader": "n2"}]]),
    ]
    for m in samples:
        got, payload = P.decode(P.encode(m, b"x"))
        assert got == m and payload == [b"x"]


@pytest.mark.parametrize("frames, error, words", [
    ([b"hello"], ProtocolError, "at least 2 frames"),
    ([b"GET / HTTP/1.1", b"x"], ProtocolError, "signature"),
    ([b"ZQ\x07", b"x"], UnsupportedVersion, "version 7"),
    ([P.SIGNATURE, b"\xff\xff"], ProtocolError, "not valid CBOR"),
    ([P.SIGNATURE, cbor2.dumps({"a": 1})], ProtocolError, "not an array"),
    ([P.SIGNATURE, cbor2.dumps([999, 1])], ProtocolError, "unknown message type 999"),
    ([P.SIGNATURE, cbor2.dumps([9, 1, "t"])], ProtocolError, "has 7 fields, got 2"),
    ([P.SIGNATURE, cbor2.dumps([9, 1, "t", "zero", 0, 1, 1, None])], ProtocolError, "Fetch.partition"),
    ([P.SIGNATURE, cbor2.dumps([9, True, "t", 0, 0, 1, 1, None])], ProtocolError, "Fetch.req_id"),
])
def test_garbage_is_refused_with_a_sentence(frames, error, words):
    with pytest.raises(error) as e:
        P.decode(frames)
    assert words in str(e.value)


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_random_frames_never_crash_the_decoder(a, b):
    try:
        P.decode([a, b])
    except (ProtocolError, UnsupportedVersion):
        pass


records = st.lists(st.tuples(st.integers(0, 2**53), st.none() | st.binary(max_size=16), st.binary(max_size=64),
                             st.none() | st.dictionaries(st.text(max_size=5), st.binary(max_size=5), max_size=3)),
                   min_size=1, max_size=20)


@given(records, st.integers(0, 2**40), st.integers(0, 2**31), st.sampled_from([B.CODEC_NONE, B.CODEC_ZLIB]))
@settings(max_examples=200)
def test_batches_round_trip(recs, base, epoch, codec):
    blob = B.encode_records([list(r) for r in recs], codec)
    stored = B.make_stored(codec, base, len(recs), epoch, 77, 5, 9, B.crc(blob), blob)
    h = B.verify_stored(stored)
    assert (h.base_offset, h.count, h.epoch, h.producer_id, h.base_sequence) == (base, len(recs), epoch, 5, 9)
    out = B.iter_records(stored)
    assert [(r.offset, r.timestamp_ms, r.key, r.value, r.headers) for r in out] == \
        [(base + i, ts, k, v, hd or {}) for i, (ts, k, v, hd) in enumerate(recs)]
    # Reading from inside the batch skips the records before the asked offset.
    assert [r.offset for r in B.iter_records(stored, base + len(recs) - 1)] == [base + len(recs) - 1]


def test_corruption_is_detected_anywhere_in_a_batch():
    blob = B.encode_records([[1, b"k", b"value", None]])
    stored = B.make_stored(0, 10, 1, 0, 5, 0, 0, B.crc(blob), blob)
    for i in range(len(stored)):
        damaged = bytearray(stored)
        damaged[i] ^= 0x40
        with pytest.raises(CorruptData):
            B.verify_stored(bytes(damaged))


def test_incoming_batch_checks():
    blob = B.encode_records([[1, None, b"v", None]])
    B.check_incoming(blob, B.crc(blob), 1, 1000, 10)
    with pytest.raises(InvalidRequest, match="checksum"):
        B.check_incoming(blob, B.crc(blob) ^ 1, 1, 1000, 10)
    with pytest.raises(MessageTooLarge):
        B.check_incoming(blob, B.crc(blob), 1, 3, 10)
    with pytest.raises(InvalidRequest, match="records"):
        B.check_incoming(blob, B.crc(blob), 0, 1000, 10)


def test_key_hash_is_stable_across_versions():
    # These values are part of the contract: if this test fails, keys move between partitions.
    assert [hashing.partition_for_key(k, 8) for k in (b"", b"order:1234", b"a", b"user-42")] == \
        [zlib.crc32(k) % 8 for k in (b"", b"order:1234", b"a", b"user-42")]
    assert [hashing.partition_for_key(b"order:%d" % i, 16) for i in range(8)] == [15, 9, 3, 5, 6, 0, 10, 12]


@given(st.text(min_size=1, max_size=10), st.integers(1, 64), st.sets(st.text(min_size=1, max_size=5), min_size=1, max_size=9))
def test_placement_is_deterministic_and_valid(topic, partitions, nodes):
    nodes = sorted(nodes)
    r = min(3, len(nodes))
    a = hashing.place_topic(topic, partitions, nodes, r)
    b = hashing.place_topic(topic, partitions, list(reversed(nodes)), r)
    assert a == b
    for rs in a:
        assert len(rs) == r == len(set(rs)) and set(rs) <= set(nodes)
    # Replicas and leaders are spread: every node within one of the others.
    held = [sum(n in rs for rs in a) for n in nodes]
    led = [sum(rs[0] == n for rs in a) for n in nodes]
    assert max(held) - min(held) <= 1
    assert max(led) <= -(-partitions // len(nodes)) + 1


def test_every_field_of_every_message_type_has_a_bound() -> None:
    """The trust boundary covers every field: a new message or field without a declared bound
    (zq.core.bounds) fails here, not in production."""
    import zq.group_protocol  # noqa: F401 (registers the group messages)
    for code, cls in sorted(P._BY_CODE.items()):
        fields = {name for name, _ in P._CHECKS[cls]}
        assert set(getattr(cls, "BOUNDS", {})) == fields, f"{code} {cls.__name__}"


def test_messages_only_nodes_send_are_marked() -> None:
    import zq.group_protocol as G
    from zq.core import membership as MB
    from zq.core import repl_types as RT
    for msg in (P.Replicate(1, "n1", []), P.NodeHeartbeat(1, "n1", "h:1", 1, [], 0), P.RegisterNode(1, "n", "h", 1, 1),
                P.LocalStatusRequest(1), RT.RequestVote(1, "n1", 1, 1), MB.Ping(1, "n1", "h:1", 1, "", []),
                G.GroupStateGossip(1, "n1", 0, []), G.ResetGroup(1, "g", "t", None, None, None, True, True),
                P.Fetch(1, "__meta", 0, 0, 1, 0, "n2")):
        assert P.from_nodes_only(msg), msg
    for msg in (P.Produce(1, "t", 0, 1, 1, 0, 0, 0, 0), P.Fetch(1, "t", 0, 0, 1, 0, None), P.MetadataRequest(1, None),
                G.ResetGroup(1, "g", "t", None, None, None, True, False), G.JoinGroup(1, "g", "", ["t"], 1, False)):
        assert not P.from_nodes_only(msg), msg


@pytest.mark.parametrize("partitions, words", [
    ([[0, 1], [10_000, 0]], "item 1 field 0"),                  # a partition past partitions_per_topic_max
    ([[0]], "item 0 must be a list of 2 fields"),
    ([[0, 1]] * (P.FETCH_MANY_PARTITIONS_MAX + 1), "at most 1000 items"),
])
def test_fetch_many_names_bounded_partitions(partitions, words):
    with pytest.raises(InvalidRequest, match=words):
        P.decode(P.encode(P.FetchMany(1, "t", partitions, 1024, 0)))
