"""The client room's FetchMany (zq.node.clients), against a fake host: properties of every answer,
and the parked-fetch rules across both kinds of fetch. The cluster simulator runs the same room
under faults (tests/test_sim.py, tests/test_node_teeth.py); the real node on loopback in
tests/test_node.py."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from zq import protocol as P
from zq.core.repl_types import FOLLOWER, LEADER
from zq.errors import UnknownPartition
from zq.limits import DEFAULT
from zq.node.clients import Clients
from zq.node.replicas import Part

TOPIC = "t"


class _Host:
    """Partitions 0..n-1 of TOPIC, each a log of batches [(base, next, size)]; replies recorded."""

    def __init__(self, logs: dict[int, list[tuple[int, int, int]]], frames_max: int = DEFAULT.frames_per_message_max):
        self.logs = logs
        self.name = "n1"
        self.counters: dict[str, int] = {}
        self.limits = dataclasses.replace(DEFAULT, frames_per_message_max=frames_max)
        self.replies: list[tuple[bytes, object, list]] = []
        self.timers: list[tuple[int, object]] = []
        self.now = 1000

    def resolve(self, topic: str, partition: int) -> int:
        if topic != TOPIC or partition not in self.logs:
            raise UnknownPartition(f"no partition {partition}")
        return partition

    def leader_of(self, tp):
        return "n2", 1

    def address_of(self, name: str) -> str:
        return "127.0.0.1:1"

    def read(self, tp, offset: int, max_bytes: int, upto: int):
        """As zq.io.store.read: from the batch holding `offset`, consecutive, at least one."""
        out, size = [], 0
        for base, nxt, n in self.logs[tp]:
            if nxt <= offset or base >= upto:
                continue
            if out and size + n > max_bytes:
                break
            out.append((tp, base, nxt, n))
            size += n
        return out, size

    def reply(self, identity, msg, *frames):
        self.replies.append((identity, msg, list(frames)))

    def reply_error(self, identity, req_id, error):
        self.replies.append((identity, P.error_reply(req_id, error), []))

    def reply_fetch(self, identity, msg, values):
        self.replies.append((identity, msg, list(values)))

    def fetch_backlog(self, identity):
        return 0, 0, 0

    def now_ms(self) -> int:
        return self.now

    def wall_ms(self) -> int:
        return self.now

    def at(self, when_ms, fn):
        self.timers.append((when_ms, fn))


def _room(logs, hws: dict[int, int], followers=(), frames_max: int = DEFAULT.frames_per_message_max):
    host = _Host(logs, frames_max)
    host.counters = _Counter()
    parts = {}
    for p, log in logs.items():
        replica = SimpleNamespace(role=FOLLOWER if p in followers else LEADER, high_watermark=hws[p],
                                  log_end=log[-1][1] if log else 0)
        parts[p] = Part(p, TOPIC, replica, True, log_start=log[0][0] if log else 0)
    replicas = SimpleNamespace(parts=parts, fenced=set(), dirty=set())
    return host, Clients(host, replicas)


class _Counter(dict):
    def __missing__(self, key):
        return 0


@st.composite
def _cases(draw):
    n = draw(st.integers(1, 6))
    logs, hws, asks = {}, {}, []
    for p in range(n):
        start = draw(st.integers(0, 5))
        log, at = [], start
        for _ in range(draw(st.integers(0, 5))):
            count, size = draw(st.integers(1, 4)), draw(st.integers(1, 300))
            log.append((at, at + count, size))
            at += count
        logs[p] = log
        hws[p] = draw(st.integers(start, at))
    for p in draw(st.lists(st.integers(0, n + 1), unique=True, max_size=n + 2)):
        # Mostly in range (from the log start to the high watermark), sometimes anywhere.
        start = logs[p][0][0] if logs.get(p) else 0
        inside = st.integers(start, hws[p]) if p in hws else st.integers(0, 3)
        asks.append([p, draw(st.one_of(inside, inside, inside, st.integers(-1, 30)))])
    followers = draw(st.sets(st.integers(0, n - 1), max_size=2))
    return logs, hws, asks, followers, draw(st.integers(1, 1000)), draw(st.integers(3, 8))


@settings(max_examples=400, deadline=None)
@given(_cases())
def test_every_partition_asked_is_answered_once_within_its_bounds(case):
    """Each partition asked for is in `results` or `errors`, once; its batches start at the one
    holding its offset, are consecutive and lie below its high watermark; the reply stays within its
    bytes (past them only by a partition's first batch, and none once they ran out) and frames; an
    error is the one a Fetch of that partition alone gets."""
    logs, hws, asks, followers, max_bytes, frames_max = case
    host, room = _room(logs, hws, followers, frames_max)
    room.on_fetch_many(b"c", P.FetchMany(1, TOPIC, asks, max_bytes, 0))
    (_, reply, values), = host.replies
    assert isinstance(reply, P.FetchManyReply)
    named = [r[0] for r in reply.results] + [e[0] for e in reply.errors]
    assert sorted(named) == sorted(p for p, _ in asks)
    offsets = dict(map(tuple, asks))
    for p, code, _, data in reply.errors:
        if p not in logs:
            assert code == "unknown_partition"
        elif p in followers:
            assert code == "not_leader" and data["leader"] == "n2"
        else:
            assert code == "offset_out_of_range"
            assert not (data["log_start"] <= offsets[p] <= data["high_watermark"])
    at, used = 0, 0
    for p, hw, _log_start, _log_end, n in reply.results:
        got = values[at:at + n]
        at += n
        assert not got or used < max_bytes, "a partition answered with batches after the reply's bytes ran out"
        assert hw == hws[p] and p in logs and p not in followers
        expect = offsets[p]
        for i, (tp, base, nxt, _) in enumerate(got):
            assert tp == p
            assert base < hw, "a batch at or above the high watermark"
            used += got[i][3]
            if i == 0:
                assert base <= expect < nxt
            else:
                assert base == expect, "batches not consecutive"
                assert used <= max_bytes, "past the reply's bytes with more than a partition's first batch"
            expect = nxt
    assert at == len(values) and len(values) <= frames_max - 2


def test_a_parked_fetch_many_wakes_on_any_of_its_partitions_and_only_once():
    logs = {p: [(0, 1, 10)] for p in range(3)}
    host, room = _room(logs, {0: 1, 1: 1, 2: 1})
    room.on_fetch_many(b"c", P.FetchMany(1, TOPIC, [[0, 1], [1, 1], [2, 1]], 1000, 500))
    assert host.replies == [] and room.parked_count == 1 and len(host.timers) == 1
    logs[1].append((1, 3, 20))
    room.replicas.parts[1].replica.high_watermark = room.replicas.parts[1].replica.log_end = 3
    room.on_high_watermark(1, 3)
    (_, reply, values), = host.replies
    assert reply.results == [[0, 1, 0, 1, 0], [1, 3, 0, 3, 1], [2, 1, 0, 1, 0]] and values == [(1, 1, 3, 20)]
    assert room.parked_count == 0 and not room.parked and not room.parked_by_client
    room.on_high_watermark(0, 1)
    host.timers[0][1]()   # its wait runs out: nothing more is sent
    assert len(host.replies) == 1


def test_one_parked_fetch_per_client_and_partition_across_both_kinds():
    """A Fetch of a partition that a parked FetchMany of the same client waits on answers the
    FetchMany at once (and the other way round); another client's are left alone."""
    logs = {p: [(0, 1, 10)] for p in range(2)}
    host, room = _room(logs, {0: 1, 1: 1})
    room.on_fetch_many(b"c", P.FetchMany(1, TOPIC, [[0, 1], [1, 1]], 1000, 500))
    room.on_fetch_many(b"d", P.FetchMany(2, TOPIC, [[0, 1], [1, 1]], 1000, 500))
    room.on_fetch(b"c", P.Fetch(3, TOPIC, 1, 1, 1000, 500, None))
    assert [(i, m.req_id) for i, m, _ in host.replies] == [(b"c", 1)]
    assert room.parked_count == 2   # d's FetchMany and c's Fetch
    room.on_fetch_many(b"c", P.FetchMany(4, TOPIC, [[1, 1]], 1000, 500))
    assert [(i, m.req_id) for i, m, _ in host.replies] == [(b"c", 1), (b"c", 3)]
    room.refuse_parked(0)
    assert [(i, m.req_id) for i, m, _ in host.replies][-1] == (b"d", 2)
    assert [e[:2] for e in host.replies[-1][1].errors] == [[0, "not_leader"]]
    assert room.parked_count == 1 and list(room.parked_by_client) == [(b"c", 1)]
