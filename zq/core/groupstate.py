"""Delivery state of one (group, topic, partition): a lattice that gossip merges without coordination.

Theory of operation
-------------------
The state is `(reset_epoch, committed, offsets)`. Every offset below `committed` is done
(acknowledged, or copied to the dead-letter topic). `offsets` holds an `OffsetState` for the few
offsets at or above `committed` that something has happened to: delivered and leased, acked out
of order, waiting to retry, waiting to be dead-lettered. An offset at or above `committed`
with no entry has never been delivered in this epoch. Only offsets in
`[committed, committed + offsets_tracked_max)` may be delivered, so the state is bounded and
a consumer group that stalls on one offset stops taking new ones (its backpressure).

Per offset, deliveries are numbered: `attempts` deliveries have begun, `failures` of them ended
without an ack (a nack, or a lease that expired). So `failures <= attempts`, and an attempt is in
progress exactly when `failures < attempts`; its lease `(attempt, deadline_ms, owner)` says who
holds it and until when. A new attempt may begin when none is in progress, the offset is not
done, and `next_visible_ms` (the retry time set by the last failure) has passed. When `failures`
reaches the topic's `max_deliveries` the offset becomes *due* for the dead-letter topic: it is not
delivered again, the shell writes the copy to `TOPIC.dlq`, and only when that copy is
acknowledged by its quorum does `on_dead_lettered` mark it done, so a crash in between repeats
the copy (at least once) rather than losing the message.

Merge. Every field moves one way only, so two copies merge by taking, field by field, the
larger: `reset_epoch` first (a replay or seek opens a new epoch, and the state of the newer epoch
replaces the older one whole: that is how a reset wins over the maxima below); within an epoch
`committed` by max, and per offset: `attempts` max, `(failures, next_visible_ms)` max (the retry
time belongs to the failure that set it), the lease max by `(attempt, deadline_ms, owner)` (the
latest attempt's lease, then the latest deadline, ties by owner id), `acked` or, dead-letter stage
max (none < due < done), last error max by `(attempt, text)`, first failure min, last failure
max. An entry below the merged `committed` is dropped: it is done whatever it says. This is a
product of chains and so a join-semilattice: merge is commutative, associative and idempotent,
and each operation below only moves the state up, so `merge(old, new) == new` (tested).

Why a lost update costs a redelivery, never a loss: `committed` advances only over offsets whose
own entries say acked or dead-lettered (`maybe_advance_committed`), and merge never invents
an ack. If an update is lost (a node crashed before gossiping it, a message was dropped), the
copies that survive hold an older, *lower* state: at worst they think an offset is not yet
acked, or a lease still runs, or a failure has not happened, so the offset is delivered again
(with an attempt number that never goes down, since `attempts` only grows). Nothing in a lower
state can mark an offset done that was not.

The operations take the time (`now_ms`) and random numbers from the caller and return effects as
data (`Delivery`, `Retry`, `DeadLetter`); the shell persists the state, then acts.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from zq.core.retry import RetryPolicy
from zq.errors import ProtocolError

DLQ_NONE, DLQ_DUE, DLQ_DONE = 0, 1, 2   # dead-letter stage of an offset; merged by max

_GOLDEN = 0.6180339887498949   # spreads one random number over many offsets (see expire)


class Lease(NamedTuple):
    """Who holds delivery number `attempt` of an offset, until when. Ordered for merging.

    (Lease and OffsetState are named tuples rather than frozen dataclasses because they are made
    once per delivery and per ack on the hot path, where a tuple is built several times faster.)"""

    attempt: int
    deadline_ms: int
    owner: str


class OffsetState(NamedTuple):
    attempts: int = 0                  # deliveries begun
    failures: int = 0                  # deliveries ended without an ack
    next_visible_ms: int = 0           # earliest start of the next delivery (set with `failures`)
    lease: Lease | None = None         # the latest attempt's lease
    acked: bool = False
    dead_letter: int = DLQ_NONE
    error_attempt: int = 0             # the attempt `error` belongs to
    error: str = ""
    first_failure_ms: int | None = None
    last_failure_ms: int | None = None

    @property
    def done(self) -> bool:
        return self.acked or self.dead_letter == DLQ_DONE

    @property
    def in_progress(self) -> bool:
        return self.failures < self.attempts


EMPTY = OffsetState()


# ---- effects


@dataclass(frozen=True, slots=True)
class Delivery:
    """Deliver `offset` as its delivery number `attempt` (msg.attempt) under `reset_epoch`."""

    offset: int
    attempt: int
    reset_epoch: int


@dataclass(frozen=True, slots=True)
class Retry:
    """Delivery number `attempt` of `offset` failed; it may be delivered again at `next_visible_ms`."""

    offset: int
    attempt: int
    next_visible_ms: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Copy `offset` to the dead-letter topic with these headers, then call `on_dead_lettered`."""

    offset: int
    attempts: int
    last_error: str
    first_failure_ms: int
    last_failure_ms: int


@dataclass(frozen=True, slots=True)
class Stats:
    """What `zq groups` shows for one partition (the offsets in the tracked window)."""

    committed: int
    in_flight: int        # an attempt in progress
    retrying: int         # failed, waiting for the next delivery
    acked_ahead: int      # acked out of order, above committed
    dead_letter_due: int  # waiting for the dead-letter copy to be acknowledged


# ---- merge


def _min_time(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _max_time(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def merge_offset(a: OffsetState, b: OffsetState) -> OffsetState:
    """The join of two copies of one offset's state."""
    if a == b:
        return a
    failures, next_visible_ms = max((a.failures, a.next_visible_ms), (b.failures, b.next_visible_ms))
    leases = [x for x in (a.lease, b.lease) if x is not None]
    error_attempt, error = max((a.error_attempt, a.error), (b.error_attempt, b.error))
    return OffsetState(
        attempts=max(a.attempts, b.attempts),
        failures=failures,
        next_visible_ms=next_visible_ms,
        lease=max(leases) if leases else None,
        acked=a.acked or b.acked,
        dead_letter=max(a.dead_letter, b.dead_letter),
        error_attempt=error_attempt,
        error=error,
        first_failure_ms=_min_time(a.first_failure_ms, b.first_failure_ms),
        last_failure_ms=_max_time(a.last_failure_ms, b.last_failure_ms),
    )


def merge(a: DeliveryState, b: DeliveryState) -> DeliveryState:
    """The join of two copies of a partition's delivery state. Neither argument is changed."""
    bound = max(a.offsets_tracked_max, b.offsets_tracked_max)
    if a.reset_epoch != b.reset_epoch:
        newer = a if a.reset_epoch > b.reset_epoch else b
        return DeliveryState(newer.reset_epoch, newer.committed, dict(newer.offsets), bound)
    committed = max(a.committed, b.committed)
    offsets: dict[int, OffsetState] = {}
    for o in sorted(a.offsets.keys() | b.offsets.keys()):
        if o >= committed:
            offsets[o] = merge_offset(a.offsets.get(o, EMPTY), b.offsets.get(o, EMPTY))
    return DeliveryState(a.reset_epoch, committed, offsets, bound)


# ---- the state machine


class DeliveryState:
    offsets_tracked_max = 10_000   # offsets at or above committed that may be delivered or tracked
    nack_delay_ms_max = 7 * 24 * 3_600_000   # a consumer's nack(delay=...) is clamped to this

    def __init__(self, reset_epoch: int = 0, committed: int = 0,
                 offsets: dict[int, OffsetState] | None = None, offsets_tracked_max: int | None = None) -> None:
        self.reset_epoch = reset_epoch
        self.committed = committed
        self.offsets: dict[int, OffsetState] = offsets if offsets is not None else {}
        if offsets_tracked_max is not None:
            self.offsets_tracked_max = offsets_tracked_max
        assert all(o >= committed for o in self.offsets)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeliveryState):
            return NotImplemented
        return (self.reset_epoch, self.committed, self.offsets) == (other.reset_epoch, other.committed, other.offsets)

    def __repr__(self) -> str:
        return f"DeliveryState(epoch={self.reset_epoch}, committed={self.committed}, offsets={self.offsets!r})"

    def copy(self) -> DeliveryState:
        return DeliveryState(self.reset_epoch, self.committed, dict(self.offsets), self.offsets_tracked_max)

    def merge_from(self, other: DeliveryState) -> None:
        """Merge `other` into this copy (what the node does with a gossiped state)."""
        joined = merge(self, other)
        self.reset_epoch, self.committed, self.offsets = joined.reset_epoch, joined.committed, joined.offsets

    def _in_window(self, offset: int) -> bool:
        return self.committed <= offset < self.committed + self.offsets_tracked_max

    def _stale(self, epoch: int | None) -> bool:
        return epoch is not None and epoch != self.reset_epoch

    # ---- delivery

    def lease(self, offsets: Iterable[int], owner: str, deadline_ms: int, now_ms: int) -> list[Delivery]:
        """Begin delivering those of `offsets` that may be delivered now, leased to `owner`.

        An offset may be delivered if it is in the tracked window, not done or due for the
        dead-letter topic, visible (its retry time has passed), and no attempt is in progress,
        except that the owner of a live lease gets its own attempt again (its fetch reply may
        have been lost) with the later deadline."""
        assert deadline_ms > now_ms, (deadline_ms, now_ms)
        out = []
        first: Lease | None = None
        for o in sorted(set(offsets)):
            if not self._in_window(o):
                continue
            e = self.offsets.get(o, EMPTY)
            if e.done or e.dead_letter != DLQ_NONE:
                continue
            if e.in_progress:
                lease = e.lease
                assert lease is not None and lease.attempt == e.attempts, e
                if lease.owner != owner or lease.deadline_ms <= now_ms:
                    continue   # someone else's live lease, or an expired one that expire() will fail
                attempt, deadline = e.attempts, max(deadline_ms, lease.deadline_ms)
            elif now_ms < e.next_visible_ms:
                continue
            else:
                attempt, deadline = e.attempts + 1, deadline_ms
            if e is EMPTY:   # the common case, a first delivery: one shared lease per call
                first = first or Lease(1, deadline_ms, owner)
                self.offsets[o] = OffsetState(1, 0, 0, first)
            else:
                self.offsets[o] = e._replace(attempts=attempt, lease=Lease(attempt, deadline, owner))
            out.append(Delivery(o, attempt, self.reset_epoch))
        return out

    def extend(self, offset: int, owner: str, deadline_ms: int, now_ms: int, epoch: int | None = None) -> bool:
        """Push back the deadline of `owner`'s live lease (msg.extend for long work)."""
        e = self.offsets.get(offset)
        if self._stale(epoch) or e is None or not e.in_progress or e.done or e.lease is None:
            return False
        if e.lease.owner != owner or e.lease.deadline_ms <= now_ms:
            return False
        if deadline_ms > e.lease.deadline_ms:
            self.offsets[offset] = e._replace(lease=Lease(e.lease.attempt, deadline_ms, owner))
        return True

    def ack(self, offset: int, epoch: int | None = None) -> bool:
        """The message at `offset` was handled. True if this changed the state.

        Any ack counts, whoever sends it and whether or not its lease ran out: the message was
        handled. An ack from an older reset epoch is ignored, so a replay delivers again. So is an
        ack that comes once the offset is due for the dead-letter topic (a late ack of a lease
        that ran out as its last delivery): its copy may be on its way already, and a message ends
        exactly one of acknowledged or dead-lettered (found by the groups simulator)."""
        if self._stale(epoch) or not self._in_window(offset):
            return False
        e = self.offsets.get(offset, EMPTY)
        if e.acked or e.dead_letter != DLQ_NONE:
            return False
        self.offsets[offset] = e._replace(acked=True)
        return True

    def nack(self, offset: int, *, reason: str, now_ms: int, policy: RetryPolicy, rnd: float,
             delay_ms: int | None = None, attempt: int | None = None,
             epoch: int | None = None) -> Retry | DeadLetter | None:
        """Delivery number `attempt` (default: the latest) of `offset` failed.

        Returns when to retry, or that the message must go to the dead-letter topic now, or None
        if the nack changes nothing (stale epoch, already done, or that attempt already failed,
        so a repeated nack is not counted twice). `delay_ms` None means the topic's backoff."""
        if self._stale(epoch) or not self._in_window(offset):
            return None
        e = self.offsets.get(offset, EMPTY)
        failed = e.attempts if attempt is None else attempt
        if failed < 1 or failed <= e.failures or e.done or e.dead_letter != DLQ_NONE:
            return None
        if delay_ms is None:
            delay_ms = policy.backoff.delay_ms(failed, rnd)
        delay_ms = min(max(delay_ms, 0), self.nack_delay_ms_max)
        return self._fail(offset, e, failed, reason, now_ms, delay_ms, policy)

    def expire(self, now_ms: int, policy: RetryPolicy, rnd: float) -> list[Retry | DeadLetter]:
        """Leases whose deadline has passed: each counts as a failed delivery.

        One random number serves every offset: offset k uses `(rnd + k * golden ratio) mod 1`, a
        low-discrepancy spread, so many leases that expire together (a consumer crashed) do not
        all come back at the same instant."""
        out: list[Retry | DeadLetter] = []
        for o in sorted(self.offsets):
            e = self.offsets[o]
            if not e.in_progress or e.done or e.dead_letter != DLQ_NONE:
                continue
            assert e.lease is not None and e.lease.attempt == e.attempts, e
            if e.lease.deadline_ms > now_ms:
                continue
            spread = (rnd + o * _GOLDEN) % 1.0
            delay_ms = policy.backoff.delay_ms(e.attempts, spread)
            reason = f"lease of {e.lease.owner} expired: not acked within its deadline"
            out.append(self._fail(o, e, e.attempts, reason, now_ms, delay_ms, policy))
        return out

    def _fail(self, offset: int, e: OffsetState, failed: int, reason: str, now_ms: int, delay_ms: int,
              policy: RetryPolicy) -> Retry | DeadLetter:
        error_attempt, error = max((e.error_attempt, e.error), (failed, reason))
        e = e._replace(attempts=max(e.attempts, failed), failures=failed, next_visible_ms=now_ms + delay_ms,
                    error_attempt=error_attempt, error=error,
                    first_failure_ms=_min_time(e.first_failure_ms, now_ms),
                    last_failure_ms=_max_time(e.last_failure_ms, now_ms))
        if failed >= policy.max_deliveries:
            e = e._replace(dead_letter=DLQ_DUE)
            self.offsets[offset] = e
            return self._dead_letter(offset, e)
        self.offsets[offset] = e
        return Retry(offset, failed, e.next_visible_ms)

    @staticmethod
    def _dead_letter(offset: int, e: OffsetState) -> DeadLetter:
        assert e.first_failure_ms is not None and e.last_failure_ms is not None
        return DeadLetter(offset, e.attempts, e.error, e.first_failure_ms, e.last_failure_ms)

    def pending_dead_letters(self) -> list[DeadLetter]:
        """Offsets due for the dead-letter topic whose copy is not yet acknowledged (after a
        restart or a merge, the shell writes these again)."""
        return [self._dead_letter(o, e) for o, e in sorted(self.offsets.items())
                if e.dead_letter == DLQ_DUE and not e.acked]

    def on_dead_lettered(self, offset: int, epoch: int | None = None) -> bool:
        """The dead-letter copy of `offset` is acknowledged by its quorum: the offset is done."""
        e = self.offsets.get(offset)
        if self._stale(epoch) or e is None or e.dead_letter != DLQ_DUE:
            return False
        self.offsets[offset] = e._replace(dead_letter=DLQ_DONE)
        return True

    # ---- the committed offset

    def maybe_advance_committed(self) -> bool:
        """Move `committed` over the contiguous prefix of done offsets, dropping their entries."""
        start = self.committed
        while True:
            e = self.offsets.get(self.committed)
            if e is None or not e.done:
                break
            del self.offsets[self.committed]
            self.committed += 1
        return self.committed != start

    def skip_to(self, offset: int) -> bool:
        """Move `committed` forward to `offset` within this epoch (retention deleted what was
        below it, so those messages can no longer be delivered). Never moves back."""
        if offset <= self.committed:
            return False
        self.committed = offset
        self.offsets = {o: e for o, e in self.offsets.items() if o >= offset}
        return True

    def reset(self, to_offset: int, epoch: int | None = None) -> None:
        """Replay or seek: open a new reset epoch at `to_offset`, which wins over every copy of
        the older epochs, whether `to_offset` is behind or ahead of `committed`. `epoch` (default:
        one more than now) must be newer than the current one; the leader passes one that no other
        node picks for another reset (see grouplead.reset_epoch_floor)."""
        assert to_offset >= 0
        assert epoch is None or epoch > self.reset_epoch, (epoch, self.reset_epoch)
        self.reset_epoch = self.reset_epoch + 1 if epoch is None else epoch
        self.committed = to_offset
        self.offsets = {}

    # ---- reading

    def next_deadline_ms(self) -> int | None:
        """The earliest time at which expire() or lease() may find something new to do."""
        times = [e.lease.deadline_ms if e.in_progress and e.lease is not None else e.next_visible_ms
                 for e in self.offsets.values() if not e.done and e.dead_letter == DLQ_NONE
                 and (e.in_progress or e.failures > 0)]
        return min(times) if times else None

    def stats(self) -> Stats:
        in_flight = retrying = acked = due = 0
        for e in self.offsets.values():
            if e.done:
                acked += e.acked
            elif e.dead_letter == DLQ_DUE:
                due += 1
            elif e.in_progress:
                in_flight += 1
            elif e.failures > 0:
                retrying += 1
        return Stats(self.committed, in_flight, retrying, acked, due)

    # ---- storage and gossip

    def to_dict(self) -> dict[str, Any]:
        """A CBOR-able (and JSON-able) form; defaults are left out to keep gossip small."""
        return {"epoch": self.reset_epoch, "committed": self.committed,
                "offsets": [[o, _entry_to_dict(e)] for o, e in sorted(self.offsets.items())]}

    def gossip_dict(self) -> dict[str, Any]:
        """`to_dict` without the entries that say only "first delivery in progress" (attempt 1, no
        failure, not acked): the bulk of a busy partition's state (up to a consumer's
        `max_in_flight`), and what a replica needs least. A replica that lacks such an entry and
        comes to lead delivers that offset again as attempt 1: a redelivery with the same number,
        which a leader change may cost anyway. Every entry that carries an attempt number above 1,
        a failure, an ack out of order or a dead-letter stage is kept, so the quorum-for-retries
        argument (grouplead.py) holds on the gossiped view. Dropping entries is a lower state, so
        this is still a state of the lattice that the full one is above."""
        kept = sorted((o, e) for o, e in self.offsets.items()
                      if e.attempts > 1 or e.failures or e.acked or e.dead_letter)
        return {"epoch": self.reset_epoch, "committed": self.committed,
                "offsets": [[o, _entry_to_dict(e)] for o, e in kept]}

    @classmethod
    def from_dict(cls, d: Any, offsets_tracked_max: int | None = None) -> DeliveryState:
        """The state from `to_dict` output, as stored or gossiped. Raises ProtocolError."""
        bound = cls.offsets_tracked_max if offsets_tracked_max is None else offsets_tracked_max
        if not isinstance(d, dict) or set(d) != {"epoch", "committed", "offsets"}:
            raise ProtocolError("group state is not a map of epoch, committed and offsets")
        epoch, committed, rows = d["epoch"], d["committed"], d["offsets"]
        if not (_nat(epoch) and _nat(committed) and isinstance(rows, list)):
            raise ProtocolError("group state epoch and committed must be integers >= 0, offsets a list")
        if len(rows) > bound:
            raise ProtocolError(f"group state tracks {len(rows)} offsets, more than {bound}")
        offsets: dict[int, OffsetState] = {}
        for row in rows:
            if not (isinstance(row, list) and len(row) == 2 and _nat(row[0])):
                raise ProtocolError("group state offset rows are [offset, entry]")
            o = row[0]
            if not committed <= o < committed + bound or o in offsets:
                raise ProtocolError(f"group state offset {o} is outside its window or repeated")
            offsets[o] = _entry_from_dict(row[1], o)
        return cls(epoch, committed, offsets, offsets_tracked_max)


def _nat(v: Any) -> bool:
    return type(v) is int and v >= 0


def _entry_to_dict(e: OffsetState) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if e.attempts:
        d["a"] = e.attempts
    if e.failures:
        d["f"] = e.failures
    if e.next_visible_ms:
        d["v"] = e.next_visible_ms
    if e.lease is not None:
        d["l"] = [e.lease.attempt, e.lease.deadline_ms, e.lease.owner]
    if e.acked:
        d["k"] = True
    if e.dead_letter:
        d["d"] = e.dead_letter
    if e.error_attempt or e.error:
        d["e"] = [e.error_attempt, e.error]
    if e.first_failure_ms is not None:
        d["ff"] = e.first_failure_ms
    if e.last_failure_ms is not None:
        d["lf"] = e.last_failure_ms
    return d


def _entry_from_dict(d: Any, offset: int) -> OffsetState:
    bad = f"group state entry for offset {offset}"
    if not isinstance(d, dict) or not set(d) <= {"a", "f", "v", "l", "k", "d", "e", "ff", "lf"}:
        raise ProtocolError(f"{bad} is not a map of known fields")
    ints = {k: d.get(k, 0) for k in ("a", "f", "v")}
    if not all(_nat(v) for v in ints.values()):
        raise ProtocolError(f"{bad}: attempts, failures and visibility must be integers >= 0")
    lease = None
    if "l" in d:
        raw = d["l"]
        if not (isinstance(raw, list) and len(raw) == 3 and _nat(raw[0]) and _nat(raw[1])
                and isinstance(raw[2], str)):
            raise ProtocolError(f"{bad}: lease is [attempt, deadline_ms, owner]")
        lease = Lease(*raw)
    acked = d.get("k", False)
    stage = d.get("d", DLQ_NONE)
    error = d.get("e", [0, ""])
    times = [d.get(k) for k in ("ff", "lf")]
    if type(acked) is not bool or stage not in (DLQ_NONE, DLQ_DUE, DLQ_DONE) or type(stage) is not int:
        raise ProtocolError(f"{bad}: acked must be a bool and the dead-letter stage 0, 1 or 2")
    if not (isinstance(error, list) and len(error) == 2 and _nat(error[0]) and isinstance(error[1], str)):
        raise ProtocolError(f"{bad}: error is [attempt, text]")
    if not all(t is None or _nat(t) for t in times):
        raise ProtocolError(f"{bad}: failure times must be integers >= 0")
    e = OffsetState(ints["a"], ints["f"], ints["v"], lease, acked, stage, error[0], error[1], times[0], times[1])
    # The invariants every operation keeps; a copy that breaks them came from a buggy peer.
    if e.failures > e.attempts or (lease is not None and lease.attempt > e.attempts):
        raise ProtocolError(f"{bad}: more failures or a later lease than attempts")
    if e.in_progress and (lease is None or lease.attempt != e.attempts):
        raise ProtocolError(f"{bad}: an attempt in progress has no lease")
    return e
