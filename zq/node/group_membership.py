"""The consumer groups service's membership room: joins, heartbeats, leaves, session expiry, the
gossip of every group's membership between nodes, and the fencing of members a request names
(zq/node/groups.py, "Membership", tells how the service works). The rules are zq.core.groups
(`GroupMembership`) and zq.core.grouplead (`check_member`, `unknown_member`); this room feeds them
requests and time and carries out what they decide.
"""
from __future__ import annotations

from zq import protocol as P
from zq import group_protocol as G
from zq.core.grouplead import FENCED, check_member, unknown_member
from zq.core.groups import GroupMembership, membership_gossip_interval_ms
from zq.errors import Fenced, InvalidRequest, ProtocolError, RebalanceInProgress, ZqError
from zq.node.group_common import (GroupServiceState, _check_name, _dumps, _loads, gossip_items_per_message_max,
                                  groups_max, log, membership_gossip_ms, membership_gossip_ms_min,
                                  session_timeout_ms_max, session_timeout_ms_min, unknown_member_ms,
                                  unknown_members_max)


class MembershipRoom(GroupServiceState):
    """Who is in which group, and whether a member may lease or settle deliveries now."""

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
