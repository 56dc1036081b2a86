"""The producer: batches records per partition and sends each batch to its partition's leader.

Theory of operation
-------------------
`send()` runs on the caller's thread and does as little as it can: it picks the partition (the
key's hash, `zq.hashing.partition_for_key`; a keyless record goes to the topic's *sticky*
partition, which moves round-robin each time a batch of it closes), takes buffer space, appends
`[create_time_ms, key, value, headers]` to the partition's *open* batch under one lock, and returns
a `BatchFuture` that shares its batch's Condition. An open batch *closes* when it reaches
`batch_size` bytes or `limits.batch_records_max` records, or `linger_ms` after its first record
(a timer on the I/O thread), or on `flush()`. With `linger_ms=0` there is no timer
(`zq.core.client_rules.closes_at_once`): a record that finds its partition idle (nothing in
flight, nothing queued) closes its batch in `send()` itself and leaves at once, from the caller's
thread when the I/O thread is idle (`Connection.run_now_or_submit`); otherwise its batch closes
on the I/O thread's next pass, or as soon as the partition frees up after that (fewer than
`max_in_flight` unacknowledged, none queued), with the records sent meanwhile.

A closed batch is handed to the client's I/O thread, which owns everything after that: per
partition a FIFO of *ready* batches, sent to the leader from the client's metadata while fewer
than `max_in_flight` batches of that partition (and `limits.producer_inflight_batches_max` in
all) await their acknowledgement. The batch is encoded once, with one `cbor2.dumps`, when first
sent; a retry sends the same bytes, the same `producer_id` and the same `base_sequence`, so an
idempotent leader can drop a duplicate.

Replies: success completes every future of the batch with `RecordMetadata(topic, partition,
base_offset + i, epoch)`. A retriable error (NotLeader, UnknownTopic, LeaderNotAvailable,
StorageFull, NotEnoughReplicas, Timeout) puts the batch back at the head of its partition's FIFO
after a bounded exponential backoff, following a NotLeader's leader hint at once and refreshing
metadata otherwise; after `retries` attempts, or on any other error, the batch's futures fail with
the error. With `max_in_flight=1` (the default) a partition's batches are appended in the order
they were sent even across retries. With acks=none the node sends no reply, so a batch's futures
complete as soon as it is handed to the socket, with offset -1 and epoch -1: nothing is known.

Invariants: buffered bytes <= `buffer_bytes` (send blocks up to `max_block_ms`, then BufferFull);
every batch handed to the I/O thread ends with its futures completed, by a reply, an error, or
`close()`; a partition's `base_sequence` grows by each batch's record count, modulo 2**31.
"""
from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
import zlib
from time import time_ns as _time_ns
from typing import TYPE_CHECKING, Any

from zq import batch as zbatch
from zq import protocol
from zq.client.futures import BatchFuture, FutureGroup, RecordMetadata
from zq.core.client_rules import closes_at_once
from zq.errors import (BufferFull, MessageTooLarge, NotLeader, ProducerClosed, ProtocolError, Timeout,
                       UnknownPartition, ZqError)

if TYPE_CHECKING:
    from zq.client.client import Client

log = logging.getLogger("zq.client")

record_overhead_bytes = 16       # what one record adds to a batch beyond key, value and headers
sequence_modulus = 2 ** 31       # base_sequence is a 4-byte field; it wraps like Kafka's
default_batch_bytes = 512 * 1024


def backoff_ms(attempt: int, initial_ms: int, max_ms: int) -> int:
    """Exponential backoff for the attempt-th retry (1-based), capped."""
    return min(max_ms, initial_ms * (2 ** min(attempt - 1, 20)))


def codec_for(compression: str | None) -> int:
    name = "none" if compression is None else compression
    if name not in zbatch.CODECS:
        raise ValueError(f"compression {compression!r} is not one of {sorted(zbatch.CODECS)}")
    return zbatch.CODECS[name]


def acks_level(acks: Any) -> int:
    if acks not in protocol.ACKS:
        raise ValueError(f"acks={acks!r} is not one of 'none', 'leader', 'quorum'")
    return protocol.ACKS[acks]


class _Batch(FutureGroup):
    """Records of one partition on their way to the leader; also what their futures share."""

    __slots__ = ("tp", "records", "size_bytes", "closed", "blob", "blob_crc", "count", "base_sequence",
                 "attempts", "retry_at_ms")

    def __init__(self, topic: str, partition: int) -> None:
        super().__init__(topic, partition)
        self.tp = (topic, partition)
        self.records: list[tuple] | None = []
        self.size_bytes = 0
        self.closed = False
        self.blob: bytes | None = None
        self.blob_crc = 0
        self.count = 0
        self.base_sequence = -1
        self.attempts = 0
        self.retry_at_ms = 0.0


class Producer:
    """Made by `Client.producer(...)`; see the module docstring for how it works."""

    def __init__(self, client: Client, acks: Any = "quorum", idempotent: bool = False, linger_ms: float = 5,
                 batch_size: int = default_batch_bytes, compression: str | None = None,
                 max_block_ms: int | None = None, buffer_bytes: int | None = None,
                 request_timeout_ms: int | None = None, retries: int | None = None,
                 max_in_flight: int = 1) -> None:
        limits = client.limits
        self._client = client
        self._cluster = client.cluster_view
        self._conn = self._cluster.conn
        self.acks = acks_level(acks)
        self.idempotent = bool(idempotent)
        if self.idempotent and self.acks == 0:
            raise ValueError("an idempotent producer needs acks='leader' or 'quorum': it must see each batch acknowledged")
        self.producer_id = self._new_producer_id() if self.idempotent else 0
        self.linger_ms = max(0.0, float(linger_ms))
        self._at_once = self.linger_ms == 0  # batches close by closes_at_once, not by a linger timer
        self.batch_size = max(1, min(int(batch_size), limits.batch_bytes_max))
        self.codec = codec_for(compression)
        self.max_block_ms = limits.producer_max_block_ms if max_block_ms is None else max_block_ms
        self.buffer_bytes = limits.producer_buffer_bytes_max if buffer_bytes is None else buffer_bytes
        self.request_timeout_ms = limits.producer_request_timeout_ms if request_timeout_ms is None else request_timeout_ms
        self.retries = limits.producer_retries_max if retries is None else retries
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self._message_bytes_max = limits.message_bytes_max
        self._records_max = limits.batch_records_max
        self._inflight_max = limits.producer_inflight_batches_max
        self._backoff_ms = limits.retry_backoff_ms
        self._backoff_ms_max = limits.retry_backoff_ms_max
        # Caller side, under _lock.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # buffer space freed, or a batch finished
        self._open: dict[tuple[str, int], _Batch] = {}
        self._buffered_bytes = 0
        self._unfinished_batches = 0
        self._sticky: dict[str, int] = {}
        self._partitions: dict[str, int] = {}
        self._closed = False
        # I/O thread side.
        self._ready: dict[tuple[str, int], collections.deque[_Batch]] = {}
        self._inflight: dict[tuple[str, int], int] = {}
        self._inflight_total = 0
        self._sequences: dict[tuple[str, int], int] = {}
        self._live: set[_Batch] = set()  # handed to the I/O thread and not yet finished

    @staticmethod
    def _new_producer_id() -> int:
        pid = 0
        while pid == 0:
            pid = secrets.randbits(63)  # random, so two producers never share an id without coordination
        return pid

    # ------------------------------------------------------------------ caller side

    def send(self, topic: str, value: bytes, key: bytes | None = None, headers: dict[str, bytes] | None = None,
             partition: int | None = None, timestamp_ms: int | None = None) -> BatchFuture:
        """Queue one record; the Future resolves to its RecordMetadata.

        Raises at once: MessageTooLarge, UnknownTopic (after waiting up to max_block_ms for it to
        appear), UnknownPartition, BufferFull (after max_block_ms), ProducerClosed, TypeError."""
        if value.__class__ is not bytes:
            value = _as_bytes(value, "value")
        size = len(value) + record_overhead_bytes
        if key is not None:
            if key.__class__ is not bytes:
                key = _as_bytes(key, "key")
            size += len(key)
        if headers:
            size += _headers_size(headers)
        elif headers is not None:
            headers = None
        if size > self._message_bytes_max:
            raise MessageTooLarge(f"a record of {size} bytes exceeds the limit of {self._message_bytes_max} bytes; "
                                  "send a smaller value or store it elsewhere and send a reference")
        nparts = self._partitions.get(topic) or self._learn_topic(topic)
        if partition is None:
            if key is not None:
                partition = (zlib.crc32(key) & 0xFFFFFFFF) % nparts  # = zq.hashing.partition_for_key, inlined
            else:
                partition = self._sticky.get(topic, 0)
        elif partition.__class__ is not int or not 0 <= partition < nparts:
            raise UnknownPartition(f"topic {topic!r} has partitions 0 to {nparts - 1}; partition {partition!r} does not exist")
        if timestamp_ms is None:
            timestamp_ms = _time_ns() // 1_000_000
        # acquire/release rather than `with`: half the cost, and this is the hot path.
        lock = self._lock
        lone = False
        lock.acquire()
        try:
            if self._closed:
                raise ProducerClosed("the producer was closed; create a new one with client.producer()")
            if self._buffered_bytes + size > self.buffer_bytes:
                self._wait_for_space(size)
            self._buffered_bytes += size
            b = self._open.get((topic, partition))
            if b is None:
                b = self._open_batch(topic, partition)
            records = b.records
            fut = BatchFuture(b, len(records))
            records.append((timestamp_ms, key, value, headers))  # cbor2 writes a tuple as an array
            b.size_bytes += size
            if b.size_bytes < self.batch_size and len(records) < self._records_max:
                if not self._at_once or len(records) > 1:
                    # Its linger timer closes it; or, without linger, its partition was busy when
                    # it opened, and the I/O thread closes it when the partition is free (it looks
                    # every time a partition frees up, so asking again here would only cost).
                    return fut
                if not closes_at_once(self.linger_ms, self._inflight.get(b.tp, 0), self.max_in_flight,
                                      len(self._ready.get(b.tp, ())), in_send=True):
                    self._conn.submit(lambda: self._io_close_if_free(b))   # the I/O thread's next pass decides
                    return fut
                lone = True
            self._close_batch(b)
        finally:
            lock.release()
        self._handoff(b, now=lone)
        return fut

    def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None,
                      headers: dict[str, bytes] | None = None, partition: int | None = None,
                      timestamp_ms: int | None = None) -> RecordMetadata:
        """Send one record and wait for its acknowledgement (or its error)."""
        return self.send(topic, value, key, headers, partition, timestamp_ms).result()

    def flush(self, timeout: float | None = None) -> None:
        """Send every buffered record now and wait until all have their outcome (Timeout if not in time)."""
        with self._lock:
            closing = list(self._open.values())
            for b in closing:
                self._close_batch(b)
        for b in closing:
            self._handoff(b)
        with self._lock:
            if not self._changed.wait_for(lambda: self._unfinished_batches == 0, timeout):
                raise Timeout(f"{self._unfinished_batches} batches still unacknowledged after {timeout} s")

    def close(self, timeout: float | None = None) -> None:
        """Flush, then refuse further sends. Records not acknowledged by `timeout` fail with ProducerClosed."""
        with self._lock:
            if self._closed:
                return
        try:
            self.flush(timeout)
        except Timeout:
            pass
        finally:
            with self._lock:
                self._closed = True
            self._abort(ProducerClosed("the producer was closed before this record was acknowledged"))

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def buffered_bytes(self) -> int:
        return self._buffered_bytes

    def _learn_topic(self, topic: str) -> int:
        n = self._cluster.partition_count(topic, wait_ms=self.max_block_ms)
        self._partitions[topic] = n
        return n

    def _wait_for_space(self, size: int) -> None:
        """Called under _lock with the buffer too full for `size` more bytes."""
        if size > self.buffer_bytes:
            raise MessageTooLarge(f"a record of {size} bytes is larger than the whole producer buffer ({self.buffer_bytes} bytes)")
        if self._conn.on_io_thread():
            raise BufferFull("the producer buffer is full and send() was called from a future's callback, "
                             "which must not block; send from another thread")
        # Full buffers must drain: close every open batch so the I/O thread can send it.
        for b in list(self._open.values()):
            self._close_batch(b)
            self._handoff(b)  # not on the I/O thread (checked above), and under _lock: only queue it
        ok = self._changed.wait_for(lambda: self._closed or self._buffered_bytes + size <= self.buffer_bytes,
                                    self.max_block_ms / 1000.0)
        if self._closed:
            raise ProducerClosed("the producer was closed while send() waited for buffer space")
        if not ok:
            raise BufferFull(f"the producer buffer ({self.buffer_bytes} bytes) stayed full for {self.max_block_ms} ms: "
                             "the cluster takes records more slowly than they are sent; slow down, or raise "
                             "buffer_bytes or max_block_ms")

    def _open_batch(self, topic: str, partition: int) -> _Batch:
        """Under _lock."""
        b = _Batch(topic, partition)
        self._open[b.tp] = b
        self._unfinished_batches += 1
        if not self._at_once:
            self._conn.call_later(self.linger_ms, lambda: self._io_on_linger(b))
        return b

    def _close_batch(self, b: _Batch) -> None:
        """Under _lock: no more records join `b`; the caller then hands it over with `_handoff`."""
        if b.closed is not False:
            return
        b.closed = True
        del self._open[b.tp]
        if self._sticky.get(b.topic, 0) == b.partition:
            self._sticky[b.topic] = (b.partition + 1) % self._partitions.get(b.topic, 1)

    def _handoff(self, b: _Batch, now: bool = False) -> None:
        """Give a closed batch to the I/O thread; with `now` (a lone record's batch, and not under
        _lock, which its callbacks take), on this very thread if the I/O thread is idle: no hand-off,
        no wake-up. A full batch is handed over: the I/O thread encodes and sends it (zlib and zmq
        let go of the GIL meanwhile) while this thread goes on filling the next."""
        if self._conn.on_io_thread():
            self._io_enqueue(b)
        elif now:
            self._conn.run_now_or_submit(lambda: self._io_enqueue(b))
        else:
            self._conn.submit(lambda: self._io_enqueue(b))

    def _finished(self, b: _Batch) -> None:
        """Any thread: `b`'s futures are complete; give back its buffer space."""
        with self._lock:
            self._buffered_bytes -= b.size_bytes
            self._unfinished_batches -= 1
            self._changed.notify_all()

    def _abort(self, error: ZqError) -> None:
        """Fail every record not yet acknowledged (used by close)."""
        with self._lock:
            leftovers = list(self._open.values())
            for b in leftovers:
                b.closed = True
            self._open.clear()
        for b in leftovers:
            self._complete(b, error=error)
        if self._conn.closed:
            self._io_abort(error)
        else:
            try:
                done = threading.Event()

                def run() -> None:
                    self._io_abort(error)
                    done.set()

                if self._conn.on_io_thread():
                    run()
                else:
                    self._conn.submit(run)
                    done.wait(5.0)
            except ZqError:
                self._io_abort(error)

    def _complete(self, b: _Batch, base_offset: int = -1, epoch: int = -1, error: ZqError | None = None) -> None:
        b.complete(base_offset, epoch, error)
        self._finished(b)

    # ------------------------------------------------------------------ I/O thread side

    def _io_on_linger(self, b: _Batch) -> None:
        with self._lock:
            if b.closed is not False:
                return
            self._close_batch(b)
        self._io_enqueue(b)

    def _io_enqueue(self, b: _Batch) -> None:
        if b.closed is None:  # aborted meanwhile
            return
        self._live.add(b)
        self._ready.setdefault(b.tp, collections.deque()).append(b)
        self._io_drain()

    def _io_abort(self, error: ZqError) -> None:
        live = sorted(self._live, key=lambda b: (b.tp, b.base_sequence))
        self._live.clear()
        self._ready.clear()
        for b in live:
            b.closed = None
            self._complete(b, error=error)

    def _io_drain(self) -> None:
        """Send what may be sent now; then, without linger, close the open batches of partitions
        that are free now (they gathered records while their partition was busy) and send those."""
        self._io_send_ready()
        if self._at_once and self._open and self._io_close_free():
            self._io_send_ready()

    def _io_close_if_free(self, b: _Batch) -> None:
        """Without linger, the pass after `b` opened in a busy partition: close it now if its
        partition could send it, else it stays open until `_io_close_free` finds it free."""
        with self._lock:
            if b.closed is not False or not closes_at_once(
                    self.linger_ms, self._inflight.get(b.tp, 0), self.max_in_flight, len(self._ready.get(b.tp, ())),
                    in_send=False):
                return
            self._close_batch(b)
        self._io_enqueue(b)

    def _io_close_free(self) -> bool:
        """Without linger: close and queue each open batch whose partition could send it now."""
        with self._lock:
            free = [b for b in self._open.values()
                    if closes_at_once(self.linger_ms, self._inflight.get(b.tp, 0), self.max_in_flight,
                                      len(self._ready.get(b.tp, ())), in_send=False)]
            for b in free:
                self._close_batch(b)
        for b in free:
            self._live.add(b)
            self._ready.setdefault(b.tp, collections.deque()).append(b)
        return bool(free)

    def _io_send_ready(self) -> None:
        """Send what may be sent now: head of each partition's FIFO, within the in-flight bounds."""
        now = time.monotonic() * 1000.0
        for tp in list(self._ready):
            q = self._ready.get(tp)
            if q is None:
                continue  # a callback run by this very drain sent it already
            while q and self._inflight.get(tp, 0) < self.max_in_flight and self._inflight_total < self._inflight_max:
                b = q[0]
                if b.retry_at_ms > now:
                    break  # its backoff timer drains again
                address = self._cluster.leader_address(b.topic, b.partition)
                if address is None:
                    q.popleft()
                    self._io_retry_later(b, NotLeader(f"no leader known for {b.topic}/{b.partition}"), front=True)
                    break
                q.popleft()
                self._io_send(b, address)
            if not q and self._ready.get(tp) is q:
                del self._ready[tp]

    def _io_send(self, b: _Batch, address: str) -> None:
        if b.blob is None:
            if not self._io_encode(b):
                return
        rid = self._conn.new_req_id()
        msg = protocol.Produce(rid, b.topic, b.partition, self.acks, b.count, b.blob_crc, self.producer_id,
                               max(0, b.base_sequence), self.codec)
        if self.acks == 0:
            self._conn.io_request(address, msg, [b.blob], self.request_timeout_ms, None)
            self._live.discard(b)
            self._complete(b)  # offset and epoch -1: unknown
            return
        self._inflight[b.tp] = self._inflight.get(b.tp, 0) + 1
        self._inflight_total += 1
        self._conn.io_request(address, msg, [b.blob], self.request_timeout_ms,
                              lambda reply, frames, error: self._io_on_reply(b, address, reply, error))

    def _io_encode(self, b: _Batch) -> bool:
        records = b.records
        assert records is not None
        b.count = len(records)
        try:
            b.blob = zbatch.encode_records(records, self.codec)
        except Exception as e:  # cbor2 refuses a value it cannot encode, e.g. a header that is not bytes
            self._io_fail(b, ZqError(f"could not encode a batch for {b.topic}/{b.partition}: {e}"))
            return False
        b.records = None  # the blob is what gets sent (and resent): free the records now
        b.blob_crc = zbatch.crc(b.blob)
        if self.idempotent:
            seq = self._sequences.get(b.tp, 0)
            b.base_sequence = seq
            self._sequences[b.tp] = (seq + b.count) % sequence_modulus
        return True

    def _io_on_reply(self, b: _Batch, address: str, reply: Any, error: ZqError | None) -> None:
        self._inflight[b.tp] -= 1
        self._inflight_total -= 1
        if b.closed is None:
            return  # aborted by close(); its futures are complete already
        if error is None and not isinstance(reply, protocol.ProduceReply):
            error = ProtocolError(f"expected ProduceReply, {address} sent {type(reply).__name__}")
        if error is None:
            self._live.discard(b)
            self._complete(b, reply.base_offset, reply.epoch)
        elif error.retriable and b.attempts < self.retries:
            if isinstance(error, NotLeader) and error.address is not None:
                self._cluster.hint_leader(b.topic, b.partition, error.address)
            else:
                self._cluster.refresh_soon()
            self._io_retry_later(b, error, front=True)
        else:
            self._io_fail(b, error)
        self._io_drain()

    def _io_retry_later(self, b: _Batch, error: ZqError, front: bool) -> None:
        b.attempts += 1
        if b.attempts > self.retries:
            self._io_fail(b, error)
            return
        hinted = isinstance(error, NotLeader) and "address" in error.data and b.attempts == 1
        delay = 0 if hinted else backoff_ms(b.attempts, self._backoff_ms, self._backoff_ms_max)
        if not hinted:
            self._cluster.refresh_soon()
        b.retry_at_ms = time.monotonic() * 1000.0 + delay
        q = self._ready.setdefault(b.tp, collections.deque())
        q.appendleft(b) if front else q.append(b)
        self._conn.io_call_later(delay, self._io_drain)
        log.debug("retrying %s/%s in %s ms after %s", b.topic, b.partition, delay, error.code)

    def _io_fail(self, b: _Batch, error: ZqError) -> None:
        self._live.discard(b)
        self._complete(b, error=error)


def _as_bytes(value: Any, what: str) -> bytes:
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        raise TypeError(f"the {what} must be bytes, not str: encode it, e.g. {what}.encode()")
    raise TypeError(f"the {what} must be bytes, not {type(value).__name__}")


def _headers_size(headers: dict[str, bytes]) -> int:
    size = 0
    for k, v in headers.items():
        if k.__class__ is not str or v.__class__ is not bytes:
            raise TypeError("headers map str names to bytes values")
        size += len(k) + len(v) + 4
    return size
