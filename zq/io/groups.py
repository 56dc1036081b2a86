"""The node-side consumer groups service: membership, leases, acks, retries, dead letters, replay.

Theory of operation
-------------------
The rules live in two pure cores; this module feeds them messages and time and carries out
their effects. `zq.core.groups.GroupMembership` (one per group, on every node) says who is in a
group, its generation and who reads which partition; `zq.core.groupstate.DeliveryState` (one
per (group, partition), owned by the partition's leader) says which offsets are done, leased,
retrying or due for the dead-letter topic.

Membership. A consumer joins through any node and heartbeats there. Every node gossips its
copies of every group to every other node (`GroupGossip`) every `membership_gossip_ms`, and at
once after a change it made; receivers merge. The assignment is a deterministic function of the
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
the copy is acknowledged does `on_dead_lettered` mark the offset done. At most
`dead_letter_writes_max` copies per partition are in flight.

Persistence and replication. A state changed in a loop pass is written in that pass's write
transaction (not fsynced): replies go out as soon as they are ready, before the pass commits.
That is allowed here, unlike in replication, because of the lattice's argument (groupstate.py):
a lost update is a redelivery, never a loss. A copy of the dead-letter record is acknowledged by
its own quorum before the source counts as done, so that step never loses a message either. The
leader sends the states it changed to the partition's other replicas every `state_gossip_ms`
(`GroupStateGossip`); they merge and persist, and a new leader starts from its merged copy.

Reset (replay, seek): `ResetGroup` to any node goes on to each partition's leader, which opens a
new reset epoch at the target offset; the new epoch wins every merge.

Describe: the node asked gathers rows from every node (each answers for the partitions it
leads, within `describe_wait_ms`) and adds its own view of the membership.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import cbor2

from zq import batch as zbatch
from zq import protocol as P
from zq import group_protocol as G
from zq.core.groups import GroupMembership
from zq.core.groupstate import DLQ_NONE, DeadLetter, DeliveryState, Retry
from zq.core.repl_types import COMMITTED
from zq.core.retry import BackoffPolicy, RetryPolicy
from zq.errors import (Fenced, InvalidRequest, LeaderNotAvailable, NotLeader, ProtocolError, RebalanceInProgress,
                       UnknownPartition, ZqError)
from zq.types import TopicPartition

log = logging.getLogger("zq.groups")

# Timing.
membership_gossip_ms = 500        # every node sends its copies of every group this often
membership_gossip_ms_min = 20     # ... and after a change, but not more often than this
state_gossip_ms = 200             # a leader sends the delivery states it changed to their replicas
sweep_ms = 100                    # lease expiry, departed members' leases, dead letters
describe_wait_ms = 400            # how long `zq groups` waits for other nodes' rows
reset_wait_ms = 3_000             # how long a forwarded reset waits for a partition leader
dead_letter_wait_ms = 5_000       # a dead-letter copy sent to another node, unanswered by then, is tried again
# Bounds.
groups_max = 10_000               # groups one node keeps
states_max = 100_000              # delivery states one node keeps in memory
parked_leases_max = 10_000        # long-poll leases waiting at once
lease_messages_max = 5_000        # messages one lease may hand out
lease_bytes_max = 4 * 1024 * 1024  # stored batches one lease reply carries (one batch always fits)
lease_ms_min, lease_ms_max = 100, 12 * 3_600_000
lease_wait_ms_max = 30_000
session_timeout_ms_min, session_timeout_ms_max = 200, 30 * 60_000
ack_items_max = 100_000           # acked + nacks + extends in one Ack
reason_chars_max = 1_000          # a nack's reason is cut to this
dead_letter_writes_max = 4        # dead-letter copies in flight per partition
gossip_items_per_message_max = 256
name_chars_max = 200              # group and member ids

STATE_KEY_PREFIX = b"group/"      # store meta keys: STATE_KEY_PREFIX + CBOR [group, topic_id, partition]


def state_key(group: str, topic_id: int, partition: int) -> bytes:
    return STATE_KEY_PREFIX + cbor2.dumps([group, topic_id, partition])


Key = tuple[str, int, int]   # (group, topic id, partition)


@dataclass(slots=True)
class _Held:
    """A delivery state this node keeps, with what only the shell needs to know of it."""
    state: DeliveryState
    dead_lettered: int = 0            # copies acknowledged in TOPIC.dlq, for `zq groups`
    cursor: int = 0                   # offsets from here up have never been leased by this node
    dirty: bool = False               # to persist this pass
    changed: bool = False             # to gossip to the replicas
    maybe_retries: bool = True        # there may be offsets waiting to be retried
    dead_letters_in_flight: set[int] = field(default_factory=set)

    def recompute_cursor(self) -> None:
        st = self.state
        self.cursor = max(st.committed, max(st.offsets) + 1 if st.offsets else st.committed)
        self.maybe_retries = True


@dataclass(slots=True)
class _Parked:
    deadline_ms: int
    identity: bytes
    msg: G.Lease
    key: Key
    done: bool = False


class GroupService:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.memberships: dict[str, GroupMembership] = {}
        self.held: dict[Key, _Held] = {}
        self.parked: list[_Parked] = []
        self.rng = random.Random()
        self._policies: dict[int, tuple[tuple, RetryPolicy]] = {}
        self._next_sweep_ms = 0
        self._next_gossip_ms = 0
        self._next_state_gossip_ms = 0
        self._last_gossip_ms = 0
        self._gossip_soon = False
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
            G.LocalGroupsRequest: self.on_local_groups,
        }
        self._load()

    # ------------------------------------------------------------------ life cycle

    def _load(self) -> None:
        """Delivery states this node persisted, so that it can lead or describe them after a restart.

        Runs once, before the node's loop starts (the store's scan is not for the loop)."""
        loaded = 0
        for name, value in self.node.store.scan(b"M" + STATE_KEY_PREFIX):
            if loaded >= states_max:
                log.warning("more than %d group states stored; the rest load when they are used", states_max)
                break
            try:
                group, topic_id, partition = cbor2.loads(name[1 + len(STATE_KEY_PREFIX):])
                self.held[(group, topic_id, partition)] = _decode_held(value)
                loaded += 1
            except (ZqError, ValueError, TypeError, cbor2.CBORDecodeError) as e:
                log.warning("a stored group state is unreadable (%s); it is ignored", e)
        if loaded:
            log.info("loaded %d group delivery states", loaded)

    def start(self) -> None:
        """Nothing to start: timers run from tick()."""

    def close(self) -> None:
        self.parked.clear()

    def on_high_watermark(self, topic: str, partition: int, high_watermark: int) -> None:
        """New data is visible: leases waiting for it are answered in this pass, not the next."""
        if self.parked:
            self._serve_parked(self.node.now_ms())

    def tick(self, now_ms: int) -> None:
        """Every loop pass: cheap unless a timer is due or leases are parked."""
        if now_ms >= self._next_sweep_ms:
            self._next_sweep_ms = now_ms + sweep_ms
            self._expire_members()
            self._sweep()
        if self.parked:
            self._serve_parked(now_ms)
        if now_ms >= self._next_gossip_ms or (self._gossip_soon and now_ms >= self._last_gossip_ms + membership_gossip_ms_min):
            self._gossip_memberships(now_ms)
        if now_ms >= self._next_state_gossip_ms:
            self._next_state_gossip_ms = now_ms + state_gossip_ms
            self._gossip_states()
        self._persist()

    # ------------------------------------------------------------------ membership

    def _membership(self, group: str) -> GroupMembership:
        m = self.memberships.get(group)
        if m is None:
            if len(self.memberships) >= groups_max:
                raise InvalidRequest(f"this node keeps at most {groups_max} groups")
            m = self.memberships[group] = GroupMembership(group, self.node.name)
        return m

    def _partitions_of(self, m: GroupMembership) -> list[tuple[str, int]]:
        topics = sorted({t for r in m.records.values() if not r.left for t in r.topics})
        out = []
        for t in topics:
            tm = self.node.meta.topics.get(t)
            if tm is not None:
                out.extend((t, p) for p in range(len(tm.partitions)))
        return out

    def _rebalance(self, m: GroupMembership) -> None:
        if m.maybe_rebalance(self._partitions_of(m)):
            self.node.counters["group_rebalances"] += 1
            self._gossip_soon = True

    def _reply_assignment(self, identity: bytes, req_id: int, m: GroupMembership, member_id: str) -> None:
        parts = [[t, p] for t, p in m.assignment_of(member_id)]
        self.node.reply(identity, G.GroupReply(req_id, m.group, member_id, m.generation, parts))

    def on_join_group(self, identity: bytes, msg: G.JoinGroup, payload: list) -> None:
        _check_name(msg.group, "group")
        _check_name(msg.member_id, "member id")
        if not msg.topics or len(msg.topics) > 1_000 or not all(isinstance(t, str) for t in msg.topics):
            raise InvalidRequest("a member subscribes to 1 to 1000 topics, given by name")
        if not session_timeout_ms_min <= msg.session_timeout_ms <= session_timeout_ms_max:
            raise InvalidRequest(f"session timeout must be between {session_timeout_ms_min} and "
                                 f"{session_timeout_ms_max} ms, got {msg.session_timeout_ms}")
        for t in msg.topics:
            self.node.meta.topic(t)   # UnknownTopic, retriable: metadata may still be spreading
        m = self._membership(msg.group)
        before = m.generation
        m.on_join(msg.member_id, topics=msg.topics, session_timeout_ms=msg.session_timeout_ms, static=msg.static,
                  now_ms=self.node.wall_ms())
        self._rebalance(m)
        if m.generation != before:
            self._gossip_soon = True
            log.info("group %s: %s joined, generation %d", msg.group, msg.member_id, m.generation)
        self._reply_assignment(identity, msg.req_id, m, msg.member_id)

    def on_group_heartbeat(self, identity: bytes, msg: G.GroupHeartbeat, payload: list) -> None:
        m = self.memberships.get(msg.group)
        if m is None or msg.member_id not in m.records:
            if m is None or m.is_ahead(msg.generation):
                raise RebalanceInProgress(f"this node has not heard of generation {msg.generation} of group "
                                          f"{msg.group} yet; retry shortly")
            raise Fenced(f"member {msg.member_id} is not in group {msg.group}; join again")
        if not m.on_heartbeat(msg.member_id, self.node.wall_ms()):
            raise Fenced(f"member {msg.member_id} left group {msg.group} or its session expired; join again")
        self._rebalance(m)
        self._reply_assignment(identity, msg.req_id, m, msg.member_id)

    def on_leave_group(self, identity: bytes, msg: G.LeaveGroup, payload: list) -> None:
        m = self.memberships.get(msg.group)
        if m is not None and m.on_leave(msg.member_id, self.node.wall_ms()):
            self._rebalance(m)
            self._gossip_soon = True
            self._next_sweep_ms = 0   # fail its leases now rather than at their deadline
            log.info("group %s: %s left, generation %d", msg.group, msg.member_id, m.generation)
        self.node.reply(identity, P.OkReply(msg.req_id, {}))

    def _expire_members(self) -> None:
        now = self.node.wall_ms()
        for group in sorted(self.memberships):
            m = self.memberships[group]
            expired = m.expire(now)
            if expired:
                log.info("group %s: session of %s expired", group, ", ".join(expired))
                self.node.counters["group_sessions_expired"] += len(expired)
                self._rebalance(m)
                self._gossip_soon = True

    def on_group_gossip(self, identity: bytes, msg: G.GroupGossip, payload: list) -> None:
        try:
            if len(msg.groups) != len(payload) or len(payload) > groups_max:
                raise ProtocolError("GroupGossip names one group per payload frame")
            for frame in payload:
                other = GroupMembership.from_dict(_loads(frame), self.node.name)
                m = self._membership(other.group)
                before = (m.generation, m.assignment)
                m.merge_from(other)
                if (m.generation, m.assignment) != before:
                    self._rebalance(m)
                    self._next_sweep_ms = 0   # a member may have left: its leases fail now
        except ZqError as e:
            self.node.counters["protocol_errors"] += 1
            log.warning("dropped group gossip from %s: %s", msg.sender, e)

    def _gossip_memberships(self, now_ms: int) -> None:
        self._next_gossip_ms = now_ms + membership_gossip_ms
        self._last_gossip_ms = now_ms
        self._gossip_soon = False
        if not self.memberships:
            return
        names = sorted(self.memberships)
        frames = [cbor2.dumps(self.memberships[g].to_dict()) for g in names]
        for start in range(0, len(names), gossip_items_per_message_max):
            end = start + gossip_items_per_message_max
            msg = G.GroupGossip(0, self.node.name, names[start:end])
            for peer in self.node.known_nodes():
                if peer != self.node.name:
                    self.node.send_to_peer(peer, msg, *frames[start:end])

    # ------------------------------------------------------------------ fencing

    def _check_member(self, group: str, member_id: str, generation: int, tp: tuple[str, int], strict: bool) -> None:
        """Raise unless `member_id` may lease (strict) or settle deliveries of `tp` now."""
        m = self.memberships.get(group)
        r = m.records.get(member_id) if m is not None else None
        if m is None or r is None:
            if m is None or m.is_ahead(generation):
                raise RebalanceInProgress(f"the leader of {tp[0]}/{tp[1]} has not heard of member {member_id} "
                                          f"of group {group} yet; retry shortly")
            raise Fenced(f"member {member_id} is not in group {group}; join again")
        if r.left:
            raise Fenced(f"member {member_id} left group {group} or its session expired; join again")
        owns = tp in m.assignment_of(member_id)
        if strict and m.is_ahead(generation) or not owns and m.is_ahead(generation):
            raise RebalanceInProgress(f"group {group} is in generation {generation} for the member but "
                                      f"{m.generation} here; retry shortly")
        if strict and generation != m.generation:
            self.node.counters["group_fenced"] += 1
            raise Fenced(f"generation {generation} of group {group} is over (now {m.generation}); "
                         "fetch the new assignment", generation=m.generation)
        if not owns:
            self.node.counters["group_fenced"] += 1
            raise Fenced(f"{tp[0]}/{tp[1]} is not assigned to member {member_id} in generation {m.generation} "
                         f"of group {group}", generation=m.generation)

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
            raw = self.node.store.get_meta(state_key(*key))
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
            held = self.held[key] = _Held(DeliveryState(committed=offset), cursor=offset, dirty=True, changed=True)
        return held

    def _start_offset(self, topic: str, topic_id: int, partition: int, start: Any) -> int:
        log_start, hw = self.node.partition_bounds(topic, partition)
        if start == "latest":
            return hw
        if type(start) is int:
            found = self.node.store.offset_for_time(TopicPartition(topic_id, partition), start)
            return hw if found is None else min(max(found, log_start), hw)
        return log_start

    def _mark(self, held: _Held) -> None:
        held.dirty = True
        held.changed = True

    def _persist(self) -> None:
        txn = None
        for key, held in self.held.items():
            if held.dirty:
                held.dirty = False
                txn = txn or self.node.write()
                txn.put_meta(state_key(*key), _encode_held(held))

    # ------------------------------------------------------------------ leases

    def on_lease(self, identity: bytes, msg: G.Lease, payload: list) -> None:
        if not 1 <= msg.max_messages or msg.lease_ms < 1 or msg.max_wait_ms < 0:
            raise InvalidRequest("a lease asks for at least one message, a positive lease time and a wait >= 0")
        if not (msg.start in ("earliest", "latest") or (type(msg.start) is int and msg.start >= 0)):
            raise InvalidRequest("a lease's start is earliest, latest or a time in ms")
        t = self.node.meta.topic(msg.topic)
        self.node.partition_bounds(msg.topic, msg.partition)   # NotLeader, UnknownPartition
        self._check_member(msg.group, msg.member_id, msg.generation, (msg.topic, msg.partition), strict=True)
        key = (msg.group, t.id, msg.partition)
        self._held_or_new(key, lambda: self._start_offset(msg.topic, t.id, msg.partition, msg.start))
        self.node.counters["group_leases"] += 1
        if self._serve_lease(identity, msg, key):
            return
        wait_ms = min(msg.max_wait_ms, lease_wait_ms_max)
        if wait_ms <= 0 or len(self.parked) >= parked_leases_max:
            self._reply_empty(identity, msg, key)
            return
        self.parked.append(_Parked(self.node.now_ms() + wait_ms, identity, msg, key))

    def _reply_empty(self, identity: bytes, msg: G.Lease, key: Key) -> None:
        held = self.held.get(key)
        try:
            hw = self.node.partition_bounds(msg.topic, msg.partition)[1]
        except ZqError as e:
            self.node.reply_error(identity, msg.req_id, e)
            return
        self.node.reply(identity, G.LeaseReply(msg.req_id, held.state.reset_epoch if held else 0, [], hw))

    def _serve_lease(self, identity: bytes, msg: G.Lease, key: Key) -> bool:
        """Lease what may be delivered now and answer; False (nothing answered) when there is nothing."""
        held = self.held[key]
        st = held.state
        topic, p = msg.topic, msg.partition
        log_start, hw = self.node.partition_bounds(topic, p)
        now = self.node.wall_ms()
        if st.committed < log_start:
            st.skip_to(log_start)   # retention deleted what was below: it can no longer be delivered
            self._mark(held)
        held.cursor = max(held.cursor, st.committed)
        want = min(msg.max_messages, lease_messages_max)
        retries = self._due_retries(held, now, want)
        frames: dict[int, bytes] = {}
        for o in retries:
            for f in self.node.read_committed(topic, p, o, 1):
                frames.setdefault(zbatch.unpack_header(f).base_offset, f)
                break
        new: list[int] = []
        start = held.cursor
        end = min(hw, st.committed + st.offsets_tracked_max, start + want - len(retries))
        if start < end:
            control = False
            for f in self.node.read_committed(topic, p, start, lease_bytes_max):
                h = zbatch.unpack_header(f)
                if h.base_offset >= end:
                    break
                lo, hi = max(h.base_offset, start), min(h.next_offset, end)
                if h.flags & zbatch.FLAG_CONTROL:
                    for o in range(lo, hi):   # a leader's epoch marker: no record to deliver, done at once
                        control |= st.ack(o)
                else:
                    frames.setdefault(h.base_offset, f)
                    new.extend(range(lo, hi))
                held.cursor = hi
            if control:
                st.maybe_advance_committed()
                self._mark(held)
        if not retries and not new:
            return False
        owner = msg.member_id
        lease_ms = min(max(msg.lease_ms, lease_ms_min), lease_ms_max)
        deliveries = st.lease(retries + new, owner, now + lease_ms, now)
        if not deliveries:
            return False
        self._mark(held)
        flat: list[int] = []
        redelivered = 0
        for d in deliveries:
            flat.append(d.offset)
            flat.append(d.attempt)
            redelivered += d.attempt > 1
        needed = _frames_for([d.offset for d in deliveries], frames)
        self.node.counters["group_delivered"] += len(deliveries)
        self.node.counters["group_redelivered"] += redelivered
        self.node.reply(identity, G.LeaseReply(msg.req_id, st.reset_epoch, flat, hw), *needed)
        return True

    def _due_retries(self, held: _Held, now: int, want: int) -> list[int]:
        if not held.maybe_retries:
            return []
        out = []
        any_retrying = False
        for o, e in held.state.offsets.items():
            if e.failures > 0 and not e.in_progress and not e.done and e.dead_letter == DLQ_NONE:
                any_retrying = True
                if e.next_visible_ms <= now:
                    out.append(o)
        held.maybe_retries = any_retrying
        out.sort()
        return out[:want]

    def _serve_parked(self, now_ms: int) -> None:
        keep = []
        wall = self.node.wall_ms()
        for parked in self.parked:
            msg = parked.msg
            held = self.held.get(parked.key)
            try:
                if held is None:
                    raise LeaderNotAvailable(f"the group state of {msg.topic}/{msg.partition} was dropped; retry")
                hw = self.node.partition_bounds(msg.topic, msg.partition)[1]
                # The member may have left, or lost the partition, while its lease waited: serving it
                # then would lease messages to nobody, and their expiry would count as failed attempts.
                self._check_member(msg.group, msg.member_id, msg.generation, (msg.topic, msg.partition), strict=True)
                ready = hw > max(held.cursor, held.state.committed) or (held.maybe_retries and self._retry_due(held, wall))
                if ready and self._serve_lease(parked.identity, msg, parked.key):
                    continue
            except ZqError as e:   # leadership moved, topic deleted: the member learns where to go
                self.node.reply_error(parked.identity, msg.req_id, e)
                continue
            if now_ms >= parked.deadline_ms:
                self._reply_empty(parked.identity, msg, parked.key)
                continue
            keep.append(parked)
        self.parked = keep

    @staticmethod
    def _retry_due(held: _Held, now: int) -> bool:
        return any(e.failures > 0 and not e.in_progress and not e.done and e.dead_letter == DLQ_NONE
                   and e.next_visible_ms <= now for e in held.state.offsets.values())

    # ------------------------------------------------------------------ acks

    def on_ack(self, identity: bytes, msg: G.Ack, payload: list) -> None:
        if len(msg.acked) + len(msg.nacks) + len(msg.extends) > ack_items_max:
            raise InvalidRequest(f"an Ack carries at most {ack_items_max} items")
        t = self.node.meta.topic(msg.topic)
        self.node.partition_bounds(msg.topic, msg.partition)
        self._check_member(msg.group, msg.member_id, msg.generation, (msg.topic, msg.partition), strict=False)
        key = (msg.group, t.id, msg.partition)
        held = self._held_or_new(key, lambda: self._start_offset(msg.topic, t.id, msg.partition, "earliest"))
        st = held.state
        epoch = msg.reset_epoch
        now = self.node.wall_ms()
        counters = self.node.counters
        acked = 0
        for o in msg.acked:
            if type(o) is not int:
                raise ProtocolError("Ack.acked holds offsets")
            acked += st.ack(o, epoch)
        counters["group_acks"] += acked
        dead = False
        policy = self._policy(t) if msg.nacks else None
        for row in msg.nacks:
            if not (isinstance(row, list) and len(row) == 4 and type(row[0]) is int and type(row[1]) is int
                    and (row[2] is None or type(row[2]) is int) and isinstance(row[3], str)):
                raise ProtocolError("Ack.nacks rows are [offset, attempt, delay_ms|null, reason]")
            effect = st.nack(row[0], reason=row[3][:reason_chars_max], now_ms=now, policy=policy,
                             rnd=self.rng.random(), delay_ms=row[2], attempt=row[1], epoch=epoch)
            counters["group_nacks"] += effect is not None
            dead |= self._count_effect(held, effect)
        for row in msg.extends:
            if not (isinstance(row, list) and len(row) == 2 and type(row[0]) is int and type(row[1]) is int):
                raise ProtocolError("Ack.extends rows are [offset, lease_ms]")
            st.extend(row[0], msg.member_id, now + min(max(row[1], lease_ms_min), lease_ms_max), now, epoch)
        st.maybe_advance_committed()
        self._mark(held)
        self.node.reply(identity, P.OkReply(msg.req_id, {"committed": st.committed, "epoch": st.reset_epoch}))
        if dead:
            self._start_dead_letters(key, held)

    def _count_effect(self, held: _Held, effect: Any) -> bool:
        """Count a Retry or DeadLetter; True for a dead letter."""
        if isinstance(effect, Retry):
            held.maybe_retries = True
            self.node.counters["group_retries"] += 1
        elif isinstance(effect, DeadLetter):
            self.node.counters["group_dead_letters_due"] += 1
            return True
        return False

    # ------------------------------------------------------------------ the sweep

    def _sweep(self) -> None:
        now = self.node.wall_ms()
        for key in sorted(self.held):
            held = self.held[key]
            group, topic_id, p = key
            t = self.node.meta.topics_by_id.get(topic_id)
            if t is None:
                continue   # not applied yet here, or deleted (the store dropped its data)
            if not self.node.leads(t.name, p):
                continue
            st = held.state
            policy = self._policy(t)
            dead = False
            effects = st.expire(now, policy, self.rng.random())
            if effects:
                self.node.counters["group_lease_expiries"] += len(effects)
            for effect in effects:
                dead |= self._count_effect(held, effect)
            dead |= self._fail_departed(group, (t.name, p), held, now, policy)
            if effects or dead:
                st.maybe_advance_committed()
                self._mark(held)
            if dead or held.dead_letters_in_flight or any(e.dead_letter != DLQ_NONE and not e.done
                                                          for e in st.offsets.values()):
                self._start_dead_letters(key, held)

    def _fail_departed(self, group: str, tp: tuple[str, int], held: _Held, now: int, policy: RetryPolicy) -> bool:
        """Leases held by members known to have left, or that lost the partition in a rebalance,
        fail now: their acks would be fenced anyway, so waiting for the lease deadline would only
        delay the redelivery to the partition's new owner."""
        m = self.memberships.get(group)
        if m is None or m.assignment is None or m.assignment.generation != m.generation:
            return False   # no settled view of the group here yet: leave the leases to their deadlines
        dead = False
        for o, e in list(held.state.offsets.items()):
            if e.in_progress and e.lease is not None and not e.done:
                r = m.records.get(e.lease.owner)
                if r is not None and (r.left or tp not in m.assignment_of(e.lease.owner)):
                    why = "left the group" if r.left else "lost the partition in a rebalance"
                    effect = held.state.nack(o, reason=f"member {e.lease.owner} {why}", now_ms=now,
                                             policy=policy, rnd=self.rng.random(), attempt=e.attempts)
                    self.node.counters["group_departed_leases"] += effect is not None
                    dead |= self._count_effect(held, effect)
                    self._mark(held)
        return dead

    # ------------------------------------------------------------------ dead letters

    def _start_dead_letters(self, key: Key, held: _Held) -> None:
        if len(held.dead_letters_in_flight) >= dead_letter_writes_max:
            return
        for d in held.state.pending_dead_letters():
            if len(held.dead_letters_in_flight) >= dead_letter_writes_max:
                break
            if d.offset not in held.dead_letters_in_flight:
                self._write_dead_letter(key, held, d)

    def _write_dead_letter(self, key: Key, held: _Held, d: DeadLetter) -> None:
        group, topic_id, p = key
        node = self.node
        t = node.meta.topics_by_id.get(topic_id)
        if t is None:
            return
        source = self._source_record(t.name, p, d.offset)
        dlq = node.meta.topics.get(t.name + ".dlq")
        if source is None or dlq is None:
            # Retention deleted the message, or it has no dead-letter topic (it is one): nothing
            # can be copied, so the group moves on, loudly.
            log.warning("group %s: %s/%d offset %d cannot be dead-lettered (%s); skipped", group, t.name, p,
                        d.offset, "no longer stored" if source is None else f"no topic {t.name}.dlq")
            node.counters["group_dead_letters_skipped"] += 1
            self._on_dead_letter_written(key, d.offset, True, counted=False)
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
        held.dead_letters_in_flight.add(d.offset)
        if node.leads(dlq.name, dp):
            def local_done(outcome: Any) -> None:
                ok = not isinstance(outcome, ZqError) and getattr(outcome, "status", None) == COMMITTED
                self._on_dead_letter_written(key, d.offset, ok)
            node.produce_local(dlq.name, dp, [record], local_done, acks_quorum=True)
            return
        leader = node.leader_address(dlq.name, dp)[0]
        if leader is None:
            held.dead_letters_in_flight.discard(d.offset)   # the next sweep tries again
            return
        blob = zbatch.encode_records([record])
        request = P.Produce(node.next_req_id(), dlq.name, dp, 2, 1, zbatch.crc(blob), 0, 0, 0)
        self._request_with_frames(leader, request, [blob], lambda reply, _: self._on_dead_letter_written(
            key, d.offset, isinstance(reply, P.ProduceReply)))

    def _source_record(self, topic: str, partition: int, offset: int) -> Any:
        for value in self.node.read_committed(topic, partition, offset, 1):
            for rec in zbatch.iter_records(value, offset):
                if rec.offset == offset:
                    return rec
            break
        return None

    def _on_dead_letter_written(self, key: Key, offset: int, ok: bool, counted: bool = True) -> None:
        held = self.held.get(key)
        if held is None:
            return
        held.dead_letters_in_flight.discard(offset)
        if not ok:
            self.node.counters["group_dead_letter_failures"] += 1
            return   # the sweep tries again
        if held.state.on_dead_lettered(offset):
            if counted:
                held.dead_lettered += 1
                self.node.counters["group_dead_letters"] += 1
            held.state.maybe_advance_committed()
            self._mark(held)

    def _request_with_frames(self, name: str, msg: Any, frames: list[bytes], on_reply: Callable[[Any, list], None]) -> None:
        """A request to a peer with payload frames (a Produce of dead letters to a remote leader)."""
        self.node.request_peer(name, msg, on_reply, dead_letter_wait_ms, frames=frames)

    # ------------------------------------------------------------------ replication of states

    def _gossip_states(self) -> None:
        node = self.node
        out: dict[str, list[tuple[list, bytes]]] = {}
        for key in sorted(self.held):
            held = self.held[key]
            if not held.changed:
                continue
            held.changed = False
            group, topic_id, p = key
            t = node.meta.topics_by_id.get(topic_id)
            if t is None or p >= len(t.partitions):
                continue
            frame = cbor2.dumps(held.state.to_dict())
            for peer in t.partitions[p]:
                if peer != node.name:
                    out.setdefault(peer, []).append(([group, topic_id, p, held.dead_lettered], frame))
        for peer in sorted(out):
            items = out[peer]
            for start in range(0, len(items), gossip_items_per_message_max):
                chunk = items[start:start + gossip_items_per_message_max]
                node.send_to_peer(peer, G.GroupStateGossip(0, node.name, [i for i, _ in chunk]), *[f for _, f in chunk])

    def on_group_state_gossip(self, identity: bytes, msg: G.GroupStateGossip, payload: list) -> None:
        try:
            if len(msg.items) != len(payload):
                raise ProtocolError("GroupStateGossip carries one payload frame per item")
            for item, frame in zip(msg.items, payload):
                if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str)
                        and all(type(x) is int and x >= 0 for x in item[1:])):
                    raise ProtocolError("GroupStateGossip items are [group, topic_id, partition, dead_lettered]")
                group, topic_id, p, dead_lettered = item
                t = self.node.meta.topics_by_id.get(topic_id)
                if t is None or p >= len(t.partitions):
                    continue   # a topic this node has not applied yet: the next round brings it again
                other = DeliveryState.from_dict(_loads(frame))
                key = (group, topic_id, p)
                held = self._held(key)
                if held is None:
                    if len(self.held) >= states_max:
                        continue
                    held = self.held[key] = _Held(other)
                    held.recompute_cursor()
                else:
                    before = held.state.reset_epoch
                    held.state.merge_from(other)
                    if held.state.reset_epoch != before:
                        held.recompute_cursor()
                    else:
                        held.cursor = max(held.cursor, held.state.committed)
                        held.maybe_retries = True
                held.dead_lettered = max(held.dead_lettered, dead_lettered)
                held.dirty = True
        except ZqError as e:
            self.node.counters["protocol_errors"] += 1
            log.warning("dropped group state gossip from %s: %s", msg.sender, e)

    # ------------------------------------------------------------------ reset

    def on_reset_group(self, identity: bytes, msg: G.ResetGroup, payload: list) -> None:
        chosen = (msg.to_offset is not None) + (msg.to_time_ms is not None) + bool(msg.earliest)
        if chosen != 1:
            raise InvalidRequest("a reset goes to exactly one of an offset, a time or the earliest offset")
        if (msg.to_offset is not None and msg.to_offset < 0) or (msg.to_time_ms is not None and msg.to_time_ms < 0):
            raise InvalidRequest("offsets and times are >= 0")
        _check_name(msg.group, "group")
        t = self.node.meta.topic(msg.topic)
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
                self.node.reply_error(identity, msg.req_id, errors[0])
            elif missing:
                self.node.reply_error(identity, msg.req_id, LeaderNotAvailable(
                    f"the leaders of partitions {missing} did not answer; retry the reset"))
            else:
                self.node.reply(identity, P.OkReply(msg.req_id, {
                    "group": msg.group, "topic": msg.topic,
                    "partitions": [{"partition": p, "offset": results[p][0], "epoch": results[p][1]}
                                   for p in sorted(results)]}))

        def done(p: int, result: Any) -> None:
            results[p] = result
            state["left"] -= 1
            if state["left"] <= 0:
                finish()

        for p in partitions:
            if self.node.leads(msg.topic, p):
                try:
                    done(p, self._reset_local(msg, t, p))
                except ZqError as e:
                    done(p, e)
            elif msg.forwarded:
                done(p, self._not_leader(msg.topic, p))
            else:
                self._forward_reset(msg, p, done)
        if not state["done"]:
            self.node.at(self.node.now_ms() + reset_wait_ms + 100, finish)

    def _not_leader(self, topic: str, p: int) -> ZqError:
        leader, address = self.node.leader_address(topic, p)
        if leader is None or leader == self.node.name:
            return LeaderNotAvailable(f"{topic}/{p} has no leader right now; retry shortly")
        return NotLeader(f"{self.node.name} does not lead {topic}/{p}; {leader} does", leader=leader,
                         address=address or "")

    def _forward_reset(self, msg: G.ResetGroup, p: int, done: Callable[[int, Any], None]) -> None:
        leader = self.node.leader_address(msg.topic, p)[0]
        if leader is None or leader == self.node.name:
            done(p, LeaderNotAvailable(f"{msg.topic}/{p} has no leader right now; retry shortly"))
            return
        forwarded = G.ResetGroup(self.node.next_req_id(), msg.group, msg.topic, p, msg.to_offset, msg.to_time_ms,
                                 msg.earliest, True)

        def on_reply(reply: Any, _payload: list) -> None:
            if isinstance(reply, P.OkReply):
                rows = reply.data.get("partitions") or [{}]
                done(p, (rows[0].get("offset"), rows[0].get("epoch", 0)))
            else:
                done(p, reply if isinstance(reply, ZqError) else ProtocolError("unexpected reply to a reset"))

        self.node.request_peer(leader, forwarded, on_reply, reset_wait_ms)

    def _reset_local(self, msg: G.ResetGroup, t: Any, p: int) -> tuple[int, int]:
        """(offset the group now starts at, the reset epoch that opened)."""
        log_start, hw = self.node.partition_bounds(t.name, p)
        if msg.earliest:
            target = log_start
        elif msg.to_time_ms is not None:
            found = self.node.store.offset_for_time(TopicPartition(t.id, p), msg.to_time_ms)
            target = hw if found is None else min(max(found, log_start), hw)
        else:
            target = min(max(msg.to_offset, log_start), hw)
        key = (msg.group, t.id, p)
        held = self._held_or_new(key, lambda: target)
        held.state.reset(target)
        held.cursor = target
        held.maybe_retries = False
        self._mark(held)
        self.node.counters["group_resets"] += 1
        log.info("group %s: %s/%d reset to offset %d (epoch %d)", msg.group, t.name, p, target, held.state.reset_epoch)
        return target, held.state.reset_epoch

    # ------------------------------------------------------------------ describe

    def on_local_groups(self, identity: bytes, msg: G.LocalGroupsRequest, payload: list) -> None:
        self.node.reply(identity, G.LocalGroupsReply(msg.req_id, self.node.name, self._local_rows(msg.group)))

    def _local_rows(self, only: str | None) -> list[dict]:
        """Rows for the (group, partition) pairs whose partition this node leads."""
        node = self.node
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
        log_start, hw = self.node.partition_bounds(topic, p)
        committed = held.state.committed if held is not None else None
        position = max(log_start, committed if committed is not None else log_start)
        lag = max(0, hw - position)
        lag_seconds = 0.0
        if lag:
            for value in self.node.read_committed(topic, p, position, 1):
                lag_seconds = round(max(0, now - zbatch.unpack_header(value).append_time_ms) / 1000.0, 3)
                break
        stats = held.state.stats() if held is not None else None
        return {"group": group, "topic": topic, "partition": p, "committed": committed, "lag": lag,
                "lag_seconds": lag_seconds, "in_flight": stats.in_flight if stats else 0,
                "retrying": stats.retrying if stats else 0,
                "dead_letter_due": stats.dead_letter_due if stats else 0,
                "dead_lettered": held.dead_lettered if held is not None else 0,
                "epoch": held.state.reset_epoch if held is not None else 0, "leader": self.node.name}

    def metrics_rows(self) -> list[dict]:
        """Consumer lag and delivery state of the (group, partition) pairs this node leads, for the
        node's /metrics snapshot (called on the loop thread about once a second)."""
        return self._local_rows(None)

    def on_describe_groups(self, identity: bytes, msg: G.DescribeGroups, payload: list) -> None:
        node = self.node
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


def install(node: Any) -> GroupService:
    """Called by the node (NodeConfig.services) before its loop starts."""
    service = GroupService(node)
    node.add_service(service)
    return service


def _check_name(value: Any, what: str) -> None:
    if not isinstance(value, str) or not value or len(value) > name_chars_max:
        raise InvalidRequest(f"a {what} is a non-empty string of at most {name_chars_max} characters")


def _loads(frame: bytes) -> Any:
    try:
        return cbor2.loads(bytes(frame))
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
    return cbor2.dumps({"s": held.state.to_dict(), "dl": held.dead_lettered})


def _decode_held(raw: bytes) -> _Held:
    d = _loads(raw)
    if not isinstance(d, dict) or "s" not in d:
        raise ProtocolError("a stored group state is a map with the state under 's'")
    held = _Held(DeliveryState.from_dict(d["s"]), dead_lettered=int(d.get("dl", 0)))
    held.recompute_cursor()
    return held
