"""The node-side consumer groups service: membership, leases, acks, retries, dead letters, replay.

Theory of operation
-------------------
The rules live in pure cores; this module feeds them messages and time and carries out their
effects (replies, gossip, stored states, timers, dead-letter copies) through its host, a
`zq.node.services.ServiceHost`: the real node (zq/io/node.py) in production, and a simulated
host (zq/sim/group_host.py) in the groups simulator, which so runs this very service. It opens
no socket, reads no clock and draws no randomness of its own. `zq.core.groups.GroupMembership`
(one per group, on every node) says who is in a group, its generation and who reads which
partition; `zq.core.grouplead.PartitionLead` (one per (group, partition), used by the partition's
leader) holds the leader-side rules below (fencing, which offsets a lease serves, applying an Ack,
the sweep, dead-letter bookkeeping, merge, reset) around the lattice
`zq.core.groupstate.DeliveryState`.

Membership. A consumer joins through any node and heartbeats there. Every node gossips its
copies of every group to every other node (`GroupGossip`) every `membership_gossip_ms` (or a
quarter of the shortest session timeout, if sooner), and at once after a change it made;
receivers merge. The assignment is a deterministic function of the
merged copy, so the nodes agree once gossip converges. Every node expires members whose session
ran out (the expiry is itself a gossiped fact).

Delivery. A member leases messages of each partition it holds from that partition's leader
(`Lease`). The leader checks that the member is live, in the leader's current generation, and
holds the partition (else `Fenced`, or `RebalanceInProgress` when the member is ahead of the
leader's view), then leases: first offsets whose retry time has passed, then never-delivered
offsets from its cursor up to the high watermark, within the state's tracked window. The reply
carries the stored batches holding those offsets, unchanged, and each offset's attempt number.
With nothing to give, the lease waits (long-poll, `parked_leases_max` at once) until the high
watermark moves past the cursor, a retry comes due, or its wait runs out.

Acks travel in batches (`Ack`: acked offsets, nacks with the attempt they fail, lease
extensions), under the reset epoch of the lease, so that acks from before a replay are ignored.
A member that no longer holds the partition in the leader's view is fenced: nothing of its Ack
is applied (a redelivery follows, which is the at-least-once contract). A member that still
holds the partition may ack in an older generation: a rebalance that did not move that partition
does not throw away work that was done.

Every `sweep_ms` the leader expires leases (a lease that ran out is a failed delivery), fails at
once the leases of members known to have left (so their partitions move within the session
timeout, not the lease time), and starts dead-letter copies: the source record, with its key,
value and headers plus the zq-* dead-letter headers, is produced to `TOPIC.dlq` (same partition
index) with acks=quorum, on this node if it leads that partition, else at its leader; only when
the copy is acknowledged does `on_dead_lettered` mark the offset done. The write is idempotent:
its producer id is derived from the group and the source message (`dead_letter_producer_id`),
sequence 0, so a retry whose first answer was lost, or a second leader of the source partition
that had not heard the offset was done, gets "duplicate" from the dead-letter partition, and the
copy is there once. At most
`dead_letter_writes_max` copies per partition are in flight.

Persistence and replication. Changed states are written every `persist_ms` (not fsynced), and
at once in the pass when a redelivery waits on them (a failure, a takeover, a merge a replica
acknowledges: then fsynced): replies go out as soon as they are ready, before the write. That is
allowed here, unlike in replication, because of the lattice's argument (groupstate.py): a lost
update is a redelivery, never a loss. A copy of the dead-letter record is acknowledged by its
own quorum before the source counts as done, so that step never loses a message either. The
leader sends the states it changed to the partition's other replicas every `state_gossip_ms`
(`GroupStateGossip`), and a state with a failed delivery at once; they merge and persist. What
travels is `DeliveryState.gossip_dict`: the committed offset and the entries that carry
information (failures, attempts above 1, acks out of order, dead letters), not the plain
first-delivery leases that are most of a busy partition's state. Leases read the stored batches
they serve a few at a time and keep the last one per partition (`batch_cache_max`): the next
lease starts in it.

Quorum for retries (grouplead.py): attempt numbers never go down across leader changes. A
redelivery is served only once a majority of the partition's replicas (the leader's own store
counting) hold its failure on disk: while a state waits for that, its gossip asks for
acknowledgements (`boot`), the replicas merge, write with an fsync, and answer `GroupStateAck`
after their pass has committed; the leader's own copy counts once its pass committed, fsynced
too. A replica acknowledges only the node it believes leads the partition, so a deposed leader
cannot gather a majority the new one did not read. A new leader (a new leader epoch of the
partition) serves no lease until it has merged the copies of a majority of the replicas, its
own and `GroupStatePull` answers (each asked again every `gather_wait_ms` until it answers);
then its merged copy must be held by a majority before its first redelivery. Majorities
intersect, so every failure a redelivery was served after is in the new leader's copy. First
deliveries wait for nothing but the majority read at a leader change.

Reset (replay, seek): `ResetGroup` to any node goes on to each partition's leader, which opens a
new reset epoch at the target offset; the new epoch wins every merge. Epochs are numbered by the
leader's clock and name (grouplead.reset_epoch_floor), so two resets at two nodes never share one.

Describe: the node asked gathers rows from every node (each answers for the partitions it
leads, within `describe_wait_ms`) and adds its own view of the membership.
"""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Any, Callable

from zq import batch as zbatch
from zq import protocol as P
from zq import group_protocol as G
from zq.core.bounds import PRODUCER_ID_MAX
from zq.core.grouplead import (FENCED, DeadLetterWrite, PartitionLead, check_member, reset_epoch_floor,
                               unknown_member)
from zq.core.groups import GroupMembership, membership_gossip_interval_ms
from zq.core.groupstate import DeliveryState
from zq.core.quorum import has_majority
from zq.core.repl_types import COMMITTED
from zq.limits import DEFAULT
from zq.core.retry import BackoffPolicy, RetryPolicy
from zq.errors import (Fenced, InvalidRequest, LeaderNotAvailable, NotLeader, ProtocolError, RebalanceInProgress,
                       UnknownPartition, ZqError)
from zq.node.services import ServiceHost
from zq.types import TopicPartition

log = logging.getLogger("zq.groups")

# Timing.
membership_gossip_ms = 500        # every node sends its copies of every group this often
membership_gossip_ms_min = 20     # ... and after a change, but not more often than this
state_gossip_ms = 200             # a leader sends the delivery states it changed to their replicas
sweep_ms = 100                    # lease expiry, departed members' leases, dead letters
persist_ms = 100                  # changed states are written this often (at once when a redelivery waits on it)
unknown_member_ms = 3 * membership_gossip_ms   # a member no copy here knows for this long is fenced
unknown_members_max = 10_000      # (group, member) pairs this node tracks as unknown
describe_wait_ms = 400            # how long `zq groups` waits for other nodes' rows
gather_wait_ms = 300              # a new leader asks a replica that has not answered its pull again after this
reset_wait_ms = 3_000             # how long a forwarded reset waits for a partition leader
dead_letter_wait_ms = 5_000       # a dead-letter copy sent to another node, unanswered by then, is tried again
# Bounds.
groups_max = 10_000               # groups one node keeps
states_max = 100_000              # delivery states one node keeps in memory
parked_leases_max = 10_000        # long-poll leases waiting at once
batch_cache_max = 64              # partitions whose last stored batch read for a lease is kept (~0.5 MiB each)
lease_read_bytes = 256 * 1024     # stored batches read from the store at a time for a lease
undecodable_logged_max = 1_000    # undecodable stored batches remembered as logged (one line each)
lease_messages_max = 5_000        # messages one lease may hand out
lease_bytes_max = 4 * 1024 * 1024  # stored batches one lease reply carries (one batch always fits)
lease_wait_ms_max = 30_000
session_timeout_ms_min, session_timeout_ms_max = 200, 30 * 60_000
ack_items_max = 100_000           # acked + nacks + extends in one Ack
gossip_items_per_message_max = 256

STATE_KEY_PREFIX = b"group/"      # store meta keys: STATE_KEY_PREFIX + CBOR [group, topic_id, partition]


def state_key(group: str, topic_id: int, partition: int) -> bytes:
    return STATE_KEY_PREFIX + _dumps([group, topic_id, partition])


Key = tuple[str, int, int]   # (group, topic id, partition)


_Held = PartitionLead   # the leader-side rules of one (group, partition): zq.core.grouplead


@dataclass(slots=True)
class _Gather:
    """A new leader's majority read of one partition's group states."""
    epoch: int                    # the leader epoch it is for
    replicas: list[str]
    replied: set[str]
    asked_ms: int


@dataclass(slots=True)
class _Parked:
    deadline_ms: int
    identity: bytes
    msg: G.Lease
    key: Key
    done: bool = False


class GroupService:
    def __init__(self, host: ServiceHost) -> None:
        self.host = host
        self.memberships: dict[str, GroupMembership] = {}
        self.held: dict[Key, _Held] = {}
        self.parked: list[_Parked] = []
        self.rng = random.Random(host.random_bits(64))   # retry jitter: the host's randomness
        self._policies: dict[int, tuple[tuple, RetryPolicy]] = {}
        self._next_sweep_ms = 0
        self._next_gossip_ms = 0
        self._next_state_gossip_ms = 0
        self._next_persist_ms = 0
        # (topic id, partition) -> (base offset, next offset, stored batch): the batch the last lease
        # ended in, which the next lease starts in (a stored batch holds ~5 leases' worth).
        self._batches: dict[tuple[int, int], tuple[int, int, bytes]] = {}
        self._undecodable_logged: set[tuple[int, int, int]] = set()   # (topic id, partition, base offset)
        self._last_gossip_ms = 0
        self._gossip_soon = False
        self._failed: set[Key] = set()   # states with a failed delivery not yet sent to the replicas
        self._unknown_since: dict[tuple[str, str], int] = {}   # (group, member) -> first request seen
        # Quorum for retries. `boot` names this start of the node in acks: versions start over.
        self.boot = host.random_bits(62) | 1
        self._gathered: dict[tuple[int, int], int] = {}   # (topic id, partition) -> leader epoch read
        self._gathering: dict[tuple[int, int], _Gather] = {}
        self._own_pending: list[tuple[Key, int]] = []      # own copies written this pass, awaiting commit
        self._acks_pending: dict[tuple[str, int], list[list]] = {}   # (leader, boot) -> items, after commit
        self.handlers: dict[type, Callable[[bytes, Any, list], None]] = {
            G.JoinGroup: self.on_join_group,
            G.GroupHeartbeat: self.on_group_heartbeat,
            G.LeaveGroup: self.on_leave_group,
            G.Lease: self.on_lease,
            G.Ack: self.on_ack,
            G.ResetGroup: self.on_reset_group,
            G.DescribeGroups: self.on_describe_groups,
            G.GroupGossip: self.on_group_gossip,
            G.GroupStateGossip: self.on_group_state_gossip,
            G.GroupStateAck: self.on_group_state_ack,
            G.GroupStatePull: self.on_group_state_pull,
            G.LocalGroupsRequest: self.on_local_groups,
        }
        self._load()

    # ------------------------------------------------------------------ life cycle

    def _load(self) -> None:
        """Delivery states this node persisted, so that it can lead or describe them after a restart.

        Runs once, before the node's loop starts (the store's scan is not for the loop)."""
        loaded = 0
        for name, value in self.host.scan_meta(STATE_KEY_PREFIX):
            if loaded >= states_max:
                log.warning("more than %d group states stored; the rest load when they are used", states_max)
                break
            try:
                group, topic_id, partition = _loads(name[len(STATE_KEY_PREFIX):])
                self.held[(group, topic_id, partition)] = _decode_held(value)
                loaded += 1
            except (ZqError, ValueError, TypeError) as e:
                log.warning("a stored group state is unreadable (%s); it is ignored", e)
        if loaded:
            log.info("loaded %d group delivery states", loaded)

    def start(self) -> None:
        """Nothing to start: timers run from tick()."""

    def close(self) -> None:
        self.parked.clear()
        self._persist()   # states changed since the last timed write go into the node's final commit

    def on_high_watermark(self, topic: str, partition: int, high_watermark: int) -> None:
        """New data is visible: leases waiting for it are answered in this pass, not the next."""
        if self.parked:
            self._serve_parked(self.host.now_ms())

    def tick(self, now_ms: int) -> None:
        """Every loop pass: cheap unless a timer is due or leases are parked."""
        if now_ms >= self._next_sweep_ms:
            self._next_sweep_ms = now_ms + sweep_ms
            self._expire_members()
            self._retry_gathering(now_ms)
            self._sweep()
        if self.parked:
            self._serve_parked(now_ms)
        if now_ms >= self._next_gossip_ms or (self._gossip_soon and now_ms >= self._last_gossip_ms + membership_gossip_ms_min):
            self._gossip_memberships(now_ms)
        # A failure (or a takeover) is written at once: a redelivery waits for it to be on disk here
        # and at the replicas; so is a merge a replica must acknowledge. The rest waits for the timer.
        urgent = bool(self._failed or self._acks_pending)
        if now_ms >= self._next_state_gossip_ms:
            self._next_state_gossip_ms = now_ms + state_gossip_ms
            self._failed.clear()
            self._gossip_states(self.held)
        elif self._failed:
            # A failed delivery goes to the replicas at once, not at the next round: a new leader
            # whose copy has the failure hands out the next attempt again with the same number,
            # where one without it handed out a lower number (found by the groups simulator).
            failed, self._failed = self._failed, set()
            self._gossip_states(failed)
        if urgent or now_ms >= self._next_persist_ms:
            self._next_persist_ms = now_ms + persist_ms
            self._persist()

    # ------------------------------------------------------------------ membership

    def _membership(self, group: str) -> GroupMembership:
        m = self.memberships.get(group)
        if m is None:
            if len(self.memberships) >= groups_max:
                raise InvalidRequest(f"this node keeps at most {groups_max} groups")
            m = self.memberships[group] = GroupMembership(group, self.host.name)
        return m

    def _partitions_of(self, m: GroupMembership) -> list[tuple[str, int]]:
        topics = sorted({t for r in m.records.values() if not r.left for t in r.topics})
        out = []
        for t in topics:
            tm = self.host.meta.topics.get(t)
            if tm is not None:
                out.extend((t, p) for p in range(len(tm.partitions)))
        return out

    def _rebalance(self, m: GroupMembership) -> None:
        if m.maybe_rebalance(self._partitions_of(m)):
            self.host.counters["group_rebalances"] += 1
            self._gossip_soon = True

    def _reply_assignment(self, identity: bytes, req_id: int, m: GroupMembership, member_id: str) -> None:
        parts = [[t, p] for t, p in m.assignment_of(member_id)]
        self.host.reply(identity, G.GroupReply(req_id, m.group, member_id, m.generation, parts))

    def on_join_group(self, identity: bytes, msg: G.JoinGroup, payload: list) -> None:
        _check_name(msg.group, "group")
        _check_name(msg.member_id, "member id")
        if not msg.topics or len(msg.topics) > 1_000 or not all(isinstance(t, str) for t in msg.topics):
            raise InvalidRequest("a member subscribes to 1 to 1000 topics, given by name")
        if not session_timeout_ms_min <= msg.session_timeout_ms <= session_timeout_ms_max:
            raise InvalidRequest(f"session timeout must be between {session_timeout_ms_min} and "
                                 f"{session_timeout_ms_max} ms, got {msg.session_timeout_ms}")
        for t in msg.topics:
            self.host.meta.topic(t)   # UnknownTopic, retriable: metadata may still be spreading
        m = self._membership(msg.group)
        before = m.generation
        m.on_join(msg.member_id, topics=msg.topics, session_timeout_ms=msg.session_timeout_ms, static=msg.static,
                  now_ms=self.host.wall_ms())
        self._rebalance(m)
        if m.generation != before:
            self._gossip_soon = True
            log.info("group %s: %s joined, generation %d", msg.group, msg.member_id, m.generation)
        self._reply_assignment(identity, msg.req_id, m, msg.member_id)

    def on_group_heartbeat(self, identity: bytes, msg: G.GroupHeartbeat, payload: list) -> None:
        m = self.memberships.get(msg.group)
        refusal = unknown_member(m, msg.member_id, msg.generation, self._long_unknown(m, msg.group, msg.member_id),
                                 "this node")
        if refusal is not None:
            if refusal.kind == FENCED:
                raise Fenced(refusal.message)
            raise RebalanceInProgress(refusal.message)
        assert m is not None
        if not m.on_heartbeat(msg.member_id, self.host.wall_ms()):
            raise Fenced(f"member {msg.member_id} left group {msg.group} or its session expired; join again")
        self._rebalance(m)
        self._reply_assignment(identity, msg.req_id, m, msg.member_id)

    def on_leave_group(self, identity: bytes, msg: G.LeaveGroup, payload: list) -> None:
        m = self.memberships.get(msg.group)
        if m is not None and m.on_leave(msg.member_id, self.host.wall_ms()):
            self._rebalance(m)
            self._gossip_soon = True
            self._next_sweep_ms = 0   # fail its leases now rather than at their deadline
            log.info("group %s: %s left, generation %d", msg.group, msg.member_id, m.generation)
        self.host.reply(identity, P.OkReply(msg.req_id, {}))

    def _expire_members(self) -> None:
        now = self.host.wall_ms()
        for group in sorted(self.memberships):
            m = self.memberships[group]
            expired = m.expire(now)
            if expired:
                log.info("group %s: session of %s expired", group, ", ".join(expired))
                self.host.counters["group_sessions_expired"] += len(expired)
                self._rebalance(m)
                self._gossip_soon = True

    def on_group_gossip(self, identity: bytes, msg: G.GroupGossip, payload: list) -> None:
        try:
            if len(msg.groups) != len(payload) or len(payload) > groups_max:
                raise ProtocolError("GroupGossip names one group per payload frame")
            for frame in payload:
                other = GroupMembership.from_dict(_loads(frame), self.host.name)
                m = self._membership(other.group)
                before = (m.generation, m.assignment)
                m.merge_from(other)
                if (m.generation, m.assignment) != before:
                    self._rebalance(m)
                    self._next_sweep_ms = 0   # a member may have left: its leases fail now
        except ZqError as e:
            self.host.counters["protocol_errors"] += 1
            log.warning("dropped group gossip from %s: %s", msg.sender, e)

    def _gossip_memberships(self, now_ms: int) -> None:
        self._next_gossip_ms = now_ms + membership_gossip_interval_ms(self.memberships.values(), membership_gossip_ms,
                                                                      membership_gossip_ms_min)
        self._last_gossip_ms = now_ms
        self._gossip_soon = False
        if not self.memberships:
            return
        names = sorted(self.memberships)
        frames = [_dumps(self.memberships[g].to_dict()) for g in names]
        for start in range(0, len(names), gossip_items_per_message_max):
            end = start + gossip_items_per_message_max
            msg = G.GroupGossip(0, self.host.name, names[start:end])
            for peer in self.host.known_nodes():
                if peer != self.host.name:
                    self.host.send_to_peer(peer, msg, *frames[start:end])

    # ------------------------------------------------------------------ fencing

    def _long_unknown(self, m: GroupMembership | None, group: str, member_id: str) -> bool:
        """Has this node had requests of a member it has no record of for `unknown_member_ms`, so that
        gossip would have brought the record by now if any node had it? (grouplead.unknown_member)"""
        if m is not None and member_id in m.records:
            return False   # the common case: no clock read, no table
        now = self.host.now_ms()
        key = (group, member_id)
        since = self._unknown_since.get(key)
        if since is None:
            if len(self._unknown_since) >= unknown_members_max:
                self._unknown_since.clear()   # forgetting only delays a fencing by one period
            since = self._unknown_since[key] = now
        elif now - since > 10 * unknown_member_ms:
            since = self._unknown_since[key] = now   # an old sighting: this is a new episode
        return now - since >= unknown_member_ms

    def _check_member(self, group: str, member_id: str, generation: int, tp: tuple[str, int], strict: bool) -> None:
        """Raise unless `member_id` may lease (strict) or settle deliveries of `tp` now (grouplead.check_member)."""
        m = self.memberships.get(group)
        refusal = check_member(m, member_id, generation, tp, strict, self._long_unknown(m, group, member_id))
        if refusal is None:
            return
        if refusal.counted:
            self.host.counters["group_fenced"] += 1
        if refusal.kind == FENCED:
            if refusal.generation is not None:
                raise Fenced(refusal.message, generation=refusal.generation)
            raise Fenced(refusal.message)
        raise RebalanceInProgress(refusal.message)

    # ------------------------------------------------------------------ delivery states

    def _policy(self, topic_meta: Any) -> RetryPolicy:
        c = topic_meta.config
        spec = (c.get("max_deliveries", 5), c.get("backoff_initial_ms", 1_000), c.get("backoff_max_ms", 60_000))
        cached = self._policies.get(topic_meta.id)
        if cached is None or cached[0] != spec:
            initial = max(0, int(spec[1]))
            policy = RetryPolicy(max(1, int(spec[0])), BackoffPolicy(initial, max(initial, int(spec[2]))))
            cached = self._policies[topic_meta.id] = (spec, policy)
        return cached[1]

    def _held(self, key: Key) -> _Held | None:
        held = self.held.get(key)
        if held is None:
            raw = self.host.get_meta(state_key(*key))
            if raw is not None:
                try:
                    held = self.held[key] = _decode_held(raw)
                except ZqError as e:
                    log.warning("stored state of group %s, topic %d/%d is unreadable (%s); starting afresh",
                                key[0], key[1], key[2], e)
        return held

    def _held_or_new(self, key: Key, start_offset: Callable[[], int]) -> _Held:
        held = self._held(key)
        if held is None:
            if len(self.held) >= states_max:
                raise InvalidRequest(f"this node keeps at most {states_max} group delivery states")
            offset = start_offset()
            held = self.held[key] = _Held.fresh(offset)
        return held

    def _start_offset(self, topic: str, topic_id: int, partition: int, start: Any) -> int:
        log_start, hw = self.host.partition_bounds(topic, partition)
        if start == "latest":
            return hw
        if type(start) is int:
            found = self.host.offset_for_time(TopicPartition(topic_id, partition), start)
            return hw if found is None else min(max(found, log_start), hw)
        return log_start

    def _persist(self) -> None:
        txn = None
        for key, held in self.held.items():
            if held.dirty:
                held.dirty = False
                txn = txn or self.host.write()
                txn.put_meta(state_key(*key), _encode_held(held))
                if held.wants_confirmation():
                    self._own_pending.append((key, held.version))
        if self._own_pending or self._acks_pending:
            # A redelivery waits for these copies to be on disk (fsynced) at a majority: the
            # leader's own counts, and replicas' acks go out, only once this pass has committed
            # (the node runs its timers after it commits).
            self.host.write_synced()
            if txn is None:
                self.host.write()   # an empty write still commits (and syncs) before the timers
            self.host.at(self.host.now_ms(), self._after_commit)

    def _after_commit(self) -> None:
        own, self._own_pending = self._own_pending, []
        acks, self._acks_pending = self._acks_pending, {}
        confirmed = False
        for key, version in own:
            held = self.held.get(key)
            replicas = self._replicas(key)
            if held is not None and replicas:
                confirmed |= held.note_held(self.host.name, version, replicas)
        for (leader, boot), items in sorted(acks.items()):
            for start in range(0, len(items), gossip_items_per_message_max):
                self.host.send_to_peer(leader, G.GroupStateAck(0, self.host.name, boot,
                                                               items[start:start + gossip_items_per_message_max]))
        if confirmed and self.parked:
            self._serve_parked(self.host.now_ms())

    def _replicas(self, key: Key) -> list[str]:
        t = self.host.meta.topics_by_id.get(key[1])
        return list(t.partitions[key[2]]) if t is not None and key[2] < len(t.partitions) else []

    # ------------------------------------------------------------------ a new leader's majority read

    def _ready_to_serve(self, t: Any, p: int) -> bool:
        """Has this node, as the partition's leader in its current epoch, merged a majority's copies?"""
        tp = (t.id, p)
        leader, epoch = self.host.leader_of(TopicPartition(t.id, p))
        if leader != self.host.name:
            return False
        if self._gathered.get(tp) == epoch:
            return True
        g = self._gathering.get(tp)
        if g is None or g.epoch != epoch:
            replicas = list(t.partitions[p])
            g = self._gathering[tp] = _Gather(epoch, replicas, {self.host.name}, self.host.now_ms())
            for peer in replicas:
                if peer != self.host.name:
                    self._pull(tp, peer, epoch, None)
        return self._maybe_gathered(tp, g)

    def _maybe_gathered(self, tp: tuple[int, int], g: _Gather) -> bool:
        if not has_majority(g.replied & set(g.replicas), len(g.replicas)):
            return False
        del self._gathering[tp]
        self._gathered[tp] = g.epoch
        for key in sorted(self.held):
            if (key[1], key[2]) == tp:
                self.held[key].on_taken_over()
                self._failed.add(key)   # to the replicas at once: redeliveries wait for a majority to hold it
        log.info("topic %d/%d: merged the group states of %s as leader (epoch %d)", tp[0], tp[1],
                 ", ".join(sorted(g.replied)), g.epoch)
        return True

    def _pull(self, tp: tuple[int, int], peer: str, epoch: int, after: str | None) -> None:
        msg = G.GroupStatePull(self.host.next_req_id(), self.host.name, tp[0], tp[1], after)
        self.host.request_peer(peer, msg, lambda reply, payload: self._on_pulled(tp, peer, epoch, reply, payload),
                               gather_wait_ms)

    def _on_pulled(self, tp: tuple[int, int], peer: str, epoch: int, reply: Any, payload: list) -> None:
        g = self._gathering.get(tp)
        if g is None or g.epoch != epoch or not isinstance(reply, G.GroupStatePulled):
            return   # done, superseded, or failed: the sweep asks again
        try:
            if len(reply.items) != len(payload) or len(payload) > gossip_items_per_message_max:
                raise ProtocolError("GroupStatePulled carries one payload frame per item, a bounded number")
            last = None
            for item, frame in zip(reply.items, payload):
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                        and type(item[1]) is int and item[1] >= 0):
                    raise ProtocolError("GroupStatePulled items are [group, dead_lettered]")
                last = item[0]
                self._merge_state((item[0], tp[0], tp[1]), DeliveryState.from_dict(_loads(frame)), item[1])
        except ZqError as e:
            self.host.counters["protocol_errors"] += 1
            log.warning("dropped group states pulled from %s: %s", peer, e)
            return
        if reply.more and last is not None:
            self._pull(tp, peer, epoch, last)
            return
        g.replied.add(peer)
        if self._maybe_gathered(tp, g) and self.parked:
            self._serve_parked(self.host.now_ms())

    def _retry_gathering(self, now_ms: int) -> None:
        for tp, g in sorted(self._gathering.items()):
            if now_ms < g.asked_ms + gather_wait_ms:
                continue
            t = self.host.meta.topics_by_id.get(tp[0])
            if t is None or self.host.leader_of(TopicPartition(tp[0], tp[1])) != (self.host.name, g.epoch):
                del self._gathering[tp]   # no longer this node's to read; a lease starts it again
                continue
            g.asked_ms = now_ms
            for peer in g.replicas:
                if peer not in g.replied:
                    self._pull(tp, peer, g.epoch, None)

    def on_group_state_pull(self, identity: bytes, msg: G.GroupStatePull, payload: list) -> None:
        if type(msg.topic_id) is not int or type(msg.partition) is not int or not (
                msg.after is None or isinstance(msg.after, str)):
            raise ProtocolError("GroupStatePull names a topic id, a partition and a group or null")
        keys = [k for k in self.held if k[1] == msg.topic_id and k[2] == msg.partition
                and (msg.after is None or k[0] > msg.after)]
        keys.sort()
        page = keys[:gossip_items_per_message_max]
        items = [[k[0], self.held[k].dead_lettered] for k in page]
        frames = [_dumps(self.held[k].state.gossip_dict()) for k in page]
        self.host.reply(identity, G.GroupStatePulled(msg.req_id, self.host.name, items,
                                                     len(keys) > len(page)), *frames)

    def on_group_state_ack(self, identity: bytes, msg: G.GroupStateAck, payload: list) -> None:
        if msg.boot != self.boot:
            return   # an ack of what an earlier start of this node sent: its versions started over
        confirmed = False
        for item in msg.items:
            if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str)
                    and all(type(x) is int and x >= 0 for x in item[1:])):
                self.host.counters["protocol_errors"] += 1
                return
            key = (item[0], item[1], item[2])
            held = self.held.get(key)
            if held is not None:
                confirmed |= held.note_held(msg.sender, item[3], self._replicas(key))
        if confirmed and self.parked:
            self._serve_parked(self.host.now_ms())

    # ------------------------------------------------------------------ leases

    def on_lease(self, identity: bytes, msg: G.Lease, payload: list) -> None:
        if not 1 <= msg.max_messages or msg.lease_ms < 1 or msg.max_wait_ms < 0:
            raise InvalidRequest("a lease asks for at least one message, a positive lease time and a wait >= 0")
        if not (msg.start in ("earliest", "latest") or (type(msg.start) is int and msg.start >= 0)):
            raise InvalidRequest("a lease's start is earliest, latest or a time in ms")
        t = self.host.meta.topic(msg.topic)
        self.host.partition_bounds(msg.topic, msg.partition)   # NotLeader, UnknownPartition
        self._check_member(msg.group, msg.member_id, msg.generation, (msg.topic, msg.partition), strict=True)
        key = (msg.group, t.id, msg.partition)
        self.host.counters["group_leases"] += 1
        if self._ready_to_serve(t, msg.partition):   # else a new leader still reads a majority's copies
            self._held_or_new(key, lambda: self._start_offset(msg.topic, t.id, msg.partition, msg.start))
            if self._serve_lease(identity, msg, key):
                return
        wait_ms = min(msg.max_wait_ms, lease_wait_ms_max)
        if wait_ms <= 0 or len(self.parked) >= parked_leases_max:
            self._reply_empty(identity, msg, key)
            return
        self.parked.append(_Parked(self.host.now_ms() + wait_ms, identity, msg, key))

    def _reply_empty(self, identity: bytes, msg: G.Lease, key: Key) -> None:
        held = self.held.get(key)
        try:
            hw = self.host.partition_bounds(msg.topic, msg.partition)[1]
        except ZqError as e:
            self.host.reply_error(identity, msg.req_id, e)
            return
        self.host.reply(identity, G.LeaseReply(msg.req_id, held.state.reset_epoch if held else 0, [], hw))

    def _serve_lease(self, identity: bytes, msg: G.Lease, key: Key) -> bool:
        """Lease what may be delivered now and answer; False (nothing answered) when there is nothing."""
        held = self.held[key]
        topic, p = msg.topic, msg.partition
        log_start, hw = self.host.partition_bounds(topic, p)
        now = self.host.wall_ms()
        plan = held.plan_lease(now, min(msg.max_messages, lease_messages_max), log_start, hw)
        retries = plan.retries
        frames: dict[int, bytes] = {}
        # Retries are lowest first, and a stored batch holds thousands of them: read (and verify)
        # each batch once, not once per retry (measured: a lease of 1,000 retries after a
        # rebalance, each re-reading a 512 KiB batch and its checksum, held the loop 1.5 s, long
        # enough for the partition's followers to start an election).
        covered_lo = covered_hi = -1
        for o in retries:
            if covered_lo <= o < covered_hi:
                continue
            for f in self.host.read_committed(topic, p, o, 1):
                h = zbatch.unpack_header(f)
                frames.setdefault(h.base_offset, f)
                covered_lo, covered_hi = h.base_offset, h.next_offset
                break
        new: list[int] = []
        start, end = plan.start, plan.end
        if start < end:
            for f, h, undecodable in self._read_batches(topic, key[1], p, start, end):
                lo, hi = max(h.base_offset, start), min(h.next_offset, end)
                # A control batch's offsets, and an undecodable batch's, are done at once: the committed
                # offset moves past them and no member is leased what it cannot read.
                done = undecodable or bool(h.flags & zbatch.FLAG_CONTROL)
                if not done:
                    frames.setdefault(h.base_offset, f)
                    new.extend(range(lo, hi))
                elif undecodable:
                    self.host.counters["group_undecodable_offsets_skipped"] += hi - lo
                held.on_read(lo, hi, done)
        if not retries and not new:
            return False
        deliveries = held.grant(retries + new, msg.member_id, msg.lease_ms, now)
        if not deliveries:
            return False
        flat: list[int] = []
        redelivered = 0
        for d in deliveries:
            flat.append(d.offset)
            flat.append(d.attempt)
            redelivered += d.attempt > 1
        needed = _frames_for([d.offset for d in deliveries], frames)
        self.host.counters["group_delivered"] += len(deliveries)
        self.host.counters["group_redelivered"] += redelivered
        self.host.reply(identity, G.LeaseReply(msg.req_id, held.state.reset_epoch, flat, hw), *needed)
        return True

    def _read_batches(self, topic: str, topic_id: int, p: int, start: int, end: int) -> Any:
        """(stored batch, header, undecodable) from the one holding `start` to the one holding
        `end - 1`, at most `lease_bytes_max` in all (at least one). Read `lease_read_bytes` at a
        time, as the lease needs them, and the last one kept: the next lease of the partition
        starts in it, and reading a ~512 KiB batch again (with its checksum) for each of the ~5
        leases it holds cost ~7% of a node's time. A batch read from the store has its records
        verified once, before it is served or kept (see `_undecodable`)."""
        tp = (topic_id, p)
        total = 0
        o = start
        last: tuple[int, int, bytes] | None = None
        try:
            while o < end:
                cached = self._batches.get(tp)
                fresh = not (cached is not None and cached[0] <= o < cached[1])
                if not fresh:
                    frames = [cached[2]]   # verified when it was read
                else:
                    frames = self.host.read_committed(topic, p, o, lease_read_bytes)
                    if not frames:
                        return
                for f in frames:
                    h = zbatch.unpack_header(f)
                    if h.base_offset >= end or h.next_offset <= o or (total and total + len(f) > lease_bytes_max):
                        return
                    total += len(f)
                    undecodable = fresh and self._undecodable(topic, topic_id, p, f, h)
                    if not undecodable:
                        last = (h.base_offset, h.next_offset, f)
                    yield f, h, undecodable
                    o = h.next_offset
                    if o >= end:
                        return
        finally:
            if last is not None:
                if tp not in self._batches and len(self._batches) >= batch_cache_max:
                    self._batches.pop(next(iter(self._batches)))
                self._batches[tp] = last

    def _undecodable(self, topic: str, topic_id: int, p: int, value: bytes, h: zbatch.BatchHeader) -> bool:
        """True when a stored batch's records do not decode (an older version stored it unchecked):
        counted each time a group steps over it, logged once per batch (within `undecodable_logged_max`).
        A batch its leader verified when it accepted it (zq.batch.FLAG_VERIFIED) is not decoded again."""
        if h.flags & (zbatch.FLAG_VERIFIED | zbatch.FLAG_CONTROL):
            return False
        try:
            zbatch.stored_records(value, h)
            return False
        except ProtocolError as e:
            self.host.counters["group_undecodable_batches_skipped"] += 1
            seen = (topic_id, p, h.base_offset)
            if seen not in self._undecodable_logged:
                if len(self._undecodable_logged) >= undecodable_logged_max:
                    self._undecodable_logged.clear()
                self._undecodable_logged.add(seen)
                log.error("%s/%d: %s; groups step over its offsets (counted as "
                          "group_undecodable_offsets_skipped)", topic, p, e.message)
            return True

    def _serve_parked(self, now_ms: int) -> None:
        keep = []
        wall = self.host.wall_ms()
        for parked in self.parked:
            msg = parked.msg
            try:
                hw = self.host.partition_bounds(msg.topic, msg.partition)[1]
                # The member may have left, or lost the partition, while its lease waited: serving it
                # then would lease messages to nobody, and their expiry would count as failed attempts.
                self._check_member(msg.group, msg.member_id, msg.generation, (msg.topic, msg.partition), strict=True)
                t = self.host.meta.topic(msg.topic)
                if self._ready_to_serve(t, msg.partition):
                    held = self._held_or_new(parked.key, lambda: self._start_offset(
                        msg.topic, t.id, msg.partition, msg.start))
                    if held.ready(hw, wall) and self._serve_lease(parked.identity, msg, parked.key):
                        continue
            except ZqError as e:   # leadership moved, topic deleted: the member learns where to go
                self.host.reply_error(parked.identity, msg.req_id, e)
                continue
            if now_ms >= parked.deadline_ms:
                self._reply_empty(parked.identity, msg, parked.key)
                continue
            keep.append(parked)
        self.parked = keep

    # ------------------------------------------------------------------ acks

    def on_ack(self, identity: bytes, msg: G.Ack, payload: list) -> None:
        if len(msg.acked) + len(msg.nacks) + len(msg.extends) > ack_items_max:
            raise InvalidRequest(f"an Ack carries at most {ack_items_max} items")
        t = self.host.meta.topic(msg.topic)
        self.host.partition_bounds(msg.topic, msg.partition)
        self._check_member(msg.group, msg.member_id, msg.generation, (msg.topic, msg.partition), strict=False)
        key = (msg.group, t.id, msg.partition)
        held = self._held_or_new(key, lambda: self._start_offset(msg.topic, t.id, msg.partition, "earliest"))
        out = held.on_ack(msg.member_id, msg.reset_epoch, msg.acked, msg.nacks, msg.extends, self.host.wall_ms(),
                          self._policy(t) if msg.nacks else None, self.rng.random)
        counters = self.host.counters
        counters["group_acks"] += out.acked
        if msg.nacks:
            counters["group_nacks"] += out.nacked
            counters["group_retries"] += out.retries
            counters["group_dead_letters_due"] += out.dead_letters_due
        if out.nacked:
            self._failed.add(key)
        st = held.state
        self.host.reply(identity, P.OkReply(msg.req_id, {"committed": st.committed, "epoch": st.reset_epoch}))
        if out.dead_letters_due:
            for write in held.take_dead_letters():
                self._write_dead_letter(key, held, write)

    # ------------------------------------------------------------------ the sweep

    def _sweep(self) -> None:
        now = self.host.wall_ms()
        counters = self.host.counters
        for key in sorted(self.held):
            held = self.held[key]
            group, topic_id, p = key
            t = self.host.meta.topics_by_id.get(topic_id)
            if t is None:
                continue   # not applied yet here, or deleted (the store dropped its data)
            if not self.host.leads(t.name, p):
                continue
            out = held.sweep(now, self.memberships.get(group), (t.name, p), self._policy(t), self.rng.random)
            if out.expired:
                counters["group_lease_expiries"] += out.expired
            if out.departed:
                counters["group_departed_leases"] += out.departed
            if out.retries:
                counters["group_retries"] += out.retries
            if out.dead_letters_due:
                counters["group_dead_letters_due"] += out.dead_letters_due
            if out.expired or out.departed:
                self._failed.add(key)
            for write in out.writes:
                self._write_dead_letter(key, held, write)

    # ------------------------------------------------------------------ dead letters

    def _write_dead_letter(self, key: Key, held: _Held, write: DeadLetterWrite) -> None:
        group, topic_id, p = key
        node = self.host
        d = write.letter
        t = node.meta.topics_by_id.get(topic_id)
        if t is None:
            held.abandon_dead_letter(write)
            return
        source = self._source_record(t.name, p, d.offset)
        dlq = node.meta.topics.get(t.name + ".dlq")
        if source is None or dlq is None:
            # Retention deleted the message, or it has no dead-letter topic (it is one): nothing
            # can be copied, so the group moves on, loudly.
            log.warning("group %s: %s/%d offset %d cannot be dead-lettered (%s); skipped", group, t.name, p,
                        d.offset, "no longer stored" if source is None else f"no topic {t.name}.dlq")
            node.counters["group_dead_letters_skipped"] += 1
            self._on_dead_letter_written(key, write, True, counted=False)
            return
        headers = dict(source.headers or {})
        headers.update({
            "zq-source-topic": t.name.encode(), "zq-source-partition": str(p).encode(),
            "zq-source-offset": str(d.offset).encode(), "zq-attempts": str(d.attempts).encode(),
            "zq-last-error": d.last_error.encode(), "zq-first-failure-ms": str(d.first_failure_ms).encode(),
            "zq-last-failure-ms": str(d.last_failure_ms).encode(), "zq-group": group.encode(),
        })
        record = [node.wall_ms(), source.key, source.value, headers]
        dp = p % len(dlq.partitions)
        # Idempotent across retries and leader changes: one producer id per source message, sequence 0,
        # so a copy written whose answer was lost, or written by an earlier leader of the source
        # partition, is answered as a duplicate instead of written again (a hostile test once found
        # one poison message twice in its TOPIC.dlq).
        producer_id = dead_letter_producer_id(group, topic_id, p, d.offset)
        if node.leads(dlq.name, dp):
            def local_done(outcome: Any) -> None:
                ok = not isinstance(outcome, ZqError) and getattr(outcome, "status", None) == COMMITTED
                self._on_dead_letter_written(key, write, ok)
            node.produce_local(dlq.name, dp, [record], local_done, acks_quorum=True, producer_id=producer_id,
                               base_sequence=0)
            return
        leader = node.leader_address(dlq.name, dp)[0]
        if leader is None:
            held.abandon_dead_letter(write)   # the next sweep tries again
            return
        blob = zbatch.encode_records([record])
        request = P.Produce(node.next_req_id(), dlq.name, dp, 2, 1, zbatch.crc(blob), producer_id, 0, 0)
        self._request_with_frames(leader, request, [blob], lambda reply, _: self._on_dead_letter_written(
            key, write, isinstance(reply, P.ProduceReply)))

    def _source_record(self, topic: str, partition: int, offset: int) -> Any:
        for value in self.host.read_committed(topic, partition, offset, 1):
            try:
                records = zbatch.iter_records(value, offset)
            except ProtocolError as e:   # undecodable: nothing to copy, skipped as a deleted record is
                log.error("%s/%d offset %d: %s", topic, partition, offset, e.message)
                return None
            for rec in records:
                if rec.offset == offset:
                    return rec
            break
        return None

    def _on_dead_letter_written(self, key: Key, write: DeadLetterWrite, ok: bool, counted: bool = True) -> None:
        held = self.held.get(key)
        if held is None:
            return
        if not ok:
            self.host.counters["group_dead_letter_failures"] += 1
        if held.on_dead_letter_written(write, ok, counted) and counted:
            self.host.counters["group_dead_letters"] += 1

    def _request_with_frames(self, name: str, msg: Any, frames: list[bytes], on_reply: Callable[[Any, list], None]) -> None:
        """A request to a peer with payload frames (a Produce of dead letters to a remote leader)."""
        self.host.request_peer(name, msg, on_reply, dead_letter_wait_ms, frames=frames)

    # ------------------------------------------------------------------ replication of states

    def _gossip_states(self, keys: Any) -> None:
        """Changed states to their replicas, as `gossip_dict`: without the plain first-delivery
        leases, which a new leader delivers again as attempt 1 (sending them whole once a second
        too cost ~10% of group-1's throughput; a new leader re-leases from the committed offset
        anyway, so even known leases go again to their live owner)."""
        node = self.host
        out: dict[str, list[tuple[list, bytes, bool]]] = {}
        for key in sorted(keys):
            held = self.held.get(key)
            if held is None:
                continue
            group, topic_id, p = key
            t = node.meta.topics_by_id.get(topic_id)
            if t is None or p >= len(t.partitions):
                continue
            # A state a redelivery waits on goes every round until a majority holds it (gossip may be lost).
            wants = held.wants_confirmation() and node.leads(t.name, p)
            if not (held.changed or wants):
                continue
            held.changed = False
            frame = _dumps(held.state.gossip_dict())
            for peer in t.partitions[p]:
                if peer != node.name:
                    item = [group, topic_id, p, held.dead_lettered, held.version]
                    out.setdefault(peer, []).append((item, frame, wants))
        for peer in sorted(out):
            items = out[peer]
            for start in range(0, len(items), gossip_items_per_message_max):
                chunk = items[start:start + gossip_items_per_message_max]
                boot = self.boot if any(w for _, _, w in chunk) else 0
                node.send_to_peer(peer, G.GroupStateGossip(0, node.name, boot, [i for i, _, _ in chunk]),
                                  *[f for _, f, _ in chunk])

    def on_group_state_gossip(self, identity: bytes, msg: G.GroupStateGossip, payload: list) -> None:
        try:
            if len(msg.items) != len(payload):
                raise ProtocolError("GroupStateGossip carries one payload frame per item")
            if type(msg.boot) is not int or msg.boot < 0:
                raise ProtocolError("GroupStateGossip.boot is an integer >= 0")
            acks: list[list] = []
            for item, frame in zip(msg.items, payload):
                if not (isinstance(item, list) and len(item) == 5 and isinstance(item[0], str)
                        and all(type(x) is int and x >= 0 for x in item[1:])):
                    raise ProtocolError("GroupStateGossip items are "
                                        "[group, topic_id, partition, dead_lettered, version]")
                group, topic_id, p, dead_lettered, version = item
                t = self.host.meta.topics_by_id.get(topic_id)
                if t is None or p >= len(t.partitions):
                    continue   # a topic this node has not applied yet: the next round brings it again
                key = (group, topic_id, p)
                if not self._merge_state(key, DeliveryState.from_dict(_loads(frame)), dead_lettered):
                    continue
                # Acknowledged only to the node this one believes leads: a deposed leader must not
                # gather a majority that the new leader did not read.
                if msg.boot and self.host.leader_of(TopicPartition(topic_id, p))[0] == msg.sender:
                    acks.append([group, topic_id, p, version])
            if acks:
                self._acks_pending.setdefault((msg.sender, msg.boot), []).extend(acks)
        except ZqError as e:
            self.host.counters["protocol_errors"] += 1
            log.warning("dropped group state gossip from %s: %s", msg.sender, e)

    def _merge_state(self, key: Key, other: DeliveryState, dead_lettered: int) -> bool:
        """Merge a copy from another replica into this node's; False if there was no room to keep it."""
        held = self._held(key)
        if held is None:
            if len(self.held) >= states_max:
                return False
            held = self.held[key] = _Held.from_state(other, dead_lettered)
            held.dirty = True
        else:
            held.merge_from(other, dead_lettered)
        return True

    # ------------------------------------------------------------------ reset

    def on_reset_group(self, identity: bytes, msg: G.ResetGroup, payload: list) -> None:
        chosen = (msg.to_offset is not None) + (msg.to_time_ms is not None) + bool(msg.earliest)
        if chosen != 1:
            raise InvalidRequest("a reset goes to exactly one of an offset, a time or the earliest offset")
        if (msg.to_offset is not None and msg.to_offset < 0) or (msg.to_time_ms is not None and msg.to_time_ms < 0):
            raise InvalidRequest("offsets and times are >= 0")
        _check_name(msg.group, "group")
        t = self.host.meta.topic(msg.topic)
        n = len(t.partitions)
        if msg.partition is not None and not 0 <= msg.partition < n:
            raise UnknownPartition(f"topic {msg.topic!r} has partitions 0 to {n - 1}, not {msg.partition}")
        if msg.to_offset is not None and msg.partition is None and n > 1:
            raise InvalidRequest("an offset belongs to one partition: give the partition too")
        partitions = [msg.partition] if msg.partition is not None else list(range(n))
        results: dict[int, Any] = {}
        state = {"left": len(partitions), "done": False}

        def finish() -> None:
            if state["done"]:
                return
            state["done"] = True
            errors = [results[p] for p in sorted(results) if isinstance(results[p], ZqError)]
            missing = [p for p in partitions if p not in results]
            if errors:
                self.host.reply_error(identity, msg.req_id, errors[0])
            elif missing:
                self.host.reply_error(identity, msg.req_id, LeaderNotAvailable(
                    f"the leaders of partitions {missing} did not answer; retry the reset"))
            else:
                self.host.reply(identity, P.OkReply(msg.req_id, {
                    "group": msg.group, "topic": msg.topic,
                    "partitions": [{"partition": p, "offset": results[p][0], "epoch": results[p][1]}
                                   for p in sorted(results)]}))

        def done(p: int, result: Any) -> None:
            results[p] = result
            state["left"] -= 1
            if state["left"] <= 0:
                finish()

        for p in partitions:
            if self.host.leads(msg.topic, p):
                try:
                    done(p, self._reset_local(msg, t, p))
                except ZqError as e:
                    done(p, e)
            elif msg.forwarded:
                done(p, self._not_leader(msg.topic, p))
            else:
                self._forward_reset(msg, p, done)
        if not state["done"]:
            self.host.at(self.host.now_ms() + reset_wait_ms + 100, finish)

    def _not_leader(self, topic: str, p: int) -> ZqError:
        leader, address = self.host.leader_address(topic, p)
        if leader is None or leader == self.host.name:
            return LeaderNotAvailable(f"{topic}/{p} has no leader right now; retry shortly")
        return NotLeader(f"{self.host.name} does not lead {topic}/{p}; {leader} does", leader=leader,
                         address=address or "")

    def _forward_reset(self, msg: G.ResetGroup, p: int, done: Callable[[int, Any], None]) -> None:
        leader = self.host.leader_address(msg.topic, p)[0]
        if leader is None or leader == self.host.name:
            done(p, LeaderNotAvailable(f"{msg.topic}/{p} has no leader right now; retry shortly"))
            return
        forwarded = G.ResetGroup(self.host.next_req_id(), msg.group, msg.topic, p, msg.to_offset, msg.to_time_ms,
                                 msg.earliest, True)

        def on_reply(reply: Any, _payload: list) -> None:
            if isinstance(reply, P.OkReply):
                rows = reply.data.get("partitions") or [{}]
                done(p, (rows[0].get("offset"), rows[0].get("epoch", 0)))
            else:
                done(p, reply if isinstance(reply, ZqError) else ProtocolError("unexpected reply to a reset"))

        self.host.request_peer(leader, forwarded, on_reply, reset_wait_ms)

    def _reset_local(self, msg: G.ResetGroup, t: Any, p: int) -> tuple[int, int]:
        """(offset the group now starts at, the reset epoch that opened)."""
        log_start, hw = self.host.partition_bounds(t.name, p)
        if msg.earliest:
            target = log_start
        elif msg.to_time_ms is not None:
            found = self.host.offset_for_time(TopicPartition(t.id, p), msg.to_time_ms)
            target = hw if found is None else min(max(found, log_start), hw)
        else:
            target = min(max(msg.to_offset, log_start), hw)
        key = (msg.group, t.id, p)
        held = self._held_or_new(key, lambda: target)
        held.reset(target, reset_epoch_floor(self.host.wall_ms(), self.host.name))
        self.host.counters["group_resets"] += 1
        log.info("group %s: %s/%d reset to offset %d (epoch %d)", msg.group, t.name, p, target, held.state.reset_epoch)
        return target, held.state.reset_epoch

    # ------------------------------------------------------------------ describe

    def on_local_groups(self, identity: bytes, msg: G.LocalGroupsRequest, payload: list) -> None:
        self.host.reply(identity, G.LocalGroupsReply(msg.req_id, self.host.name, self._local_rows(msg.group)))

    def _local_rows(self, only: str | None) -> list[dict]:
        """Rows for the (group, partition) pairs whose partition this node leads."""
        node = self.host
        now = node.wall_ms()
        rows = []
        seen: set[Key] = set()
        for key in sorted(self.held):
            group, topic_id, p = key
            t = node.meta.topics_by_id.get(topic_id)
            if (only is not None and group != only) or t is None or not node.leads(t.name, p):
                continue
            held = self.held[key]
            seen.add(key)
            rows.append(self._row(group, t.name, p, held, now))
        for group in sorted(self.memberships):
            if only is not None and group != only:
                continue
            for topic, p in self._partitions_of(self.memberships[group]):
                t = node.meta.topics[topic]
                if (group, t.id, p) not in seen and node.leads(topic, p):
                    rows.append(self._row(group, topic, p, None, now))
        return rows

    def _row(self, group: str, topic: str, p: int, held: _Held | None, now: int) -> dict:
        log_start, hw = self.host.partition_bounds(topic, p)
        committed = held.state.committed if held is not None else None
        position = max(log_start, committed if committed is not None else log_start)
        lag = max(0, hw - position)
        lag_seconds = 0.0
        if lag:
            for value in self.host.read_committed(topic, p, position, 1):
                lag_seconds = round(max(0, now - zbatch.unpack_header(value).append_time_ms) / 1000.0, 3)
                break
        stats = held.state.stats() if held is not None else None
        return {"group": group, "topic": topic, "partition": p, "committed": committed, "lag": lag,
                "lag_seconds": lag_seconds, "in_flight": stats.in_flight if stats else 0,
                "retrying": stats.retrying if stats else 0,
                "dead_letter_due": stats.dead_letter_due if stats else 0,
                "dead_lettered": held.dead_lettered if held is not None else 0,
                "epoch": held.state.reset_epoch if held is not None else 0, "leader": self.host.name}

    def metrics_rows(self) -> list[dict]:
        """Consumer lag and delivery state of the (group, partition) pairs this node leads, for the
        node's /metrics snapshot (called on the loop thread about once a second)."""
        return self._local_rows(None)

    def on_describe_groups(self, identity: bytes, msg: G.DescribeGroups, payload: list) -> None:
        node = self.host
        rows: dict[str, list] = {node.name: self._local_rows(msg.group)}
        others = [n for n in node.known_nodes() if n != node.name]
        state = {"left": len(others), "done": False}

        def finish() -> None:
            if not state["done"]:
                state["done"] = True
                node.reply(identity, P.OkReply(msg.req_id, {"groups": self._describe_doc(msg.group, rows)}))

        def on_reply(name: str, reply: Any, _payload: list) -> None:
            if isinstance(reply, G.LocalGroupsReply) and isinstance(reply.rows, list):
                rows[name] = [r for r in reply.rows if isinstance(r, dict)]
            state["left"] -= 1
            if state["left"] <= 0:
                finish()

        for name in others:
            node.request_peer(name, G.LocalGroupsRequest(node.next_req_id(), msg.group),
                              lambda r, pl, name=name: on_reply(name, r, pl), describe_wait_ms)
        if not others:
            finish()
        else:
            node.at(node.now_ms() + describe_wait_ms + 50, finish)

    def _describe_doc(self, only: str | None, rows_by_node: dict[str, list]) -> list[dict]:
        best: dict[tuple[str, str, int], dict] = {}
        for name in sorted(rows_by_node):
            for row in rows_by_node[name]:
                try:
                    k = (row["group"], row["topic"], row["partition"])
                except (KeyError, TypeError):
                    continue
                # Two nodes may both lead for a moment: the newer epoch, then the further commit wins.
                rank = (row.get("epoch") or 0, row.get("committed") if row.get("committed") is not None else -1)
                old = best.get(k)
                if old is None or rank > (old.get("epoch") or 0, old.get("committed") if old.get("committed") is not None else -1):
                    best[k] = row
        groups = set(self.memberships) | {g for g, _, _ in best}
        out = []
        for group in sorted(groups):
            if only is not None and group != only:
                continue
            m = self.memberships.get(group)
            members = []
            if m is not None:
                for member_id in sorted(m.live_members()):
                    members.append({"id": member_id, "partitions": [{"topic": t, "partition": p}
                                                                    for t, p in m.assignment_of(member_id)]})
            parts = [{k: v for k, v in row.items() if k not in ("group", "epoch", "dead_letter_due")}
                     for (g, _, _), row in sorted(best.items()) if g == group]
            out.append({"group": group, "generation": m.generation if m is not None else 0, "members": members,
                        "partitions": parts})
        return out


# ---------------------------------------------------------------------------- helpers


def dead_letter_producer_id(group: str, topic_id: int, partition: int, offset: int) -> int:
    """The idempotent producer id of the dead-letter copy of one source message: derived from the
    group and the source's topic id, partition and offset, so every writer of that copy (a retry,
    a later leader of the source partition) uses the same one; 63 bits, never 0 (not idempotent)."""
    digest = hashlib.blake2b(f"zq-dlq|{group}|{topic_id}|{partition}|{offset}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") & PRODUCER_ID_MAX) or 1


def _check_name(value: Any, what: str) -> None:
    chars_max = DEFAULT.group_name_chars_max   # the bound the wire check (zq.core.bounds) also reads
    if not isinstance(value, str) or not value or len(value) > chars_max:
        raise InvalidRequest(f"a {what} is a non-empty string of at most {chars_max} characters")


def _dumps(value: Any) -> bytes:
    return P.cbor_dumps(value)   # the codec stays in zq.protocol (cbor2, loaded at first use)


def _loads(frame: bytes) -> Any:
    try:
        return P.cbor_loads(bytes(frame))
    except Exception as e:   # cbor2 raises several types for garbage
        raise ProtocolError(f"a group frame is not valid CBOR ({e.__class__.__name__})") from None


def _frames_for(offsets: list[int], frames: dict[int, bytes]) -> list[bytes]:
    """The stored batches (by base offset) that hold any of `offsets`, in offset order."""
    bases = sorted(frames)
    out: list[bytes] = []
    wanted = sorted(offsets)
    i = 0
    for j, base in enumerate(bases):
        nxt = zbatch.unpack_header(frames[base]).next_offset
        while i < len(wanted) and wanted[i] < base:
            i += 1
        if i < len(wanted) and wanted[i] < nxt:
            out.append(frames[base])
    return out


def _encode_held(held: _Held) -> bytes:
    return _dumps(held.to_dict())


def _decode_held(raw: bytes) -> _Held:
    return _Held.from_dict(_loads(raw))
