"""Installs the membership service (zq/node/membership.py: SWIM failure detection around the pure
core zq.core.membership) in a real node, with zeroconf discovery (zq/io/discovery.py) and logging.

Theory of operation
-------------------
This is a thin host. Every rule of the service (when to drain discovery, when to ping seeds
again, what a MemberChanged does, the refutation's re-announce, the view `zq status` reads) is in
`zq.node.membership.MembershipService`, which the simulators run too. The node itself is the
service's `MembershipHost` (`send_to_address`, `now_ms`, `counters`, `learn_address`); what is
left here is what only a real process has:

- zeroconf: `Discovery` is made here and started in a thread of its own, since announcing probes
  the LAN for a name clash for about a second and the node must not wait for that before it
  serves. It is the service's `DiscoverySource`. Whether discovery runs at all comes from the
  node's configuration (`--no-discovery`, or `discovery = "off"` in the topology file).
- logging (this class is the service's `MembershipEvents`): each member's transition once, at
  WARNING for suspect and dead; refused peer input at DEBUG (it is counted in any case).
- closing: the service leaves (members are told at once and stop probing us), and the goodbye
  gets its `LEAVE_FLUSH_MS` to leave the sockets before the node closes them; zeroconf
  unregisters.

`node.set_member_view(service.view)` makes the detector's verdict what `zq status` shows and what
the node routes by. The node calls `tick` every loop pass and the message handlers for Ping, Ack
and PingReq; both go straight to the service.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable

from zq.core.membership import NODE_MEMBERSHIP, MemberChanged, MembershipConfig, State
from zq.node.membership import MembershipService as _Service

log = logging.getLogger("zq.membership")

DISCOVERY_JOIN_S = 5.0            # on close, how long to wait for a zeroconf start still under way


class MembershipService:
    """One real node's failure detector and discovery. See the module docstring."""

    def __init__(self, node: Any, config: MembershipConfig = NODE_MEMBERSHIP, rng: random.Random | None = None,
                 discovery_factory: Callable[..., Any] | None = None) -> None:
        self.node = node
        self.service = _Service(node, node.config.address, node.incarnation, node.config.seeds,
                                rng or random.Random(), config, events=self)
        self.handlers = self.service.handlers
        self.tick = self.service.tick
        self.view = self.service.view
        self.members = self.service.members
        self.discovery: Any = None
        self._discovery_factory = discovery_factory
        self._discovery_thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self.discovery_enabled():
            self._start_discovery()
        else:
            log.info("membership: zeroconf discovery is off for %s; members come from seeds (%s)",
                     self.node.name, ", ".join(self.service.seeds) or "none")

    def discovery_enabled(self) -> bool:
        config = self.node.config
        topology = getattr(config, "topology", None)
        off_in_file = topology is not None and getattr(topology.cluster, "discovery", "zeroconf") == "off"
        return bool(config.discovery) and not off_in_file

    def _start_discovery(self) -> None:
        from zq.io.discovery import Discovery

        config = self.node.config
        factory = self._discovery_factory or Discovery
        self.discovery = factory(config.cluster, config.name, config.host, config.port, self.service.core.incarnation,
                                 pub_port=config.port + 1, metrics_port=config.port + 2 if config.metrics else None)
        self.service.discovery = self.discovery
        # Announcing probes for a name clash first (about a second): not on the event loop's time.
        self._discovery_thread = threading.Thread(target=self.discovery.start, name=f"zq-discovery-{config.name}",
                                                  daemon=True)
        self._discovery_thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        now = self.node.now_ms()
        flushed_ms = self.service.leave(now)
        time.sleep(max(0, flushed_ms - now) / 1000)  # the node closes its sockets (LINGER 0) right after us
        if self._discovery_thread is not None:
            self._discovery_thread.join(DISCOVERY_JOIN_S)
        if self.discovery is not None:
            self.discovery.close()

    # ------------------------------------------------------------------ MembershipEvents: the log

    def member_changed(self, change: MemberChanged, own: bool) -> None:
        if own:
            if change.state is State.ALIVE:
                log.warning("membership: %s was rumoured suspect or dead; refuted with incarnation %d",
                            change.node, change.incarnation)
            else:
                log.info("membership: %s leaves the cluster", change.node)
            return
        level = logging.WARNING if change.state in (State.SUSPECT, State.DEAD) else logging.INFO
        log.log(level, "membership: %s at %s is %s (incarnation %d)", change.node, change.address,
                change.state.value, change.incarnation)

    def input_refused(self, what: str, source: str, error: Exception) -> None:
        log.debug("membership: dropped a %s from %r: %s", what, source, error)


def install(node: Any) -> MembershipService:
    """Called by the node (NodeConfig.services) before its loop starts."""
    service = MembershipService(node)
    node.add_service(service)
    node.set_member_view(service.view)
    service.start()
    return service
