"""Errors users see. Every error says what went wrong and what to do about it.

`retriable` is a class attribute: True means the same request may succeed if sent again (after
refreshing metadata, or after waiting). `Rejected` and its subclasses mean the request was refused
and nothing was written. `Timeout` and `ConnectionFailed` mean the outcome is unknown.

Each error has a `code`, the string that travels on the wire in an error reply, so that a client
raises the same class the node meant. What an error says besides its message travels as its `data`
map (the wire form); the errors that carry such fields read them through typed properties
(`NotLeader.address`, `OffsetOutOfRange.log_start`, ...), which are None when the field is absent
or of the wrong type: a reply comes from a peer, so its fields are checked, never trusted.
"""
from __future__ import annotations

from typing import Any


class ZqError(Exception):
    """Base of every zq error."""

    code = "error"
    retriable = False

    def __init__(self, message: str = "", **data: Any) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        self.data = data

    def _field(self, name: str, kind: type) -> Any:
        """data[name] if it is exactly of `kind` (a bool is no int) and not empty; else None."""
        value = self.data.get(name)
        return value if type(value) is kind and value != "" else None

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__.get("data", {})
        if name in data:
            return data[name]
        raise AttributeError(name)


class ProtocolError(ZqError):
    """A peer sent a frame that does not follow the zq protocol."""

    code = "protocol_error"


class Rejected(ZqError):
    """The request was refused and nothing was written."""

    code = "rejected"


class UnknownTopic(Rejected):
    """The topic does not exist: create it with `zq topic create NAME`, or check the name."""

    code = "unknown_topic"
    retriable = True  # metadata may still be spreading right after a create


class UnknownPartition(Rejected):
    """The partition does not exist in this topic."""

    code = "unknown_partition"


class TopicExists(Rejected):
    """A topic of that name exists already."""

    code = "topic_exists"


class InvalidRequest(Rejected):
    """The request is not valid: the message says which part."""

    code = "invalid_request"


class MessageTooLarge(Rejected):
    """The message or batch is larger than the cluster accepts."""

    code = "message_too_large"


class OffsetOutOfRange(Rejected):
    """The offset is outside the partition's retained range."""

    code = "offset_out_of_range"

    @property
    def log_start(self) -> int | None:
        """The partition's first retained offset, as the node said it."""
        return self._field("log_start", int)

    @property
    def high_watermark(self) -> int | None:
        """The partition's high watermark (the offset after its last committed record), as the node said it."""
        return self._field("high_watermark", int)


class NotEnoughReplicas(Rejected):
    """There are fewer live nodes than the replication factor asks for."""

    code = "not_enough_replicas"
    retriable = True


class NotAuthorised(Rejected):
    """The client's key is not allowed by this cluster."""

    code = "not_authorised"


class UnsupportedVersion(Rejected):
    """The peer speaks another version of the zq protocol: upgrade the older side."""

    code = "unsupported_version"


class StorageFull(Rejected):
    """The node's disk is full: free space or add nodes; nothing was written."""

    code = "storage_full"
    retriable = True


class OutOfOrderSequence(Rejected):
    """An idempotent producer's batch skipped a sequence number: it must be restarted."""

    code = "out_of_order_sequence"


class CorruptData(ZqError):
    """Stored data failed its checksum."""

    code = "corrupt_data"


class NotLeader(ZqError):
    """This node does not lead the partition; the client refreshes metadata and retries."""

    code = "not_leader"
    retriable = True

    @property
    def leader(self) -> str | None:
        """The name of the node the refusing node believes leads the partition; None: unknown."""
        return self._field("leader", str)

    @property
    def address(self) -> str | None:
        """That leader's client address (host:port); None: unknown."""
        return self._field("address", str)

    @property
    def epoch(self) -> int | None:
        """The leader's epoch, if the node said it."""
        return self._field("epoch", int)


class LeaderNotAvailable(ZqError):
    """The partition has no leader right now (election in progress); retry shortly."""

    code = "leader_not_available"
    retriable = True


class Backpressure(ZqError):
    """The partition has too many writes waiting; the producer slows down and retries."""

    code = "backpressure"
    retriable = True


class Timeout(ZqError):
    """No answer in time: the outcome is unknown."""

    code = "timeout"
    retriable = True


class ConnectionFailed(ZqError):
    """Could not reach any node of the cluster."""

    code = "connection_failed"
    retriable = True


class ProducerClosed(ZqError):
    """The producer was closed; create a new one."""

    code = "producer_closed"


class BufferFull(ZqError):
    """The producer's buffer stayed full for longer than `max_block_ms`: the cluster is slower than the producer."""

    code = "buffer_full"
    retriable = True


class TopologyError(ZqError):
    """The topology file is not valid."""

    code = "topology_error"


class Fenced(Rejected):
    """The request came from a member of an older group generation or a stale leader."""

    code = "fenced"

    @property
    def generation(self) -> int | None:
        """The group's current generation, if the node said it (join again to reach it)."""
        return self._field("generation", int)


class PartitionFenced(ZqError):
    """The node set this partition aside after an internal error (its log says which); the
    partition's other replicas take over its leadership. Retry; restart the node to recover it."""

    code = "partition_fenced"
    retriable = True

    @property
    def node(self) -> str | None:
        """The node that set the partition aside."""
        return self._field("node", str)


class RebalanceInProgress(ZqError):
    """The group's membership is changing and this node has not caught up yet; retry shortly."""

    code = "rebalance_in_progress"
    retriable = True


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


ERRORS_BY_CODE: dict[str, type[ZqError]] = {c.code: c for c in [ZqError, *_all_subclasses(ZqError)]}


def from_wire(code: str, message: str, data: dict | None = None) -> ZqError:
    """The error a client raises for an error reply from a node."""
    cls = ERRORS_BY_CODE.get(code, ZqError)
    return cls(message, **(data or {}))
