"""The other nodes: one DEALER each with its requests awaiting answers, the PUB/SUB replication
stream, heartbeats naming what each node leads, and who counts as alive.
"""
from __future__ import annotations

from typing import Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from zq import protocol as P
from zq.core.repl_types import LEADER
from zq.errors import LeaderNotAvailable, ZqError, from_wire
from zq.io import security
from zq.types import TopicPartition
from zq.io.node_common import (NODE_ALIVE_MS, NODE_DEAD_MS, NODE_HEARTBEAT_MS, PEER_HEARTBEAT_IVL_MS,
                               PEER_HEARTBEAT_TIMEOUT_MS, PEER_PENDING_MAX, log,
                               PEER_REQUEST_TIMEOUT_MS, mono_ms)


MONITOR_EVENTS_DRAIN_MAX = 64   # monitor events read per readable poll of one peer's monitor


class _Peer:
    """One DEALER to another node's ROUTER, with the requests sent on it that await an answer."""

    def __init__(self, ctx: zmq.Context, name: str, address: str, keys: Any = None):
        self.name = name
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        if keys is not None:
            security.peer_socket(self.sock, keys)   # nodes talk to each other as Curve clients with the cluster key
        self.sock.setsockopt(zmq.LINGER, 0)          # a stopping node must not wait on a dead peer
        self.sock.setsockopt(zmq.SNDHWM, 10_000)     # bounded queue towards one peer (queued while it connects)
        self.sock.setsockopt(zmq.RCVHWM, 10_000)
        self.sock.setsockopt(zmq.SNDTIMEO, 0)        # never block the loop on a send
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, PEER_HEARTBEAT_IVL_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, PEER_HEARTBEAT_TIMEOUT_MS)
        # Told when a connection to the peer closes (its process ended: the replicas it leads
        # elect again at once, see Replica.peer_lost). Polled by the loop beside `sock`.
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(f"tcp://{address}")
        self.pending: dict[int, tuple[int, Callable[[Any, list], None]]] = {}
        self.last_seen_ms = 0

    def disconnected(self) -> bool:
        """Whether the monitor reported a closed connection since the last call (events drained)."""
        lost = False
        for _ in range(MONITOR_EVENTS_DRAIN_MAX):
            try:
                event = recv_monitor_message(self.monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            lost = lost or event["event"] == zmq.EVENT_DISCONNECTED
        return lost

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        self.sock.close(0)


def _pub_address(address: str) -> str:
    host, port = address.rsplit(":", 1)
    return f"{host}:{int(port) + 1}"


class PeersMixin:
    """Part of zq.io.node.Node (a mixin: the state it uses is set up in Node.__init__)."""

    def _connect_sub(self, peer: str) -> None:
        address = self.addresses.get(peer)
        if address is None or self.sub_connected.get(peer) == address:
            return
        if peer in self.sub_connected:
            self.sub.disconnect(f"tcp://{_pub_address(self.sub_connected[peer])}")
        self.sub.connect(f"tcp://{_pub_address(address)}")
        self.sub_connected[peer] = address

    def _heard(self, name: str) -> None:
        self.last_heard[name] = mono_ms()

    def _last_seen_ago_ms(self, name: str, now: int) -> int | None:
        if name == self.name:
            return 0
        if self.member_view is not None:
            seen = self.member_view(name, now)
            if seen is not None and seen[1] is not None:
                return seen[1]
        last = self.last_heard.get(name)
        return None if last is None else now - last

    def _node_state(self, name: str, now: int) -> str:
        if self.member_view is not None and name != self.name:
            seen = self.member_view(name, now)
            if seen is not None:
                return seen[0]
        ago = self._last_seen_ago_ms(name, now)
        if ago is None:
            return "unknown"
        return "alive" if ago <= NODE_ALIVE_MS else "suspect" if ago <= NODE_DEAD_MS else "dead"

    def _alive(self, name: str) -> bool:
        return name == self.name or self._node_state(name, mono_ms()) == "alive"

    def _live_nodes(self) -> list[str]:
        """Nodes that may be given replicas: registered, and not known to be dead. A suspect node
        counts (a busy node misses a probe now and then; placement is not worth refusing over it)."""
        now = mono_ms()
        return sorted(n for n in set(self.meta.nodes) | {self.name}
                      if n == self.name or self._node_state(n, now) in ("alive", "suspect"))

    def on_node_heartbeat(self, identity: bytes, msg: P.NodeHeartbeat, payload: list[bytes]) -> None:
        if msg.sender == self.name:
            return
        self._heard(msg.sender)
        self.meta_applied_by[msg.sender] = msg.meta_applied
        if self.pending_creates:
            self._check_pending_creates()
        if self.addresses.get(msg.sender) != msg.address:
            self.addresses[msg.sender] = msg.address
            self._forget_peer(msg.sender)
        for item in msg.leaders:
            if isinstance(item, list) and len(item) == 3 and all(type(x) is int for x in item):
                tp = TopicPartition(item[0], item[1])
                known = self.leader_view.get(tp)
                if known is None or item[2] >= known[1]:
                    self.leader_view[tp] = (msg.sender, item[2])

    def _send_heartbeats(self, again: bool = True) -> None:
        if self.stopping:
            return
        if self.lazy_hard_states and again:
            self._begin()   # the pass's write carries the waiting high-watermark hints
        leaders = [[tp.topic_id, tp.partition, part.replica.epoch] for tp, part in sorted(self.parts.items())
                   if part.replica is not None and part.replica.role == LEADER]
        beat = P.NodeHeartbeat(0, self.name, self.config.address, self.incarnation, leaders, self.meta.applied)
        for name in sorted(self.addresses):
            peer = self._peer(name)
            if peer is not None:
                self._peer_send(peer, beat)
        if not again:
            return
        self._at(mono_ms() + NODE_HEARTBEAT_MS, self._send_heartbeats)

    def _peer(self, name: str, address: str | None = None) -> _Peer | None:
        peer = self.peers.get(name)
        if peer is None:
            address = address or self.addresses.get(name)
            if address is None:
                return None
            peer = self.peers[name] = _Peer(self.ctx, name, address, self.keys)
        return peer

    def _forget_peer(self, name: str) -> None:
        """Its address changed: the next message opens a new connection; SUB reconnects too."""
        peer = self.peers.get(name)
        if peer is not None and peer.address != self.addresses.get(name):
            try:
                peer.sock.disconnect(f"tcp://{peer.address}")
            except zmq.ZMQError:
                pass   # never connected there
            peer.address = self.addresses[name]
            peer.sock.connect(f"tcp://{peer.address}")
        if any(name in (p.replica.replicas if p.replica else ()) for p in self.parts.values()):
            self._connect_sub(name)

    def _on_peer_monitor(self, peer: _Peer) -> None:
        if peer.disconnected() and not peer.name.startswith("seed:"):
            self.counters["peer_disconnects"] += 1
            if self.replica_set.peer_lost(peer.name, mono_ms(), self._wall_clock()):
                log.info("the connection to %s closed: the partitions it leads here elect again now", peer.name)

    def _request(self, name: str, msg: Any, on_reply: Callable[[Any, list], None],
                 timeout_ms: int = PEER_REQUEST_TIMEOUT_MS, address: str | None = None, frames: tuple | list = ()) -> None:
        """Send `msg` to a peer; `on_reply(reply_or_error, payload)` runs once, with a ZqError on timeout."""
        peer = self._peer(name, address)
        if peer is None or len(peer.pending) >= PEER_PENDING_MAX:
            on_reply(LeaderNotAvailable(f"node {name} is not reachable"), [])
            return
        req_id = msg.req_id
        peer.pending[req_id] = (mono_ms() + timeout_ms, on_reply)
        self._peer_send(peer, msg, list(frames))
        self._at(mono_ms() + timeout_ms, lambda: self._request_timed_out(peer, req_id))

    def _request_timed_out(self, peer: _Peer, req_id: int) -> None:
        entry = peer.pending.pop(req_id, None)
        if entry is not None:
            entry[1](LeaderNotAvailable(f"node {peer.name} did not answer in time"), [])

    def _on_peer_frames(self, peer: _Peer, frames: list[bytes]) -> None:
        try:
            msg, payload = P.decode(frames, self.limits)
        except ZqError:
            self.counters["protocol_errors"] += 1
            return
        peer.last_seen_ms = mono_ms()
        if not peer.name.startswith("seed:"):
            self._heard(peer.name)
        entry = peer.pending.pop(getattr(msg, "req_id", -1), None)
        if entry is not None:
            reply = from_wire(msg.code, msg.message, msg.data) if isinstance(msg, P.ErrorReply) else msg
            entry[1](reply, payload)
