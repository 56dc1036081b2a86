"""Wire messages of consumer groups (codes 40-59), registered with `zq.protocol.message`.

Framing, checking and the error reply are those of `zq.protocol`; each message has one grammar
line in docs/protocol.md. The first field of every message is its request id. Each declares
`BOUNDS`, the range of every field (zq.core.bounds), checked on decoding.

Client and node: a member joins through any node (`JoinGroup`), heartbeats there
(`GroupHeartbeat`), and both are answered with a `GroupReply` (its generation and partitions).
It leases messages from each assigned partition's leader (`Lease` -> `LeaseReply` with the stored
batches as payload frames) and settles them in batches (`Ack` -> `OkReply{committed}`).
`ResetGroup` and `DescribeGroups` go to any node, which asks the partition leaders.

Node and node: `GroupGossip` (memberships) and `GroupStateGossip` (delivery states, one payload
frame each) are one-way; a replica answers a `GroupStateGossip` that asks for it with a one-way
`GroupStateAck` once the merged copy is on its disk; a new partition leader asks the replicas for
their copies with `GroupStatePull` -> `GroupStatePulled`; `LocalGroupsRequest` asks a node for
the rows of the partitions it leads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from zq.core import bounds as B
from zq.limits import DEFAULT
from zq.protocol import message

GENERATION = B.int_range(-1, B.SEQ_MAX)
START = B.either(B.one_of("earliest", "latest"), B.TIME_MS)
GROUP_TP = B.tuple_of(B.GROUP, B.TOPIC_ID, B.PARTITION)

# ---------------------------------------------------------------------------- client <-> node


@message(40)
@dataclass(frozen=True, slots=True)
class JoinGroup:
    req_id: int
    group: str
    member_id: str
    topics: list              # [topic, ...]
    session_timeout_ms: int
    static: bool
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "group": B.GROUP, "member_id": B.MEMBER, "topics": B.list_of(1_000, B.TOPIC),
              "session_timeout_ms": B.DURATION_MS, "static": B.boolean}


@message(41)
@dataclass(frozen=True, slots=True)
class GroupHeartbeat:
    req_id: int
    group: str
    member_id: str
    generation: int
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "group": B.GROUP, "member_id": B.MEMBER, "generation": GENERATION}


@message(42)
@dataclass(frozen=True, slots=True)
class LeaveGroup:
    req_id: int
    group: str
    member_id: str
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "group": B.GROUP, "member_id": B.MEMBER}


@message(43)
@dataclass(frozen=True, slots=True)
class GroupReply:
    """The member's generation and the partitions it holds in it: [[topic, partition], ...]."""
    req_id: int
    group: str
    member_id: str
    generation: int
    partitions: list
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "group": B.GROUP, "member_id": B.MEMBER, "generation": GENERATION,
              "partitions": B.list_of(B.LIST_ITEMS_MAX, B.tuple_of(B.TOPIC, B.PARTITION))}


@message(44)
@dataclass(frozen=True, slots=True)
class Lease:
    """Lease up to `max_messages` deliverable messages of a partition (to its leader).

    `start` says where a group with no state for this partition begins: "earliest", "latest",
    or a time in ms."""
    req_id: int
    group: str
    member_id: str
    generation: int
    topic: str
    partition: int
    max_messages: int
    lease_ms: int
    max_wait_ms: int
    start: str | int
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "group": B.GROUP, "member_id": B.MEMBER, "generation": GENERATION, "topic": B.TOPIC,
              "partition": B.PARTITION, "max_messages": B.int_range(0, B.COUNT_MAX), "lease_ms": B.DURATION_MS,
              "max_wait_ms": B.DURATION_MS, "start": START}


@message(45)
@dataclass(frozen=True, slots=True)
class LeaseReply:
    """`deliveries` is flat: [offset, attempt, offset, attempt, ...]; the stored batches holding
    those offsets follow as payload frames (a batch may hold other offsets too: skip them)."""
    req_id: int
    reset_epoch: int
    deliveries: list
    high_watermark: int
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "reset_epoch": B.int_range(0, B.SEQ_MAX), "deliveries": B.list_of(2 * B.LIST_ITEMS_MAX),
              "high_watermark": B.OFFSET}


@message(46)
@dataclass(frozen=True, slots=True)
class Ack:
    """Settle deliveries of one partition: `acked` [offset, ...], `nacks` [[offset, attempt,
    delay_ms|null, reason], ...], `extends` [[offset, lease_ms], ...]; all under `reset_epoch`."""
    req_id: int
    group: str
    member_id: str
    generation: int
    topic: str
    partition: int
    reset_epoch: int
    acked: list
    nacks: list
    extends: list
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "group": B.GROUP, "member_id": B.MEMBER, "generation": GENERATION, "topic": B.TOPIC,
              "partition": B.PARTITION, "reset_epoch": B.int_range(0, B.SEQ_MAX),
              "acked": B.list_of(B.LIST_ITEMS_MAX, B.OFFSET),
              # delays and leases: the node clamps them to its own bounds; a reason is cut to reason_chars_max
              "nacks": B.list_of(B.LIST_ITEMS_MAX, B.tuple_of(B.OFFSET, B.int_range(0, B.U32_MAX),
                                                            B.optional(B.TIME_MS), B.text(DEFAULT.header_bytes_max))),
              "extends": B.list_of(B.LIST_ITEMS_MAX, B.tuple_of(B.OFFSET, B.TIME_MS))}


@message(47, node_only="forwarded")
@dataclass(frozen=True, slots=True)
class ResetGroup:
    """Move a group to an offset, a time or the earliest offset, on one partition or every one.

    Exactly one of `to_offset`, `to_time_ms`, `earliest` is given. `forwarded` is set by the node
    that passes the request on to a partition's leader, which never forwards it again."""
    req_id: int
    group: str
    topic: str
    partition: int | None
    to_offset: int | None
    to_time_ms: int | None
    earliest: bool
    forwarded: bool
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "group": B.GROUP, "topic": B.TOPIC, "partition": B.optional(B.PARTITION),
              "to_offset": B.optional(B.OFFSET), "to_time_ms": B.optional(B.TIME_MS), "earliest": B.boolean,
              "forwarded": B.boolean}


@message(48)
@dataclass(frozen=True, slots=True)
class DescribeGroups:
    """-> OkReply{"groups": [...]}, the document of `zq groups --json`."""
    req_id: int
    group: str | None
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "group": B.optional(B.GROUP)}


# ---------------------------------------------------------------------------- node <-> node


@message(50, node_only=True)
@dataclass(frozen=True, slots=True)
class GroupGossip:
    """One-way: the sender's copies of group memberships: `groups` [name, ...], each copy
    (CBOR of GroupMembership.to_dict) a payload frame, so that a large group fits."""
    req_id: int
    sender: str
    groups: list
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "sender": B.NODE, "groups": B.list_of(B.LIST_ITEMS_MAX, B.GROUP)}


@message(51, node_only=True)
@dataclass(frozen=True, slots=True)
class GroupStateGossip:
    """One-way, from a partition's leader to its other replicas: `items` [[group, topic_id,
    partition, dead_lettered, version], ...], each item's DeliveryState (CBOR of to_dict) a payload
    frame. `boot` non-zero: acknowledge each item's version with a `GroupStateAck` naming `boot`
    once the merged copy is on disk (a redelivery waits for a majority to hold its failure)."""
    req_id: int
    sender: str
    boot: int
    items: list
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "sender": B.NODE, "boot": B.int_range(0, B.SEQ_MAX),
              "items": B.list_of(B.LIST_ITEMS_MAX, B.tuple_of(B.GROUP, B.TOPIC_ID, B.PARTITION, B.int_range(0, B.OFFSET_MAX),
                                                             B.int_range(0, B.SEQ_MAX)))}


@message(54, node_only=True)
@dataclass(frozen=True, slots=True)
class GroupStateAck:
    """One-way, from a replica to the partition leader that sent a `GroupStateGossip` with `boot`:
    `items` [[group, topic_id, partition, version], ...] are held on the replica's disk."""
    req_id: int
    sender: str
    boot: int
    items: list
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "sender": B.NODE, "boot": B.int_range(0, B.SEQ_MAX),
              "items": B.list_of(B.LIST_ITEMS_MAX, B.tuple_of(B.GROUP, B.TOPIC_ID, B.PARTITION, B.int_range(0, B.SEQ_MAX)))}


@message(55, node_only=True)
@dataclass(frozen=True, slots=True)
class GroupStatePull:
    """A new leader of a partition asks a replica for its copies of every group's delivery state
    of that partition, groups after `after` in name order (None: from the first)."""
    req_id: int
    sender: str
    topic_id: int
    partition: int
    after: str | None
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "sender": B.NODE, "topic_id": B.TOPIC_ID, "partition": B.PARTITION,
              "after": B.optional(B.GROUP)}


@message(56, node_only=True)
@dataclass(frozen=True, slots=True)
class GroupStatePulled:
    """The answer to `GroupStatePull`: `items` [[group, dead_lettered], ...] in name order, each
    DeliveryState a payload frame; `more`: ask again after the last group for the rest."""
    req_id: int
    sender: str
    items: list
    more: bool
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "sender": B.NODE,
              "items": B.list_of(B.LIST_ITEMS_MAX, B.tuple_of(B.GROUP, B.int_range(0, B.OFFSET_MAX))), "more": B.boolean}


@message(52, node_only=True)
@dataclass(frozen=True, slots=True)
class LocalGroupsRequest:
    req_id: int
    group: str | None
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "group": B.optional(B.GROUP)}


@message(53, node_only=True)
@dataclass(frozen=True, slots=True)
class LocalGroupsReply:
    """Rows of the partitions the sender leads: [{"group", "topic", "partition", "committed",
    "lag", "lag_seconds", "in_flight", "retrying", "dead_lettered", "epoch"}, ...]."""
    req_id: int
    node: str
    rows: list
    CODE: ClassVar[int]
    BOUNDS = {"req_id": B.REQ_ID, "node": B.NODE, "rows": B.list_of(B.LIST_ITEMS_MAX)}
