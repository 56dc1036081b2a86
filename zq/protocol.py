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
number of fields and each field's type, and raises ProtocolError with a sentence saying which.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import cbor2

from zq.errors import ProtocolError, UnsupportedVersion
from zq.limits import DEFAULT, Limits

PROTOCOL_VERSION = 1
SIGNATURE = b"ZQ" + bytes([PROTOCOL_VERSION])

# acks levels on the wire
ACKS = {"none": 0, "leader": 1, "quorum": 2, "all": 2, 0: 0, 1: 1, -1: 2}
ACKS_NAMES = {0: "none", 1: "leader", 2: "quorum"}

_BY_CODE: dict[int, type] = {}
_CHECKS: dict[type, tuple] = {}


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


def message(code: int):
    def register(cls):
        assert code not in _BY_CODE, f"duplicate message code {code}"
        cls.CODE = code
        _BY_CODE[code] = cls
        hints = typing.get_type_hints(cls)
        _CHECKS[cls] = tuple((f.name, _checker(hints[f.name])) for f in dataclasses.fields(cls))
        return cls
    return register


def encode(msg: Any, *payload: bytes) -> list[bytes]:
    """Frames for `msg` (without any routing id)."""
    return [SIGNATURE, cbor2.dumps(to_array(msg)), *payload]


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
        arr = cbor2.loads(bytes(head))
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
    checks = _CHECKS[cls]
    if len(arr) - 1 != len(checks):
        raise ProtocolError(f"{cls.__name__} has {len(checks)} fields, got {len(arr) - 1}")
    for (name, ok), value in zip(checks, arr[1:]):
        if not ok(value):
            raise ProtocolError(f"{cls.__name__}.{name} has the wrong type ({type(value).__name__})")
    return cls(*arr[1:])


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


@message(2)
@dataclass(frozen=True, slots=True)
class MetadataReply:
    req_id: int
    cluster: str
    nodes: list       # [{"name", "host", "port", "state"}]
    topics: list      # [{"name", "id", "partitions": [{"partition", "leader", "epoch", "replicas"}], "config"}]
    CODE: ClassVar[int]


@message(3)
@dataclass(frozen=True, slots=True)
class CreateTopic:
    req_id: int
    name: str
    partitions: int
    replication: int
    config: dict
    CODE: ClassVar[int]


@message(4)
@dataclass(frozen=True, slots=True)
class DeleteTopic:
    req_id: int
    name: str
    CODE: ClassVar[int]


@message(5)
@dataclass(frozen=True, slots=True)
class OkReply:
    req_id: int
    data: dict
    CODE: ClassVar[int]


@message(6)
@dataclass(frozen=True, slots=True)
class ErrorReply:
    req_id: int
    code: str
    message: str
    data: dict
    CODE: ClassVar[int]


@message(13)
@dataclass(frozen=True, slots=True)
class StatusRequest:
    req_id: int
    CODE: ClassVar[int]


@message(14)
@dataclass(frozen=True, slots=True)
class StatusReply:
    req_id: int
    status: dict   # the document of `zq status --json`
    CODE: ClassVar[int]


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


@message(8)
@dataclass(frozen=True, slots=True)
class ProduceReply:
    req_id: int
    base_offset: int
    epoch: int
    append_time_ms: int
    log_start: int
    CODE: ClassVar[int]


@message(9)
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


@message(10)
@dataclass(frozen=True, slots=True)
class FetchReply:
    """Stored batches follow as payload frames, each header + blob (zq.batch)."""
    req_id: int
    high_watermark: int
    log_start: int
    log_end: int
    CODE: ClassVar[int]


@message(11)
@dataclass(frozen=True, slots=True)
class ListOffsets:
    req_id: int
    topic: str
    partition: int
    spec: str | int       # "earliest", "latest", or a timestamp in ms
    CODE: ClassVar[int]


@message(12)
@dataclass(frozen=True, slots=True)
class OffsetsReply:
    req_id: int
    offset: int
    log_start: int
    high_watermark: int
    CODE: ClassVar[int]


def error_reply(req_id: int, err) -> ErrorReply:
    return ErrorReply(req_id, err.code, err.message, {k: v for k, v in err.data.items()
                                                      if isinstance(v, (str, int, float, type(None), list))})


# --------------------------------------------------------------------------------------------
# Node <-> node


@message(15)
@dataclass(frozen=True, slots=True)
class RegisterNode:
    """A node tells the metadata leader its address, so that it is written into `__meta`."""
    req_id: int
    name: str
    host: str
    port: int
    incarnation: int
    CODE: ClassVar[int]


@message(16)
@dataclass(frozen=True, slots=True)
class LocalStatusRequest:
    req_id: int
    CODE: ClassVar[int]


@message(17)
@dataclass(frozen=True, slots=True)
class LocalStatusReply:
    """One node's own view: itself and the partitions it holds."""
    req_id: int
    node: dict          # {"name", "address", "incarnation", "started_ms"}
    partitions: list    # [{"topic", "partition", "leader", "epoch", "replicas", "in_sync", "log_start", "log_end", "high_watermark", "replication_lag"}]
    CODE: ClassVar[int]


@message(18)
@dataclass(frozen=True, slots=True)
class Replicate:
    """Replication messages of many partitions, coalesced per pair of nodes and loop pass.

    Each item is `[topic_id, partition, message]`, the message a replication-core message as an
    array (codes 20-25). One-way: answers travel as Replicate messages the other way."""
    req_id: int
    sender: str
    items: list
    CODE: ClassVar[int]


@message(19)
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


# The replication core's messages (zq.core.repl_types), registered for the wire.
from zq.core import repl_types as _rt  # noqa: E402

message(20)(_rt.Append)
message(21)(_rt.AppendAck)
message(22)(_rt.Fetch)
message(23)(_rt.Diverging)
message(24)(_rt.RequestVote)
message(25)(_rt.Vote)
message(26)(_rt.TimeoutNow)
message(27)(_rt.StartAt)
message(28)(_rt.RecoveryPoll)
message(29)(_rt.RecoveryState)

# The membership core's messages (zq.core.membership: SWIM failure detection and gossip), node to node.
from zq.core import membership as _mb  # noqa: E402

message(60)(_mb.Ping)
message(61)(_mb.Ack)
message(62)(_mb.PingReq)
