"""The simulated consumers of the groups simulator (zq/sim/groups.py): each member drives the
shipped consumer's rules, `zq.core.consumer_rules.GroupConsumerCore`, exactly as the client's I/O
shell (zq/client/groups.py) does, and speaks the real group_protocol messages to the real service.
`ConsumerModel` is a part of `GroupSim`: it uses the simulator's clock, heap, rng, network and
checker.

Theory of operation
-------------------
There is no copy of a consumer rule here: lease sizes, pausing and resuming, heartbeats and
rejoins, NotLeader hints, retries and their backoff, ack batching, reset epochs are all the core's.
This module is the core's driver, as `GroupConsumer` is in production:

- *The first join* is the driver's, as in the client (`_join`): a JoinGroup to one node, then the
  next in turn every `retry_backoff_ms` until one answers; its reply goes to `on_joined`.
- *The pump* (`pump`, the client's `_pump`): `poll(now, len(ready))` gives the due effects; each
  order becomes a real request (to the order's address; a lease or an Ack without one goes to the
  partition's leader as the metadata says, which the simulator knows exactly; with none known it
  is refused at once as NotLeader, as the client's `_send` does) with a timeout timer; its answer,
  an error reply turned into a `Refusal` as the client's `_refusal` does, or a timeout
  (`Refusal("timeout", True)`), goes back to the core's `on_*_reply`, and the member pumps again.
  After every pump one wake-up is scheduled at `due_ms()` (unless an earlier one is pending).
- *The application* takes the core's chunks (`take_chunk`; a refusal chunk is the error the
  client's poll raises: the application notes it and goes on), checks that each leased offset
  travels in the lease's stored batches, handles one message at a time, and settles it through
  `settle`: poison messages are always nacked, transient failures sometimes (with or without a
  delay), slow work is sometimes extended, the rest acked. A member leaving does what `close()`
  does: `flush` with a waiter, wait for its `CommitDone` (at most `CLOSE_COMMIT_WAIT_MS`), `close`
  the core, then send its LeaveGroup to the coordinator.

The client's knobs are configuration here (`ConsumerConfig`): the member's session, heartbeat,
lease length and `max_in_flight` come from the seed's settings; `REQUEST_TIMEOUT_MS` and
`MAX_WAIT_MS` are the client settings this simulated client runs with.
"""
from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from zq import batch as zbatch
from zq import group_protocol as G
from zq import protocol as P
from zq.core import consumer_rules as R
from zq.errors import NotLeader, ZqError, from_wire
from zq.limits import DEFAULT
from zq.sim.checks import Violation
from zq.sim.group_host import NODES, TOPIC, TOPIC_ID
from zq.types import TopicPartition

# The simulated client's settings (Client(request_timeout_ms=...), consumer(max_wait_ms=...)).
REQUEST_TIMEOUT_MS = 1_000
MAX_WAIT_MS = 200
HEARTBEAT_MS_MIN = 50          # consumer(heartbeat_ms=max(this, session_timeout_ms // 4))
CLOSE_COMMIT_WAIT_MS = 10_000  # close() waits this long for its acks' answers (the client's commit_wait_s)
LEAVE_TIMEOUT_MS = 2_000       # ... and this long for its LeaveGroup's (the client's close_leave_timeout_ms)


@dataclass
class Member:
    endpoint: str           # unique per start: replies to an earlier start of the same member are lost
    member_id: str
    group: str
    static: bool
    core: R.GroupConsumerCore
    join_node: int = 0      # the node the first join tries next
    joined: bool = False
    alive: bool = True
    leaving: bool = False
    closing: bool = False   # close() flushed; waiting for its CommitDone
    ready: deque = field(default_factory=deque)        # (p, epoch, offset, attempt): decoded, not yet handed out
    busy: bool = False
    requests: dict[int, tuple[str, Any]] = field(default_factory=dict)   # req id -> (kind, order)
    wake_at: int | None = None
    pumping: bool = False
    pump_again: bool = False


class ConsumerModel:
    """The consumers' half of GroupSim: drivers of the shipped consumer core."""

    def start_member(self, group: str, static: bool, member_id: str | None = None) -> Member:
        self.member_starts += 1
        endpoint = f"c{self.member_starts}"
        member_id = member_id or f"m{self.member_starts}"
        config = R.ConsumerConfig(group, TOPIC, member_id, static, session_timeout_ms=self.s.session_timeout_ms,
                                  heartbeat_ms=max(HEARTBEAT_MS_MIN, self.s.session_timeout_ms // 4),
                                  lease_ms=self.s.lease_ms, max_in_flight=self.s.max_in_flight,
                                  max_wait_ms=MAX_WAIT_MS, request_timeout_ms=REQUEST_TIMEOUT_MS,
                                  lease_retry_ms_max=DEFAULT.api_timeout_ms)
        m = Member(endpoint, member_id, group, static, R.GroupConsumerCore(config),
                   join_node=self.rng.randrange(len(NODES)))
        self.members[endpoint] = m
        self.say(f"start {endpoint} as {m.member_id} in {group}{' (static)' if static else ''}")
        self.first_join(m)
        return m

    def crash_member(self, m: Member) -> None:
        m.alive = False
        self.result.member_crashes += 1
        self.say(f"crash {m.endpoint} ({m.member_id})")

    def leave_member(self, m: Member) -> None:
        """The application calls close() once the message in hand is settled."""
        m.leaving = True
        if not m.busy:
            self.close_member(m)

    def close_member(self, m: Member) -> None:
        """close(): flush with a waiter, and leave once its acks ended (or the wait did)."""
        if m.closing:
            return
        m.closing = True
        if not m.joined:
            return self.leave_now(m)
        m.core.flush(self.now, m.endpoint)
        self.at(self.now + CLOSE_COMMIT_WAIT_MS, "member_timer", m.endpoint, "leave", None)
        self.pump(m)

    def leave_now(self, m: Member) -> None:
        if not m.alive:
            return
        m.core.close()
        m.ready.clear()
        m.alive = False   # its answers are not waited for (the client's close() returns)
        address = m.core.coordinator or NODES[m.join_node]
        self.request(m, address, "leave", None, LEAVE_TIMEOUT_MS, G.LeaveGroup(0, m.group, m.member_id))

    # ------------------------------------------------------------------ requests and answers

    def request(self, m: Member, node: str, kind: str, order: Any, timeout_ms: int, msg: Any) -> None:
        """Send `msg` (its req_id replaced by a fresh one) to `node`, with a timeout."""
        self.next_req += 1
        rid = self.next_req
        msg = dataclasses.replace(msg, req_id=rid)
        m.requests[rid] = (kind, order)
        if kind == "lease":
            self.lease_asks[(m.endpoint, rid)] = (m.group, order.partition)
        self.send(m.endpoint, node, "request", msg)
        self.at(self.now + timeout_ms, "member_timer", m.endpoint, "timeout", rid)

    def ev_member_timer(self, endpoint: str, what: str, arg: Any) -> None:
        m = self.members[endpoint]
        if not m.alive:
            return
        if what == "timeout":
            if arg in m.requests:
                kind, order = m.requests.pop(arg)
                self.on_answer(m, kind, order, None, (), R.Refusal(R.TIMEOUT, True))
        elif what == "wake":
            if m.wake_at == arg:
                m.wake_at = None
            self.pump(m)
        elif what == "join":
            self.first_join(m)
        elif what == "handled":
            self.handled(m, arg)
        elif what == "leave":
            self.leave_now(m)

    def on_reply(self, m: Member, msg: Any, frames: tuple) -> None:
        entry = m.requests.pop(getattr(msg, "req_id", -1), None)
        if entry is None:
            return   # a duplicate, or an answer after the timeout
        kind, order = entry
        if isinstance(msg, P.ErrorReply):
            return self.on_answer(m, kind, order, None, frames, refusal(from_wire(msg.code, msg.message, msg.data)))
        expected = {"join": G.GroupReply, "first_join": G.GroupReply, "heartbeat": G.GroupReply,
                    "lease": G.LeaseReply, "ack": P.OkReply, "leave": P.OkReply, "seek": P.OkReply}[kind]
        if not isinstance(msg, expected):
            raise Violation("answers of the right kind", f"{kind} answered with {msg}")
        if isinstance(msg, G.LeaseReply):
            carried = {r.offset for f in frames for r in zbatch.iter_records(f)}
            if not set(msg.deliveries[::2]) <= carried:
                raise Violation("leased records travel with the lease", f"{msg} lacks some of its records")
        self.on_answer(m, kind, order, msg, frames, None)

    def on_answer(self, m: Member, kind: str, order: Any, msg: Any, frames: tuple, error: R.Refusal | None) -> None:
        """An answer (or `error`) goes to the core, as the client's `_on_group_reply`, `_on_lease`, `_on_ack`."""
        core, now = m.core, self.now
        if kind == "first_join":
            return self.first_join_answer(m, order, msg, error)
        if kind == "leave":
            return
        if kind == "seek":
            return self.seek_answer(m, msg, error)
        if kind in ("join", "heartbeat"):
            gen, parts = (msg.generation, partitions_of(msg)) if error is None else (None, None)
            if kind == "join":
                core.on_join_reply(order, gen, parts, error, now)
            else:
                core.on_heartbeat_reply(order, gen, parts, error, now, list(NODES))
        elif kind == "lease":
            deliveries = None if error is not None else dict(zip(msg.deliveries[::2], msg.deliveries[1::2]))
            core.on_lease_reply(order, deliveries, msg.reset_epoch if error is None else 0, frames, error, now)
        else:
            core.on_ack_reply(order, error, now)
        self.pump(m)
        self.maybe_handle(m)

    # ------------------------------------------------------------------ the driver (the client's _join, _pump, _send)

    def first_join(self, m: Member) -> None:
        msg = G.JoinGroup(0, m.group, m.member_id, [TOPIC], self.s.session_timeout_ms, m.static)
        self.request(m, NODES[m.join_node], "first_join", m.join_node, REQUEST_TIMEOUT_MS, msg)

    def first_join_answer(self, m: Member, node: int, msg: Any, error: R.Refusal | None) -> None:
        if error is not None:   # the next node, after a pause
            m.join_node = (node + 1) % len(NODES)
            self.at(self.now + R.retry_backoff_ms, "member_timer", m.endpoint, "join", None)
            return
        m.joined = True
        m.core.on_joined(NODES[node], msg.generation, partitions_of(msg), self.now)
        if m.leaving:
            return self.close_member(m)
        self.pump(m)

    def pump(self, m: Member) -> None:
        """Send what the core says is due; then one wake-up at its next due time. Not re-entered:
        a request refused at once calls back into here, which runs the loop once more instead."""
        if not m.alive or not m.joined:
            return
        if m.pumping:
            m.pump_again = True
            return
        m.pumping = True
        try:
            m.pump_again = True
            while m.pump_again and m.alive:
                m.pump_again = False
                for e in m.core.poll(self.now, len(m.ready)):
                    if isinstance(e, R.CommitDone):
                        if e.waiter == m.endpoint and m.closing:
                            self.leave_now(m)
                    elif not isinstance(e, R.RefreshMetadata):   # the simulated metadata is always fresh
                        self.send_order(m, e)
            due = m.core.due_ms() if m.alive else None
            if due is not None:
                at = self.now if due == float("-inf") else max(self.now, math.ceil(due))
                if m.wake_at is None or at < m.wake_at:
                    m.wake_at = at
                    self.at(at, "member_timer", m.endpoint, "wake", at)
        finally:
            m.pumping = False

    def send_order(self, m: Member, order: Any) -> None:
        if not m.alive:
            return
        if isinstance(order, R.JoinOrder):
            address = order.address or NODES[0]
            msg: Any = G.JoinGroup(0, m.group, m.member_id, [TOPIC], self.s.session_timeout_ms, m.static)
            return self.request(m, address, "join", order, order.timeout_ms, msg)
        if isinstance(order, R.HeartbeatOrder):
            address = order.address or NODES[0]
            return self.request(m, address, "heartbeat", order, order.timeout_ms,
                                G.GroupHeartbeat(0, m.group, m.member_id, order.generation))
        p = order.partition
        address = order.address or self.leader.get(TopicPartition(TOPIC_ID, p))
        if isinstance(order, R.LeaseOrder):
            if address is None:
                no_leader = NotLeader(f"no leader known for {TOPIC}/{p}")
                return self.on_answer(m, "lease", order, None, (), refusal(no_leader))
            c = m.core.config
            msg = G.Lease(0, m.group, m.member_id, order.generation, TOPIC, p, order.max_messages, c.lease_ms,
                          c.max_wait_ms, c.start)
            return self.request(m, address, "lease", order, order.timeout_ms, msg)
        if address is None:
            no_leader = NotLeader(f"no leader known for {TOPIC}/{p}; the acks are dropped")
            return self.on_answer(m, "ack", order, None, (), refusal(no_leader))
        msg = G.Ack(0, m.group, m.member_id, order.generation, TOPIC, p, order.epoch, list(order.acked),
                    [list(n) for n in order.nacks], [list(e) for e in order.extends])
        self.request(m, address, "ack", order, order.timeout_ms, msg)

    # ------------------------------------------------------------------ the application

    def seek_sent(self, m: Member, msg: G.ResetGroup) -> str:
        """The member's application seeks (the client's `seek`: a ResetGroup, then `_drop_queued`):
        `msg` is this member's request, the simulator hands it to the leader; returns the endpoint
        its answer goes to."""
        m.requests[msg.req_id] = ("seek", msg.partition)
        self.at(self.now + REQUEST_TIMEOUT_MS, "member_timer", m.endpoint, "timeout", msg.req_id)
        return m.endpoint

    def seek_answer(self, m: Member, msg: Any, error: R.Refusal | None) -> None:
        """The reset's answer: the core drops what it queued of older reset epochs, and so does the
        application's own queue (the client's `_drop_queued`). A refused or lost answer is the
        error `seek` raises: the core learns the new epoch from its next lease reply instead."""
        if error is not None:
            return
        rows = [r for r in msg.data.get("partitions", []) if isinstance(r, dict)]
        epochs = {r["partition"]: r.get("epoch", 0) for r in rows}
        m.core.on_reset(epochs, self.now)
        self.result.seeks += 1
        kept = deque(x for x in m.ready if x[0] not in epochs or x[1] >= epochs[x[0]])
        dropped = len(m.ready) - len(kept)
        m.ready = kept
        if dropped:
            m.core.release(dropped, self.now)
        self.pump(m)
        self.maybe_handle(m)

    def maybe_handle(self, m: Member) -> None:
        if m.busy or not m.alive or m.leaving:
            return
        while not m.ready:
            chunk = m.core.take_chunk(self.now)
            due = m.core.due_ms()
            if due is not None and due <= self.now:
                self.pump(m)   # e.g. nothing queued: partitions that waited for a larger room may lease
            if chunk is None:
                return
            if chunk.error is not None:   # what the client's poll raises: the application goes on
                self.say(f"{m.endpoint}: poll raised {chunk.error}")
                continue
            m.ready.extend((chunk.partition, chunk.epoch, o, a) for o, a in sorted(chunk.deliveries.items()))
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
            delay_ms = None if rng.random() < 0.5 else rng.randint(0, 100)
            self.settle(m, p, epoch, "nack", [offset, attempt, delay_ms, "poison" if poison else "transient"])
        else:
            if handle_ms > self.s.lease_ms // 2 and rng.random() < 0.5:
                self.settle(m, p, epoch, "extend", [offset, self.s.lease_ms])
            self.check.on_handled(m.group, p, epoch, offset)
            self.settle(m, p, epoch, "ack", offset)
        if m.leaving:
            return self.close_member(m)
        self.maybe_handle(m)

    def settle(self, m: Member, p: int, epoch: int, kind: str, item: Any) -> None:
        if m.core.settle(p, epoch, kind, item, self.now, len(m.ready)):
            self.pump(m)


def refusal(error: ZqError) -> R.Refusal:
    """An error as the core sees it (the client's `_refusal`)."""
    address = error.address if isinstance(error, NotLeader) else None
    return R.Refusal(error.code, error.retriable, address if isinstance(address, str) else None, error)


def partitions_of(reply: G.GroupReply) -> set[int]:
    """The partitions of TOPIC a GroupReply assigns (the client's `_parts`)."""
    return {p for t, p in (tuple(x) for x in reply.partitions if isinstance(x, (list, tuple)) and len(x) == 2)
            if t == TOPIC and type(p) is int}
