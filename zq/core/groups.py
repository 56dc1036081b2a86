"""Consumer group membership: who is in a group, which generation it is in, who reads what.

Theory of operation
-------------------
Members join through any node, heartbeat, and leave; a member that stops heartbeating for its
session timeout is expired. Each node keeps a `GroupMembership` per group and gossips it; two
copies merge without coordination, and copies that have seen the same updates are equal, so
every node computes the same live members, generation and assignment once gossip converges.

Members. Per member id, a `MemberRecord`: `incarnation` (1 at the first join, one more at every
rejoin after leaving or after changing its subscription), its subscription (topics, session
timeout, static flag), `last_heartbeat_ms` and `left`. Records merge by incarnation (higher wins
whole); within one incarnation `left` by or, `last_heartbeat_ms` by max, and the subscription
by max (only two nodes racing to create the same incarnation can disagree). A member is live
iff its record is not `left`. Liveness is thus a function of the merged records, never of a
clock: the node that sees a session time out (`expire(now_ms)`) writes `left`, and gossip
carries that fact. Clocks matter only to the moment of expiry: a node whose clock runs ahead
expires a member early, which costs a rebalance and the member's rejoin, never a lost message.

A static member id is a member id the consumer keeps across restarts: rejoining under the same
id and subscription while its record is still live is just a heartbeat, so nothing changes and
no partition moves. A dynamic member uses a fresh id at every start.

Generation. Each node counts the changes to the live set (join, leave, expiry, new
subscription, new partition set) that it made itself: `changes[node_id]`, a version vector
merged by pointwise max. The generation is the vector's sum. So it never goes down, every
change made anywhere raises it once gossip carries it, and equal merged states have equal
generations, with no counter to agree on. Two nodes that change the group concurrently both
raise it; the merged copy is higher than either.

Assignment. `maybe_rebalance(partitions)` runs the sticky assignor over the live members, with
the previous assignment as the base, and records the result with its generation and partition
set in a register that merges by `(generation, partitions, assignment)`: the newest wins, and a
race between two nodes that computed a generation from different bases is settled the same way
everywhere. A member of another generation is fenced (`is_fenced`): its commits fail and it
must fetch the new assignment. Between a change and convergence two members may both think they
own a partition for a moment; delivery state tolerates that (an ack counts whoever sends it, and
at worst a message is delivered twice), which is the at-least-once contract.

Bounds: at most `members_max` live members per group; departed members' records are kept (so a
late copy cannot bring a member back from the dead) up to `departed_kept_max`, oldest dropped
first.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from zq.core.assignor import MemberInfo, assign
from zq.errors import InvalidRequest, ProtocolError

TP = tuple[str, int]


@dataclass(frozen=True, slots=True)
class MemberRecord:
    incarnation: int
    topics: tuple[str, ...]          # sorted
    session_timeout_ms: int
    static: bool
    last_heartbeat_ms: int
    left: bool = False

    @property
    def subscription(self) -> tuple[tuple[str, ...], int, bool]:
        return (self.topics, self.session_timeout_ms, self.static)


def merge_member(a: MemberRecord, b: MemberRecord) -> MemberRecord:
    if a.incarnation != b.incarnation:
        return a if a.incarnation > b.incarnation else b
    topics, timeout_ms, static = max(a.subscription, b.subscription)
    return MemberRecord(a.incarnation, topics, timeout_ms, static,
                        max(a.last_heartbeat_ms, b.last_heartbeat_ms), a.left or b.left)


@dataclass(frozen=True, slots=True, order=True)
class GroupAssignment:
    """The assignment of one generation over one partition set; ordered for merging."""

    generation: int
    partitions: tuple[TP, ...]
    members: tuple[tuple[str, tuple[TP, ...]], ...]   # sorted by member id

    def of(self, member_id: str) -> list[TP]:
        return next((list(tps) for m, tps in self.members if m == member_id), [])

    def as_dict(self) -> dict[str, list[TP]]:
        return {m: list(tps) for m, tps in self.members}


class GroupMembership:
    members_max = 1_000          # live members in one group
    departed_kept_max = 1_000    # records of members that left, kept against resurrection

    def __init__(self, group: str, node_id: str) -> None:
        self.group = group
        self.node_id = node_id
        self.records: dict[str, MemberRecord] = {}
        self.changes: dict[str, int] = {}
        self.assignment: GroupAssignment | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GroupMembership):
            return NotImplemented
        return (self.group, self.records, self.changes, self.assignment) == \
            (other.group, other.records, other.changes, other.assignment)

    def __repr__(self) -> str:
        return (f"GroupMembership({self.group!r}, generation={self.generation}, "
                f"live={sorted(self.live_members())}, changes={self.changes})")

    # ---- reading

    @property
    def generation(self) -> int:
        return sum(self.changes.values())

    def live_members(self) -> dict[str, MemberInfo]:
        return {m: MemberInfo(frozenset(r.topics)) for m, r in sorted(self.records.items()) if not r.left}

    def is_live(self, member_id: str) -> bool:
        r = self.records.get(member_id)
        return r is not None and not r.left

    def is_fenced(self, member_id: str, generation: int) -> bool:
        """True if `member_id` may not commit under `generation`: it is not a live member, or the
        generation is not the current one. See `is_ahead` to tell "stale member" (fatal: rejoin)
        from "this node has not heard of that generation yet" (retry shortly)."""
        return not self.is_live(member_id) or generation != self.generation

    def is_ahead(self, generation: int) -> bool:
        return generation > self.generation

    def assignment_of(self, member_id: str) -> list[TP]:
        if self.assignment is None or not self.is_live(member_id):
            return []
        return self.assignment.of(member_id)

    # ---- events

    def on_join(self, member_id: str, *, topics: Iterable[str], session_timeout_ms: int, static: bool,
                now_ms: int) -> int:
        """A member joins (or rejoins). Returns the generation it is now in."""
        if not member_id or session_timeout_ms <= 0:
            raise InvalidRequest("a member needs a non-empty id and a positive session timeout")
        subscription = (tuple(sorted(set(topics))), session_timeout_ms, static)
        r = self.records.get(member_id)
        if r is not None and not r.left and r.subscription == subscription:
            # The same member again (a static member after a restart, or a retried join): only
            # a heartbeat, so its partitions stay where they are.
            self.records[member_id] = replace(r, last_heartbeat_ms=max(r.last_heartbeat_ms, now_ms))
            return self.generation
        if r is None and len(self.live_members()) >= self.members_max:
            raise InvalidRequest(f"group {self.group} has {self.members_max} members, the most it takes")
        incarnation = 1 if r is None else r.incarnation + 1
        self.records[member_id] = MemberRecord(incarnation, *subscription, last_heartbeat_ms=now_ms)
        self._changed()
        return self.generation

    def on_heartbeat(self, member_id: str, now_ms: int) -> bool:
        """True if the member is live; False means it was expired or left and must join again."""
        r = self.records.get(member_id)
        if r is None or r.left:
            return False
        if now_ms > r.last_heartbeat_ms:
            self.records[member_id] = replace(r, last_heartbeat_ms=now_ms)
        return True

    def on_leave(self, member_id: str, now_ms: int) -> bool:
        r = self.records.get(member_id)
        if r is None or r.left:
            return False
        self.records[member_id] = replace(r, left=True, last_heartbeat_ms=max(r.last_heartbeat_ms, now_ms))
        self._changed()
        return True

    def expire(self, now_ms: int) -> list[str]:
        """Members whose session timed out: they are marked left. Returns their ids."""
        out = []
        for m, r in sorted(self.records.items()):
            if not r.left and now_ms >= r.last_heartbeat_ms + r.session_timeout_ms:
                self.records[m] = replace(r, left=True)
                out.append(m)
        if out:
            self._changed()
        return out

    def next_deadline_ms(self) -> int | None:
        """When the next session may time out, for the shell's timer."""
        times = [r.last_heartbeat_ms + r.session_timeout_ms for r in self.records.values() if not r.left]
        return min(times) if times else None

    def maybe_rebalance(self, partitions: Sequence[TP]) -> bool:
        """Bring the assignment up to the current generation and partition set. True if it changed.

        A new partition set (a topic created or grown) is itself a change of generation, so
        members holding the old assignment are fenced until they fetch the new one."""
        parts = tuple(sorted({(t, p) for t, p in partitions}))
        a = self.assignment
        if a is not None and a.generation == self.generation and a.partitions == parts:
            return False
        if a is not None and a.generation == self.generation:
            self._changed()
        previous = a.as_dict() if a is not None else {}
        result = assign(self.live_members(), parts, previous)
        self.assignment = GroupAssignment(self.generation, parts,
                                          tuple((m, tuple(tps)) for m, tps in sorted(result.items())))
        return True

    def _changed(self) -> None:
        self.changes[self.node_id] = self.changes.get(self.node_id, 0) + 1
        self._compact()

    def _compact(self) -> None:
        departed = sorted((r.last_heartbeat_ms, m) for m, r in self.records.items() if r.left)
        for _, m in departed[:max(0, len(departed) - self.departed_kept_max)]:
            del self.records[m]

    # ---- gossip

    def merge_from(self, other: GroupMembership) -> None:
        """Merge a gossiped copy of the same group into this one."""
        if other.group != self.group:
            raise ProtocolError(f"group state for {other.group!r} merged into {self.group!r}")
        for m, r in other.records.items():
            mine = self.records.get(m)
            self.records[m] = r if mine is None else merge_member(mine, r)
        for n, c in other.changes.items():
            self.changes[n] = max(self.changes.get(n, 0), c)
        if other.assignment is not None and (self.assignment is None or other.assignment > self.assignment):
            self.assignment = other.assignment
        self.records = dict(sorted(self.records.items()))
        self._compact()

    def copy(self) -> GroupMembership:
        out = GroupMembership(self.group, self.node_id)
        out.records, out.changes, out.assignment = dict(self.records), dict(self.changes), self.assignment
        return out

    def to_dict(self) -> dict[str, Any]:
        a = self.assignment
        return {
            "group": self.group,
            "members": [[m, r.incarnation, list(r.topics), r.session_timeout_ms, r.static, r.last_heartbeat_ms,
                         r.left] for m, r in sorted(self.records.items())],
            "changes": [[n, c] for n, c in sorted(self.changes.items())],
            "assignment": None if a is None else [
                a.generation, [list(tp) for tp in a.partitions],
                [[m, [list(tp) for tp in tps]] for m, tps in a.members]],
        }

    @classmethod
    def from_dict(cls, d: Any, node_id: str) -> GroupMembership:
        """A gossiped or stored copy, checked. Raises ProtocolError."""
        if not isinstance(d, dict) or set(d) != {"group", "members", "changes", "assignment"} \
                or not isinstance(d["group"], str):
            raise ProtocolError("group membership is not a map of group, members, changes and assignment")
        out = cls(d["group"], node_id)
        rows, changes = d["members"], d["changes"]
        if not isinstance(rows, list) or len(rows) > cls.members_max + cls.departed_kept_max:
            raise ProtocolError("group membership members is not a list of bounded length")
        for row in rows:
            out._load_member(row)
        if not isinstance(changes, list):
            raise ProtocolError("group membership changes is not a list")
        for row in changes:
            if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and _nat(row[1])) \
                    or row[0] in out.changes:
                raise ProtocolError("group membership changes rows are unique [node, count >= 0]")
            out.changes[row[0]] = row[1]
        out.assignment = _load_assignment(d["assignment"])
        return out

    def _load_member(self, row: Any) -> None:
        if not (isinstance(row, list) and len(row) == 7 and isinstance(row[0], str) and row[0]
                and _nat(row[1]) and row[1] >= 1 and isinstance(row[2], list)
                and all(isinstance(t, str) for t in row[2]) and _nat(row[3]) and row[3] > 0
                and type(row[4]) is bool and _nat(row[5]) and type(row[6]) is bool) or row[0] in self.records:
            raise ProtocolError("group membership member rows are unique "
                                "[id, incarnation, topics, session_timeout_ms, static, last_heartbeat_ms, left]")
        self.records[row[0]] = MemberRecord(row[1], tuple(sorted(set(row[2]))), row[3], row[4], row[5], row[6])


def membership_gossip_interval_ms(memberships: Iterable[GroupMembership], longest_ms: int, shortest_ms: int) -> int:
    """How often a node sends its membership copies: `longest_ms`, or a quarter of the shortest
    session timeout of a live member if that is sooner (never below `shortest_ms`).

    Every node expires every member, but hears of heartbeats sent to another node only by
    gossip: with a session timeout shorter than the gossip interval, the other nodes expired
    live members between two rounds, the members rejoined, and the group rebalanced without
    end (found by the groups simulator: 300 ms sessions, 500 ms gossip)."""
    interval = longest_ms
    for m in memberships:
        for r in m.records.values():
            if not r.left and r.session_timeout_ms // 4 < interval:
                interval = r.session_timeout_ms // 4
    return max(shortest_ms, interval)


def _nat(v: Any) -> bool:
    return type(v) is int and v >= 0


def _tp(v: Any) -> TP:
    if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and _nat(v[1])):
        raise ProtocolError("a partition in a group assignment is [topic, partition]")
    return (v[0], v[1])


def _load_assignment(v: Any) -> GroupAssignment | None:
    if v is None:
        return None
    if not (isinstance(v, list) and len(v) == 3 and _nat(v[0]) and isinstance(v[1], list)
            and isinstance(v[2], list)):
        raise ProtocolError("a group assignment is [generation, partitions, members]")
    members = []
    for row in v[2]:
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and isinstance(row[1], list)):
            raise ProtocolError("group assignment member rows are [id, partitions]")
        members.append((row[0], tuple(_tp(x) for x in row[1])))
    return GroupAssignment(v[0], tuple(_tp(x) for x in v[1]), tuple(sorted(members)))
