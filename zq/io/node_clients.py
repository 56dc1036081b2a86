"""Produce, fetch and list-offsets: where a client's request meets a partition's leader, and
fetches parked until data arrives (long-poll), with what a client that does not read makes us hold.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

import zmq

from zq import batch as zbatch
from zq import protocol as P
from zq.core import metadata as meta
from zq.core.repl_types import BACKPRESSURE, COMMITTED, DUPLICATE_SEQUENCE, LEADER, NOT_LEADER, OUT_OF_ORDER, Outcome
from zq.errors import (Backpressure, InvalidRequest, LeaderNotAvailable, NotLeader, OffsetOutOfRange,
                       OutOfOrderSequence, PartitionFenced, ProtocolError, StorageFull, UnknownPartition, ZqError)
from zq.io import replicas as R
from zq.node.replicas import Part as _Part
from zq.types import META_TOPIC, META_TP, TopicPartition
from zq.io.node_common import FETCH_PENDING_SWEEP_MS, _Parked, mono_ms


class ClientsMixin:
    """Part of zq.io.node.Node (a mixin: the state it uses is set up in Node.__init__)."""

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

    def _local_leader(self, topic: str, partition: int) -> tuple[TopicPartition, _Part]:
        tp, _ = self._topic_partition(topic, partition)
        part = self.parts.get(tp)
        if tp in self.fenced:
            raise PartitionFenced(f"{topic}/{partition} is fenced on node {self.name} after an internal error "
                                  "(its log says which); retry, and check that node's log", node=self.name)
        if part is not None and part.replica is not None and part.replica.role == LEADER:
            return tp, part
        raise self._not_leader(self.leader_of(tp)[0], f"{topic}/{partition}")

    def _not_leader(self, leader: str | None, what: str) -> ZqError:
        if leader is None or leader == self.name:
            return LeaderNotAvailable(f"{what} has no leader right now (an election is under way); retry shortly")
        address = self.addresses.get(leader, "")
        return NotLeader(f"{self.name} does not lead {what}; {leader} ({address or 'address unknown'}) does",
                         leader=leader, address=address)

    def on_produce(self, identity: bytes, msg: P.Produce, payload: list[bytes]) -> None:
        self.counters["produce_requests"] += 1
        if len(payload) != 1:
            raise ProtocolError(f"Produce carries one payload frame (the batch), got {len(payload)}")
        if msg.topic == META_TOPIC:
            raise InvalidRequest(f"{META_TOPIC} is written by zq itself, not by producers")
        tp, part = self._local_leader(msg.topic, msg.partition)
        if self.disk_full:
            raise StorageFull(f"{self.name} has less than {self.config.disk_free_bytes_min // (1024 * 1024)} MiB "
                              "of disk free; free space or add nodes; nothing was written")
        blob = payload[0]
        try:
            # The whole batch, records included, before it is proposed: one stored bad batch would stop
            # every consumer of the partition at its offset.
            zbatch.check_incoming(blob, msg.blob_crc, msg.count, self.limits.batch_bytes_max,
                                  self.limits.batch_records_max, msg.flags, msg.producer_id, msg.base_sequence,
                                  self.limits.batch_decoded_bytes_max)
        except ZqError:
            self.counters["produce_batches_refused"] += 1
            raise
        append_time = self._append_time(part)
        placeholder = zbatch.make_stored(msg.flags | zbatch.FLAG_VERIFIED, 0, msg.count, 0, append_time, msg.producer_id,
                                         msg.base_sequence, msg.blob_crc, blob)
        self._propose(part, msg.count, msg.producer_id, msg.base_sequence, placeholder,
                      None if msg.acks == 0 else lambda o: self._answer_produce(identity, msg, part, append_time, o),
                      leader_ack=msg.acks == 1)
        self.counters["produced_records"] += msg.count
        self.counters["produced_bytes"] += len(blob)

    def _propose(self, part: _Part, count: int, producer_id: int, base_sequence: int, stored: bytes,
                 callback: Callable[[Any], None] | None, leader_ack: bool = False) -> None:
        replica = part.replica
        pid, seq = R.core_producer(producer_id, base_sequence)
        before = replica.log_end
        proposal = replica.propose(count, pid, seq, stored)
        self.dirty.add(part.tp)
        if callback is None:
            return
        if leader_ack and replica.log_end > before:
            # acks=leader: answer once this node holds the batch durably, not when a majority does.
            done = Outcome(proposal, COMMITTED, before, replica.epoch, self.name)
            part.leader_acks.append((replica.log_end, lambda error: callback(error or done)))
        else:
            part.waiters[proposal] = callback

    def _answer_produce(self, identity: bytes, msg: P.Produce, part: _Part, append_time: int, outcome: Any) -> None:
        if isinstance(outcome, ZqError):
            self._send(identity, P.encode(P.error_reply(msg.req_id, outcome)))
        elif outcome.status == COMMITTED:
            self._send(identity, P.encode(P.ProduceReply(msg.req_id, outcome.base_offset, outcome.epoch, append_time,
                                                         part.log_start)))
        else:
            self._send(identity, P.encode(P.error_reply(msg.req_id, self._outcome_error(part, outcome))))

    def _outcome_error(self, part: _Part, outcome: Outcome) -> ZqError:
        what = f"{part.name}/{part.tp.partition}"
        if outcome.status == NOT_LEADER:
            return self._not_leader(outcome.leader_hint, what)
        if outcome.status == BACKPRESSURE:
            return Backpressure(f"{what} has too many writes waiting for replication; retry shortly")
        if outcome.status == OUT_OF_ORDER:
            return OutOfOrderSequence(f"the idempotent producer skipped sequence numbers on {what}; "
                                      "batches were lost in between: restart the producer")
        if outcome.status == DUPLICATE_SEQUENCE:
            return OutOfOrderSequence(f"the idempotent producer resent an old batch on {what}; it was written before")
        return ZqError(f"unexpected outcome {outcome.status} on {what}")

    def on_fetch(self, identity: bytes, msg: P.Fetch, payload: list[bytes]) -> None:
        self.counters["fetch_requests"] += 1
        if msg.topic == META_TOPIC and msg.replica:
            self._heard(msg.replica)
        tp, part = self._local_leader(msg.topic, msg.partition)
        hw = part.high_watermark
        if msg.offset < part.log_start or msg.offset > hw:
            raise OffsetOutOfRange(
                f"offset {msg.offset} is outside the retained range [{part.log_start}, {hw}] of "
                f"{msg.topic}/{msg.partition}; read from earliest or latest", log_start=part.log_start,
                high_watermark=hw)
        self._check_fetch_pending(identity, f"{msg.topic}/{msg.partition}")
        earlier = self.parked_by_client.get((identity, tp))
        if earlier is not None:
            # One long-poll per client and partition: the earlier one is answered now (with what
            # there is), so a client cannot park fetches without bound.
            self._unpark(earlier)
            self._reply_fetch(earlier.identity, earlier.msg, tp, part)
        if msg.offset < hw or msg.max_wait_ms <= 0 or self.parked_count >= self.limits.pending_fetches_max:
            self._reply_fetch(identity, msg, tp, part)
            return
        wait_ms = min(msg.max_wait_ms, self.limits.fetch_wait_ms_max)
        parked = _Parked(mono_ms() + wait_ms, identity, msg, tp)
        self.parked[tp].append(parked)
        self.parked_by_client[(identity, tp)] = parked
        self.parked_count += 1
        self._at(parked.deadline_ms, lambda: self._expire_parked(parked))

    def _check_fetch_pending(self, identity: bytes, what: str) -> None:
        """A client whose earlier fetch replies still wait in this node to be written (it does not
        read them) is slowed down: Backpressure until ZeroMQ has written them out."""
        self._strike_written(identity)
        lim = self.limits
        if (self.fetch_pending_bytes.get(identity, 0) > lim.fetch_client_pending_bytes_max
                or len(self.fetch_pending.get(identity, ())) > lim.fetch_client_pending_replies_max
                or self.fetch_pending_total > lim.fetch_pending_bytes_max):
            self.counters["fetches_backpressured"] += 1
            raise Backpressure(f"fetch replies to this client are not being read ({what}); "
                               "read the replies already sent, then fetch again")

    def _strike_written(self, identity: bytes) -> None:
        """Forget the fetch replies to `identity` that ZeroMQ has written out (in order: one pipe)."""
        queue = self.fetch_pending.get(identity)
        if queue is None:
            return
        while queue and queue[0][0].done:
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
        """Send a fetch reply whose last frame is tracked (never copied: libzmq marks it done once
        it has written it, and so the whole message, to the socket), and charge its bytes to the client."""
        tail = zmq.Frame(frames[-1], track=True, copy=False)
        try:
            self.router.send_multipart([identity, *frames[:-1]], zmq.NOBLOCK | zmq.SNDMORE)
            tracker = self.router.send(tail, zmq.NOBLOCK, copy=False, track=True)
        except zmq.ZMQError:
            self.counters["replies_dropped"] += 1
            return
        self.fetch_pending.setdefault(identity, deque()).append((tracker, size))
        self.fetch_pending_bytes[identity] = self.fetch_pending_bytes.get(identity, 0) + size
        self.fetch_pending_total += size

    def _unpark(self, parked: _Parked) -> None:
        parked.done = True
        self.parked_count -= 1
        key = (parked.identity, parked.tp)
        if self.parked_by_client.get(key) is parked:
            del self.parked_by_client[key]
        lst = self.parked.get(parked.tp)
        if lst is not None and parked in lst:
            lst.remove(parked)

    def _reply_fetch(self, identity: bytes, msg: P.Fetch, tp: TopicPartition, part: _Part) -> None:
        values: list[bytes] = []
        hw = part.high_watermark
        if msg.offset < hw:
            max_bytes = max(1, min(msg.max_bytes, self.limits.fetch_bytes_max))
            values = self.store.read(tp, msg.offset, max_bytes, upto=hw)
            del values[self.limits.frames_per_message_max - 2:]   # a reply must stay decodable
        self.counters["fetched_batches"] += len(values)
        frames = P.encode(P.FetchReply(msg.req_id, hw, part.log_start, part.log_end), *values)
        if values:
            self._send_fetch_reply(identity, frames, sum(len(v) for v in values))
        else:
            self._send(identity, frames)

    def _serve_parked(self, tp: TopicPartition) -> None:
        waiting = self.parked.pop(tp, None)
        if not waiting:
            return
        part = self.parts.get(tp)
        for parked in waiting:
            if parked.done:
                continue
            self._unpark(parked)
            if part is not None:
                self._reply_fetch(parked.identity, parked.msg, tp, part)

    def _refuse_parked(self, tp: TopicPartition, error: ZqError | None = None) -> None:
        """This node stopped leading `tp` (or holds it no more): waiting fetches learn where to go
        instead, or `error`."""
        waiting = self.parked.pop(tp, None)
        for parked in waiting or ():
            if not parked.done:
                self._unpark(parked)
                why = error or self._not_leader(self.leader_of(tp)[0], f"{parked.msg.topic}/{parked.msg.partition}")
                self._send(parked.identity, P.encode(P.error_reply(parked.msg.req_id, why)))

    def _expire_parked(self, parked: _Parked) -> None:
        if parked.done:
            return
        self._unpark(parked)
        part = self.parts.get(parked.tp)
        if part is not None:
            self._reply_fetch(parked.identity, parked.msg, parked.tp, part)

    def on_list_offsets(self, identity: bytes, msg: P.ListOffsets, payload: list[bytes]) -> None:
        tp, part = self._local_leader(msg.topic, msg.partition)
        hw = part.high_watermark
        if msg.spec == "earliest":
            offset = part.log_start
        elif msg.spec == "latest":
            offset = hw
        elif isinstance(msg.spec, int):
            found = self.store.offset_for_time(tp, msg.spec)
            offset = hw if found is None else min(max(found, part.log_start), hw)
        else:
            raise InvalidRequest(f"offset spec must be 'earliest', 'latest' or a time in ms, got {msg.spec!r}")
        self._send(identity, P.encode(P.OffsetsReply(msg.req_id, offset, part.log_start, hw)))
