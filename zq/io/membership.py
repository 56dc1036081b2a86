"""The node's membership service: the SWIM core (zq.core.membership) and zeroconf discovery, wired
into the node's event loop.

Theory of operation
-------------------
This is a shell. The rules (probes, suspicion, incarnations, gossip) live in the pure core
`zq.core.membership.Membership`; this module feeds it events with the node's monotonic clock and
carries out the effects it returns:

- `Send(to, address, message)` goes out with `node.send_to_address`, one-way, to the receiver's
  ROUTER. Every membership message is one-way, so a reply is just another Send.
- `MemberChanged(node, ...)` is logged once per transition, counted (`membership_became_<state>`
  in the node's counters, so `/metrics` shows them), and, for a member judged alive or suspect,
  its address is handed to `node.learn_address`. The node learns addresses from the core's
  verdict, not from raw discovery records: the core's precedence rule (a newer incarnation
  wins) keeps a stale mDNS record of a crashed node from pointing the node at a wrong address.
  A change of our own incarnation (a refutation) is re-announced by zeroconf.

Events come from three places: peer messages (the node calls `on_ping`/`on_ack`/`on_ping_req`
for Ping, Ack and PingReq that arrive on its ROUTER), the clock (`tick(now_ms)` runs every loop
pass; it calls the core only when the core's next deadline is due, so a busy loop costs one
comparison), and hints: zeroconf peers drained from `Discovery` every `DISCOVERY_DRAIN_MS`, and
seeds, pinged at start and again every `SEED_RETRY_MS` while no live member holds the seed's
address. Re-pinging seeds, and the core's own reconnect pings to DEAD members every
`reconnect_interval_ms`, heal a network partition: the two sides declared each other dead and
SWIM never probes the dead, but such a ping carries our record of the node, and a live node
refutes it with a higher incarnation. A zeroconf record of a node held suspect or dead makes the
core ping it rather than believe it (a stale record never brings a crashed node back).

`view(name, now_ms)` answers the node's question "what state is node N in, and how long since it
was heard from?" (`node.set_member_view`), so `zq status` shows the detector's alive, suspect,
dead and left. It reads a snapshot taken after each core event, never the core itself, so
status and routing cost a dict lookup.

Discovery starts in a thread of its own: announcing probes the LAN for a name clash for about a
second, and the node must not wait for that before it serves. On close the core leaves
(members are told at once and stop probing us) and the goodbye gets `LEAVE_FLUSH_MS` to leave
the sockets before the node closes them; zeroconf unregisters.

Invariants: peer input that the core refuses (ProtocolError) is counted and dropped, never
raised into the node; seeds and discovered peers per pass are bounded (`SEEDS_PER_PASS_MAX`,
`DISCOVERED_PER_PASS_MAX`); iteration is in sorted or given order.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable

from zq.core.membership import (DISCOVERY_DRAIN_MS, LEAVE_FLUSH_MS, NODE_MEMBERSHIP, SEED_RETRY_MS,  # noqa: F401
                                SEEDS_PER_PASS_MAX, Ack, MemberChanged, MemberView, Membership, MembershipConfig, Ping,
                                PingReq, Send, State)
from zq.errors import ProtocolError

log = logging.getLogger("zq.membership")

DISCOVERED_PER_PASS_MAX = 256     # found peers handed to the core per drain
DISCOVERY_JOIN_S = 5.0            # on close, how long to wait for a zeroconf start still under way


class MembershipService:
    """One node's failure detector and discovery. See the module docstring."""

    def __init__(self, node: Any, config: MembershipConfig = NODE_MEMBERSHIP, rng: random.Random | None = None,
                 discovery_factory: Callable[..., Any] | None = None) -> None:
        self.node = node
        now = node.now_ms()
        self.address = node.config.address
        self.core = Membership(node.name, self.address, node.incarnation, rng or random.Random(), now, config)
        self.handlers = {Ping: self.on_ping, Ack: self.on_ack, PingReq: self.on_ping_req}
        self.seeds = [s for s in dict.fromkeys(node.config.seeds) if s != self.address]
        self.discovery: Any = None
        self._discovery_factory = discovery_factory
        self._discovery_thread: threading.Thread | None = None
        self._next_due_ms = now
        self._next_drain_ms = now
        self._next_seed_ms = now
        self._view: dict[str, MemberView] = {}
        self._closed = False
        self._snapshot(now)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self.discovery_enabled():
            self._start_discovery()
        else:
            log.info("membership: zeroconf discovery is off for %s; members come from seeds (%s)",
                     self.node.name, ", ".join(self.seeds) or "none")

    def discovery_enabled(self) -> bool:
        config = self.node.config
        topology = getattr(config, "topology", None)
        off_in_file = topology is not None and getattr(topology.cluster, "discovery", "zeroconf") == "off"
        return bool(config.discovery) and not off_in_file

    def _start_discovery(self) -> None:
        from zq.io.discovery import Discovery

        config = self.node.config
        factory = self._discovery_factory or Discovery
        self.discovery = factory(config.cluster, config.name, config.host, config.port, self.core.incarnation,
                                 pub_port=config.port + 1, metrics_port=config.port + 2 if config.metrics else None)
        # Announcing probes for a name clash first (about a second): not on the event loop's time.
        self._discovery_thread = threading.Thread(target=self.discovery.start, name=f"zq-discovery-{config.name}",
                                                  daemon=True)
        self._discovery_thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        now = self.node.now_ms()
        self._apply(self.core.leave(now), now)
        time.sleep(LEAVE_FLUSH_MS / 1000)  # the node closes its sockets (LINGER 0) right after us
        if self._discovery_thread is not None:
            self._discovery_thread.join(DISCOVERY_JOIN_S)
        if self.discovery is not None:
            self.discovery.close()

    # ------------------------------------------------------------------ events

    def tick(self, now_ms: int) -> None:
        if self._closed:
            return
        if now_ms >= self._next_drain_ms:
            self._next_drain_ms = now_ms + DISCOVERY_DRAIN_MS
            self._maybe_drain_discovery(now_ms)
        if now_ms >= self._next_seed_ms:
            self._next_seed_ms = now_ms + SEED_RETRY_MS
            self._maybe_join_seeds(now_ms)
        if now_ms >= self._next_due_ms:
            self._apply(self.core.tick(now_ms), now_ms)

    def on_ping(self, identity: bytes, msg: Ping, payload: list) -> None:
        self._on_message(msg)

    def on_ack(self, identity: bytes, msg: Ack, payload: list) -> None:
        self._on_message(msg)

    def on_ping_req(self, identity: bytes, msg: PingReq, payload: list) -> None:
        self._on_message(msg)

    def _on_message(self, msg: Any) -> None:
        now = self.node.now_ms()
        try:
            effects = self.core.on_message(msg, now)
        except ProtocolError as e:
            # Peer input: counted and dropped. Membership messages are one-way, so there is no one to answer.
            self.node.counters["membership_protocol_errors"] += 1
            log.debug("membership: dropped a %s: %s", type(msg).__name__, e)
            return
        self._apply(effects, now)

    def _maybe_drain_discovery(self, now_ms: int) -> None:
        if self.discovery is None:
            return
        effects = []
        for peer in self.discovery.drain(DISCOVERED_PER_PASS_MAX):
            try:
                effects += self.core.on_discovered(peer.node, f"{peer.host}:{peer.port}", peer.incarnation, now_ms)
            except ProtocolError as e:
                self.node.counters["membership_bad_discoveries"] += 1
                log.debug("membership: ignored a zeroconf record of %r: %s", peer.node, e)
        if effects:
            self._apply(effects, now_ms)

    def _maybe_join_seeds(self, now_ms: int) -> None:
        """Ping every seed that no live member answers for (all of them at start)."""
        live = {v.address for v in self._view.values() if v.state in (State.ALIVE, State.SUSPECT)}
        lonely = [s for s in self.seeds if s not in live][:SEEDS_PER_PASS_MAX]
        if lonely:
            self._apply(self.core.join(lonely, now_ms), now_ms)

    # ------------------------------------------------------------------ effects

    def _apply(self, effects: list, now_ms: int) -> None:
        changed = False
        for effect in effects:
            if isinstance(effect, Send):
                self.node.send_to_address(effect.to, effect.address, effect.message)
            elif isinstance(effect, MemberChanged):
                changed = True
                self._on_member_changed(effect)
        self._next_due_ms = self.core.next_deadline_ms()
        self._snapshot(now_ms)
        if changed or effects:
            self._count()

    def _on_member_changed(self, change: MemberChanged) -> None:
        self.node.counters[f"membership_became_{change.state.value}"] += 1
        if change.node == self.core.node_id:
            if change.state is State.ALIVE:
                log.warning("membership: %s was rumoured suspect or dead; refuted with incarnation %d",
                            change.node, change.incarnation)
                if self.discovery is not None:
                    self.discovery.update_incarnation(change.incarnation)
            else:
                log.info("membership: %s leaves the cluster", change.node)
            return
        level = logging.WARNING if change.state in (State.SUSPECT, State.DEAD) else logging.INFO
        log.log(level, "membership: %s at %s is %s (incarnation %d)", change.node, change.address,
                change.state.value, change.incarnation)
        if change.state in (State.ALIVE, State.SUSPECT) and change.address:
            self.node.learn_address(change.node, change.address)

    def _snapshot(self, now_ms: int) -> None:
        self._view = {v.node: v for v in self.core.members(now_ms) if v.node != self.core.node_id}

    def _count(self) -> None:
        for name, value in self.core.counters.items():
            self.node.counters[f"membership_{name}"] = value

    # ------------------------------------------------------------------ queries

    def view(self, name: str, now_ms: int) -> tuple[str, int | None] | None:
        """(state, ms since last heard from directly, or None) of a member; None if not a member."""
        v = self._view.get(name)
        if v is None:
            return None
        return v.state.value, None if v.last_seen_ms is None else max(0, now_ms - v.last_seen_ms)

    def members(self) -> list[MemberView]:
        """Every member this node holds, itself included, sorted by name."""
        return self.core.members(self.node.now_ms())


def install(node: Any) -> MembershipService:
    """Called by the node (NodeConfig.services) before its loop starts."""
    service = MembershipService(node)
    node.add_service(service)
    node.set_member_view(service.view)
    service.start()
    return service
