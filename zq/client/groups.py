"""The group consumer: a member of a consumer group, and the group admin calls (describe, reset,
dead letters).

Theory of operation
-------------------
`GroupConsumer` joins its group through any node and then heartbeats there every
`heartbeat_ms` from the client's I/O thread; each heartbeat's reply carries the generation and
the partitions this member holds. A heartbeat refused as `Fenced` (the session expired, or the
node forgot the member) makes it join again; a node that does not answer makes it move to the
next node.

For every partition it holds, the I/O thread keeps one `Lease` outstanding at the partition's
leader (long-poll, following NotLeader hints as the plain consumer does). A lease asks for at
most the room left under `max_in_flight`: messages leased and not yet settled by the
application. That bound is the member's prefetch and its backpressure: a slow application stops
leasing, and what it does not lease the group's other members may take after a rebalance. The
reply's stored batches go, undecoded, onto the arrived queue; the caller's thread decodes them and
hands out `GroupMessage`s, each with its attempt number.

Settling costs no round trip: `ack`, `nack` and `extend` append to a per-partition list under the
lock, and the I/O thread sends each partition's list as one `Ack` every `ack_flush_ms` (or at
once when `ack_batch_max` items wait). An Ack the leader refuses with NotLeader goes to the new
leader; a Fenced one is dropped (the leader will redeliver, which is the at-least-once contract)
and the member heartbeats at once to learn its new assignment. `commit()` sends what waits now
and waits for the answers.

`seek` and `seek_to_time` send `ResetGroup` for the partitions this member holds: the leaders
open a new reset epoch, acks of the older epoch are ignored, and messages of the older epoch
still queued here are dropped. `close()` flushes acks, then leaves the group, so its partitions
move at once.

One thread at a time may call poll/iterate/seek/commit; ack/nack/extend may come from any thread.
"""
from __future__ import annotations

import collections
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
from zq.errors import (ConnectionFailed, Fenced, InvalidRequest, NotLeader, ProtocolError, RebalanceInProgress,
                       Timeout, ZqError)

if TYPE_CHECKING:
    from zq.client.client import Client

log = logging.getLogger("zq.client")

default_session_timeout_ms = 10_000
default_lease_ms = 30_000
default_max_in_flight = 5_000      # messages leased and not yet settled, per consumer
default_max_wait_ms = 500
lease_messages_max = 2_500         # messages one lease asks for (with max_in_flight, a fair share per partition
                                   # bounds it: 833 for one member of six partitions, 2,500 for one of three
                                   # members. Each reply carries its whole stored batches (up to 512 KiB): at
                                   # 1,000, three members' leases cost the nodes ~20% more CPU per message)
lease_min_fraction = 4             # with messages queued, no lease below 1/4 of a partition's share
ack_flush_ms = 20                  # settled messages wait at most this long before their Ack goes
ack_batch_max = 2_000              # ... or until this many are waiting
ack_retry_ms_max = 8_000           # an Ack refused for a passing reason (an election, a timeout, NotLeader,
                                   # RebalanceInProgress) is sent again, with backoff, for this long; under
                                   # commit_wait_s, so that commit() and close() see how it ended
retry_backoff_ms = 100
retry_backoff_ms_max = 500         # a lease or Ack refused for a passing reason waits at most this long: an
                                   # election ends within ~1 s, and a 2 s cap left partitions idle for seconds
                                   # after it (measured: bench group-3 stalled 1.5-2 s at LeaderNotAvailable)
quick_empty_reply_ms = 5
empty_lease_backoff_ms = 20
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
            self._consumer._settle(self, "ack", None)

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


class _Pending:
    """Settlements of one partition and reset epoch waiting to be sent."""

    __slots__ = ("acked", "nacks", "extends")

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.nacks: list[list] = []
        self.extends: list[list] = []

    def __len__(self) -> int:
        return len(self.acked) + len(self.nacks) + len(self.extends)


class _Chunk:
    __slots__ = ("partition", "epoch", "deliveries", "frames", "error")

    def __init__(self, partition: int, epoch: int, deliveries: dict[int, int], frames: list,
                 error: ZqError | None = None) -> None:
        self.partition = partition
        self.epoch = epoch
        self.deliveries = deliveries
        self.frames = frames
        self.error = error


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
        self._conn = client._conn
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
        self._request_timeout_ms = client.limits.request_timeout_ms
        client._partitions_of(topic)   # UnknownTopic now rather than at the first lease
        # Shared between threads, under _lock.
        self._lock = threading.Lock()
        self._arrived_cv = threading.Condition(self._lock)
        self._arrived: collections.deque[_Chunk] = collections.deque()
        self._in_flight = 0            # leased (or being leased) and not yet settled
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._pending_count = 0
        self._flush_scheduled = False
        self._resume_asked = False
        self._epochs: dict[int, int] = {}   # partition -> newest reset epoch seen; older chunks are dropped
        self._closed = False
        self.generation = 0
        self._assigned: set[int] = set()
        self._lease_min = 1
        # Caller side only.
        self._ready: collections.deque[GroupMessage] = collections.deque()
        self._positions: dict[int, int] = {}   # partition -> offset after the highest message handed out
        # A group's offsets are kept by the partition leaders, which step over offsets deleted by
        # retention themselves: a member makes no client-side resets, so this stays empty. Kept so
        # code written for a plain Consumer runs.
        self.resets: collections.deque = collections.deque(maxlen=1)
        self._decoded: dict[int, tuple[bytes, zbatch.BatchHeader, list]] = {}   # partition -> last batch decoded
        # I/O thread only.
        self._coordinator: str | None = None
        self._leasing: set[int] = set()
        # Partitions waiting for room, in the order they paused (a dict as an ordered set): resumed
        # in that order, so that with max_in_flight below the partitions held each gets its turn.
        # Resumed sorted, the highest partitions starved (found by the groups simulator, seed 107).
        self._paused: dict[int, None] = {}
        self._failures: dict[int, int] = collections.defaultdict(int)
        self._caught_up: dict[int, bool] = {}
        self._hb_failures = 0
        self._joined = threading.Event()
        self._join_error: ZqError | None = None
        self._unflushed: list[Future] = []
        self._join()

    # ------------------------------------------------------------------ membership

    def _join(self) -> None:
        """Join through the first node that answers (caller's thread), then heartbeat from the I/O thread."""
        reply, address = self._client._until_deadline(
            f"joining group {self.group!r}",
            lambda: self._client._call_any(lambda rid: G.JoinGroup(rid, self.group, self.member_id, [self.topic],
                                                                   self.session_timeout_ms, self.static),
                                           with_address=True))
        if not isinstance(reply, G.GroupReply):
            raise ProtocolError(f"expected GroupReply, got {type(reply).__name__}")
        parts = self._parts(reply)
        with self._lock:   # so that assignment() and generation hold the join's answer at once
            self.generation = reply.generation
            self._set_assigned(parts)
        self._conn.submit(lambda: self._io_joined(address, parts))

    def _io_joined(self, address: str, parts: set[int]) -> None:
        self._coordinator = address
        for p in sorted(parts):
            self._io_lease(p)
        self._conn.io_call_later(self.heartbeat_ms, self._io_heartbeat)

    def _parts(self, reply: G.GroupReply) -> set[int]:
        return {p for t, p in (tuple(x) for x in reply.partitions if isinstance(x, list) and len(x) == 2)
                if t == self.topic and type(p) is int}

    def _io_apply(self, reply: G.GroupReply) -> None:
        parts = self._parts(reply)
        added = parts - self._assigned
        if reply.generation != self.generation or parts != self._assigned:
            log.info("group %s: member %s in generation %d holds %s", self.group, self.member_id,
                     reply.generation, sorted(parts))
        with self._lock:
            self.generation = reply.generation
            self._set_assigned(parts)
        for p in sorted(added):
            self._failures[p] = 0
            self._io_lease(p)

    def _io_heartbeat(self) -> None:
        if self._closed:
            return
        address = self._coordinator or self._client._addresses()[0]
        msg = G.GroupHeartbeat(self._conn.new_req_id(), self.group, self.member_id, self.generation)
        self._conn.io_request(address, msg, (), self.heartbeat_ms + 1_000,
                              lambda reply, frames, error: self._io_on_heartbeat(address, reply, error))

    def _io_on_heartbeat(self, address: str, reply: Any, error: ZqError | None) -> None:
        if self._closed:
            return
        delay = self.heartbeat_ms
        if error is None and isinstance(reply, G.GroupReply):
            self._hb_failures = 0
            self._io_apply(reply)
        elif isinstance(error, Fenced):
            self._io_rejoin(address)
            return
        else:
            # No answer, or the node is behind: after a few misses, try the next node.
            self._hb_failures += 1
            if isinstance(error, (Timeout, ConnectionFailed)) or self._hb_failures >= 3:
                addresses = self._client._addresses()
                i = addresses.index(address) if address in addresses else -1
                self._coordinator = addresses[(i + 1) % len(addresses)]
            delay = min(self.heartbeat_ms, retry_backoff_ms * self._hb_failures)
        self._conn.io_call_later(delay, self._io_heartbeat)

    def _io_rejoin(self, address: str) -> None:
        msg = G.JoinGroup(self._conn.new_req_id(), self.group, self.member_id, [self.topic], self.session_timeout_ms,
                          self.static)

        def done(reply: Any, frames: list, error: ZqError | None) -> None:
            if self._closed:
                return
            if error is None and isinstance(reply, G.GroupReply):
                self._coordinator = address
                self._io_apply(reply)
                self._conn.io_call_later(self.heartbeat_ms, self._io_heartbeat)
            else:
                log.info("group %s: joining again failed (%s); retrying", self.group, error)
                self._conn.io_call_later(retry_backoff_ms, lambda: self._io_rejoin(address))
        self._conn.io_request(address, msg, (), self._request_timeout_ms, done)

    def _io_heartbeat_soon(self) -> None:
        self._conn.io_call_later(0, self._io_heartbeat_once)

    def _io_heartbeat_once(self) -> None:
        """An extra heartbeat to learn a new assignment now; the regular ones go on as they were."""
        if self._closed:
            return
        address = self._coordinator or self._client._addresses()[0]
        msg = G.GroupHeartbeat(self._conn.new_req_id(), self.group, self.member_id, self.generation)

        def done(reply: Any, frames: list, error: ZqError | None) -> None:
            if not self._closed and error is None and isinstance(reply, G.GroupReply):
                self._io_apply(reply)
        self._conn.io_request(address, msg, (), self._request_timeout_ms, done)

    # ------------------------------------------------------------------ leasing

    def _io_lease(self, p: int) -> None:
        if self._closed or p not in self._assigned or p in self._leasing:
            return
        with self._lock:
            n = self._lease_size()
            if n <= 0:
                self._paused[p] = None
                return
            self._in_flight += n   # reserved until the reply says how many came
        address = self._client._leader_address(self.topic, p)
        if address is None:
            self._unreserve(n)
            self._io_retry(p, NotLeader(f"no leader known for {self.topic}/{p}"))
            return
        self._leasing.add(p)
        msg = G.Lease(self._conn.new_req_id(), self.group, self.member_id, self.generation, self.topic, p, n,
                      self.lease_ms, self.max_wait_ms, self._start)
        sent_ms = time.monotonic() * 1000.0
        self._conn.io_request(address, msg, (), self.max_wait_ms + self._request_timeout_ms,
                              lambda reply, frames, error: self._io_on_lease(p, n, sent_ms, reply, frames, error))

    def _lease_size(self) -> int:
        """How many messages the next lease asks for; 0: wait for room. Under `_lock`.

        A fair share per partition: a long-poll on an idle partition must not hold the room that
        busy partitions need. And no lease smaller than `_lease_min` while the application still
        has messages queued to take: each lease costs the leader a pass over its state and
        carries whole stored batches, so leasing a few messages as each one is acked (what room
        freed one at a time gives) cost more than waiting a moment. With nothing queued here the
        room left is leased whatever its size, so an application that holds messages while it
        waits for more is never stalled by this."""
        room = self.max_in_flight - self._in_flight
        share = max(1, self.max_in_flight // max(1, len(self._assigned)))
        n = min(room, lease_messages_max, share)
        if n < self._lease_min and (self._arrived or self._ready):
            return 0
        return n

    def _set_assigned(self, parts: set[int]) -> None:
        """Under `_lock`."""
        self._assigned = parts
        share = max(1, self.max_in_flight // max(1, len(parts)))
        self._lease_min = max(1, min(share, lease_messages_max) // lease_min_fraction)

    def _unreserve(self, n: int) -> None:
        with self._lock:
            self._in_flight -= n

    def _io_on_lease(self, p: int, n: int, sent_ms: float, reply: Any, frames: list, error: ZqError | None) -> None:
        self._leasing.discard(p)
        if error is None and not isinstance(reply, G.LeaseReply):
            error = ProtocolError(f"expected LeaseReply, got {type(reply).__name__}")
        got = 0
        if error is None:
            deliveries = reply.deliveries
            if len(deliveries) % 2 or not all(type(x) is int for x in deliveries):
                error = ProtocolError("LeaseReply.deliveries is a flat list of [offset, attempt] pairs")
            else:
                got = len(deliveries) // 2
        with self._lock:
            self._in_flight -= n - got
            paused = list(self._paused) if n > got else []
            for q in paused:
                del self._paused[q]
            if error is None and got:
                epoch = max(self._epochs.get(p, 0), reply.reset_epoch)
                self._epochs[p] = epoch
                self._arrived.append(_Chunk(p, reply.reset_epoch, dict(zip(deliveries[::2], deliveries[1::2])),
                                            frames))
                self._arrived_cv.notify()
        if self._closed:
            return
        for q in paused:   # room came back: partitions that waited for it go first
            self._io_lease(q)
        if error is None:
            self._failures[p] = 0
            self._caught_up[p] = got == 0
            if got == 0 and time.monotonic() * 1000.0 - sent_ms < quick_empty_reply_ms:
                self._conn.io_call_later(empty_lease_backoff_ms, lambda: self._io_lease(p))
            else:
                self._io_lease(p)
        elif isinstance(error, NotLeader) and isinstance(error.data.get("address"), str) and self._failures[p] == 0:
            self._client._hint_leader(self.topic, p, error.data["address"])
            self._failures[p] += 1
            self._io_lease(p)
        elif isinstance(error, (Fenced, RebalanceInProgress)):
            # Our view of the group is stale, or the leader's is: learn the assignment, then try again.
            if isinstance(error, Fenced):
                self._io_heartbeat_soon()
            self._failures[p] += 1
            self._conn.io_call_later(min(retry_backoff_ms * self._failures[p], retry_backoff_ms_max),
                                     lambda: self._io_lease(p))
        elif error.retriable:
            self._io_retry(p, error)
        else:
            with self._lock:
                self._arrived.append(_Chunk(p, -1, {}, [], error=error))
                self._arrived_cv.notify()

    def _io_retry(self, p: int, error: ZqError) -> None:
        self._failures[p] += 1
        delay = min(retry_backoff_ms_max, retry_backoff_ms * 2 ** min(self._failures[p] - 1, 10))
        log.debug("lease %s/%s: %s; retrying in %s ms", self.topic, p, error.code, delay)
        self._client._io_refresh_metadata()
        self._conn.io_call_later(delay, lambda: self._io_lease(p))

    def _io_resume(self) -> None:
        with self._lock:
            self._resume_asked = False
            paused = list(self._paused)
            self._paused.clear()
        for p in paused:
            self._io_lease(p)

    # ------------------------------------------------------------------ settling

    def _settle(self, msg: GroupMessage, kind: str, item: Any) -> None:
        submit_flush = submit_resume = False
        with self._lock:
            pending = self._pending.get((msg.partition, msg._epoch))
            if pending is None:
                pending = self._pending[(msg.partition, msg._epoch)] = _Pending()
            if kind == "ack":
                pending.acked.append(msg.offset)
            elif kind == "nack":
                pending.nacks.append(item)
            else:
                pending.extends.append(item)
            self._pending_count += 1
            if kind != "extend":
                self._in_flight -= 1
                if self._paused and not self._resume_asked and (
                        self.max_in_flight - self._in_flight >= self._lease_min or not self._ready):
                    self._resume_asked = submit_resume = True
            if not self._flush_scheduled:
                self._flush_scheduled = submit_flush = True
            elif self._pending_count >= ack_batch_max:
                submit_flush = True
        if submit_flush and not self._conn.closed:
            if self._pending_count >= ack_batch_max:
                self._conn.submit(self._io_flush)
            else:
                self._conn.call_later(ack_flush_ms, self._io_flush)
        if submit_resume and not self._conn.closed:
            self._conn.submit(self._io_resume)

    def _io_flush(self, done: Future | None = None) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._pending_count = 0
            self._flush_scheduled = False
        waits: list[Future] = []
        for (p, epoch), items in sorted(pending.items()):
            fut: Future = Future()
            waits.append(fut)
            self._io_send_ack(p, epoch, items, fut, 0, time.monotonic() * 1000.0)
        if done is not None:
            _when_all(waits, done)

    def _io_send_ack(self, p: int, epoch: int, items: _Pending, fut: Future, attempt: int, first_ms: float) -> None:
        """Send one partition's settlements; retried while the refusal is a passing one. An ack
        given up costs a redelivery after the lease runs out, and until then the unacked offset
        holds the partition's committed offset back (measured: a 30 s stall of a partition after
        an election that outlasted 5 quick retries), so it is retried for `ack_retry_ms_max`.
        Sending the same acks twice is harmless: an ack is a lattice join at the leader."""
        address = self._client._leader_address(self.topic, p)
        if address is None or self._conn.closed:
            delay = min(retry_backoff_ms_max, retry_backoff_ms * 2 ** min(attempt, 10))
            if not self._conn.closed and time.monotonic() * 1000.0 + delay - first_ms < ack_retry_ms_max:
                self._client._io_refresh_metadata()   # an election: the metadata will name the new leader
                self._conn.io_call_later(delay, lambda: self._io_send_ack(p, epoch, items, fut, attempt + 1, first_ms))
                return
            fut.set_result(NotLeader(f"no leader known for {self.topic}/{p}; the acks are dropped and the "
                                     "messages will be delivered again"))
            return
        msg = G.Ack(self._conn.new_req_id(), self.group, self.member_id, self.generation, self.topic, p, epoch,
                    items.acked, items.nacks, items.extends)

        def done(reply: Any, frames: list, error: ZqError | None) -> None:
            if error is None:
                fut.set_result(None)
                return
            delay = min(retry_backoff_ms_max, retry_backoff_ms * 2 ** min(attempt, 10))
            retry = (time.monotonic() * 1000.0 + delay - first_ms < ack_retry_ms_max
                     and (error.retriable or isinstance(error, RebalanceInProgress)))
            if isinstance(error, NotLeader) and isinstance(error.data.get("address"), str):
                self._client._hint_leader(self.topic, p, error.data["address"])
            if isinstance(error, Fenced):
                self._io_heartbeat_soon()
            if retry and not self._conn.closed:
                self._client._io_refresh_metadata()
                self._conn.io_call_later(delay, lambda: self._io_send_ack(p, epoch, items, fut, attempt + 1, first_ms))
                return
            log.info("acks for %s/%s were not applied (%s); those messages will be delivered again",
                     self.topic, p, error.message)
            fut.set_result(error)
        self._conn.io_request(address, msg, (), self._request_timeout_ms, done)

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
            # Nothing queued: partitions that waited for a larger room may lease what there is.
            resume = not self._arrived and bool(self._paused) and not self._resume_asked
            self._resume_asked |= resume
        if resume:
            self._conn.submit(self._io_resume)
        with self._lock:
            chunk = self._next_arrived(deadline)
            if chunk is None:
                return False
            current = chunk.error is not None or chunk.epoch >= self._epochs.get(chunk.partition, 0)
        if chunk.error is not None:
            raise chunk.error
        if not current:
            self._release(len(chunk.deliveries))
            return True
        self._decode(chunk)
        return True

    def _release(self, n: int) -> None:
        """Leased messages dropped here (a seek made them stale): their room is free again."""
        with self._lock:
            self._in_flight -= n
            resume = bool(self._paused) and not self._resume_asked
            self._resume_asked |= resume
        if resume:
            self._conn.submit(self._io_resume)

    def _decode(self, chunk: _Chunk) -> None:
        p = chunk.partition
        # The leased offsets in order; the stored batches are walked once, beside them.
        wanted = sorted(chunk.deliveries.items())
        topic, epoch = self.topic, chunk.epoch
        out: list[GroupMessage] = []
        i, n = 0, len(wanted)
        frames = sorted(((zbatch.unpack_header(f).base_offset, f) for f in chunk.frames), key=lambda x: x[0])
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
            return sorted(self._assigned)

    def caught_up(self) -> bool:
        """True when the last lease of every held partition came back empty (nothing to deliver now)."""
        parts = self.assignment()
        return bool(parts) and all(self._caught_up.get(p, False) for p in parts) and not self._ready \
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
        for p in self._client._partitions_of(self.topic):
            end = self._client.list_offsets(self.topic, p, "latest").offset
            self._drop_queued(reset_group(self._client, self.topic, self.group, partition=p, to_offset=end))

    def position(self, partition: int) -> int:
        """The offset after the highest message this member handed out from `partition`, or where
        its last seek moved it (a nacked or expired message may still come again, below it)."""
        if partition not in self._positions:
            raise ValueError(f"this member has no position on partition {partition} yet: it handed out nothing "
                             "from it and did not seek it")
        return self._positions[partition]

    def _drop_arrived(self, partitions: set[int]) -> None:
        """I/O thread: partitions this member lost. Their leased messages not yet handed out are
        dropped here: the leader fails those leases and delivers them to the new owner."""
        with self._lock:
            kept = collections.deque(c for c in self._arrived if c.partition not in partitions or c.error)
            dropped = sum(len(c.deliveries) for c in self._arrived) - sum(len(c.deliveries) for c in kept)
            self._arrived = kept
            self._in_flight -= dropped

    def _drop_queued(self, reset: dict) -> None:
        """After a reset, what is queued here from before it (an older reset epoch) is dropped; the
        next leases bring the rest. Chunks of the new epoch may have arrived already, before the
        reset's own reply: those stay."""
        epochs = {row["partition"]: row.get("epoch", 0) for row in reset.get("partitions", [])}
        for row in reset.get("partitions", []):
            if type(row.get("offset")) is int:
                self._positions[row["partition"]] = row["offset"]
        with self._lock:
            for p, epoch in epochs.items():
                self._epochs[p] = max(self._epochs.get(p, 0), epoch)
            keep: collections.deque[_Chunk] = collections.deque()
            dropped = 0
            for c in self._arrived:
                if c.partition in epochs and c.epoch < epochs[c.partition]:
                    dropped += len(c.deliveries)
                else:
                    keep.append(c)
            self._arrived = keep
        kept = collections.deque(m for m in self._ready if m.partition not in epochs or m._epoch >= epochs[m.partition])
        dropped += len(self._ready) - len(kept)
        self._ready = kept
        if dropped:
            self._release(dropped)

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
            self._arrived.clear()
            self._arrived_cv.notify_all()
        self._ready.clear()
        if not self._conn.closed:
            address = self._coordinator or self._client._addresses()[0]
            try:
                self._client._call(address, G.LeaveGroup(self._conn.new_req_id(), self.group, self.member_id),
                                   close_leave_timeout_ms)
            except ZqError as e:
                log.info("group %s: leaving failed (%s); the session will expire instead", self.group, e)

    def __enter__(self) -> GroupConsumer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _when_all(futures: list[Future], done: Future) -> None:
    """Resolve `done` with the list of errors once every future has resolved."""
    if not futures:
        done.set_result([])
        return
    left = [len(futures)]
    lock = threading.Lock()

    def one(_f: Future) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            done.set_result([f.result() for f in futures if f.result() is not None])
    for f in futures:
        f.add_done_callback(one)


# ---------------------------------------------------------------------------- admin calls


def _ok(reply: Any) -> dict:
    if not isinstance(reply, protocol.OkReply):
        raise ProtocolError(f"expected OkReply, got {type(reply).__name__}")
    return dict(reply.data)


def describe_groups(client: Client, group: str | None = None) -> dict:
    """The `zq groups --json` document: {"groups": [{"group", "generation", "members", "partitions"}]}."""
    reply, _ = client._until_deadline("describing groups",
                                      lambda: client._call_any(lambda rid: G.DescribeGroups(rid, group)))
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
    client._partitions_of(topic)
    reply, _ = client._until_deadline(
        f"resetting group {group!r} on {topic!r}",
        lambda: client._call_any(lambda rid: G.ResetGroup(rid, group, topic, partition, to_offset, time_ms,
                                                          bool(earliest), False), resend_on_timeout=False),
        idempotent=False)
    return _ok(reply)


def dead_letters(client: Client, topic: str, max_messages: int | None = None, wait_s: float = 5.0) -> list[Message]:
    """The messages in TOPIC.dlq now (up to `max_messages`), oldest first per partition."""
    dlq = topic if topic.endswith(".dlq") else topic + ".dlq"
    parts = client._partitions_of(dlq)
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
