"""The client's rules: where each partition is read from, what a seek does to fetches in flight,
when a refused call is tried again, and when a producer's batch closes. Pure: no sockets, threads
or clock (the caller passes `now_ms` and a random number in), so the deterministic simulator can
drive the same code.

Theory of operation
-------------------
*Fetch cursors.* A consumer keeps, per partition, a `_Cursor`: the *generation* (bumped by every
seek), the *position* (the offset of the next message the application gets, moved by the
caller's thread as it hands messages out), the *fetch offset* (where the next Fetch starts) and
whether a fetch of the current generation is *in flight* (sent, or waiting on a retry timer).
The I/O shell asks `next_fetch(p)` for what to send; it gets a `FetchOrder` (partition,
generation, offset) or None when one is already out. A reply is offered back with its order:
`on_fetch_reply` takes it only when the order's generation is the partition's current one, and
then moves the fetch offset on; a reply of an older generation (a fetch parked at the node while
the application sought elsewhere) is dropped. Chunks handed to the caller's thread carry their
generation too, and `is_current` drops the stale ones there.

`seek(p, o)` sets position and fetch offset to `o`, bumps the generation and forgets the fetch
in flight, so the next `next_fetch(p)` sends a new fetch from `o` at once, even while the old one
is still parked at the node. Invariant: every chunk accepted for generation g comes from a chain
of fetches that started at the offset of the seek (or start) that opened g, each starting where
the accepted one before it ended; so what the caller hands out after a seek to `o` is exactly the
committed records from `o` on, in order (the caller skips records below its position, since a
stored batch may begin before the offset asked for, control batches, and records at or above the
high watermark).

*A reply's extent.* A reply is taken only as far as its batches run without a gap:
`contiguous_batches` counts the leading batches in which none starts above where the ones before
it end, and the fetch offset moves to the end of those; the batches after a gap are dropped and
fetched again by the next fetch, which starts at the gap. A node sends the batches from the one
holding the offset on, stopping at the first that does not fit, so its replies have no gap; a
reply that left out a batch which did not fit but kept a smaller one after it would otherwise
move the position past committed records the application never got. The first batch may start
above the offset asked (nothing is stored in between), so a gap costs one more fetch, never a
stall.

*Retry until a deadline.* A call that meets a passing refusal (no leader yet, NotLeader, an
election, backpressure, a connection lost before anything was sent, a rebalance) is tried again
after a jittered, capped, exponential backoff until `api_timeout_ms` has passed since it started;
`retry_delay_ms` says how long to wait, or None to give up. A `Timeout` (the node may have acted)
is retried only for calls that are safe to repeat. Refusals that an election does not end
(`NOT_PASSING`) are raised at once.

*When a batch closes.* A producer without linger (`linger_ms=0`) has no timer: `closes_at_once`
says whether a partition's open batch closes now. In `send()`, only when the partition is idle
(nothing in flight or queued), so a lone record is sent at once; otherwise on the client's I/O
thread's next pass, or when the partition frees up after that, so the records sent while it was
busy leave as one batch rather than one request each. A producer with a linger waits it out.
"""
from __future__ import annotations

from dataclasses import dataclass

from zq.core.retry import BackoffPolicy

# Retriable refusals that waiting for an election does not cure: each has its own bound elsewhere
# (a new topic's metadata spreading waits `request_timeout_ms`; a full disk or too few live nodes
# need an operator), so a call meeting one raises at once instead of waiting out the deadline.
NOT_PASSING = frozenset({"unknown_topic", "not_enough_replicas", "storage_full", "buffer_full"})


@dataclass(frozen=True, slots=True)
class FetchOrder:
    """One fetch to send: `partition` from `offset`, on behalf of seek generation `generation`."""

    partition: int
    generation: int
    offset: int


@dataclass(slots=True)
class _Cursor:
    generation: int
    position: int        # next offset handed to the application (caller's thread)
    fetch_offset: int    # next offset asked of the leader (I/O thread)
    in_flight: bool = False
    stopped: bool = False
    failures: int = 0    # retriable fetch failures in a row, for the backoff


class FetchCursors:
    """Every assigned partition's cursor. Not thread-safe: the consumer holds its lock around calls."""

    def __init__(self, starts: dict[int, int]) -> None:
        for p, offset in starts.items():
            assert offset >= 0, (p, offset)
        self._cursors = {p: _Cursor(0, offset, offset) for p, offset in starts.items()}
        # The positions, as one dict the caller's decode loop reads and writes directly.
        self.positions: dict[int, int] = {p: offset for p, offset in starts.items()}

    def __contains__(self, partition: int) -> bool:
        return partition in self._cursors

    def partitions(self) -> list[int]:
        return sorted(self._cursors)

    def generation(self, partition: int) -> int:
        return self._cursors[partition].generation

    def is_current(self, partition: int, generation: int) -> bool:
        return self._cursors[partition].generation == generation

    def fetch_offset(self, partition: int) -> int:
        return self._cursors[partition].fetch_offset

    def failures(self, partition: int) -> int:
        return self._cursors[partition].failures

    # ---------------------------------------------------------------- commands

    def seek(self, partition: int, offset: int) -> int:
        """Deliver `partition` from `offset` next; returns the new generation."""
        assert offset >= 0, offset
        c = self._cursors[partition]
        c.generation += 1
        c.fetch_offset = offset
        c.in_flight = False   # the fetch out there belongs to the old generation: its reply is dropped
        c.stopped = False
        c.failures = 0
        self.positions[partition] = offset
        return c.generation

    def next_fetch(self, partition: int) -> FetchOrder | None:
        """The fetch to send now, marked in flight; None while one is out or the partition stopped."""
        c = self._cursors[partition]
        if c.in_flight or c.stopped:
            return None
        c.in_flight = True
        return FetchOrder(partition, c.generation, c.fetch_offset)

    # ---------------------------------------------------------------- events

    def on_fetch_reply(self, order: FetchOrder, next_offset: int) -> bool:
        """A reply to `order` whose batches end before `next_offset` (committed part only). False:
        the reply is stale (a seek came after it was sent) and must be dropped."""
        c = self._cursors[order.partition]
        if c.generation != order.generation:
            return False
        assert next_offset >= order.offset, (order, next_offset)
        c.in_flight = False
        c.failures = 0
        c.fetch_offset = next_offset
        return True

    def on_fetch_error(self, order: FetchOrder) -> bool:
        """A retriable failure of `order`: the fetch stays "in flight" (a retry timer owns it) until
        `on_retry_due`. False when stale."""
        c = self._cursors[order.partition]
        if c.generation != order.generation:
            return False
        c.failures += 1
        return True

    def on_retry_due(self, partition: int, generation: int) -> bool:
        """A retry timer of `generation` fired: True when the partition may fetch again now."""
        c = self._cursors[partition]
        if c.generation != generation or not c.in_flight:
            return False   # a seek took over this partition's fetching meanwhile
        c.in_flight = False
        return True

    def on_reset(self, order: FetchOrder, to_offset: int) -> bool:
        """The offset asked for is gone (retention) or not there yet: go on from `to_offset`."""
        c = self._cursors[order.partition]
        if c.generation != order.generation:
            return False
        c.in_flight = False
        c.fetch_offset = to_offset
        return True

    def on_fatal(self, order: FetchOrder) -> bool:
        """A non-retriable error: the partition stops until the next seek."""
        c = self._cursors[order.partition]
        if c.generation != order.generation:
            return False
        c.in_flight = False
        c.stopped = True
        return True


def contiguous_batches(spans: list[tuple[int, int]]) -> int:
    """How many leading batches of a fetch reply to take, given each batch's (base_offset,
    next_offset) in reply order: all up to the first that starts above the end of those before it.
    The first batch is always taken."""
    end = -1
    for i, (base, next_offset) in enumerate(spans):
        if i and base > end:
            return i
        end = max(end, next_offset)
    return len(spans)


# -------------------------------------------------------------------- retry until a deadline


def is_passing(code: str, retriable: bool, timeout: bool, idempotent: bool) -> bool:
    """Whether a refusal (an error's `code` and `retriable`) may end by itself soon, so the call
    should be tried again. A timeout counts only for a call that is safe to repeat."""
    if not retriable or code in NOT_PASSING:
        return False
    return idempotent or not timeout


def retry_delay_ms(attempt: int, started_ms: float, now_ms: float, api_timeout_ms: int,
                   backoff: BackoffPolicy, rnd: float) -> int | None:
    """Milliseconds to wait before retry number `attempt` (>= 1), never past the deadline; None
    when the deadline has passed and the call must give up. (An attempt started before the
    deadline may end after it, by at most the attempt's own bound.)"""
    left_ms = started_ms + api_timeout_ms - now_ms
    if left_ms <= 0:
        return None
    return max(0, min(backoff.delay_ms(attempt, rnd), int(left_ms)))


def gave_up_message(what: str, waited_ms: float, last: str) -> str:
    """The sentence of the error raised when the deadline passed."""
    return (f"{what} did not succeed in {waited_ms / 1000.0:.1f} s of retrying ({last.rstrip('.')}); "
            "check the nodes with `zq status`, or give the client a longer api_timeout_ms")


# -------------------------------------------------------------------- when a producer's batch closes


def closes_at_once(linger_ms: float, in_flight: int, max_in_flight: int, queued: int, in_send: bool) -> bool:
    """Whether a producer's open batch of one partition closes now, to be sent, rather than gather
    more records. Only without linger (`linger_ms` 0; a producer that set a linger waits it out, as
    asked) and only with no batch of the partition `queued` before it. In `send()` itself
    (`in_send`), only when the partition is idle (nothing in flight): a lone record leaves at once,
    with no timer and no wait for the I/O thread. Otherwise on the I/O thread's next pass, or as
    soon as the partition frees up after that, when it could send the batch now (fewer than
    `max_in_flight` of its batches unacknowledged): the records sent meanwhile gather in one
    batch rather than each making a request of its own."""
    if linger_ms > 0 or queued:
        return False
    return in_flight == 0 if in_send else in_flight < max_in_flight
