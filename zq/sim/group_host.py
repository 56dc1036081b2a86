"""The simulated host of the groups simulator: one `SimServiceHost` per simulated node runs the real
`zq.node.groups.GroupService` (it is a `zq.node.services.ServiceHost`).

Passes. Everything a node does happens in a pass (`run_pass`): a message handled or a timer run,
then the service's `tick`, then the pass's write transaction is committed to the store, then the
pass's messages go out (persist, then send, as the real node's loop). `at(now_ms(), fn)` runs
`fn` in a later pass, after that commit.

Store. A committed write sits in the page cache until the next sync (every `SYNC_MS`, or at once
when the pass asked for `write_synced()`); a crash loses each unsynced write with probability one
half. Memberships are not stored: a restarted node learns them by gossip.

The world (zq/sim/groups.py) owns the rest: the network, the clock (each node's wall clock is the
simulated time plus its skew), the abstract replicated logs (leader per partition, append, high
watermark) and the dead-letter partitions with their idempotent-producer table.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from zq import protocol as P
from zq.core.metadata import MetadataState
from zq.errors import LeaderNotAvailable, NotLeader
from zq.types import TopicPartition

if TYPE_CHECKING:
    from zq.node.groups import GroupService
    from zq.sim.groups import GroupSim

TOPIC, TOPIC_ID, DLQ_ID = "t", 1, 2      # the simulated cluster's topic; t.dlq has the next id
NODES = ("n1", "n2", "n3")
SYNC_MS = 50                  # the store's page cache reaches the disk this often
PEER_REQUEST_TIMEOUT_MS = 2_000


class SimStore:
    """Meta keys only (all a service writes): a disk and a page cache in front of it."""

    def __init__(self) -> None:
        self.disk: dict[bytes, bytes] = {}
        self.cache: dict[bytes, bytes] = {}

    def get(self, key: bytes) -> bytes | None:
        value = self.cache.get(key)
        return value if value is not None else self.disk.get(key)

    def sync(self) -> None:
        self.disk.update(self.cache)
        self.cache.clear()

    def crash(self, keep: Callable[[], bool]) -> None:
        for key in sorted(self.cache):   # unsynced writes: each lost or not
            if keep():
                self.disk[key] = self.cache[key]
        self.cache.clear()


class _Txn:
    def __init__(self, host: SimServiceHost) -> None:
        self.host = host

    def put_meta(self, name: bytes, value: bytes) -> None:
        self.host.pass_writes[name] = value


class SimServiceHost:
    """A simulated node as its service sees it."""

    def __init__(self, world: GroupSim, name: str, skew_ms: int, meta: MetadataState) -> None:
        self.world = world
        self.name = name
        self.skew_ms = skew_ms
        self.meta = meta
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.store = SimStore()
        self.up = True
        self.incarnation = 0
        self.service: GroupService | None = None
        self.pending: dict[int, Callable[[Any, list], None]] = {}
        self.outbox: list[tuple[str, str, Any, tuple]] = []
        self.pass_writes: dict[bytes, bytes] = {}
        self.sync_asked = False
        self._req_ids = 0

    # ---- messages

    def reply(self, identity: bytes, msg: Any, *frames: bytes) -> None:
        self.world.on_node_reply(self, identity.decode(), msg, frames)
        self.outbox.append((identity.decode(), "reply", msg, frames))

    def reply_error(self, identity: bytes, req_id: int, error: Any) -> None:
        self.reply(identity, P.error_reply(req_id, error))

    def send_to_peer(self, name: str, msg: Any, *frames: bytes) -> bool:
        self.outbox.append((name, "request", msg, frames))
        return True

    def request_peer(self, name: str, msg: Any, on_reply: Callable[[Any, list], None],
                     timeout_ms: int = PEER_REQUEST_TIMEOUT_MS, frames: tuple | list = ()) -> None:
        self.pending[msg.req_id] = on_reply
        self.world.on_node_request(self, name, msg, frames)
        self.outbox.append((name, "request", msg, tuple(frames)))
        self.world.at(self.world.now + timeout_ms, "host_timeout", self.name, self.incarnation, msg.req_id)

    def next_req_id(self) -> int:
        self._req_ids += 1
        return self._req_ids

    # ---- storage

    def write(self) -> _Txn:
        return _Txn(self)

    def write_synced(self) -> None:
        self.sync_asked = True

    def get_meta(self, name: bytes) -> bytes | None:
        value = self.pass_writes.get(name)
        return value if value is not None else self.store.get(name)

    def scan_meta(self, prefix: bytes) -> Iterable[tuple[bytes, bytes]]:
        merged = {**self.store.disk, **self.store.cache, **self.pass_writes}
        return [(k, merged[k]) for k in sorted(merged) if k.startswith(prefix)]

    def offset_for_time(self, tp: TopicPartition, time_ms: int) -> int | None:
        return self.world.offset_for_time(tp, time_ms)

    # ---- time, timers, randomness

    def at(self, when_ms: int, fn: Callable[[], None]) -> None:
        self.world.at(max(when_ms, self.world.now), "host_timer", self.name, self.incarnation, fn)

    def now_ms(self) -> int:
        return self.world.now

    def wall_ms(self) -> int:
        return max(0, self.world.now + self.skew_ms)

    def random_bits(self, bits: int) -> int:
        return self.world.rng.getrandbits(bits)

    # ---- the cluster and its partitions

    def known_nodes(self) -> list[str]:
        return list(self.world.node_names)

    def leader_of(self, tp: TopicPartition) -> tuple[str | None, int]:
        return self.world.leader_of(tp)

    def _tp(self, topic: str, partition: int) -> TopicPartition:
        return TopicPartition(self.meta.topic(topic).id, partition)

    def leader_address(self, topic: str, partition: int) -> tuple[str | None, str | None]:
        leader = self.leader_of(self._tp(topic, partition))[0]
        return (leader, leader) if leader is not None else (None, None)

    def leads(self, topic: str, partition: int) -> bool:
        t = self.meta.topics.get(topic)
        return t is not None and self.leader_of(TopicPartition(t.id, partition))[0] == self.name

    def _must_lead(self, topic: str, partition: int) -> TopicPartition:
        tp = self._tp(topic, partition)
        leader = self.leader_of(tp)[0]
        if leader == self.name:
            return tp
        if leader is None:
            raise LeaderNotAvailable(f"{topic}/{partition} has no leader right now; retry shortly")
        raise NotLeader(f"{self.name} does not lead {topic}/{partition}; {leader} does", leader=leader,
                        address=leader)

    def partition_bounds(self, topic: str, partition: int) -> tuple[int, int]:
        tp = self._must_lead(topic, partition)
        return 0, self.world.high_watermark(tp)

    def produce_local(self, topic: str, partition: int, records: list[list], done: Callable[[Any], None],
                      acks_quorum: bool = True, producer_id: int = 0, base_sequence: int = 0) -> None:
        tp = self._must_lead(topic, partition)
        self.world.produce(self, tp, records, producer_id, base_sequence, done, self.world.dead_letter_tag(self, records))

    def read_committed(self, topic: str, partition: int, offset: int, max_bytes: int) -> list[bytes]:
        tp = self._must_lead(topic, partition)
        return self.world.read(tp, offset, max_bytes)

    # ---- the pass

    def end_pass(self) -> None:
        """Commit the pass's writes (fsynced if asked), then send its messages."""
        if self.pass_writes:
            self.store.cache.update(self.pass_writes)
            self.pass_writes = {}
        if self.sync_asked:
            self.sync_asked = False
            self.store.sync()
        out, self.outbox = self.outbox, []
        for dst, kind, msg, frames in out:
            self.world.send(self.name, dst, kind, msg, frames)
