"""The zq wire protocol: CBOR messages in ZeroMQ multipart frames.

Every message is the frames

    [SIGNATURE] [HEADER] [PAYLOAD ...]

SIGNATURE is the three bytes `Z Q <version>`, so that garbage, or a peer speaking another
version, is refused before anything is decoded. HEADER is a CBOR array `[type, field, ...]`
holding one of the message types below, its fields in declared order; the first field of every
message is its request id, which the reply repeats. PAYLOAD frames carry record batches as raw
bytes, never re-encoded (see zq.batch). On a ROUTER socket the peer's routing id comes first.

Each type has one grammar line in docs/protocol.md. A message type is a frozen, slotted dataclass
registered with `@message(code)`; decoding checks the signature, the sizes, the type code, the
number of fields and each field's type, and raises ProtocolError with a sentence saying which;
then each field's *value* against the class's `BOUNDS` (zq.core.bounds: epochs that fit the
stored header, offsets below 2**63, names matched whole, lists of bounded length), and raises
InvalidRequest naming the field out of range. The node answers either with an error and does
nothing else. `node_only` marks what only a node may send (`from_nodes_only`): under
`[security]` the node refuses it from a client key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from zq.core import bounds as B
from zq.errors import ProtocolError, UnsupportedVersion, ZqError
from zq.limits import DEFAULT, Limits

PROTOCOL_VERSION = 1
SIGNATURE = b"ZQ" + bytes([PROTOCOL_VERSION])

# acks levels on the wire
ACKS = {"none": 0, "leader": 1, "quorum": 2, "all": 2, 0: 0, 1: 1, -1: 2}
ACKS_NAMES = {0: "none", 1: "leader", 2: "quorum"}

_BY_CODE: dict[int, type] = {}
_CHECKS: dict[type, tuple] = {}
_NODE_ONLY: dict[type, bool | str] = {}   # True: always from a node; a field name: when that field is set


# cbor2 is loaded at the first encode or decode, not on import, so that what imports the message
# classes (the node's sans-IO composition, the simulator's checks) loads only the standard library.
# The first call of each rebinds the module's name to cbor2's own function: later calls cost what
# `cbor2.dumps` did (one global look-up, no attribute look-up).
def _dumps(obj: Any) -> bytes:
    _bind_cbor()
    return _dumps(obj)


def _loads(data: bytes) -> Any:
    _bind_cbor()
    return _loads(data)


def _bind_cbor() -> None:
    global _dumps, _loads
    import cbor2
    _dumps, _loads = cbor2.dumps, cbor2.loads


def cbor_dumps(obj: Any) -> bytes:
    """CBOR of `obj` (cbor2, loaded at first use): for the node's own records (e.g. `__meta` commands)."""
    return _dumps(obj)


def cbor_loads(data: bytes) -> Any:
    """The value CBOR `data` holds (cbor2, loaded at first use). Raises what cbor2 raises on garbage."""
    return _loads(data)


def _checker(tp: Any):
    """A function value -> bool for an annotation; kept small on purpose."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        subs = [_checker(a) for a in typing.get_args(tp)]
        return lambda v: any(s(v) for s in subs)
    if tp is type(None):
        return lambda v: v is None
    if tp is int:
        return lambda v: type(v) is int
    if tp is bool:
        return lambda v: type(v) is bool
    if tp is Any:
        return lambda v: True
    base = origin or tp
    return lambda v: isinstance(v, base)


def message(code: int, *, bounds: dict | None = None, node_only: bool | str = False):
    """Register a message type under `code`. `bounds` (else the class's own `BOUNDS`) range-checks
    its fields on decoding; `node_only` (True, or the name of a field that makes it so when set)
    says only a node may send it."""
    def register(cls):
        assert code not in _BY_CODE, f"duplicate message code {code}"
        cls.CODE = code
        if bounds is not None:
            cls.BOUNDS = bounds
        _BY_CODE[code] = cls
        hints = typing.get_type_hints(cls)
        _CHECKS[cls] = tuple((f.name, _checker(hints[f.name])) for f in dataclasses.fields(cls))
        unknown = set(getattr(cls, "BOUNDS", {})) - {name for name, _ in _CHECKS[cls]}
        assert not unknown, f"{cls.__name__} bounds name no field: {unknown}"
        if node_only:
            _NODE_ONLY[cls] = node_only
        return cls
    return register


def from_nodes_only(msg: Any) -> bool:
    """True if only a node of the cluster may send `msg` (replication, membership, gossip, ...)."""
    rule = _NODE_ONLY.get(type(msg))
    return rule is True or (isinstance(rule, str) and bool(getattr(msg, rule)))


def encode(msg: Any, *payload: bytes) -> list[bytes]:
    """Frames for `msg` (without any routing id)."""
    return [SIGNATURE, _dumps(to_array(msg)), *payload]


def decode(frames: list, limits: Limits = DEFAULT) -> tuple[Any, list]:
    """(message, payload frames) from frames without the routing id. Raises ProtocolError."""
    if len(frames) < 2:
        raise ProtocolError(f"a zq message has at least 2 frames, got {len(frames)}")
    if len(frames) > limits.frames_per_message_max:
        raise ProtocolError(f"a zq message has at most {limits.frames_per_message_max} frames, got {len(frames)}")
    sig = bytes(frames[0])
    if sig != SIGNATURE:
        if len(sig) == 3 and sig[:2] == b"ZQ":
            raise UnsupportedVersion(
                f"peer speaks zq protocol version {sig[2]}, this node speaks {PROTOCOL_VERSION}; run the same zq version on both sides")
        raise ProtocolError("frame does not start with the zq signature; is this a zq client?")
    head = frames[1]
    if len(head) > limits.header_bytes_max:
        raise ProtocolError(f"header frame of {len(head)} bytes exceeds {limits.header_bytes_max}")
    try:
        arr = _loads(bytes(head))
    except Exception as e:  # cbor2 raises several types for garbage
        raise ProtocolError(f"header frame is not valid CBOR ({e.__class__.__name__})") from None
    return from_array(arr), frames[2:]


def from_array(arr: Any) -> Any:
    """The message held by a CBOR array `[type, field, ...]`, every field checked. Raises ProtocolError."""
    if not isinstance(arr, list) or not arr or type(arr[0]) is not int:
        raise ProtocolError("header frame is not an array starting with a message type")
    cls = _BY_CODE.get(arr[0])
    if cls is None:
        raise ProtocolError(f"unknown message type {arr[0]}")
    try:
        checks = _CHECKS[cls]
        if len(arr) - 1 != len(checks):
            raise ProtocolError(f"{cls.__name__} has {len(checks)} fields, got {len(arr) - 1}")
        for (name, ok), value in zip(checks, arr[1:]):
            if not ok(value):
                raise ProtocolError(f"{cls.__name__}.{name} has the wrong type ({type(value).__name__})")
        msg = cls(*arr[1:])
        B.check_message(msg)
        return msg
    except ZqError as e:
        # The error reply repeats the request id when there is a usable one, so the sender can match it.
        if (len(arr) > 1 and _CHECKS[cls] and _CHECKS[cls][0][0] == "req_id" and type(arr[1]) is int
                and 0 <= arr[1] <= B.REQ_ID_MAX):
            e.req_id = arr[1]
        raise


def to_array(msg: Any) -> list:
    return [msg.CODE, *(getattr(msg, name) for name, _ in _CHECKS[type(msg)])]


# --------------------------------------------------------------------------------------------
# Client <-> node: admin and metadata


@message(1)
@dataclass(frozen=True, slots=True)
class MetadataRequest:
    req_id: int
    topics: list | None  # None: all topics
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "topics": B.optional(B.list_of(B.LIST_ITEMS_MAX, B.TOPIC))}


@message(2)
@dataclass(frozen=True, slots=True)
class MetadataReply:
    req_id: int
    cluster: str
    nodes: list       # [{"name", "host", "port", "state"}]
    topics: list      # [{"name", "id", "partitions": [{"partition", "leader", "epoch", "replicas"}], "config"}]
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "cluster": B.text(B.NAME_CHARS_MAX), "nodes": B.list_of(B.LIST_ITEMS_MAX),
              "topics": B.list_of(B.LIST_ITEMS_MAX)}


@message(3)
@dataclass(frozen=True, slots=True)
class CreateTopic:
    req_id: int
    name: str
    partitions: int
    replication: int
    config: dict
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "name": B.TOPIC, "partitions": B.int_range(0, B.U32_MAX),
              "replication": B.int_range(0, B.U32_MAX), "config": B.map_of(64)}


@message(4)
@dataclass(frozen=True, slots=True)
class DeleteTopic:
    req_id: int
    name: str
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "name": B.TOPIC}


@message(5)
@dataclass(frozen=True, slots=True)
class OkReply:
    req_id: int
    data: dict
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "data": B.map_of(B.LIST_ITEMS_MAX)}


@message(6)
@dataclass(frozen=True, slots=True)
class ErrorReply:
    req_id: int
    code: str
    message: str
    data: dict
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "code": B.text(B.NAME_CHARS_MAX), "message": B.text(DEFAULT.header_bytes_max),
              "data": B.map_of(64)}


@message(13)
@dataclass(frozen=True, slots=True)
class StatusRequest:
    req_id: int
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID}


@message(14)
@dataclass(frozen=True, slots=True)
class StatusReply:
    req_id: int
    status: dict   # the document of `zq status --json`
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "status": B.map_of(B.LIST_ITEMS_MAX)}


# --------------------------------------------------------------------------------------------
# Client <-> node: data


@message(7)
@dataclass(frozen=True, slots=True)
class Produce:
    """One batch for one partition; the blob is the one payload frame."""
    req_id: int
    topic: str
    partition: int
    acks: int            # 0 none (no reply), 1 leader, 2 quorum
    count: int
    blob_crc: int
    producer_id: int     # 0: not idempotent
    base_sequence: int
    flags: int
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "topic": B.TOPIC, "partition": B.PARTITION, "acks": B.int_range(0, 2),
              "count": B.COUNT, "blob_crc": B.int_range(0, B.U32_MAX), "producer_id": B.int_range(0, B.PRODUCER_ID_MAX),
              "base_sequence": B.int_range(0, B.SEQUENCE_MAX), "flags": B.int_range(0, 0xFFFF)}


@message(8)
@dataclass(frozen=True, slots=True)
class ProduceReply:
    req_id: int
    base_offset: int
    epoch: int
    append_time_ms: int
    log_start: int
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "base_offset": B.int_range(-1, B.OFFSET_MAX), "epoch": B.EPOCH,
              "append_time_ms": B.TIME_MS, "log_start": B.OFFSET}


@message(9, node_only="replica")
@dataclass(frozen=True, slots=True)
class Fetch:
    req_id: int
    topic: str
    partition: int
    offset: int
    max_bytes: int
    max_wait_ms: int
    replica: str | None   # the fetching node's name; None for clients
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "topic": B.TOPIC, "partition": B.PARTITION,
              "offset": B.int_range(-B.OFFSET_MAX - 1, B.OFFSET_MAX),   # below the log start: offset_out_of_range
              "max_bytes": B.int_range(0, B.SIZE_BYTES_MAX), "max_wait_ms": B.int_range(-1, B.DURATION_MS_MAX),
              "replica": B.optional(B.NODE)}


@message(10)
@dataclass(frozen=True, slots=True)
class FetchReply:
    """Stored batches follow as payload frames, each header + blob (zq.batch)."""
    req_id: int
    high_watermark: int
    log_start: int
    log_end: int
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "high_watermark": B.OFFSET, "log_start": B.OFFSET, "log_end": B.OFFSET}


FETCH_MANY_PARTITIONS_MAX = 1_000   # partitions one FetchMany names (its header stays far below header_bytes_max)
_FETCH_OFFSET = B.int_range(-B.OFFSET_MAX - 1, B.OFFSET_MAX)   # below the log start: offset_out_of_range


@message(34)
@dataclass(frozen=True, slots=True)
class FetchMany:
    """A client's fetch of several partitions of one topic at one node (Kafka's multi-partition
    fetch): answered with what any of them holds, or held until one of them has something."""
    req_id: int
    topic: str
    partitions: list      # [[partition, offset], ...], each partition once
    max_bytes: int        # for the whole reply (each partition answered gets at least one batch while room is left)
    max_wait_ms: int
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "topic": B.TOPIC,
              "partitions": B.list_of(FETCH_MANY_PARTITIONS_MAX, B.tuple_of(B.PARTITION, _FETCH_OFFSET)),
              "max_bytes": B.int_range(0, B.SIZE_BYTES_MAX), "max_wait_ms": B.int_range(-1, B.DURATION_MS_MAX)}


@message(35)
@dataclass(frozen=True, slots=True)
class FetchManyReply:
    """Stored batches follow as payload frames: those of `results[0]`, then `results[1]`'s, ..."""
    req_id: int
    results: list   # [[partition, high_watermark, log_start, log_end, batches], ...]
    errors: list    # [[partition, code, message, data{}], ...]: what a Fetch of that partition alone gets as ErrorReply
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID,
              "results": B.list_of(FETCH_MANY_PARTITIONS_MAX, B.tuple_of(B.PARTITION, B.OFFSET, B.OFFSET, B.OFFSET,
                                                                        B.int_range(0, DEFAULT.frames_per_message_max))),
              "errors": B.list_of(FETCH_MANY_PARTITIONS_MAX, B.tuple_of(B.PARTITION, B.text(B.NAME_CHARS_MAX),
                                                                       B.text(DEFAULT.header_bytes_max), B.map_of(64)))}


@message(11)
@dataclass(frozen=True, slots=True)
class ListOffsets:
    req_id: int
    topic: str
    partition: int
    spec: str | int       # "earliest", "latest", or a timestamp in ms
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "topic": B.TOPIC, "partition": B.PARTITION,
              "spec": B.either(B.one_of("earliest", "latest"), B.TIME_MS)}


@message(12)
@dataclass(frozen=True, slots=True)
class OffsetsReply:
    req_id: int
    offset: int
    log_start: int
    high_watermark: int
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "offset": B.OFFSET, "log_start": B.OFFSET, "high_watermark": B.OFFSET}


def error_reply(req_id: int, err) -> ErrorReply:
    return ErrorReply(req_id, err.code, err.message, {k: v for k, v in err.data.items()
                                                      if isinstance(v, (str, int, float, type(None), list))})


# --------------------------------------------------------------------------------------------
# Node <-> node


@message(15, node_only=True)
@dataclass(frozen=True, slots=True)
class RegisterNode:
    """A node tells the metadata leader its address, so that it is written into `__meta`."""
    req_id: int
    name: str
    host: str
    port: int
    incarnation: int
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "name": B.NODE, "host": B.name(B.HOST, "host name or address"),
              "port": B.int_range(1, 65_535), "incarnation": B.TIME_MS}


@message(16, node_only=True)
@dataclass(frozen=True, slots=True)
class LocalStatusRequest:
    req_id: int
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID}


@message(17, node_only=True)
@dataclass(frozen=True, slots=True)
class LocalStatusReply:
    """One node's own view: itself and the partitions it holds."""
    req_id: int
    node: dict          # {"name", "address", "incarnation", "started_ms"}
    partitions: list    # [{"topic", "partition", "leader", "epoch", "replicas", "in_sync", "log_start", "log_end", "high_watermark", "replication_lag"}]
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "node": B.map_of(64), "partitions": B.list_of(B.LIST_ITEMS_MAX)}


@message(18, node_only=True)
@dataclass(frozen=True, slots=True)
class Replicate:
    """Replication messages of many partitions, coalesced per pair of nodes and loop pass.

    Each item is `[topic_id, partition, message]`, the message a replication-core message as an
    array (codes 20-25). One-way: answers travel as Replicate messages the other way."""
    req_id: int
    sender: str
    items: list
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "sender": B.NODE,
              "items": B.list_of(B.LIST_ITEMS_MAX, B.tuple_of(B.TOPIC_ID, B.PARTITION, B.list_of(16)))}


@message(19, node_only=True)
@dataclass(frozen=True, slots=True)
class NodeHeartbeat:
    """Sent to every peer a few times a second: who I am, and which partitions I lead."""
    req_id: int
    sender: str
    address: str
    incarnation: int
    leaders: list        # [[topic_id, partition, epoch], ...]
    meta_applied: int    # the sender has applied every __meta command below this offset
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "sender": B.NODE, "address": B.ADDRESS_F, "incarnation": B.TIME_MS,
              "leaders": B.list_of(B.LIST_ITEMS_MAX, B.tuple_of(B.TOPIC_ID, B.PARTITION, B.EPOCH)),
              "meta_applied": B.OFFSET}


@message(30)
@dataclass(frozen=True, slots=True)
class ReassignPartition:
    """Set the target replica set of one partition (to the metadata leader). The reply comes once
    the command is committed; the move itself then happens in the partition's log, step by step."""
    req_id: int
    topic: str
    partition: int
    replicas: list       # [node name, ...], preferred leader first
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "topic": B.TOPIC, "partition": B.PARTITION, "replicas": B.NODES}


@message(31)
@dataclass(frozen=True, slots=True)
class DrainNode:
    """To the node to drain: stop standing for election and hand every partition it leads to
    another in-sync replica. The reply says how many it still leads after at most `wait_ms`;
    with `leave`, the node then leaves the cluster (announces it, and stops)."""
    req_id: int
    wait_ms: int
    leave: bool
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "wait_ms": B.DURATION_MS, "leave": B.boolean}


# The replication core's messages (zq.core.repl_types), registered for the wire.
from zq.core import repl_types as _rt  # noqa: E402

message(20, node_only=True)(_rt.Append)
message(21, node_only=True)(_rt.AppendAck)
message(22, node_only=True)(_rt.Fetch)
message(23, node_only=True)(_rt.Diverging)
message(24, node_only=True)(_rt.RequestVote)
message(25, node_only=True)(_rt.Vote)
message(26, node_only=True)(_rt.TimeoutNow)
message(27, node_only=True)(_rt.StartAt)
message(28, node_only=True)(_rt.RecoveryPoll)
message(29, node_only=True)(_rt.RecoveryState)
message(32, node_only=True)(_rt.PreVote)
message(33, node_only=True)(_rt.PreVoteReply)

# The membership core's messages (zq.core.membership: SWIM failure detection and gossip), node to node.
from zq.core import membership as _mb  # noqa: E402

# Their fields are checked again, against the core's own bounds, by the core (_check).
# An address the core may send to is always host:port (an empty one broke sends: found by tests/test_fuzz.py).
_MEMBER_UPDATE = B.tuple_of(B.NODE, B.ADDRESS_F, B.int_range(0, B.SEQ_MAX), B.one_of("alive", "suspect", "dead", "left"))
_PROBE_BOUNDS = {"seq": B.int_range(0, B.SEQ_MAX), "sender": B.NODE, "sender_address": B.ADDRESS_F,
                 "sender_incarnation": B.int_range(0, B.SEQ_MAX), "target": B.either(B.one_of(""), B.NODE),
                 "updates": B.list_of(B.LIST_ITEMS_MAX, _MEMBER_UPDATE)}
message(60, bounds=_PROBE_BOUNDS, node_only=True)(_mb.Ping)
message(61, bounds=_PROBE_BOUNDS, node_only=True)(_mb.Ack)
message(62, bounds={**_PROBE_BOUNDS, "target": B.NODE, "target_address": B.ADDRESS_F}, node_only=True)(_mb.PingReq)
