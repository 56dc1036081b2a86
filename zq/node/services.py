"""What a node service may use of its node, and what a node asks of a service: two typed Protocols.

A service (consumer groups, membership, ...) is written against `ServiceHost` only, so that the
same code runs in the real node (zq/io/node.py's `Node` is a ServiceHost) and in a simulator
(zq/sim/group_host.py's `SimServiceHost`). It never opens a socket, reads a clock, draws
randomness from the operating system or reaches into the node's store or metadata by other
means: everything it needs of the world is one of the methods below, which keep the node's
loop rules (persist, then send; bounded everything) for it too.

Rules of the surface:

- Messages go out through `reply`, `reply_error`, `send_to_peer` and `request_peer`. They leave
  after the pass's write transaction (`write()`) has committed (fsynced too if the pass asked
  for `write_synced()`); `at(now_ms(), fn)` runs `fn` after that commit.
- `now_ms()` is a monotonic clock for timers; `wall_ms()` is the node's wall clock, for what is
  stored or compared across nodes. `random_bits(n)` is the service's only source of randomness
  (a simulator draws it from its seed).
- Store reads are narrow: `get_meta(key)`, `scan_meta(prefix)` (start-up only: not for the
  loop), `offset_for_time(tp, ms)`. Writes go through `write().put_meta(key, value)`.
- Partition data goes through `leads`/`leader_of`/`leader_address`, `partition_bounds`,
  `read_committed` and `produce_local` (on a partition this node leads; else send a Produce to
  its leader with `request_peer`).

The membership service (zq/node/membership.py) needs less of its node and more of the LAN: it
is written against `MembershipHost` (send to an address, the clock, counters, learn_address),
`DiscoverySource` (zeroconf's found peers in, our incarnation out) and `MembershipEvents` (what
the real node logs and a simulator checks), at the end of this module.

This module loads only the standard library.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, Protocol

from zq.types import TopicPartition


class TopicView(Protocol):
    """One topic as the node's applied metadata has it (zq.core.metadata.TopicMeta)."""
    name: str
    id: int
    partitions: list[list[str]]     # replica set per partition, preferred leader first
    config: dict[str, Any]


class MetaView(Protocol):
    """The node's applied cluster metadata, read-only for a service (zq.core.metadata.MetadataState)."""
    topics: Mapping[str, Any]        # name -> TopicView
    topics_by_id: Mapping[int, Any]  # topic id -> TopicView

    def topic(self, name: str) -> Any:
        """The TopicView of `name`; raises UnknownTopic."""
        ...


class WriteTxn(Protocol):
    """The write transaction of the node's current pass (a service writes meta keys only)."""

    def put_meta(self, name: bytes, value: bytes) -> None: ...


class ServiceHost(Protocol):
    """Exactly what a service may use of its node."""

    name: str                                  # this node's name
    counters: MutableMapping[str, int]         # the node's counters (a defaultdict(int)): metrics
    meta: MetaView

    # ---- messages
    def reply(self, identity: bytes, msg: Any, *frames: bytes) -> None: ...
    def reply_error(self, identity: bytes, req_id: int, error: Any) -> None: ...
    def send_to_peer(self, name: str, msg: Any, *frames: bytes) -> bool: ...
    def request_peer(self, name: str, msg: Any, on_reply: Callable[[Any, list], None],
                     timeout_ms: int = ..., frames: tuple | list = ()) -> None:
        """`on_reply(reply_or_ZqError, payload)` runs exactly once (a ZqError on timeout)."""
        ...
    def next_req_id(self) -> int: ...

    # ---- storage (committed before the pass's sends)
    def write(self) -> WriteTxn: ...
    def write_synced(self) -> None: ...
    def get_meta(self, name: bytes) -> bytes | None: ...
    def scan_meta(self, prefix: bytes) -> Iterable[tuple[bytes, bytes]]:
        """(key without the store's meta prefix, value) of every meta key starting with `prefix`."""
        ...
    def offset_for_time(self, tp: TopicPartition, time_ms: int) -> int | None: ...

    # ---- time, timers, randomness
    def at(self, when_ms: int, fn: Callable[[], None]) -> None: ...
    def now_ms(self) -> int: ...
    def wall_ms(self) -> int: ...
    def random_bits(self, bits: int) -> int: ...

    # ---- the cluster and its partitions
    def known_nodes(self) -> list[str]: ...
    def leader_address(self, topic: str, partition: int) -> tuple[str | None, str | None]: ...
    def leads(self, topic: str, partition: int) -> bool: ...
    def leader_of(self, tp: TopicPartition) -> tuple[str | None, int]: ...
    def partition_bounds(self, topic: str, partition: int) -> tuple[int, int]: ...
    def produce_local(self, topic: str, partition: int, records: list[list], done: Callable[[Any], None],
                      acks_quorum: bool = True, producer_id: int = 0, base_sequence: int = 0) -> None: ...
    def read_committed(self, topic: str, partition: int, offset: int, max_bytes: int) -> list[bytes]: ...


class Service(Protocol):
    """What a node asks of a service it runs."""

    handlers: Mapping[type, Callable[[bytes, Any, list], None]]   # message type -> fn(identity, msg, payload)

    def tick(self, now_ms: int) -> None:
        """Every loop pass (keep it cheap)."""
        ...

    def close(self) -> None:
        """The node stops: last writes go into its final commit."""
        ...

    def on_high_watermark(self, topic: str, partition: int, high_watermark: int) -> None:
        """Data of a partition this node leads became visible."""
        ...


# ------------------------------------------------------------------ the membership service's hosts
# (zq.node.membership: the real node and zq/io/discovery.py in production, zq/sim/members_layer.py
# in the simulators)


class MembershipHost(Protocol):
    """What the membership service uses of its node (zq/io/node.py's `Node` is one)."""

    name: str                                  # this node's name: the core's node id
    counters: MutableMapping[str, int]         # the node's counters: `membership_*` metrics

    def now_ms(self) -> int:
        """Monotonic milliseconds."""
        ...

    def send_to_address(self, name: str | None, address: str, msg: Any, *frames: bytes) -> None:
        """A one-way message to a node's ROUTER at `address` (`name` None: a seed not known yet)."""
        ...

    def learn_address(self, name: str, address: str) -> None:
        """The detector holds `name` alive or suspect at `address`: route to it there."""
        ...


class DiscoveredPeer(Protocol):
    """One discovery record (zq.io.discovery.Peer): who may be at host:port, at which incarnation."""
    node: str
    host: str
    port: int
    incarnation: int


class DiscoverySource(Protocol):
    """Discovery (zeroconf) as the membership service uses it: found peers in, our incarnation out."""

    def drain(self, max_peers: int) -> list[Any]:
        """DiscoveredPeers found since the last call, oldest first, at most `max_peers`; never blocks."""
        ...

    def pending(self) -> bool:
        """Whether `drain` would return something (a host that cannot tell says True)."""
        ...

    def update_incarnation(self, incarnation: int) -> None:
        """Announce our record again, at the incarnation our core raised (a refutation)."""
        ...


class MembershipEvents(Protocol):
    """What the membership service reports beyond its effects: the real node logs it, a simulator
    checks it."""

    def member_changed(self, change: Any, own: bool) -> None:
        """One MemberChanged (zq.core.membership), as the core decided it; `own`: about this node."""
        ...

    def input_refused(self, what: str, source: str, error: Exception) -> None:
        """Peer input the core refused (a message, a discovery record), counted and dropped."""
        ...
