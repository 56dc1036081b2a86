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

Rooms. `Node` holds the node's state and its start-up (this module) and the surface services use;
each other job is a room of its own, mixed into `Node`: the loop and timers (node_loop), peers and
heartbeats (node_peers), the node's side of the persist-then-send pass (node_replication; the pass
itself is zq.node.replicas, which the simulator runs too), produce/fetch and parked fetches
(node_clients, a shell around zq.node.clients, which the simulator runs too), `__meta` with
founding and registration (node_meta, the shell of the follower in zq.node.meta, which the
simulator zq/sim/meta.py runs too; the founding decision is zq.node.founding), drain and leave
(node_drain; its decisions in zq.node.drain), status and metrics (node_status; the views in
zq.node.status); shared constants and clocks in node_common.

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
import itertools
import logging
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
from zq.core.repl_types import HardState, ReplicationConfig
from zq.core.replication import Replica
from zq.errors import CorruptData, InvalidRequest, LeaderNotAvailable, ZqError
from zq.io import replicas as R
from zq.io import security
from zq.io.store import Store, set_aside
from zq.node.drain import PendingDrain
from zq.node.meta import MetaFollower, PendingChanges
from zq.node.replicas import Part as _Part, ReplicaSet, starting_configuration
from zq.node.services import Service
from zq.limits import DEFAULT, Limits
from zq.types import META_TOPIC, META_TP, TopicPartition
from zq.io.node_common import (  # noqa: F401 (re-exported: tests and tools import them from here)
                               BORN_META, DISK_CHECK_INTERVAL_MS, DISK_FREE_BYTES_MIN, LOG_REPEAT_MS,
                               PEER_REQUEST_TIMEOUT_MS, PREFERRED_LEADER_DELAY_MS, PREFERRED_STAND_TRIES_MAX,
                               PUB_SNDHWM, RETENTION_INTERVAL_MS, TEST_CLOCK_OFFSET_ENV, _LimitedLog, log,
                               mono_ms, now_ms)
from zq.io.node_replication import ReplicationMixin, _NodeReplicaEvents, _StoreStorage
from zq.io.node_clients import ClientsMixin
from zq.io.node_meta import MetaMixin
from zq.io.node_peers import PeersMixin, _Peer
from zq.io.node_drain import DrainMixin
from zq.io.node_status import StatusMixin
from zq.io.node_loop import LoopMixin

# Replication timing for real nodes: a Python process under load (GC, fsync, 2 cores) stalls for
# tens of milliseconds at times, so elections wait a second, not Raft's usual 150-300 ms.
# consumer groups (leases, acks, retries, dead letters) and membership (SWIM failure detection, zeroconf)
DEFAULT_SERVICES = ("zq.io.groups", "zq.io.membership")
NODE_REPLICATION = ReplicationConfig(election_timeout_ms=1_000, heartbeat_interval_ms=100, fetch_retry_ms=250)


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


class Node(LoopMixin, PeersMixin, ReplicationMixin, ClientsMixin, MetaMixin, DrainMixin, StatusMixin):
    """One zq node: its state and start-up here; each job in a room of its own (the mixins, zq/io/node_*.py)."""

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
        # Produce, fetch (parked fetches too) and list-offsets (zq.node.clients), shared with the simulator.
        self.clients = self._make_clients()
        self.storage_error: ZqError | None = None               # why the last failed write failed
        self.continued = 0   # SIGCONTs received: a pass during which the process was stopped is not a stall
        self.meta_applied_by: dict[str, int] = {}               # node -> __meta applied offset (heartbeats)
        self.pending_creates = PendingChanges()                # create/delete answers awaiting every live node
        self.disk_full = False
        self.limited_log = _LimitedLog()
        self._wall_minus_mono: int | None = None                # to notice the wall clock jumping
        self.outbox: dict[str, list] = defaultdict(list)        # peer -> Replicate items of this pass
        self.pub_out: list[tuple[TopicPartition, list]] = []
        self.stopping = False
        self.draining = False                                   # `zq node drain`: never stand, hand leadership away
        self.pending_drain: PendingDrain | None = None          # the drain being carried out (zq.node.drain)
        self.leave_requested = False                            # set by a drain with leave: the loop ends
        # The __meta follower (zq.node.meta): registration, fetching, applying; bound to the
        # metadata and the copy of __meta that _load_parts makes.
        self.meta_follower = MetaFollower(self.name, (config.host, config.port), self.incarnation, self.meta,
                                          _Part(META_TP, META_TOPIC, None, True))
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
        self.services: list[Service] = []                       # see add_service
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
        self.meta_follower.meta, self.meta_follower.log = self.meta, self.parts[META_TP]
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
        """The configuration our replica of `t`/`p` starts from before its log says more
        (zq.node.replicas.starting_configuration, which the simulator runs too)."""
        tp = TopicPartition(t.id, p)
        reassigned = p in t.reassigned
        return starting_configuration(
            self.name, t.initial[p] if p < len(t.initial) else t.partitions[p], reassigned=reassigned,
            has_hard_state=reassigned and R.load_hard_state(self.store, tp) is not None,
            removed_here=reassigned and self.store.get_meta(R.removed_key(tp)) is not None)

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
        founder = self._founder(tp, replicas)
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
                          log_start=st.log_start if st else None, founded_by=founder)
        replica.set_target(list(target if target is not None else replicas))
        if self.draining:
            replica.set_draining(True)
        if replica.founded:
            # The create_topic command named its leader (the core's "Founding"): it leads epoch 1
            # once this pass has written that durably, and its followers take its Appends at once.
            log.debug("%s/%d: %s in epoch 1 from its creation", name, tp.partition,
                      "leads" if founder == self.name else f"follows {founder}")
            replica.tick(now, self._wall_clock())   # a follower tells its leader its clock at once
        elif replica.voters == (self.name,):
            replica.tick(replica.next_timer_ms())   # alone in its set: lead at once
        elif never_voted and replicas and replicas[0] == self.name:
            # A partition created without a leader (by an older version) or whose replica here was
            # lost: its preferred leader stands soon rather than after a whole election timeout;
            # "soon" leaves the other replicas time to apply the same create_topic command, or
            # they would drop its vote request for a partition they do not know yet.
            self._at(mono_ms() + PREFERRED_LEADER_DELAY_MS, lambda: self._stand(tp))
        self.parts[tp] = _Part(tp, name, replica, sync, st.log_start if st else 0)
        self.dirty.add(tp)
        for peer in sorted({*replicas, *(target or ())}):
            if peer != self.name:
                self._connect_sub(peer)
        self.sub.setsockopt(zmq.SUBSCRIBE, R.tp_bytes(tp))

    def _founder(self, tp: TopicPartition, replicas: list[str]) -> str | None:
        """The leader the create_topic command named for our replica's partition, if it named
        one and `replicas` is the set it created (a replica made by a reassignment has none);
        the core takes it only if this replica never held the partition (see _replica_lost)."""
        t = self.meta.topics_by_id.get(tp.topic_id)
        if tp == META_TP or t is None or not t.founded or self.name not in replicas:
            return None
        return replicas[0]

    def _stand(self, tp: TopicPartition, tries: int = PREFERRED_STAND_TRIES_MAX) -> None:
        part = self.parts.get(tp)
        if part is not None and part.replica is not None and part.replica.recovering and tries > 0:
            # A new store polls before it may stand (a founding cluster's __meta): stand once that is done.
            self._at(mono_ms() + PREFERRED_LEADER_DELAY_MS, lambda: self._stand(tp, tries - 1))
            return
        if part is not None and part.replica is not None and part.replica.epoch == 0 and part.replica.leader is None:
            part.replica.tick(max(mono_ms(), part.replica.next_timer_ms()))
            self.dirty.add(tp)

    # ------------------------------------------------------------------ the surface services use
    #
    # A service (consumer groups, membership, ...) is an object with `handlers` (message type ->
    # fn(identity, msg, payload)), `tick(now_ms)` (every loop pass: keep it cheap), `close()`, and
    # optionally `on_high_watermark(topic, partition, high_watermark)` (data became visible). It talks to the rest of the node only through the methods below, so that the
    # loop's rules (persist, then send; bounded everything) hold for it too.

    def add_service(self, service: Service) -> None:
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

    def note_continued(self) -> None:
        """SIGCONT (signal handler, main thread): the process was stopped and now runs again."""
        self.continued += 1

    def random_bits(self, bits: int) -> int:
        """Randomness for a service (the simulator's host draws it from its seed)."""
        return random.SystemRandom().getrandbits(bits)

    def get_meta(self, name: bytes) -> bytes | None:
        return self.store.get_meta(name)

    def scan_meta(self, prefix: bytes) -> Any:
        """(key, value) of the meta keys starting with `prefix`: at start-up only, not for the loop."""
        for key, value in self.store.scan(b"M" + prefix):
            yield key[1:], value

    def offset_for_time(self, tp: TopicPartition, time_ms: int) -> int | None:
        return self.store.offset_for_time(tp, time_ms)

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
                      acks_quorum: bool = True, producer_id: int = 0, base_sequence: int = 0) -> None:
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
        # producer_id 0: not idempotent; else deduplicated as a producer's batch is (a retry is a duplicate)
        stored = zbatch.make_stored(zbatch.FLAG_VERIFIED, 0, len(records), 0, stamp, producer_id, base_sequence,
                                    zbatch.crc(blob), blob)
        self._propose(part, len(records), producer_id, base_sequence, stored, done, leader_ack=not acks_quorum)

    def read_committed(self, topic: str, partition: int, offset: int, max_bytes: int) -> list[bytes]:
        """Stored batches of a partition this node leads, from `offset`, below the high watermark."""
        tp, part = self._local_leader(topic, partition)
        return self.store.read(tp, offset, max_bytes, upto=part.high_watermark)

    HANDLERS: dict[type, Callable] = {
        P.Produce: ClientsMixin.on_produce,
        P.Fetch: ClientsMixin.on_fetch,
        P.FetchMany: ClientsMixin.on_fetch_many,
        P.ListOffsets: ClientsMixin.on_list_offsets,
        P.MetadataRequest: MetaMixin.on_metadata,
        P.CreateTopic: MetaMixin.on_create_topic,
        P.DeleteTopic: MetaMixin.on_delete_topic,
        P.ReassignPartition: MetaMixin.on_reassign_partition,
        P.DrainNode: DrainMixin.on_drain_node,
        P.RegisterNode: MetaMixin.on_register_node,
        P.StatusRequest: StatusMixin.on_status,
        P.LocalStatusRequest: StatusMixin.on_local_status,
        P.Replicate: ReplicationMixin.on_replicate,
        P.NodeHeartbeat: PeersMixin.on_node_heartbeat,
    }

    # ------------------------------------------------------------------ timers and housekeeping

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


def run_node(config: NodeConfig, stop: threading.Event | None = None) -> None:
    """Run the node in the foreground until `stop` is set or SIGTERM/SIGINT arrives."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    node = Node(config)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCONT, lambda *_: node.note_continued())
    node.run(stop)
