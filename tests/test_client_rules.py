"""The client's pure rules (zq.core.client_rules): fetch cursors under seeks and late replies, and
retrying until a deadline. No sockets: a model log and a model node stand in for the cluster."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zq.core.client_rules import (FetchCursors, FetchOrder, closes_at_once, contiguous_batches, gave_up_message,
                                  is_passing, retry_delay_ms)
from zq.core.retry import BackoffPolicy
from zq.errors import (BufferFull, ConnectionFailed, InvalidRequest, LeaderNotAvailable, NotEnoughReplicas, NotLeader,
                       Backpressure, Timeout, UnknownTopic)

# ---------------------------------------------------------------------------- a model log and node


def make_log(sizes: list[int], controls: set[int]) -> list[tuple[int, int, bool]]:
    """Stored batches (base, count, control): batch i is a control batch (one offset) when i in controls."""
    out, base = [], 0
    for i, n in enumerate(sizes):
        count = 1 if i in controls else n
        out.append((base, count, i in controls))
        base += count
    return out


def node_reply(log: list, offset: int, batches_max: int) -> list[tuple[int, int, bool]]:
    """What a node answers a fetch from `offset`: whole stored batches, the first may start below it."""
    return [b for b in log if b[0] + b[1] > offset][:batches_max]


class Reader:
    """The consumer's caller side, as zq.client.consumer does it: chunks of the current generation
    are decoded from the position on; control batches and records at or above the hw are skipped."""

    def __init__(self, cursors: FetchCursors) -> None:
        self.cursors = cursors
        self.arrived: list[tuple[int, list, int]] = []   # (generation, batches, hw)
        self.handed: list[int] = []

    def seek(self, offset: int) -> None:
        self.cursors.seek(0, offset)
        self.arrived.clear()   # the consumer drops the partition's queued chunks
        self.handed = []       # the property is about what comes after the last seek

    def take(self) -> None:
        generation, batches, hw = self.arrived.pop(0)
        if not self.cursors.is_current(0, generation):
            return
        position = self.cursors.positions[0]
        for base, count, control in batches:
            end = base + count
            if end <= position:
                continue
            if control:
                position = max(position, min(end, hw))
                continue
            for offset in range(max(base, position), min(end, hw)):
                self.handed.append(offset)
                position = offset + 1
        self.cursors.positions[0] = position


def run(log: list, hw: int, start: int, script: list[tuple[str, int]], gap: bool = False) -> tuple[Reader, int]:
    """Play `script` (seek o / send / answer the i-th parked fetch / take), then drain; returns the
    reader and the offset of the last seek (or the start). With `gap`, the node leaves the middle
    one of three batches out of its replies (as a node packing a smaller later batch into the room
    a bigger one did not fit would)."""
    cursors = FetchCursors({0: start})
    reader = Reader(cursors)
    parked: list[FetchOrder] = []
    last_seek = start

    def answer(order: FetchOrder) -> None:
        batches = node_reply(log, order.offset, 3 if gap else 2)
        if gap and len(batches) == 3:
            del batches[1]
        batches = batches[:contiguous_batches([(b[0], b[0] + b[1]) for b in batches])]   # as the consumer does
        end = max([b[0] + b[1] for b in batches] + [order.offset])
        if cursors.on_fetch_reply(order, min(end, max(order.offset, hw))) and batches:
            reader.arrived.append((order.generation, batches, hw))

    for action, arg in script:
        if action == "seek":
            reader.seek(arg)
            last_seek = arg
        elif action == "send":
            order = cursors.next_fetch(0)
            if order is not None:
                parked.append(order)
        elif action == "answer" and parked:
            answer(parked.pop(arg % len(parked)))
        elif action == "take" and reader.arrived:
            reader.take()
    for _ in range(10_000):   # drain: late replies first, then fetch until caught up
        if parked:
            answer(parked.pop(0))
        elif reader.arrived:
            reader.take()
        else:
            order = cursors.next_fetch(0)
            assert order is not None, "nothing parked, so the cursor must be free to fetch"
            if order.offset >= hw:
                break
            parked.append(order)
    return reader, last_seek


def committed_from(log: list, hw: int, offset: int) -> list[int]:
    return [o for base, count, control in log if not control for o in range(base, base + count) if offset <= o < hw]


# ---------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=12),
       controls=st.sets(st.integers(0, 11), max_size=3),
       hw_cut=st.integers(0, 3),
       start=st.integers(0, 60),
       script=st.lists(st.tuples(st.sampled_from(["seek", "send", "send", "answer", "answer", "take"]),
                                 st.integers(0, 60)), max_size=40),
       gap=st.booleans())
def test_any_interleaving_of_seeks_and_late_replies_hands_out_exactly_the_committed_messages_from_the_last_seek(
        sizes, controls, hw_cut, start, script, gap):
    log = make_log(sizes, controls)
    log_end = log[-1][0] + log[-1][1]
    hw = max(0, log_end - hw_cut)   # the last few records may not be committed yet
    reader, last_seek = run(log, hw, min(start, log_end), [(a, min(o, log_end) if a == "seek" else o)
                                                           for a, o in script], gap)
    assert reader.handed == committed_from(log, hw, last_seek)


def test_a_reply_is_taken_up_to_the_first_gap_between_its_batches():
    assert contiguous_batches([]) == 0
    assert contiguous_batches([(5, 10)]) == 1                          # the first may start above the offset asked
    assert contiguous_batches([(0, 10), (10, 20), (20, 21)]) == 3
    assert contiguous_batches([(0, 10), (10, 20), (30, 31), (31, 40)]) == 2   # 20..29 left out: stop there
    assert contiguous_batches([(0, 10), (5, 12), (12, 13)]) == 3       # an overlap loses nothing
    assert contiguous_batches([(0, 10), (20, 30), (10, 20)]) == 1      # out of order: stop at the jump


def test_a_reply_that_left_out_a_batch_moves_the_fetch_offset_only_to_the_gap():
    # The flaky test_prefetch_is_bounded: 0..59 then a one-record batch at 70 in one reply.
    cursors = FetchCursors({0: 0})
    order = cursors.next_fetch(0)
    spans = [(b, b + 10) for b in range(0, 60, 10)] + [(70, 71)]
    kept = contiguous_batches(spans)
    assert kept == 6
    assert cursors.on_fetch_reply(order, max(n for _, n in spans[:kept]))
    assert cursors.next_fetch(0) == FetchOrder(0, 0, 60)              # 60..69 are asked for next


def test_a_seek_right_after_the_start_is_not_overtaken_by_the_start_fetch():
    # The reproducer, in the core: start "latest" (offset 10), seek to 0 before the I/O
    # thread sent anything; the start's fetch must not go out from 10.
    cursors = FetchCursors({0: 10})
    cursors.seek(0, 0)
    order = cursors.next_fetch(0)
    assert order == FetchOrder(0, 1, 0)


def test_a_fetch_parked_at_the_node_does_not_block_the_seek_and_its_reply_is_dropped():
    cursors = FetchCursors({0: 10})
    parked = cursors.next_fetch(0)
    assert parked is not None and cursors.next_fetch(0) is None   # one in flight
    generation = cursors.seek(0, 3)
    fresh = cursors.next_fetch(0)
    assert fresh == FetchOrder(0, generation, 3)                   # sent at once, beside the parked one
    assert not cursors.on_fetch_reply(parked, 12)                  # the late reply is dropped...
    assert cursors.fetch_offset(0) == 3                            # ...and moves nothing
    assert cursors.on_fetch_reply(fresh, 7) and cursors.fetch_offset(0) == 7


def test_twice_in_a_row_the_last_seek_wins():
    cursors = FetchCursors({0: 0})
    first = cursors.seek(0, 5)
    second = cursors.seek(0, 2)
    assert second == first + 1 and cursors.positions[0] == 2
    assert cursors.next_fetch(0) == FetchOrder(0, second, 2)
    assert not cursors.is_current(0, first)


def test_a_retry_timer_of_an_older_generation_does_nothing():
    cursors = FetchCursors({0: 0})
    order = cursors.next_fetch(0)
    assert order is not None and cursors.on_fetch_error(order)
    assert cursors.next_fetch(0) is None                           # the timer owns the next fetch
    cursors.seek(0, 4)
    fresh = cursors.next_fetch(0)
    assert not cursors.on_retry_due(0, order.generation)           # stale timer
    assert cursors.next_fetch(0) is None and fresh is not None     # the seek's fetch is still the one out


def test_a_fatal_error_stops_the_partition_until_a_seek():
    cursors = FetchCursors({0: 0})
    order = cursors.next_fetch(0)
    assert cursors.on_fatal(order)
    assert cursors.next_fetch(0) is None
    cursors.seek(0, 0)
    assert cursors.next_fetch(0) is not None


# ---------------------------------------------------------------------------- retry until a deadline


def passing(error: Exception, idempotent: bool = True) -> bool:
    return is_passing(error.code, error.retriable, isinstance(error, Timeout), idempotent)


def test_elections_and_lost_connections_are_passing_and_mistakes_are_not():
    for e in (NotLeader(), LeaderNotAvailable(), Backpressure(), ConnectionFailed()):
        assert passing(e) and passing(e, idempotent=False)
    assert passing(Timeout()) and not passing(Timeout(), idempotent=False)   # the node may have acted
    for e in (InvalidRequest(), UnknownTopic(), NotEnoughReplicas(), BufferFull()):
        assert not passing(e)


@given(attempt=st.integers(1, 200), elapsed=st.integers(0, 100_000), rnd=st.floats(0, 0.999))
def test_retry_delays_are_capped_jittered_and_never_pass_the_deadline(attempt, elapsed, rnd):
    backoff = BackoffPolicy(50, 2_000)
    delay = retry_delay_ms(attempt, 1_000, 1_000 + elapsed, 60_000, backoff, rnd)
    if elapsed >= 60_000:
        assert delay is None
    else:
        assert delay is not None and 0 <= delay <= min(2_000, 60_000 - elapsed)


def test_an_election_of_two_seconds_is_ridden_through_with_a_default_deadline():
    # Sum the delays a call waits through while refused for 2 s: it must not give up.
    backoff, now, attempt = BackoffPolicy(50, 2_000), 0, 0
    while now < 2_000:
        attempt += 1
        delay = retry_delay_ms(attempt, 0, now, 60_000, backoff, 0.5)
        assert delay is not None
        now += delay
    assert attempt < 20


def test_the_error_after_the_deadline_says_how_long_and_what_to_do():
    text = gave_up_message("list_offsets of t/0", 60_400, "t/0 has no leader right now.")
    assert "60.4 s" in text and "api_timeout_ms" in text and "zq status" in text



# ---------------------------------------------------------------------------- when a batch closes


def test_without_linger_a_batch_closes_when_its_partition_can_send_it():
    # In send(): only an idle partition, so a lone record leaves at once.
    assert closes_at_once(0, in_flight=0, max_in_flight=1, queued=0, in_send=True)
    assert closes_at_once(0, in_flight=0, max_in_flight=64, queued=0, in_send=True)
    assert not closes_at_once(0, in_flight=1, max_in_flight=64, queued=0, in_send=True)  # next pass decides
    # On the I/O thread's pass: whenever the partition could send it now.
    assert closes_at_once(0, in_flight=63, max_in_flight=64, queued=0, in_send=False)
    assert not closes_at_once(0, in_flight=1, max_in_flight=1, queued=0, in_send=False)  # busy: gather more
    for in_send in (True, False):
        assert not closes_at_once(0, in_flight=0, max_in_flight=1, queued=1, in_send=in_send)  # one waits before it
        assert not closes_at_once(5, in_flight=0, max_in_flight=1, queued=0, in_send=in_send)  # a linger was asked
        assert not closes_at_once(0.5, in_flight=0, max_in_flight=64, queued=0, in_send=in_send)
