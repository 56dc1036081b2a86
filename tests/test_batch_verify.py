"""Produced batches are verified before they are stored (issue 12, finding 2), and readers step over
an undecodable stored batch rather than stop at it.

Unit tests of zq.batch.verify_produced and decode_stored per bad-batch kind, and properties over
mutated valid batches; then a real node (in-process, 127.0.0.1) sent each bad kind in raw frames,
and a node whose store has an undecodable batch planted between good ones while it was stopped."""
from __future__ import annotations

import logging
import time
import zlib

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zq
from tests.nodeutil import NodeThread, Raw, start_nodes, wait_until
from zq import batch as B
from zq import protocol as P
from zq.errors import CorruptData, InvalidRequest, ProtocolError
from zq.io.store import Store
from zq.types import TopicPartition

NOW_MS = 1_764_806_400_000
GOOD = [[NOW_MS, None, b"v0", None], [NOW_MS + 1, b"k", b"v1", {"h": b"x"}], [NOW_MS + 2, None, b"", {}]]


def verify(blob: bytes, count: int, flags: int = B.CODEC_NONE, blob_crc: int | None = None, **kw):
    return B.verify_produced(blob, flags, count, B.crc(blob) if blob_crc is None else blob_crc, **kw)


# Each bad kind: (name, blob, count, flags, blob_crc or None for the right one, words the error names).
BAD_KINDS = [
    ("count above the records", cbor2.dumps([[NOW_MS, None, b"a", None]]), 3, 0, None, "holds 1 records, its header says 3"),
    ("count below the records", cbor2.dumps([[NOW_MS, None, b"a", None]] * 2), 1, 0, None, "holds 2 records"),
    ("not CBOR", b"\xff\x00 this is not cbor", 1, 0, None, "not valid CBOR"),
    ("truncated CBOR", cbor2.dumps([[NOW_MS, None, b"abcdef", None]])[:-3], 1, 0, None, "not valid CBOR"),
    ("blob is a map", cbor2.dumps({"a": 1}), 1, 0, None, "not an array of records"),
    ("unknown codec", cbor2.dumps([[NOW_MS, None, b"a", None]]), 1, 5, None, "unknown codec 5"),
    ("control flag from a producer", cbor2.dumps([[NOW_MS, None, b"a", None]]), 1, B.FLAG_CONTROL, None, "bits other"),
    ("zlib flag on a plain blob", cbor2.dumps([[NOW_MS, None, b"a", None]]), 1, B.CODEC_ZLIB, None, "zlib"),
    ("zlib stream cut short", zlib.compress(cbor2.dumps([[NOW_MS, None, b"a" * 100, None]]))[:-6], 1, B.CODEC_ZLIB,
     None, "zlib"),
    ("bad CRC", cbor2.dumps([[NOW_MS, None, b"a", None]]), 1, 0, 12345, "checksum"),
    ("record of three fields", cbor2.dumps([[NOW_MS, None, b"a"]]), 1, 0, None, "not an array [create_time_ms"),
    ("record not an array", cbor2.dumps([7]), 1, 0, None, "not an array [create_time_ms"),
    ("value is text", cbor2.dumps([[NOW_MS, None, "text", None]]), 1, 0, None, "value is not bytes"),
    ("key is an integer", cbor2.dumps([[NOW_MS, 5, b"a", None]]), 1, 0, None, "key is neither bytes nor null"),
    ("time is text", cbor2.dumps([[str(NOW_MS), None, b"a", None]]), 1, 0, None, "create time"),
    ("time is negative", cbor2.dumps([[-1, None, b"a", None]]), 1, 0, None, "create time"),
    ("time is a bool", cbor2.dumps([[True, None, b"a", None]]), 1, 0, None, "create time"),
    ("time beyond 64 bits", cbor2.dumps([[2**70, None, b"a", None]]), 1, 0, None, "CBOR"),
    ("headers a list", cbor2.dumps([[NOW_MS, None, b"a", [b"x"]]]), 1, 0, None, "headers are neither"),
    ("header value text", cbor2.dumps([[NOW_MS, None, b"a", {"h": "x"}]]), 1, 0, None, "headers do not map"),
    ("header name bytes", cbor2.dumps([[NOW_MS, None, b"a", {b"h": b"x"}]]), 1, 0, None, "headers do not map"),
    ("nested too deep", cbor2.dumps([[NOW_MS, None, b"a", {"h": [[b"x"]]}]]), 1, 0, None, "CBOR"),
    ("a tagged value", cbor2.dumps([[NOW_MS, None, cbor2.CBORTag(30, [1, 3]), None]]), 1, 0, None, "CBOR"),
]


@pytest.mark.parametrize("name,blob,count,flags,blob_crc,words", BAD_KINDS, ids=[k[0] for k in BAD_KINDS])
def test_each_bad_batch_kind_raises_a_protocol_error_naming_it(name, blob, count, flags, blob_crc, words):
    with pytest.raises(ProtocolError, match=words.replace("[", r"\[")):
        verify(blob, count, flags, blob_crc)
    # The node's entry point answers the same as invalid_request (nothing written).
    with pytest.raises(InvalidRequest):
        B.check_incoming(blob, B.crc(blob) if blob_crc is None else blob_crc, count, 4 << 20, 1000, flags)


def test_header_fields_are_checked_against_their_stored_widths():
    blob = cbor2.dumps([[NOW_MS, None, b"a", None]])
    for field, value in (("producer_id", 2**64), ("producer_id", -1), ("base_sequence", 2**32),
                         ("base_sequence", -1)):
        with pytest.raises(ProtocolError, match=field.replace("_", " ")):
            verify(blob, 1, **{field: value})
    with pytest.raises(ProtocolError, match="count"):
        verify(blob, 2**32)
    with pytest.raises(ProtocolError, match="1 to 10 records"):
        verify(blob, 11, records_max=10)
    with pytest.raises(ProtocolError, match="flags"):
        verify(blob, 1, flags=1 << 16)
    assert verify(blob, 1, producer_id=2**64 - 1, base_sequence=2**32 - 1) == [[NOW_MS, None, b"a", None]]


def test_a_compressed_batch_is_decompressed_within_its_bound():
    raw = cbor2.dumps([[NOW_MS, None, b"\x00" * 100_000, None]])
    blob = zlib.compress(raw)
    assert len(blob) < 1_000
    assert verify(blob, 1, B.CODEC_ZLIB, decoded_bytes_max=len(raw)) == [[NOW_MS, None, b"\x00" * 100_000, None]]
    with pytest.raises(ProtocolError, match=f"more than {len(raw) - 1} bytes"):
        verify(blob, 1, B.CODEC_ZLIB, decoded_bytes_max=len(raw) - 1)
    with pytest.raises(ProtocolError, match="bytes after its end"):
        verify(blob + b"tail", 1, B.CODEC_ZLIB)


@pytest.mark.parametrize("codec", [B.CODEC_NONE, B.CODEC_ZLIB])
def test_good_batches_verify_to_their_records(codec):
    blob = B.encode_records(GOOD, codec)
    assert verify(blob, len(GOOD), codec) == GOOD
    stored = B.make_stored(codec, 40, len(GOOD), 3, NOW_MS, 7, 9, B.crc(blob), blob)
    h, records = B.decode_stored(stored)
    assert (h.base_offset, records) == (40, GOOD)
    assert B.decode_stored(B.control_batch(5, 1, NOW_MS)) [1] is None


def test_an_undecodable_stored_batch_names_its_offsets():
    blob = cbor2.dumps([[NOW_MS, None, b"a", None]])
    stored = B.make_stored(0, 6, 3, 1, NOW_MS, 0, 0, B.crc(blob), blob)
    with pytest.raises(ProtocolError, match="offsets 6 to 8 is undecodable: the batch holds 1 records") as e:
        B.decode_stored(stored)
    assert (e.value.base_offset, e.value.next_offset) == (6, 9)


def test_a_verified_stored_batch_is_decoded_and_counted_but_its_shapes_are_trusted():
    """FLAG_VERIFIED (set by the leader that checked the records) spares readers the shape checks,
    not the decoding or the count; without it (an older version's batch) every check runs."""
    odd = cbor2.dumps([[NOW_MS, None, "text value", None]])
    stored = B.make_stored(B.FLAG_VERIFIED, 3, 1, 1, NOW_MS, 0, 0, B.crc(odd), odd)
    assert B.decode_stored(stored)[1] == [[NOW_MS, None, "text value", None]]
    with pytest.raises(ProtocolError, match="value is not bytes"):
        B.decode_stored(B.make_stored(0, 3, 1, 1, NOW_MS, 0, 0, B.crc(odd), odd))
    short = B.make_stored(B.FLAG_VERIFIED, 3, 2, 1, NOW_MS, 0, 0, B.crc(odd), odd)
    with pytest.raises(ProtocolError, match="holds 1 records, its header says 2"):
        B.decode_stored(short)
    garbage = b"\xff\xff"
    with pytest.raises(ProtocolError, match="not valid CBOR"):
        B.decode_stored(B.make_stored(B.FLAG_VERIFIED, 3, 1, 1, NOW_MS, 0, 0, B.crc(garbage), garbage))
    # A producer cannot claim it.
    with pytest.raises(ProtocolError, match="bits other"):
        verify(cbor2.dumps([[NOW_MS, None, b"a", None]]), 1, B.FLAG_VERIFIED)


def test_the_leader_marks_what_it_verified(node):
    n, raw = node
    raw.create("marked", 1)
    raw.produce("marked", 0, [b"a"])
    frames = raw.rpc(P.Fetch(raw.rid(), "marked", 0, 1, 1 << 20, 0, None))[1]
    assert [bool(B.unpack_header(f).flags & B.FLAG_VERIFIED) for f in frames] == [True]


records_st = st.lists(st.tuples(st.integers(0, 2**63 - 1), st.none() | st.binary(max_size=8), st.binary(max_size=16),
                                st.none() | st.dictionaries(st.text(max_size=4), st.binary(max_size=4), max_size=2)),
                      min_size=1, max_size=8).map(lambda rs: [list(r) for r in rs])


@st.composite
def mutated(draw):
    """A valid batch, then one to three of: a flipped byte, bytes inserted, bytes deleted, the blob
    cut, the count moved, the codec changed."""
    recs = draw(records_st)
    codec = draw(st.sampled_from([B.CODEC_NONE, B.CODEC_ZLIB]))
    blob = bytearray(B.encode_records(recs, codec))
    count, flags = len(recs), codec
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "cut", "count", "codec"]))
        i = draw(st.integers(0, max(0, len(blob) - 1)))
        if kind == "flip" and blob:
            blob[i] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            blob[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del blob[i:i + draw(st.integers(1, 4))]
        elif kind == "cut":
            del blob[i:]
        elif kind == "count":
            count = draw(st.integers(0, 2 * count + 1))
        else:
            flags = draw(st.integers(0, 15))
    return recs, codec, bytes(B.encode_records(recs, codec)), bytes(blob), count, flags


@given(mutated())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_a_mutated_batch_verifies_to_its_records_or_raises_protocol_error(case):
    """With the CRC the producer computed: the batch verifies to exactly its records (the mutation
    changed nothing that matters) or is refused with ProtocolError, never another exception."""
    recs, codec, original, blob, count, flags = case
    try:
        out = B.verify_produced(blob, flags, count, B.crc(original))
    except ProtocolError:
        return
    assert out == recs


@given(mutated())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_a_mutated_batch_with_a_matching_crc_is_well_typed_or_refused(case):
    """A sender that recomputes the CRC after damage gets past the checksum: then what verifies is a
    list of `count` well-typed records, and anything else is ProtocolError; stored the same way,
    a reader gets the records or ProtocolError, never another exception."""
    _, _, _, blob, count, flags = case
    try:
        out = B.verify_produced(blob, flags, count, B.crc(blob))
    except ProtocolError:
        out = None
    if out is not None:
        assert len(out) == count
        for ts, key, value, headers in out:
            assert type(ts) is int and 0 <= ts < 2**63 and type(value) is bytes
            assert key is None or type(key) is bytes
            assert headers is None or all(type(k) is str and type(v) is bytes for k, v in headers.items())
    stored = B.make_stored(flags & 0xFFFF, 10, count & 0xFFFFFFFF, 1, NOW_MS, 0, 0, B.crc(blob), blob)
    try:
        got = B.decode_stored(stored)[1]
    except (ProtocolError, CorruptData):
        got = None
    if out is not None and not flags & B.FLAG_CONTROL:
        assert got == out
    # Marked verified, a reader still decodes and counts it: records or ProtocolError, nothing else.
    marked = B.make_stored((flags | B.FLAG_VERIFIED) & 0xFFFF, 10, count & 0xFFFFFFFF, 1, NOW_MS, 0, 0, B.crc(blob),
                           blob)
    try:
        got = B.decode_stored(marked)[1]
    except ProtocolError:
        return
    assert got is None if flags & B.FLAG_CONTROL else len(got) == count


def test_a_group_member_served_an_undecodable_batch_steps_over_it(caplog):
    """An older node may still lease an undecodable batch's offsets: the member logs and counts it
    and treats it as holding nothing (its leased offsets go back as missing), instead of raising."""
    from zq.client.groups import GroupConsumer
    member = GroupConsumer.__new__(GroupConsumer)   # only what _records reads
    member.topic, member._decoded, member.undecodable_batches_skipped = "t", {}, 0
    blob = cbor2.dumps([[NOW_MS, None, b"a", None]])
    bad = B.make_stored(0, 6, 3, 1, NOW_MS, 0, 0, B.crc(blob), blob)
    caplog.set_level(logging.ERROR)
    h, records = member._records(0, bad)
    assert (h.base_offset, records, member.undecodable_batches_skipped) == (6, None, 1)
    assert "t/0: the stored batch at offsets 6 to 8 is undecodable" in caplog.text
    good = B.encode_records(GOOD)
    assert member._records(0, B.make_stored(0, 9, 3, 1, NOW_MS, 0, 0, B.crc(good), good))[1] == GOOD


# ---------------------------------------------------------------------------------------------- real node

def bad_produce(raw: Raw, topic: str, blob: bytes, count: int, flags: int = 0, blob_crc: int | None = None):
    msg = P.Produce(raw.rid(), topic, 0, 1, count, B.crc(blob) if blob_crc is None else blob_crc, 0, 0, flags)
    return raw.rpc(msg, blob)[0]


def read_all(client, topic: str, want: int, group: str | None = None, timeout_s: float = 15.0) -> list[bytes]:
    """Values read from earliest (acked, in a group) until `want` arrived or the time ran out."""
    consumer = client.consumer(topic, group=group, start="earliest", **({"session_timeout_ms": 3_000,
                                                                         "heartbeat_ms": 200} if group else {}))
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < want and time.monotonic() < deadline:
            for m in consumer.poll(0.2):
                got.append(m.value)
                m.ack()
        return got
    finally:
        consumer.close()


@pytest.fixture
def node(tmp_path):
    nodes = start_nodes(tmp_path, 1)
    raw = Raw(nodes[0].address)
    yield nodes[0], raw
    raw.close()
    nodes[0].stop()


def test_every_bad_batch_kind_is_refused_and_a_consumer_reads_every_good_message_around_them(node):
    n, raw = node
    assert isinstance(raw.create("poison", 1), P.OkReply)
    good: list[bytes] = []
    for i, (name, blob, count, flags, blob_crc, _) in enumerate(BAD_KINDS):
        values = [b"before-%d" % i, b"before-%d-2" % i]
        assert isinstance(raw.produce("poison", 0, values), P.ProduceReply)
        good += values
        reply = bad_produce(raw, "poison", blob, count, flags, blob_crc)
        assert isinstance(reply, P.ErrorReply) and reply.code == "invalid_request", (name, reply)
    end = raw.produce("poison", 0, [b"last"])
    good.append(b"last")
    # Nothing of a refused batch took an offset: the good batches sit back to back after the marker.
    assert end.base_offset == 1 + len(good) - 1
    assert n.node.counters["produce_batches_refused"] == len(BAD_KINDS)
    from zq.io.metrics import NodeCollector
    families = {f.name: f for f in NodeCollector(n.node).collect()}
    assert {s.labels["where"]: s.value for s in families["zq_bad_batches"].samples} == {
        "produce_refused": len(BAD_KINDS), "group_lease_skipped": 0}
    with zq.Client(bootstrap=n.address) as client:
        assert read_all(client, "poison", len(good)) == good


def test_a_zlib_bomb_is_refused_without_inflating_it(tmp_path):
    from zq.limits import Limits
    nodes = start_nodes(tmp_path, 1, limits=Limits(batch_decoded_bytes_max=1 << 20))
    raw = Raw(nodes[0].address)
    try:
        raw.create("bomb", 1)
        blob = zlib.compress(cbor2.dumps([[NOW_MS, None, b"\x00" * (2 << 20), None]]))
        reply = bad_produce(raw, "bomb", blob, 1, B.CODEC_ZLIB)
        assert reply.code == "invalid_request" and "more than 1048576 bytes" in reply.message
        assert isinstance(raw.produce("bomb", 0, [b"ok"]), P.ProduceReply)
    finally:
        raw.close()
        nodes[0].stop()


def plant_undecodable(data_dir, topic_id: int, base_offset: int) -> None:
    """Replace the stored batch at `base_offset` with one of the same offsets whose checksums hold
    but whose blob holds one record where the header says its count: what an older node stored
    (without FLAG_VERIFIED, which this version's leader sets on what it verified)."""
    with Store(data_dir) as store:
        tp = TopicPartition(topic_id, 0)
        values = store.read(tp, base_offset, 1 << 20)   # the batch and the ones after it
        h = B.unpack_header(values[0])
        assert h.base_offset == base_offset and h.count == 3
        blob = cbor2.dumps([[NOW_MS, None, b"poison", None]])
        # The codec bits only, as an older version stored it.
        values[0] = B.make_stored(h.flags & 0x7, h.base_offset, h.count, h.epoch, h.append_time_ms, 0, 0, B.crc(blob),
                                  blob)
        txn = store.begin()
        txn.truncate_from(tp, base_offset)
        for value in values:
            txn.append(tp, value, B.unpack_header(value))
        store.commit(txn, sync=True)


def test_readers_step_over_an_undecodable_stored_batch(tmp_path, caplog):
    """Batches a, b, c of three records each; b is replaced in the stopped node's store by one whose
    header says 3 records but whose blob holds 1. A plain consumer and a group consumer both read
    all of a and c, the group's committed offset moves past b, and the skips are counted and logged."""
    nodes = start_nodes(tmp_path, 1, services=("zq.io.groups",))
    raw = Raw(nodes[0].address)
    raw.create("planted", 1)
    a, b, c = ([b"%s%d" % (x, i) for i in range(3)] for x in (b"a", b"b", b"c"))
    offsets = [raw.produce("planted", 0, values).base_offset for values in (a, b, c)]
    topic_id = nodes[0].node.meta.topic("planted").id
    raw.close()
    nodes[0].stop()
    plant_undecodable(nodes[0].config.data_dir, topic_id, offsets[1])
    again = NodeThread(nodes[0].config)
    try:
        with zq.Client(bootstrap=again.address) as client:
            wait_until(lambda: client.list_offsets("planted", 0, "latest"), 15, "the node leads again")
            caplog.set_level(logging.ERROR)
            assert read_all(client, "planted", 6) == a + c
            assert any("offsets 4 to 6 is undecodable" in r.getMessage() and "stepped over" in r.getMessage()
                       for r in caplog.records)
            assert read_all(client, "planted", 6, group="g") == a + c

            def committed_past_c() -> bool:
                rows = [p for g in zq.client.groups.describe_groups(client, "g")["groups"] for p in g["partitions"]]
                return any(r.get("committed", 0) >= offsets[2] + 3 for r in rows)
            wait_until(committed_past_c, 10, "the group's committed offset past the planted batch")
            assert again.node.counters["group_undecodable_batches_skipped"] == 1
            assert again.node.counters["group_undecodable_offsets_skipped"] == 3
    finally:
        again.stop()
