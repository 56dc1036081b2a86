"""The group consumer: a member of a consumer group, and the group admin calls (describe, reset,
dead letters).

Theory of operation
-------------------
The member's rules (joining, heartbeats, which partitions to lease and how much, retries and
their backoff, ack batching, reset epochs, Fenced and NotLeader handling) are the pure core
`zq.core.consumer_rules.GroupConsumerCore`, whose docstring tells them; this module is its I/O
shell. Every core call is made under `_lock`. The client's I/O thread runs `_pump`: it takes the
core's due effects (`poll`), sends the requests, hands each answer back to the core, and sleeps
until the core's next due time. The caller's thread settles messages (`ack`/`nack`/`extend` only
queue them in the core: no round trip) and takes the leased chunks from the core's queue,
decoding their stored batches itself into `GroupMessage`s, each with its attempt number.
`commit()` flushes what waits now and waits for the answers.

`seek` and `seek_to_time` send `ResetGroup` for the partitions this member holds: the leaders
open a new reset epoch, acks of the older epoch are ignored, and messages of the older epoch
still queued here are dropped. `close()` flushes acks, then leaves the group, so its partitions
move at once.

One thread at a time may call poll/iterate/seek/commit; ack/nack/extend may come from any thread.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from datetime import datetime
from typing import TYPE_CHECKING, Any

from zq import batch as zbatch
from zq import group_protocol as G
from zq import protocol
from zq.client.consumer import Message, ReadyQueue
from zq.client.metadata import time_spec
from zq.core import consumer_rules as R
from zq.errors import InvalidRequest, NotLeader, ProtocolError, ZqError

if TYPE_CHECKING:
    from zq.client.client import Client

log = logging.getLogger("zq.client")

default_session_timeout_ms = 10_000
default_lease_ms = 30_000
default_max_in_flight = 5_000      # messages leased and not yet settled, per consumer
default_max_wait_ms = 500
commit_wait_s = 10.0
close_leave_timeout_ms = 2_000


class GroupMessage(Message):
    """A message delivered to a group member: `ack()`, `nack()` and `extend()` settle it."""

    __slots__ = ("_consumer", "_epoch", "_settled")

    def __init__(self, consumer: GroupConsumer, epoch: int, topic: str, partition: int, offset: int,
                 key: bytes | None, value: bytes, headers: dict | None, timestamp: int, attempt: int) -> None:
        Message.__init__(self, topic, partition, offset, key, value, headers, timestamp, attempt)
        self._consumer = consumer
        self._epoch = epoch
        self._settled = False

    def ack(self) -> None:
        """The message was handled: it will not be delivered again (acks are sent in batches)."""
        if not self._settled:
            self._settled = True
            self._consumer._settle(self, "ack", self.offset)

    def nack(self, delay: float | None = None, reason: str = "") -> None:
        """Handling failed: deliver it again after `delay` seconds (default: the topic's backoff).
        After the topic's `max_deliveries` failed deliveries it moves to TOPIC.dlq."""
        if not self._settled:
            self._settled = True
            delay_ms = None if delay is None else max(0, int(delay * 1000))
            self._consumer._settle(self, "nack", [self.offset, self.attempt, delay_ms, str(reason)])

    def extend(self, seconds: float) -> None:
        """Keep the lease for `seconds` more from now (long work); nothing after ack or nack."""
        if not self._settled:
            self._consumer._settle(self, "extend", [self.offset, max(1, int(seconds * 1000))])


def _now_ms() -> float:
    return time.monotonic() * 1000.0


def _refusal(error: ZqError) -> R.Refusal:
    address = error.address if isinstance(error, NotLeader) else None
    return R.Refusal(error.code, error.retriable, address if isinstance(address, str) else None, error)


class GroupConsumer(ReadyQueue):
    """Made by `Client.consumer(topic, group=...)`; see the module docstring."""

    def __init__(self, client: Client, topic: str, group: str, start: Any = None,
                 partitions: list[int] | None = None, member_id: str | None = None,
                 session_timeout_ms: int = default_session_timeout_ms, heartbeat_ms: int | None = None,
                 lease_ms: int = default_lease_ms, max_in_flight: int = default_max_in_flight,
                 max_wait_ms: int = default_max_wait_ms) -> None:
        if partitions is not None:
            raise InvalidRequest("a group member reads the partitions the group assigns it; "
                                 "leave out partitions= (or --partition) with a group")
        if not isinstance(group, str) or not group:
            raise ValueError("a group name is a non-empty string")
        if start is None:
            start = "earliest"
        if type(start) is int:
            raise ValueError("a group with nothing committed starts at 'earliest', 'latest' or a time; "
                             "use seek(partition, offset) to move it to an offset")
        self._start = time_spec(start)
        self._client = client
        self._conn = client.cluster_view.conn
        self.topic = topic
        self.undecodable_batches_skipped = 0   # stored batches whose records did not decode, stepped over
        self.group = group
        self.static = member_id is not None
        self.member_id = member_id or f"{group}-{uuid.uuid4().hex[:12]}"
        self.session_timeout_ms = int(session_timeout_ms)
        self.heartbeat_ms = int(heartbeat_ms or max(100, self.session_timeout_ms // 4))
        self.lease_ms = int(lease_ms)
        self.max_in_flight = max(1, int(max_in_flight))
        self.max_wait_ms = max(0, int(max_wait_ms))
        client.cluster_view.partitions_of(topic)   # UnknownTopic now rather than at the first lease
        # The rules, shared between threads under _lock.
        self._core = R.GroupConsumerCore(R.ConsumerConfig(
            group, topic, self.member_id, self.static, self.session_timeout_ms, self.heartbeat_ms, self.lease_ms,
            self.max_in_flight, self.max_wait_ms, client.limits.request_timeout_ms, client.limits.api_timeout_ms,
            self._start))
        self._lock = threading.Lock()
        self._arrived_cv = threading.Condition(self._lock)
        self._arrived = self._core.arrived   # the core's queue (changed in place only), read by ReadyQueue
        self._closed = False
        self.generation = 0   # the core's, copied under _lock whenever a group reply may change it
        # Caller side only.
        self._ready: collections.deque[GroupMessage] = collections.deque()
        self._positions: dict[int, int] = {}   # partition -> offset after the highest message handed out
        # A group's offsets are kept by the partition leaders, which step over offsets deleted by
        # retention themselves: a member makes no client-side resets, so this stays empty. Kept so
        # code written for a plain Consumer runs.
        self.resets: collections.deque = collections.deque(maxlen=1)
        self._decoded: dict[int, tuple[bytes, zbatch.BatchHeader, list]] = {}   # partition -> last batch decoded
        # I/O thread only.
        self._wake_at: float | None = None
        self._pumping = False
        self._pump_again = False
        self._join()

    # ------------------------------------------------------------------ the I/O thread

    def _join(self) -> None:
        """Join through the first node that answers (caller's thread), then heartbeat from the I/O thread."""
        reply, address = self._client.cluster_view.until_deadline(
            f"joining group {self.group!r}",
            lambda: self._client.cluster_view.call_any(lambda rid: G.JoinGroup(rid, self.group, self.member_id, [self.topic],
                                                                   self.session_timeout_ms, self.static),
                                           with_address=True))
        if not isinstance(reply, G.GroupReply):
            raise ProtocolError(f"expected GroupReply, got {type(reply).__name__}")
        with self._lock:   # so that assignment() and generation hold the join's answer at once
            self._core.on_joined(address, reply.generation, self._parts(reply), _now_ms())
            self.generation = self._core.generation
        self._conn.submit(self._pump)

    def _parts(self, reply: G.GroupReply) -> set[int]:
        return {p for t, p in (tuple(x) for x in reply.partitions if isinstance(x, list) and len(x) == 2)
                if t == self.topic and type(p) is int}

    def _wake(self) -> None:
        """Ask the I/O thread to poll the core now (from any thread)."""
        if not self._conn.closed:
            self._conn.submit(self._pump)

    def _pump(self) -> None:
        """Send what the core says is due, and sleep until its next due time. Not re-entered: a
        request failing at once calls back into here, which runs the loop once more instead."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                with self._lock:
                    now = _now_ms()
                    effects = self._core.poll(now, len(self._ready))
                refreshed = False
                for e in effects:
                    if isinstance(e, R.RefreshMetadata):
                        if not refreshed:
                            refreshed = True
                            self._client.cluster_view.refresh_soon()
                    elif isinstance(e, R.CommitDone):
                        e.waiter.set_result(e.errors)
                    else:
                        self._send(e)
            with self._lock:
                due = self._core.due_ms()
            if due is not None and (self._wake_at is None or due < self._wake_at):
                self._wake_at = due
                self._conn.io_call_later(max(0.0, due - _now_ms()), lambda: self._on_wake(due))
        finally:
            self._pumping = False

    def _on_wake(self, due: float) -> None:
        if self._wake_at == due:
            self._wake_at = None
        self._pump()

    def _send(self, order: Any) -> None:
        rid = self._conn.new_req_id()
        if isinstance(order, (R.JoinOrder, R.HeartbeatOrder)):
            order = dataclasses.replace(order, address=order.address or self._client.cluster_view.addresses()[0])
            if isinstance(order, R.JoinOrder):
                msg: Any = G.JoinGroup(rid, self.group, self.member_id, [self.topic], self.session_timeout_ms,
                                       self.static)
            else:
                msg = G.GroupHeartbeat(rid, self.group, self.member_id, order.generation)
            self._conn.io_request(order.address, msg, (), order.timeout_ms,
                                  lambda reply, frames, error: self._on_group_reply(order, reply, error))
            return
        p = order.partition
        address = order.address or self._client.cluster_view.leader_address(self.topic, p)
        if isinstance(order, R.LeaseOrder):
            if address is None:
                self._on_lease(order, None, [], NotLeader(f"no leader known for {self.topic}/{p}"))
                return
            msg = G.Lease(rid, self.group, self.member_id, order.generation, self.topic, p, order.max_messages,
                          self.lease_ms, self.max_wait_ms, self._start)
            self._conn.io_request(address, msg, (), order.timeout_ms,
                                  lambda reply, frames, error: self._on_lease(order, reply, frames, error))
            return
        if address is None or self._conn.closed:
            error = NotLeader(f"no leader known for {self.topic}/{p}; the acks are dropped and the messages will "
                              "be delivered again")
            self._on_ack(order, R.Refusal(error.code, not self._conn.closed, None, error))
            return
        msg = G.Ack(rid, self.group, self.member_id, order.generation, self.topic, p, order.epoch, order.acked,
                    order.nacks, order.extends)
        self._conn.io_request(address, msg, (), order.timeout_ms,
                              lambda reply, frames, error: self._on_ack(order, None if error is None else
                                                                        self._hinted(p, error)))

    def _hinted(self, p: int, error: ZqError) -> R.Refusal:
        refusal = _refusal(error)
        if refusal.address is not None:
            self._client.cluster_view.hint_leader(self.topic, p, refusal.address)
        return refusal

    def _on_group_reply(self, order: Any, reply: Any, error: ZqError | None) -> None:
        if error is None and not isinstance(reply, G.GroupReply):
            error = ProtocolError(f"expected GroupReply, got {type(reply).__name__}")
        gen, parts = (reply.generation, self._parts(reply)) if error is None else (None, None)
        with self._lock:
            before = (self._core.generation, set(self._core.assigned))
            if isinstance(order, R.JoinOrder):
                self._core.on_join_reply(order, gen, parts, None if error is None else _refusal(error), _now_ms())
            else:
                self._core.on_heartbeat_reply(order, gen, parts, None if error is None else _refusal(error),
                                              _now_ms(), self._client.cluster_view.addresses())
            after = (self._core.generation, self._core.assigned)
            self.generation = self._core.generation
        if before != after:
            log.info("group %s: member %s in generation %d holds %s", self.group, self.member_id, after[0],
                     sorted(after[1]))
        elif error is not None and isinstance(order, R.JoinOrder):
            log.info("group %s: joining again failed (%s); retrying", self.group, error)
        self._pump()

    def _on_lease(self, order: R.LeaseOrder, reply: Any, frames: list, error: ZqError | None) -> None:
        deliveries: dict[int, int] | None = None
        if error is None and not isinstance(reply, G.LeaseReply):
            error = ProtocolError(f"expected LeaseReply, got {type(reply).__name__}")
        if error is None:
            flat = reply.deliveries
            if len(flat) % 2 or not all(type(x) is int for x in flat):
                error = ProtocolError("LeaseReply.deliveries is a flat list of [offset, attempt] pairs")
            else:
                deliveries = dict(zip(flat[::2], flat[1::2]))
        if error is not None:
            log.debug("lease %s/%s: %s", self.topic, order.partition, error.code)
        with self._lock:
            self._core.on_lease_reply(order, deliveries, reply.reset_epoch if error is None else 0, frames,
                                      None if error is None else self._hinted(order.partition, error), _now_ms())
            if self._arrived:
                self._arrived_cv.notify()
        self._pump()

    def _on_ack(self, order: R.AckOrder, refusal: R.Refusal | None) -> None:
        with self._lock:
            retrying = self._core.on_ack_reply(order, refusal, _now_ms())
        if refusal is not None and not retrying:
            log.info("acks for %s/%s were not applied (%s); those messages will be delivered again",
                     self.topic, order.partition, refusal.cause.message)
        self._pump()

    # ------------------------------------------------------------------ settling

    def _settle(self, msg: GroupMessage, kind: str, item: Any) -> None:
        with self._lock:
            wake = self._core.settle(msg.partition, msg._epoch, kind, item, _now_ms(), len(self._ready))
        if wake:
            self._wake()

    def _io_flush(self, done: Future) -> None:
        with self._lock:
            self._core.flush(_now_ms(), done)
        self._pump()

    def commit(self, timeout: float = commit_wait_s) -> None:
        """Send every settled message's ack now and wait for the leaders' answers. Raises the first
        refusal (e.g. Fenced: this member lost the partition, the messages will be redelivered)."""
        done: Future = Future()
        self._conn.submit(lambda: self._io_flush(done))
        errors = done.result(timeout)
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ caller side

    def _take_chunk(self, deadline: float) -> bool:
        with self._lock:
            while True:
                now = _now_ms()
                chunk = self._core.take_chunk(now)
                due = self._core.due_ms()
                if due is not None and due <= now:
                    self._wake()   # e.g. nothing queued: partitions that waited for a larger room may lease
                if chunk is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return False
                self._arrived_cv.wait(remaining)
        if chunk.error is not None:
            raise chunk.error
        self._decode(chunk)
        return True

    def _release(self, n: int) -> None:
        """Leased messages dropped here (stale, or missing from a reply): their room is free again."""
        with self._lock:
            self._core.release(n, _now_ms())
        self._wake()

    def _decode(self, chunk: R.Chunk) -> None:
        p = chunk.partition
        # The leased offsets in order; the stored batches are walked once, beside them.
        wanted = sorted(chunk.deliveries.items())
        topic, epoch = self.topic, chunk.epoch
        out: list[GroupMessage] = []
        i, n = 0, len(wanted)
        frames = sorted(((zbatch.unpack_header(f).base_offset, f) for f in chunk.payload), key=lambda x: x[0])
        for _, frame in frames:
            h, records = self._records(p, frame)
            if records is None:
                continue   # a leader's epoch marker
            base, end = h.base_offset, h.base_offset + len(records)
            while i < n and wanted[i][0] < base:
                i += 1   # not in any batch of the reply: counted as missing below
            while i < n and wanted[i][0] < end:
                offset, attempt = wanted[i]
                ts, key, value, headers = records[offset - base]
                out.append(GroupMessage(self, epoch, topic, p, offset, key, value, headers, ts, attempt))
                i += 1
        if out:
            self._positions[p] = max(self._positions.get(p, 0), max(m.offset for m in out) + 1)
        missing = n - len(out)
        if missing:
            log.warning("%s/%s: %d leased messages were not in the reply's batches", topic, p, missing)
            self._release(missing)
        self._ready.extend(out)


    def _records(self, p: int, frame: bytes) -> tuple[zbatch.BatchHeader, list | None]:
        """The header and decoded records of one stored batch (None for a control batch, or one
        whose records do not decode).

        A stored batch (up to 512 KiB by default, thousands of records) usually holds more than
        one lease, and every lease's reply carries the whole batch again; so the last batch
        decoded per partition is kept, and a reply carrying the same bytes again (compared whole:
        cheaper than the checksum, and as strict) costs neither its checksum nor its decoding.
        Measured: 4 to 6 decodes per batch without this, the larger part of the caller's time."""
        cached = self._decoded.get(p)
        if cached is not None and cached[0] == frame:
            return cached[1], cached[2]
        h = zbatch.verify_stored(frame)
        try:
            records = zbatch.stored_records(frame, h)
        except ProtocolError as e:
            # Nodes of this version never lease an undecodable batch's offsets (they step over
            # them); an older node may. Its leased offsets go back as missing, as a marker's would.
            self.undecodable_batches_skipped += 1
            log.error("%s/%s: %s; stepped over it (%d undecodable batches skipped by this member)",
                      self.topic, p, e.message, self.undecodable_batches_skipped)
            return h, None
        if records is None:
            return h, None
        self._decoded[p] = (frame, h, records)   # one batch per partition: the bound of this cache
        return h, records

    def assignment(self) -> list[int]:
        """Partitions this member holds now."""
        with self._lock:
            return sorted(self._core.assigned)

    def caught_up(self) -> bool:
        """True when the last lease of every held partition came back empty (nothing to deliver now)."""
        parts = self.assignment()
        return bool(parts) and all(self._core.caught_up.get(p, False) for p in parts) and not self._ready \
            and not self._arrived

    def seek(self, partition: int, offset: int) -> None:
        """Move the group on `partition` to `offset` (a replay, or a skip); nothing leased before
        is delivered after it."""
        if type(offset) is not int or offset < 0:
            raise ValueError("an offset is a non-negative integer")
        self._drop_queued(reset_group(self._client, self.topic, self.group, partition=partition, to_offset=offset))

    def seek_to_time(self, when: datetime | int) -> None:
        """Move the group, on every partition, to the first message at or after `when`."""
        spec = time_spec(when)
        if not isinstance(spec, int):
            raise ValueError("seek_to_time takes a datetime or a time in ms")
        self._drop_queued(reset_group(self._client, self.topic, self.group, to_time=spec))

    def seek_to_beginning(self) -> None:
        """Move the group, on every partition, to the first message still kept."""
        self._drop_queued(reset_group(self._client, self.topic, self.group, earliest=True))

    def seek_to_end(self) -> None:
        """Move the group, on every partition, past the last message written now."""
        for p in self._client.cluster_view.partitions_of(self.topic):
            end = self._client.list_offsets(self.topic, p, "latest").offset
            self._drop_queued(reset_group(self._client, self.topic, self.group, partition=p, to_offset=end))

    def position(self, partition: int) -> int:
        """The offset after the highest message this member handed out from `partition`, or where
        its last seek moved it (a nacked or expired message may still come again, below it)."""
        if partition not in self._positions:
            raise ValueError(f"this member has no position on partition {partition} yet: it handed out nothing "
                             "from it and did not seek it")
        return self._positions[partition]

    def _drop_queued(self, reset: dict) -> None:
        """After a reset, what is queued here from before it (an older reset epoch) is dropped; the
        next leases bring the rest. Chunks of the new epoch may have arrived already, before the
        reset's own reply: those stay."""
        epochs = {row["partition"]: row.get("epoch", 0) for row in reset.get("partitions", [])}
        for row in reset.get("partitions", []):
            if type(row.get("offset")) is int:
                self._positions[row["partition"]] = row["offset"]
        with self._lock:
            self._core.on_reset(epochs, _now_ms())
        kept = collections.deque(m for m in self._ready if m.partition not in epochs or m._epoch >= epochs[m.partition])
        dropped = len(self._ready) - len(kept)
        self._ready = kept
        if dropped:
            self._release(dropped)
        self._wake()

    def close(self) -> None:
        """Send the acks that wait, leave the group (its partitions move at once), stop."""
        if self._closed:
            return
        try:
            if not self._conn.closed:
                self.commit(timeout=commit_wait_s)
        except (ZqError, TimeoutError) as e:
            log.info("group %s: acks at close failed (%s)", self.group, e)
        with self._lock:
            self._closed = True
            self._core.close()
            self._arrived_cv.notify_all()
        self._ready.clear()
        if not self._conn.closed:
            address = self._core.coordinator or self._client.cluster_view.addresses()[0]
            try:
                self._client.cluster_view.call(address, G.LeaveGroup(self._conn.new_req_id(), self.group, self.member_id),
                                   close_leave_timeout_ms)
            except ZqError as e:
                log.info("group %s: leaving failed (%s); the session will expire instead", self.group, e)

    def __enter__(self) -> GroupConsumer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------- admin calls


def _ok(reply: Any) -> dict:
    if not isinstance(reply, protocol.OkReply):
        raise ProtocolError(f"expected OkReply, got {type(reply).__name__}")
    return dict(reply.data)


def describe_groups(client: Client, group: str | None = None) -> dict:
    """The `zq groups --json` document: {"groups": [{"group", "generation", "members", "partitions"}]}."""
    reply, _ = client.cluster_view.until_deadline("describing groups",
                                      lambda: client.cluster_view.call_any(lambda rid: G.DescribeGroups(rid, group)))
    return {"groups": _ok(reply).get("groups") or []}


def reset_group(client: Client, topic: str, group: str, *, partition: int | None = None,
                to_offset: int | None = None, to_time: datetime | int | None = None,
                earliest: bool = False) -> dict:
    """Move `group` on `topic` (one partition, or all) to an offset, a time or the earliest offset.

    Returns {"group", "topic", "partitions": [{"partition", "offset"}]}: where each partition now starts."""
    time_ms = None
    if to_time is not None:
        spec = time_spec(to_time)
        if not isinstance(spec, int):
            raise ValueError("to_time is a datetime or a time in ms")
        time_ms = spec
    if (to_offset is not None) + (time_ms is not None) + bool(earliest) != 1:
        raise ValueError("give exactly one of to_offset, to_time and earliest")
    client.cluster_view.partitions_of(topic)
    reply, _ = client.cluster_view.until_deadline(
        f"resetting group {group!r} on {topic!r}",
        lambda: client.cluster_view.call_any(lambda rid: G.ResetGroup(rid, group, topic, partition, to_offset, time_ms,
                                                          bool(earliest), False), resend_on_timeout=False),
        idempotent=False)
    return _ok(reply)


def dead_letters(client: Client, topic: str, max_messages: int | None = None, wait_s: float = 5.0) -> list[Message]:
    """The messages in TOPIC.dlq now (up to `max_messages`), oldest first per partition."""
    dlq = topic if topic.endswith(".dlq") else topic + ".dlq"
    parts = client.cluster_view.partitions_of(dlq)
    ends = {p: client.list_offsets(dlq, p, "latest").offset for p in parts}
    starts = {p: client.list_offsets(dlq, p, "earliest").offset for p in parts}
    todo = {p for p in parts if ends[p] > starts[p]}
    out: list[Message] = []
    if not todo:
        return out
    consumer = client.consumer(dlq, start="earliest", partitions=sorted(todo))
    try:
        deadline = time.monotonic() + wait_s
        while todo and time.monotonic() < deadline and (max_messages is None or len(out) < max_messages):
            for msg in consumer.poll(timeout=0.2):
                if msg.offset < ends[msg.partition]:
                    out.append(msg)
            todo = {p for p in todo if consumer.position(p) < ends[p]}
    finally:
        consumer.close()
    out.sort(key=lambda m: (m.partition, m.offset))
    return out[:max_messages] if max_messages is not None else out


REDRIVE_GROUP = "zq-redrive"
DEAD_LETTER_HEADERS = ("zq-source-topic", "zq-source-partition", "zq-source-offset", "zq-attempts", "zq-last-error",
                       "zq-first-failure-ms", "zq-last-failure-ms", "zq-group")


def redrive(client: Client, topic: str, max_messages: int | None = None, rate: float | None = None,
            idle_s: float = 1.0) -> list[dict]:
    """Publish dead letters of TOPIC back to TOPIC (the partition they came from), each exactly once
    as far as the group `zq-redrive` on TOPIC.dlq is concerned: a dead letter is acked there only
    after its copy in TOPIC is acknowledged, so a second redrive does not send it again.

    `rate` (msg/s) paces the sends. Returns one {"partition", "offset", "from_offset"} per message."""
    source = topic[:-4] if topic.endswith(".dlq") else topic
    dlq = source + ".dlq"
    out: list[dict] = []
    consumer = GroupConsumer(client, dlq, REDRIVE_GROUP, start="earliest", max_wait_ms=200,
                             max_in_flight=max_messages or default_max_in_flight)
    producer = client.producer(acks="quorum")
    try:
        idle_since = time.monotonic()
        started = time.monotonic()
        while max_messages is None or len(out) < max_messages:
            batch = consumer.poll(timeout=0.2, max_messages=(max_messages - len(out)) if max_messages else 500)
            if not batch:
                idle = time.monotonic() - idle_since
                if (consumer.caught_up() and idle >= 0.3) or idle >= idle_s * 5:
                    break
                continue
            idle_since = time.monotonic()
            for msg in batch:
                if rate:
                    wait = started + len(out) / rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                headers = {k: v for k, v in msg.headers.items() if k not in DEAD_LETTER_HEADERS}
                headers["zq-redriven-from"] = f"{dlq}/{msg.partition}/{msg.offset}".encode()
                try:
                    partition = int(msg.headers.get("zq-source-partition", b"").decode())
                except ValueError:
                    partition = msg.partition
                meta = producer.send(source, msg.value, key=msg.key, headers=headers, partition=partition).result(
                    client.limits.request_timeout_ms / 1000.0 + 1.0)
                msg.ack()
                out.append({"partition": meta.partition, "offset": meta.offset, "from_offset": msg.offset})
        consumer.commit()
    finally:
        producer.close()
        consumer.close()
    return out
