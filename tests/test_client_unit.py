"""The client against fake nodes: ROUTER sockets on 127.0.0.1, each in a thread, speaking zq.protocol.

The fake keeps each partition as a list of stored batches (zq.batch.make_stored), answers the
requests a real node answers, and lets a test intercept any request to drop it or answer it
otherwise, so every edge of the client is reachable in milliseconds.
"""
from __future__ import annotations

import asyncio
import sys
import threading
import time
import types
from concurrent.futures import Future, as_completed
from datetime import datetime, timezone

import pytest
import zmq

import zq
from zq import batch as zbatch
from zq import protocol
from zq.client.futures import BatchFuture
from zq.errors import (BufferFull, ConnectionFailed, InvalidRequest, MessageTooLarge, ProducerClosed, Rejected,
                       StorageFull, Timeout, TopicExists, UnknownTopic, ZqError)
from zq.hashing import partition_for_key
from zq.limits import Limits

FAST = Limits(request_timeout_ms=400, producer_request_timeout_ms=400, retry_backoff_ms=5, retry_backoff_ms_max=20,
              producer_max_block_ms=400, create_wait_ms_max=200, api_timeout_ms=1_000)

DROP = object()  # an intercept result: swallow the request, never answer


class FakeCluster:
    """Shared state of some fake nodes: topics, placement, logs. Node 0 is the metadata leader."""

    def __init__(self, n: int = 1) -> None:
        self.lock = threading.RLock()
        self.topics: dict[str, dict] = {}
        self.logs: dict[tuple[str, int], list[bytes]] = {}
        self.log_start: dict[tuple[str, int], int] = {}
        self.next_topic_id = 1
        self.requests: list[tuple[str, object]] = []  # (node name, message) in arrival order
        self.intercept = None  # fn(node, msg, payload) -> None (default) | DROP | (reply, payload)
        self.stale_leader: dict[tuple[str, int], str] = {}  # what metadata claims, when it lies
        self.nodes = [FakeNode(self, f"n{i + 1}") for i in range(n)]
        for node in self.nodes:
            node.start()

    @property
    def bootstrap(self) -> str:
        return ",".join(n.address for n in self.nodes)

    def node(self, name: str) -> FakeNode:
        return next(n for n in self.nodes if n.name == name)

    def close(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> FakeCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # state helpers, under lock
    def create(self, name: str, partitions: int, leaders: list[str] | None = None, config: dict | None = None) -> int:
        with self.lock:
            tid = self.next_topic_id
            self.next_topic_id += 1
            names = [n.name for n in self.nodes]
            leaders = leaders or [names[p % len(names)] for p in range(partitions)]
            self.topics[name] = {"name": name, "id": tid, "config": config or {},
                                 "partitions": [{"partition": p, "leader": leaders[p], "epoch": 1, "replicas": [leaders[p]]}
                                                for p in range(partitions)]}
            for p in range(partitions):
                self.logs[(name, p)] = []
                self.log_start[(name, p)] = 0
            return tid

    def leader(self, topic: str, p: int) -> str:
        return self.topics[topic]["partitions"][p]["leader"]

    def log_end(self, tp: tuple[str, int]) -> int:
        batches = self.logs[tp]
        return zbatch.unpack_header(batches[-1]).next_offset if batches else self.log_start[tp]

    def records(self, topic: str, p: int) -> list[zbatch.Record]:
        with self.lock:
            return [r for b in self.logs[(topic, p)] for r in zbatch.iter_records(b)]

    def produce_requests(self, node: str | None = None) -> list:
        return [m for n, m in self.requests if isinstance(m, protocol.Produce) and (node is None or n == node)]

    def metadata(self, req_id: int) -> protocol.MetadataReply:
        topics = []
        for t in self.topics.values():
            parts = [dict(p, leader=self.stale_leader.get((t["name"], p["partition"]), p["leader"])) for p in t["partitions"]]
            topics.append(dict(t, partitions=parts))
        nodes = [{"name": n.name, "host": "127.0.0.1", "port": n.port, "state": "alive"} for n in self.nodes]
        return protocol.MetadataReply(req_id, "zq", nodes, topics)


class FakeNode:
    def __init__(self, cluster: FakeCluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"127.0.0.1:{self.port}"
        self.stopping = threading.Event()
        self.parked: list[tuple[bytes, protocol.Fetch, float]] = []
        self.thread = threading.Thread(target=self.run, name=f"fake-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.sock.poll(10):
                frames = self.sock.recv_multipart()
                ident, rest = frames[0], frames[1:]
                msg, payload = protocol.decode(rest)
                with self.cluster.lock:
                    self.cluster.requests.append((self.name, msg))
                    self.handle(ident, msg, payload)
            with self.cluster.lock:
                self.serve_parked()

    def reply(self, ident: bytes, msg: object, *payload: bytes) -> None:
        self.sock.send_multipart([ident, *protocol.encode(msg, *payload)])

    def error(self, ident: bytes, req_id: int, code: str, data: dict | None = None) -> None:
        self.reply(ident, protocol.ErrorReply(req_id, code, f"fake {code}", data or {}))

    def not_leader(self, ident: bytes, req_id: int, leader: str) -> None:
        self.error(ident, req_id, "not_leader", {"leader": leader, "address": self.cluster.node(leader).address})

    def handle(self, ident: bytes, msg: object, payload: list) -> None:
        c = self.cluster
        if c.intercept is not None:
            out = c.intercept(self, msg, payload)
            if out is DROP:
                return
            if out is not None:
                self.reply(ident, out[0], *out[1])
                return
        if isinstance(msg, protocol.MetadataRequest):
            self.reply(ident, c.metadata(msg.req_id))
        elif isinstance(msg, protocol.StatusRequest):
            parts = [{"topic": t, "partition": p, "leader": c.leader(t, p), "epoch": 1, "replicas": [c.leader(t, p)],
                      "in_sync": [c.leader(t, p)], "log_start": c.log_start[(t, p)], "log_end": c.log_end((t, p)),
                      "high_watermark": c.log_end((t, p)), "replication_lag": 0}
                     for t in sorted(c.topics) for p in range(len(c.topics[t]["partitions"])) if c.leader(t, p) == self.name]
            self.reply(ident, protocol.StatusReply(msg.req_id, {"nodes": [], "partitions": parts}))
        elif isinstance(msg, (protocol.CreateTopic, protocol.DeleteTopic)):
            if self.name != c.nodes[0].name:
                return self.not_leader(ident, msg.req_id, c.nodes[0].name)
            if isinstance(msg, protocol.CreateTopic):
                if msg.name in c.topics:
                    return self.error(ident, msg.req_id, "topic_exists")
                tid = c.create(msg.name, msg.partitions, config=msg.config)
            else:
                if msg.name not in c.topics:
                    return self.error(ident, msg.req_id, "unknown_topic")
                tid = c.topics.pop(msg.name)["id"]
            self.reply(ident, protocol.OkReply(msg.req_id, {"topic": msg.name, "id": tid}))
        elif isinstance(msg, protocol.FetchMany):
            if msg.topic not in c.topics:
                return self.error(ident, msg.req_id, "unknown_topic")
            if not self.answer_fetch_many(ident, msg, force=msg.max_wait_ms == 0):
                self.parked.append((ident, msg, time.monotonic() + msg.max_wait_ms / 1000))
        elif isinstance(msg, (protocol.Produce, protocol.Fetch, protocol.ListOffsets)):
            if msg.topic not in c.topics:
                return self.error(ident, msg.req_id, "unknown_topic")
            leader = c.leader(msg.topic, msg.partition)
            if leader != self.name:
                return self.not_leader(ident, msg.req_id, leader)
            getattr(self, "on_" + type(msg).__name__.lower())(ident, msg, payload)

    def on_produce(self, ident: bytes, msg: protocol.Produce, payload: list) -> None:
        tp = (msg.topic, msg.partition)
        blob = payload[0]
        zbatch.check_incoming(blob, msg.blob_crc, msg.count, 4 << 20, 100_000)
        base = self.cluster.log_end(tp)
        self.cluster.logs[tp].append(zbatch.make_stored(msg.flags, base, msg.count, 1, int(time.time() * 1000),
                                                        msg.producer_id, msg.base_sequence, msg.blob_crc, blob))
        if msg.acks:
            self.reply(ident, protocol.ProduceReply(msg.req_id, base, 1, int(time.time() * 1000), 0))

    def on_fetch(self, ident: bytes, msg: protocol.Fetch, payload: list) -> None:
        tp = (msg.topic, msg.partition)
        if not self.cluster.log_start[tp] <= msg.offset <= self.cluster.log_end(tp):
            return self.error(ident, msg.req_id, "offset_out_of_range",
                              {"log_start": self.cluster.log_start[tp], "high_watermark": self.cluster.log_end(tp)})
        if not self.answer_fetch(ident, msg, force=msg.max_wait_ms == 0):
            self.parked.append((ident, msg, time.monotonic() + msg.max_wait_ms / 1000))

    def batches_from(self, tp: tuple[str, int], offset: int, max_bytes: int) -> list[bytes]:
        out, size = [], 0
        # As zq.io.store.read: consecutive batches, stopping at the first that does not fit.
        for b in self.cluster.logs[tp]:
            if zbatch.unpack_header(b).next_offset <= offset:
                continue
            if out and size + len(b) > max_bytes:
                break
            out.append(b)
            size += len(b)
            if size >= max_bytes:
                break
        return out

    def answer_fetch_many(self, ident: bytes, msg: protocol.FetchMany, force: bool) -> bool:
        """As zq.node.clients answers a FetchMany: each partition as its own Fetch would be."""
        c = self.cluster
        results, errors, out = [], [], []
        for p, offset in msg.partitions:
            tp = (msg.topic, p)
            leader = c.leader(msg.topic, p)
            if leader != self.name:
                errors.append([p, "not_leader", "fake not_leader", {"leader": leader, "address": c.node(leader).address}])
                continue
            start, end = c.log_start[tp], c.log_end(tp)
            if not start <= offset <= end:
                errors.append([p, "offset_out_of_range", "fake offset_out_of_range",
                               {"log_start": start, "high_watermark": end}])
                continue
            got = self.batches_from(tp, offset, msg.max_bytes)
            results.append([p, end, start, end, len(got)])
            out += got
        if not out and not errors and not force:
            return False
        self.reply(ident, protocol.FetchManyReply(msg.req_id, results, errors), *out)
        return True

    def answer_fetch(self, ident: bytes, msg: protocol.Fetch, force: bool) -> bool:
        tp = (msg.topic, msg.partition)
        out = self.batches_from(tp, msg.offset, msg.max_bytes)
        if not out and not force:
            return False
        end = self.cluster.log_end(tp)
        self.reply(ident, protocol.FetchReply(msg.req_id, end, self.cluster.log_start[tp], end), *out)
        return True

    def serve_parked(self) -> None:
        now = time.monotonic()
        keep = []
        for ident, msg, deadline in self.parked:
            answer = self.answer_fetch_many if isinstance(msg, protocol.FetchMany) else self.answer_fetch
            if not answer(ident, msg, force=now >= deadline):
                keep.append((ident, msg, deadline))
        self.parked = keep

    def on_listoffsets(self, ident: bytes, msg: protocol.ListOffsets, payload: list) -> None:
        tp = (msg.topic, msg.partition)
        start, end = self.cluster.log_start[tp], self.cluster.log_end(tp)
        if msg.spec == "earliest":
            offset = start
        elif msg.spec == "latest":
            offset = end
        else:
            offset = next((r.offset for r in self.cluster.records(*tp) if r.timestamp_ms >= msg.spec), end)
        self.reply(ident, protocol.OffsetsReply(msg.req_id, offset, start, end))


@pytest.fixture
def cluster():
    with FakeCluster(1) as c:
        c.create("t", 4)
        yield c


@pytest.fixture
def client(cluster):
    with zq.Client(cluster.bootstrap, limits=FAST) as cl:
        yield cl


def wait_until(cond, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


# ---------------------------------------------------------------------------------- producer


def test_keyed_records_go_to_the_hash_partition_every_time(cluster, client):
    producer = client.producer(linger_ms=1)
    keys = [f"user:{i}".encode() for i in range(40)]
    futures = [producer.send("t", b"v" + k, key=k) for k in keys + keys]
    metas = [f.result(3) for f in futures]
    for k, m in zip(keys + keys, metas):
        assert m.partition == partition_for_key(k, 4)
        assert m.topic == "t" and m.epoch == 1
    for p in range(4):
        stored = cluster.records("t", p)
        assert [r.key for r in stored] == [k for k in keys + keys if partition_for_key(k, 4) == p]
        assert [r.offset for r in stored] == list(range(len(stored)))
    # offsets reported to the futures are the ones the node assigned
    for k, m in zip(keys + keys, metas):
        assert cluster.records("t", m.partition)[m.offset].value == b"v" + k


def test_keyless_records_stick_to_one_partition_per_batch_then_move_on(cluster, client):
    producer = client.producer(linger_ms=1000, batch_size=1000)
    futures = [producer.send("t", b"x" * 100) for _ in range(40)]  # ~116 bytes each: 9 per batch
    producer.flush(3)
    partitions = [f.result().partition for f in futures]
    runs = [partitions[0]]
    for p in partitions[1:]:
        if p != runs[-1]:
            runs.append(p)
    assert runs[:4] == [0, 1, 2, 3]  # round-robin, one batch at a time
    assert len(set(partitions)) == 4
    counts = [r.count for r in cluster.produce_requests()]
    assert counts[:4] == [9, 9, 9, 9] and sum(counts) == 40


def test_linger_gathers_records_into_one_batch(cluster, client):
    producer = client.producer(linger_ms=80)
    t0 = time.monotonic()
    futures = [producer.send("t", b"m%d" % i, partition=2) for i in range(10)]
    time.sleep(0.03)
    assert not any(f.done() for f in futures)  # still lingering
    offsets = [f.result(3).offset for f in futures]
    assert time.monotonic() - t0 >= 0.075
    assert offsets == list(range(10))
    assert [r.count for r in cluster.produce_requests()] == [10]


def test_flush_sends_without_waiting_for_linger(cluster, client):
    producer = client.producer(linger_ms=10_000)
    f = producer.send("t", b"now", partition=0)
    t0 = time.monotonic()
    producer.flush(2)
    assert time.monotonic() - t0 < 1.0
    assert f.result(0).offset == 0


def test_without_linger_a_lone_record_leaves_at_once_and_a_busy_partition_gathers_the_rest(cluster, client):
    dropped = []

    def drop_first(node, msg, payload):
        if isinstance(msg, protocol.Produce) and not dropped:
            dropped.append(msg)
            return DROP   # unanswered: the partition stays busy until the request times out
        return None

    cluster.intercept = drop_first
    producer = client.producer(linger_ms=0, request_timeout_ms=1_000, retries=3)   # max_in_flight 1
    first = producer.send("t", b"first", partition=0)
    assert not producer._open   # closed in send() itself: no linger timer, no wait for the I/O thread
    wait_until(lambda: dropped)
    rest = [producer.send("t", v, partition=0) for v in (b"a", b"b", b"c")]
    assert len(producer._open) == 1   # the partition is busy: they gather in one open batch
    assert [f.result(5).offset for f in [first] + rest] == [0, 1, 2, 3]
    # The first, its retry after the timeout, then the three together once the partition was free.
    assert [r.count for r in cluster.produce_requests()] == [1, 1, 3]


def test_a_lone_record_is_sent_from_the_callers_thread_while_the_io_thread_is_idle(cluster, client):
    conn = client._conn
    senders = []
    plain_send = conn._try_send

    def try_send(peer, frames):
        senders.append(threading.current_thread().name)
        return plain_send(peer, frames)

    conn._try_send = try_send
    producer = client.producer(linger_ms=0)
    me = threading.current_thread().name
    offsets = []
    for i in range(20):
        offsets.append(producer.send("t", b"v%d" % i, partition=3).result(3).offset)   # every reply still arrives
        time.sleep(0.01)   # the I/O thread goes back to sleep
    assert offsets == list(range(20))
    # No hand-off to the I/O thread for (most of) them: the caller sent them itself.
    assert senders.count(me) >= 1 and set(senders) <= {me, conn._thread.name}


def watch_sleeps(conn, missed_something) -> list:
    """Wrap the client I/O thread's poll(2): the returned list gets the timeout of every sleep that
    ended with nothing ready while `missed_something()` held (something was there to do)."""
    missed: list = []

    class Watched:
        def __init__(self, fds):
            self.fds = fds

        def register(self, fd, events):
            self.fds.register(fd, events)

        def poll(self, timeout):
            ready = self.fds.poll(timeout)
            if not ready and timeout > 0 and missed_something():
                missed.append(timeout)
            return ready

    conn._fds = Watched(conn._fds)
    return missed


def test_no_reply_waits_in_a_socket_while_the_io_thread_sleeps(cluster, client):
    """Callers sending from their own threads read and re-arm the sockets' edge-triggered ZMQ_FD:
    whenever the I/O thread's poll(2) ends with nothing ready, no socket may hold a reply (one
    would have waited there unnoticed until the poll's timeout)."""
    conn = client._conn

    def reply_waiting() -> bool:
        with conn._io_lock:   # as the I/O thread is about to: nobody else touches a socket
            return any(s.getsockopt(zmq.EVENTS) & zmq.POLLIN for s in conn._by_socket)

    missed = watch_sleeps(conn, reply_waiting)
    producer = client.producer(linger_ms=0, max_in_flight=4)

    def load(p: int) -> None:
        for i in range(60):
            producer.send("t", b"%d" % i, partition=p).result(5)

    threads = [threading.Thread(target=load, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [len(cluster.records("t", p)) for p in range(4)] == [60] * 4
    assert missed == []


def test_no_submitted_work_waits_while_the_io_thread_sleeps(client):
    """Whenever the I/O thread's poll(2) ends with nothing ready, no submitted work may be waiting:
    a submit that wrote no wake-up byte (one was pending already) must never be left unread."""
    conn = client._conn
    missed = watch_sleeps(conn, lambda: bool(conn._work))

    def load() -> None:
        for _ in range(500):
            done = threading.Event()
            conn.submit(done.set)
            done.wait(5)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert missed == []


def test_with_linger_a_lone_record_waits_for_it(cluster, client):
    producer = client.producer(linger_ms=10_000)
    producer.send("t", b"lone", partition=0)
    assert len(producer._open) == 1   # the user asked for a linger: it is not closed at once
    producer.flush(3)
    assert [r.count for r in cluster.produce_requests()] == [1]


def test_send_futures_are_real_futures(cluster, client):
    producer = client.producer(linger_ms=1)
    seen = []
    futures = [producer.send("t", b"a", partition=1) for _ in range(5)]
    futures[0].add_done_callback(lambda f: seen.append(f.result().offset))
    assert all(isinstance(f, Future) and isinstance(f, BatchFuture) for f in futures)
    assert sorted(f.result().offset for f in as_completed(futures, timeout=3)) == [0, 1, 2, 3, 4]
    assert seen == [0]
    assert futures[1].cancel() is False  # a handed-over record cannot be taken back
    late = []
    futures[2].add_done_callback(lambda f: late.append(f.result().offset))  # done already: runs at once
    assert late == [2]


def test_full_buffer_blocks_then_raises_buffer_full(cluster, client):
    cluster.intercept = lambda node, msg, payload: DROP if isinstance(msg, protocol.Produce) else None
    producer = client.producer(linger_ms=0, buffer_bytes=1000, max_block_ms=200, request_timeout_ms=5000)
    for _ in range(8):
        producer.send("t", b"x" * 100, partition=0)  # 116 bytes each: 928 of 1000
    t0 = time.monotonic()
    with pytest.raises(BufferFull) as e:
        producer.send("t", b"x" * 100, partition=0)
    assert 0.19 <= time.monotonic() - t0 < 1.5
    assert e.value.retriable and "max_block_ms" in str(e.value)
    assert producer.buffered_bytes == 928
    producer.close(timeout=0)  # nothing will be acknowledged: fail the rest now


def test_buffer_space_returns_when_batches_are_acknowledged(cluster, client):
    producer = client.producer(linger_ms=0, buffer_bytes=2000, max_block_ms=2000)
    futures = [producer.send("t", b"y" * 100, partition=3) for _ in range(200)]  # 10x the buffer
    assert [f.result(3).offset for f in futures] == list(range(200))
    assert producer.buffered_bytes == 0


def test_record_larger_than_the_limit_is_refused_at_send(cluster):
    with zq.Client(cluster.bootstrap, limits=Limits(message_bytes_max=1000)) as client:
        producer = client.producer()
        with pytest.raises(MessageTooLarge) as e:
            producer.send("t", b"z" * 1000)
        assert isinstance(e.value, Rejected)
        with pytest.raises(TypeError):
            producer.send("t", "text is not bytes")
    assert cluster.produce_requests() == []


def test_unknown_topic_is_raised_at_send_after_waiting(cluster, client):
    producer = client.producer(max_block_ms=150)
    t0 = time.monotonic()
    with pytest.raises(UnknownTopic):
        producer.send("nope", b"v")
    assert time.monotonic() - t0 >= 0.14


def test_not_leader_is_followed_to_the_hinted_node():
    with FakeCluster(2) as cluster:
        cluster.create("t", 1, leaders=["n2"])
        cluster.stale_leader[("t", 0)] = "n1"  # metadata still names the old leader
        with zq.Client(cluster.nodes[0].address, limits=FAST) as client:
            producer = client.producer(linger_ms=0)
            meta = producer.send("t", b"hello").result(3)
            assert meta.offset == 0
            assert len(cluster.produce_requests("n1")) == 1  # refused once, with the hint
            assert len(cluster.produce_requests("n2")) == 1
            assert [r.value for r in cluster.records("t", 0)] == [b"hello"]
            assert client.list_offsets("t", 0, "latest").offset == 1  # also follows the hint


def test_idempotent_retry_resends_the_same_sequence(cluster, client):
    failures = []

    def flaky(node, msg, payload):
        if isinstance(msg, protocol.Produce) and len(failures) < 2:
            failures.append(msg)
            return protocol.ErrorReply(msg.req_id, "storage_full", "disk full", {}), []
        return None

    cluster.intercept = flaky
    producer = client.producer(idempotent=True, linger_ms=0)
    first = producer.send("t", b"a", partition=0).result(3)
    second = producer.send("t", b"b", partition=0).result(3)
    sent = cluster.produce_requests()
    assert [m.base_sequence for m in sent] == [0, 0, 0, 1]  # two refusals, the retry, the next batch
    assert len({m.producer_id for m in sent}) == 1 and sent[0].producer_id > 0
    assert (first.offset, second.offset) == (0, 1)


def test_rejected_errors_fail_at_once_retriable_ones_are_retried(cluster, client):
    replies = {"a": "message_too_large", "b": "invalid_request"}

    def refuse(node, msg, payload):
        if isinstance(msg, protocol.Produce):
            value = zbatch.decode_records(payload[0], 0)[0][2].decode()
            if value in replies:
                return protocol.ErrorReply(msg.req_id, replies[value], "refused", {}), []
        return None

    cluster.intercept = refuse
    producer = client.producer(linger_ms=0)
    with pytest.raises(MessageTooLarge):
        producer.send("t", b"a", partition=0).result(3)
    with pytest.raises(InvalidRequest):
        producer.send("t", b"b", partition=0).result(3)
    assert len(cluster.produce_requests()) == 2  # neither was retried

    producer = client.producer(linger_ms=0, retries=2)
    cluster.intercept = lambda node, msg, payload: (protocol.ErrorReply(msg.req_id, "storage_full", "full", {}), []) \
        if isinstance(msg, protocol.Produce) else None
    with pytest.raises(StorageFull):
        producer.send("t", b"c", partition=0).result(3)
    assert len(cluster.produce_requests()) == 2 + 3  # the first try and two retries


def test_acks_none_resolves_without_a_reply(cluster, client):
    producer = client.producer(acks="none", linger_ms=0)
    meta = producer.send("t", b"fire", partition=1).result(3)
    assert meta == zq.RecordMetadata("t", 1, -1, -1)  # the node never says where it went
    wait_until(lambda: [r.value for r in cluster.records("t", 1)] == [b"fire"])
    assert cluster.produce_requests()[0].acks == 0


def test_request_timeout_raises_timeout(cluster, client):
    cluster.intercept = lambda node, msg, payload: DROP if isinstance(msg, (protocol.ListOffsets, protocol.Produce)) else None
    t0 = time.monotonic()
    with pytest.raises(Timeout) as e:
        client.list_offsets("t", 0, "earliest")
    assert time.monotonic() - t0 < 5
    assert "did not succeed in" in str(e.value) and "api_timeout_ms" in str(e.value)  # retried until the deadline
    producer = client.producer(linger_ms=0, retries=0, request_timeout_ms=200)
    with pytest.raises(Timeout) as e:
        producer.send("t", b"lost?", partition=0).result(3)
    assert "unknown" in str(e.value)


def test_unreachable_node_is_connection_failed_not_timeout():
    with socket_port() as port:
        with zq.Client(f"127.0.0.1:{port}", limits=FAST) as client:
            with pytest.raises(ConnectionFailed) as e:
                client.topics()
            assert "127.0.0.1" in str(e.value)


class socket_port:
    """A port nothing listens on (bound, then released)."""

    def __enter__(self) -> int:
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        pass


def test_close_fails_what_was_never_acknowledged(cluster, client):
    cluster.intercept = lambda node, msg, payload: DROP if isinstance(msg, protocol.Produce) else None
    producer = client.producer(linger_ms=0, request_timeout_ms=10_000)
    f = producer.send("t", b"stuck", partition=0)
    producer.close(timeout=0.1)
    with pytest.raises(ProducerClosed):
        f.result(2)
    with pytest.raises(ProducerClosed):
        producer.send("t", b"after", partition=0)


# ---------------------------------------------------------------------------------- admin


def test_create_is_redirected_to_the_metadata_leader_and_describe_lists_partitions():
    with FakeCluster(3) as cluster:
        with zq.Client(cluster.nodes[2].address, limits=FAST) as client:  # n3 is not the metadata leader
            out = client.create_topic("orders", partitions=3, retention="7d")
            assert out["topic"] == "orders" and out["id"] >= 1
            creates = [(n, m) for n, m in cluster.requests if isinstance(m, protocol.CreateTopic)]
            assert [n for n, _ in creates] == ["n3", "n1"]
            with pytest.raises(TopicExists):
                client.create_topic("orders", partitions=3)
            assert [t["name"] for t in client.topics()] == ["orders"]
            assert client.topics()[0]["partitions"] == 3
            client.producer(linger_ms=0).send("orders", b"x", partition=1).result(3)
            d = client.describe_topic("orders")
            assert d["name"] == "orders" and d["config"] == {"retention": "7d"}
            assert [(p["partition"], p["leader"], p["log_end"], p["high_watermark"]) for p in d["partitions"]] == \
                [(0, "n1", 0, 0), (1, "n2", 1, 1), (2, "n3", 0, 0)]
            client.delete_topic("orders")
            assert client.topics() == []
            with pytest.raises(UnknownTopic):
                client.describe_topic("orders")


def test_status_comes_from_a_node(cluster, client):
    s = client.status()
    assert {p["partition"] for p in s["partitions"]} == {0, 1, 2, 3}


def test_bootstrap_from_env_and_from_discovery(cluster, monkeypatch):
    monkeypatch.setenv("ZQ_BOOTSTRAP", cluster.bootstrap)
    with zq.Client(limits=FAST) as client:
        assert client.bootstrap == [cluster.bootstrap]
        assert client.topics()[0]["name"] == "t"
    monkeypatch.delenv("ZQ_BOOTSTRAP")
    fake = types.ModuleType("zq.io.discovery")
    calls = []
    fake.discover_cluster = lambda name, timeout_s, interface: calls.append(name) or [("127.0.0.1", cluster.nodes[0].port)]
    monkeypatch.setitem(sys.modules, "zq.io.discovery", fake)
    with zq.Client(cluster="blue", limits=FAST) as client:
        assert client.topics()[0]["name"] == "t"
    assert calls == ["blue"]
    fake.discover_cluster = lambda name, timeout_s, interface: []
    with pytest.raises(ConnectionFailed) as e:
        zq.Client(cluster="blue")
    assert "ZQ_BOOTSTRAP" in str(e.value)
    with pytest.raises(ValueError):
        zq.Client("no-port-here")


# ---------------------------------------------------------------------------------- consumer


def fill(cluster: FakeCluster, client: zq.Client, partition: int, values: list[bytes], batch: int = 5) -> None:
    producer = client.producer(linger_ms=0)
    for i in range(0, len(values), batch):
        for v in values[i:i + batch]:
            producer.send("t", v, partition=partition, headers={"h": b"1"} if v.endswith(b"7") else None)
        producer.flush(3)


def test_consumer_reads_every_partition_in_order(cluster, client):
    for p in range(4):
        fill(cluster, client, p, [b"p%d-%d" % (p, i) for i in range(23)])
    consumer = client.consumer("t", start="earliest")
    got = []
    while len(got) < 92:
        batch = consumer.poll(timeout=2, max_messages=10)
        assert batch, "no messages within the timeout"
        assert len(batch) <= 10
        got += batch
    assert consumer.poll(timeout=0.1) == []
    for p in range(4):
        mine = [m for m in got if m.partition == p]
        assert [m.offset for m in mine] == list(range(23))
        assert [m.value for m in mine] == [b"p%d-%d" % (p, i) for i in range(23)]
        assert consumer.position(p) == 23
    m = next(m for m in got if m.value == b"p1-7")
    assert m.headers == {"h": b"1"} and m.attempt == 1 and m.key is None
    assert got[0].headers == {}
    assert abs(m.datetime.timestamp() * 1000 - m.timestamp) < 1 and m.datetime.tzinfo is timezone.utc
    m.ack(), m.nack(), m.extend(5)  # no group: nothing to settle, and no error
    assert consumer.assignment() == [0, 1, 2, 3]


def test_start_offset_inside_a_batch_skips_the_records_below_it(cluster, client):
    fill(cluster, client, 0, [b"%d" % i for i in range(10)], batch=10)
    consumer = client.consumer("t", start=7, partitions=[0])
    msgs = consumer.poll(timeout=2)
    assert [m.offset for m in msgs] == [7, 8, 9]


def test_latest_start_then_follow_new_messages_by_long_poll(cluster, client):
    fill(cluster, client, 0, [b"old"])
    consumer = client.consumer("t", partitions=[0], max_wait_ms=2000)
    assert consumer.position(0) == 1
    assert consumer.poll(timeout=0.2) == []

    def later():
        time.sleep(0.2)
        client.producer(linger_ms=0).send("t", b"new", partition=0)

    threading.Thread(target=later).start()
    t0 = time.monotonic()
    m = next(iter(consumer))
    assert (m.offset, m.value) == (1, b"new")
    assert time.monotonic() - t0 < 1.5  # delivered when it arrived, not when the long-poll ran out
    fetches = [r for _, r in cluster.requests if isinstance(r, protocol.Fetch)]
    assert len(fetches) < 10  # parked fetches, not a busy loop


def test_seek_and_seek_to_time_replay(cluster, client):
    fill(cluster, client, 2, [b"a%d" % i for i in range(5)])
    time.sleep(0.02)
    middle = datetime.now(timezone.utc)
    time.sleep(0.02)
    fill(cluster, client, 2, [b"b%d" % i for i in range(5)])
    consumer = client.consumer("t", start="earliest", partitions=[2])
    assert len(consumer.poll(timeout=2, max_messages=3)) == 3
    consumer.seek(2, 8)
    assert [m.value for m in consumer.poll(timeout=2)] == [b"b3", b"b4"]
    consumer.seek_to_time(middle)
    assert [m.value for m in consumer.poll(timeout=2)] == [b"b%d" % i for i in range(5)]
    consumer.seek(2, 0)
    assert len(consumer.poll(timeout=2)) == 10


def test_offset_deleted_by_retention_jumps_to_log_start(cluster, client):
    fill(cluster, client, 0, [b"%d" % i for i in range(10)])
    consumer = client.consumer("t", start=3, partitions=[0])
    consumer.close()
    with cluster.lock:  # retention drops the first batch
        cluster.logs[("t", 0)].pop(0)
        cluster.log_start[("t", 0)] = 5
    consumer = client.consumer("t", start=2, partitions=[0])
    msgs = consumer.poll(timeout=2)
    assert [m.offset for m in msgs] == [5, 6, 7, 8, 9]
    assert list(consumer.resets) == [zq.client.OffsetReset(0, 2, 5, "deleted by retention")]


def test_control_batches_are_stepped_over(cluster, client):
    with cluster.lock:  # a new leader's epoch marker at offset 0, as a real node writes one
        cluster.logs[("t", 0)].append(zbatch.control_batch(0, 2, int(time.time() * 1000)))
    fill(cluster, client, 0, [b"a", b"b"])
    consumer = client.consumer("t", start="earliest", partitions=[0])
    assert [(m.offset, m.value) for m in consumer.poll(timeout=2)] == [(1, b"a"), (2, b"b")]
    assert consumer.position(0) == 3


def test_prefetch_is_bounded(cluster, client):
    fill(cluster, client, 0, [b"v" * 1000 for _ in range(200)], batch=10)
    consumer = client.consumer("t", start="earliest", partitions=[0], prefetch_bytes=1, fetch_bytes=1)
    time.sleep(0.3)
    fetches = [r for _, r in cluster.requests if isinstance(r, protocol.Fetch)]
    assert len(fetches) == 1  # one reply fills the tiny prefetch; no more fetches until poll takes it
    got = []
    deadline = time.monotonic() + 30   # generous: CI machines are slow; the loop ends as soon as all 200 are in
    while len(got) < 200 and time.monotonic() < deadline:
        got += consumer.poll(timeout=0.5)
    assert [m.offset for m in got] == list(range(200))


def test_a_small_batch_after_one_that_did_not_fit_is_not_read_first(cluster, client):
    """The flaky failure of test_prefetch_is_bounded made certain: a one-record batch (a producer
    with linger_ms=0 sends the first record of a burst alone) right after the batch where a
    fetch's max_bytes runs out. Offsets 60..69 must come before 70, none stepped over."""
    tp = ("t", 0)
    with cluster.lock:   # stored batches of exactly these sizes (a producer may split a burst)
        for values in [[b"v" * 1000] * 10] * 6 + [[b"w" * 1000] * 10, [b"x"], [b"y" * 1000] * 9]:
            blob = zbatch.encode_records([[0, None, v, None] for v in values])
            cluster.logs[tp].append(zbatch.make_stored(0, cluster.log_end(tp), len(values), 1, 0, 0, 0,
                                                       zbatch.crc(blob), blob))
        sizes = [len(b) for b in cluster.logs[tp]]
    room = 65536 - sum(sizes[:6])   # what one fetch (fetch_bytes_min) has left after offsets 0..59
    assert sizes[6] > room >= sizes[7], sizes
    consumer = client.consumer("t", start="earliest", partitions=[0], fetch_bytes=1)
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 80 and time.monotonic() < deadline:
        got += consumer.poll(timeout=0.2)
    assert [m.offset for m in got] == list(range(80))


def test_a_consumer_asks_a_leader_for_all_its_partitions_in_one_fetch_many(cluster, client):
    """The four partitions (one leader) are fetched together: one FetchMany naming all four, held
    by the node until one of them has data; each partition's batches reach it in order."""
    for p in range(4):
        fill(cluster, client, p, [b"p%d-%d" % (p, i) for i in range(5)])
    consumer = client.consumer("t", start="earliest", max_wait_ms=2000)
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 20 and time.monotonic() < deadline:
        got += consumer.poll(timeout=0.2)
    assert sorted((m.partition, m.offset) for m in got) == [(p, i) for p in range(4) for i in range(5)]
    with cluster.lock:
        many = [m for _, m in cluster.requests if isinstance(m, protocol.FetchMany)]
    assert any(sorted(p for p, _ in m.partitions) == [0, 1, 2, 3] for m in many), many
    fill(cluster, client, 2, [b"late"])   # into a parked FetchMany: it wakes, and only partition 2 had data
    late = []
    deadline = time.monotonic() + 3
    while not late and time.monotonic() < deadline:
        late += consumer.poll(timeout=0.2)
    assert [(m.partition, m.offset, m.value) for m in late] == [(2, 5, b"late")]
    consumer.close()


def test_a_fetch_many_refusing_one_partition_moves_only_that_partition():
    """A node that no longer leads one partition of a FetchMany says so for that partition alone
    (with the leader's address), answering the others; the consumer follows the hint for it."""
    with FakeCluster(2) as cluster:
        cluster.create("t", 3, leaders=["n1", "n2", "n1"])
        cluster.stale_leader[("t", 1)] = "n1"   # metadata still names n1 for partition 1
        with zq.Client(cluster.nodes[0].address, limits=FAST) as filler:
            for p in range(3):
                fill(cluster, filler, p, [b"v%d" % p])
        with zq.Client(cluster.nodes[0].address, limits=FAST) as client:
            consumer = client.consumer("t", start=0)   # an offset: no ListOffsets, which would learn the hint first
            got = []
            deadline = time.monotonic() + 5
            while len(got) < 3 and time.monotonic() < deadline:
                got += consumer.poll(timeout=0.2)
            assert sorted((m.partition, m.value) for m in got) == [(0, b"v0"), (1, b"v1"), (2, b"v2")]
            with cluster.lock:
                asked = [(n, m) for n, m in cluster.requests if isinstance(m, (protocol.Fetch, protocol.FetchMany))]
            first = next(m for n, m in asked if n == "n1" and isinstance(m, protocol.FetchMany))
            assert sorted(p for p, _ in first.partitions) == [0, 1, 2]
            assert any(n == "n2" for n, _ in asked)   # partition 1 went where the hint said
            consumer.close()


def test_a_reply_with_a_gap_between_its_batches_loses_nothing(cluster, client):
    """A reply that leaves out a batch between two others (a node that packed a smaller later batch
    into the room a big one did not fit) is taken only up to the gap: the left-out offsets are
    fetched again, never stepped over."""
    fill(cluster, client, 0, [b"g%d" % i for i in range(30)], batch=10)
    gapped = []

    def leave_out_the_middle(node, msg, payload):
        if isinstance(msg, protocol.Fetch) and msg.partition == 0 and msg.offset == 0 and not gapped:
            tp = ("t", 0)
            log = cluster.logs[tp]
            ends = [zbatch.unpack_header(b).next_offset for b in log]
            first = [b for b, end in zip(log, ends) if end <= 10]           # offsets 0..9
            later = [b for b, end in zip(log, ends) if end > 20]            # offsets 20..29
            gapped.append(msg.req_id)
            end = cluster.log_end(tp)
            return protocol.FetchReply(msg.req_id, end, cluster.log_start[tp], end), first + later
        return None

    cluster.intercept = leave_out_the_middle
    consumer = client.consumer("t", start="earliest", partitions=[0])
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 30 and time.monotonic() < deadline:
        got += consumer.poll(timeout=0.2)
    assert gapped, "the gapped reply was never sent"
    assert [m.offset for m in got] == list(range(30))
    assert [m.value for m in got] == [b"g%d" % i for i in range(30)]


def test_consumer_of_unknown_topic(cluster, client):
    with pytest.raises(UnknownTopic):
        client.consumer("missing")


# ---------------------------------------------------------------------------------- asyncio twin


def test_aio_client_produces_and_consumes(cluster):
    from zq import aio

    async def main() -> list:
        async with aio.Client(cluster.bootstrap, limits=FAST) as client:
            await client.create_topic("async", partitions=2)
            producer = client.producer(linger_ms=1)
            metas = [await f for f in [await producer.send("async", b"m%d" % i, key=b"k") for i in range(5)]]
            await producer.flush()
            consumer = await client.consumer("async", start="earliest")
            got = []
            async for m in consumer:
                got.append(m)
                if len(got) == 5:
                    break
            assert [t["name"] for t in await client.topics()] == ["async", "t"]
            return [(m.offset, m.partition) for m in metas], [m.value for m in got]

    metas, values = asyncio.run(main())
    p = partition_for_key(b"k", 2)
    assert metas == [(i, p) for i in range(5)]
    assert values == [b"m%d" % i for i in range(5)]


# ---------------------------------------------------------------------------- retry until api_timeout_ms


def refuse_first(kind: type, code: str, n: int):
    """An intercept that refuses the first `n` requests of `kind` with error `code`."""
    left = [n]

    def intercept(node, msg, payload):
        if isinstance(msg, kind) and left[0] > 0:
            left[0] -= 1
            return protocol.ErrorReply(msg.req_id, code, f"fake {code}: an election is under way", {}), []
        return None
    return intercept, left


def test_list_offsets_rides_through_an_election_longer_than_five_attempts(cluster):
    # Before issue 9 the client gave up after leader_attempts_max = 5 attempts (~0.75 s).
    cluster.intercept, left = refuse_first(protocol.ListOffsets, "leader_not_available", 12)
    with zq.Client(cluster.bootstrap, limits=FAST, api_timeout_ms=10_000) as client:
        assert client.list_offsets("t", 0, "earliest").offset == 0
        assert left[0] == 0
        consumer = client.consumer("t", partitions=[1])      # its start is a list_offsets too
        assert consumer.position(1) == 0


def test_a_call_gives_up_at_api_timeout_ms_and_says_how_long_it_waited(cluster):
    cluster.intercept, _ = refuse_first(protocol.ListOffsets, "leader_not_available", 10**9)
    with zq.Client(cluster.bootstrap, limits=FAST, api_timeout_ms=300) as client:
        t0 = time.monotonic()
        with pytest.raises(zq.errors.LeaderNotAvailable) as e:
            client.list_offsets("t", 0)
        assert 0.3 <= time.monotonic() - t0 < 5
    assert "did not succeed in 0.3 s" in str(e.value) and "api_timeout_ms" in str(e.value)


def test_admin_calls_ride_through_a_metadata_election(cluster):
    cluster.intercept, left = refuse_first(protocol.CreateTopic, "leader_not_available", 8)
    with zq.Client(cluster.bootstrap, limits=FAST, api_timeout_ms=10_000) as client:
        client.create_topic("elected", partitions=2)
        assert left[0] == 0 and "elected" in client.refresh_metadata().topics


def test_a_mistake_is_not_retried(cluster):
    cluster.intercept, left = refuse_first(protocol.ListOffsets, "invalid_request", 3)
    with zq.Client(cluster.bootstrap, limits=FAST, api_timeout_ms=10_000) as client:
        with pytest.raises(zq.errors.InvalidRequest):
            client.list_offsets("t", 0)
    assert left[0] == 2


def test_compact_is_refused_until_it_is_built(client):
    with pytest.raises(InvalidRequest, match="not built yet"):
        client.create_topic("compacted", compact=True)
