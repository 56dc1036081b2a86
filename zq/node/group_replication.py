"""The consumer groups service's replication room: delivery states persisted, sent to the
partition's other replicas and merged there, the acknowledgements a redelivery waits for, and a
new leader's majority read (zq/node/groups.py, "Persistence and replication" and "Quorum for
retries", tells how the service works). The majority is counted by zq.core.quorum.
"""
from __future__ import annotations

from typing import Any

from zq import group_protocol as G
from zq.core.groupstate import DeliveryState
from zq.core.quorum import has_majority
from zq.errors import ProtocolError, ZqError
from zq.node.group_common import (GroupServiceState, Key, _dumps, _encode_held, _Gather, _Held, _loads,
                                  gather_wait_ms, gossip_items_per_message_max, log, state_key, states_max)
from zq.types import TopicPartition


class ReplicationRoom(GroupServiceState):
    """Delivery states on disk and at a majority of the partition's replicas."""

    # ------------------------------------------------------------------ persistence

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
