"""The consumer: reads partitions of one topic in offset order, with pipelined long-poll fetches.

Theory of operation
-------------------
Two threads share the work. The client's I/O thread keeps, for every assigned partition, one
fetch outstanding at that partition's leader, from `fetch_offset`; the node holds it up to
`max_wait_ms` when there is nothing new (long-poll). The fetches due in one I/O pass leave
together, one `FetchMany` per leader (a `Fetch` when only one partition is due): the node answers
it when any of its partitions has something and splits nothing, and the reply is split here into
one answer per partition, each handled as its own Fetch's would be. So a consumer of many
partitions costs its nodes one request per reply, not one per partition. Each reply's stored batches go, undecoded,
onto the *arrived* queue as one chunk, and the next fetch starts at once from the offset after
the last batch, so the network stays busy while the application works (a reply is taken only up
to the first gap between its batches, `contiguous_batches`, so no offset is ever stepped over). The caller's thread
(`poll`, iteration) takes chunks off the queue, verifies and decodes each batch with one
`cbor2.loads`, skips records below the partition's `position` (a batch may start below the
offset asked for) and at or above the high watermark (not committed yet), and hands out
`Message`s.

Each partition's fetch offset, position and *seek generation* live in a pure
`zq.core.client_rules.FetchCursors`, called under `_lock`. `seek()` bumps the generation, drops
the partition's queued chunks and moves both offsets; the next fetch goes at once from the new
offset even while an older one is parked at the node, and a reply or chunk of an older generation
is dropped, so after `seek(p, o)` the next message of `p` is the first committed one at or after
`o`, whatever was in flight. Prefetch is bounded: when `prefetch_bytes` of chunks wait, no new
fetch starts until `poll` takes some (each fetch asks for at most what is left, and a reply holds
at least one batch, so the bound is overshot by at most one batch per partition).

Errors while fetching: NotLeader follows the leader hint at once; retriable ones (UnknownTopic,
Timeout, ConnectionFailed, StorageFull...) refresh metadata and retry after a bounded backoff;
OffsetOutOfRange (retention deleted what we were about to read) moves the partition to the
log start (or to the high watermark when it was ahead), records it in `resets`, and goes on. Any
other error is raised once by the next `poll`, and that partition stops.

One thread at a time may call poll/iterate/seek. Without a group, `Message.ack()`, `nack()` and
`extend()` do nothing: there is no lease to settle. Groups arrive with their own protocol.
"""
from __future__ import annotations

import collections
import logging
import random
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NamedTuple

from zq import batch as zbatch
from zq import protocol
from zq.client.metadata import time_spec
from zq.core.client_rules import FetchCursors, FetchOrder, contiguous_batches
from zq.core.retry import BackoffPolicy
from zq.errors import CorruptData, InvalidRequest, NotLeader, OffsetOutOfRange, ProtocolError, ZqError, from_wire

if TYPE_CHECKING:
    from zq.client.client import Client

log = logging.getLogger("zq.client")

default_max_wait_ms = 500          # long-poll: how long a node may hold a fetch with nothing to give
default_fetch_bytes = 4 * 1024 * 1024  # most bytes one fetch asks for
fetch_bytes_min = 64 * 1024        # a fetch never asks for less: one batch must fit
quick_empty_reply_ms = 5           # an empty reply faster than this is not a long-poll: wait before the next
empty_fetch_backoff_ms = 20
resets_max = 1_000                 # offset resets kept in `resets` (oldest dropped)

_EMPTY_HEADERS: dict[str, bytes] = {}


class Message:
    """One record as a consumer delivers it. `timestamp` is the producer's create time in ms since
    the epoch; `.datetime` gives it as an aware datetime. `attempt` is 1 without a group."""

    __slots__ = ("topic", "partition", "offset", "key", "value", "_headers", "timestamp", "attempt")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes,
                 headers: dict[str, bytes] | None, timestamp: int, attempt: int = 1) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self._headers = headers
        self.timestamp = timestamp
        self.attempt = attempt

    @property
    def headers(self) -> dict[str, bytes]:
        h = self._headers
        if h is None:
            h = self._headers = {}  # made on first use: most records have no headers
        return h

    @property
    def timestamp_ms(self) -> int:
        return self.timestamp

    @property
    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp / 1000.0, tz=timezone.utc)

    def ack(self) -> None:
        """Without a group: nothing to do (there is no lease). With a group, settles the message."""

    def nack(self, delay: float | None = None, reason: str = "") -> None:
        """Without a group: nothing to do. With a group, asks for redelivery after `delay`."""

    def extend(self, seconds: float) -> None:
        """Without a group: nothing to do. With a group, extends the lease."""

    def __repr__(self) -> str:
        return (f"Message(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
                f"key={self.key!r}, value={self.value[:32]!r}{'...' if len(self.value) > 32 else ''})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.topic, self.partition, self.offset, self.key, self.value, self.headers, self.timestamp) == \
            (other.topic, other.partition, other.offset, other.key, other.value, other.headers, other.timestamp)

    __hash__ = None  # type: ignore[assignment]


class OffsetReset(NamedTuple):
    """A jump the consumer made because the offset it wanted was no longer (or not yet) there."""

    partition: int
    from_offset: int
    to_offset: int
    reason: str


class _Chunk:
    __slots__ = ("partition", "epoch", "frames", "high_watermark", "size_bytes", "reset_to", "error")

    def __init__(self, partition: int, epoch: int, frames: list, high_watermark: int, size_bytes: int,
                 reset_to: int | None = None, error: ZqError | None = None) -> None:
        self.partition = partition
        self.epoch = epoch
        self.frames = frames
        self.high_watermark = high_watermark
        self.size_bytes = size_bytes
        self.reset_to = reset_to
        self.error = error


class ReadyQueue:
    """What every consumer hands out: `poll` and blocking iteration over `self._ready`, refilled by
    `self._take_chunk(deadline) -> bool` (False when nothing came by the deadline)."""

    _ready: collections.deque
    _closed: bool

    def _take_chunk(self, deadline: float) -> bool:
        raise NotImplementedError

    def _next_arrived(self, deadline: float):
        """The oldest arrived chunk, waiting until `deadline` for one; None if none came. Call with
        `self._lock` held (`self._arrived_cv` is a condition on it)."""
        while not self._arrived:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                return None
            self._arrived_cv.wait(remaining)
        return self._arrived.popleft()

    def poll(self, timeout: float = 1.0, max_messages: int = 500) -> list:
        """The messages that arrived, up to `max_messages`, waiting up to `timeout` s for the first."""
        out: list = []
        deadline = time.monotonic() + max(0.0, timeout)
        while len(out) < max_messages:
            ready = self._ready   # read each time: a seek may replace the queue
            if ready:
                n = min(len(ready), max_messages - len(out))
                out.extend(ready.popleft() for _ in range(n))
                continue
            if not self._take_chunk(deadline if not out else 0.0):
                break
        return out

    def __iter__(self):
        return self

    def __next__(self):
        """The next message, waiting as long as it takes; StopIteration once closed."""
        while not self._ready:
            if self._closed:
                raise StopIteration
            self._take_chunk(time.monotonic() + 1.0)
        return self._ready.popleft()


class Consumer(ReadyQueue):
    """Made by `Client.consumer(topic, ...)`; see the module docstring."""

    def __init__(self, client: Client, topic: str, group: str | None = None, start: Any = "latest",
                 partitions: list[int] | None = None, max_wait_ms: int = default_max_wait_ms,
                 fetch_bytes: int = default_fetch_bytes, prefetch_bytes: int | None = None) -> None:
        if group is not None:
            raise InvalidRequest("Consumer reads partitions without a group; for a group use "
                                 "client.consumer(topic, group=...), which makes a GroupConsumer")
        self._client = client
        self._cluster = client.cluster_view
        self._conn = self._cluster.conn
        self.topic = topic
        self.group = None
        self.generation = 0
        self.undecodable_batches_skipped = 0   # stored batches whose records did not decode, stepped over
        limits = client.limits
        self.max_wait_ms = max(0, min(int(max_wait_ms), limits.fetch_wait_ms_max))
        self.fetch_bytes = max(fetch_bytes_min, min(int(fetch_bytes), limits.fetch_bytes_max))
        self.prefetch_bytes = limits.consumer_prefetch_bytes_max if prefetch_bytes is None else int(prefetch_bytes)
        self._request_timeout_ms = limits.request_timeout_ms
        self._backoff_ms, self._backoff_ms_max = limits.retry_backoff_ms, limits.retry_backoff_ms_max
        all_partitions = self._cluster.partitions_of(topic)
        chosen = sorted(set(all_partitions if partitions is None else partitions))
        for p in chosen:
            if p not in all_partitions:
                from zq.errors import UnknownPartition
                raise UnknownPartition(f"topic {topic!r} has partitions 0 to {len(all_partitions) - 1}, not {p}")
        self._assigned = chosen
        self.resets: collections.deque[OffsetReset] = collections.deque(maxlen=resets_max)
        starts = {p: self._start_offset(p, start) for p in chosen}
        # Shared between the caller and the I/O thread, under _lock.
        self._lock = threading.Lock()
        self._arrived_cv = threading.Condition(self._lock)
        self._arrived: collections.deque[_Chunk] = collections.deque()
        self._prefetched_bytes = 0
        # Fetch offsets and seek generations (zq.core.client_rules): made here, before the I/O
        # thread starts fetching, so a seek right after creation can never be overtaken by the start.
        self._cursors = FetchCursors(starts)
        self._closed = False
        # Caller side only: the cursors' positions, read and moved by _decode.
        self._positions: dict[int, int] = self._cursors.positions
        self._ready: collections.deque[Message] = collections.deque()  # decoded, not yet handed out
        # I/O thread only.
        self._paused: set[int] = set()  # waiting for prefetch room; under _lock
        self._outgoing: dict[str, list[tuple[FetchOrder, int]]] = {}   # fetches of this I/O pass, by leader address
        self._rounds = 0                # FetchMany sent: rotates which partitions come first (fair within max_bytes)
        self._rng = random.Random()     # jitter of fetch retries
        self._backoff = BackoffPolicy(self._backoff_ms, max(self._backoff_ms, self._backoff_ms_max))
        self._conn.submit(lambda: self._io_start(chosen))

    # ------------------------------------------------------------------ caller side


    def seek(self, partition: int, offset: int) -> None:
        """Deliver `partition` from `offset` next: the next message handed out for it is the first
        committed one at or after `offset` (control batches skipped); nothing fetched before the
        seek is delivered after it, whatever the start was and whatever was in flight."""
        if partition not in self._cursors:
            raise ValueError(f"partition {partition} is not assigned to this consumer ({self._assigned})")
        if type(offset) is not int or offset < 0:
            raise ValueError("an offset is a non-negative integer")
        with self._lock:
            generation = self._cursors.seek(partition, offset)
            kept = collections.deque()
            for c in self._arrived:
                if c.partition == partition:
                    self._prefetched_bytes -= c.size_bytes
                else:
                    kept.append(c)
            self._arrived = kept
        self._ready = collections.deque(m for m in self._ready if m.partition != partition)
        self._conn.submit(lambda: self._io_seek(partition, generation))

    def seek_to_time(self, when: datetime | int) -> None:
        """Every assigned partition from the first message at or after `when` (datetime or ms)."""
        spec = time_spec(when)
        for p in self._assigned:
            self.seek(p, self._client.list_offsets(self.topic, p, spec).offset)

    def seek_to_beginning(self) -> None:
        for p in self._assigned:
            self.seek(p, self._client.list_offsets(self.topic, p, "earliest").offset)

    def seek_to_end(self) -> None:
        for p in self._assigned:
            self.seek(p, self._client.list_offsets(self.topic, p, "latest").offset)

    def assignment(self) -> list[int]:
        """Partitions this consumer reads."""
        return list(self._assigned)

    def position(self, partition: int) -> int:
        """The offset of the next message this consumer will hand out from `partition`."""
        if partition not in self._cursors:
            raise ValueError(f"partition {partition} is not assigned to this consumer ({self._assigned})")
        return self._positions[partition]

    def commit(self) -> None:
        """Without a group there is nothing to commit; kept so code written for groups runs."""

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._arrived.clear()
            self._prefetched_bytes = 0
            self._arrived_cv.notify_all()
        self._ready.clear()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start_offset(self, partition: int, start: Any) -> int:
        if type(start) is int:
            if start < 0:
                raise ValueError("a start offset is a non-negative integer")
            return start
        return self._client.list_offsets(self.topic, partition, time_spec(start)).offset

    def _take_chunk(self, deadline: float) -> bool:
        """Decode one arrived chunk into `_ready`, waiting until `deadline` for one. False if none came."""
        with self._lock:
            chunk = self._next_arrived(deadline)
            if chunk is None:
                return False
            self._prefetched_bytes -= chunk.size_bytes
            resume = bool(self._paused_any) and self._prefetched_bytes < self.prefetch_bytes
            current = self._cursors.is_current(chunk.partition, chunk.epoch)
        if resume:
            self._conn.submit(self._io_resume)
        if not current:
            return True
        if chunk.error is not None:
            raise chunk.error
        if chunk.reset_to is not None:
            self._positions[chunk.partition] = chunk.reset_to
            return True
        self._decode(chunk)
        return True

    @property
    def _paused_any(self) -> bool:
        return bool(self._paused)  # called under _lock, which guards _paused


    def _records_or_skip(self, p: int, frame: bytes, h: zbatch.BatchHeader) -> list | None:
        """The verified records of a stored batch whose checksums held, or None when they do not
        decode (a batch an older node stored unchecked): it is counted, logged and stepped over, so
        the messages after it are still read, rather than stopping the partition at it for good."""
        try:
            return zbatch.stored_records(frame, h)
        except ProtocolError as e:
            self.undecodable_batches_skipped += 1
            log.error("%s/%s: %s; stepped over it (%d undecodable batches skipped by this consumer)",
                      self.topic, p, e.message, self.undecodable_batches_skipped)
            return None

    def _decode(self, chunk: _Chunk) -> None:
        p = chunk.partition
        position = self._positions[p]
        hw = chunk.high_watermark
        topic = self.topic
        append = self._ready.append
        for frame in chunk.frames:
            h = zbatch.verify_stored(frame)
            if h.next_offset <= position:
                continue
            if h.flags & zbatch.FLAG_CONTROL:
                # A new leader's epoch marker: no record for the application, only an offset to step over.
                position = max(position, min(h.next_offset, hw))
                continue
            records = self._records_or_skip(p, frame, h)
            if records is None:   # undecodable: stepped over, like a marker
                position = max(position, min(h.next_offset, hw))
                continue
            offset = h.base_offset
            skip = position - offset
            if skip > 0:
                records = records[skip:]
                offset = position
            if offset + len(records) > hw:
                records = records[:max(0, hw - offset)]
            try:
                for ts, key, value, headers in records:
                    append(Message(topic, p, offset, key, value, headers, ts))
                    offset += 1
            except (TypeError, ValueError):
                raise CorruptData(f"batch at {topic}/{p} offset {h.base_offset} holds a record that is not "
                                  "[time, key, value, headers]") from None
            if offset > position:
                position = offset
        self._positions[p] = position

    # ------------------------------------------------------------------ I/O thread side

    def _io_start(self, partitions: list[int]) -> None:
        for p in partitions:
            self._io_fetch(p)

    def _io_seek(self, partition: int, generation: int) -> None:
        if not self._cursors.is_current(partition, generation):
            return  # a later seek follows
        self._io_fetch(partition)
        self._io_resume()  # the seek dropped queued chunks: partitions paused for room may go on

    def _io_resume(self) -> None:
        with self._lock:
            paused = sorted(self._paused)
            self._paused.clear()
        for p in paused:
            self._io_fetch(p)

    def _io_fetch(self, p: int) -> None:
        if self._closed:
            return
        with self._lock:  # decided under the lock poll() frees room under, so no resume is missed
            room = self.prefetch_bytes - self._prefetched_bytes
            if room <= 0:
                self._paused.add(p)
                return
            order = self._cursors.next_fetch(p)
        if order is not None:
            self._io_send(order, room)

    def _io_send(self, order: FetchOrder, room: int) -> None:
        """Queue `order` for its leader; what this I/O pass queues leaves at its end (`_io_flush`):
        one FetchMany per leader however many of its partitions are due, or a Fetch for just one."""
        p = order.partition
        address = self._cluster.leader_address(self.topic, p)
        if address is None:
            self._io_retry(order, NotLeader(f"no leader known for {self.topic}/{p}"))
            return
        if not self._outgoing:
            self._conn.io_call_later(0, self._io_flush)
        self._outgoing.setdefault(address, []).append((order, room))

    def _io_flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, {}
        if self._closed:
            return
        timeout_ms = self.max_wait_ms + self._request_timeout_ms
        for address, queued in outgoing.items():
            if len(queued) == 1:
                order, room = queued[0]
                max_bytes = max(fetch_bytes_min, min(self.fetch_bytes, room))
                msg = protocol.Fetch(self._conn.new_req_id(), self.topic, order.partition, order.offset, max_bytes,
                                     self.max_wait_ms, None)
                sent_ms = time.monotonic() * 1000.0
                self._conn.io_request(address, msg, (), timeout_ms,
                                      lambda reply, frames, error, order=order, sent_ms=sent_ms:
                                      self._io_on_fetch(order, sent_ms, reply, frames, error))
                continue
            self._rounds += 1
            turn = self._rounds % len(queued)
            queued = queued[turn:] + queued[:turn]   # who comes first gets the reply's bytes first
            for at in range(0, len(queued), protocol.FETCH_MANY_PARTITIONS_MAX):
                part = queued[at:at + protocol.FETCH_MANY_PARTITIONS_MAX]
                orders = [order for order, _ in part]
                max_bytes = max(fetch_bytes_min, min(self.fetch_bytes, max(room for _, room in part)))
                msg = protocol.FetchMany(self._conn.new_req_id(), self.topic,
                                         [[o.partition, o.offset] for o in orders], max_bytes, self.max_wait_ms)
                sent_ms = time.monotonic() * 1000.0
                self._conn.io_request(address, msg, (), timeout_ms,
                                      lambda reply, frames, error, orders=orders, sent_ms=sent_ms:
                                      self._io_on_fetch_many(orders, sent_ms, reply, frames, error))

    def _io_on_fetch_many(self, orders: list[FetchOrder], sent_ms: float, reply: Any, frames: list,
                          error: ZqError | None) -> None:
        """Each partition of a FetchMany is answered as its own Fetch would be: split, then each
        goes through `_io_on_fetch`."""
        if error is None and not isinstance(reply, protocol.FetchManyReply):
            error = ProtocolError(f"expected FetchManyReply, got {type(reply).__name__}")
        answers: dict[int, tuple[Any, list, ZqError | None]] = {}
        if error is None:
            at = 0
            for p, hw, log_start, log_end, n in reply.results:
                answers[p] = (protocol.FetchReply(reply.req_id, hw, log_start, log_end), frames[at:at + n], None)
                at += n
            for p, code, message, data in reply.errors:
                answers[p] = (None, [], from_wire(code, message, data))
            if at != len(frames):
                error = ProtocolError(f"a FetchManyReply counts {at} batches and carries {len(frames)}")
                answers = {}
        # The node answered because some partition had data or an error: an empty answer of another
        # is then no sign that the node does not hold fetches (see quick_empty_reply_ms), and it
        # is asked again at once, with the others, taken here in one go (of 64 partitions, one
        # message's reply has 63 such answers).
        held = error is None and (bool(frames) or bool(reply.errors))
        nothing = []
        for order in orders:
            answer = answers.get(order.partition)
            if answer is None:
                answer = (None, [], error or ProtocolError(
                    f"a FetchManyReply leaves out partition {order.partition} it was asked for"))
            elif held and answer[2] is None and not answer[1]:
                nothing.append(order)
                continue
            self._io_on_fetch(order, sent_ms, *answer, held=held)
        if nothing:
            self._io_again(nothing)

    def _io_again(self, orders: list[FetchOrder]) -> None:
        """Fetches answered with nothing new (and not at once): each is asked again from the same
        offset, as `_io_on_fetch_reply` would, their cursors moved under one hold of the lock."""
        with self._lock:
            if self._closed:
                return
            # A seek that came after an order was sent makes its reply stale (False): not again.
            again = [order.partition for order in orders if self._cursors.on_fetch_reply(order, order.offset)]
        for p in again:
            self._io_fetch(p)

    def _io_send_later(self, order: FetchOrder) -> None:
        """A timer sends `order` (held in flight meanwhile), unless a seek replaced it."""
        if self._closed:
            return
        with self._lock:
            current = self._cursors.is_current(order.partition, order.generation)
            room = self.prefetch_bytes - self._prefetched_bytes
        if current:
            self._io_send(order, max(room, fetch_bytes_min))

    def _io_on_fetch(self, order: FetchOrder, sent_ms: float, reply: Any, frames: list,
                     error: ZqError | None, held: bool = False) -> None:
        with self._lock:
            current = self._cursors.is_current(order.partition, order.generation)
        if self._closed or not current:
            return  # closed, or a seek happened meanwhile and fetches from the new offset already
        if error is None and not isinstance(reply, protocol.FetchReply):
            error = ProtocolError(f"expected FetchReply, got {type(reply).__name__}")
        p = order.partition
        if error is None:
            self._io_on_fetch_reply(order, sent_ms, reply, frames, held)
        elif isinstance(error, OffsetOutOfRange):
            self._io_reset(order, error)
        elif error.retriable:
            hint = error.address if isinstance(error, NotLeader) else None
            if hint is not None and self._cursors.failures(p) == 0:
                self._cluster.hint_leader(self.topic, p, hint)
                with self._lock:
                    self._cursors.on_fetch_error(order)
                    again = self._cursors.on_retry_due(p, order.generation)
                if again:
                    self._io_fetch(p)
            else:
                self._io_retry(order, error)
        else:
            with self._lock:
                stop = self._cursors.on_fatal(order)
            if stop:
                self._io_deliver(_Chunk(p, order.generation, [], 0, 0, error=error))

    def _io_on_fetch_reply(self, order: FetchOrder, sent_ms: float, reply: Any, frames: list,
                           held: bool = False) -> None:
        p, offset = order.partition, order.offset
        try:
            spans = [(h.base_offset, h.next_offset) for h in map(zbatch.unpack_header, frames)]
        except ZqError as e:
            with self._lock:
                stop = self._cursors.on_fatal(order)
            if stop:
                self._io_deliver(_Chunk(p, order.generation, [], 0, 0, error=e))
            return
        kept = contiguous_batches(spans)
        if kept < len(frames):
            # Offsets between two batches were left out: take the reply up to the gap only, so the
            # position never moves past them; the next fetch starts at the gap.
            log.warning("%s/%s: a fetch reply from offset %s left out offsets %s to %s between its batches; "
                        "they are fetched again", self.topic, p, offset, max(n for _, n in spans[:kept]),
                        spans[kept][0] - 1)
            frames = frames[:kept]
        next_offset = max([offset] + [n for _, n in spans[:kept]])
        size = sum(len(f) for f in frames)
        # Records at or above the high watermark are not committed: they are fetched again later.
        next_offset = min(next_offset, max(offset, reply.high_watermark))
        with self._lock:
            if not self._cursors.on_fetch_reply(order, next_offset):
                return
        if frames:
            self._io_deliver(_Chunk(p, order.generation, frames, reply.high_watermark, size))
        if next_offset == offset and not held and time.monotonic() * 1000.0 - sent_ms < quick_empty_reply_ms:
            # Nothing came back, and at once: the node did not hold the fetch, so do not spin on it.
            with self._lock:
                again = self._cursors.next_fetch(p)
            if again is not None:
                self._conn.io_call_later(empty_fetch_backoff_ms, lambda: self._io_send_later(again))
        else:
            self._io_fetch(p)

    def _io_retry_due(self, p: int, generation: int) -> None:
        with self._lock:
            again = self._cursors.on_retry_due(p, generation)
        if again:
            self._io_fetch(p)

    def _io_reset(self, order: FetchOrder, error: OffsetOutOfRange) -> None:
        log_start, hw = error.log_start, error.high_watermark
        if log_start is None or hw is None:
            self._io_retry(order, error)
            return
        p, offset = order.partition, order.offset
        to = log_start if offset < log_start else hw
        with self._lock:
            if not self._cursors.on_reset(order, to):
                return
        reason = "deleted by retention" if offset < log_start else "past the high watermark"
        log.warning("%s/%s: offset %s is %s; continuing from %s", self.topic, p, offset, reason, to)
        self.resets.append(OffsetReset(p, offset, to, reason))
        self._io_deliver(_Chunk(p, order.generation, [], 0, 0, reset_to=to))
        self._io_fetch(p)

    def _io_retry(self, order: FetchOrder, error: ZqError) -> None:
        p = order.partition
        with self._lock:
            if not self._cursors.on_fetch_error(order):
                return
            failures = self._cursors.failures(p)
        delay = self._backoff.delay_ms(failures, self._rng.random())
        log.debug("fetch %s/%s: %s; retrying in %s ms", self.topic, p, error.code, delay)
        self._cluster.refresh_soon()
        self._conn.io_call_later(delay, lambda: self._io_retry_due(p, order.generation))

    def _io_deliver(self, chunk: _Chunk) -> None:
        with self._lock:
            if self._closed or not self._cursors.is_current(chunk.partition, chunk.epoch):
                return
            self._arrived.append(chunk)
            self._prefetched_bytes += chunk.size_bytes
            self._arrived_cv.notify()
