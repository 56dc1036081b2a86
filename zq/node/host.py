"""What the node's composition needs from a runtime: the host interface, as typed Protocols.

Two hosts implement it: the real one in `zq/io/` (RocksDB, ZeroMQ, the process's clocks) and the
simulated one in `zq/sim/cluster.py` (a disk that loses unsynced writes on a crash, a network
with loss and delay, a clock that jumps from event to event). The composition in `zq/node/`
reaches the world only through these, so the simulator runs the code that ships.

The storage contract is the one the persist-then-send rule rests on: everything a pass writes
goes into ONE transaction (`begin` returns it, the same one until `commit`), and `commit` makes
it durable (fsynced when `sync`, or written to the log the operating system keeps when not)
before it returns True. Nothing a pass sends may depend on a write before that commit returned.

Standard library only.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, MutableMapping, Protocol, Sequence


class Counters(Protocol):
    """Named event counters (a `collections.defaultdict(int)` is one)."""

    def __getitem__(self, name: str) -> int: ...

    def __setitem__(self, name: str, value: int) -> None: ...


class Storage(Protocol):
    """The host's store, as a pass writes it: one transaction per pass, committed once."""

    def begin(self) -> Any:
        """A new write transaction (opaque to the composition; services may write meta keys into it)."""
        ...

    def write_ready(self, txn: Any, key: Hashable, reset_to: int | None, truncate_from: int | None,
                    entries: Sequence[Any], hard_state: Any | None) -> None:
        """Add one replica's Ready writes to `txn`, in the order the core's `Ready` names: reset,
        truncate, append, hard state. Whatever can fail on bad data (a batch failing its checksum)
        fails before the first write into `txn`, so a raise leaves `txn` as it was."""
        ...

    def put_hard_state(self, txn: Any, key: Hashable, hard_state: Any) -> None:
        """Add a replica's hard state alone to `txn` (a high-watermark hint that rode along)."""
        ...

    def commit(self, txn: Any, sync: bool) -> bool:
        """Write `txn` (readable at once; fsynced before this returns if `sync`) and return True,
        or store none of it and return False (the disk is full); the host has then noted why."""
        ...

    def sync(self) -> None:
        """Make everything committed so far durable (fsync), as `commit(txn, True)` would have.
        A failure raises: what is durable is then unknown, and the host stops and recovers from
        its disk."""
        ...


class Network(Protocol):
    """Messages out. Neither call blocks; a message that cannot go is dropped and counted (peers
    and clients retry)."""

    def send_to_peer(self, name: str, msg: Any, *frames: bytes) -> bool: ...

    def reply(self, identity: bytes, msg: Any, *frames: bytes) -> None: ...


class Clock(Protocol):
    def now_ms(self) -> int:
        """Monotonic milliseconds: timers, timeouts, elections."""
        ...

    def wall_ms(self) -> int:
        """Wall-clock milliseconds: batch append times, retention."""
        ...


class Timers(Protocol):
    def at(self, when_ms: int, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop at monotonic time `when_ms` (or soon after)."""
        ...


class Host(Storage, Network, Clock, Timers, Protocol):
    """Everything the node's composition asks of a runtime."""

    name: str
    rng: Any                      # a random.Random: election timeouts (the simulator seeds its own)
    counters: Counters


class ReplicaEvents(Protocol):
    """What the composition around the replicas does with the effects the pipeline
    (`zq.node.replicas.ReplicaSet`) hands it once a pass's writes are durable. The real node and
    the simulator each supply one; the pipeline's order and rule are the same for both."""

    def route(self, part: Any, out: Any) -> None:
        """Send one core message (`Outbound`: to a peer, or to every peer when `to` is None)."""
        ...

    def send_now(self) -> None:
        """Send what `route` queued so far, before the pass's commit (a leader's Appends)."""
        ...

    def after_durable(self, part: Any, rd: Any) -> None:
        """React to a durable Ready: its role change, high watermark, recovery, removal."""
        ...

    def committed(self, part: Any, high_watermark: int) -> bool:
        """The high watermark moved (everything below it is durable at a majority), told between
        the pass's write and its fsync: answer what waited for it (parked fetches). False: not
        now, with the rest of the Ready in `after_durable` once the pass's writes are durable."""
        ...

    def after_round(self) -> None:
        """One write-then-send round of the pass was durable (a learner applies what it fetched)."""
        ...

    def write_failed(self, part: Any) -> None:
        """The pass's write failed: this replica's core is ahead of the disk (reopen it)."""
        ...

    def fence(self, part: Any, doing: str, error: Exception) -> None:
        """An unexpected error while preparing or acting on one replica's Ready (see zq.io.node)."""
        ...


class LearnerLog(Protocol):
    """A node's copy of `__meta` when it does not vote (zq.node.replicas.Part is one): its log
    end on disk, which is also how far it has fetched (zq.node.meta.MetaFollower reads and moves
    it; the host's failed write sets it back to what is stored)."""

    learner_end: int


Parts = MutableMapping[Hashable, Any]


class ClientHost(Protocol):
    """What the node's client room (zq.node.clients: produce, fetch, list-offsets) asks of its
    node. The real node (zq/io/node_clients.py) and the cluster simulator (zq/sim/simnode.py)
    each supply one."""

    name: str
    counters: Counters
    limits: Any                   # zq.limits.Limits

    # ---- where partitions are
    def resolve(self, topic: str, partition: int) -> Hashable:
        """The node's key of a partition (raises UnknownTopic / UnknownPartition)."""
        ...

    def leader_of(self, tp: Hashable) -> tuple[str | None, int]:
        """Who leads a partition as far as this node knows, and in which epoch."""
        ...

    def address_of(self, name: str) -> str:
        """A node's client address ("" if unknown), for a NotLeader answer."""
        ...

    def storage_full(self) -> str | None:
        """Why produce is refused for want of disk ("less than 64 MiB of disk free"), or None."""
        ...

    # ---- reading stored batches
    def read(self, tp: Hashable, offset: int, max_bytes: int, upto: int) -> tuple[list, int]:
        """Stored batches from the one holding `offset` on, at most `max_bytes` (at least one if any),
        none whose base offset is at or above `upto`; and their size in bytes."""
        ...

    def offset_for_time(self, tp: Hashable, time_ms: int) -> int | None: ...

    # ---- replies to clients (typed messages; the host encodes them). Never blocking: a reply
    # that cannot go is dropped and counted (the client retries).
    def reply(self, identity: bytes, msg: Any, *frames: bytes) -> None: ...

    def reply_error(self, identity: bytes, req_id: int, error: Any) -> None: ...

    def reply_fetch(self, identity: bytes, msg: Any, values: list) -> None:
        """A FetchReply or FetchManyReply with the stored batches `values` as its payload; the host holds them
        against the client until they are written out (see `fetch_backlog`)."""
        ...

    def fetch_backlog(self, identity: bytes) -> tuple[int, int, int]:
        """(fetch replies to `identity` not yet written out, their bytes, such bytes of every client)."""
        ...

    # ---- time
    def now_ms(self) -> int: ...

    def wall_ms(self) -> int:
        """The wall clock the replicas are told (append times)."""
        ...

    def at(self, when_ms: int, fn: Callable[[], None]) -> None: ...
