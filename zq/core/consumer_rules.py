"""The group consumer's rules: one member's membership, leasing and settling, as a pure state
machine. No sockets, threads or clock: the caller passes `now_ms` in, and takes the requests to
send (and other effects) out of `poll`. The client's I/O thread (zq/client/groups.py) drives it in
production; the simulator's modelled consumers drive the same object.

Theory of operation
-------------------
*Driving.* Every event goes in through one method (`on_joined`, `on_join_reply`,
`on_heartbeat_reply`, `on_lease_reply`, `on_ack_reply`, `settle`, `flush`, `take_chunk`,
`on_reset`, `close`); then the driver calls `poll(now_ms, app_queued)`, which returns the effects
due now, in order: `JoinOrder`, `HeartbeatOrder`, `LeaseOrder`, `AckOrder` (requests to send; the
answer goes back to the `on_*_reply` method with the order itself as context), `CommitDone`
(a `flush` waiter's batches all ended) and `RefreshMetadata`. `due_ms()` says when `poll` has
something next (None: nothing until an event), so the driver sleeps until then. An order with
`address` None goes to the partition's leader as the driver knows it (for a lease or an ack) or
to any node (a heartbeat or join before a coordinator is known).

*Membership.* After the first join (done by the driver, reported by `on_joined`) a regular
heartbeat goes every `heartbeat_ms` to the coordinator. A heartbeat refused as Fenced makes the
member join again there (retried every `retry_backoff_ms` until it succeeds); a node that times
out, or fails three times in a row, is replaced by the next address. A GroupReply's partitions
are the member's assignment: new ones start leasing at once; lost ones drop their queued chunks
(the leader fails those leases and delivers them to the new owner; their pending settlements
still go, as the leader's view may lag), and a lease of a lost partition that comes back later is discarded.

*Leasing.* Each held partition keeps at most one `LeaseOrder` outstanding. A lease asks for the
room left under `max_in_flight` (leased and not yet settled), at most a fair share per partition
and `lease_messages_max`; with messages still queued for the application, no lease below a
quarter of a share (`lease_min`): a partition without room *pauses*, and paused partitions resume
in the order they paused when room comes back. An empty reply that came back at once waits
`empty_lease_backoff_ms`. Refusals: NotLeader with an address is retried at once at that address
(the first time in a row; then it backs off like any other); Fenced and RebalanceInProgress wait
a linear backoff (Fenced also heartbeats at once, and that heartbeat, if fenced too, makes the member join again);
other passing refusals back off exponentially (`lease_backoff`), until `lease_retry_ms_max` of
failing in a row: then the last refusal is handed to the application as the chunk's error (as a
refusal that is not passing is at once) and the partition starts over after the longest backoff.

*Settling.* `settle` queues an ack, nack or extend under (partition, reset epoch of the delivery);
a flush is due `ack_flush_ms` later, or at once when `ack_batch_max` items wait. A flush sends
each (partition, epoch)'s items as Acks of at most `ack_batch_max` items (oldest epoch first);
items of an epoch older than the newest reset epoch seen for the partition are dropped (the
leader ignores them). A refused Ack is retried (NotLeader at the hinted address) with
`ack_backoff` until `ack_retry_ms_max` after its first send; a Fenced one is dropped, and the
member heartbeats at once. A join after a fence opens a new *session*: every chunk queued from
the old one is dropped, and a lease sent in it is discarded when it comes back (its leader failed
the old session's leases, and delivers them again).

*Reset epochs.* `on_reset(epochs)` (after a seek) and every lease reply raise a partition's newest
epoch; a chunk of an older epoch is dropped by `take_chunk`, and the room it held is free again.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from zq.core.bounds import LIST_ITEMS_MAX
from zq.core.client_rules import retry_delay_ms
from zq.core.retry import BackoffPolicy

lease_messages_max = 2_500         # messages one lease asks for (with max_in_flight, a fair share per partition
                                   # bounds it: 833 for one member of six partitions, 2,500 for one of three
                                   # members. Each reply carries its whole stored batches (up to 512 KiB): at
                                   # 1,000, three members' leases cost the nodes ~20% more CPU per message)
lease_min_fraction = 4             # with messages queued, no lease below 1/4 of a partition's share
ack_flush_ms = 20                  # settled messages wait at most this long before their Ack goes
ack_batch_max = 2_000              # ... or until this many are waiting; and no Ack carries more items
ack_retry_ms_max = 8_000           # an Ack refused for a passing reason (an election, a timeout, NotLeader,
                                   # RebalanceInProgress) is sent again, with backoff, for this long; under
                                   # commit_wait_s, so that commit() and close() see how it ended
retry_backoff_ms = 100
retry_backoff_ms_max = 500         # a lease or Ack refused for a passing reason waits at most this long: an
                                   # election ends within ~1 s, and a 2 s cap left partitions idle for seconds
                                   # after it (measured: bench group-3 stalled 1.5-2 s at LeaderNotAvailable)
heartbeat_misses_max = 3           # heartbeats failed in a row before the member tries the next node
quick_empty_reply_ms = 5
empty_lease_backoff_ms = 20
heartbeat_timeout_extra_ms = 1_000   # a regular heartbeat waits heartbeat_ms + this for its answer

assert ack_batch_max <= LIST_ITEMS_MAX   # an Ack's lists are bounded on the wire by LIST_ITEMS_MAX

# Exponential, capped, no jitter (one member's partitions back off independently already).
lease_backoff = BackoffPolicy(initial_ms=retry_backoff_ms, max_ms=retry_backoff_ms_max, jitter=0.0)
ack_backoff = lease_backoff

FENCED = "fenced"
REBALANCE = "rebalance_in_progress"
NOT_LEADER = "not_leader"
TIMEOUT = "timeout"
CONNECTION_FAILED = "connection_failed"


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    group: str
    topic: str
    member_id: str
    static: bool = False
    session_timeout_ms: int = 10_000
    heartbeat_ms: int = 2_500
    lease_ms: int = 30_000
    max_in_flight: int = 5_000
    max_wait_ms: int = 500
    request_timeout_ms: int = 10_000
    lease_retry_ms_max: int = 60_000   # the client's api_timeout_ms
    start: str | int = "earliest"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request failed: the error's wire `code`, whether it is `retriable`, the leader
    `address` a NotLeader named, and the driver's own error object (`cause`, handed back)."""

    code: str
    retriable: bool
    address: str | None = None
    cause: Any = None


# ---------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class JoinOrder:
    address: str | None
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class HeartbeatOrder:
    address: str | None
    generation: int
    regular: bool          # False: an extra one, to learn a new assignment now; only its reply matters
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class LeaseOrder:
    partition: int
    max_messages: int
    generation: int
    address: str | None    # a NotLeader's hint; None: the leader the driver knows
    sent_ms: float
    timeout_ms: int
    session: int = 0


@dataclass(frozen=True, slots=True)
class AckOrder:
    partition: int
    epoch: int
    generation: int
    acked: list
    nacks: list
    extends: list
    address: str | None
    timeout_ms: int
    batch: _AckBatch = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.acked) + len(self.nacks) + len(self.extends)


@dataclass(frozen=True, slots=True)
class CommitDone:
    waiter: Any
    errors: list           # the causes of the Acks that were not applied


@dataclass(frozen=True, slots=True)
class RefreshMetadata:
    pass


@dataclass(slots=True)
class Chunk:
    """One lease's deliveries ({offset: attempt}) and the driver's payload (its stored batches),
    or a refusal for the application (`error`, the driver's cause)."""

    partition: int
    epoch: int
    deliveries: dict
    payload: Any
    error: Any = None


@dataclass(slots=True)
class _Pending:
    acked: list = field(default_factory=list)
    nacks: list = field(default_factory=list)
    extends: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.acked) + len(self.nacks) + len(self.extends)


@dataclass(slots=True)
class _AckBatch:
    partition: int
    epoch: int
    items: _Pending
    waiter: Any
    first_ms: float
    attempt: int = 0
    due_ms: float = 0.0


class GroupConsumerCore:
    """One group member's rules. Not thread-safe: the driver holds its lock around every call."""

    def __init__(self, config: ConsumerConfig) -> None:
        self.config = config
        self.generation = 0
        self.assigned: set[int] = set()
        self.session = 0                   # joins after a fence: a lease sent in an older session is void
        self.closed = False
        self.coordinator: str | None = None
        self.in_flight = 0                 # leased (or being leased) and not yet settled
        self.lease_min = 1
        self.epochs: dict[int, int] = {}   # partition -> newest reset epoch seen
        self.arrived: collections.deque[Chunk] = collections.deque()   # mutated in place only
        self.caught_up: dict[int, bool] = {}
        self.leaders: dict[int, str] = {}  # partition -> leader named by a NotLeader, until a retry forgets it
        self.leasing: set[int] = set()
        self.failures: dict[int, int] = collections.defaultdict(int)
        self.failing_since: dict[int, float] = {}
        # Partitions waiting for room, in the order they paused (a dict as an ordered set): resumed
        # in that order, so that with max_in_flight below the partitions held each gets its turn.
        # Resumed sorted, the highest partitions starved (found by the groups simulator, seed 107).
        self.paused: dict[int, None] = {}
        # partition -> (rank, due_ms, order among equals): when `poll` finds several due, resumed ones
        # (rank 0) lease first, in the order they paused; then the others (rank 1). A partition
        # whose lease came back while there was no room would have paused behind them, so it must
        # not overtake them once room comes back before the driver polls.
        self._lease_due: dict[int, tuple[int, float, int]] = {}
        self._seq = 0
        self.pending: dict[tuple[int, int], _Pending] = {}
        self.pending_count = 0
        self._flush_due: float | None = None
        self._acks: list[_AckBatch] = []   # Acks waiting for their (re)send time
        self._waiters: dict[int, list] = {}   # id(waiter) -> [waiter, batches left, errors]
        self._hb_due: float | None = None
        self._hb_once_due: float | None = None
        self._hb_failures = 0
        self._join_due: float | None = None
        self._out: list[Any] = []          # CommitDone / RefreshMetadata waiting for poll

    # ------------------------------------------------------------------ membership

    def on_joined(self, address: str | None, generation: int, partitions: set[int], now_ms: float) -> None:
        """The first join succeeded through `address`."""
        self.coordinator = address
        self._apply(generation, partitions, now_ms)
        self._hb_due = now_ms + self.config.heartbeat_ms

    def _apply(self, generation: int, partitions: set[int], now_ms: float) -> None:
        added = partitions - self.assigned
        lost = self.assigned - partitions
        self.generation = generation
        self.assigned = set(partitions)
        share = self.share()
        self.lease_min = max(1, min(share, lease_messages_max) // lease_min_fraction)
        if lost:
            self._drop_chunks(lost)
            for p in lost:
                self.paused.pop(p, None)
                self._lease_due.pop(p, None)
        for p in sorted(added):
            self.failures[p] = 0
            self.failing_since.pop(p, None)
            self._schedule_lease(p, now_ms)

    def _drop_chunks(self, parts: set[int] | None) -> None:
        """Queued chunks of `parts` (None: all) go: this member no longer holds them, or its
        session ended, so the leaders fail those leases and deliver them again. (Their pending
        settlements still go: the leader's view may lag, and one it refuses is only dropped.)"""
        kept = [c for c in self.arrived if c.error is not None or (parts is not None and c.partition not in parts)]
        self.in_flight -= sum(len(c.deliveries) for c in self.arrived) - sum(len(c.deliveries) for c in kept)
        self.arrived.clear()
        self.arrived.extend(kept)

    def on_join_reply(self, order: JoinOrder, generation: int | None, partitions: set[int] | None,
                      error: Refusal | None, now_ms: float) -> None:
        if self.closed:
            return
        if error is None and generation is not None and partitions is not None:
            self.coordinator = order.address
            self.session += 1   # the leases of the session that was fenced are failed by their leaders
            self._drop_chunks(None)
            self._apply(generation, partitions, now_ms)
            self._hb_due = now_ms + self.config.heartbeat_ms
        else:
            self._join_due = now_ms + retry_backoff_ms
            self.coordinator = order.address

    def on_heartbeat_reply(self, order: HeartbeatOrder, generation: int | None, partitions: set[int] | None,
                           error: Refusal | None, now_ms: float, addresses: list[str]) -> None:
        """A heartbeat's answer; `addresses` are the nodes the driver knows now (for moving on)."""
        if self.closed:
            return
        ok = error is None and generation is not None and partitions is not None
        if not order.regular:
            if ok:
                self._apply(generation, partitions, now_ms)
            elif error is not None and error.code == FENCED and self._join_due is None and self._hb_due is not None:
                self._hb_due = None
                self._join_due = now_ms
            return
        if ok:
            self._hb_failures = 0
            self._apply(generation, partitions, now_ms)
            self._hb_due = now_ms + self.config.heartbeat_ms
        elif error is not None and error.code == FENCED:
            self._join_due = now_ms
            self.coordinator = order.address
        else:
            self._hb_failures += 1
            if addresses and (error is None or error.code in (TIMEOUT, CONNECTION_FAILED)
                              or self._hb_failures >= heartbeat_misses_max):
                i = addresses.index(order.address) if order.address in addresses else -1
                self.coordinator = addresses[(i + 1) % len(addresses)]
            self._hb_due = now_ms + min(self.config.heartbeat_ms, retry_backoff_ms * self._hb_failures)

    def heartbeat_soon(self, now_ms: float) -> None:
        """An extra heartbeat now, to learn the assignment (after a Fenced lease or Ack)."""
        if self._hb_once_due is None:
            self._hb_once_due = now_ms

    # ------------------------------------------------------------------ leasing

    def share(self) -> int:
        return max(1, self.config.max_in_flight // max(1, len(self.assigned)))

    def lease_size(self, app_queued: int) -> int:
        """How many messages the next lease asks for; 0: wait for room.

        A fair share per partition: a long-poll on an idle partition must not hold the room that
        busy partitions need. And no lease smaller than `lease_min` while the application still
        has messages queued to take: each lease costs the leader a pass over its state and
        carries whole stored batches, so leasing a few messages as each one is acked (what room
        freed one at a time gives) cost more than waiting a moment. With nothing queued here the
        room left is leased whatever its size, so an application that holds messages while it
        waits for more is never stalled by this."""
        n = min(self.config.max_in_flight - self.in_flight, lease_messages_max, self.share())
        if n < self.lease_min and (self.arrived or app_queued):
            return 0
        return n

    def _schedule_lease(self, p: int, at_ms: float, resumed: bool = False) -> None:
        if p in self.leasing:
            return
        old = self._lease_due.get(p)
        self._seq += 1
        new = (0 if resumed else 1, at_ms, self._seq)
        if old is None or (new[0], new[1]) < (old[0], old[1]):
            self._lease_due[p] = new

    def resume(self, now_ms: float) -> None:
        """Room came back: the paused partitions lease again, in the order they paused."""
        for p in list(self.paused):
            del self.paused[p]
            self._schedule_lease(p, now_ms, resumed=True)

    def _lease(self, p: int, now_ms: float, app_queued: int) -> LeaseOrder | None:
        if self.closed or p not in self.assigned or p in self.leasing:
            return None
        n = self.lease_size(app_queued)
        if n <= 0:
            self.paused[p] = None
            return None
        self.in_flight += n   # reserved until the reply says how many came
        self.leasing.add(p)
        return LeaseOrder(p, n, self.generation, self.leaders.get(p), now_ms,
                          self.config.max_wait_ms + self.config.request_timeout_ms, self.session)

    def on_lease_reply(self, order: LeaseOrder, deliveries: dict[int, int] | None, reset_epoch: int,
                       payload: Any, error: Refusal | None, now_ms: float) -> None:
        """A lease's answer: `deliveries` {offset: attempt} under `reset_epoch` with the driver's
        `payload`, or `error` (a reply that did not parse is a non-retriable refusal)."""
        p, n = order.partition, order.max_messages
        self.leasing.discard(p)
        got = len(deliveries) if error is None and deliveries else 0
        self.in_flight -= n - got
        if n > got:
            self.resume(now_ms)   # room came back: partitions that waited for it go first
        if self.closed:
            self.in_flight -= got
            return
        if p not in self.assigned or order.session != self.session:
            self.in_flight -= got   # revoked, or fenced, while the lease was out: the leader redelivers them
            if p in self.assigned:
                self._schedule_lease(p, now_ms)
            return
        if error is None:
            if got:
                self.epochs[p] = max(self.epochs.get(p, 0), reset_epoch)
                self.arrived.append(Chunk(p, reset_epoch, dict(deliveries), payload))
            self.failures[p] = 0
            self.failing_since.pop(p, None)
            self.caught_up[p] = got == 0
            quick = got == 0 and now_ms - order.sent_ms < quick_empty_reply_ms
            self._schedule_lease(p, now_ms + (empty_lease_backoff_ms if quick else 0))
            return
        self.failing_since.setdefault(p, now_ms)
        if error.code == NOT_LEADER and error.address and self.failures[p] == 0:
            self.leaders[p] = error.address
            self.failures[p] += 1
            self._schedule_lease(p, now_ms)
        elif error.code in (FENCED, REBALANCE):
            # Our view of the group is stale, or the leader's is: learn the assignment, then try again.
            if error.code == FENCED:
                self.heartbeat_soon(now_ms)
            self.failures[p] += 1
            self._schedule_lease(p, now_ms + min(retry_backoff_ms * self.failures[p], retry_backoff_ms_max))
        elif error.retriable:
            self.failures[p] += 1
            self.leaders.pop(p, None)
            self._out.append(RefreshMetadata())
            delay = retry_delay_ms(self.failures[p], self.failing_since[p], now_ms, self.config.lease_retry_ms_max,
                                   lease_backoff, 0.0)
            if delay is None:   # failing for too long: the application hears of it, and leasing starts over
                self.arrived.append(Chunk(p, -1, {}, None, error=error.cause if error.cause is not None else error))
                self.failures[p] = 0
                self.failing_since.pop(p, None)
                delay = retry_backoff_ms_max
            self._schedule_lease(p, now_ms + delay)
        else:
            self.arrived.append(Chunk(p, -1, {}, None, error=error.cause if error.cause is not None else error))

    def take_chunk(self, now_ms: float) -> Chunk | None:
        """The oldest queued chunk that is still current (an older reset epoch's are dropped and
        their room freed); None when none is queued. With nothing queued, paused partitions resume."""
        while self.arrived:
            c = self.arrived.popleft()
            if c.error is not None or c.epoch >= self.epochs.get(c.partition, 0):
                return c
            self.release(len(c.deliveries), now_ms)
        if self.paused:
            self.resume(now_ms)
        return None

    def release(self, n: int, now_ms: float) -> None:
        """`n` leased messages dropped by the driver (stale, or missing from a reply): room again."""
        self.in_flight -= n
        if n and self.paused:
            self.resume(now_ms)

    def on_reset(self, epochs: dict[int, int], now_ms: float) -> int:
        """A seek opened `epochs` {partition: reset epoch}: queued chunks of older epochs go.
        Returns how many leased messages were dropped (the driver drops its own decoded ones)."""
        for p, e in epochs.items():
            self.epochs[p] = max(self.epochs.get(p, 0), e)
        kept = [c for c in self.arrived if c.error is not None or c.epoch >= self.epochs.get(c.partition, 0)]
        dropped = sum(len(c.deliveries) for c in self.arrived) - sum(len(c.deliveries) for c in kept)
        self.arrived.clear()
        self.arrived.extend(kept)
        self.release(dropped, now_ms)
        return dropped

    def is_current(self, partition: int, epoch: int) -> bool:
        return epoch >= self.epochs.get(partition, 0)

    # ------------------------------------------------------------------ settling

    def settle(self, partition: int, epoch: int, kind: str, item: Any, now_ms: float, app_queued: int) -> bool:
        """Queue an "ack" (item: offset), "nack" ([offset, attempt, delay_ms|None, reason]) or
        "extend" ([offset, lease_ms]). True when the driver should poll now (a flush or a lease
        became due sooner than it planned)."""
        assert kind in ("ack", "nack", "extend"), kind
        pending = self.pending.get((partition, epoch))
        if pending is None:
            pending = self.pending[(partition, epoch)] = _Pending()
        getattr(pending, "acked" if kind == "ack" else kind + "s").append(item)
        self.pending_count += 1
        wake = False
        if kind != "extend":
            self.in_flight -= 1
            if self.paused and (self.config.max_in_flight - self.in_flight >= self.lease_min or not app_queued):
                self.resume(now_ms)
                wake = True
        if self._flush_due is None:
            self._flush_due = now_ms + ack_flush_ms
            wake = True
        if self.pending_count >= ack_batch_max and self._flush_due > now_ms:
            self._flush_due = now_ms
            wake = True
        return wake

    def flush(self, now_ms: float, waiter: Any = None) -> None:
        """Send every pending settlement now; `waiter` (if any) gets a `CommitDone` once every Ack
        of this flush ended."""
        pending, self.pending = self.pending, {}
        self.pending_count = 0
        self._flush_due = None
        batches = []
        for (p, epoch), items in sorted(pending.items()):
            if epoch < self.epochs.get(p, 0):
                continue   # a seek came after: the leader ignores acks of an older reset epoch
            for part in _split(items, ack_batch_max):
                batches.append(_AckBatch(p, epoch, part, waiter, now_ms, 0, now_ms))
        self._acks.extend(batches)
        if waiter is not None:
            if batches:
                self._waiters[id(waiter)] = [waiter, len(batches), []]
            else:
                self._out.append(CommitDone(waiter, []))

    def on_ack_reply(self, order: AckOrder, error: Refusal | None, now_ms: float) -> bool:
        """An Ack's answer. True when it will be sent again (a passing refusal, before the deadline)."""
        b = order.batch
        if error is None:
            self._ack_done(b, None)
            return False
        p = b.partition
        if error.code == NOT_LEADER and error.address:
            self.leaders[p] = error.address
        if error.code == FENCED:
            self.heartbeat_soon(now_ms)   # this Ack is dropped (not passing): the leader redelivers
        if not self.closed and (error.retriable or error.code == REBALANCE):
            delay = retry_delay_ms(b.attempt + 1, b.first_ms, now_ms, ack_retry_ms_max, ack_backoff, 0.0)
            if delay is not None:
                if not (error.code == NOT_LEADER and error.address):
                    self.leaders.pop(p, None)
                    self._out.append(RefreshMetadata())
                b.attempt += 1
                b.due_ms = now_ms + delay
                self._acks.append(b)
                return True
        self._ack_done(b, error.cause if error.cause is not None else error)
        return False

    def _ack_done(self, b: _AckBatch, error: Any) -> None:
        if b.waiter is None:
            return
        w = self._waiters[id(b.waiter)]
        w[1] -= 1
        if error is not None:
            w[2].append(error)
        if w[1] == 0:
            del self._waiters[id(b.waiter)]
            self._out.append(CommitDone(w[0], w[2]))

    # ------------------------------------------------------------------ the driver's loop

    def poll(self, now_ms: float, app_queued: int = 0) -> list[Any]:
        """The effects due at `now_ms`, in order; `app_queued`: messages decoded by the driver
        and not yet handed to the application."""
        out, self._out = self._out, []
        if self.closed:
            return out
        if self._join_due is not None and self._join_due <= now_ms:
            self._join_due = None
            out.append(JoinOrder(self.coordinator, self.config.request_timeout_ms))
        if self._hb_due is not None and self._hb_due <= now_ms and self._join_due is None:
            self._hb_due = None
            out.append(HeartbeatOrder(self.coordinator, self.generation, True,
                                      self.config.heartbeat_ms + heartbeat_timeout_extra_ms))
        if self._hb_once_due is not None and self._hb_once_due <= now_ms:
            self._hb_once_due = None
            out.append(HeartbeatOrder(self.coordinator, self.generation, False, self.config.request_timeout_ms))
        due = sorted((d, p) for p, d in self._lease_due.items() if d[1] <= now_ms)
        for _, p in due:
            del self._lease_due[p]
            order = self._lease(p, now_ms, app_queued)
            if order is not None:
                out.append(order)
        if self._flush_due is not None and self._flush_due <= now_ms:
            self.flush(now_ms)
            out.extend(self._out)
            self._out = []
        if self._acks:
            ready = [b for b in self._acks if b.due_ms <= now_ms]
            self._acks = [b for b in self._acks if b.due_ms > now_ms]
            for b in ready:
                out.append(AckOrder(b.partition, b.epoch, self.generation, b.items.acked, b.items.nacks,
                                    b.items.extends, self.leaders.get(b.partition), self.config.request_timeout_ms, b))
        return out

    def due_ms(self) -> float | None:
        """When `poll` next has something to do; None: nothing until an event."""
        if self._out:
            return float("-inf")
        if self.closed:
            return None
        times = [t for t in (self._join_due, self._hb_once_due, self._flush_due) if t is not None]
        if self._hb_due is not None and self._join_due is None:
            times.append(self._hb_due)
        times.extend(d for _, d, _ in self._lease_due.values())
        times.extend(b.due_ms for b in self._acks)
        return min(times) if times else None

    def close(self) -> None:
        """Stop: nothing more is sent; queued chunks are dropped."""
        self.closed = True
        self.arrived.clear()


def _split(items: _Pending, limit: int) -> list[_Pending]:
    """`items` as parts of at most `limit` items each, in order (acks, then nacks, then extends)."""
    if len(items) <= limit:
        return [items]
    flat = [("acked", x) for x in items.acked] + [("nacks", x) for x in items.nacks] + \
        [("extends", x) for x in items.extends]
    parts = []
    for i in range(0, len(flat), limit):
        part = _Pending()
        for kind, x in flat[i:i + limit]:
            getattr(part, kind).append(x)
        parts.append(part)
    return parts
