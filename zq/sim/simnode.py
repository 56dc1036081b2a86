"""A simulated node: its disk, its replicas, and the simulated host through which it runs the
shipped persist-then-send pass (zq.node.replicas) and the shipped client room (zq.node.clients):
`SimStorage` (zq.node.host.Storage), `SimReplicaEvents` (zq.node.host.ReplicaEvents) and
`SimClientHost` (zq.node.host.ClientHost)."""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any, Callable

from zq import protocol as P
from zq.core.repl_types import LEADER, HardState
from zq.core.replication import Replica
from zq.errors import UnknownPartition, UnknownTopic
from zq.node.clients import Clients
from zq.node.replicas import Part, ReplicaSet
from zq.sim.checks import Violation
from zq.sim.disk import SimDisk
from zq.sim.workload import SIM_TOPIC

if TYPE_CHECKING:
    from zq.sim.cluster import Sim


class SimNode:
    def __init__(self, name: str, partitions: dict[int, tuple[str, ...]]) -> None:
        self.name = name
        # The partitions this node holds, each with the configuration its replica was created
        # with: the initial replica set, or () for one created by a reassignment.
        self.replica_sets = partitions
        self.disk = SimDisk(sorted(partitions))
        self.draining = False
        self.disk_low = False
        # Per partition deleted here, the epoch its replica had reached: kept durably (the shell
        # keeps it beside the metadata), so a replica created again starts past it.
        self.tombstones: dict[int, int] = {}
        self.replicas: dict[int, Replica] = {}
        # The node's replica hosting and persist-then-send pass: the shipped one (zq.node.replicas),
        # a new one per incarnation; its parts are `replicas`, keyed alike.
        self.pass_: ReplicaSet | None = None
        # Its producers' and consumers' requests go through the shipped client room, likewise per incarnation.
        self.clients: Clients | None = None
        self.send_delay_ms = 0       # the time this pass's fsync took: its sends leave that much later
        self.alive = False
        self.paused = False
        self.inbox: list[tuple[str, tuple]] = []
        self.timer_at = -1           # when its one timer event is due (-1: none outstanding)
        self.incarnation = 0


CRASH_IN_SYNC_P = 0.01   # with Settings.crash_in_sync: the chance that a synced commit is a crash instead


class CrashedInSync(Exception):
    """The simulated node crashed inside its pass's fsync (raised out of the pass, caught by Sim.run_pass)."""


class SimStorage:
    """The simulated host's storage (zq.node.host.Storage): a node's SimDisk. A Ready's writes
    are one write batch (volatile at once); a synced commit makes every batch so far durable and
    takes up to `sync_delay_ms_max` (the pass's sends leave after it)."""

    def __init__(self, sim: Sim, node: SimNode) -> None:
        self.sim = sim
        self.node = node

    def begin(self) -> SimDisk:
        return self.node.disk

    def write_ready(self, txn: SimDisk, p: int, reset_to: int | None, truncate_from: int | None, entries: tuple,
                    hard_state: HardState | None) -> None:
        sim, node = self.sim, self.node
        if reset_to is not None:
            sim.checker.before_reset(node.name, p, reset_to)
            sim.result.start_ats += 1
            sim.result.start_ats_moved += node.replica_sets[p] == ()
            sim.log(f"{node.name} p{p}: log restarts at {reset_to} (StartAt)")
        if truncate_from is not None:
            sim.checker.before_truncate(node.name, p, truncate_from, txn.volatile[p])
        txn.write_batch(p, truncate_from, entries, hard_state, reset_to)

    def put_hard_state(self, txn: SimDisk, p: int, hard_state: HardState) -> None:
        txn.write_batch(p, None, (), hard_state, None)

    def commit(self, txn: SimDisk, sync: bool) -> bool:
        if sync:
            self.sync()
        return True

    def sync(self) -> None:
        sim, node = self.sim, self.node
        txn = node.disk
        if (sim.settings.crash_in_sync and sim.phase == "safety" and sim.crashable
                and sim.sync_rng.random() < CRASH_IN_SYNC_P):
            # Power fails while this pass's fsync runs: what the pass wrote is not durable, but
            # whatever it sent before the fsync (a leader's Appends, answers to what had committed
            # already) is on the wire.
            kept = txn.crash(sim.sync_rng, power_loss=sim.settings.durability == "fsync")
            node.alive = False
            node.replicas.clear()
            node.pass_ = None
            if sim.members is not None:
                sim.members.crash(node.name, sim.now)
            sim.result.crashes += 1
            sim.result.crashes_in_sync += 1
            sim.log(f"crash {node.name} inside a pass's fsync (kept {kept} unsynced batches)")
            sim.at(sim.now + sim.sync_rng.randint(20, sim.settings.fault_duration_ms_max), "restart", node.name)
            raise CrashedInSync(node.name)
        txn.sync()
        node.send_delay_ms = max(node.send_delay_ms, sim.rng.randint(0, sim.settings.sync_delay_ms_max))


class SimReplicaEvents:
    """The simulated node's reactions to a durable Ready (zq.node.host.ReplicaEvents): sends on
    the simulated network, and the checker's hooks."""

    def __init__(self, sim: Sim, node: SimNode) -> None:
        self.sim = sim
        self.node = node

    def route(self, part: Part, out) -> None:
        self.sim.send(self.node, part.tp, out.to, out.message)

    def send_now(self) -> None:
        pass   # route() put them on the simulated network already, leaving before this pass's fsync delay

    def after_durable(self, part: Part, rd) -> None:
        sim, node, p, r = self.sim, self.node, part.tp, part.replica
        if rd.role is not None:
            sim.log(f"{node.name} p{p} {rd.role.role} epoch {rd.role.epoch} leader {rd.role.leader}")
            if rd.role.role == LEADER:
                sim.result.elections += 1
                sim.checker.on_leader(node.name, p, rd.role.epoch, r)
        if rd.role is not None and rd.role.role != LEADER:
            node.clients.refuse_parked(p)   # as the node does: its parked fetches learn where to go
        if rd.high_watermark is not None:
            self.committed(part, rd.high_watermark)
        for e in rd.entries:
            if e.config is not None and r.role == LEADER and e.epoch == r.epoch:
                sim.checker.on_config_appended(node.name, p, e, r)
                sim.result.config_changes += 1
        if r.removed and node.replicas.get(p) is r:
            sim.delete_replica(node, p)

    def committed(self, part: Part, high_watermark: int) -> bool:
        # The checker hears it when the node's clients do: what it passes must be durable at a majority now.
        self.sim.checker.on_high_watermark(self.node.name, part.tp, high_watermark, part.replica)
        self.node.clients.on_high_watermark(part.tp, high_watermark)   # as the node does
        return True

    def after_round(self) -> None:
        pass

    def write_failed(self, part: Part) -> None:
        raise AssertionError("a simulated disk does not fail a commit")

    def fence(self, part: Part, doing: str, error: Exception) -> None:
        raise error   # every error in the simulator is a finding


class SimClientHost:
    """The simulated node as the client room's host (zq.node.host.ClientHost): replies travel the
    simulated clients' links (after the pass's fsync, as every send of the pass), reads come from
    the node's disk, timers are simulator events of this incarnation. Every fetch answer is
    judged here: nothing in it may lie at or above the high watermark of the replica answering."""

    def __init__(self, sim: Sim, node: SimNode) -> None:
        self.sim = sim
        self.node = node
        self.name = node.name
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.limits = sim.client_limits

    def resolve(self, topic: str, partition: int) -> int:
        if topic != SIM_TOPIC:
            raise UnknownTopic(f"no topic {topic!r}")
        if not 0 <= partition < self.sim.settings.partitions:
            raise UnknownPartition(f"no partition {partition}")
        return partition

    def leader_of(self, tp: int) -> tuple[str | None, int]:
        r = self.node.replicas.get(tp)
        return (r.leader, r.epoch) if r is not None else (None, 0)

    def address_of(self, name: str) -> str:
        return name

    def storage_full(self) -> str | None:
        return "too little disk free" if self.node.disk_low else None

    def read(self, tp: int, offset: int, max_bytes: int, upto: int) -> tuple[list, int]:
        out = []
        if offset < upto:
            for e in self.node.disk.volatile[tp].read(offset, max_bytes):
                if e.base_offset >= upto:
                    break
                out.append(e)
        return out, sum(len(e.payload) for e in out)

    def offset_for_time(self, tp: int, time_ms: int) -> int | None:
        return None

    def reply(self, identity: bytes, msg: Any, *frames: bytes) -> None:
        if type(msg) is P.ProduceReply:
            self.sim.check_leader_ack(self.node, identity, msg)
        self.sim.client_reply(self.node, identity, msg, list(frames))

    def reply_error(self, identity: bytes, req_id: int, error: Any) -> None:
        self.sim.client_reply(self.node, identity, P.error_reply(req_id, error), [])

    def reply_fetch(self, identity: bytes, msg: P.FetchReply | P.FetchManyReply, values: list) -> None:
        if type(msg) is P.FetchManyReply:
            at = 0
            for p, high_watermark, _, _, n in msg.results:
                self._check_below_hw(p, high_watermark, values[at:at + n])
                at += n
            if at != len(values):
                raise Violation("a FetchMany answer's batches do not match its results",
                                f"{self.node.name}: {len(values)} batches, the results count {at}")
        else:
            self._check_below_hw(self.sim.reader_partition(identity), msg.high_watermark, values)
        self.sim.client_reply(self.node, identity, msg, values)

    def _check_below_hw(self, p: int | None, said: int, values: list) -> None:
        node = self.node
        r = node.replicas.get(p) if p is not None else None
        hw = r.high_watermark if r is not None else 0
        for e in values:
            if e.end_offset > min(hw, said):
                raise Violation("a fetch answer holds entries at or above the high watermark",
                                f"{node.name} p{p} answers [{e.base_offset}, {e.end_offset}) with its high "
                                f"watermark at {hw} (the answer says {said})")

    def fetch_backlog(self, identity: bytes) -> tuple[int, int, int]:
        return 0, 0, 0   # simulated consumers read every reply at once

    def now_ms(self) -> int:
        return self.sim.now

    def wall_ms(self) -> int:
        return self.sim.wall_ms(self.node)

    def at(self, when_ms: int, fn: Callable[[], None]) -> None:
        self.sim.at(when_ms, "node_timer", self.node.name, self.node.incarnation, fn)
