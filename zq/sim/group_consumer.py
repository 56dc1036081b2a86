"""The simulated consumer of the groups simulator (zq/sim/groups.py): the rules of the client
(zq/client/groups.py) modelled one for one, speaking the real group_protocol messages to the real
service (see the simulator's theory of operation, "Consumers"). `ConsumerModel` is a part of
`GroupSim`: it uses the simulator's clock, heap, rng, network and checker."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from zq import batch as zbatch
from zq import group_protocol as G
from zq import protocol as P
from zq.core.grouplead import FENCED
from zq.sim.checks import Violation
from zq.sim.group_host import NODES, TOPIC, TOPIC_ID
from zq.types import TopicPartition

# Consumer timing, as zq/client/groups.py.
ACK_FLUSH_MS = 20
ACK_RETRY_MS_MAX = 8_000     # an Ack refused for a passing reason is sent again, with backoff, this long
RETRY_BACKOFF_MS = 100
RETRY_BACKOFF_MS_MAX = 500
EMPTY_LEASE_BACKOFF_MS = 20
LEASE_ASK_MAX = 2_500         # messages one lease asks for (the client's lease_messages_max)
REQUEST_TIMEOUT_MS = 1_000
MAX_WAIT_MS = 200


class Refused(Exception):
    """An error reply: kind is fenced, rebalance_in_progress, not_leader, leader_not_available, timeout."""

    def __init__(self, kind: str, hint: str | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.hint = hint


# ---------------------------------------------------------------------------- replies, as the consumer sees them


@dataclass(frozen=True, slots=True)
class Reply:
    req_id: int
    error: Refused | None = None
    generation: int = 0
    partitions: tuple = ()
    epoch: int = 0
    deliveries: tuple = ()      # ((offset, attempt), ...)


# ---------------------------------------------------------------------------- consumers


@dataclass
class Member:
    endpoint: str           # unique per start: replies to an earlier start of the same member are lost
    member_id: str
    group: str
    static: bool
    heartbeat_ms: int
    coordinator: int = 0
    generation: int = 0
    joined: bool = False
    alive: bool = True
    leaving: bool = False
    hb_failures: int = 0
    assigned: set[int] = field(default_factory=set)
    leasing: set[int] = field(default_factory=set)
    paused: dict[int, None] = field(default_factory=dict)   # in the order they paused
    failures: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    epochs: dict[int, int] = field(default_factory=dict)
    arrived: deque = field(default_factory=deque)      # (p, epoch, ((offset, attempt), ...))
    ready: deque = field(default_factory=deque)        # (p, epoch, offset, attempt)
    busy: bool = False
    pending: dict[tuple[int, int], tuple[list, list, list]] = field(default_factory=dict)
    flush_scheduled: bool = False
    leaders: dict[int, str] = field(default_factory=dict)
    requests: dict[int, tuple[str, Any]] = field(default_factory=dict)


class ConsumerModel:
    """The consumers' half of GroupSim."""


    def start_member(self, group: str, static: bool, member_id: str | None = None) -> Member:
        self.member_starts += 1
        endpoint = f"c{self.member_starts}"
        m = Member(endpoint, member_id or f"m{self.member_starts}", group, static,
                   heartbeat_ms=max(50, self.s.session_timeout_ms // 4), coordinator=self.rng.randrange(len(NODES)))
        self.members[endpoint] = m
        self.say(f"start {endpoint} as {m.member_id} in {group}{' (static)' if static else ''}")
        self.send_join(m)
        return m

    def crash_member(self, m: Member) -> None:
        m.alive = False
        self.result.member_crashes += 1
        self.say(f"crash {m.endpoint} ({m.member_id})")

    def leave_member(self, m: Member) -> None:
        """close(): flush what is settled, then leave (the leases it holds fail at once)."""
        m.leaving = True
        self.flush(m)
        self.at(self.now + ACK_FLUSH_MS, "member_timer", m.endpoint, "leave", None)

    def request(self, m: Member, node: str, kind: str, ctx: Any, timeout_ms: int, **f: Any) -> None:
        """A real group_protocol request to a node, as the client sends it."""
        self.next_req += 1
        rid = self.next_req
        m.requests[rid] = (kind, ctx)
        if kind == "join":
            msg: Any = G.JoinGroup(rid, m.group, m.member_id, [TOPIC], self.s.session_timeout_ms, f.get("static", False))
        elif kind == "heartbeat":
            msg = G.GroupHeartbeat(rid, m.group, m.member_id, f["generation"])
        elif kind == "leave":
            msg = G.LeaveGroup(rid, m.group, m.member_id)
        elif kind == "lease":
            msg = G.Lease(rid, m.group, m.member_id, f["generation"], TOPIC, f["partition"], f["max_messages"],
                          self.s.lease_ms, MAX_WAIT_MS, "earliest")
            self.lease_asks[(m.endpoint, rid)] = (m.group, f["partition"])
        else:
            msg = G.Ack(rid, m.group, m.member_id, f["generation"], TOPIC, f["partition"], f["epoch"], list(f["acked"]),
                        [list(n) for n in f["nacks"]], [list(e) for e in f["extends"]])
        self.send(m.endpoint, node, "request", msg)
        self.at(self.now + timeout_ms, "member_timer", m.endpoint, "timeout", rid)

    def ev_member_timer(self, endpoint: str, what: str, arg: Any) -> None:
        m = self.members[endpoint]
        if not m.alive:
            return
        if what == "timeout":
            if arg in m.requests:
                kind, ctx = m.requests.pop(arg)
                self.on_answer(m, kind, ctx, None, Refused("timeout"))
        elif what == "heartbeat":
            self.send_heartbeat(m, regular=True)
        elif what == "lease":
            self.lease(m, arg)
        elif what == "flush":
            self.flush(m)
        elif what == "ack_retry":
            p, epoch, items, attempt, first_ms = arg
            self.send_ack(m, p, epoch, items, attempt, first_ms)
        elif what == "rejoin":
            self.send_join(m, arg)
        elif what == "handled":
            self.handled(m, arg)
        elif what == "leave":
            m.alive = False
            self.request(m, NODES[m.coordinator], "leave", None, REQUEST_TIMEOUT_MS)

    def on_reply(self, m: Member, msg: Any, frames: tuple) -> None:
        entry = m.requests.pop(getattr(msg, "req_id", -1), None)
        if entry is None:
            return   # a duplicate, or an answer after the timeout
        kind, ctx = entry
        if isinstance(msg, P.ErrorReply):
            error = Refused(msg.code, hint=msg.data.get("leader"))
            return self.on_answer(m, kind, ctx, Reply(msg.req_id, error), error)
        if isinstance(msg, G.GroupReply):
            reply = Reply(msg.req_id, generation=msg.generation, partitions=tuple(p for _t, p in msg.partitions))
        elif isinstance(msg, G.LeaseReply):
            pairs = tuple(zip(msg.deliveries[::2], msg.deliveries[1::2]))
            carried = {r.offset for f in frames for r in zbatch.iter_records(f)}
            if not {o for o, _a in pairs} <= carried:
                raise Violation("leased records travel with the lease", f"{msg} lacks some of its records")
            reply = Reply(msg.req_id, epoch=msg.reset_epoch, deliveries=pairs)
        elif isinstance(msg, P.OkReply):
            reply = Reply(msg.req_id, epoch=msg.data.get("epoch", 0))
        else:
            raise Violation("answers of the right kind", f"{kind} answered with {msg}")
        self.on_answer(m, kind, ctx, reply, None)

    def on_answer(self, m: Member, kind: str, ctx: Any, reply: Reply | None, error: Refused | None) -> None:
        getattr(self, "answer_" + kind)(m, ctx, reply, error)

    # ---- membership

    def send_join(self, m: Member, node: int | None = None) -> None:
        if node is not None:
            m.coordinator = node
        self.request(m, NODES[m.coordinator], "join", m.coordinator, REQUEST_TIMEOUT_MS,
                     static=m.static)

    def answer_join(self, m: Member, node: int, reply: Reply | None, error: Refused | None) -> None:
        if error is None and reply is not None:
            m.coordinator = node
            m.joined = True
            self.apply_assignment(m, reply)
            self.at(self.now + m.heartbeat_ms, "member_timer", m.endpoint, "heartbeat", None)
            return
        # _join tries the nodes in turn; _io_rejoin retries the same one after retry_backoff_ms.
        nxt = (node + 1) % len(NODES) if not m.joined else node
        self.at(self.now + RETRY_BACKOFF_MS, "member_timer", m.endpoint, "rejoin", nxt)

    def send_heartbeat(self, m: Member, regular: bool) -> None:
        if m.leaving:
            return
        timeout = m.heartbeat_ms + 1_000 if regular else REQUEST_TIMEOUT_MS
        self.request(m, NODES[m.coordinator], "heartbeat", (m.coordinator, regular), timeout,
                     generation=m.generation)

    def answer_heartbeat(self, m: Member, ctx: tuple[int, bool], reply: Reply | None, error: Refused | None) -> None:
        node, regular = ctx
        if not regular:   # _io_heartbeat_once: only a reply matters
            if error is None and reply is not None:
                self.apply_assignment(m, reply)
            return
        delay = m.heartbeat_ms
        if error is None and reply is not None:
            m.hb_failures = 0
            self.apply_assignment(m, reply)
        elif error.kind == FENCED:
            self.send_join(m, node)
            return
        else:
            m.hb_failures += 1
            if error.kind == "timeout" or m.hb_failures >= 3:
                m.coordinator = (node + 1) % len(NODES)
            delay = min(m.heartbeat_ms, RETRY_BACKOFF_MS * m.hb_failures)
        self.at(self.now + delay, "member_timer", m.endpoint, "heartbeat", None)

    def apply_assignment(self, m: Member, reply: Reply) -> None:
        parts = set(reply.partitions)
        added = parts - m.assigned
        m.generation = reply.generation
        m.assigned = parts
        for p in sorted(added):
            m.failures[p] = 0
            self.lease(m, p)

    def answer_leave(self, m: Member, ctx: Any, reply: Reply | None, error: Refused | None) -> None:
        pass

    # ---- leasing

    def lease_size(self, m: Member) -> int:
        room = self.s.max_in_flight - m.in_flight
        share = max(1, self.s.max_in_flight // max(1, len(m.assigned)))
        lease_min = max(1, min(share, LEASE_ASK_MAX) // 4)
        n = min(room, LEASE_ASK_MAX, share)
        if n < lease_min and (m.arrived or m.ready):
            return 0
        return n

    def lease(self, m: Member, p: int) -> None:
        if m.leaving or p not in m.assigned or p in m.leasing:
            return
        n = self.lease_size(m)
        if n <= 0:
            m.paused[p] = None
            return
        leader = m.leaders.get(p) or self.leader.get(TopicPartition(TOPIC_ID, p))
        if leader is None:
            return self.lease_retry(m, p)
        m.leaders[p] = leader
        m.in_flight += n
        m.leasing.add(p)
        self.request(m, leader, "lease", (p, n, self.now), MAX_WAIT_MS + REQUEST_TIMEOUT_MS, partition=p,
                     max_messages=n, generation=m.generation)

    def resume_order(self, m: Member) -> list[int]:
        """Paused partitions, in the order they paused, as the client's `_paused` (an ordered set).
        The client used to resume them sorted by partition, which starved the highest ones when
        `max_in_flight` is below the number of partitions held (found by this simulator, seed 107;
        the bug "client_sorted_resume" brings that rule back)."""
        return sorted(m.paused) if "client_sorted_resume" in self.bugs else list(m.paused)

    def lease_retry(self, m: Member, p: int) -> None:
        m.failures[p] = m.failures.get(p, 0) + 1
        m.leaders.pop(p, None)   # refresh metadata: the next lease asks the current leader
        delay = min(RETRY_BACKOFF_MS_MAX, RETRY_BACKOFF_MS * 2 ** min(m.failures[p] - 1, 10))
        self.at(self.now + delay, "member_timer", m.endpoint, "lease", p)

    def answer_lease(self, m: Member, ctx: tuple[int, int, int], reply: Reply | None, error: Refused | None) -> None:
        p, n, sent = ctx
        m.leasing.discard(p)
        got = len(reply.deliveries) if error is None and reply is not None else 0
        m.in_flight -= n - got
        paused = self.resume_order(m) if n > got else []
        for q in paused:
            del m.paused[q]
        if error is None and got:
            m.epochs[p] = max(m.epochs.get(p, 0), reply.epoch)
            m.arrived.append((p, reply.epoch, reply.deliveries))
            self.maybe_handle(m)
        for q in paused:
            self.lease(m, q)
        if error is None:
            m.failures[p] = 0
            if got == 0 and self.now - sent < 5:
                self.at(self.now + EMPTY_LEASE_BACKOFF_MS, "member_timer", m.endpoint, "lease", p)
            else:
                self.lease(m, p)
        elif error.kind == "not_leader" and error.hint and m.failures.get(p, 0) == 0:
            m.leaders[p] = error.hint
            m.failures[p] = 1
            self.lease(m, p)
        elif error.kind in (FENCED, "rebalance_in_progress"):
            if error.kind == FENCED:
                self.send_heartbeat(m, regular=False)
            m.failures[p] = m.failures.get(p, 0) + 1
            self.at(self.now + min(RETRY_BACKOFF_MS * m.failures[p], RETRY_BACKOFF_MS_MAX), "member_timer",
                    m.endpoint, "lease", p)
        else:
            self.lease_retry(m, p)

    # ---- the application

    def maybe_handle(self, m: Member) -> None:
        if m.busy or not m.alive:
            return
        while not m.ready and m.arrived:
            p, epoch, deliveries = m.arrived.popleft()
            if epoch < m.epochs.get(p, 0):
                m.in_flight -= len(deliveries)   # a seek made them stale (the client's _release)
                for q in self.resume_order(m):
                    del m.paused[q]
                    self.lease(m, q)
                continue
            m.ready.extend((p, epoch, o, a) for o, a in deliveries)
        if not m.ready:
            return
        msg = m.ready.popleft()
        m.busy = True
        rng = self.rng
        handle_ms = rng.randint(0, 5)
        if rng.random() < self.s.slow:
            handle_ms += rng.randint(self.s.lease_ms // 2, self.s.lease_ms * 2)
        self.at(self.now + handle_ms, "member_timer", m.endpoint, "handled", (msg, handle_ms))

    def handled(self, m: Member, arg: tuple) -> None:
        (p, epoch, offset, attempt), handle_ms = arg
        m.busy = False
        rng = self.rng
        poison = (p, offset) in self.poison
        if poison or (self.phase == "safety" and rng.random() < self.s.transient):
            delay = None if rng.random() < 0.5 else rng.randint(0, 100) / 1000
            delay_ms = None if delay is None else int(delay * 1000)
            self.settle(m, p, epoch, "nack", (offset, attempt, delay_ms, "poison" if poison else "transient"))
        else:
            if handle_ms > self.s.lease_ms // 2 and rng.random() < 0.5:
                self.settle(m, p, epoch, "extend", (offset, self.s.lease_ms))
            self.check.on_handled(m.group, p, epoch, offset)
            self.settle(m, p, epoch, "ack", offset)
        self.maybe_handle(m)

    def settle(self, m: Member, p: int, epoch: int, kind: str, item: Any) -> None:
        acked, nacks, extends = m.pending.setdefault((p, epoch), ([], [], []))
        if kind == "ack":
            acked.append(item)
        elif kind == "nack":
            nacks.append(item)
        else:
            extends.append(item)
        if kind != "extend":
            m.in_flight -= 1
            if m.paused:
                for q in self.resume_order(m):
                    del m.paused[q]
                    self.lease(m, q)
        if not m.flush_scheduled:
            m.flush_scheduled = True
            self.at(self.now + ACK_FLUSH_MS, "member_timer", m.endpoint, "flush", None)

    def flush(self, m: Member) -> None:
        pending, m.pending = m.pending, {}
        m.flush_scheduled = False
        for (p, epoch), items in sorted(pending.items()):
            self.send_ack(m, p, epoch, items, 0, self.now)

    def send_ack(self, m: Member, p: int, epoch: int, items: tuple, attempt: int, first_ms: int) -> None:
        leader = m.leaders.get(p) or self.leader.get(TopicPartition(TOPIC_ID, p))
        if leader is None:
            delay = min(RETRY_BACKOFF_MS_MAX, RETRY_BACKOFF_MS * 2 ** min(attempt, 10))
            if self.now + delay - first_ms < ACK_RETRY_MS_MAX:
                self.at(self.now + delay, "member_timer", m.endpoint, "ack_retry", (p, epoch, items, attempt + 1,
                                                                                  first_ms))
            return   # else the acks are dropped: the messages will be delivered again
        acked, nacks, extends = items
        self.request(m, leader, "ack", (p, epoch, items, attempt, first_ms), REQUEST_TIMEOUT_MS,
                     generation=m.generation, partition=p, epoch=epoch, acked=tuple(acked), nacks=tuple(nacks),
                     extends=tuple(extends))

    def answer_ack(self, m: Member, ctx: tuple, reply: Reply | None, error: Refused | None) -> None:
        if error is None:
            return
        p, epoch, items, attempt, first_ms = ctx
        delay = min(RETRY_BACKOFF_MS_MAX, RETRY_BACKOFF_MS * 2 ** min(attempt, 10))
        retry = self.now + delay - first_ms < ACK_RETRY_MS_MAX and error.kind in (
            "not_leader", "leader_not_available", "timeout", "rebalance_in_progress")
        if error.kind == "not_leader" and error.hint:
            m.leaders[p] = error.hint
        if error.kind == FENCED:
            self.send_heartbeat(m, regular=False)
        if retry:
            if error.kind != "not_leader":
                m.leaders.pop(p, None)
            self.at(self.now + delay, "member_timer", m.endpoint, "ack_retry", (p, epoch, items, attempt + 1, first_ms))

