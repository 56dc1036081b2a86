"""Who is alive: a SWIM failure detector with suspicion, incarnations and piggybacked gossip.

Theory of operation
-------------------
Every node runs one `Membership` core. The core holds a table of the other members, each with an
address, an incarnation number and a state: ALIVE, SUSPECT, DEAD or LEFT. The caller (the node's
event loop, a test, the simulator) passes every event in with the time, and gets effects back as
data: `Send` (a message for the transport) and `MemberChanged` (for the node, the status view and
metrics). The core reads no clock, opens no socket and makes no random numbers of its own: the
caller gives it a `random.Random`.

Probing. Once per `probe_interval_ms` the core probes one member, taken in a shuffled round-robin
order (SWIM's variant: every member is probed at least once every two rounds). It sends a Ping;
without an Ack after `ack_timeout_ms` it asks `indirect_probes` other members to ping the target
for it (PingReq) and to forward the Ack. Without any Ack by the end of the period the target
becomes SUSPECT. A suspicion becomes DEAD after `suspicion_timeout_ms`, unless refuted first.

Incarnations. Only a node itself raises its own incarnation. A rumour about a node is an update
`(node, address, incarnation, state)`; an update replaces what we hold when it is newer in the order
`(incarnation, state rank)` with rank ALIVE < SUSPECT < DEAD < LEFT, except that ALIVE needs a strictly
higher incarnation. So a suspicion beats the alive record of its incarnation, and only the node can
lift it, by announcing ALIVE at a higher incarnation (refutation). A node that hears any rumour of
its own suspicion, death or departure at an incarnation >= its own refutes at once and sends the
refutation straight to (up to `refute_fanout_max`) members, not only by gossip.

Gossip. Every message carries up to `piggyback_updates_max` updates: first what we hold about the
recipient when it is not the plain truth (so a suspected node learns it is suspected whenever it
talks to anyone), then the freshest rumours (each repeated `retransmit_mult * ceil(log2(n + 2))`
times), then up to `anti_entropy_updates_max` records taken round-robin from the whole table, so two
views that disagree converge even after the rumour itself stopped being repeated.

Discovery is advisory. `on_discovered` (zeroconf, seeds) adds an unknown node as ALIVE and takes a
newer incarnation or address for a node we hold ALIVE, but it never lifts a suspicion, a death or a
departure, whatever incarnation the record carries: a record of a crashed node may be newer than the
death we hold (it refuted a suspicion, announced that, then crashed), and zeroconf caches it long
after. For such a node we ping the record's address instead (at most once per probe period), with
what we hold about it on board: a node that is really there answers, and refutes first if need be,
and its own Ack brings it back. Discovered records are not gossiped: only the members themselves
vouch for their liveness.

Reconnecting. SWIM never probes the dead, so two sides of a network partition that outlived the
suspicion timeout hold each other DEAD for good unless someone speaks first; seeds and zeroconf
records arrive too rarely to count on. So every `reconnect_interval_ms` we ping up to
`reconnect_probes_max` DEAD members (round-robin; not LEFT ones, they said goodbye), as Serf does.
The Ping carries the recipient's DEAD record, so a live recipient refutes and its Ack proves it
ALIVE at the new incarnation; a dead one costs one message.

Stalls. If an event arrives long (`stall_ms_min`) after the earliest deadline we asked to be woken
for, this process was stopped (SIGSTOP, suspend, a long GC). The time it was stopped is not held
against the others: every pending deadline moves forward by the length of the silence, so a node
that resumes drains its inbox (which may hold the Acks and refutations it missed) before it blames
anyone.

Invariants: our own record is never SUSPECT or DEAD; an incarnation in the table never decreases;
the table holds at most `members_max` other members (tombstones of DEAD/LEFT members are evicted
oldest first, after `tombstone_ms` in any case); at most `relays_max` indirect probes are relayed
at once; iteration is in sorted order, so one seed gives one trace.

Messages (CBOR-able fields; an update is `[node, address, incarnation, state]`, state one of
"alive", "suspect", "dead", "left"):

    Ping    = seq sender sender_address sender_incarnation target updates
    Ack     = seq sender sender_address sender_incarnation target updates
    PingReq = seq sender sender_address sender_incarnation target target_address updates

`target` is the node asked to answer ("" for a seed whose id is not known yet). An Ack's target is
the node whose liveness it proves: the sender itself, or the pinged node when a relay forwards it.
"""
from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from zq.errors import ProtocolError
from zq.types import NodeId


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    probe_interval_ms: int = 1_000        # one probe per period
    ack_timeout_ms: int = 400             # direct Ack wait before asking others (< probe_interval_ms)
    indirect_probes: int = 3              # k: members asked to ping the target for us
    suspicion_timeout_ms: int = 5_000     # SUSPECT -> DEAD unless refuted
    piggyback_updates_max: int = 8        # updates carried by one message we send
    anti_entropy_updates_max: int = 2     # of those, table records sent round-robin
    retransmit_mult: int = 4              # a rumour is repeated mult * ceil(log2(n + 2)) times
    updates_per_message_max: int = 64     # most updates we accept in one peer message
    members_max: int = 1_024              # other members held, tombstones included
    relays_max: int = 256                 # indirect probes relayed for others at once
    refute_fanout_max: int = 32           # members told directly of a refutation or a leave
    tombstone_ms: int = 3_600_000         # DEAD/LEFT records kept so stale rumours cannot revive them
    stall_ms_min: int = 1_000             # woken this late past a deadline: we were stopped
    reconnect_interval_ms: int = 5_000    # how often DEAD members are pinged in case they are back
    reconnect_probes_max: int = 4         # DEAD members pinged per reconnect round
    node_id_chars_max: int = 128
    address_chars_max: int = 256

    def __post_init__(self) -> None:
        assert 0 < self.ack_timeout_ms < self.probe_interval_ms, "the ack timeout must fit in a period"
        assert self.anti_entropy_updates_max <= self.piggyback_updates_max <= self.updates_per_message_max
        assert self.indirect_probes >= 0 and self.members_max > 0 and self.relays_max >= 0
        assert self.reconnect_interval_ms > 0 and self.reconnect_probes_max >= 0


# The timing of a real node's membership service, kept here so that the shell (zq.io.membership)
# and the membership simulator (zq.sim.members) read one set of numbers. The detector's timing:
# a Python node on a busy 2-core machine stalls for tens of milliseconds at times, so the direct
# ack wait is generous; suspicion lasts 5 probe periods, long enough for a paused or GC-bound node
# to refute, short enough to fail over in seconds.
NODE_MEMBERSHIP = MembershipConfig(probe_interval_ms=1_000, ack_timeout_ms=400, suspicion_timeout_ms=5_000)
DISCOVERY_DRAIN_MS = 100          # how often zeroconf's queue of found peers is emptied into the core
SEED_RETRY_MS = 3_000             # a seed no live member answers for is pinged again this often
SEEDS_PER_PASS_MAX = 64           # seeds pinged per retry
LEAVE_FLUSH_MS = 150              # on close, time the goodbye gets to leave before the sockets close



class State(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


_RANK = {State.ALIVE: 0, State.SUSPECT: 1, State.DEAD: 2, State.LEFT: 3}
_STATES_BY_NAME = {s.value: s for s in State}
_PROBED = (State.ALIVE, State.SUSPECT)
_GONE = (State.DEAD, State.LEFT)
_INCARNATION_MAX = 2**63 - 1


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    sender: str
    sender_address: str
    sender_incarnation: int
    target: str
    updates: list
    CODE: ClassVar[int]


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    sender: str
    sender_address: str
    sender_incarnation: int
    target: str
    updates: list
    CODE: ClassVar[int]


@dataclass(frozen=True, slots=True)
class PingReq:
    seq: int
    sender: str
    sender_address: str
    sender_incarnation: int
    target: str
    target_address: str
    updates: list
    CODE: ClassVar[int]


Message = Union[Ping, Ack, PingReq]


@dataclass(frozen=True, slots=True)
class Update:
    node: NodeId
    address: str
    incarnation: int
    state: State

    def to_wire(self) -> list:
        return [self.node, self.address, self.incarnation, self.state.value]


# --------------------------------------------------------------------------------------------
# Effects


@dataclass(frozen=True, slots=True)
class Send:
    to: NodeId | None      # None when only the address is known (a seed)
    address: str
    message: Message


@dataclass(frozen=True, slots=True)
class MemberChanged:
    node: NodeId
    address: str
    state: State
    incarnation: int
    at_ms: int


Effect = Union[Send, MemberChanged]


@dataclass(frozen=True, slots=True)
class MemberView:
    """One row of `zq status`: last_seen_ms is the last direct sign of life (None: only heard of)."""
    node: NodeId
    address: str
    state: State
    incarnation: int
    last_seen_ms: int | None

    def as_status(self) -> dict[str, Any]:
        return {"name": self.node, "address": self.address, "state": self.state.value,
                "last_seen_ms": self.last_seen_ms}


# --------------------------------------------------------------------------------------------
# Internal records


@dataclass(slots=True)
class _Member:
    node: NodeId
    address: str
    incarnation: int
    state: State
    state_since_ms: int
    last_seen_ms: int | None = None
    claimed_incarnation: int = -1        # the incarnation it last claimed to us directly
    suspect_deadline_ms: int | None = None
    notified_ms: int | None = None       # when we last told it directly what we hold about it


@dataclass(slots=True)
class _Probe:
    target: NodeId
    seq: int
    incarnation: int                     # the target's incarnation when the probe started
    indirect_at_ms: int
    acked: bool = False
    indirect_sent: bool = False


@dataclass(slots=True)
class _Relay:
    requester: NodeId
    requester_address: str
    requester_seq: int
    target: NodeId
    expires_ms: int


def _supersedes(u: Update, incarnation: int, state: State) -> bool:
    if u.state is State.ALIVE:
        return u.incarnation > incarnation
    return (u.incarnation, _RANK[u.state]) > (incarnation, _RANK[state])


class Membership:
    """The pure SWIM core of one node. See the module docstring."""

    def __init__(self, node_id: str, address: str, incarnation: int, rng: random.Random,
                 now_ms: int, config: MembershipConfig | None = None) -> None:
        self.config = config or MembershipConfig()
        self.node_id = NodeId(node_id)
        self.address = address
        self.incarnation = incarnation
        self.left = False
        self.counters: dict[str, int] = {name: 0 for name in (
            "pings_sent", "acks_sent", "ping_reqs_sent", "suspicions", "deaths_declared",
            "refutations", "members_refused", "relays_refused", "stalls")}
        self._rng = rng
        self._members: dict[NodeId, _Member] = {}
        self._gossip: dict[NodeId, int] = {}          # node -> times its record was sent
        self._relays: dict[int, _Relay] = {}
        self._probe: _Probe | None = None
        self._order: list[NodeId] = []
        self._order_index = 0
        self._fill_after: str = ""                    # anti-entropy cursor over sorted node ids
        self._seq = 0
        self._next_probe_ms = now_ms
        self._next_reconnect_ms = now_ms + self.config.reconnect_interval_ms
        self._reconnect_after: str = ""               # reconnect cursor over sorted node ids
        self._last_event_ms = now_ms

    # ---------------------------------------------------------------- queries

    def members(self, now_ms: int | None = None) -> list[MemberView]:
        """Every member we hold, this node included, sorted by id."""
        me = MemberView(self.node_id, self.address, State.LEFT if self.left else State.ALIVE,
                        self.incarnation, now_ms if now_ms is not None else self._last_event_ms)
        views = [MemberView(m.node, m.address, m.state, m.incarnation, m.last_seen_ms)
                 for m in self._members.values()]
        return sorted([me, *views], key=lambda v: v.node)

    def state_of(self, node: str) -> State | None:
        if node == self.node_id:
            return State.LEFT if self.left else State.ALIVE
        m = self._members.get(NodeId(node))
        return m.state if m else None

    def next_deadline_ms(self) -> int:
        """When the caller should call tick() next, at the latest."""
        deadlines = [self._next_probe_ms, self._next_reconnect_ms]
        if self._probe and not self._probe.acked and not self._probe.indirect_sent:
            deadlines.append(self._probe.indirect_at_ms)
        deadlines += [m.suspect_deadline_ms for m in self._members.values() if m.suspect_deadline_ms is not None]
        deadlines += [r.expires_ms for r in self._relays.values()]
        return min(deadlines)

    # ---------------------------------------------------------------- events

    def tick(self, now_ms: int) -> list[Effect]:
        out: list[Effect] = []
        self._maybe_notice_stall(now_ms)
        if not self.left:
            self._maybe_probe_indirectly(now_ms, out)
        if now_ms >= self._next_probe_ms:
            if not self.left:  # a node that left answers pings but probes nobody
                self._maybe_end_probe(now_ms, out)
                self._maybe_start_probe(now_ms, out)
            self._next_probe_ms = now_ms + self.config.probe_interval_ms
        if now_ms >= self._next_reconnect_ms:
            if not self.left:
                self._maybe_reconnect(out)
            self._next_reconnect_ms = now_ms + self.config.reconnect_interval_ms
        self._expire_suspicions(now_ms, out)
        self._expire_relays(now_ms)
        self._forget_tombstones(now_ms)
        return out

    def on_message(self, msg: Message, now_ms: int) -> list[Effect]:
        if isinstance(msg, Ping):
            return self.on_ping(msg, now_ms)
        if isinstance(msg, Ack):
            return self.on_ack(msg, now_ms)
        if isinstance(msg, PingReq):
            return self.on_ping_req(msg, now_ms)
        raise ProtocolError(f"not a membership message: {type(msg).__name__}")

    def on_ping(self, msg: Ping, now_ms: int) -> list[Effect]:
        updates = self._check(msg)
        out: list[Effect] = []
        self._maybe_notice_stall(now_ms)
        self._on_sender(msg, now_ms, out)
        self._apply_all(updates, now_ms, out)
        if msg.target not in ("", self.node_id):
            return out  # another node had this address before us: its prober must not hear from us
        reply = Ack(msg.seq, self.node_id, self.address, self.incarnation, self.node_id,
                    self._piggyback(NodeId(msg.sender)))
        out.append(Send(NodeId(msg.sender), msg.sender_address, reply))
        self.counters["acks_sent"] += 1
        return out

    def on_ack(self, msg: Ack, now_ms: int) -> list[Effect]:
        updates = self._check(msg)
        out: list[Effect] = []
        self._maybe_notice_stall(now_ms)
        self._on_sender(msg, now_ms, out)
        self._apply_all(updates, now_ms, out)
        self._maybe_notify(NodeId(msg.sender), now_ms, out)
        relay = self._relays.get(msg.seq)
        if relay is not None and relay.target == msg.target:
            del self._relays[msg.seq]
            forwarded = Ack(relay.requester_seq, self.node_id, self.address, self.incarnation,
                            relay.target, self._piggyback(relay.requester))
            out.append(Send(relay.requester, relay.requester_address, forwarded))
            self.counters["acks_sent"] += 1
            return out
        probe = self._probe
        if probe is not None and probe.seq == msg.seq and probe.target == msg.target:
            probe.acked = True
            target = self._members.get(probe.target)
            if target is not None:
                target.last_seen_ms = now_ms
        return out

    def on_ping_req(self, msg: PingReq, now_ms: int) -> list[Effect]:
        updates = self._check(msg)
        if not isinstance(msg.target_address, str) or len(msg.target_address) > self.config.address_chars_max:
            raise ProtocolError("PingReq.target_address must be a short string")
        out: list[Effect] = []
        self._maybe_notice_stall(now_ms)
        self._on_sender(msg, now_ms, out)
        self._apply_all(updates, now_ms, out)
        self._maybe_notify(NodeId(msg.sender), now_ms, out)
        if msg.target in ("", self.node_id, msg.sender):
            return out
        if len(self._relays) >= self.config.relays_max:
            self.counters["relays_refused"] += 1  # the requester then counts one missing ack: a suspicion at worst
            return out
        seq = self._next_seq()
        target = NodeId(msg.target)
        self._relays[seq] = _Relay(NodeId(msg.sender), msg.sender_address, msg.seq, target,
                                   now_ms + self.config.probe_interval_ms)
        out.append(self._ping(target, msg.target_address, seq))
        return out

    def on_discovered(self, node_id: str, address: str, incarnation: int, now_ms: int) -> list[Effect]:
        """A hint from zeroconf or a seed that `node_id` may be at `address`. Never gossiped."""
        if not isinstance(node_id, str) or not 0 < len(node_id) <= self.config.node_id_chars_max:
            raise ProtocolError("a discovered node id must be a short, non-empty string")
        if not isinstance(address, str) or len(address) > self.config.address_chars_max:
            raise ProtocolError("a discovered address must be a short string")
        if type(incarnation) is not int or not 0 <= incarnation <= _INCARNATION_MAX:
            raise ProtocolError("a discovered incarnation must be a non-negative integer")
        out: list[Effect] = []
        self._maybe_notice_stall(now_ms)
        if node_id == self.node_id:
            return out
        m = self._members.get(NodeId(node_id))
        if m is not None and m.state is not State.ALIVE:
            self._maybe_verify(m, address, now_ms, out)
            return out
        self._apply(Update(NodeId(node_id), address, incarnation, State.ALIVE), now_ms, out, gossip=False)
        return out

    def join(self, addresses: list[str], now_ms: int) -> list[Effect]:
        """Ping seeds whose ids we do not know yet; their Acks make them members."""
        self._maybe_notice_stall(now_ms)
        return [self._ping(None, address, self._next_seq()) for address in addresses[:self.config.refute_fanout_max]]

    def leave(self, now_ms: int) -> list[Effect]:
        """Leave gracefully: say so to up to refute_fanout_max members at once, then stop probing.

        The caller keeps delivering messages (and ticking) for a moment, so that gossip spreads it."""
        if self.left:
            return []
        self._maybe_notice_stall(now_ms)
        self.left = True
        self._probe = None
        self._gossip[self.node_id] = 0
        out: list[Effect] = [MemberChanged(self.node_id, self.address, State.LEFT, self.incarnation, now_ms)]
        self._fan_out(out)
        return out

    # ---------------------------------------------------------------- probing

    def _maybe_probe_indirectly(self, now_ms: int, out: list[Effect]) -> None:
        probe = self._probe
        if probe is None or probe.acked or probe.indirect_sent or now_ms < probe.indirect_at_ms:
            return
        probe.indirect_sent = True
        target = self._members.get(probe.target)
        if target is None:
            return
        helpers = [n for n in sorted(self._members)
                   if n != probe.target and self._members[n].state is State.ALIVE]
        for helper in self._rng.sample(helpers, min(self.config.indirect_probes, len(helpers))):
            m = self._members[helper]
            req = PingReq(probe.seq, self.node_id, self.address, self.incarnation, probe.target,
                          target.address, self._piggyback(helper))
            out.append(Send(helper, m.address, req))
            self.counters["ping_reqs_sent"] += 1

    def _maybe_end_probe(self, now_ms: int, out: list[Effect]) -> None:
        probe, self._probe = self._probe, None
        if probe is None or probe.acked:
            return
        m = self._members.get(probe.target)
        if m is None or m.state is not State.ALIVE or m.incarnation != probe.incarnation:
            return  # it refuted, left or changed meanwhile: this probe says nothing new
        self.counters["suspicions"] += 1
        self._apply(Update(m.node, m.address, m.incarnation, State.SUSPECT), now_ms, out)

    def _maybe_start_probe(self, now_ms: int, out: list[Effect]) -> None:
        target = self._next_target()
        if target is None:
            return
        m = self._members[target]
        seq = self._next_seq()
        self._probe = _Probe(target, seq, m.incarnation, now_ms + self.config.ack_timeout_ms)
        out.append(self._ping(target, m.address, seq))

    def _next_target(self) -> NodeId | None:
        for _ in range(2):  # the rest of this round, then one fresh round
            while self._order_index < len(self._order):
                node = self._order[self._order_index]
                self._order_index += 1
                m = self._members.get(node)
                if m is not None and m.state in _PROBED:
                    return node
            self._order = [n for n in sorted(self._members) if self._members[n].state in _PROBED]
            self._rng.shuffle(self._order)
            self._order_index = 0
        return None

    def _maybe_verify(self, m: _Member, address: str, now_ms: int, out: list[Effect]) -> None:
        """A record says a node we hold non-ALIVE may be at `address`: ask it, never take the record's word."""
        if m.notified_ms is not None and now_ms - m.notified_ms < self.config.probe_interval_ms:
            return
        m.notified_ms = now_ms
        # Addressed by address alone when it moved: a shell keeps one connection per known member, at
        # the address it knows, and a restarted node may listen elsewhere. The target id still says
        # who must answer.
        ping = self._ping(m.node, address, self._next_seq())
        out.append(ping if address == m.address else Send(None, address, ping.message))

    def _maybe_reconnect(self, out: list[Effect]) -> None:
        """Ping a few DEAD members, round-robin: a partition that outlived the suspicion heals."""
        dead = [n for n in sorted(self._members) if self._members[n].state is State.DEAD]
        start = next((i for i, n in enumerate(dead) if n > self._reconnect_after), 0)
        for node in (dead[start:] + dead[:start])[:self.config.reconnect_probes_max]:
            self._reconnect_after = node
            out.append(self._ping(node, self._members[node].address, self._next_seq()))

    # ---------------------------------------------------------------- timers

    def _expire_suspicions(self, now_ms: int, out: list[Effect]) -> None:
        for node in sorted(self._members):
            m = self._members[node]
            if m.suspect_deadline_ms is not None and now_ms >= m.suspect_deadline_ms:
                self.counters["deaths_declared"] += 1
                self._apply(Update(node, m.address, m.incarnation, State.DEAD), now_ms, out)

    def _expire_relays(self, now_ms: int) -> None:
        for seq in [s for s, r in sorted(self._relays.items()) if now_ms >= r.expires_ms]:
            del self._relays[seq]

    def _forget_tombstones(self, now_ms: int) -> None:
        for node in sorted(self._members):
            m = self._members[node]
            if m.state in _GONE and now_ms - m.state_since_ms >= self.config.tombstone_ms:
                self._forget(node)

    def _maybe_notice_stall(self, now_ms: int) -> None:
        late_ms = now_ms - self.next_deadline_ms()
        if late_ms >= self.config.stall_ms_min:
            self.counters["stalls"] += 1
            self._shift_deadlines(now_ms - self._last_event_ms)
        self._last_event_ms = max(self._last_event_ms, now_ms)

    def _shift_deadlines(self, shift_ms: int) -> None:
        self._next_probe_ms += shift_ms
        self._next_reconnect_ms += shift_ms
        if self._probe is not None:
            self._probe.indirect_at_ms += shift_ms
        for m in self._members.values():
            if m.suspect_deadline_ms is not None:
                m.suspect_deadline_ms += shift_ms
        for r in self._relays.values():
            r.expires_ms += shift_ms

    # ---------------------------------------------------------------- rumours

    def _check(self, msg: Any) -> list[Update]:
        """The updates of a peer message, after checking every field: peer input is never trusted."""
        c = self.config
        name = type(msg).__name__
        if type(msg.seq) is not int or not 0 <= msg.seq <= _INCARNATION_MAX:
            raise ProtocolError(f"{name}.seq must be a non-negative integer")
        if not isinstance(msg.sender, str) or not 0 < len(msg.sender) <= c.node_id_chars_max:
            raise ProtocolError(f"{name}.sender must be a non-empty node id of at most {c.node_id_chars_max} characters")
        if msg.sender == self.node_id:
            raise ProtocolError(f"{name} from a node that uses this node's id {self.node_id!r}: node ids must be unique")
        if not isinstance(msg.sender_address, str) or len(msg.sender_address) > c.address_chars_max:
            raise ProtocolError(f"{name}.sender_address must be a string of at most {c.address_chars_max} characters")
        if type(msg.sender_incarnation) is not int or not 0 <= msg.sender_incarnation <= _INCARNATION_MAX:
            raise ProtocolError(f"{name}.sender_incarnation must be a non-negative integer")
        if not isinstance(msg.target, str) or len(msg.target) > c.node_id_chars_max:
            raise ProtocolError(f"{name}.target must be a node id")
        if not isinstance(msg.updates, (list, tuple)) or len(msg.updates) > c.updates_per_message_max:
            raise ProtocolError(f"{name}.updates must be a list of at most {c.updates_per_message_max} updates")
        return [self._parse_update(name, raw) for raw in msg.updates]

    def _parse_update(self, name: str, raw: Any) -> Update:
        c = self.config
        if not isinstance(raw, (list, tuple)) or len(raw) != 4:
            raise ProtocolError(f"{name} carries an update that is not [node, address, incarnation, state]")
        node, address, incarnation, state = raw
        if not isinstance(node, str) or not 0 < len(node) <= c.node_id_chars_max:
            raise ProtocolError(f"{name} carries an update with a bad node id")
        if not isinstance(address, str) or len(address) > c.address_chars_max:
            raise ProtocolError(f"{name} carries an update with a bad address")
        if type(incarnation) is not int or not 0 <= incarnation <= _INCARNATION_MAX:
            raise ProtocolError(f"{name} carries an update with a bad incarnation")
        if state not in _STATES_BY_NAME:
            raise ProtocolError(f"{name} carries an update with unknown state {state!r}")
        return Update(NodeId(node), address, incarnation, _STATES_BY_NAME[state])

    def _on_sender(self, msg: Any, now_ms: int, out: list[Effect]) -> None:
        """A message straight from its sender: the sender is alive at the incarnation it claims."""
        sender = NodeId(msg.sender)
        self._apply(Update(sender, msg.sender_address, msg.sender_incarnation, State.ALIVE), now_ms, out)
        m = self._members.get(sender)
        if m is None:
            return
        m.last_seen_ms = now_ms
        m.claimed_incarnation = max(m.claimed_incarnation, msg.sender_incarnation)
        if msg.sender_incarnation >= m.incarnation:
            m.address = msg.sender_address  # direct evidence of where it is now

    def _apply_all(self, updates: list[Update], now_ms: int, out: list[Effect]) -> None:
        for u in updates:
            self._apply(u, now_ms, out)

    def _apply(self, u: Update, now_ms: int, out: list[Effect], gossip: bool = True) -> None:
        if u.node == self.node_id:
            self._maybe_refute(u, now_ms, out)
            return
        m = self._members.get(u.node)
        if m is None:
            if u.state is State.SUSPECT or not self._make_room():
                return  # a suspicion of a node we never knew tells us nothing we can act on
            m = _Member(u.node, u.address, u.incarnation, u.state, now_ms)
            self._members[u.node] = m
            if u.state in _PROBED:
                # SWIM: a new member joins the current round at a random place, so it is probed soon.
                self._order.insert(self._rng.randint(self._order_index, len(self._order)), u.node)
        elif _supersedes(u, m.incarnation, m.state):
            state_changed = u.state is not m.state
            m.address, m.incarnation, m.state = u.address, u.incarnation, u.state
            if state_changed:
                m.state_since_ms = now_ms
        else:
            return
        m.suspect_deadline_ms = now_ms + self.config.suspicion_timeout_ms if m.state is State.SUSPECT else None
        if gossip:
            self._gossip[u.node] = 0
        out.append(MemberChanged(m.node, m.address, m.state, m.incarnation, now_ms))
        if m.state is State.SUSPECT:
            # Tell the suspect itself: if it is merely stopped, the notice waits in its inbox and it
            # refutes as soon as it runs again, well before the suspicion times out.
            self._maybe_notify(m.node, now_ms, out)

    def _maybe_refute(self, u: Update, now_ms: int, out: list[Effect]) -> None:
        if self.left:
            return
        if u.incarnation < self.incarnation or (u.incarnation == self.incarnation and u.state is State.ALIVE):
            return
        self.incarnation = u.incarnation + 1
        self.counters["refutations"] += 1
        self._gossip[self.node_id] = 0
        out.append(MemberChanged(self.node_id, self.address, State.ALIVE, self.incarnation, now_ms))
        self._fan_out(out)

    def _maybe_notify(self, node: NodeId, now_ms: int, out: list[Effect]) -> None:
        """Tell `node` directly what we hold about it, when that is news it must act on."""
        m = self._members.get(node)
        if m is None or m.state is State.ALIVE and m.claimed_incarnation >= m.incarnation:
            return
        if m.state is State.LEFT:
            return  # a departed node does not refute; telling it again would only ping-pong
        if m.notified_ms is not None and now_ms - m.notified_ms < self.config.probe_interval_ms:
            return
        m.notified_ms = now_ms
        out.append(self._ping(node, m.address, self._next_seq()))

    def _fan_out(self, out: list[Effect]) -> None:
        peers = [n for n in sorted(self._members) if self._members[n].state in _PROBED]
        if len(peers) > self.config.refute_fanout_max:
            peers = sorted(self._rng.sample(peers, self.config.refute_fanout_max))
        for node in peers:
            out.append(self._ping(node, self._members[node].address, self._next_seq()))

    def _make_room(self) -> bool:
        if len(self._members) < self.config.members_max:
            return True
        tombstones = [(m.state_since_ms, n) for n, m in self._members.items() if m.state in _GONE]
        if not tombstones:
            self.counters["members_refused"] += 1
            return False
        self._forget(min(tombstones)[1])
        return True

    def _forget(self, node: NodeId) -> None:
        del self._members[node]
        self._gossip.pop(node, None)

    # ---------------------------------------------------------------- sending

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _ping(self, to: NodeId | None, address: str, seq: int) -> Send:
        self.counters["pings_sent"] += 1
        msg = Ping(seq, self.node_id, self.address, self.incarnation, to or "", self._piggyback(to))
        return Send(to, address, msg)

    def _record(self, node: NodeId) -> Update:
        if node == self.node_id:
            return Update(self.node_id, self.address, self.incarnation, State.LEFT if self.left else State.ALIVE)
        m = self._members[node]
        return Update(m.node, m.address, m.incarnation, m.state)

    def _piggyback(self, recipient: NodeId | None) -> list:
        """The updates one message carries: news for the recipient, fresh rumours, then anti-entropy."""
        c = self.config
        chosen: list[NodeId] = []
        m = self._members.get(recipient) if recipient else None
        if m is not None and (m.state is not State.ALIVE or m.claimed_incarnation < m.incarnation):
            chosen.append(m.node)
        limit = c.retransmit_mult * math.ceil(math.log2(len(self._members) + 2))
        fresh_max = c.piggyback_updates_max - c.anti_entropy_updates_max
        for node, sent in sorted(self._gossip.items(), key=lambda item: (item[1], item[0])):
            if len(chosen) >= fresh_max:
                break
            if node in chosen:
                continue
            chosen.append(node)
            if sent + 1 >= limit:
                del self._gossip[node]
            else:
                self._gossip[node] = sent + 1
        self._fill(chosen, c.piggyback_updates_max)
        return [self._record(n).to_wire() for n in chosen]

    def _fill(self, chosen: list[NodeId], total_max: int) -> None:
        """Anti-entropy: table records taken round-robin, so disagreeing views meet again."""
        nodes = sorted(self._members)
        start = next((i for i, n in enumerate(nodes) if n > self._fill_after), 0)
        added = 0
        for node in nodes[start:] + nodes[:start]:
            if len(chosen) >= total_max or added >= self.config.anti_entropy_updates_max:
                break
            if node not in chosen:
                chosen.append(node)
                added += 1
                self._fill_after = node
