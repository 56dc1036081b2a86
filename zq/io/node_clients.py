"""Produce, fetch and list-offsets on the real node: a thin shell around the client room
(zq.node.clients, which the cluster simulator runs too). This module finds partitions and their
leaders in the node's metadata, reads the RocksDB store, and sends the room's replies on the
ROUTER; fetch replies are tracked, so that what a client that does not read makes us hold is
known (`fetch_backlog`) and bounded by the room. Replies to one client leave through one pipe, in
order, so one tracked reply written out means every reply before it is: a large reply is always
tracked (its last frame sent without a copy), a small one only one time in `FETCH_TRACK_EVERY`
(a tracked send costs libzmq's zero-copy path and pyzmq's garbage-collector thread, ~40 us of CPU
against ~17 us for a copied one). The small untracked replies after a client's last tracked one
stay charged until a later tracked one is written: fewer than `FETCH_TRACK_EVERY` replies below
`FETCH_TRACK_BYTES_MIN` each, so under 1 MiB per client, far below its bound.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import zmq

from zq import protocol as P
from zq.core import metadata as meta
from zq.errors import UnknownPartition, ZqError
from zq.node.clients import Clients
from zq.node.replicas import Part as _Part
from zq.types import META_TOPIC, META_TP, TopicPartition
from zq.io.node_common import FETCH_PENDING_SWEEP_MS, FETCH_TRACK_BYTES_MIN, FETCH_TRACK_EVERY, mono_ms

if TYPE_CHECKING:
    from zq.io.node import Node


class _NodeClientHost:
    """The real node as the client room's host (zq.node.host.ClientHost)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.name = node.name
        self.counters = node.counters
        self.limits = node.limits

    def resolve(self, topic: str, partition: int) -> TopicPartition:
        return self.node._topic_partition(topic, partition)[0]

    def leader_of(self, tp: TopicPartition) -> tuple[str | None, int]:
        return self.node.leader_of(tp)

    def address_of(self, name: str) -> str:
        return self.node.addresses.get(name, "")

    def storage_full(self) -> str | None:
        if not self.node.disk_full:
            return None
        return f"less than {self.node.config.disk_free_bytes_min // (1024 * 1024)} MiB of disk free"

    def read(self, tp: TopicPartition, offset: int, max_bytes: int, upto: int) -> tuple[list[bytes], int]:
        values = self.node.store.read(tp, offset, max_bytes, upto=upto)
        return values, sum(map(len, values))

    def offset_for_time(self, tp: TopicPartition, time_ms: int) -> int | None:
        return self.node.store.offset_for_time(tp, time_ms)

    def reply(self, identity: bytes, msg: Any, *frames: bytes) -> None:
        self.node._send(identity, P.encode(msg, *frames))

    def reply_error(self, identity: bytes, req_id: int, error: ZqError) -> None:
        self.node._send(identity, P.encode(P.error_reply(req_id, error)))

    def reply_fetch(self, identity: bytes, msg: P.FetchReply | P.FetchManyReply, values: list[bytes]) -> None:
        frames = P.encode(msg, *values)
        if values:
            self.node._send_fetch_reply(identity, frames, sum(len(v) for v in values))
        else:
            self.node._send(identity, frames)

    def fetch_backlog(self, identity: bytes) -> tuple[int, int, int]:
        node = self.node
        node._strike_written(identity)
        return (len(node.fetch_pending.get(identity, ())), node.fetch_pending_bytes.get(identity, 0),
                node.fetch_pending_total)

    def now_ms(self) -> int:
        return mono_ms()

    def wall_ms(self) -> int:
        return self.node._wall_clock()

    def at(self, when_ms: int, fn: Callable[[], None]) -> None:
        self.node._at(when_ms, fn)


class ClientsMixin:
    """Part of zq.io.node.Node (a mixin: the state it uses is set up in Node.__init__)."""

    parked_count = property(lambda self: self.clients.parked_count)   # long-polls waiting (metrics)

    def _make_clients(self) -> Clients:
        return Clients(_NodeClientHost(self), self.replica_set)

    def _topic_partition(self, topic: str, partition: int) -> tuple[TopicPartition, meta.TopicMeta | None]:
        if topic == META_TOPIC:
            if partition != 0:
                raise UnknownPartition(f"{META_TOPIC} has one partition, 0")
            return META_TP, None
        t = self.meta.topic(topic)
        if not 0 <= partition < len(t.partitions):
            raise UnknownPartition(f"topic {topic!r} has partitions 0 to {len(t.partitions) - 1}, not {partition}",
                                   topic=topic, partition=partition)
        return TopicPartition(t.id, partition), t

    def leader_of(self, tp: TopicPartition) -> tuple[str | None, int]:
        """Who leads a partition as far as this node knows, and in which epoch."""
        part = self.parts.get(tp)
        if part is not None and part.replica is not None and part.replica.leader is not None:
            return part.replica.leader, part.replica.epoch
        seen = self.leader_view.get(tp)
        if seen is not None and self._alive(seen[0]):
            return seen
        if tp == META_TP:
            return (self.voters[0] if self.voters else None), 0
        t = self.meta.topics_by_id.get(tp.topic_id)
        return (t.partitions[tp.partition][0] if t else None), 0

    # The room's rules, as the node's other rooms and services call them.

    def _local_leader(self, topic: str, partition: int) -> tuple[TopicPartition, _Part]:
        return self.clients.local_leader(topic, partition)

    def _not_leader(self, leader: str | None, what: str) -> ZqError:
        return self.clients.not_leader(leader, what)

    def _propose(self, part: _Part, count: int, producer_id: int, base_sequence: int, stored: bytes,
                 callback: Callable[[Any], None] | None, leader_ack: bool = False) -> None:
        self.clients.propose(part, count, producer_id, base_sequence, stored, callback, leader_ack)

    def _append_time(self, part: _Part) -> int:
        return self.clients.append_time(part)

    def _outcome_error(self, part: _Part, outcome: Any) -> ZqError:
        return self.clients.outcome_error(part, outcome)

    def _refuse_parked(self, tp: TopicPartition, error: ZqError | None = None) -> None:
        self.clients.refuse_parked(tp, error)

    # Handlers: decoded requests in, the room's replies out.

    def on_produce(self, identity: bytes, msg: P.Produce, payload: list[bytes]) -> None:
        self.clients.on_produce(identity, msg, payload)

    def on_fetch(self, identity: bytes, msg: P.Fetch, payload: list[bytes]) -> None:
        if msg.topic == META_TOPIC and msg.replica:
            self._heard(msg.replica)
        self.clients.on_fetch(identity, msg)

    def on_fetch_many(self, identity: bytes, msg: P.FetchMany, payload: list[bytes]) -> None:
        self.clients.on_fetch_many(identity, msg)

    def on_list_offsets(self, identity: bytes, msg: P.ListOffsets, payload: list[bytes]) -> None:
        self.clients.on_list_offsets(identity, msg)

    # What a client that does not read makes us hold.

    def _strike_written(self, identity: bytes) -> None:
        """Forget the fetch replies to `identity` that ZeroMQ has written out: those up to its
        latest tracked reply that is done (in order: one pipe, so the untracked ones before it
        were written first)."""
        queue = self.fetch_pending.get(identity)
        if queue is None:
            return
        written = 0
        for i, (tracker, _) in enumerate(queue):
            if tracker is None:
                continue
            if not tracker.done:
                break
            written = i + 1
        for _ in range(written):
            _, size = queue.popleft()
            self.fetch_pending_bytes[identity] -= size
            self.fetch_pending_total -= size
        if not queue:
            del self.fetch_pending[identity]
            del self.fetch_pending_bytes[identity]

    def _sweep_fetch_pending(self) -> None:
        for identity in list(self.fetch_pending):
            self._strike_written(identity)
        self._at(mono_ms() + FETCH_PENDING_SWEEP_MS, self._sweep_fetch_pending)

    def _send_fetch_reply(self, identity: bytes, frames: list[bytes], size: int) -> None:
        """Send a fetch reply and charge its bytes to the client; tracked (its last frame never
        copied: libzmq marks it done once it has written it, and so the whole message) when large
        or when it is the client's `FETCH_TRACK_EVERY`-th untracked one (see the module's text)."""
        queue = self.fetch_pending.get(identity)
        untracked = 0
        if queue is not None:
            for tracker, _ in reversed(queue):
                if tracker is not None:
                    break
                untracked += 1
        try:
            if size >= FETCH_TRACK_BYTES_MIN or untracked + 1 >= FETCH_TRACK_EVERY:
                tail = zmq.Frame(frames[-1], track=True, copy=False)
                self.router.send_multipart([identity, *frames[:-1]], zmq.NOBLOCK | zmq.SNDMORE)
                tracker = self.router.send(tail, zmq.NOBLOCK, copy=False, track=True)
            else:
                self.router.send_multipart([identity, *frames], zmq.NOBLOCK)
                tracker = None
        except zmq.ZMQError:
            self.counters["replies_dropped"] += 1
            return
        if queue is None:
            queue = self.fetch_pending[identity] = deque()
        queue.append((tracker, size))
        self.fetch_pending_bytes[identity] = self.fetch_pending_bytes.get(identity, 0) + size
        self.fetch_pending_total += size
