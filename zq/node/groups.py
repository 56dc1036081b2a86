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

Layout. The service is one object, `GroupService`, assembled from rooms of one job each, which
share its state (`zq.node.group_common.GroupServiceState`, with the timings, bounds and stored
forms): membership and fencing (zq/node/group_membership.py); delivery states, leases, acks and
the sweep (zq/node/group_delivery.py); persistence, state gossip and the majority read
(zq/node/group_replication.py); dead letters (zq/node/group_dead_letters.py); reset and describe
(zq/node/group_admin.py). This module builds the object and runs its life cycle and timers.
"""
from __future__ import annotations

import random
from typing import Any, Callable

from zq import group_protocol as G
from zq.core.groups import GroupMembership
from zq.core.retry import RetryPolicy
from zq.errors import ZqError
from zq.node.group_admin import AdminRoom
from zq.node.group_common import (STATE_KEY_PREFIX, Key, _decode_held, _Gather, _Held, _loads, _Parked,
                                  ack_items_max, batch_cache_max, dead_letter_wait_ms, describe_wait_ms,
                                  gather_wait_ms, gossip_items_per_message_max, groups_max, lease_bytes_max,
                                  lease_messages_max, lease_read_bytes, lease_wait_ms_max, log,
                                  membership_gossip_ms, membership_gossip_ms_min, parked_leases_max, persist_ms,
                                  reset_wait_ms, session_timeout_ms_max, session_timeout_ms_min, state_gossip_ms,
                                  state_key, states_max, sweep_ms, undecodable_logged_max, unknown_member_ms,
                                  unknown_members_max)
from zq.node.group_dead_letters import DeadLetterRoom, dead_letter_producer_id
from zq.node.group_delivery import DeliveryRoom
from zq.node.group_membership import MembershipRoom
from zq.node.group_replication import ReplicationRoom
from zq.node.services import ServiceHost

__all__ = ["GroupService", "Key", "STATE_KEY_PREFIX", "state_key", "dead_letter_producer_id",
           "ack_items_max", "batch_cache_max", "dead_letter_wait_ms", "describe_wait_ms", "gather_wait_ms",
           "gossip_items_per_message_max", "groups_max", "lease_bytes_max", "lease_messages_max",
           "lease_read_bytes", "lease_wait_ms_max", "membership_gossip_ms", "membership_gossip_ms_min",
           "parked_leases_max", "persist_ms", "reset_wait_ms", "session_timeout_ms_max", "session_timeout_ms_min",
           "state_gossip_ms", "states_max", "sweep_ms", "undecodable_logged_max", "unknown_member_ms",
           "unknown_members_max"]


class GroupService(MembershipRoom, DeliveryRoom, ReplicationRoom, DeadLetterRoom, AdminRoom):
    """One node's consumer groups service: its host calls `handlers[type(msg)]`, `tick`,
    `on_high_watermark` and `close` (it is a zq.node.services.Service)."""

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
