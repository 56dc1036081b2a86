"""The node: one process, one event loop, one ROUTER for clients and peers.

Theory of operation
-------------------
A pass of the loop (1) waits on its sockets until a message arrives or the next timer is due,
(2) drains at most `inbox_drain_max` messages, handing each to the handler for its type, (3)
writes everything those handlers produced as ONE RocksDB WriteBatch, synced if any of it belongs
to a topic with `durability = "fsync"` (group commit: one fsync covers every batch of the pass),
(4) only then sends the replies that promise durability, advances high watermarks and answers
the fetches that were waiting for data, and (5) runs due timers. Persist, then send.

The rules live in pure cores: offsets, high watermark and idempotent producers in
`zq.core.partition.PartitionLog`, topics and placement in `zq.core.metadata`. This module only
moves bytes between sockets, the store and those cores.

Metadata: the node named first in `voters` leads `__meta`. It appends commands to its own log;
every other node follows it by long-poll fetching `__meta`, storing the batches unchanged in its
own store and applying them, so it can restart on its own. A node learns its partitions by
applying `create_topic` commands that name it in a replica set.

Peer input is checked, never asserted: a frame that fails to decode is counted, answered with an
error where a reply is possible, and dropped; the loop goes on serving everyone else.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cbor2
import zmq

from zq import batch as zbatch
from zq import protocol as P
from zq.core import metadata as meta
from zq.core.partition import Append, Duplicate, PartitionLog
from zq.errors import (InvalidRequest, LeaderNotAvailable, NotLeader, ProtocolError, StorageFull, UnknownPartition,
                       ZqError)
from zq.io.store import Store
from zq.limits import DEFAULT, Limits
from zq.types import META_TOPIC, META_TP, TopicPartition

log = logging.getLogger("zq.node")

META_FETCH_WAIT_MS = 1_000        # long-poll of a follower on __meta
META_RETRY_MS = 200               # pause before a failed __meta fetch or registration is sent again
PEER_REQUEST_TIMEOUT_MS = 3_000   # a peer request with no answer by then is given up
STATUS_WAIT_MS = 400              # how long `zq status` waits for the other nodes' local views
NODE_ALIVE_MS = 5_000             # a node heard from within this long counts as alive
NODE_DEAD_MS = 15_000             # ... and as dead after this long
RETENTION_INTERVAL_MS = 5_000     # how often retention runs
DISK_CHECK_INTERVAL_MS = 1_000    # how often free disk space is read
DISK_FREE_BYTES_MIN = 64 * 1024 * 1024  # below this, produce is refused with StorageFull
PEER_PENDING_MAX = 1_000          # requests awaiting an answer, per peer


def now_ms() -> int:
    return int(time.time() * 1000)


def mono_ms() -> int:
    return int(time.monotonic() * 1000)


@dataclass(frozen=True)
class NodeConfig:
    name: str
    host: str = "127.0.0.1"
    port: int = 7100                     # ROUTER for clients and peers; pub = port+1; metrics = port+2
    data_dir: Path = Path("./data/n1")   # this node's own RocksDB folder
    cluster: str = "zq"
    seeds: tuple[str, ...] = ()          # "host:port" of other nodes' ROUTER
    voters: tuple[str, ...] = ()         # names of the nodes that hold __meta (first = its leader in this version)
    topology: object | None = None       # zq.topology.Topology when started from a file
    discovery: bool = True
    metrics: bool = True                 # serve Prometheus metrics on port+2
    retention_interval_ms: int = RETENTION_INTERVAL_MS
    disk_free_bytes_min: int = DISK_FREE_BYTES_MIN   # below this, produce is refused with StorageFull
    limits: Limits = field(default_factory=lambda: DEFAULT)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(slots=True)
class _Parked:
    """A fetch waiting for data (long-poll)."""
    deadline_ms: int
    identity: bytes
    msg: P.Fetch
    tp: TopicPartition
    done: bool = False


class _Peer:
    """One DEALER to another node's ROUTER, with the requests sent on it that await an answer."""

    def __init__(self, ctx: zmq.Context, name: str, address: str):
        self.name = name
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)          # a stopping node must not wait on a dead peer
        self.sock.setsockopt(zmq.SNDHWM, 10_000)     # bounded queue towards one peer (queued while it connects)
        self.sock.setsockopt(zmq.RCVHWM, 10_000)
        self.sock.setsockopt(zmq.SNDTIMEO, 0)        # never block the loop on a send
        self.sock.connect(f"tcp://{address}")
        self.pending: dict[int, tuple[int, Callable[[Any, list], None]]] = {}
        self.last_seen_ms = 0

    def close(self) -> None:
        self.sock.close(0)


class Node:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.limits = config.limits
        self.name = config.name
        self.incarnation = now_ms()
        self.started_ms = now_ms()
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
        self.store = Store(config.data_dir, limits=self.limits)
        self.meta = meta.MetadataState()
        self.meta_leader: str | None = config.voters[0] if config.voters else (None if config.seeds else self.name)
        self.parts: dict[TopicPartition, PartitionLog] = {}
        self.parked: dict[TopicPartition, list[_Parked]] = defaultdict(list)
        self.parked_count = 0
        self.peers: dict[str, _Peer] = {}
        self.timers: list[tuple[int, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._req_ids = itertools.count(1)
        self.counters: dict[str, int] = defaultdict(int)
        self.follower_meta_pos: dict[str, tuple[int, int]] = {}   # node -> (next __meta offset, seen at mono ms)
        self.pending_creates: list[tuple[int, int, bytes, P.OkReply]] = []
        self.disk_full = False
        # per-pass state
        self.txn = None
        self.sync_needed = False
        self.after_commit: list[tuple[bytes, list[bytes]]] = []
        self.after_commit_fns: list[Callable[[], None]] = []
        self.touched: dict[TopicPartition, tuple[int, int, set[int]]] = {}
        self.meta_unapplied: list[tuple[int, dict]] = []
        self.stopping = False
        self._discovering = False
        self._registered = False
        self.ctx = zmq.Context.instance()
        self.router = self._bind_router()
        self.metrics_server = None
        self._load()

    # ------------------------------------------------------------------ start-up

    def _bind_router(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)     # an unroutable reply must fail loudly (counted), not vanish
        s.setsockopt(zmq.LINGER, 0)               # on stop, unsent replies are dropped: clients retry
        s.setsockopt(zmq.SNDHWM, self.limits.router_sndhwm)   # bounded reply queue per client
        s.setsockopt(zmq.RCVHWM, self.limits.router_rcvhwm)   # bounded inbox: producers beyond it wait in TCP
        s.setsockopt(zmq.SNDTIMEO, 0)             # a client that stopped reading must not stall the loop
        s.setsockopt(zmq.MAXMSGSIZE, self.limits.frame_bytes_max)  # a bigger frame drops the connection
        try:
            s.bind(f"tcp://{self.config.host}:{self.config.port}")
        except zmq.ZMQError as e:
            s.close(0)
            raise ZqError(f"cannot listen on {self.config.address}: {e.strerror}; "
                          "is another node using that port? pick another with --port") from None
        return s

    def _load(self) -> None:
        """Rebuild state from the store: apply __meta, then open every local partition at its log end."""
        for offset, command in self._read_meta_commands(0):
            self.meta.apply(offset, command)
        st = self.store.partition_state(META_TP)
        ml = PartitionLog(st.log_start, st.log_end) if st else PartitionLog()
        self.parts[META_TP] = ml
        for t in self.meta.topics.values():
            self._open_topic(t)
        log.info("node %s loaded: %d topics, %d local partitions, __meta at %d",
                 self.name, len(self.meta.topics), len(self.parts) - 1, self.meta.applied)

    def _read_meta_commands(self, start: int) -> list[tuple[int, dict]]:
        out = []
        offset = start
        while True:
            values = self.store.read(META_TP, offset, 4 * 1024 * 1024)
            if not values:
                return out
            for v in values:
                for rec in zbatch.iter_records(v, offset):
                    out.append((rec.offset, cbor2.loads(rec.value)))
                    offset = rec.offset + 1

    def _open_topic(self, t: meta.TopicMeta) -> None:
        for p, replicas in enumerate(t.partitions):
            if self.name not in replicas:
                continue
            tp = TopicPartition(t.id, p)
            if tp in self.parts:
                continue
            st = self.store.partition_state(tp)
            pl = PartitionLog(st.log_start, st.log_end) if st else PartitionLog()
            self.parts[tp] = pl

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        registered_peers: set[str] = set()
        self._start_background()
        if self.config.metrics:
            from zq.io.metrics import serve_metrics
            self.metrics_server = serve_metrics(self, self.config.host, self.config.port + 2)
        log.info("node %s serving on %s (cluster %s, metadata leader %s)", self.name, self.config.address,
                 self.config.cluster, self.meta_leader or "unknown yet")
        while not stop.is_set():
            for name, peer in self.peers.items():
                if name not in registered_peers:
                    poller.register(peer.sock, zmq.POLLIN)
                    registered_peers.add(name)
            timeout = self._poll_timeout_ms()
            ready = dict(poller.poll(timeout))
            if self.router in ready:
                self._drain_router()
            for peer in list(self.peers.values()):
                if peer.sock in ready:
                    self._drain_peer(peer)
            self._finish_pass()
            self._run_timers()
        self.close()

    def _poll_timeout_ms(self) -> int:
        if not self.timers:
            return 100
        return max(0, min(100, self.timers[0][0] - mono_ms()))

    def _drain_router(self) -> None:
        for _ in range(self.limits.inbox_drain_max):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_frames(frames)

    def _on_frames(self, frames: list[bytes]) -> None:
        identity, body = frames[0], frames[1:]
        try:
            msg, payload = P.decode(body, self.limits)
        except ZqError as e:
            self.counters["protocol_errors"] += 1
            log.debug("dropped a bad frame: %s", e)
            # Reply only when it looks like a zq peer (it can read the reply); garbage gets silence.
            if body and bytes(body[0])[:2] == b"ZQ":
                self._send(identity, P.encode(P.error_reply(0, e)))
            return
        handler = self.HANDLERS.get(type(msg))
        if handler is None:
            self.counters["protocol_errors"] += 1
            self._send(identity, P.encode(P.error_reply(msg.req_id, ProtocolError(
                f"{type(msg).__name__} is not a request a node serves"))))
            return
        try:
            handler(self, identity, msg, payload)
        except ZqError as e:
            self.counters[f"errors_{e.code}"] += 1
            self._send(identity, P.encode(P.error_reply(msg.req_id, e)))

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            self.router.send_multipart([identity, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:
            # Gone (EHOSTUNREACH under ROUTER_MANDATORY) or not reading (EAGAIN): it will retry or time out.
            self.counters["replies_dropped"] += 1

    # ------------------------------------------------------------------ group commit

    def _begin(self):
        if self.txn is None:
            self.txn = self.store.begin()
        return self.txn

    def _finish_pass(self) -> None:
        """Write the pass's writes as one batch, then send what waited for them."""
        if self.txn is not None:
            txn, self.txn = self.txn, None
            sync, self.sync_needed = self.sync_needed, False
            try:
                self.store.commit(txn, sync=sync)
            except StorageFull as e:
                self._abort_pass(e)
                self.disk_full = True   # refuse produce until the disk check sees room again
                return
            for tp in self.touched:
                pl = self.parts.get(tp)
                if pl is not None and pl.maybe_advance_high_watermark(pl.log_end):
                    self._serve_parked(tp)
            self.touched.clear()
            self._apply_meta()
        replies, self.after_commit = self.after_commit, []
        for identity, frames in replies:
            self._send(identity, frames)
        fns, self.after_commit_fns = self.after_commit_fns, []
        for fn in fns:
            fn()

    def _abort_pass(self, error: ZqError) -> None:
        log.error("write failed, nothing of this pass was stored: %s", error.message)
        self.counters["storage_errors"] += 1
        for tp, (log_end, last_time, pids) in self.touched.items():
            self.parts[tp].abort_appends(log_end, last_time, pids)
        self.touched.clear()
        self.meta_unapplied.clear()
        for identity, frames in self.after_commit:
            try:
                msg, _ = P.decode(frames, self.limits)
                self._send(identity, P.encode(P.error_reply(msg.req_id, error)))
            except ZqError:
                pass
        self.after_commit.clear()
        self.after_commit_fns.clear()

    def _append(self, tp: TopicPartition, pl: PartitionLog, count: int, producer_id: int, base_sequence: int,
                flags: int, blob_crc: int, blob: bytes, sync: bool) -> Append | Duplicate:
        if tp not in self.touched:
            self.touched[tp] = (pl.log_end, pl.last_append_time_ms, set())
        result = pl.on_produce(count, producer_id, base_sequence, now_ms())
        if isinstance(result, Append):
            stored = zbatch.make_stored(flags, result.base_offset, count, pl.epoch, result.append_time_ms,
                                        producer_id, base_sequence, blob_crc, blob)
            header = zbatch.BatchHeader(flags, result.base_offset, count, pl.epoch, result.append_time_ms,
                                        producer_id, base_sequence, blob_crc)
            self._begin().append(tp, stored, header)
            if producer_id:
                self.touched[tp][2].add(producer_id)
            self.sync_needed |= sync
        return result

    # ------------------------------------------------------------------ lookups

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

    def _leader_of(self, tp: TopicPartition, t: meta.TopicMeta | None) -> str | None:
        return self.meta_leader if t is None else t.leader(tp.partition)

    def _local_leader(self, topic: str, partition: int) -> tuple[TopicPartition, meta.TopicMeta | None, PartitionLog]:
        tp, t = self._topic_partition(topic, partition)
        leader = self._leader_of(tp, t)
        if leader != self.name:
            raise self._not_leader(leader, f"{topic}/{partition}")
        pl = self.parts.get(tp)
        if pl is None:
            raise LeaderNotAvailable(f"partition {topic}/{partition} is not open on {self.name} yet; retry")
        return tp, t, pl

    def _not_leader(self, leader: str | None, what: str) -> ZqError:
        if leader is None:
            return LeaderNotAvailable(f"no leader is known for {what} yet; retry shortly")
        n = self.meta.nodes.get(leader)
        address = n.address if n else ""
        return NotLeader(f"{self.name} does not lead {what}; {leader} ({address or 'address unknown'}) does",
                         leader=leader, address=address)

    # ------------------------------------------------------------------ handlers: data

    def on_produce(self, identity: bytes, msg: P.Produce, payload: list[bytes]) -> None:
        self.counters["produce_requests"] += 1
        if len(payload) != 1:
            raise ProtocolError(f"Produce carries one payload frame (the batch), got {len(payload)}")
        if msg.topic == META_TOPIC:
            raise InvalidRequest(f"{META_TOPIC} is written by zq itself, not by producers")
        tp, t, pl = self._local_leader(msg.topic, msg.partition)
        if self.disk_full:
            raise StorageFull(f"{self.name} has less than {self.config.disk_free_bytes_min // (1024 * 1024)} MiB of disk free; "
                              "free space or add nodes; nothing was written")
        blob = payload[0]
        zbatch.check_incoming(blob, msg.blob_crc, msg.count, self.limits.batch_bytes_max, self.limits.batch_records_max)
        sync = t.config.get("durability", "fsync") == "fsync"
        result = self._append(tp, pl, msg.count, msg.producer_id, msg.base_sequence, msg.flags, msg.blob_crc, blob, sync)
        self.counters["produced_records"] += msg.count
        self.counters["produced_bytes"] += len(blob)
        if msg.acks == 0:
            return
        reply = P.encode(P.ProduceReply(msg.req_id, result.base_offset, pl.epoch, result.append_time_ms, pl.log_start))
        if isinstance(result, Duplicate) and result.base_offset + msg.count <= pl.high_watermark:
            self._send(identity, reply)
        else:
            self.after_commit.append((identity, reply))

    def on_fetch(self, identity: bytes, msg: P.Fetch, payload: list[bytes]) -> None:
        self.counters["fetch_requests"] += 1
        tp, t, pl = self._local_leader(msg.topic, msg.partition)
        if tp == META_TP and msg.replica:
            self.follower_meta_pos[msg.replica] = (msg.offset, mono_ms())
            self._check_pending_creates()
        if pl.check_fetch(msg.offset) or msg.max_wait_ms <= 0 or self.parked_count >= self.limits.pending_fetches_max:
            self._reply_fetch(identity, msg, tp, pl)
            return
        wait_ms = min(msg.max_wait_ms, self.limits.fetch_wait_ms_max)
        parked = _Parked(mono_ms() + wait_ms, identity, msg, tp)
        self.parked[tp].append(parked)
        self.parked_count += 1
        self._at(parked.deadline_ms, lambda: self._expire_parked(parked))

    def _reply_fetch(self, identity: bytes, msg: P.Fetch, tp: TopicPartition, pl: PartitionLog) -> None:
        values: list[bytes] = []
        if msg.offset < pl.high_watermark:
            max_bytes = max(1, min(msg.max_bytes, self.limits.fetch_bytes_max))
            values = self.store.read(tp, msg.offset, max_bytes, upto=pl.high_watermark)
            del values[self.limits.frames_per_message_max - 2:]   # a reply must stay decodable
        self.counters["fetched_batches"] += len(values)
        self._send(identity, P.encode(P.FetchReply(msg.req_id, pl.high_watermark, pl.log_start, pl.log_end), *values))

    def _serve_parked(self, tp: TopicPartition) -> None:
        waiting = self.parked.pop(tp, None)
        if not waiting:
            return
        pl = self.parts.get(tp)
        for parked in waiting:
            if parked.done:
                continue
            parked.done = True
            self.parked_count -= 1
            if pl is None:
                continue
            try:
                self._reply_fetch(parked.identity, parked.msg, tp, pl)
            except ZqError as e:
                self._send(parked.identity, P.encode(P.error_reply(parked.msg.req_id, e)))

    def _expire_parked(self, parked: _Parked) -> None:
        if parked.done:
            return
        parked.done = True
        self.parked_count -= 1
        lst = self.parked.get(parked.tp)
        if lst is not None:
            lst.remove(parked)
        pl = self.parts.get(parked.tp)
        if pl is not None:
            self._reply_fetch(parked.identity, parked.msg, parked.tp, pl)

    def on_list_offsets(self, identity: bytes, msg: P.ListOffsets, payload: list[bytes]) -> None:
        tp, t, pl = self._local_leader(msg.topic, msg.partition)
        if msg.spec == "earliest":
            offset = pl.log_start
        elif msg.spec == "latest":
            offset = pl.high_watermark
        elif isinstance(msg.spec, int):
            found = self.store.offset_for_time(tp, msg.spec)
            offset = pl.high_watermark if found is None else min(max(found, pl.log_start), pl.high_watermark)
        else:
            raise InvalidRequest(f"offset spec must be 'earliest', 'latest' or a time in ms, got {msg.spec!r}")
        self._send(identity, P.encode(P.OffsetsReply(msg.req_id, offset, pl.log_start, pl.high_watermark)))

    # ------------------------------------------------------------------ handlers: metadata

    def on_metadata(self, identity: bytes, msg: P.MetadataRequest, payload: list[bytes]) -> None:
        self._send(identity, P.encode(P.MetadataReply(msg.req_id, self.config.cluster, self._nodes_view(),
                                                      self._topics_view(msg.topics))))

    def _topics_view(self, names: list | None) -> list[dict]:
        out = [meta.meta_topic_view(self.meta_leader)] if self.meta_leader else []
        for t in sorted(self.meta.topics.values(), key=lambda t: t.name):
            if names is not None and t.name not in names:
                continue
            out.append({"name": t.name, "id": t.id, "config": t.config,
                        "partitions": [{"partition": p, "leader": r[0], "epoch": 0, "replicas": r}
                                       for p, r in enumerate(t.partitions)]})
        return out

    def _nodes_view(self) -> list[dict]:
        out = []
        now = mono_ms()
        for name in sorted(set(self.meta.nodes) | {self.name}):
            n = self.meta.nodes.get(name)
            host, port = (n.host, n.port) if n else (self.config.host, self.config.port)
            out.append({"name": name, "host": host, "port": port, "state": self._node_state(name, now),
                        "last_seen_ms": self._last_seen_ago_ms(name, now)})
        return out

    def _last_seen_ago_ms(self, name: str, now: int) -> int | None:
        if name == self.name:
            return 0
        seen = [self.follower_meta_pos.get(name, (0, 0))[1]]
        peer = self.peers.get(name)
        if peer:
            seen.append(peer.last_seen_ms)
        last = max(seen)
        return None if last == 0 else now - last

    def _node_state(self, name: str, now: int) -> str:
        ago = self._last_seen_ago_ms(name, now)
        if ago is None:
            return "unknown"
        return "alive" if ago <= NODE_ALIVE_MS else "suspect" if ago <= NODE_DEAD_MS else "dead"

    def _live_nodes(self) -> list[str]:
        now = mono_ms()
        return sorted(n for n in set(self.meta.nodes) | {self.name} if self._node_state(n, now) == "alive")

    def on_create_topic(self, identity: bytes, msg: P.CreateTopic, payload: list[bytes]) -> None:
        self._require_meta_leader()
        commands = meta.plan_create_topic(self.meta, msg.name, msg.partitions, msg.replication, msg.config,
                                          self._live_nodes(), now_ms(), self.limits)
        end = self._append_meta(commands)
        reply = P.OkReply(msg.req_id, {"topic": msg.name, "id": commands[0]["id"]})
        self.pending_creates.append((end, mono_ms() + self.limits.create_wait_ms_max, identity, reply))
        self.after_commit_fns.append(self._check_pending_creates)
        self._at(mono_ms() + self.limits.create_wait_ms_max, self._check_pending_creates)

    def on_delete_topic(self, identity: bytes, msg: P.DeleteTopic, payload: list[bytes]) -> None:
        self._require_meta_leader()
        commands = meta.plan_delete_topic(self.meta, msg.name)
        end = self._append_meta(commands)
        reply = P.OkReply(msg.req_id, {"topic": msg.name})
        self.pending_creates.append((end, mono_ms() + self.limits.create_wait_ms_max, identity, reply))
        self.after_commit_fns.append(self._check_pending_creates)
        self._at(mono_ms() + self.limits.create_wait_ms_max, self._check_pending_creates)

    def on_register_node(self, identity: bytes, msg: P.RegisterNode, payload: list[bytes]) -> None:
        self._require_meta_leader()
        self.follower_meta_pos.setdefault(msg.name, (0, mono_ms()))
        known = self.meta.nodes.get(msg.name)
        if known is None or (known.host, known.port) != (msg.host, msg.port):
            self._append_meta([{"op": "register_node", "name": msg.name, "host": msg.host, "port": msg.port,
                                "incarnation": msg.incarnation}])
            self.after_commit.append((identity, P.encode(P.OkReply(msg.req_id, {}))))
        else:
            self._send(identity, P.encode(P.OkReply(msg.req_id, {})))

    def _require_meta_leader(self) -> None:
        if self.meta_leader != self.name:
            raise self._not_leader(self.meta_leader, "the cluster metadata")

    def _append_meta(self, commands: list[dict]) -> int:
        """Append commands to __meta (on its leader); they are applied once durable. Returns the end offset."""
        pl = self.parts[META_TP]
        ts = now_ms()
        blob = zbatch.encode_records([[ts, None, cbor2.dumps(c), None] for c in commands])
        result = self._append(META_TP, pl, len(commands), 0, 0, 0, zbatch.crc(blob), blob, True)
        for i, c in enumerate(commands):
            self.meta_unapplied.append((result.base_offset + i, c))
        return result.base_offset + len(commands)

    def _apply_meta(self) -> None:
        pending, self.meta_unapplied = self.meta_unapplied, []
        for offset, command in pending:
            self._apply_meta_command(offset, command)

    def _apply_meta_command(self, offset: int, command: dict) -> None:
        before = self.meta.topics.get(command.get("name", ""))
        self.meta.apply(offset, command)
        op = command.get("op")
        if op == "create_topic":
            self._open_topic(self.meta.topics[command["name"]])
        elif op == "delete_topic" and before is not None:
            self._close_topic(before)
        elif op == "register_node" and command["name"] != self.name:
            self._peer(command["name"])

    def _close_topic(self, t: meta.TopicMeta) -> None:
        for p in range(len(t.partitions)):
            tp = TopicPartition(t.id, p)
            if self.parts.pop(tp, None) is not None:
                self._begin().drop_partition(tp)
            for parked in self.parked.pop(tp, []):
                if not parked.done:
                    parked.done = True
                    self.parked_count -= 1
                    self._send(parked.identity, P.encode(P.error_reply(parked.msg.req_id, meta.UnknownTopic(
                        f"topic {t.name!r} was deleted"))))

    def _check_pending_creates(self) -> None:
        """Answer a create or delete once every live follower has fetched past it, or its wait ran out."""
        if not self.pending_creates:
            return
        now = mono_ms()
        hw = self.parts[META_TP].high_watermark
        followers = [pos for name, (pos, seen) in self.follower_meta_pos.items()
                     if name != self.name and now - seen <= NODE_ALIVE_MS]
        keep = []
        for end, deadline, identity, reply in self.pending_creates:
            if hw >= end and (all(pos >= end for pos in followers) or now >= deadline):
                self._send(identity, P.encode(reply))
            else:
                keep.append((end, deadline, identity, reply))
        self.pending_creates = keep

    # ------------------------------------------------------------------ handlers: status

    def on_status(self, identity: bytes, msg: P.StatusRequest, payload: list[bytes]) -> None:
        """Gather every reachable node's local view (bounded wait), then answer with the whole picture."""
        views: dict[str, list] = {self.name: self._local_partitions_view()}
        others = [n for n in sorted(self.meta.nodes) if n != self.name]
        state = {"left": len(others), "done": False}

        def finish() -> None:
            if state["done"]:
                return
            state["done"] = True
            self._send(identity, P.encode(P.StatusReply(msg.req_id, self._status_doc(views))))

        def on_reply(name: str, reply: Any, _payload: list) -> None:
            if isinstance(reply, P.LocalStatusReply):
                views[name] = reply.partitions
            state["left"] -= 1
            if state["left"] <= 0:
                finish()

        for name in others:
            self._request(name, P.LocalStatusRequest(next(self._req_ids)),
                          lambda r, pl, name=name: on_reply(name, r, pl), timeout_ms=STATUS_WAIT_MS)
        if not others:
            finish()
        else:
            self._at(mono_ms() + STATUS_WAIT_MS + 50, finish)

    def on_local_status(self, identity: bytes, msg: P.LocalStatusRequest, payload: list[bytes]) -> None:
        self._send(identity, P.encode(P.LocalStatusReply(
            msg.req_id, {"name": self.name, "address": self.config.address, "incarnation": self.incarnation,
                         "started_ms": self.started_ms}, self._local_partitions_view())))

    def _local_partitions_view(self) -> list[dict]:
        out = []
        for tp, pl in sorted(self.parts.items()):
            if tp == META_TP:
                if self.meta_leader != self.name:
                    continue
                name, replicas = META_TOPIC, [self.name]
            else:
                t = self.meta.topics_by_id.get(tp.topic_id)
                if t is None:
                    continue
                name, replicas = t.name, t.partitions[tp.partition]
            if replicas[0] != self.name:
                continue
            out.append({"topic": name, "partition": tp.partition, "leader": self.name, "epoch": pl.epoch,
                        "replicas": replicas, "in_sync": replicas, "log_start": pl.log_start, "log_end": pl.log_end,
                        "high_watermark": pl.high_watermark, "replication_lag": 0})
        return out

    def _status_doc(self, views: dict[str, list]) -> dict:
        seen: dict[tuple[str, int], dict] = {}
        for rows in views.values():
            for row in rows:
                seen[(row["topic"], row["partition"])] = row
        partitions = []
        for t in sorted(self.meta.topics.values(), key=lambda t: t.name):
            for p, replicas in enumerate(t.partitions):
                row = seen.get((t.name, p)) or {
                    "topic": t.name, "partition": p, "leader": replicas[0], "epoch": 0, "replicas": replicas,
                    "in_sync": [], "log_start": None, "log_end": None, "high_watermark": None,
                    "replication_lag": None}
                partitions.append(row)
        nodes = []
        for n in self._nodes_view():
            answered = n["name"] in views
            nodes.append({"name": n["name"], "address": f"{n['host']}:{n['port']}",
                          "state": "alive" if answered else n["state"],
                          "last_seen_ms": 0 if answered else n["last_seen_ms"]})
        return {"cluster": self.config.cluster, "node": self.name, "metadata_leader": self.meta_leader,
                "nodes": nodes, "partitions": partitions}

    HANDLERS: dict[type, Callable] = {
        P.Produce: on_produce,
        P.Fetch: on_fetch,
        P.ListOffsets: on_list_offsets,
        P.MetadataRequest: on_metadata,
        P.CreateTopic: on_create_topic,
        P.DeleteTopic: on_delete_topic,
        P.RegisterNode: on_register_node,
        P.StatusRequest: on_status,
        P.LocalStatusRequest: on_local_status,
    }

    # ------------------------------------------------------------------ peers

    def _peer(self, name: str, address: str | None = None) -> _Peer | None:
        peer = self.peers.get(name)
        if peer is None:
            if address is None:
                n = self.meta.nodes.get(name)
                if n is None:
                    return None
                address = n.address
            peer = self.peers[name] = _Peer(self.ctx, name, address)
        return peer

    def _request(self, name: str, msg: Any, on_reply: Callable[[Any, list], None],
                 timeout_ms: int = PEER_REQUEST_TIMEOUT_MS, address: str | None = None) -> None:
        """Send `msg` to a peer; `on_reply(reply_or_error, payload)` runs once, with a ZqError on timeout."""
        peer = self._peer(name, address)
        if peer is None or len(peer.pending) >= PEER_PENDING_MAX:
            on_reply(LeaderNotAvailable(f"node {name} is not reachable"), [])
            return
        req_id = msg.req_id
        peer.pending[req_id] = (mono_ms() + timeout_ms, on_reply)
        try:
            peer.sock.send_multipart(P.encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass   # not connected yet: the timeout answers
        self._at(mono_ms() + timeout_ms, lambda: self._request_timed_out(peer, req_id))

    def _request_timed_out(self, peer: _Peer, req_id: int) -> None:
        entry = peer.pending.pop(req_id, None)
        if entry is not None:
            entry[1](LeaderNotAvailable(f"node {peer.name} did not answer in time"), [])

    def _drain_peer(self, peer: _Peer) -> None:
        for _ in range(self.limits.inbox_drain_max):
            try:
                frames = peer.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg, payload = P.decode(frames, self.limits)
            except ZqError:
                self.counters["protocol_errors"] += 1
                continue
            peer.last_seen_ms = mono_ms()
            entry = peer.pending.pop(msg.req_id, None)
            if entry is not None:
                reply = msg
                if isinstance(msg, P.ErrorReply):
                    from zq.errors import from_wire
                    reply = from_wire(msg.code, msg.message, msg.data)
                entry[1](reply, payload)

    # ------------------------------------------------------------------ following __meta

    def _start_background(self) -> None:
        if self.meta_leader == self.name:
            self._register_self_locally()
        else:
            self._at(mono_ms(), self._follow_meta)
        self._at(mono_ms() + self.config.retention_interval_ms, self._retention)
        self._at(mono_ms(), self._check_disk)

    def _register_self_locally(self) -> None:
        known = self.meta.nodes.get(self.name)
        if known is None or (known.host, known.port) != (self.config.host, self.config.port):
            self._append_meta([{"op": "register_node", "name": self.name, "host": self.config.host,
                                "port": self.config.port, "incarnation": self.incarnation}])

    def _seed_addresses(self) -> list[str]:
        return [s for s in self.config.seeds if s != self.config.address]

    def _follow_meta(self) -> None:
        """One step of following __meta: find the leader, register, then long-poll fetch forever."""
        if self.stopping:
            return
        if self.meta_leader is None:
            self._discover_meta_leader()
            return
        leader = self.meta_leader
        if leader not in self.meta.nodes and leader not in self.peers:
            address = self._address_from_topology(leader)
            if address is None:
                self._discover_meta_leader()   # ask the seeds where the leader is
                return
            self._peer(leader, address)
        if not self._registered:
            self._request(leader, P.RegisterNode(next(self._req_ids), self.name, self.config.host, self.config.port,
                                                 self.incarnation), self._on_registered)
            return
        pl = self.parts[META_TP]
        self._request(leader, P.Fetch(next(self._req_ids), META_TOPIC, 0, pl.log_end, 4 * 1024 * 1024,
                                      META_FETCH_WAIT_MS, self.name),
                      self._on_meta_fetched, timeout_ms=META_FETCH_WAIT_MS + PEER_REQUEST_TIMEOUT_MS)

    def _address_from_topology(self, name: str) -> str | None:
        topo = self.config.topology
        if topo is None:
            return None
        for n in getattr(topo, "nodes", ()):
            if n.name == name:
                return f"{n.host}:{n.port}"
        return None

    def _discover_meta_leader(self) -> None:
        """Ask every seed for metadata: it names the metadata leader and its address."""
        seeds = self._seed_addresses()
        if not seeds:
            if self.meta_leader is None:
                self.meta_leader = self.name
                self._register_self_locally()
            else:
                log.warning("metadata leader %s has no known address; pass one of its peers with --seed",
                            self.meta_leader)
                self._at(mono_ms() + META_RETRY_MS * 10, self._follow_meta)
            return
        self._discovering = True
        for address in seeds:
            self._request(f"seed:{address}", P.MetadataRequest(next(self._req_ids), []), self._on_seed_metadata,
                          address=address)
        self._at(mono_ms() + PEER_REQUEST_TIMEOUT_MS + META_RETRY_MS, self._discovery_timed_out)

    def _discovery_timed_out(self) -> None:
        if self._discovering:
            self._discovering = False
            self._follow_meta()

    def _on_seed_metadata(self, reply: Any, payload: list) -> None:
        if not isinstance(reply, P.MetadataReply) or reply.cluster != self.config.cluster:
            if isinstance(reply, P.MetadataReply):
                log.warning("a seed belongs to cluster %r, not %r: ignored", reply.cluster, self.config.cluster)
            return
        for t in reply.topics:
            if t["name"] == META_TOPIC and self.meta_leader is None:
                self.meta_leader = t["partitions"][0]["leader"]
                log.info("metadata leader is %s (learnt from a seed)", self.meta_leader)
        for n in reply.nodes:
            if n["name"] == self.meta_leader and n["name"] not in self.peers:
                self._peer(n["name"], f"{n['host']}:{n['port']}")
        if self._discovering and self.meta_leader in self.peers:
            self._discovering = False
            self._follow_meta()

    def _on_registered(self, reply: Any, payload: list) -> None:
        if isinstance(reply, P.OkReply):
            self._registered = True
            self._follow_meta()
        else:
            if isinstance(reply, NotLeader) and reply.data.get("leader"):
                self.meta_leader = reply.data["leader"]
            self._at(mono_ms() + META_RETRY_MS, self._follow_meta)

    def _on_meta_fetched(self, reply: Any, payload: list) -> None:
        if not isinstance(reply, P.FetchReply):
            if isinstance(reply, ZqError):
                log.debug("fetching %s from %s failed: %s", META_TOPIC, self.meta_leader, reply.message)
            self._at(mono_ms() + META_RETRY_MS, self._follow_meta)
            return
        pl = self.parts[META_TP]
        stored_any = False
        for value in payload:
            try:
                h = zbatch.verify_stored(value)
            except ZqError as e:
                log.warning("a %s batch from %s failed its checksum (%s); fetching it again", META_TOPIC,
                            self.meta_leader, e.message)
                break
            if h.base_offset != pl.log_end:
                continue   # already held, or a gap: the next fetch starts from our log end
            self._begin().append(META_TP, value, h)
            pl.log_end = h.next_offset
            self.touched.setdefault(META_TP, (h.base_offset, 0, set()))
            self.sync_needed = True
            for rec in zbatch.iter_records(value, h.base_offset, verify=False):
                self.meta_unapplied.append((rec.offset, cbor2.loads(rec.value)))
            stored_any = True
        # The next fetch goes out after this pass's write, so the leader counts only what we hold durably.
        if stored_any:
            self.after_commit_fns.append(self._follow_meta)
        else:
            self._follow_meta()

    # ------------------------------------------------------------------ timers and housekeeping

    def _at(self, when_ms: int, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (when_ms, next(self._timer_seq), fn))

    def _run_timers(self) -> None:
        now = mono_ms()
        ran = 0
        while self.timers and self.timers[0][0] <= now and ran < self.limits.inbox_drain_max:
            _, _, fn = heapq.heappop(self.timers)
            fn()
            ran += 1
        if ran:
            self._finish_pass()

    def _retention(self) -> None:
        now = now_ms()
        for tp, pl in list(self.parts.items()):
            t = self.meta.topics_by_id.get(tp.topic_id)
            if t is None:
                continue
            r_ms, r_bytes = t.config.get("retention_ms"), t.config.get("retention_bytes")
            if r_ms is None and r_bytes is None:
                continue
            new_start = self.store.retention_candidates(tp, now_ms=now, retention_ms=r_ms, retention_bytes=r_bytes)
            if new_start is not None and new_start > pl.log_start:
                new_start = min(new_start, pl.high_watermark)
                self._begin().delete_below(tp, new_start)
                pl.on_retention(new_start)
                self.counters["retention_deletes"] += 1
        self._at(mono_ms() + self.config.retention_interval_ms, self._retention)

    def _check_disk(self) -> None:
        try:
            full = self.store.disk_free_bytes() < self.config.disk_free_bytes_min
        except OSError:
            full = False
        if full != self.disk_full:
            log.warning("disk %s: produce %s", "nearly full" if full else "has room again",
                        "refused" if full else "accepted again")
        self.disk_full = full
        self._at(mono_ms() + DISK_CHECK_INTERVAL_MS, self._check_disk)

    def close(self) -> None:
        self.stopping = True
        for peer in self.peers.values():
            peer.close()
        self.router.close(0)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.store.close()
        log.info("node %s stopped", self.name)


def run_node(config: NodeConfig, stop: threading.Event | None = None) -> None:
    """Run the node in the foreground until `stop` is set or SIGTERM/SIGINT arrives."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    node = Node(config)
    node.run(stop)
