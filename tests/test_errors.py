"""Errors carry typed fields, read from their wire `data` and checked (a reply comes from a peer)."""
from __future__ import annotations

from zq import protocol as P
from zq.errors import Fenced, NotLeader, OffsetOutOfRange, PartitionFenced, from_wire


def _round_trip(error):
    reply = P.error_reply(7, error)
    decoded, _ = P.decode(P.encode(reply))
    return from_wire(decoded.code, decoded.message, decoded.data)


def test_not_leader_names_the_leader_its_address_and_epoch_across_the_wire():
    e = _round_trip(NotLeader("n1 does not lead t/0; n2 does", leader="n2", address="10.0.0.2:7001", epoch=4))
    assert isinstance(e, NotLeader)
    assert (e.leader, e.address, e.epoch) == ("n2", "10.0.0.2:7001", 4)
    assert e.data == {"leader": "n2", "address": "10.0.0.2:7001", "epoch": 4}   # the wire form is the map


def test_a_missing_empty_or_mistyped_field_reads_as_none():
    assert (NotLeader("x").leader, NotLeader("x").address, NotLeader("x").epoch) == (None, None, None)
    assert NotLeader("x", leader="n2", address="").address is None             # "address unknown"
    e = from_wire("not_leader", "x", {"address": 7, "epoch": True, "leader": ["n2"]})
    assert (e.address, e.epoch, e.leader) == (None, None, None)


def test_offset_out_of_range_carries_the_retained_range():
    e = _round_trip(OffsetOutOfRange("outside", log_start=10, high_watermark=25))
    assert isinstance(e, OffsetOutOfRange) and (e.log_start, e.high_watermark) == (10, 25)
    assert from_wire("offset_out_of_range", "x", {"log_start": "10"}).log_start is None


def test_fenced_and_partition_fenced_carry_their_fields():
    assert _round_trip(Fenced("old generation", generation=3)).generation == 3
    assert Fenced("x").generation is None
    assert _round_trip(PartitionFenced("set aside", node="n3")).node == "n3"
