"""The node: one process, one event loop, one ROUTER for clients and peers, one PUB for replication.

Theory of operation
-------------------
A pass of the loop (1) waits on its sockets until a message arrives or the next timer is due,
(2) drains at most `inbox_drain_max` messages from each socket, handing each to the handler for
its type, which feeds the partition's replication core (`zq.core.replication.Replica`), (3)
collects every core's effects (`Ready`) and writes them as ONE RocksDB WriteBatch, synced if any
of it must be (a vote, or a batch of a topic with `durability = "fsync"`: group commit, one
fsync covers the whole pass), (4) only then tells the cores their writes are durable, sends the
messages they asked for, answers producers whose batches committed, and wakes fetches waiting
for the high watermark, repeating (3)-(4) while the cores have more to say (bounded), and (5)
runs due timers. Persist, then send.

The rules live in pure cores: replication, elections, the high watermark and idempotent
producers in `zq.core.replication`; topics and placement in `zq.core.metadata`. This module
moves bytes between sockets, the store and those cores, and decides nothing they decide.

Replication transport. A leader's Append that carries entries goes out on the node's PUB socket
with the partition as the topic frame; followers subscribe to the partitions they hold. PUB/SUB
may drop (high-water mark, slow joiner, reconnect): the core notices the gap and fetches the
range over DEALER/ROUTER. Every other replication message (acks, fetches, votes, heartbeats) goes
over the sender's DEALER to the receiver's ROUTER, coalesced into one `Replicate` message per
peer per pass. Every few hundred milliseconds each node also sends each peer a `NodeHeartbeat`
naming the partitions it leads, so every node can route clients to leaders it does not share a
partition with, and knows who is alive at the application level (libzmq's own heartbeats would
answer for a process that is stuck).

Metadata. `__meta` is a partition like any other, replicated by the same core on the voter
nodes. Each voter applies its committed commands; every other node follows it by long-poll
fetching `__meta` from its leader, storing the batches unchanged and applying them. A node learns
which partitions it holds by applying `create_topic` commands that name it.

Peer input is checked, never asserted: a frame that fails to decode, or whose fields are out of
their bounds (zq.core.bounds), is counted, answered with an error where a reply is possible, and
dropped; under [security] a message only nodes send is refused from a client key; the loop goes
on serving everyone else. An unexpected error while stepping, writing or acting for one partition
fences that partition (`_fence`: logged, counted, its requests answered `partition_fenced`) until
a restart rebuilds it from the disk; every other partition keeps serving.
"""
from __future__ import annotations

import dataclasses
import gc
import heapq
import itertools
import logging
import os
import random
import signal
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cbor2
import zmq

from zq import batch as zbatch
from zq import protocol as P
from zq.core import metadata as meta
from zq.core.repl_types import (BACKPRESSURE, COMMITTED, DUPLICATE_SEQUENCE, LEADER, HardState, NOT_LEADER, OUT_OF_ORDER,
                                Outcome, ReplicationConfig)  # noqa: F401 (Outcome in annotations)
from zq.core.repl_types import RecoveryPoll, RecoveryState
from zq.core.replication import Replica
from zq.errors import (Backpressure, CorruptData, InvalidRequest, LeaderNotAvailable, NotAuthorised, NotLeader,
                       OffsetOutOfRange, OutOfOrderSequence, PartitionFenced, UnknownTopic, ProtocolError, StorageFull,
                       UnknownPartition, ZqError, from_wire)
from zq.io import replicas as R
from zq.io import security
from zq.io.store import Store, set_aside
from zq.node.founding import FOUND_WAIT_MS, decide_founding
from zq.node.replicas import READY_ROUNDS_MAX, Part as _Part, ReplicaSet  # noqa: F401 (READY_ROUNDS_MAX: tests)
from zq.limits import DEFAULT, Limits
from zq.types import META_TOPIC, META_TP, TopicPartition

log = logging.getLogger("zq.node")

META_FETCH_WAIT_MS = 1_000        # long-poll of a learner on __meta
META_RETRY_MS = 200               # pause before a failed __meta fetch or registration is sent again
PEER_REQUEST_TIMEOUT_MS = 3_000   # a peer request with no answer by then is given up
STATUS_WAIT_MS = 400              # how long `zq status` waits for the other nodes' local views
NODE_HEARTBEAT_MS = 250           # how often a node tells each peer it is alive and what it leads
NODE_ALIVE_MS = 3_000             # a node heard from within this long counts as alive
IN_SYNC_LAG_MS = 1_000            # a replica lacking only batches younger than this is in sync
IN_SYNC_READ_BYTES = 64 * 1024    # read to find the oldest batch a replica lacks (past control batches)
DRAIN_CHECK_MS = 20               # how often a drain looks whether leadership has moved away
LEAVE_AFTER_ANSWER_MS = 100       # a drained node stops this long after its answer, so the answer goes out
NODE_DEAD_MS = 10_000             # ... and as dead after this long
RETENTION_INTERVAL_MS = 5_000     # how often retention runs
METRICS_REFRESH_MS = 1_000        # how often the /metrics snapshot of partitions is taken
DISK_CHECK_INTERVAL_MS = 1_000    # how often free disk space is read
DISK_FREE_BYTES_MIN = 64 * 1024 * 1024  # below this, produce is refused with StorageFull
PENDING_ADMIN_MAX = 1_000         # creates/deletes waiting for every node to apply them before the reply
PEER_PENDING_MAX = 1_000          # requests awaiting an answer, per peer
PREFERRED_LEADER_DELAY_MS = 300  # a new partition's preferred leader stands this soon after creation
PREFERRED_STAND_TRIES_MAX = 10    # ... tried again this often while its replica still polls (recovering)
REQUESTS_BUDGET_MS = 250          # client requests handled per loop pass, in time (see Node.run)
SLOW_PASS_MS = 250                # a loop pass longer than this is logged: it delays heartbeats
PUB_SNDHWM = 10_000               # Appends queued per subscriber before PUB drops them (followers fetch the gap)
FETCH_PENDING_SWEEP_MS = 1_000    # how often fetch replies written out are struck off their clients' accounts
LOG_REPEAT_MS = 10_000            # a repeated warning is logged at most once per this long (the next says how many)
CLOCK_JUMP_MS = 1_000             # the wall clock moving this far against the monotonic one between reads is a jump
CLOCK_SKEW_WARN_MS = 10_000       # a leader's clock this far off its replica set's median is logged
TEST_CLOCK_OFFSET_ENV = "ZQ_TEST_CLOCK_OFFSET_MS"  # tests only: shifts this node's wall clock (README, "Clocks")
BORN_META = b"zq-born"            # meta key: the __meta offset from which this store has held everything it was given

# Replication timing for real nodes: a Python process under load (GC, fsync, 2 cores) stalls for
# tens of milliseconds at times, so elections wait a second, not Raft's usual 150-300 ms.
# consumer groups (leases, acks, retries, dead letters) and membership (SWIM failure detection, zeroconf)
DEFAULT_SERVICES = ("zq.io.groups", "zq.io.membership")
NODE_REPLICATION = ReplicationConfig(election_timeout_ms=1_000, heartbeat_interval_ms=100, fetch_retry_ms=250)


def _test_clock_offset_ms() -> int:
    """For tests only: a wall-clock offset from the environment, read once (a node a day ahead)."""
    text = os.environ.get(TEST_CLOCK_OFFSET_ENV, "").strip()
    try:
        return int(text or 0)
    except ValueError:
        raise ZqError(f"{TEST_CLOCK_OFFSET_ENV}={text!r} is not a whole number of milliseconds; "
                      "unset it (it is for tests)") from None


_CLOCK_OFFSET_MS = _test_clock_offset_ms()


def now_ms() -> int:
    """This node's wall clock (the only place that reads it)."""
    return int(time.time() * 1000) + _CLOCK_OFFSET_MS


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
    voters: tuple[str, ...] = ()         # nodes that hold __meta; empty: this node alone (or learn from seeds)
    topology: object | None = None       # zq.topology.Topology when started from a file
    discovery: bool = True
    metrics: bool = True                 # serve Prometheus metrics on port+2
    retention_interval_ms: int = RETENTION_INTERVAL_MS
    disk_free_bytes_min: int = DISK_FREE_BYTES_MIN
    replication: ReplicationConfig = NODE_REPLICATION
    services: tuple[str, ...] = DEFAULT_SERVICES   # modules whose install(node) adds a service before the loop
    limits: Limits = field(default_factory=lambda: DEFAULT)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class _LimitedLog:
    """Repeated warnings of the loop, at most one line per kind per LOG_REPEAT_MS; the next line
    of a kind says how many were left out. Kinds are a fixed set of names (bounded)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}   # kind -> (mono ms logged, left out since)

    def log(self, level: int, kind: str, fmt: str, *args: Any, exc_info: bool = False) -> None:
        now = mono_ms()
        last = self._last.get(kind)
        if last is not None and now - last[0] < LOG_REPEAT_MS:
            self._last[kind] = (last[0], last[1] + 1)
            return
        if last is not None and last[1]:
            fmt, args = fmt + " (and %d more like it in %d s)", (*args, last[1], (now - last[0]) // 1000)
        self._last[kind] = (now, 0)
        log.log(level, fmt, *args, exc_info=exc_info)


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

    def __init__(self, ctx: zmq.Context, name: str, address: str, keys: Any = None):
        self.name = name
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        if keys is not None:
            security.peer_socket(self.sock, keys)   # nodes talk to each other as Curve clients with the cluster key
        self.sock.setsockopt(zmq.LINGER, 0)          # a stopping node must not wait on a dead peer
        self.sock.setsockopt(zmq.SNDHWM, 10_000)     # bounded queue towards one peer (queued while it connects)
        self.sock.setsockopt(zmq.RCVHWM, 10_000)
        self.sock.setsockopt(zmq.SNDTIMEO, 0)        # never block the loop on a send
        self.sock.connect(f"tcp://{address}")
        self.pending: dict[int, tuple[int, Callable[[Any, list], None]]] = {}
        self.last_seen_ms = 0

    def close(self) -> None:
        self.sock.close(0)


def _pub_address(address: str) -> str:
    host, port = address.rsplit(":", 1)
    return f"{host}:{int(port) + 1}"


class _StoreStorage:
    """The real host's storage for the pass (zq.node.host.Storage): RocksDB through zq.io.store."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def begin(self) -> Any:
        return self.node.store.begin()

    def write_ready(self, txn: Any, key: TopicPartition, reset_to: int | None, truncate_from: int | None,
                    entries: Any, hard_state: HardState | None) -> None:
        # Everything that can fail on bad data (restamping and verifying each batch, encoding the
        # hard state) happens before the first write to the pass's shared batch.
        stored = [R.stored_from_entry(entry) for entry in entries]
        encoded = None if hard_state is None else R.encode_hard_state(hard_state)
        if reset_to is not None:
            txn.reset(key, reset_to)
        if truncate_from is not None:
            txn.truncate_from(key, truncate_from)
        for value, header in stored:
            txn.append(key, value, header)
        if encoded is not None:
            txn.put_meta(R.hard_state_key(key), encoded)

    def put_hard_state(self, txn: Any, key: TopicPartition, hard_state: HardState) -> None:
        txn.put_meta(R.hard_state_key(key), R.encode_hard_state(hard_state))

    def commit(self, txn: Any, sync: bool) -> bool:
        return self.node._commit_store(txn, sync)


class _NodeReplicaEvents:
    """The node's reactions to the pass's durable effects (zq.node.host.ReplicaEvents)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def route(self, part: _Part, out: Any) -> None:
        self.node._route(part, out)

    def after_durable(self, part: _Part, rd: Any) -> None:
        self.node._after_durable(part, rd)

    def after_round(self) -> None:
        self.node._apply_learned_meta()

    def write_failed(self, part: _Part) -> None:
        self.node._reopen_after_failed_write(part)

    def fence(self, part: _Part, doing: str, error: Exception) -> None:
        self.node._fence(part, doing, error)


class Node:
    # The replicas and the pass's state live in zq.node.replicas.ReplicaSet; these names stay for
    # the code and tests that read them.
    parts = property(lambda self: self.replica_set.parts)
    dirty = property(lambda self: self.replica_set.dirty)
    fenced = property(lambda self: self.replica_set.fenced)
    lazy_hard_states = property(lambda self: self.replica_set.lazy_hard_states)

    def __init__(self, config: NodeConfig):
        self.config = config
        self.limits = config.limits
        self.name = config.name
        self.incarnation = now_ms()
        self.started_ms = now_ms()
        self.rng = random.Random()     # election timeouts; the simulator seeds its own
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
        self.store = Store(config.data_dir, limits=self.limits)
        self.meta = meta.MetadataState()
        # Without voters from a topology, a node learns them from a seed or a discovered peer; if it
        # finds no cluster within FOUND_WAIT_MS, the lowest-named of the waiting nodes founds one.
        self.voters: tuple[str, ...] = config.voters or (() if config.seeds or config.discovery else (config.name,))
        self.parked: dict[TopicPartition, list[_Parked]] = defaultdict(list)
        self.parked_count = 0
        self.parked_by_client: dict[tuple[bytes, TopicPartition], _Parked] = {}   # one long-poll per client and partition
        # Fetch replies handed to ZeroMQ that it has not yet written to the client's TCP socket (their
        # MessageTracker is not done), per client identity: what a client that does not read makes us hold.
        self.fetch_pending: dict[bytes, deque] = {}            # identity -> (tracker, bytes), oldest first
        self.fetch_pending_bytes: dict[bytes, int] = {}
        self.fetch_pending_total = 0
        self.peers: dict[str, _Peer] = {}
        self.addresses: dict[str, str] = {}                     # node name -> ROUTER address
        self.last_heard: dict[str, int] = {}                    # node name -> mono ms
        self.leader_view: dict[TopicPartition, tuple[str, int]] = {}  # from peers' heartbeats
        self.timers: list[tuple[int, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._req_ids = itertools.count(1)
        self.counters: dict[str, int] = defaultdict(int)
        # The replicas this node hosts and the persist-then-send pass (zq.node.replicas), shared with the simulator.
        self.replica_set = ReplicaSet(_StoreStorage(self), _NodeReplicaEvents(self), self.counters)
        self.storage_error: ZqError | None = None               # why the last failed write failed
        self.meta_applied_by: dict[str, int] = {}               # node -> __meta applied offset (heartbeats)
        self.pending_creates: list[tuple[int, int, bytes, P.OkReply]] = []
        self.disk_full = False
        self.limited_log = _LimitedLog()
        self._wall_minus_mono: int | None = None                # to notice the wall clock jumping
        self.outbox: dict[str, list] = defaultdict(list)        # peer -> Replicate items of this pass
        self.pub_out: list[tuple[TopicPartition, list]] = []
        self.meta_learned: list[tuple[int, dict]] = []          # learner: fetched commands awaiting durability
        self.stopping = False
        self.draining = False                                   # `zq node drain`: never stand, hand leadership away
        self.pending_drain: tuple[int, int, bytes, int, bool] | None = None  # (req_id, deadline, identity, led, leave)
        self.leave_requested = False                            # set by a drain with leave: the loop ends
        self._registered = False
        self.sub_connected: dict[str, str] = {}                 # peer -> address its PUB is subscribed at
        self.ctx = zmq.Context.instance()
        self.keys = security.node_keys_from_topology(config.topology)
        if self.keys is None:
            log.warning(security.OPEN_CLUSTER_WARNING)
            self.authenticator = None
        else:
            self.authenticator = security.Authenticator.start(self.ctx, self.keys)
        self.router = self._bind(zmq.ROUTER, config.port)
        self.pub = self._bind(zmq.PUB, config.port + 1)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, PUB_SNDHWM)  # bounded; an overflow is a gap the core fetches
        if self.keys is not None:
            security.peer_socket(self.sub, self.keys)     # replication streams are encrypted and authenticated
        self.metrics_server = None
        self.metrics_rows: list[dict] = []                      # partitions view for /metrics, refreshed each second
        self.group_metrics_rows: list[dict] = []                # consumer groups' rows for /metrics, likewise
        self.services: list[Any] = []                           # see add_service
        self.member_view: Callable[[str, int], tuple[str, int | None] | None] | None = None
        self.service_handlers: dict[type, Callable[[bytes, Any, list], None]] = {}
        self._seed_addresses_from_topology()
        self.born: int | None = None                            # see _note_born; None: unknown (a fresh or damaged store)
        self.created_at: dict[TopicPartition, int] = {}         # __meta offset that created our replica's set
        self.recovering: dict[TopicPartition, bool] = {}        # replicas opened recovering -> logged as a warning
        self.wal_tail_lost = False                              # this start found a dropped WAL tail
        self.wal_marker_pending = False                         # ... not yet recorded durably
        self._load()
        for module in config.services:
            import importlib
            try:
                installer = importlib.import_module(module).install
            except (ImportError, AttributeError) as e:
                raise ZqError(f"service module {module!r} cannot be loaded ({e}); is zq installed completely?") from None
            installer(self)

    # ------------------------------------------------------------------ start-up

    def _bind(self, kind: int, port: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)               # on stop, unsent messages are dropped: peers and clients retry
        s.setsockopt(zmq.SNDTIMEO, 0)             # a peer that stopped reading must not stall the loop
        if kind == zmq.ROUTER:
            s.setsockopt(zmq.ROUTER_MANDATORY, 1)     # an unroutable reply must fail loudly (counted), not vanish
            s.setsockopt(zmq.SNDHWM, self.limits.router_sndhwm)   # bounded reply queue per client
            s.setsockopt(zmq.RCVHWM, self.limits.router_rcvhwm)   # bounded inbox: producers beyond it wait in TCP
            s.setsockopt(zmq.MAXMSGSIZE, self.limits.frame_bytes_max)  # a bigger frame drops the connection
        else:
            s.setsockopt(zmq.SNDHWM, PUB_SNDHWM)  # past it PUB drops for that subscriber; it fetches the gap
        if self.keys is not None:
            # CurveZMQ: the ROUTER admits nodes and allowed clients, the PUB nodes only (ZAP decides).
            security.server_socket(s, self.keys, security.ROUTER_DOMAIN if kind == zmq.ROUTER else security.PEER_DOMAIN)
        try:
            s.bind(f"tcp://{self.config.host}:{port}")
        except zmq.ZMQError as e:
            s.close(0)
            raise ZqError(f"cannot listen on {self.config.host}:{port}: {e.strerror}; "
                          "is another node using that port? pick another with --port") from None
        return s

    def _seed_addresses_from_topology(self) -> None:
        topo = self.config.topology
        for n in getattr(topo, "nodes", ()) if topo is not None else ():
            if n.name != self.name:
                self.addresses[n.name] = f"{n.host}:{n.port}"

    def _load(self) -> None:
        """Rebuild state from the store: __meta first, then every local partition at its log end.
        A store found damaged while doing so (a block that fails its checksum) is set aside whole
        and the node starts from an empty one, every partition it hosts recovering."""
        self._check_store_at_start()
        try:
            self._load_parts()
            return
        except CorruptData as e:
            damage = e.message  # not the exception: its traceback holds RocksDB iterators, which keep the DB open
        self._set_store_aside(damage)
        self._load_parts()

    def _check_store_at_start(self) -> None:
        for line in self.store.recovery_warnings:
            log.warning("RocksDB recovery: %s", line)
        raw = self.store.get_meta(BORN_META)
        self.born = int(raw) if raw is not None else None
        if self.store.dropped_wal_tail is not None:
            # RocksDB dropped writes after a damaged WAL record; the hard states may have gone with
            # them, so every replica here may have forgotten votes or acknowledged entries.
            log.error("data dir %s: RocksDB dropped the tail of its write-ahead log after a damaged record "
                      "(%s); every partition of this node rejoins as a learner and votes again once caught up",
                      self.config.data_dir, self.store.dropped_wal_tail)
            self.wal_tail_lost = self.wal_marker_pending = True
            self.born = None
            self._begin().delete_meta(BORN_META)

    def _set_store_aside(self, damage: str) -> None:
        """Move the damaged store's files aside (kept for inspection) and start with an empty one."""
        data_dir = Path(self.config.data_dir)
        self.parts.clear()
        gc.collect()  # every RocksDB iterator of the failed load is gone: close() then really closes
        self.store.close()
        try:
            aside = set_aside(data_dir, str(int(time.time() * 1000)))
        except OSError as err:
            raise ZqError(f"data dir {data_dir} is damaged ({damage}) and cannot be moved aside ({err}); "
                          "move its files aside by hand and start the node again") from None
        log.error("data dir %s is damaged (%s); its files are moved aside to %s and this node copies its "
                  "partitions from the other replicas (each rejoins as a learner and votes again once caught up)",
                  data_dir, damage, aside)
        self.store = Store(data_dir, limits=self.limits)
        self.replica_set.clear()
        self.meta = meta.MetadataState()
        self.timers.clear()
        self.created_at.clear()
        self.recovering.clear()
        self.born = None
        self.wal_tail_lost = self.wal_marker_pending = False  # the new store has every partition recovering anyway

    def _note_created(self, offset: int, command: dict) -> None:
        """Remember the __meta offset that made each partition's replica set (see _replica_lost)."""
        op = command.get("op")
        if op == "create_topic" and isinstance(command.get("partitions"), list):
            for p in range(len(command["partitions"])):
                self.created_at[TopicPartition(command["id"], p)] = offset
        elif op == "reassign_partition" and type(command.get("partition")) is int:
            self.created_at[TopicPartition(command["id"], command["partition"])] = offset

    def _note_born(self, offset: int) -> None:
        """From here on this store holds whatever this node was given: a partition created (or
        moved here) by a __meta command at or after `offset` that has no state here never had any."""
        if self.born is None:
            self.born = offset
            self._begin().put_meta(BORN_META, str(offset).encode())
            log.info("this node's store holds everything from __meta offset %d on", offset)

    def _replica_lost(self, tp: TopicPartition, st: Any, hs: HardState | None) -> str | None:
        """Why this replica may have forgotten votes or acknowledged entries, or None."""
        if self.wal_tail_lost:
            return "the data dir lost the tail of its write-ahead log"
        if st is not None or hs is not None:
            return None
        created = -1 if tp == META_TP else self.created_at.get(tp, -1)
        if self.born is None:
            return "no state, in a data dir that is new, wiped or was damaged"
        if created < self.born:
            return f"no state, although it was made (at __meta offset {created}) before this data dir (offset {self.born})"
        return None

    def _load_parts(self) -> None:
        if self.name in self.voters:
            self._open_part(META_TP, META_TOPIC, list(self.voters), sync=True)
        else:
            st = self.store.partition_state(META_TP)
            self.parts[META_TP] = _Part(META_TP, META_TOPIC, None, True, st.log_start if st else 0,
                                        st.log_end if st else 0)
        for offset, command in self._read_meta_commands(0, self.parts[META_TP].high_watermark):
            self._note_created(offset, command)
            self.meta.apply(offset, command)
        meta_part, meta_st = self.parts[META_TP], self.store.partition_state(META_TP)
        if (self.born is None and not self.wal_tail_lost and meta_st is not None
                and (meta_part.replica is None or not meta_part.replica.recovering)):
            # A store written before this version, intact: it holds everything its __meta log holds.
            self._note_born(meta_st.log_end)
        for n in self.meta.nodes.values():
            if n.name != self.name:
                self.addresses.setdefault(n.name, n.address)
        for t in self.meta.topics.values():
            self._open_topic(t)
        self.wal_tail_lost = False  # every replica here is recovering now (durably so after the first write)
        log.info("node %s loaded: %d topics, %d local partitions, __meta applied to %d",
                 self.name, len(self.meta.topics), len(self.parts) - 1, self.meta.applied)

    def _read_meta_commands(self, start: int, upto: int) -> list[tuple[int, dict]]:
        out = []
        offset = start
        while offset < upto:
            values = self.store.read(META_TP, offset, 4 * 1024 * 1024, upto=upto)
            if not values:
                break
            for v in values:
                h = zbatch.verify_stored(v)
                for rec in zbatch.iter_records(v, offset, verify=False):
                    out.append((rec.offset, cbor2.loads(rec.value)))
                offset = h.next_offset
        return out

    def _open_topic(self, t: meta.TopicMeta) -> None:
        for p, target in enumerate(t.partitions):
            tp = TopicPartition(t.id, p)
            # A replica being moved away still counts until the log's configuration drops it, so
            # one that has data here opens even when the target no longer names this node.
            if self.name in target or (tp not in self.parts and self.store.partition_state(tp) is not None):
                self._open_topic_part(t, p)

    def _open_topic_part(self, t: meta.TopicMeta, p: int) -> None:
        tp = TopicPartition(t.id, p)
        sync = t.config.get("durability", "fsync") == "fsync"
        self._open_part(tp, t.name, self._created_with(t, p), sync, target=t.partitions[p])

    def _created_with(self, t: meta.TopicMeta, p: int) -> list[str]:
        """The configuration our replica of `t`/`p` starts from before its log says more (the
        core keeps it in the hard state once it has one): the set the partition was created with,
        or, with no hard state on a partition ever reassigned, none at all (a replica made by a
        reassignment, or one whose data was deleted by an earlier move, must not count on a
        membership its node once had)."""
        if p in t.reassigned and R.load_hard_state(self.store, TopicPartition(t.id, p)) is None:
            return []
        return list(t.initial[p] if p < len(t.initial) else t.partitions[p])

    def _open_part(self, tp: TopicPartition, name: str, replicas: list[str], sync: bool, hw_floor: int = 0,
                   target: list[str] | None = None) -> None:
        """Open this node's replica of a partition. `replicas` is the configuration it starts from
        (see `_created_with`); the core reads later ones from the log itself, so a replica that joins
        by a reassignment is a learner until a configuration entry names it. `target` is __meta's."""
        if tp in self.parts:
            return
        st = self.store.partition_state(tp)
        hs = R.load_hard_state(self.store, tp)
        if hs is not None and hw_floor > hs.high_watermark:
            hs = dataclasses.replace(hs, high_watermark=hw_floor)
        if hs is None:
            gone = self.store.get_meta(R.removed_key(tp))
            if gone is not None:
                # We held this partition before a move took it away: the new replica must not be
                # usable by any leader of an epoch we had reached (zq.core.replication).
                hs = HardState(epoch=int(gone) + 1, join_epoch=int(gone) + 1)
        never_voted = hs is None   # before recovery marks it: a new set's preferred leader stands soon
        lost = self._replica_lost(tp, st, hs)
        if lost is not None or (hs is not None and hs.recovering):
            # A new node's __meta (a new cluster, or a node that lost its disk: it cannot tell) is
            # worth an info line; any other loss is worth a warning.
            loud = not (tp == META_TP and st is None and hs is None and not self.wal_tail_lost)
            log.log(logging.WARNING if loud else logging.INFO,
                    "%s/%d: %s; this replica asks the others before it votes, rejoins as a learner and votes "
                    "again once it has caught up", name, tp.partition, lost or "it was recovering")
            hs = dataclasses.replace(hs or HardState(), recovering=True)
            self.recovering[tp] = loud
        now = mono_ms()
        replica = Replica(self.name, replicas, R.StoreReader(self.store, tp), rng=self.rng, now_ms=now,
                          config=self.config.replication, hard_state=hs, log_end=st.log_end if st else 0,
                          log_start=st.log_start if st else None)
        replica.set_target(list(target if target is not None else replicas))
        if self.draining:
            replica.set_draining(True)
        if replica.voters == (self.name,):
            replica.tick(replica.next_timer_ms())   # alone in its set: lead at once
        elif never_voted and replicas and replicas[0] == self.name:
            # The preferred leader of a new partition stands soon rather than after a whole election
            # timeout; "soon" leaves the other replicas time to apply the same create_topic command,
            # or they would drop its vote request for a partition they do not know yet.
            self._at(mono_ms() + PREFERRED_LEADER_DELAY_MS, lambda: self._stand(tp))
        self.parts[tp] = _Part(tp, name, replica, sync, st.log_start if st else 0)
        self.dirty.add(tp)
        for peer in sorted({*replicas, *(target or ())}):
            if peer != self.name:
                self._connect_sub(peer)
        self.sub.setsockopt(zmq.SUBSCRIBE, R.tp_bytes(tp))

    def _stand(self, tp: TopicPartition, tries: int = PREFERRED_STAND_TRIES_MAX) -> None:
        part = self.parts.get(tp)
        if part is not None and part.replica is not None and part.replica.recovering and tries > 0:
            # A new store polls before it may stand (a founding cluster's __meta): stand once that is done.
            self._at(mono_ms() + PREFERRED_LEADER_DELAY_MS, lambda: self._stand(tp, tries - 1))
            return
        if part is not None and part.replica is not None and part.replica.epoch == 0 and part.replica.leader is None:
            part.replica.tick(max(mono_ms(), part.replica.next_timer_ms()))
            self.dirty.add(tp)

    def _connect_sub(self, peer: str) -> None:
        address = self.addresses.get(peer)
        if address is None or self.sub_connected.get(peer) == address:
            return
        if peer in self.sub_connected:
            self.sub.disconnect(f"tcp://{_pub_address(self.sub_connected[peer])}")
        self.sub.connect(f"tcp://{_pub_address(address)}")
        self.sub_connected[peer] = address

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.sub, zmq.POLLIN)
        polled_peers: set[str] = set()
        self._start_background()
        if self.config.metrics:
            from zq.io.metrics import serve_metrics
            self.metrics_server = serve_metrics(self, self.config.host, self.config.port + 2)
        log.info("node %s serving on %s (cluster %s, voters %s)", self.name, self.config.address,
                 self.config.cluster, ", ".join(self.voters) or "learnt from seeds")
        while not stop.is_set() and not self.leave_requested:
            for name, peer in self.peers.items():
                if name not in polled_peers:
                    poller.register(peer.sock, zmq.POLLIN)
                    polled_peers.add(name)
            ready = dict(poller.poll(self._poll_timeout_ms()))
            pass_start = time.monotonic()
            # Replication and peers' answers first: they are cheap and an election waits on them.
            # Client requests then, within a time budget: a backlog of leases and acks (each a few
            # ms of work) must not keep this pass from writing, replicating and heartbeating; what
            # is left waits in the socket for the next pass.
            if self.sub in ready:
                self._drain(self.sub, self._on_sub_frames)
            for peer in list(self.peers.values()):
                if peer.sock in ready:
                    self._drain(peer.sock, lambda frames, peer=peer: self._on_peer_frames(peer, frames))
            if self.router in ready:
                # Under [security] frames are received uncopied, so the CURVE user id ZAP gave them is readable.
                self._drain(self.router, self._on_router_frames, pass_start + REQUESTS_BUDGET_MS / 1000,
                            copy=self.keys is None)
            drained_at = time.monotonic()
            try:
                self._tick_replicas()
                for service in self.services:
                    try:
                        service.tick(mono_ms())
                    except Exception:
                        self.counters["internal_errors"] += 1
                        self.limited_log.log(logging.ERROR, "service_tick", "service %s failed in tick",
                                             type(service).__name__, exc_info=True)
                ticked_at = time.monotonic()
                self._finish_pass()
                finished_at = time.monotonic()
                self._run_timers()
            except Exception:
                # A bug of ours between the cores and the disk: going on could acknowledge what is not
                # stored, so the node stops, loudly; a restart rebuilds every core from the disk.
                log.critical("a loop pass failed; stopping so that a restart recovers from what is on disk",
                             exc_info=True)
                raise
            pass_ms = (time.monotonic() - pass_start) * 1000
            if pass_ms > SLOW_PASS_MS:
                self.counters["slow_passes"] += 1
                end = time.monotonic()
                self.limited_log.log(logging.WARNING, "slow_pass",
                            "a loop pass took %.0f ms (over %d ms starves heartbeats): requests %.0f ms, "
                            "ticks %.0f ms, write and send %.0f ms, timers %.0f ms", pass_ms, SLOW_PASS_MS,
                            (drained_at - pass_start) * 1000, (ticked_at - drained_at) * 1000,
                            (finished_at - ticked_at) * 1000, (end - finished_at) * 1000)
        self.close()

    def _poll_timeout_ms(self) -> int:
        due = self.timers[0][0] if self.timers else mono_ms() + 100
        return max(0, min(100, due - mono_ms()))

    def _drain(self, sock: zmq.Socket, handle: Callable[[list], None], until: float | None = None,
               copy: bool = True) -> None:
        for _ in range(self.limits.inbox_drain_max):
            if until is not None and time.monotonic() >= until:
                self.counters["requests_deferred"] += 1   # the rest is served next pass
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                return
            handle(frames)

    def _on_router_frames(self, frames: list) -> None:
        user = None
        if frames and isinstance(frames[0], zmq.Frame):
            user = _user_id(frames[-1])
            frames = [f.bytes for f in frames]
        identity, body = frames[0], frames[1:]
        try:
            msg, payload = P.decode(body, self.limits)
        except ZqError as e:
            self.counters["invalid_requests" if isinstance(e, InvalidRequest) else "protocol_errors"] += 1
            log.debug("dropped a bad frame: %s", e)
            # Reply only when it looks like a zq peer (it can read the reply); garbage gets silence.
            if body and bytes(body[0])[:2] == b"ZQ":
                self._send(identity, P.encode(P.error_reply(getattr(e, "req_id", 0), e)))
            return
        if self.keys is not None and user != security.NODE_USER and P.from_nodes_only(msg):
            # Only a holder of the cluster secret key may speak as a node (ZAP names it NODE_USER).
            self.counters["not_authorised"] += 1
            self._warn_limited("not_authorised", "refused a %s from a client key: only nodes of the cluster send it",
                               type(msg).__name__)
            if hasattr(msg, "req_id"):
                self._send(identity, P.encode(P.error_reply(msg.req_id, NotAuthorised(
                    f"{type(msg).__name__} is sent by the cluster's nodes only, and this connection uses a client key"))))
            return
        handler = self.HANDLERS.get(type(msg))
        if handler is None and type(msg) in self.service_handlers:
            service_handler = self.service_handlers[type(msg)]
            handler = lambda node, identity, msg, payload: service_handler(identity, msg, payload)  # noqa: E731
        if handler is None:
            self.counters["protocol_errors"] += 1
            self._send(identity, P.encode(P.error_reply(getattr(msg, "req_id", 0), ProtocolError(
                f"{type(msg).__name__} is not a request a node serves"))))
            return
        try:
            handler(self, identity, msg, payload)
        except Exception as e:
            if not isinstance(e, ZqError):
                # Our bug, not the peer's: log it loudly, answer, and keep serving everyone else.
                log.exception("handling %s failed", type(msg).__name__)
                e = ZqError(f"the node failed to handle {type(msg).__name__} ({e.__class__.__name__}); "
                            "this is a bug in zq, please report it with the node's log")
            self.counters[f"errors_{e.code}"] += 1
            if hasattr(msg, "req_id") and not isinstance(msg, (P.Replicate, P.NodeHeartbeat)):   # one-way: no reply
                self._send(identity, P.encode(P.error_reply(msg.req_id, e)))

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            self.router.send_multipart([identity, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:
            # Gone (EHOSTUNREACH under ROUTER_MANDATORY) or not reading (EAGAIN): it will retry or time out.
            self.counters["replies_dropped"] += 1

    # ------------------------------------------------------------------ persist, then send

    def _begin(self):
        """The pass's write transaction (zq.io.store.WriteTxn), committed once at the pass's end."""
        return self.replica_set.begin()

    def _finish_pass(self) -> None:
        """Write what the cores and handlers produced as one batch, then send what waited for it
        (zq.node.replicas: the same pass the simulator runs); then the peers' coalesced messages go."""
        self.replica_set.finish_pass()
        self._flush_outbox()

    def _commit(self) -> bool:
        return self.replica_set.commit()

    def _commit_store(self, txn: Any, sync: bool) -> bool:
        """The real host's commit (see _StoreStorage): RocksDB, fsynced if asked."""
        sync |= self.wal_marker_pending  # the loss is recorded (every replica recovering) before the marker goes
        try:
            self.store.commit(txn, sync=sync)
        except StorageFull as e:
            self.limited_log.log(logging.ERROR, "write_failed", "write failed, nothing of this pass was stored: %s",
                                 e.message)
            self.counters["storage_errors"] += 1
            self.disk_full = True   # refuse produce until the disk check sees room again
            self.storage_error = e
            self.meta_learned.clear()
            learner = self.parts[META_TP]
            if learner.replica is None:
                st = self.store.partition_state(META_TP)
                learner.learner_end = st.log_end if st else 0
            return False
        if self.wal_marker_pending:
            self.store.clear_dropped_wal_tail()
            self.wal_marker_pending = False
        return True

    def _reopen_after_failed_write(self, part: _Part) -> None:
        """The write of this pass failed: the core's view of its log is ahead of the disk, so the
        partition is reopened from what the store holds, and its waiting producers are told."""
        error = self.storage_error
        self._fail_waiters(part, error)
        tp = part.tp
        if self.parts.get(tp) is not part:
            return   # closed (topic deleted) in this pass
        del self.parts[tp]
        # What was committed stays committed, and all of it was on disk before this failed write:
        # the reopened replica keeps serving it, even if the stored high-watermark hint is older.
        if tp == META_TP:
            self._open_part(tp, part.name, list(self.voters), part.sync, hw_floor=part.replica.high_watermark)
            return
        t = self.meta.topics_by_id.get(tp.topic_id)
        if t is not None:
            self._open_part(tp, part.name, self._created_with(t, tp.partition), part.sync,
                            hw_floor=part.replica.high_watermark, target=t.partitions[tp.partition])

    def _after_durable(self, part: _Part, rd) -> None:
        """A durable Ready's effects beyond sends and answers (zq.node.replicas did those)."""
        replica = part.replica
        if part.tp in self.recovering and not replica.recovering:
            loud = self.recovering.pop(part.tp)
            log.log(logging.WARNING if loud else logging.INFO,
                    "%s/%d: recovered (caught up with leader %s in epoch %d); it votes again", part.name,
                    part.tp.partition, replica.leader or "none needed", replica.epoch)
            if part.tp == META_TP:
                self._note_born(replica.log_end)
        if rd.role is not None:
            log.info("%s/%d: %s in epoch %d (leader %s)", part.name, part.tp.partition, rd.role.role,
                     rd.role.epoch, rd.role.leader or "unknown")
            self.counters[f"became_{rd.role.role}"] += 1
            if rd.role.role != LEADER:
                self._refuse_parked(part.tp)
            if rd.role.leader not in (None, self.name):
                self._connect_sub(rd.role.leader)
        if replica.removed and self.parts.get(part.tp) is part:
            self._remove_part(part)
            return
        if rd.high_watermark is not None:
            self._serve_parked(part.tp)
            for service in self.services:
                hook = getattr(service, "on_high_watermark", None)
                if hook is not None:
                    hook(part.name, part.tp.partition, rd.high_watermark)
            if part.tp == META_TP:
                self._apply_committed_meta()

    def _route(self, part: _Part, out) -> None:
        """A core's message: a broadcast with entries goes on PUB; everything else by DEALER.
        (The partition may have been closed in this very pass, by a topic deletion: its last
        messages still go out, harmlessly.)"""
        tp = part.tp
        item = [tp.topic_id, tp.partition, P.to_array(out.message)]
        if out.to is None:
            if getattr(out.message, "entries", None):
                self.pub_out.append((tp, item))
                return
            for peer in part.replica.peers:
                self.outbox[peer].append(item)
        else:
            self.outbox[out.to].append(item)

    def _flush_outbox(self) -> None:
        for tp, item in self.pub_out:
            items, frames = R.pack_items([item])
            try:
                self.pub.send_multipart([R.tp_bytes(tp), *P.encode(P.Replicate(0, self.name, items), *frames)],
                                        zmq.NOBLOCK)
            except zmq.ZMQError:
                self.counters["pub_dropped"] += 1
        self.pub_out.clear()
        outbox, self.outbox = self.outbox, defaultdict(list)
        for name, items in outbox.items():
            peer = self._peer(name)
            if peer is None:
                self.counters["replication_unroutable"] += len(items)
                continue
            for chunk in R.chunk_items(items, self.limits.frames_per_message_max - 8):
                packed, frames = R.pack_items(chunk)
                self._peer_send(peer, P.Replicate(0, self.name, packed), frames)

    def _peer_send(self, peer: _Peer, msg: Any, frames: list[bytes] = ()) -> None:
        try:
            peer.sock.send_multipart(P.encode(msg, *frames), zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counters["peer_sends_dropped"] += 1

    # ------------------------------------------------------------------ replication in

    def on_replicate(self, identity: bytes, msg: P.Replicate, payload: list[bytes]) -> None:
        self._heard(msg.sender)
        self._step_items(R.unpack_items(msg.items, payload))

    def _on_sub_frames(self, frames: list[bytes]) -> None:
        try:
            msg, payload = P.decode(frames[1:], self.limits)
            if not isinstance(msg, P.Replicate):
                raise ProtocolError("only Replicate travels on PUB/SUB")
            self._step_items(R.unpack_items(msg.items, payload))
        except ZqError as e:
            self.counters["protocol_errors"] += 1
            self._warn_limited("bad_broadcasts", "dropped a bad replication broadcast: %s", e)

    def _step_items(self, items: list) -> None:
        now, wall = mono_ms(), self._wall_clock()
        for item in items:
            part = None
            try:
                if not (isinstance(item, list) and len(item) == 3 and type(item[0]) is int and type(item[1]) is int):
                    raise ProtocolError("a Replicate item is [topic_id, partition, message]")
                tp = TopicPartition(item[0], item[1])
                part = self.parts.get(tp)
                if part is None or part.replica is None or tp in self.fenced:
                    if tp in self.fenced or not self._answer_poll_for_removed(tp, item[2]):
                        self.counters["replication_for_unknown_partition"] += 1   # topic not applied here yet
                    continue
                message = P.from_array(item[2])   # every field range-checked (zq.core.bounds)
                part.replica.tick(now, wall)
                part.replica.step(message)
                self.dirty.add(tp)
            except ZqError as e:
                self.counters["replication_dropped"] += 1
                self._warn_limited("replication_dropped", "dropped a replication message: %s", e)
            except Exception as e:
                if part is not None:
                    self._fence(part, "stepping a replication message", e)
                else:   # our bug before any partition was involved: this item only is lost
                    self.counters["internal_errors"] += 1
                    log.exception("dropped a replication item after an internal error")

    def _fence(self, part: _Part, doing: str, error: Exception) -> None:
        """Set a partition aside after an unexpected error (our bug, or input no check caught): its
        core is never stepped, ticked or written again until a restart rebuilds it from the disk,
        its waiting producers and fetches are told, and every other partition keeps serving."""
        tp = part.tp
        if not self.replica_set.fence(part, doing, error):
            return
        log.error("%s/%d is fenced: %s failed (%s: %s); its other replicas take over, this node serves its other "
                  "partitions, and a restart recovers this one from disk", part.name, tp.partition, doing,
                  error.__class__.__name__, error, exc_info=error)
        fenced = PartitionFenced(f"{part.name}/{tp.partition} is fenced on node {self.name} after an internal error "
                                 f"({error.__class__.__name__}); retry, and check that node's log", node=self.name)
        self._fail_waiters(part, fenced)
        self._refuse_parked(tp, fenced)

    def _fail_waiters(self, part: _Part, error: ZqError | None) -> None:
        """Every producer waiting on this partition (a quorum or a leader ack) is told `error`; a
        callback that fails is logged, and the others are still told."""
        waiters, part.waiters = part.waiters, {}
        acks, part.leader_acks = part.leader_acks, []
        for callback in [*waiters.values(), *(cb for _, cb in acks)]:
            try:
                callback(error)
            except Exception:
                log.exception("telling a producer of %s/%d failed", part.name, part.tp.partition)

    def _warn_limited(self, kind: str, text: str, *args: Any) -> None:
        """Bad peer input: counted by the caller, logged as a warning at most once per LOG_REPEAT_MS per kind."""
        self.limited_log.log(logging.WARNING, kind, text, *args)

    def _answer_poll_for_removed(self, tp: TopicPartition, arr: Any) -> bool:
        """A recovering replica polls a node whose copy a move deleted (its log still names it): the
        node says it holds nothing, in the epoch it had reached, so that the poll can end."""
        gone = self.store.get_meta(R.removed_key(tp))
        if gone is None:
            return False
        message = P.from_array(arr)
        if not isinstance(message, RecoveryPoll):
            return False
        reply = RecoveryState(int(gone), self.name, 0, 0, 0)
        self.outbox[message.sender].append([tp.topic_id, tp.partition, P.to_array(reply)])
        return True

    def _tick_replicas(self) -> None:
        now, wall = mono_ms(), self._wall_clock()
        for tp, part in self.parts.items():
            if part.replica is not None and tp not in self.fenced and part.replica.next_timer_ms() <= now:
                part.replica.tick(now, wall)
                self.dirty.add(tp)

    def _wall_clock(self) -> int:
        """The wall clock for the cores, noticing when it jumps against the monotonic clock (it is
        still passed on: the leaders' median of their replica sets' clocks outvotes it)."""
        wall, mono = now_ms(), mono_ms()
        if self._wall_minus_mono is not None and abs(wall - mono - self._wall_minus_mono) > CLOCK_JUMP_MS:
            self.counters["clock_jumps"] += 1
            self.limited_log.log(logging.WARNING, "clock_jump", "the wall clock of %s jumped by %+d ms; partitions "
                                 "it leads take their time from their replica sets' median clock",
                                 self.name, wall - mono - self._wall_minus_mono)
        self._wall_minus_mono = wall - mono
        return wall

    def _append_time(self, part: _Part) -> int:
        """The append time of a batch proposed now on a partition we lead (see Replica.append_time_ms)."""
        part.replica.tick(mono_ms(), self._wall_clock())
        self.dirty.add(part.tp)
        stamp = part.replica.append_time_ms()
        if stamp is None:
            raise LeaderNotAvailable(f"{part.name}/{part.tp.partition} has a new leader that has not yet heard its "
                                     "replicas' clocks; retry shortly")
        return stamp

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

    # ------------------------------------------------------------------ handlers: data

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

    # ------------------------------------------------------------------ handlers: metadata

    def on_metadata(self, identity: bytes, msg: P.MetadataRequest, payload: list[bytes]) -> None:
        self._send(identity, P.encode(P.MetadataReply(msg.req_id, self.config.cluster, self._nodes_view(),
                                                      self._topics_view(msg.topics))))

    def _topics_view(self, names: list | None) -> list[dict]:
        leader, epoch = self.leader_of(META_TP)
        out = [{"name": META_TOPIC, "id": 0, "config": {},
                "partitions": [{"partition": 0, "leader": leader, "epoch": epoch, "replicas": list(self.voters)}]}]
        for t in sorted(self.meta.topics.values(), key=lambda t: t.name):
            if names is not None and t.name not in names:
                continue
            parts = []
            for p, r in enumerate(t.partitions):
                leader, epoch = self.leader_of(TopicPartition(t.id, p))
                parts.append({"partition": p, "leader": leader, "epoch": epoch, "replicas": r})
            out.append({"name": t.name, "id": t.id, "config": t.config, "partitions": parts})
        return out

    def _nodes_view(self) -> list[dict]:
        out = []
        now = mono_ms()
        for name in sorted(set(self.meta.nodes) | set(self.addresses) | {self.name}):
            if name == self.name:
                host, port = self.config.host, self.config.port
            else:
                host, port = self.addresses.get(name, "?:0").rsplit(":", 1)
            state = self._node_state(name, now)
            if name not in self.meta.nodes and name != self.name and state == "alive":
                state = "joining"   # heard from, not yet in __meta: cannot be given partitions yet
            out.append({"name": name, "host": host, "port": int(port), "state": state,
                        "last_seen_ms": self._last_seen_ago_ms(name, now)})
        return out

    def _heard(self, name: str) -> None:
        self.last_heard[name] = mono_ms()

    def _last_seen_ago_ms(self, name: str, now: int) -> int | None:
        if name == self.name:
            return 0
        if self.member_view is not None:
            seen = self.member_view(name, now)
            if seen is not None and seen[1] is not None:
                return seen[1]
        last = self.last_heard.get(name)
        return None if last is None else now - last

    def _node_state(self, name: str, now: int) -> str:
        if self.member_view is not None and name != self.name:
            seen = self.member_view(name, now)
            if seen is not None:
                return seen[0]
        ago = self._last_seen_ago_ms(name, now)
        if ago is None:
            return "unknown"
        return "alive" if ago <= NODE_ALIVE_MS else "suspect" if ago <= NODE_DEAD_MS else "dead"

    def _alive(self, name: str) -> bool:
        return name == self.name or self._node_state(name, mono_ms()) == "alive"

    def _live_nodes(self) -> list[str]:
        """Nodes that may be given replicas: registered, and not known to be dead. A suspect node
        counts (a busy node misses a probe now and then; placement is not worth refusing over it)."""
        now = mono_ms()
        return sorted(n for n in set(self.meta.nodes) | {self.name}
                      if n == self.name or self._node_state(n, now) in ("alive", "suspect"))

    def on_create_topic(self, identity: bytes, msg: P.CreateTopic, payload: list[bytes]) -> None:
        self._require_meta_leader()
        commands = meta.plan_create_topic(self.meta, msg.name, msg.partitions, msg.replication, msg.config,
                                          self._live_nodes(), now_ms(), self.limits)
        reply = P.OkReply(msg.req_id, {"topic": msg.name, "id": commands[0]["id"]})
        self._append_meta(commands, lambda end, err: self._meta_change_done(identity, msg.req_id, reply, end, err))

    def on_delete_topic(self, identity: bytes, msg: P.DeleteTopic, payload: list[bytes]) -> None:
        self._require_meta_leader()
        commands = meta.plan_delete_topic(self.meta, msg.name)
        reply = P.OkReply(msg.req_id, {"topic": msg.name})
        self._append_meta(commands, lambda end, err: self._meta_change_done(identity, msg.req_id, reply, end, err))

    def on_reassign_partition(self, identity: bytes, msg: P.ReassignPartition, payload: list[bytes]) -> None:
        self._require_meta_leader()
        commands = meta.plan_reassign(self.meta, msg.topic, msg.partition, [str(r) for r in msg.replicas], self.limits)
        reply = P.OkReply(msg.req_id, {"topic": msg.topic, "partition": msg.partition, "replicas": list(msg.replicas)})
        self._append_meta(commands, lambda end, err: self._meta_change_done(identity, msg.req_id, reply, end, err))

    def on_drain_node(self, identity: bytes, msg: P.DrainNode, payload: list[bytes]) -> None:
        """Stop standing for election everywhere and hand every partition we lead to an in-sync
        replica (the cores do it: TimeoutNow to the most caught-up voter). The answer comes when
        we lead nothing that has another voter, or after `wait_ms` (bounded by drain_wait_ms_max)."""
        if self.pending_drain is not None:
            raise InvalidRequest(f"node {self.name} is being drained already; wait for that drain to answer")
        self.draining = True
        for tp, part in self.parts.items():
            if part.replica is not None:
                part.replica.set_draining(True)
                self.dirty.add(tp)
        wait_ms = max(0, min(msg.wait_ms, self.limits.drain_wait_ms_max))
        log.info("node %s: draining (hand leadership away within %d ms%s)", self.name, wait_ms,
                 ", then leave" if msg.leave else "")
        self.pending_drain = (msg.req_id, mono_ms() + wait_ms, identity, len(self._led_elsewhere_possible()), msg.leave)
        self._check_drain()

    def _led_elsewhere_possible(self) -> list[TopicPartition]:
        """Partitions we lead that another voter could lead instead."""
        return [tp for tp, part in self.parts.items()
                if part.replica is not None and part.replica.role == LEADER and len(part.replica.voters) > 1]

    def _check_drain(self) -> None:
        if self.pending_drain is None:
            return
        req_id, deadline, identity, led_before, leave = self.pending_drain
        still = self._led_elsewhere_possible()
        if still and mono_ms() < deadline:
            self._at(mono_ms() + DRAIN_CHECK_MS, self._check_drain)
            return
        self.pending_drain = None
        names = [f"{self.parts[tp].name}/{tp.partition}" for tp in still]
        self._send(identity, P.encode(P.OkReply(req_id, {"node": self.name, "led_before": led_before,
                                                         "led_after": len(still), "still_leading": names,
                                                         "leaving": leave})))
        if leave:
            log.info("node %s: drained (still leading %d); leaving the cluster", self.name, len(still))
            self._at(mono_ms() + LEAVE_AFTER_ANSWER_MS, self._request_leave)   # the answer goes out first

    def _request_leave(self) -> None:
        self.leave_requested = True

    def _meta_change_done(self, identity: bytes, req_id: int, reply: P.OkReply, end: int, error: ZqError | None) -> None:
        """A create or delete committed: answer once every live node has it too (bounded wait)."""
        if error is not None:
            self._send(identity, P.encode(P.error_reply(req_id, error)))
            return
        if len(self.pending_creates) >= PENDING_ADMIN_MAX:
            self._send(identity, P.encode(reply))   # committed already; only the courtesy wait is skipped
            return
        self.pending_creates.append((end, mono_ms() + self.limits.create_wait_ms_max, identity, reply))
        self._check_pending_creates()
        self._at(mono_ms() + self.limits.create_wait_ms_max, self._check_pending_creates)

    def on_register_node(self, identity: bytes, msg: P.RegisterNode, payload: list[bytes]) -> None:
        self._require_meta_leader()
        self._heard(msg.name)
        known = self.meta.nodes.get(msg.name)
        if known is not None and (known.host, known.port) == (msg.host, msg.port):
            self._send(identity, P.encode(P.OkReply(msg.req_id, {})))
            return
        command = {"op": "register_node", "name": msg.name, "host": msg.host, "port": msg.port,
                   "incarnation": msg.incarnation}
        self._append_meta([command], lambda end, err: self._send(identity, P.encode(
            P.error_reply(msg.req_id, err) if err else P.OkReply(msg.req_id, {}))))

    def _require_meta_leader(self) -> None:
        part = self.parts.get(META_TP)
        if part is None or part.replica is None or part.replica.role != LEADER:
            raise self._not_leader(self.leader_of(META_TP)[0], "the cluster metadata")

    def _append_meta(self, commands: list[dict], done: Callable[[int, ZqError | None], None]) -> None:
        """Propose commands to __meta (on its leader); `done(end, error)` runs when they commit."""
        part = self.parts[META_TP]
        blob = zbatch.encode_records([[now_ms(), None, cbor2.dumps(c), None] for c in commands])
        stored = zbatch.make_stored(0, 0, len(commands), 0, now_ms(), 0, 0, zbatch.crc(blob), blob)

        def on_outcome(outcome: Any) -> None:
            if isinstance(outcome, ZqError):
                done(0, outcome)
            elif outcome.status == COMMITTED:
                done(outcome.base_offset + len(commands), None)
            else:
                done(0, self._outcome_error(part, outcome))
        self._propose(part, len(commands), 0, 0, stored, on_outcome)

    def _apply_committed_meta(self) -> None:
        part = self.parts[META_TP]
        hw = part.high_watermark
        if self.meta.applied >= hw:
            return
        for offset, command in self._read_meta_commands(self.meta.applied, hw):
            self._apply_meta_command(offset, command)
        self.meta.skip_to(hw)
        self._send_heartbeats(again=False)   # tells the metadata leader at once that we have it

    def _apply_learned_meta(self) -> None:
        learned, self.meta_learned = self.meta_learned, []
        for offset, command in learned:
            self._apply_meta_command(offset, command)
        if learned:
            self.meta.skip_to(self.parts[META_TP].learner_end)
            self._send_heartbeats(again=False)

    def _apply_meta_command(self, offset: int, command: dict) -> None:
        self._note_created(offset, command)
        before = self.meta.topics.get(command.get("name", ""))
        self.meta.apply(offset, command)
        op = command.get("op")
        if op == "create_topic":
            self._open_topic(self.meta.topics[command["name"]])
        elif op == "delete_topic" and before is not None:
            self._close_topic(before)
        elif op == "reassign_partition":
            self._on_reassigned(command)
        elif op == "register_node" and command["name"] != self.name:
            n = self.meta.nodes[command["name"]]
            if self.addresses.get(n.name) != n.address:
                self.addresses[n.name] = n.address
                self._forget_peer(n.name)

    def _on_reassigned(self, command: dict) -> None:
        """A partition has a new target replica set: tell our replica (its leader carries the move
        out in the partition's log), or open a learner replica here if we are new to it."""
        t = self.meta.topics_by_id.get(command["id"])
        p = command["partition"]
        if t is None or not 0 <= p < len(t.partitions):
            return
        tp = TopicPartition(t.id, p)
        target = t.partitions[p]
        log.info("%s/%d: reassigned to %s", t.name, p, ", ".join(target))
        part = self.parts.get(tp)
        if part is not None and part.replica is not None:
            part.replica.set_target(list(target))
            for peer in target:
                if peer != self.name:
                    self._connect_sub(peer)
            self.dirty.add(tp)
        elif self.name in target:
            self._open_topic_part(t, p)

    def _remove_part(self, part: _Part) -> None:
        """The partition's committed configuration no longer names this node, and neither does
        its target: the replica and its data go (a later reassignment back starts it empty)."""
        tp = part.tp
        log.info("%s/%d: this node is no longer a replica; deleting its copy", part.name, tp.partition)
        self.counters["replicas_removed"] += 1
        self._begin().put_meta(R.removed_key(tp), str(max(part.replica.epoch, part.replica.join_epoch)).encode())
        self._drop_part(part, self._not_leader(self.leader_of(tp)[0], f"{part.name}/{tp.partition}"))

    def _close_topic(self, t: meta.TopicMeta) -> None:
        for p in range(len(t.partitions)):
            tp = TopicPartition(t.id, p)
            self._begin().delete_meta(R.removed_key(tp))
            part = self.parts.get(tp)
            if part is not None:
                self._drop_part(part, UnknownTopic(f"topic {t.name!r} was deleted"))

    def _drop_part(self, part: _Part, error: ZqError) -> None:
        """Our replica of a partition goes, with its data; whoever waits on it is told `error`."""
        tp = part.tp
        self.replica_set.forget(tp)
        self._begin().drop_partition(tp)
        self._begin().delete_meta(R.hard_state_key(tp))
        self.sub.setsockopt(zmq.UNSUBSCRIBE, R.tp_bytes(tp))
        self._fail_waiters(part, error)
        self._refuse_parked(tp, error)

    def _check_pending_creates(self) -> None:
        """Answer a create or delete once every live node has fetched or replicated past it, or its wait ran out."""
        if not self.pending_creates:
            return
        now = mono_ms()
        positions = [self.meta.applied] + [pos for name, pos in self.meta_applied_by.items() if self._alive(name)]
        keep = []
        for end, deadline, identity, reply in self.pending_creates:
            if all(pos >= end for pos in positions) or now >= deadline:
                self._send(identity, P.encode(reply))
            else:
                keep.append((end, deadline, identity, reply))
        self.pending_creates = keep
        if keep:
            self._at(now + 20, self._check_pending_creates)

    # ------------------------------------------------------------------ handlers: status and liveness

    def on_node_heartbeat(self, identity: bytes, msg: P.NodeHeartbeat, payload: list[bytes]) -> None:
        if msg.sender == self.name:
            return
        self._heard(msg.sender)
        self.meta_applied_by[msg.sender] = msg.meta_applied
        if self.pending_creates:
            self._check_pending_creates()
        if self.addresses.get(msg.sender) != msg.address:
            self.addresses[msg.sender] = msg.address
            self._forget_peer(msg.sender)
        for item in msg.leaders:
            if isinstance(item, list) and len(item) == 3 and all(type(x) is int for x in item):
                tp = TopicPartition(item[0], item[1])
                known = self.leader_view.get(tp)
                if known is None or item[2] >= known[1]:
                    self.leader_view[tp] = (msg.sender, item[2])

    def _send_heartbeats(self, again: bool = True) -> None:
        if self.stopping:
            return
        if self.lazy_hard_states and again:
            self._begin()   # the pass's write carries the waiting high-watermark hints
        leaders = [[tp.topic_id, tp.partition, part.replica.epoch] for tp, part in sorted(self.parts.items())
                   if part.replica is not None and part.replica.role == LEADER]
        beat = P.NodeHeartbeat(0, self.name, self.config.address, self.incarnation, leaders, self.meta.applied)
        for name in sorted(self.addresses):
            peer = self._peer(name)
            if peer is not None:
                self._peer_send(peer, beat)
        if not again:
            return
        self._at(mono_ms() + NODE_HEARTBEAT_MS, self._send_heartbeats)

    def on_status(self, identity: bytes, msg: P.StatusRequest, payload: list[bytes]) -> None:
        """Gather every reachable node's local view (bounded wait), then answer with the whole picture."""
        views: dict[str, list] = {self.name: self._local_partitions_view()}
        others = [n for n in sorted(set(self.meta.nodes) | set(self.addresses)) if n != self.name]
        state = {"left": len(others), "done": False}

        def finish() -> None:
            if not state["done"]:
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
        """The partitions this node leads, with what only their leader knows."""
        out = []
        now = mono_ms()
        for tp, part in sorted(self.parts.items()):
            r = part.replica
            if r is None or r.role != LEADER:
                continue
            progress = r.replica_progress()
            # In sync (as Kafka's ISR): heard lately, and holding everything but what is younger than
            # IN_SYNC_LAG_MS; an exact "holds the high watermark" flickers under a steady load.
            in_sync = sorted(name for name, (end, heard_ms) in progress.items()
                             if name == self.name or (name in r.voters and now - heard_ms <= NODE_ALIVE_MS and (
                                 end >= r.high_watermark or self._missing_for_ms(tp, end) <= IN_SYNC_LAG_MS)))
            slowest = min((end for end, _ in progress.values()), default=r.log_end)
            out.append({"topic": part.name, "partition": tp.partition, "leader": self.name, "epoch": r.epoch,
                        "replicas": list(r.voters), "learners": list(r.learners), "in_sync": in_sync,
                        "log_start": part.log_start,
                        "log_end": r.log_end, "high_watermark": r.high_watermark,
                        "replication_lag": r.log_end - slowest,
                        "replication_lag_ms": self._lag_ms(tp, slowest, r.log_end)})
        return out

    def _missing_for_ms(self, tp: TopicPartition, end: int) -> int:
        """How long ago the first produced batch from `end` on was appended: how long a replica
        that holds the log up to `end` has lacked data. Control batches (markers, configurations,
        append time 0) do not count; nothing after `end` on this disk yet is 0."""
        try:
            for value in self.store.read(tp, end, IN_SYNC_READ_BYTES):
                append_ms = zbatch.unpack_header(value).append_time_ms
                if append_ms:
                    return max(0, now_ms() - append_ms)
        except ZqError:
            pass
        return 0

    def _lag_ms(self, tp: TopicPartition, slowest_end: int, log_end: int) -> int:
        """How old the oldest batch is that some replica does not hold yet (0 when all hold all)."""
        if slowest_end >= log_end:
            return 0
        try:
            values = self.store.read(tp, slowest_end, 1)
            if values:
                append_ms = zbatch.unpack_header(values[0]).append_time_ms
                return max(0, now_ms() - append_ms) if append_ms else 0
        except ZqError:
            pass
        return 0   # not yet on this node's disk either: younger than a loop pass

    def _status_doc(self, views: dict[str, list]) -> dict:
        seen: dict[tuple[str, int], dict] = {}
        for rows in views.values():
            for row in rows:
                key = (row["topic"], row["partition"])
                if key not in seen or row["epoch"] > seen[key]["epoch"]:
                    seen[key] = row
        partitions = [seen.get((META_TOPIC, 0)) or self._unknown_row(META_TOPIC, 0, list(self.voters))]
        for t in sorted(self.meta.topics.values(), key=lambda t: t.name):
            for p, replicas in enumerate(t.partitions):
                partitions.append(seen.get((t.name, p)) or self._unknown_row(t.name, p, replicas))
        for row in partitions:
            row["under_replicated"] = len(row["in_sync"]) < len(row["replicas"])
            t = self.meta.topics.get(row["topic"])
            target = t.partitions[row["partition"]] if t is not None else row["replicas"]
            row["target"] = list(target)
            row["moving"] = sorted(target) != sorted(row["replicas"])
            row.setdefault("learners", [])
        nodes = []
        for n in self._nodes_view():
            answered = n["name"] in views
            nodes.append({"name": n["name"], "address": f"{n['host']}:{n['port']}",
                          "state": "alive" if answered and n["state"] != "joining" else n["state"],
                          "last_seen_ms": 0 if answered else n["last_seen_ms"]})
        return {"cluster": self.config.cluster, "node": self.name, "metadata_leader": self.leader_of(META_TP)[0],
                "nodes": nodes, "partitions": partitions}

    @staticmethod
    def _unknown_row(topic: str, partition: int, replicas: list[str]) -> dict:
        """A partition whose leader did not answer: no leader, nothing known of its log."""
        return {"topic": topic, "partition": partition, "leader": None, "epoch": None, "replicas": replicas,
                "learners": [], "in_sync": [], "log_start": None, "log_end": None, "high_watermark": None, "replication_lag": None,
                "replication_lag_ms": None}

    # ------------------------------------------------------------------ the surface services use
    #
    # A service (consumer groups, membership, ...) is an object with `handlers` (message type ->
    # fn(identity, msg, payload)), `tick(now_ms)` (every loop pass: keep it cheap), `close()`, and
    # optionally `on_high_watermark(topic, partition, high_watermark)` (data became visible). It talks to the rest of the node only through the methods below, so that the
    # loop's rules (persist, then send; bounded everything) hold for it too.

    def add_service(self, service: Any) -> None:
        for kind in service.handlers:
            if kind in self.HANDLERS or kind in self.service_handlers:
                raise ValueError(f"{type(service).__name__} wants {kind.__name__}, which is served already")
        self.services.append(service)
        self.service_handlers.update(service.handlers)

    def reply(self, identity: bytes, msg: Any, *frames: bytes) -> None:
        """Answer a client or peer on the ROUTER (never blocks; a vanished peer is counted)."""
        self._send(identity, P.encode(msg, *frames))

    def reply_error(self, identity: bytes, req_id: int, error: ZqError) -> None:
        self._send(identity, P.encode(P.error_reply(req_id, error)))

    def send_to_peer(self, name: str, msg: Any, *frames: bytes) -> bool:
        """A one-way message to another node's ROUTER; False if its address is unknown."""
        peer = self._peer(name)
        if peer is None:
            return False
        self._peer_send(peer, msg, list(frames))
        return True

    def send_to_address(self, name: str | None, address: str, msg: Any, *frames: bytes) -> None:
        """A one-way message to a node known only by address so far (a seed, a discovered peer)."""
        peer = self._peer(name or f"seed:{address}", address)
        self._peer_send(peer, msg, list(frames))

    def learn_address(self, name: str, address: str) -> None:
        """Discovery or gossip says where `name` listens (advisory: it never decides who holds data)."""
        if name != self.name and self.addresses.get(name) != address:
            self.addresses[name] = address
            self._forget_peer(name)
            if not self.voters:
                self._ask(address)   # it may know the cluster's voters

    def set_member_view(self, view: Callable[[str, int], tuple[str, int | None] | None]) -> None:
        """A failure detector's answer to "what state is node N in, and how long since it was heard
        from?" (`view(name, now_ms)` -> (state, last_seen_ago_ms), or None if it does not know N).
        Without one, the node judges by when it last heard from each peer."""
        self.member_view = view

    def request_peer(self, name: str, msg: Any, on_reply: Callable[[Any, list], None],
                     timeout_ms: int = PEER_REQUEST_TIMEOUT_MS, frames: tuple | list = ()) -> None:
        """A request to another node; `on_reply(reply_or_ZqError, payload)` runs exactly once."""
        self._request(name, msg, on_reply, timeout_ms, frames=frames)

    def next_req_id(self) -> int:
        return next(self._req_ids)

    def write(self):
        """The write transaction of this pass (zq.io.store.WriteTxn): committed, with everything
        else the pass wrote, before the pass's replies and messages go out."""
        return self._begin()

    def write_synced(self) -> None:
        """Ask for this pass's write to be fsynced."""
        self.replica_set.sync_needed = True

    def at(self, when_ms: int, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop at monotonic time `when_ms` (or soon after)."""
        self._at(when_ms, fn)

    def now_ms(self) -> int:
        return mono_ms()

    def wall_ms(self) -> int:
        return now_ms()

    def alive(self, name: str) -> bool:
        return self._alive(name)

    def known_nodes(self) -> list[str]:
        return sorted(set(self.meta.nodes) | set(self.addresses) | {self.name})

    def leader_address(self, topic: str, partition: int) -> tuple[str | None, str | None]:
        """(name, "host:port") of the node this one believes leads a partition; Nones if unknown."""
        tp, _ = self._topic_partition(topic, partition)
        leader = self.leader_of(tp)[0]
        if leader is None:
            return None, None
        return leader, self.config.address if leader == self.name else self.addresses.get(leader)

    def leads(self, topic: str, partition: int) -> bool:
        try:
            self._local_leader(topic, partition)
            return True
        except ZqError:
            return False

    def partition_bounds(self, topic: str, partition: int) -> tuple[int, int]:
        """(log_start, high_watermark) of a partition this node leads; raises NotLeader otherwise."""
        _, part = self._local_leader(topic, partition)
        return part.log_start, part.high_watermark

    def produce_local(self, topic: str, partition: int, records: list[list], done: Callable[[Any], None],
                      acks_quorum: bool = True) -> None:
        """Append records (`[create_time_ms, key, value, headers]`) to a partition this node leads,
        as a producer would; `done(outcome_or_ZqError)` runs when the batch commits (or fails).
        Raises NotLeader if another node leads it: send the records there instead."""
        _, part = self._local_leader(topic, partition)
        try:
            blob = zbatch.encode_records(records)
            zbatch.check_incoming(blob, zbatch.crc(blob), len(records), self.limits.batch_bytes_max,
                                  self.limits.batch_records_max)
        except (ZqError, cbor2.CBORError, TypeError, ValueError) as e:   # a service's records are checked as a producer's are
            self.counters["produce_batches_refused"] += 1
            done(e if isinstance(e, ZqError) else InvalidRequest(f"records for {topic}/{partition} cannot be encoded: {e}"))
            return
        try:
            stamp = self._append_time(part)
        except LeaderNotAvailable as e:
            done(e)   # a leader of a moment ago, still hearing its replicas' clocks: the caller retries
            return
        stored = zbatch.make_stored(zbatch.FLAG_VERIFIED, 0, len(records), 0, stamp, 0, 0, zbatch.crc(blob), blob)
        self._propose(part, len(records), 0, 0, stored, done, leader_ack=not acks_quorum)

    def read_committed(self, topic: str, partition: int, offset: int, max_bytes: int) -> list[bytes]:
        """Stored batches of a partition this node leads, from `offset`, below the high watermark."""
        tp, part = self._local_leader(topic, partition)
        return self.store.read(tp, offset, max_bytes, upto=part.high_watermark)

    HANDLERS: dict[type, Callable] = {
        P.Produce: on_produce,
        P.Fetch: on_fetch,
        P.ListOffsets: on_list_offsets,
        P.MetadataRequest: on_metadata,
        P.CreateTopic: on_create_topic,
        P.DeleteTopic: on_delete_topic,
        P.ReassignPartition: on_reassign_partition,
        P.DrainNode: on_drain_node,
        P.RegisterNode: on_register_node,
        P.StatusRequest: on_status,
        P.LocalStatusRequest: on_local_status,
        P.Replicate: on_replicate,
        P.NodeHeartbeat: on_node_heartbeat,
    }

    # ------------------------------------------------------------------ peers

    def _peer(self, name: str, address: str | None = None) -> _Peer | None:
        peer = self.peers.get(name)
        if peer is None:
            address = address or self.addresses.get(name)
            if address is None:
                return None
            peer = self.peers[name] = _Peer(self.ctx, name, address, self.keys)
        return peer

    def _forget_peer(self, name: str) -> None:
        """Its address changed: the next message opens a new connection; SUB reconnects too."""
        peer = self.peers.get(name)
        if peer is not None and peer.address != self.addresses.get(name):
            try:
                peer.sock.disconnect(f"tcp://{peer.address}")
            except zmq.ZMQError:
                pass   # never connected there
            peer.address = self.addresses[name]
            peer.sock.connect(f"tcp://{peer.address}")
        if any(name in (p.replica.replicas if p.replica else ()) for p in self.parts.values()):
            self._connect_sub(name)

    def _request(self, name: str, msg: Any, on_reply: Callable[[Any, list], None],
                 timeout_ms: int = PEER_REQUEST_TIMEOUT_MS, address: str | None = None, frames: tuple | list = ()) -> None:
        """Send `msg` to a peer; `on_reply(reply_or_error, payload)` runs once, with a ZqError on timeout."""
        peer = self._peer(name, address)
        if peer is None or len(peer.pending) >= PEER_PENDING_MAX:
            on_reply(LeaderNotAvailable(f"node {name} is not reachable"), [])
            return
        req_id = msg.req_id
        peer.pending[req_id] = (mono_ms() + timeout_ms, on_reply)
        self._peer_send(peer, msg, list(frames))
        self._at(mono_ms() + timeout_ms, lambda: self._request_timed_out(peer, req_id))

    def _request_timed_out(self, peer: _Peer, req_id: int) -> None:
        entry = peer.pending.pop(req_id, None)
        if entry is not None:
            entry[1](LeaderNotAvailable(f"node {peer.name} did not answer in time"), [])

    def _on_peer_frames(self, peer: _Peer, frames: list[bytes]) -> None:
        try:
            msg, payload = P.decode(frames, self.limits)
        except ZqError:
            self.counters["protocol_errors"] += 1
            return
        peer.last_seen_ms = mono_ms()
        if not peer.name.startswith("seed:"):
            self._heard(peer.name)
        entry = peer.pending.pop(getattr(msg, "req_id", -1), None)
        if entry is not None:
            reply = from_wire(msg.code, msg.message, msg.data) if isinstance(msg, P.ErrorReply) else msg
            entry[1](reply, payload)

    # ------------------------------------------------------------------ learning __meta (non-voters)

    def _start_background(self) -> None:
        self._at(mono_ms(), self._send_heartbeats)
        self._at(mono_ms(), self._check_disk)
        self._at(mono_ms(), self._refresh_metrics)
        self._at(mono_ms() + FETCH_PENDING_SWEEP_MS, self._sweep_fetch_pending)
        self._at(mono_ms() + self.config.retention_interval_ms, self._retention)
        if self.config.seeds:
            self._ask_seeds()
        if not self.voters:
            self._at(mono_ms() + FOUND_WAIT_MS, self._maybe_found_cluster)
        if self.name in self.voters:
            self._at(mono_ms(), self._register_self)
        else:
            self._at(mono_ms(), self._follow_meta)

    def _maybe_found_cluster(self) -> None:
        """No cluster answered: the lowest-named node among those waiting founds one; the others
        keep asking, and learn it from the founder (the decision: zq.node.founding)."""
        decision = decide_founding(self.name, self.voters, [n for n in self.addresses if self._alive(n)],
                                   self.stopping)
        if decision.found:
            log.info("no cluster %r found: founding it, with this node holding its metadata", self.config.cluster)
            self.voters = (self.name,)
            del self.parts[META_TP]
            self._open_part(META_TP, META_TOPIC, [self.name], sync=True)
            self._register_self()
            return
        for name in decision.ask:
            self._ask(self.addresses[name])
        if decision.retry_ms:
            self._at(mono_ms() + decision.retry_ms, self._maybe_found_cluster)

    def _ask(self, address: str) -> None:
        if address != self.config.address:
            self._request(f"seed:{address}", P.MetadataRequest(next(self._req_ids), []), self._on_seed_metadata,
                          address=address)

    def _ask_seeds(self) -> None:
        """Each seed answers with its own name and address (and what it knows of the cluster)."""
        for address in self.config.seeds:
            self._ask(address)

    def _on_seed_metadata(self, reply: Any, payload: list) -> None:
        if not isinstance(reply, P.MetadataReply):
            return
        if reply.cluster != self.config.cluster:
            log.warning("a seed belongs to cluster %r, not %r: ignored", reply.cluster, self.config.cluster)
            return
        for n in reply.nodes:
            if n["name"] != self.name and n["name"] not in self.addresses and n.get("host") not in (None, "?"):
                self.addresses[n["name"]] = f"{n['host']}:{n['port']}"
                self._forget_peer(n["name"])
        if not self.voters:
            for t in reply.topics:
                if t["name"] == META_TOPIC and t["partitions"][0]["replicas"]:
                    self.voters = tuple(t["partitions"][0]["replicas"])
                    log.info("metadata voters are %s (learnt from a seed)", ", ".join(self.voters))

    def _register_self(self) -> None:
        """Voters and learners alike make sure `__meta` holds their address."""
        if self.stopping:
            return
        known = self.meta.nodes.get(self.name)
        if known is not None and (known.host, known.port) == (self.config.host, self.config.port):
            self._registered = True
            return
        part = self.parts.get(META_TP)
        if part is not None and part.replica is not None and part.replica.role == LEADER:
            command = {"op": "register_node", "name": self.name, "host": self.config.host,
                       "port": self.config.port, "incarnation": self.incarnation}
            self._append_meta([command], lambda end, err: None)
            self._at(mono_ms() + META_RETRY_MS * 5, self._register_self)
            return
        leader = self.leader_of(META_TP)[0]
        if leader is None or leader == self.name or self._peer(leader) is None:
            self._at(mono_ms() + META_RETRY_MS, self._register_self)
            return
        self._request(leader, P.RegisterNode(next(self._req_ids), self.name, self.config.host, self.config.port,
                                             self.incarnation), self._on_registered)

    def _on_registered(self, reply: Any, payload: list) -> None:
        if isinstance(reply, P.OkReply):
            self._registered = True
            return
        if isinstance(reply, NotLeader) and reply.data.get("leader"):
            self.leader_view[META_TP] = (reply.data["leader"], self.leader_view.get(META_TP, ("", 0))[1])
            if reply.data.get("address"):
                self.addresses.setdefault(reply.data["leader"], reply.data["address"])
        self._at(mono_ms() + META_RETRY_MS, self._register_self)

    def _follow_meta(self) -> None:
        """A learner's loop: register, then long-poll fetch __meta from its leader, forever."""
        if self.stopping or self.name in self.voters:
            return
        if not self.voters:
            self._at(mono_ms() + META_RETRY_MS, self._follow_meta)   # still waiting for a seed to answer
            return
        if not self._registered:
            self._register_self()
            self._at(mono_ms() + META_RETRY_MS, self._follow_meta)
            return
        leader = self.leader_of(META_TP)[0]
        if leader is None or self._peer(leader) is None:
            self._at(mono_ms() + META_RETRY_MS, self._follow_meta)
            return
        part = self.parts[META_TP]
        self._request(leader, P.Fetch(next(self._req_ids), META_TOPIC, 0, part.learner_end, 4 * 1024 * 1024,
                                      META_FETCH_WAIT_MS, self.name),
                      self._on_meta_fetched, timeout_ms=META_FETCH_WAIT_MS + PEER_REQUEST_TIMEOUT_MS)

    def _on_meta_fetched(self, reply: Any, payload: list) -> None:
        if not isinstance(reply, P.FetchReply):
            if isinstance(reply, NotLeader) and reply.data.get("leader"):
                self.leader_view[META_TP] = (reply.data["leader"], self.leader_view.get(META_TP, ("", 0))[1])
            elif isinstance(reply, ZqError):
                log.debug("fetching %s failed: %s", META_TOPIC, reply.message)
            self._at(mono_ms() + META_RETRY_MS, self._follow_meta)
            return
        part = self.parts[META_TP]
        if self.born is None:
            # A learner with a new or damaged store: every command it could have acted on before
            # was committed, so lies below the leader's log end (Raft's leader completeness).
            self._note_born(reply.log_end)
        for value in payload:
            try:
                h = zbatch.verify_stored(value)
            except ZqError as e:
                log.warning("a %s batch failed its checksum (%s); fetching it again", META_TOPIC, e.message)
                break
            if h.base_offset != part.learner_end:
                continue   # already held, or a gap: the next fetch starts from our log end
            self._begin().append(META_TP, value, h)
            self.replica_set.sync_needed = True
            part.learner_end = h.next_offset
            for rec in zbatch.iter_records(value, h.base_offset, verify=False):
                self.meta_learned.append((rec.offset, cbor2.loads(rec.value)))
        # The next fetch goes out after this pass's write, so the leader counts only what we hold.
        self._at(mono_ms(), self._follow_meta)

    # ------------------------------------------------------------------ timers and housekeeping

    def _at(self, when_ms: int, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (when_ms, next(self._timer_seq), fn))

    def _run_timers(self) -> None:
        now = mono_ms()
        ran = 0
        while self.timers and self.timers[0][0] <= now and ran < self.limits.inbox_drain_max:
            _, _, fn = heapq.heappop(self.timers)
            try:
                fn()
            except Exception:
                # Our bug: log it loudly and keep serving; one broken timer must not stop the node.
                self.counters["internal_errors"] += 1
                self.limited_log.log(logging.ERROR, "timer_failed", "a timer of the node failed", exc_info=True)
            ran += 1
        if ran:
            self._finish_pass()

    def _retention(self) -> None:
        """A leader decides what retention deletes, by its replica set's median clock; a follower
        deletes only below its leader's log start, once it holds that much committed (see
        zq/core/replication.py, "Who moves the log start")."""
        for tp, part in list(self.parts.items()):
            t = self.meta.topics_by_id.get(tp.topic_id)
            if t is None or part.replica is None:
                continue
            r_ms, r_bytes = t.config.get("retention_ms"), t.config.get("retention_bytes")
            if r_ms is None and r_bytes is None:
                continue
            replica = part.replica
            if replica.role == LEADER:
                wall = replica.cluster_wall_ms()
                if wall is None:
                    continue   # its replicas' clocks are not known yet: the next round decides
                self._note_skew(part, wall)
                new_start = self.store.retention_candidates(tp, now_ms=wall, retention_ms=r_ms, retention_bytes=r_bytes)
            else:
                new_start = replica.leader_log_start if replica.leader_log_start <= part.high_watermark else None
            if new_start is not None and new_start > part.log_start:
                # Only committed data goes, so no leader change can need it back.
                new_start = min(new_start, part.high_watermark)
                if new_start > part.log_start:
                    self._begin().delete_below(tp, new_start)
                    part.log_start = new_start
                    self.counters["retention_deletes"] += 1
                    if part.replica is not None:
                        # A follower asking for what is gone is told to start here (StartAt).
                        part.replica.on_log_start(new_start)
                        self.dirty.add(tp)
        self._at(mono_ms() + self.config.retention_interval_ms, self._retention)

    def _note_skew(self, part: _Part, cluster_wall: int) -> None:
        own = now_ms()
        if abs(own - cluster_wall) > CLOCK_SKEW_WARN_MS:
            self.counters["clock_skewed"] += 1
            self.limited_log.log(logging.WARNING, "clock_skew", "the clock of %s is %+d ms off the median of its "
                                 "replica sets' clocks (e.g. %s/%d); it uses theirs, and its own clock needs fixing",
                                 self.name, own - cluster_wall, part.name, part.tp.partition)

    def _refresh_metrics(self) -> None:
        if self.authenticator is not None:
            # The ZAP handler's thread counts CurveZMQ handshakes; the node's counters show them.
            auth = dict(self.authenticator.counters)
            self.counters["curve_allowed"] = auth["allowed"]
            self.counters["curve_refused"] = auth["refused"]
        if self.config.metrics:
            self.metrics_rows = self._local_partitions_view()
            group_rows = []
            for service in self.services:
                rows = getattr(service, "metrics_rows", None)
                if rows is not None:
                    try:
                        group_rows += rows()
                    except ZqError:
                        pass   # a partition changed hands mid-way: the next refresh has it
            self.group_metrics_rows = group_rows
            self._at(mono_ms() + METRICS_REFRESH_MS, self._refresh_metrics)

    def _check_disk(self) -> None:
        try:
            full = self.store.disk_free_bytes() < self.config.disk_free_bytes_min
        except OSError:
            full = False
        if full != self.disk_full:
            log.warning("disk %s: produce %s%s", "nearly full" if full else "has room again",
                        "refused" if full else "accepted again",
                        "; leadership goes to replicas with room" if full else "")
        self.disk_full = full
        for tp, part in self.parts.items():
            # Followers say so in their acks; a leader hands off to a voter with room (the core).
            if part.replica is not None and part.replica.disk_low != full:
                part.replica.set_disk_low(full)
                self.dirty.add(tp)
        self._at(mono_ms() + DISK_CHECK_INTERVAL_MS, self._check_disk)

    def close(self) -> None:
        self.stopping = True
        for service in self.services:
            try:
                service.close()     # may write its last state into the pass's transaction
            except Exception:
                log.exception("service %s failed to close", type(service).__name__)
        if self.lazy_hard_states or self.replica_set.txn is not None:
            self._begin()
            self._commit()
        for peer in self.peers.values():
            peer.close()
        self.router.close(0)
        self.pub.close(0)
        self.sub.close(0)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        if self.authenticator is not None:
            self.authenticator.close()
        self.store.close()
        log.info("node %s stopped", self.name)


def _user_id(frame: zmq.Frame) -> str | None:
    """The user id ZAP gave the connection a frame came on (zq.io.security), None if it has none."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


def run_node(config: NodeConfig, stop: threading.Event | None = None) -> None:
    """Run the node in the foreground until `stop` is set or SIGTERM/SIGINT arrives."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    node = Node(config)
    node.run(stop)
