"""The node's membership service, sans-IO: the SWIM core (zq.core.membership) fed by the node's
clock, its peers' messages, its seeds and discovery hints, with the core's effects carried out.

Theory of operation
-------------------
The rules of who is alive (probes, suspicion, incarnations, gossip) are the core's,
`zq.core.membership.Membership`. This service is what a node does around it, written against
typed hosts (`zq.node.services`): `MembershipHost` (send to an address, the clock, counters,
learn_address), `DiscoverySource` (found peers in, our incarnation out) and `MembershipEvents`
(what a host logs or checks). Two hosts run it: the real node (zq/io/membership.py: zeroconf,
sockets, logging) and the membership simulator (zq/sim/members_layer.py: a simulated network and
discovery model), which the cluster simulator embeds.

- Effects: `Send(to, address, message)` goes out with `host.send_to_address`, one-way, to the
  receiver's ROUTER (every membership message is one-way: a reply is just another Send).
  `MemberChanged(node, ...)` is counted (`membership_became_<state>` in the host's counters, so
  `/metrics` shows them) and reported to `events`; for a member the event leaves alive or
  suspect, its address goes to `host.learn_address`. The node learns addresses from the core's verdict,
  never from raw discovery records: the core's precedence rule (a newer incarnation wins) keeps a
  stale record of a crashed node from pointing the node at it. A change of our own incarnation
  (a refutation) is re-announced: `discovery.update_incarnation`.
- Events come from three places: peer messages (`on_ping`/`on_ack`/`on_ping_req`, the node's
  handlers for Ping, Ack and PingReq on its ROUTER), the clock (`tick(now_ms)`: the real node
  calls it every loop pass; it calls the core only when the core's next deadline is due, so a
  busy loop costs a few comparisons; a host that sleeps between events, the simulator, wakes it
  at `next_due_ms()`), and hints: discovery records drained every `DISCOVERY_DRAIN_MS`
  (at most `DISCOVERED_PER_PASS_MAX` a pass), and seeds, pinged at start and again every
  `SEED_RETRY_MS` while no live member holds the seed's address.
- Re-pinging seeds, and the core's own reconnect pings to DEAD members, heal a network
  partition: the two sides declared each other dead and SWIM never probes the dead, but such a
  ping carries our record of the node, and a live node refutes it with a higher incarnation. A
  discovery record of a node held suspect or dead makes the core ping it rather than believe it.
- `view(name, now_ms)` answers the node's "what state is node N in, and how long since it was
  heard from?" (`zq status`, routing). It reads a snapshot taken after each core event, never
  the core itself, so status and routing cost a dict lookup.
- `leave(now_ms)`: the core leaves (members are told at once and stop probing us) and the service
  stops; it returns when the goodbye has had `LEAVE_FLUSH_MS` to leave, the time before which the
  host must not close its sockets.

Invariants: peer input the core refuses (ProtocolError) is counted (`membership_protocol_errors`,
`membership_bad_discoveries`), reported to `events` and dropped, never raised into the node;
seeds and discovered peers per pass are bounded (`SEEDS_PER_PASS_MAX`, `DISCOVERED_PER_PASS_MAX`);
iteration is in sorted or given order, so one seed gives one trace in a simulator.

Standard library only.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Iterable

from zq.core.membership import (DISCOVERY_DRAIN_MS, LEAVE_FLUSH_MS, NODE_MEMBERSHIP, SEED_RETRY_MS, SEEDS_PER_PASS_MAX,
                                Ack, MemberChanged, MemberView, Membership, MembershipConfig, Ping, PingReq, Send,
                                State)
from zq.errors import ProtocolError
from zq.node.services import DiscoverySource, MembershipEvents, MembershipHost

__all__ = ["MembershipService", "DISCOVERED_PER_PASS_MAX", "DISCOVERY_DRAIN_MS", "LEAVE_FLUSH_MS", "NODE_MEMBERSHIP",
           "SEED_RETRY_MS", "SEEDS_PER_PASS_MAX"]

DISCOVERED_PER_PASS_MAX = 256     # found peers handed to the core per drain
_LIVE = (State.ALIVE, State.SUSPECT)


class MembershipService:
    """One node's failure detector around its SWIM core. See the module docstring."""

    def __init__(self, host: MembershipHost, address: str, incarnation: int, seeds: Iterable[str],
                 rng: random.Random, config: MembershipConfig = NODE_MEMBERSHIP,
                 discovery: DiscoverySource | None = None, events: MembershipEvents | None = None) -> None:
        self.host = host
        self.address = address
        now = host.now_ms()
        self.core = Membership(host.name, address, incarnation, rng, now, config)
        self.handlers: dict[type, Callable[[bytes, Any, list], None]] = {
            Ping: self.on_ping, Ack: self.on_ack, PingReq: self.on_ping_req}
        self.seeds = [s for s in dict.fromkeys(seeds) if s != address]
        self.discovery = discovery
        self.events = events
        self.closed = False
        self._next_due_ms = now
        self._next_drain_ms = now
        self._next_seed_ms = now
        self._view: dict[str, MemberView] = {}
        self._snapshot(now)

    # ------------------------------------------------------------------ events

    def tick(self, now_ms: int) -> None:
        """Run whatever is due: a discovery drain, a seed retry, the core's deadline."""
        if self.closed:
            return
        if now_ms >= self._next_drain_ms:
            self._next_drain_ms = now_ms + DISCOVERY_DRAIN_MS
            self._drain_discovery(now_ms)
        if now_ms >= self._next_seed_ms:
            self._next_seed_ms = now_ms + SEED_RETRY_MS
            self._join_seeds(now_ms)
        if now_ms >= self._next_due_ms:
            self._apply(self.core.tick(now_ms), now_ms)

    def next_due_ms(self) -> int | None:
        """When `tick` next has work (None once the service stopped). A drain counts only while
        the discovery source says records wait (`pending`)."""
        if self.closed:
            return None
        due = self._next_due_ms
        if self.seeds:
            due = min(due, self._next_seed_ms)
        if self.discovery is not None and self.discovery.pending():
            due = min(due, self._next_drain_ms)
        return due

    def on_ping(self, identity: bytes, msg: Ping, payload: list) -> None:
        self.on_message(msg)

    def on_ack(self, identity: bytes, msg: Ack, payload: list) -> None:
        self.on_message(msg)

    def on_ping_req(self, identity: bytes, msg: PingReq, payload: list) -> None:
        self.on_message(msg)

    def on_message(self, msg: Ping | Ack | PingReq) -> None:
        if self.closed:
            return   # the node is closing: its loop no longer reads the socket
        now = self.host.now_ms()
        try:
            effects = self.core.on_message(msg, now)
        except ProtocolError as e:
            # Peer input: counted and dropped. Membership messages are one-way: there is no one to answer.
            self.host.counters["membership_protocol_errors"] += 1
            if self.events is not None:
                self.events.input_refused(type(msg).__name__, getattr(msg, "sender", ""), e)
            return
        self._apply(effects, now)

    def leave(self, now_ms: int) -> int:
        """Leave the cluster and stop; returns when the goodbye has had its time to leave."""
        if not self.closed:
            self._apply(self.core.leave(now_ms), now_ms)
            self.closed = True
        return now_ms + LEAVE_FLUSH_MS

    def _drain_discovery(self, now_ms: int) -> None:
        if self.discovery is None:
            return
        effects: list = []
        for peer in self.discovery.drain(DISCOVERED_PER_PASS_MAX):
            try:
                effects += self.core.on_discovered(peer.node, f"{peer.host}:{peer.port}", peer.incarnation, now_ms)
            except ProtocolError as e:
                self.host.counters["membership_bad_discoveries"] += 1
                if self.events is not None:
                    self.events.input_refused("discovery record", str(peer.node), e)
        if effects:
            self._apply(effects, now_ms)

    def _join_seeds(self, now_ms: int) -> None:
        """Ping every seed that no live member answers for (all of them at start)."""
        live = {v.address for v in self._view.values() if v.state in _LIVE}
        lonely = [s for s in self.seeds if s not in live][:SEEDS_PER_PASS_MAX]
        if lonely:
            self._apply(self.core.join(lonely, now_ms), now_ms)

    # ------------------------------------------------------------------ effects

    def _apply(self, effects: list, now_ms: int) -> None:
        # One event may change a member twice (a message carrying its alive and its left record):
        # the node routes by the verdict the event ends with.
        last = {e.node: i for i, e in enumerate(effects) if isinstance(e, MemberChanged)}
        for i, effect in enumerate(effects):
            if isinstance(effect, Send):
                self.host.send_to_address(effect.to, effect.address, effect.message)
            elif isinstance(effect, MemberChanged):
                self._on_member_changed(effect, last[effect.node] == i)
        self._next_due_ms = self.core.next_deadline_ms()
        self._snapshot(now_ms)
        if effects:
            self._count()

    def _on_member_changed(self, change: MemberChanged, final: bool) -> None:
        self.host.counters[f"membership_became_{change.state.value}"] += 1
        own = change.node == self.core.node_id
        if self.events is not None:
            self.events.member_changed(change, own)
        if own:
            if change.state is State.ALIVE and self.discovery is not None:
                self.discovery.update_incarnation(change.incarnation)   # a refutation: re-announce
            return
        if final and change.state in _LIVE and change.address:
            self.host.learn_address(change.node, change.address)

    def _snapshot(self, now_ms: int) -> None:
        self._view = {v.node: v for v in self.core.members(now_ms) if v.node != self.core.node_id}

    def _count(self) -> None:
        for name, value in self.core.counters.items():
            self.host.counters[f"membership_{name}"] = value

    # ------------------------------------------------------------------ queries

    def view(self, name: str, now_ms: int) -> tuple[str, int | None] | None:
        """(state, ms since last heard from directly, or None) of a member; None if not a member."""
        v = self._view.get(name)
        if v is None:
            return None
        return v.state.value, None if v.last_seen_ms is None else max(0, now_ms - v.last_seen_ms)

    def table(self) -> dict[str, MemberView]:
        """Every other member as the last snapshot has it (what `zq status` shows), by name."""
        return dict(self._view)

    def members(self) -> list[MemberView]:
        """Every member this node holds, itself included, sorted by name."""
        return self.core.members(self.host.now_ms())
