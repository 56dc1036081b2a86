"""The deterministic cluster simulator: real `Replica` cores, a simulated network and disk, one
thread, one `random.Random(seed)`.

Theory of operation
-------------------
A heap of timed events `(time_ms, sequence, kind, args)` (zq/sim/world.py's `EventHeap`, as in
every simulator) is the only scheduler; the sequence number breaks ties in insertion order, so one
seed gives one order of events and one trace hash. Each event is one step: a node's timer (one per node, at its replicas' earliest deadline
as the shipped pass keeps them; the pass ticks the replicas due then, and only those), a
message arriving, a disk sync (group commit), a client request or answer, a timer of a node's
client room, or a fault (crash,
restart, pause, resume, network partition, heal). After each step the checker's invariants
hold or the run stops with the invariant, the step and the replay command.

A node runs the shipped replica hosting and persist-then-send pass (zq.node.replicas.ReplicaSet,
as zq/io/node.py does) through a simulated host (zq/sim/simnode.py): each event that steps, ticks
or tells a replica ends with the node's pass, which writes every dirty replica's Ready into the
node's disk (one batch per Ready), commits (a sync when any of it must be: a vote, or entries with
durability=fsync; the sync takes up to `sync_delay_ms_max`, and the pass's sends leave after it),
`advance()`s, reports durability with `on_persisted`, then sends, answers producers and lets the
checker see roles, high watermarks and configurations. What the pass's rounds leave is done by a
next pass at once. High-watermark hints alone ride along with a later write, as on a node. With
durability=fsync a crash is a power loss: it loses unsynced writes (a random prefix may survive).
With durability=replicated a write counts as durable once written (RocksDB's log, no fsync, as
Kafka does) and a crash is a process kill, which the page cache survives; losing power on a
majority at once is the case that mode gives up, and it is not simulated. A crash also loses the
in-flight requests; a restart builds the cores from the disk alone. A pause stops a node's
timers and queues what arrives for it (bounded, as socket buffers are), like SIGSTOP.

Clients. Producers and consumers send real requests through the shipped client room
(zq.node.clients), with checks on what it answers: see zq/sim/clients.py.

Partitions are created at the start as a create_topic command creates them on nodes: founded
("Founding" in zq/core/replication.py), each led in epoch 1 by the first node of its set, with no
election; a node writes the founding in a pass of its own, which may crash in its fsync. Every
(re)start offers each replica of the initial placement the founding again: the core takes it
only where the disk holds nothing and no loss was found, as the node's shell does.

Replica-set changes. A seed may draw 4 or 5 nodes (partitions keep 3 replicas) and
reassignments: the simulator's metadata (`targets`) moves a partition to another 3-node set
differing by 1 or 2 nodes, tells every replica of it (`set_target`), and creates an empty replica,
knowing no configuration, on a node that has none; a replica whose `removed` turns True is
deleted with its data (durably, at once), so a node added again later starts empty, in the
epoch after the one its deleted replica had reached (`HardState.join_epoch`). A node
that is down or paused learns the targets when it runs again, as a node reads the metadata
log. Drains (`set_draining` on every replica of a node for a while) and one-off hand-offs
(`transfer_leadership` on a leader) are drawn as well, and so are nodes short of disk for a while
(`set_disk_low` on every replica of a node: a leader hands off to a voter with room).

Retention. A seed may draw retention, by time, as the node runs it: now and then a running
replica whose writes are synced applies it. A leader deletes the entries stamped before its
replica set's clock (`cluster_wall_ms`) minus `retention_ms`, up to its high watermark; a
follower deletes below its leader's log start (`leader_log_start`) once committed (durably;
`on_log_start`). So leaders' logs start past followers that were down, cut off or just created
by a reassignment, which catch up by StartAt (`Ready.reset_to`). A restarted replica reads only
from its log start. Such a seed may also set one node's wall clock ahead or behind (up to a
day, `clock_skew_ms`); every replica is told its node's wall clock with the time, and a leader
stamps each batch it proposes with `append_time_ms()` (kept beside the entry, as the batch
header holds it). Two checks: no replica deletes an entry proposed less than `retention_ms`
(minus `CLOCK_MARGIN_MS`) ago in true time, and no stamp is behind the true time by more than
`CLOCK_MARGIN_MS`, an election timeout and some transit (a stamp behind makes retention delete
early; one ahead only keeps longer).

Hostile peers. A seed may draw a hostile peer (from a random stream of its own): now and then
it sends a running replica a message no honest peer sends: fields out of range (an epoch of
2**40, an offset past 2**63, an entry whose epoch does not fit the stored header, a sender name
with a newline), votes from a stranger (a candidate or voter outside every configuration), and
Appends from a stranger in an epoch already over. Every delivered message, honest or not, first
passes `zq.core.bounds.check_message`, the function the real node's decoding runs; a hostile
message it refuses is counted and dropped, the rest reach the core, which must ignore or refuse
them (ProtocolError) without breaking any check. An honest message refused is a bug. (A forged
Append in the current or a later epoch is, by design, indistinguishable from a leader's: the
defence against it is `[security]`, which admits only the cluster key to speak as a node.)

Disk faults. A seed may draw disk faults (zq/sim/disk.py), each on a node it crashes for the
purpose: a flipped block under one entry of one partition (found when the restarted replica
reads its log: the shell sets the partition aside and opens it empty), a dropped tail of synced
writes (every partition of the node), a wiped replica or a wiped node. Half of those seeds also
wipe a replica or a node soon after the partitions were created (`early_wipe`), mostly a
partition's founder, restarted before the others elect, so that the epoch-1 leader comes back
empty ("Founding" in zq/core/replication.py: it must not lead epoch 1 again). A replica found lost
opens recovering (`HardState.recovering`, zq/core/replication.py), as the node does. At most one
replica of a partition is damaged or recovering at a time (the guarantee covers a minority);
crashes, pauses and partitions go on meanwhile.

Membership and the operator. A seed may also host the SWIM failure detector
(`zq.sim.members_layer.MembershipLayer`: the shipped membership services, zq/node/membership.py) on the same
simulated network, so the same partitions, loss, pauses, crashes and restarts (each a new
incarnation) reach it; its invariants (zq/sim/members_checks.py) are checked after each of its
steps. Its events run from their own heap on the same clock: `one_step` takes the earlier of
the two (ties to the cluster), and they do not count as steps. The detector runs with the
node's timing scaled down ten times (`SIM_MEMBERSHIP`), so that pauses and partitions outlive
its suspicion timeout and cause false deaths within a run. An "operator" (like a script a user
might run) now and then reads one running node's view and moves every partition with a node
that view calls DEAD onto nodes it calls ALIVE (`targets`, as a reassignment): false deaths
then drive real replica-set changes, and a node declared dead that is alive, or that comes back
in a new incarnation, must not cost an acknowledged write.

The safety phase runs `steps` events with faults. The liveness phase then heals everything
(restarts, resumes, reconnects, no loss, drains ended) and stops the producers and the
operator; within `liveness_ms` of simulated time every membership view must hold every node
ALIVE, and every partition must have one leader that every replica follows,
with equal log ends equal to every high watermark; its committed configuration must be its
target, with replicas on exactly the target's nodes; and every replica must hold every
acknowledged write.
"""
from __future__ import annotations

import dataclasses
import random
import traceback
from collections import defaultdict

from zq.core import bounds
from zq.core.membership import State
from zq.core.repl_types import FOLLOWER, LEADER, NO_PRODUCER, HardState, RecoveryPoll, RecoveryState, TimeoutNow
from zq.core.replication import Replica
from zq.errors import CorruptData, InvalidRequest, ProtocolError
from zq.hashing import rendezvous
from zq.limits import DEFAULT
from zq.node.clients import Clients
from zq.node import replicas as node_replicas
from zq.node.replicas import Part, ReplicaSet
from zq.sim.checks import Checker, Violation
from zq.sim.clients import ClientsMixin
from zq.sim.faults import EARLY_WIPE_MS, FaultsMixin, hostile_message
from zq.sim.members_layer import MembershipLayer, address_of
from zq.sim.members_checks import MembersChecker
from zq.sim.network import NetworkFaults, SimNetwork
from zq.sim.settings import (CLOCK_MARGIN_MS, PAUSED_INBOX_MAX, REPLICATION_FACTOR, Result, SIM_CONFIG,
                             SIM_MEMBERSHIP, Settings, WALL_BASE_MS)
from zq.sim.simnode import CrashedInSync, SimClientHost, SimNode, SimReplicaEvents, SimStorage
from zq.sim.workload import LEADER_ACKS_SHARE, ManyReader, Producer, Reader
from zq.sim.world import EventHeap


NODE_EVENTS = frozenset({"deliver", "timer", "pass", "request", "node_timer", "peer_lost"})   # events one node handles alone


class Sim(FaultsMixin, ClientsMixin):
    def __init__(self, seed: int, nodes: int = 3, steps: int = 400, settings: Settings | None = None,
                 verbose: bool = False) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.retention_rng = random.Random(seed * 2 + 1)  # only retention events draw from it
        self.members_rng = random.Random(seed * 2 + 2)    # the operator's choices
        self.disk_low_rng = random.Random(f"disk-{seed}")  # only disk-shortage events draw from it
        self.disk_rng = random.Random(seed * 2 + 3)       # disk faults
        self.hostile_rng = random.Random(f"hostile/{seed}")  # the hostile peer's choices
        self.sync_rng = random.Random(f"sync/{seed}")      # crashes inside a pass's fsync
        self.hint_rng = random.Random(f"hint/{seed}")      # connections seen closing (Replica.peer_lost)
        self.settings = settings or (Settings.draw(self.rng, nodes, steps).draw_retention(self.retention_rng)
                                     .draw_members(self.members_rng).draw_disk_low(self.disk_low_rng)
                                     .draw_disk(self.disk_rng).draw_hostile(self.hostile_rng)
                                     .draw_sync_crash(self.sync_rng))
        self.verbose = verbose
        self.now = 0
        self.events = EventHeap()
        self.step_no = 0
        self.phase = "safety"
        self.crashable = False   # set while one node handles an event of its own (see one_step)
        s = self.settings
        self.net = SimNetwork(self.rng, s.net)
        self.config = dataclasses.replace(SIM_CONFIG, append_entries_max=s.append_entries_max)
        names = [f"n{i + 1}" for i in range(s.nodes)]
        self.replica_sets = {p: tuple(sorted(rendezvous("sim", p, names, REPLICATION_FACTOR)))
                             for p in range(s.partitions)}
        self.targets = dict(self.replica_sets)   # the metadata's desired replica sets
        self.moving: set[int] = set()            # partitions whose committed set is not their target yet
        self.reassigned: set[int] = set()        # partitions ever moved (the metadata's TopicMeta.reassigned)
        self.nodes = {
            n: SimNode(n, {p: rs for p, rs in self.replica_sets.items() if n in rs}) for n in names
        }
        for node in self.nodes.values():
            node.disk.keep_synced_tail = s.disk
        self.checker = Checker(list(range(s.partitions)))
        # (partition, base offset, epoch) -> (stamped append time, true time proposed): what the
        # stored batch header would hold, beside the simulator's own knowledge of the truth.
        self.stamps: dict[tuple[int, int, int], tuple[int, int]] = {}
        self.result = Result(seed, True, s)
        self.members: MembershipLayer | None = None
        self.members_checker: MembersChecker | None = None
        if s.members:
            # Every node has every address as a seed (the topology's static seeds), and discovery.
            seeds = {n: [address_of(x) for x in names] for n in names}
            self.members = MembershipLayer(names, self.members_rng, self.net, 0, SIM_MEMBERSHIP, seeds)
            self.members_checker = MembersChecker(self.members)
            self.members.on_change.append(self._on_member_change)
        self.producers: dict[str, Producer] = {}
        for i in range(s.producers):
            p = i % s.partitions
            idem = self.rng.random() < s.idempotent_share
            name = f"c{i + 1}"
            self.producers[name] = Producer(name, p, sorted(self.nodes), 1000 + i if idem else NO_PRODUCER)
        acks_rng = random.Random(f"acks/{seed}")   # which plain producers ask for acks=leader
        for prod in self.producers.values():
            if not prod.idempotent and acks_rng.random() < LEADER_ACKS_SHARE:
                prod.acks = 1
        # Half the seeds hold their nodes to one parked fetch at a time (zq.limits' bound, set low), so
        # that the path past the bound runs too.
        self.client_limits = (DEFAULT if random.Random(f"limits/{seed}").random() < 0.5
                              else dataclasses.replace(DEFAULT, pending_fetches_max=1))
        self.readers: list[Reader | ManyReader] = [
            Reader(i, i % s.partitions, self.replica_sets[i % s.partitions][0]) for i in range(s.readers)]
        if self.readers and random.Random(f"many/{seed}").random() < 0.5:
            # Half the seeds: the first consumer reads every partition with FetchMany (zq's Consumer does).
            self.readers[0] = ManyReader(0, {p: self.replica_sets[p][0] for p in range(s.partitions)})
        self.clients_by_identity: dict[bytes, Producer | Reader | ManyReader] = {
            c.identity: c for c in [*self.producers.values(), *self.readers]}
        # Per node, the fetches it holds unanswered: (identity, req_id) -> (incarnation, ((partition,
        # offset), ...), true time its wait runs out). See check_parked.
        self.open_fetches: dict[str, dict[tuple[bytes, int], tuple[int, tuple, int]]] = {n: {} for n in names}
        self.parked_now: set[tuple[str, bytes, int]] = set()   # of those, the ones the room parked (counted)

    # ---------------------------------------------------------------- scheduling

    def wall_ms(self, node: SimNode) -> int:
        """A node's wall clock: true time, shifted on the skewed node."""
        skewed = f"n{self.settings.skewed_node + 1}" == node.name
        return WALL_BASE_MS + self.now + (self.settings.clock_skew_ms if skewed else 0)

    def at(self, time_ms: int, kind: str, *args) -> None:
        self.events.push(time_ms, kind, args)

    def log(self, text: str) -> None:
        if self.verbose:
            print(f"  [{self.step_no:5d} t={self.now:6d}] {text}")

    # ---------------------------------------------------------------- run

    def run(self) -> Result:
        s = self.settings
        for node in self.nodes.values():
            self.start_node(node)
        for name in self.producers:
            self.at(self.rng.randrange(1, 50), "produce", name)
        for i in range(s.readers):
            self.at(self.rng.randrange(1, 50), "read", i % s.partitions, i)
        if s.crash or s.pause or s.partition:
            self.at(self.rng.randrange(1, s.fault_interval_ms_max), "fault")
        if s.reassign or s.drain or s.transfer:
            self.at(self.rng.randrange(1, s.change_interval_ms_max), "change")
        if s.retention:
            self.at(self.rng.randrange(1, s.retention_interval_ms_max), "retain")
        if s.disk_low:
            self.at(self.disk_low_rng.randrange(1, 500), "disk_low")
        if self.members is not None and s.nodes > REPLICATION_FACTOR:
            self.at(self.members_rng.randrange(1, s.operator_interval_ms_max), "operate")
        if s.hostile:
            self.at(self.hostile_rng.randrange(1, s.hostile_interval_ms_max), "hostile")
        if s.disk:
            self.at(self.disk_rng.randrange(1, s.disk_interval_ms_max), "disk")
        if s.early_wipe:
            self.at(self.disk_rng.randint(*EARLY_WIPE_MS), "early_wipe")
        try:
            while self.events and self.step_no < s.steps:
                self.one_step()
            self.begin_liveness()
            deadline = self.now + s.liveness_ms
            while self.events and self.now <= deadline:
                self.one_step()
                if self.converged():
                    self.result.converged_ms = self.now - (deadline - s.liveness_ms)
                    break
            else:
                raise Violation("no convergence", self.convergence_report())
            for p, rs in self.targets.items():
                self.checker.check_converged_logs(p, [(n, self.nodes[n].replicas[p]) for n in rs])
        except (Violation, AssertionError) as v:
            if isinstance(v, AssertionError):
                # An assertion guards a core's own invariant: a broken one is a bug like any other.
                where = traceback.extract_tb(v.__traceback__)[-1]
                v = Violation("assertion failed", f"{v} at {where.filename}:{where.lineno} ({where.line})")
            self.result.ok = False
            self.result.invariant = v.invariant
            self.result.detail = v.detail
            self.result.failed_step = self.step_no
            self.result.phase = self.phase
        self.result.steps = self.step_no
        self.result.acks = sum(len(a) for a in self.checker.acks.values())
        self.result.retention_duplicates = self.checker.retention_duplicates
        self.result.reads = sum(len(r) for r in self.checker.reads.values())
        if self.members is not None:
            self.events.trace.update(self.members.events.trace.digest())
        self.result.trace_hash = self.events.trace_hash()
        return self.result

    def one_step(self) -> None:
        layer = self.members
        if layer is not None:
            due = layer.next_due_ms()
            if due is not None and due < self.events.next_ms():
                # The failure detector's event comes first: it is not one of our steps.
                self.now = max(self.now, due)
                for name in sorted(layer.step()):
                    self.members_checker.check_observer(name)
                return
            layer.now = max(layer.now, self.events.next_ms())
        time_ms, kind, args = self.events.pop()
        self.now = time_ms
        self.step_no += 1
        self.events.record(time_ms, kind, _trace_args(args))
        # A node may crash inside the fsync of a pass it runs for one of its own events (a message,
        # a timer, a request): the rest of that event is not handled, as the process is gone.
        self.crashable = kind in NODE_EVENTS
        try:
            getattr(self, "ev_" + kind)(*args)
        except CrashedInSync:
            pass
        finally:
            self.crashable = False

    # ---------------------------------------------------------------- node shell

    def start_node(self, node: SimNode) -> None:
        node.alive = True
        node.paused = False
        node.incarnation += 1
        node.timer_at = -1
        node.inbox.clear()
        node.replicas.clear()
        node.pass_ = ReplicaSet(SimStorage(self, node), SimReplicaEvents(self, node), defaultdict(int))
        node.clients = Clients(SimClientHost(self, node), node.pass_)
        self.open_fetches[node.name].clear()   # a crash lost them with the process
        self.parked_now = {key for key in self.parked_now if key[0] != node.name}
        for p in sorted(node.replica_sets):
            self.open_replica(node, p)
        self.net.rejoin(node.name, self.now)
        if self.members is not None:
            self.members.start(node.name, self.now)  # a new process: a new incarnation
        self.apply_targets(node)

    def open_replica(self, node: SimNode, p: int) -> None:
        try:
            r = self._new_replica(node, p)
        except CorruptData as e:
            # As the node does: the damaged copy is set aside and the replica starts empty, recovering.
            self.log(f"{node.name} p{p}: {e.message}; set aside")
            self.result.flips += 1
            node.disk.set_aside(p)
            r = self._new_replica(node, p)
        r.set_target(self.targets[p])
        if node.draining:
            r.set_draining(True)
        if node.disk_low:
            r.set_disk_low(True)
        node.replicas[p] = r
        node.pass_.parts[p] = Part(p, f"p{p}", r, sync=self.settings.durability == "fsync", log_start=r.log_start)
        node.pass_.dirty.add(p)   # its first Ready and its timer come with the node's next pass
        self.checker.on_restart(node.name, p, r)
        if r.recovering:
            self.drain(node, p)  # recovering is durable before anything else happens
        elif r.founded:
            # The node writes the founding in its next pass; a follower tells its leader its clock
            # then, as a node's does.
            r.tick(self.now, self.wall_ms(node))

    def _new_replica(self, node: SimNode, p: int) -> Replica:
        store = node.disk.volatile[p]
        hard = store.hard
        if hard is None and p in node.tombstones:
            join = node.tombstones[p] + 1
            hard = HardState(epoch=join, join_epoch=join)
        if p in node.disk.lost:
            hard = dataclasses.replace(hard or HardState(), recovering=True)
            node.disk.lost.discard(p)
            self.result.recoveries += 1
            self.log(f"{node.name} p{p}: lost, opens recovering")
        # The node's rule for the configuration a replica opens with (zq.node.replicas). A partition
        # of the initial placement was created with a leader: its set's first node (the core takes
        # the founding only if this replica never held the partition, see "Founding").
        created_with = tuple(node_replicas.starting_configuration(
            node.name, self.replica_sets[p], reassigned=p in self.reassigned,
            has_hard_state=store.hard is not None, removed_here=p in node.tombstones))
        return Replica(node.name, created_with, store, rng=self.rng, now_ms=self.now, config=self.config,
                       hard_state=hard, log_end=store.log_end, log_start=store.start,
                       founded_by=created_with[0] if node.name in created_with else None)

    def apply_targets(self, node: SimNode) -> None:
        """What a running node does on reading a target change in the metadata: tell its
        replicas, and create an empty one where the target names it and it has none."""
        if not node.alive or node.paused:
            return  # it reads the metadata when it runs again
        for p in sorted(self.targets):
            r = node.replicas.get(p)
            if r is not None:
                r.tick(self.now, self.wall_ms(node))
                r.set_target(self.targets[p])
                node.pass_.dirty.add(p)
            elif node.name in self.targets[p]:
                self.log(f"{node.name} p{p}: new replica (a learner)")
                node.replica_sets[p] = ()
                node.disk.add_partition(p)
                self.open_replica(node, p)
        self.run_pass(node)

    def delete_replica(self, node: SimNode, p: int) -> None:
        self.log(f"{node.name} p{p}: removed, deleted")
        self.result.removals += 1
        node.tombstones[p] = node.replicas[p].epoch
        node.clients.refuse_parked(p)   # as the node does when it drops a partition
        del node.replicas[p]
        node.pass_.forget(p)   # with its waiting producers: they time out and look elsewhere
        del node.replica_sets[p]
        node.disk.drop_partition(p)

    def schedule_timer(self, node: SimNode) -> None:
        """The node's one timer event, at its replicas' earliest deadline (the shipped pass keeps
        them: zq.node.replicas.ReplicaSet.next_deadline); when it comes, the pass ticks the due ones."""
        due = node.pass_.next_deadline()
        if due is None:
            return
        due = max(self.now, due)
        if node.timer_at != due:
            node.timer_at = due
            self.at(due, "timer", node.name, node.incarnation, due)

    def drain(self, node: SimNode, p: int) -> None:
        """A replica was stepped, ticked or told something: the node's pass runs."""
        node.pass_.dirty.add(p)
        self.run_pass(node)

    def run_pass(self, node: SimNode) -> None:
        """The end of a node's loop pass: the shipped persist-then-send pass (zq.node.replicas),
        then the node's timers are set again. What the pass's rounds left is done by the next."""
        node.send_delay_ms = 0
        node.pass_.finish_pass()
        for p in sorted(node.replicas):
            r = node.replicas[p]
            if r.role == LEADER and p in self.moving and r.committed_voters() == self.targets[p]:
                self.moving.discard(p)
                self.result.reassigned += 1
        self.schedule_timer(node)
        if node.pass_.dirty:
            self.at(self.now, "pass", node.name, node.incarnation)
        if self.open_fetches[node.name]:
            self.check_parked(node)

    def send(self, node: SimNode, p: int, to: str | None, msg: object) -> None:
        broadcast = to is None
        for dst in (node.replicas[p].peers if broadcast else [to]):
            if dst == node.name or dst not in self.nodes:
                continue   # ourselves, or the hostile peer (a leader answers a stranger): nobody listens
            for t in self.net.deliveries(self.now + node.send_delay_ms, node.name, dst, broadcast):
                self.at(t, "deliver", dst, p, msg)

    def send_from_shell(self, node: SimNode, p: int, to: str, msg: object) -> None:
        for t in self.net.deliveries(self.now, node.name, to, False):
            self.at(t, "deliver", to, p, msg)

    def handle(self, node: SimNode, kind: str, args: tuple) -> None:
        if kind in ("deliver", "hostile_deliver"):
            _dst, p, msg = args
            r = node.replicas.get(p)
            if r is None:
                if isinstance(msg, RecoveryPoll) and p in node.tombstones:
                    # Removed and deleted here: the node says it holds nothing (its last epoch), as
                    # the node's shell does, so a recovering replica that still counts it is answered.
                    self.send_from_shell(node, p, msg.sender, RecoveryState(node.tombstones[p], node.name, 0, 0, 0))
                return  # not (or no longer) a replica here: a shell drops it
            hostile = kind == "hostile_deliver"
            self.result.hostile_sent += hostile
            try:
                bounds.check_message(msg)   # what the node's decoding checks (zq.protocol.from_array)
            except InvalidRequest as e:
                if not hostile:
                    raise Violation("an honest replica sent a field out of range", f"{node.name} p{p}: {e}") from None
                self.result.hostile_refused += 1
                return
            r.tick(self.now, self.wall_ms(node))  # a shell tells the core the time before each batch of events
            try:
                r.step(msg)
            except ProtocolError as e:
                if hostile:
                    self.result.hostile_rejected += 1
                    self.drain(node, p)
                    return
                # Every other simulated peer is honest: a refused message is a bug in a core.
                raise Violation("protocol error between honest replicas", f"{node.name} p{p}: {e}") from None
            if r.epoch > bounds.U32_MAX:
                raise Violation("epoch past the stored width", f"{node.name} p{p} took epoch {r.epoch} from {msg}")
            if isinstance(msg, TimeoutNow) and r.role != FOLLOWER:
                self.result.handoffs += 1
            self.drain(node, p)
        elif kind == "peer_lost":
            # The node's connection to a peer closed: the shipped ReplicaSet tells the replicas that
            # follow it (as zq/io/node_peers.py does on its socket monitor's event).
            (lost,) = args
            self.result.peers_lost += node.pass_.peer_lost(lost, self.now, self.wall_ms(node)) > 0
            self.run_pass(node)
        elif kind == "call":
            (fn,) = args   # a timer of the node's that came due while it was paused
            fn()
            self.run_pass(node)
        else:
            self.serve_client(node, *args)

    def receive(self, dst: str, kind: str, args: tuple) -> None:
        node = self.nodes[dst]
        if not node.alive:
            return
        if node.paused:
            if len(node.inbox) < PAUSED_INBOX_MAX:
                node.inbox.append((kind, args))
            return
        self.handle(node, kind, args)

    # ---------------------------------------------------------------- events

    def ev_timer(self, name: str, incarnation: int, due: int) -> None:
        node = self.nodes[name]
        if not node.alive or node.paused or node.incarnation != incarnation or node.timer_at != due:
            return
        node.timer_at = -1
        node.pass_.tick_due(self.now, self.wall_ms(node))   # the shipped pass ticks the due replicas only
        self.run_pass(node)

    def ev_deliver(self, dst: str, p: int, msg: object) -> None:
        self.receive(dst, "deliver", (dst, p, msg))

    def ev_peer_lost(self, dst: str, lost: str) -> None:
        self.receive(dst, "peer_lost", (lost,))

    def connections_close(self, lost: str, to: list[str], chance: float) -> None:
        """`lost`'s connections to the nodes `to` close (seen by each with `chance`, a few ms later):
        its process ended, or, a false hint, a connection between running nodes broke."""
        rng = self.hint_rng
        for dst in sorted(to):
            if dst != lost and rng.random() < chance:
                self.at(self.now + rng.randint(1, 10), "peer_lost", dst, lost)

    def ev_hostile(self) -> None:
        """The hostile peer sends one running replica one message no honest peer sends."""
        rng = self.hostile_rng
        if self.phase == "safety":
            self.at(self.now + rng.randrange(1, self.settings.hostile_interval_ms_max), "hostile")
        running = [n for n in sorted(self.nodes)
                   if self.nodes[n].alive and not self.nodes[n].paused and self.nodes[n].replicas]
        if not running:
            return
        node = self.nodes[rng.choice(running)]
        p = rng.choice(sorted(node.replicas))
        r = node.replicas[p]
        # Delivered at once, so the message meets the replica in the state it was drawn for.
        self.handle(node, "hostile_deliver", (node.name, p, hostile_message(rng, r.epoch, r.leader, sorted(self.nodes))))

    def ev_request(self, dst: str, identity: bytes, msg: object, payload: list) -> None:
        self.receive(dst, "request", (identity, msg, payload))

    def ev_pass(self, name: str, incarnation: int) -> None:
        """A node's next loop pass, for what the last one's rounds left."""
        node = self.nodes[name]
        if node.alive and not node.paused and node.incarnation == incarnation:
            self.run_pass(node)

    def ev_retain(self) -> None:
        """Retention on one replica, as the node runs it: a leader by time, a follower below its leader's start."""
        if self.phase != "safety":
            return
        p = self.retention_rng.randrange(self.settings.partitions)
        for name in sorted(self.nodes):   # each node runs retention on its replicas of p
            node = self.nodes[name]
            r = node.replicas.get(p)
            if not node.alive or node.paused or r is None or node.disk.has_unsynced(p):
                continue
            store = node.disk.volatile[p]
            start = self.retention_start(node, p, r)
            if start is not None and start > store.start:
                self.check_retained(node, p, start)
                self.log(f"{name} p{p}: retention deletes [{store.start}, {start})")
                node.disk.retain(p, start)
                node.pass_.parts[p].log_start = start
                r.tick(self.now, self.wall_ms(node))
                r.on_log_start(start)
                self.checker.on_log_start(name, p, start)
                self.result.retained += 1
                self.drain(node, p)
        self.at(self.now + self.retention_rng.randint(10, self.settings.retention_interval_ms_max), "retain")

    def retention_start(self, node: SimNode, p: int, r: Replica) -> int | None:
        """Where the node's retention would start the log now (as Node._retention decides)."""
        store = node.disk.volatile[p]
        if r.role != LEADER:
            start = r.leader_log_start
            if not store.start < start <= r.high_watermark:
                return None
            if start not in {e.end_offset for e in store.entries}:
                raise Violation("a leader's log start is not an entry boundary of its follower",
                                f"{node.name} p{p} at {start}")
            return start
        wall = r.cluster_wall_ms()
        if wall is None:
            return None
        cutoff = wall - self.settings.retention_ms
        start, stamp = None, 0
        for e in store.entries:
            if e.end_offset > r.high_watermark:
                break
            # A marker or configuration entry has no stamp: the one before it counts (the store's
            # time index clamps it so).
            stamp = self.stamps.get((p, e.base_offset, e.epoch), (stamp, 0))[0]
            if stamp >= cutoff:
                break
            start = e.end_offset
        return start

    def check_retained(self, node: SimNode, p: int, start: int) -> None:
        """Nothing proposed less than retention_ms ago (true time, less the margin) is deleted."""
        for e in node.disk.volatile[p].entries:
            if e.end_offset > start:
                break
            stamped = self.stamps.get((p, e.base_offset, e.epoch))
            if stamped is not None and stamped[1] > self.now - self.settings.retention_ms + CLOCK_MARGIN_MS:
                raise Violation("retention deleted an entry younger than retention_ms",
                                f"{node.name} p{p}: offset {e.base_offset} proposed at t={stamped[1]}, "
                                f"deleted at t={self.now} (retention_ms={self.settings.retention_ms})")

    def _on_member_change(self, now_ms: int, observer: str, change) -> None:
        if change.state is State.DEAD and self.nodes[change.node].alive:
            self.result.false_deaths += 1
            self.log(f"{observer} holds {change.node} dead (its process runs)")

    def ev_operate(self) -> None:
        """The operator: read one running node's membership view; move every partition with a
        node it calls DEAD onto nodes it calls ALIVE (itself included), if there are enough."""
        if self.phase != "safety":
            return
        rng = self.members_rng
        running = [n for n in sorted(self.nodes) if self.nodes[n].alive and not self.nodes[n].paused]
        if running:
            observer = rng.choice(running)
            view = self.members.view(observer)
            dead = {n for n, v in view.items() if v.state is State.DEAD}
            alive = sorted({observer} | {n for n, v in view.items() if v.state is State.ALIVE})
            changed = False
            for p in sorted(self.targets):
                current = self.targets[p]
                gone = [n for n in current if n in dead]
                spare = [n for n in alive if n not in current]
                if not gone or len(spare) < len(gone):
                    continue  # nothing to do, or nowhere to go (a majority may still serve)
                new = tuple(sorted([n for n in current if n not in dead] + rng.sample(spare, len(gone))))
                self.log(f"operator ({observer}'s view: dead {sorted(dead)}) moves p{p}: {list(current)} -> {list(new)}")
                self.targets[p] = new
                self.moving.add(p)
                self.reassigned.add(p)
                self.result.operator_moves += 1
                self.result.operator_false_moves += any(self.nodes[n].alive for n in gone)
                changed = True
            if changed:
                for name in sorted(self.nodes):
                    self.apply_targets(self.nodes[name])
        self.at(self.now + rng.randint(10, self.settings.operator_interval_ms_max), "operate")

    def ev_heal(self) -> None:
        if self.phase == "safety":
            self.net.heal()

    # ---------------------------------------------------------------- liveness

    def begin_liveness(self) -> None:
        self.phase = "liveness"
        self.log("liveness phase: heal everything")
        self.net.faults = NetworkFaults(delay_ms_max=self.settings.net.delay_ms_max)
        self.net.heal()
        self.net.joined_at_ms.clear()
        for name in sorted(self.nodes):
            node = self.nodes[name]
            node.draining = False
            node.disk_low = False
            if not node.alive:
                self.start_node(node)
            elif node.paused:
                self.resume(node)
            else:
                self.set_draining(node, False)
                self.set_disk_low(node, False)

    def converged(self) -> bool:
        for p, target in self.targets.items():
            holders = tuple(n for n in sorted(self.nodes) if p in self.nodes[n].replicas)
            if holders != target:
                return False  # a removed replica is not gone yet, or a new one not created
            replicas = [self.nodes[n].replicas[p] for n in target]
            leaders = [r for r in replicas if r.role == LEADER]
            if len(leaders) != 1:
                return False
            lead = leaders[0]
            for r in replicas:
                if (r.recovering or r.epoch != lead.epoch or r.leader != lead.node_id or r.log_end != lead.log_end
                        or r.high_watermark != lead.log_end or r.durable_end != lead.log_end
                        or r.committed_voters() != target or r.voters != target):
                    return False
        return self.members_converged()

    def members_converged(self) -> bool:
        """Every node's membership view holds every other node ALIVE (all run in this phase)."""
        layer = self.members
        if layer is None:
            return True
        for o in sorted(self.nodes):
            if layer.nodes[o].core is None:
                return False
            view = layer.view(o)
            if any(n not in view or view[n].state is not State.ALIVE for n in self.nodes if n != o):
                return False
        return True

    def convergence_report(self) -> str:
        parts = []
        if self.members is not None:
            for o in self.members.running():
                rows = " ".join(f"{n}={v.state.value}" for n, v in sorted(self.members.view(o).items()))
                parts.append(f"{o} view: {rows}")
        for p, target in self.targets.items():
            parts.append(f"p{p} target {list(target)}")
            for n in sorted(self.nodes):
                r = self.nodes[n].replicas.get(p)
                if r is not None:
                    parts.append(f"p{p} {n}: {r.role} e{r.epoch} leader={r.leader} end={r.log_end} "
                                 f"hw={r.high_watermark} durable={r.durable_end} voters={list(r.voters)} "
                                 f"committed={list(r.committed_voters())} learners={list(r.learners)}")
        return "; ".join(parts)


def _trace_args(args: tuple) -> str:
    out = []
    for a in args:
        if isinstance(a, (int, str)):
            out.append(str(a))
        else:
            out.append(type(a).__name__ + str(getattr(a, "epoch", "")) + str(getattr(a, "sender", "")))
    return ",".join(out)


def run_seed(seed: int, nodes: int = 3, steps: int = 400, verbose: bool = False) -> Result:
    return Sim(seed, nodes=nodes, steps=steps, verbose=verbose).run()
