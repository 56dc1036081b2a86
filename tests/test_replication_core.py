"""Scenario tests of the replication core: three real `Replica`s over a scripted fake network.

The harness (`Trio`) is the smallest honest shell: it applies each Ready to an in-memory disk
(sync when asked, or at once when `autosync` is on for that node), queues the messages, and
delivers them only when a test says so, so every interleaving here is chosen on purpose.
"""
from __future__ import annotations

import random

import cbor2
import pytest

from zq.core.repl_epochs import appended, end_for_epoch, epoch_at, truncated
from zq.core.repl_types import (
    BACKPRESSURE, CANDIDATE, COMMITTED, CONFIG_PREFIX, FOLLOWER, LEADER, MARKER_PAYLOAD, MESSAGE_TYPES, NO_PRODUCER,
    NOT_LEADER, OUT_OF_ORDER, Append, AppendAck, Entry, Fetch, HardState, ReplicationConfig, RequestVote,
    TimeoutNow, Vote, encode_config,
)
from zq.core.replication import WALL_OFFSET_KEPT_TIMEOUTS, Replica
from zq.errors import ProtocolError
from zq.sim.disk import SimDisk

# Plain Raft elections (no PreVote round): these tests move one replica's clock at a time and let
# it stand at once; tests/test_prevote.py tests the PreVote round, and the simulator runs with it.
CFG = ReplicationConfig(election_timeout_ms=100, heartbeat_interval_ms=20, fetch_retry_ms=30,
                        append_entries_max=4, append_bytes_max=64, pending_proposals_max=8, pre_vote=False)
NAMES = ("a", "b", "c")
DELIVER_MAX = 10_000  # messages one deliver() may pass, so a livelock fails instead of hanging


class Trio:
    def __init__(self, disks: dict[str, SimDisk] | None = None, seed: int = 1,
                 names: tuple[str, ...] = NAMES, initial: tuple[str, ...] | None = None) -> None:
        self.rng = random.Random(seed)
        self.names = names
        self.initial = {n: (names if initial is None else initial) for n in names}  # config before the log
        self.disks = disks or {n: SimDisk([0]) for n in names}
        self.autosync = {n: True for n in names}
        self.now = {n: 0 for n in names}
        self.queue: list[tuple[str, str, object]] = []
        self.outcomes: dict[int, object] = {}
        self.readies: dict[str, list] = {n: [] for n in names}
        self.replicas = {n: self._boot(n) for n in names}

    def _boot(self, n: str) -> Replica:
        store = self.disks[n].volatile[0]
        return Replica(n, self.initial[n], store, rng=self.rng, now_ms=self.now[n], config=CFG,
                       hard_state=store.hard, log_end=store.log_end)

    def restart(self, n: str, keep_unsynced: bool = False) -> None:
        disk = self.disks[n]
        if keep_unsynced:
            disk.sync()
        disk.unsynced.clear()
        disk.volatile = {0: disk.durable[0].copy()}
        self.queue = [m for m in self.queue if m[1] != n]
        self.replicas[n] = self._boot(n)

    def drain(self, n: str) -> None:
        r = self.replicas[n]
        while True:
            rd = r.ready()
            self.readies[n].append(rd)
            if rd.empty:
                r.advance()
                return
            self.disks[n].write(0, rd)
            synced = rd.must_sync or (self.autosync[n] and rd.has_writes)
            if synced:
                self.disks[n].sync()
            for out in rd.messages:
                for dst in (r.peers if out.to is None else [out.to]):
                    self.queue.append((n, dst, out.message))
            for o in rd.outcomes:
                self.outcomes[o.proposal_id] = o
            r.advance()
            if synced:
                r.on_persisted(rd.log_end)
            else:
                return

    def sync(self, n: str) -> None:
        self.disks[n].sync()
        self.replicas[n].on_persisted(self.replicas[n].log_end)
        self.drain(n)

    def tick(self, n: str, ms: int) -> None:
        self.now[n] += ms
        self.replicas[n].tick(self.now[n])
        self.drain(n)

    def elect(self, n: str) -> None:
        """Make n time out first, then let the votes flow."""
        self.tick(n, 2 * CFG.election_timeout_ms)
        self.deliver()
        assert self.replicas[n].role == LEADER

    def propose(self, n: str, payload: bytes, count: int = 1, producer_id: int = NO_PRODUCER, seq: int = -1) -> int:
        pid = self.replicas[n].propose(count, producer_id, seq, payload)
        self.drain(n)
        return pid

    def deliver(self, drop=lambda src, dst, msg: False) -> None:
        for _ in range(DELIVER_MAX):
            if not self.queue:
                return
            src, dst, msg = self.queue.pop(0)
            if drop(src, dst, msg) or dst not in self.replicas:
                continue
            self.replicas[dst].step(msg)
            self.drain(dst)
        raise AssertionError("the cores kept talking without settling")

    def heartbeat(self, leader: str) -> None:
        self.tick(leader, CFG.heartbeat_interval_ms)
        self.deliver()

    def log(self, n: str) -> list[tuple[int, int, int, bytes]]:
        return [(e.base_offset, e.count, e.epoch, e.payload) for e in self.replicas[n].entries(0, 10_000, 1 << 30)]


def _disk_with(entries: list[Entry], epoch: int, voted_for: str | None = None) -> SimDisk:
    """A disk holding `entries` durably, as a replica that had written them would leave it."""
    disk = SimDisk([0])
    history: tuple = ()
    for e in entries:
        history = appended(history, e.epoch, e.base_offset)
    store = disk.durable[0]
    store.apply(None, tuple(entries), HardState(epoch, voted_for, history, 0))
    disk.volatile = {0: store.copy()}
    return disk


def _log_of(epochs: list[int], counts: list[int] | None = None) -> list[Entry]:
    out, pos = [], 0
    for i, ep in enumerate(epochs):
        n = counts[i] if counts else 1
        out.append(Entry(pos, n, ep, NO_PRODUCER, NO_PRODUCER, f"e{ep}@{pos}".encode()))
        pos += n
    return out


# ------------------------------------------------------------------ epoch history


def test_epoch_history_lookups() -> None:
    h = ((1, 0), (4, 3), (6, 5))
    assert [epoch_at(h, o) for o in (-1, 0, 2, 3, 4, 5, 9)] == [0, 1, 1, 4, 4, 6, 6]
    assert end_for_epoch(h, 4, 10) == (4, 5)
    assert end_for_epoch(h, 5, 10) == (4, 5)   # no epoch 5 here: the largest below it
    assert end_for_epoch(h, 9, 10) == (6, 10)
    assert end_for_epoch(((3, 2),), 1, 10) == (0, 2)
    assert truncated(h, 5) == ((1, 0), (4, 3))
    assert appended(h, 6, 7) is h and appended(h, 7, 7) == h + ((7, 7),)


# ------------------------------------------------------------------ elections and replication


def test_election_then_replication_commits_everywhere() -> None:
    t = Trio()
    t.elect("a")
    assert t.replicas["a"].epoch == 1
    ids = [t.propose("a", f"m{i}".encode(), count=2) for i in range(3)]
    t.deliver()
    t.heartbeat("a")
    leader_log = t.log("a")
    assert leader_log[0][3] == b""  # the leader's epoch marker
    assert [x[3] for x in leader_log[1:]] == [b"m0", b"m1", b"m2"]
    for n in NAMES:
        assert t.log(n) == leader_log
        assert t.replicas[n].high_watermark == t.replicas["a"].log_end == 7
    assert [(t.outcomes[i].status, t.outcomes[i].base_offset, t.outcomes[i].epoch) for i in ids] == [
        (COMMITTED, 1, 1), (COMMITTED, 3, 1), (COMMITTED, 5, 1)]
    assert {t.replicas[n].leader for n in NAMES} == {"a"}


def test_vote_only_for_up_to_date_log_and_one_per_epoch() -> None:
    t = Trio()
    t.elect("a")
    t.propose("a", b"x")
    t.deliver(drop=lambda s, d, m: d == "c")  # c misses everything
    b, c = t.replicas["b"], t.replicas["c"]
    # c's log is behind b's: b refuses it even in a newer epoch.
    b.step(RequestVote(5, "c", c.last_epoch, c.log_end))
    rd = b.ready()
    b.advance()
    assert [o.message for o in rd.messages] == [Vote(5, "b", False)]
    # a up-to-date candidate gets the vote, but a second candidate of that epoch does not.
    b.step(RequestVote(5, "a", 1, t.replicas["a"].log_end))
    rd = b.ready()
    b.advance()
    assert rd.messages[0].message == Vote(5, "b", True)
    b.step(RequestVote(5, "c", 9, 1000))
    rd = b.ready()
    b.advance()
    assert rd.messages[0].message == Vote(5, "b", False)


def test_vote_is_durable_before_the_reply_is_sent() -> None:
    disks = {"a": _disk_with(_log_of([1, 1]), 1), "b": _disk_with(_log_of([1, 1]), 1), "c": _disk_with([], 1)}
    t = Trio(disks)
    t.autosync["b"] = False  # b syncs only when a Ready demands it
    b = t.replicas["b"]
    b.step(RequestVote(2, "c", 0, 0))  # refused (c's log is behind), but b moves to epoch 2
    t.drain("b")
    assert (b.epoch, b.voted_for) == (2, None)
    b.step(RequestVote(2, "a", 1, 2))  # granted: only the vote changes now
    rd = b.ready()
    assert [o.message for o in rd.messages] == [Vote(2, "b", True)]
    assert rd.must_sync and rd.hard_state is not None and rd.hard_state.voted_for == "a"
    t.disks["b"].write(0, rd)
    t.disks["b"].sync()
    b.advance()
    # Restarting b from its durable state keeps the vote: it cannot vote for c in that epoch.
    t.restart("b")
    assert (t.replicas["b"].epoch, t.replicas["b"].voted_for) == (2, "a")
    t.replicas["b"].step(RequestVote(2, "c", 5, 100))
    rd = t.replicas["b"].ready()
    assert rd.messages[0].message == Vote(2, "b", False)


def test_entries_of_an_older_epoch_commit_only_with_one_of_the_leaders_own() -> None:
    """Raft figure 8: a majority holding an old-epoch entry does not commit it by itself."""
    disks = {"a": _disk_with(_log_of([1, 2]), 3), "b": _disk_with(_log_of([1]), 3),
             "c": _disk_with(_log_of([1, 3]), 3)}
    t = Trio(disks)
    t.tick("a", 2 * CFG.election_timeout_ms)
    t.deliver(drop=lambda s, d, m: d == "c" or s == "c" or isinstance(m, (Append, Fetch)))
    a = t.replicas["a"]
    assert a.role == LEADER and a.epoch == 4 and a.log_end == 3  # [e1, e2, marker e4]
    a.step(AppendAck(4, "b", 2))  # b holds e1 and e2 durably: a majority for offset 2
    t.drain("a")
    assert a.high_watermark == 0
    a.step(AppendAck(4, "b", 3))  # and now the marker of epoch 4 too
    t.drain("a")
    assert a.high_watermark == 3


def test_commit_needs_a_durable_majority() -> None:
    t = Trio()
    t.elect("a")
    t.heartbeat("a")
    t.autosync["b"] = t.autosync["c"] = False
    pid = t.propose("a", b"x")
    t.deliver()
    t.heartbeat("a")
    # Both followers hold the batch, neither durably: the leader alone is no majority.
    assert t.replicas["b"].log_end == t.replicas["c"].log_end == 2
    assert t.replicas["a"].high_watermark == 1
    assert pid not in t.outcomes
    t.sync("b")
    t.deliver()
    assert t.replicas["a"].high_watermark == 2
    assert t.outcomes[pid].status == COMMITTED


def test_leader_counts_itself_only_once_durable() -> None:
    t = Trio()
    t.elect("a")
    t.heartbeat("a")
    t.autosync["a"] = t.autosync["c"] = False
    pid = t.propose("a", b"x")
    t.deliver()
    t.heartbeat("a")
    # Only b holds x durably: one of three.
    assert t.replicas["a"].high_watermark == 1 and pid not in t.outcomes
    t.sync("a")
    t.deliver()
    assert t.replicas["a"].high_watermark == 2 and t.outcomes[pid].status == COMMITTED


def test_follower_acknowledges_only_what_matches_the_leader() -> None:
    """A follower's durable but divergent tail must not count towards a new leader's commit."""
    a = _disk_with(_log_of([1, 1]), epoch=2)
    b = _disk_with(_log_of([1, 1]), epoch=2)
    c = _disk_with(_log_of([1, 1, 2, 2, 2]), epoch=2)  # durable entries of a leader that lost
    t = Trio({"a": a, "b": b, "c": c})
    t.tick("a", 2 * CFG.election_timeout_ms)
    t.deliver(drop=lambda s, d, m: d == "c" or s == "c")
    assert t.replicas["a"].role == LEADER
    t.queue.clear()
    t.replicas["c"].step(Append(3, "a", 2, 1, 0, 3, []))  # heartbeat: prev (2, epoch 1) matches c
    rd = t.replicas["c"].ready()
    t.replicas["c"].advance()
    acks = [o.message for o in rd.messages if isinstance(o.message, AppendAck)]
    assert acks == [AppendAck(3, "c", 2)]  # not 5: entries 2..4 are not known to match


# ------------------------------------------------------------------ truncation (Raft figure 7)

LEADER_EPOCHS = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
FIGURE_7 = {
    "a_missing_one": [1, 1, 1, 4, 4, 5, 5, 6, 6],
    "b_missing_many": [1, 1, 1, 4],
    "c_extra_same_epoch": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],
    "d_extra_newer_epoch": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],
    "e_divergent_epoch_4": [1, 1, 1, 4, 4, 4, 4],
    "f_divergent_epochs_2_3": [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],
}


@pytest.mark.parametrize("case", sorted(FIGURE_7))
def test_follower_truncates_exactly_its_divergent_suffix(case: str) -> None:
    leader_log = _log_of(LEADER_EPOCHS)
    follower_log = _log_of(FIGURE_7[case])
    # c_extra_same_epoch: the extra entry of epoch 6 came from the same leader, so it carries
    # that leader's payload; _log_of names payloads by (epoch, offset), which matches.
    disks = {"a": _disk_with(leader_log, 7), "b": _disk_with(leader_log, 7), "c": _disk_with(follower_log, 7)}
    t = Trio(disks)
    t.tick("a", 2 * CFG.election_timeout_ms)
    t.deliver()
    assert t.replicas["a"].role == LEADER and t.replicas["a"].epoch == 8
    pid = t.propose("a", b"new")
    t.deliver()
    for _ in range(5):
        t.heartbeat("a")
    assert t.log("c") == t.log("a")
    common = 0
    while common < min(len(LEADER_EPOCHS), len(FIGURE_7[case])) and LEADER_EPOCHS[common] == FIGURE_7[case][common]:
        common += 1
    # Only the divergent suffix went: the common prefix was never rewritten on c's disk.
    truncations = [rd.truncate_from for rd in t.readies["c"] if rd.truncate_from is not None]
    assert all(cut >= common for cut in truncations)
    assert bool(truncations) == (len(FIGURE_7[case]) > common)
    assert t.outcomes[pid].status == COMMITTED
    assert t.replicas["c"].high_watermark == t.replicas["a"].log_end


def test_truncation_point_inside_a_batch_cuts_the_whole_batch() -> None:
    """The leader's epoch may end inside one of our batches (simulator seed 248)."""
    leader_log = _log_of([1, 7, 9], counts=[5, 1, 1])    # epoch 7 holds [5,6)
    follower_log = _log_of([1, 5, 8], counts=[5, 3, 1])  # epoch 5 holds [5,8)
    disks = {"a": _disk_with(leader_log, 9), "b": _disk_with(leader_log, 9), "c": _disk_with(follower_log, 9)}
    t = Trio(disks)
    t.elect("a")
    for _ in range(3):
        t.heartbeat("a")
    assert t.log("c") == t.log("a")
    # Asked about epoch 8, the leader answers "epoch 7 ends at 6", inside c's batch [5,8).
    assert [rd.truncate_from for rd in t.readies["c"] if rd.truncate_from is not None] == [5]


# ------------------------------------------------------------------ fencing


def test_stale_leader_cannot_commit_and_fails_its_proposals() -> None:
    t = Trio()
    t.elect("a")
    t.heartbeat("a")
    # a is cut off; b and c elect b.
    t.tick("b", 2 * CFG.election_timeout_ms)
    t.deliver(drop=lambda s, d, m: "a" in (s, d))
    assert t.replicas["b"].role == LEADER and t.replicas["b"].epoch == 2
    pid = t.propose("a", b"lost")  # a still believes it leads epoch 1
    assert pid not in t.outcomes
    t.deliver()  # a's Append reaches b and c, who answer with epoch 2
    assert t.replicas["a"].role == FOLLOWER
    assert t.outcomes[pid].status == NOT_LEADER
    assert all(x[3] != b"lost" for x in t.log("b"))
    t.heartbeat("b")
    assert t.log("a") == t.log("b")  # a's uncommitted batch is gone from a too


def test_check_quorum_steps_down_an_isolated_leader() -> None:
    t = Trio()
    t.elect("a")
    t.heartbeat("a")
    pid = t.propose("a", b"unacked")
    t.queue.clear()  # nothing from a arrives anywhere: a is isolated (or paused, then resumed)
    t.tick("a", CFG.election_timeout_ms // 2)
    assert t.replicas["a"].role == LEADER
    t.tick("a", CFG.election_timeout_ms)
    assert t.replicas["a"].role == FOLLOWER
    assert t.outcomes[pid].status == NOT_LEADER


# ------------------------------------------------------------------ idempotent producer


def test_duplicate_idempotent_batch_returns_the_original_offset_even_after_leader_change() -> None:
    t = Trio()
    t.elect("a")
    first = t.propose("a", b"p7-0", count=2, producer_id=7, seq=0)
    t.deliver()
    t.heartbeat("a")
    again = t.propose("a", b"p7-0", count=2, producer_id=7, seq=0)
    end = t.replicas["a"].log_end
    assert t.outcomes[again].status == COMMITTED and t.outcomes[again].duplicate
    assert t.outcomes[again].base_offset == t.outcomes[first].base_offset
    gap = t.propose("a", b"p7-5", producer_id=7, seq=5)
    assert t.outcomes[gap].status == OUT_OF_ORDER
    assert t.replicas["a"].log_end == end
    # b takes over; its producer table comes from its own log.
    t.elect("b")
    retry = t.propose("b", b"p7-0", count=2, producer_id=7, seq=0)
    assert t.outcomes[retry].base_offset == t.outcomes[first].base_offset
    nxt = t.propose("b", b"p7-2", producer_id=7, seq=2)
    t.deliver()
    t.heartbeat("b")
    assert t.outcomes[nxt].status == COMMITTED and not t.outcomes[nxt].duplicate


def test_backpressure_when_too_many_proposals_wait() -> None:
    t = Trio()
    t.elect("a")
    ids = [t.propose("a", b"x") for _ in range(CFG.pending_proposals_max + 1)]
    assert t.outcomes[ids[-1]].status == BACKPRESSURE
    assert all(i not in t.outcomes for i in ids[:-1])


def test_proposal_to_a_follower_is_not_leader_with_a_hint() -> None:
    t = Trio()
    t.elect("a")
    t.heartbeat("a")
    pid = t.propose("b", b"x")
    assert (t.outcomes[pid].status, t.outcomes[pid].leader_hint) == (NOT_LEADER, "a")


# ------------------------------------------------------------------ lost broadcasts and restarts


def test_follower_fetches_the_gap_after_a_dropped_append() -> None:
    t = Trio()
    t.elect("a")
    t.heartbeat("a")
    t.propose("a", b"one")
    t.deliver(drop=lambda s, d, m: d == "c" and isinstance(m, Append))  # PUB/SUB dropped it for c
    assert t.replicas["c"].log_end == 1
    t.propose("a", b"two")
    t.deliver()  # c sees prev_end 2 > its end 1: a gap
    sent_fetch = [o.message for rd in t.readies["c"] for o in rd.messages if isinstance(o.message, Fetch)]
    assert sent_fetch and sent_fetch[-1].from_end == 1
    assert t.log("c") == t.log("a")


def test_restart_from_durable_state_loses_unsynced_writes_then_catches_up() -> None:
    t = Trio()
    t.elect("a")
    t.heartbeat("a")
    t.autosync["c"] = False
    t.propose("a", b"x")
    t.deliver()
    assert t.replicas["c"].log_end == 2
    t.restart("c")  # crash: c's unsynced copy of x is gone
    c = t.replicas["c"]
    assert (c.log_end, c.epoch, c.role, c.leader) == (1, 1, FOLLOWER, None)
    t.autosync["c"] = True
    t.heartbeat("a")
    assert t.log("c") == t.log("a")
    assert t.replicas["c"].high_watermark == 2


# ------------------------------------------------------------------ peer input


def test_bad_peer_input_raises_protocol_error() -> None:
    t = Trio()
    t.elect("a")
    b = t.replicas["b"]
    with pytest.raises(ProtocolError):
        b.step(Append(1, "mallory", 0, 0, 0, 0, []))
    with pytest.raises(ProtocolError):
        b.step(Append(1, "a", 1, 1, 0, 5, [[7, 1, 1, -1, -1, b""]]))  # not contiguous with prev_end
    with pytest.raises(ProtocolError):
        b.step(Append(1, "a", 1, 1, 0, 5, [[1, 0, 1, -1, -1, b""]]))  # empty batch
    with pytest.raises(ProtocolError):
        b.step(Append(1, "a", 1, 1, 0, 5, [[1, 1, 2, -1, -1, b""]]))  # entry newer than its Append
    with pytest.raises(ProtocolError):
        t.replicas["a"].step(AppendAck(1, "b", 999))
    with pytest.raises(ProtocolError):
        b.step("hello")
    with pytest.raises(ProtocolError):
        b.step(Append(1, "a", "0", 0, 0, 0, []))  # an offset that is not an int
    with pytest.raises(ProtocolError):
        b.step(Vote(1, "a", 1))  # granted must be a bool
    with pytest.raises(ProtocolError):
        b.step(Fetch(-5, "a", 0, 0))


def test_messages_round_trip_through_cbor() -> None:
    samples = {
        Append: Append(3, "a", 4, 2, 1, 6, [Entry(4, 2, 3, 7, 0, b"xy").to_wire()]),
        AppendAck: AppendAck(3, "b", 6),
        Fetch: Fetch(3, "b", 4, 2),
        RequestVote: RequestVote(3, "c", 2, 4),
        Vote: Vote(3, "b", True),
    }
    for cls in MESSAGE_TYPES:
        fields = [f for f in cls.__slots__]
        msg = samples.get(cls) or cls(*([1, "a"] + [0] * (len(fields) - 2)))
        wire = cbor2.dumps([getattr(msg, f) for f in fields])
        assert cls(*cbor2.loads(wire)) == msg
    entry = Entry(4, 2, 3, 7, 0, b"xy")
    assert Entry.from_wire(cbor2.loads(cbor2.dumps(entry.to_wire()))) == entry


def test_leader_reports_replica_progress_for_status() -> None:
    t = Trio()
    t.elect("a")
    t.heartbeat("a")
    t.propose("a", b"x")
    t.deliver(drop=lambda s, d, m: d == "c")
    progress = t.replicas["a"].replica_progress()
    assert sorted(progress) == ["a", "b", "c"]
    assert progress["a"][0] == progress["b"][0] == 2 and progress["c"][0] == 1
    assert t.replicas["b"].replica_progress() == {}


def test_producer_state_survives_restart_within_the_scan_window() -> None:
    t = Trio()
    t.elect("a")
    first = t.propose("a", b"p9-0", producer_id=9, seq=0)
    t.deliver()
    t.heartbeat("a")
    for n in NAMES:
        t.restart(n, keep_unsynced=True)
    t.elect("b")
    retry = t.propose("b", b"p9-0", producer_id=9, seq=0)
    assert t.outcomes[retry].duplicate and t.outcomes[retry].base_offset == t.outcomes[first].base_offset


# ------------------------------------------------------------------ replica-set changes and hand-off

QUAD = ("a", "b", "c", "d")


def _settle(t: Trio, leader: str, rounds: int = 6, drop=lambda s, d, m: False) -> None:
    for _ in range(rounds):
        t.tick(leader, CFG.heartbeat_interval_ms)
        t.deliver(drop)


def _target(t: Trio, voters: tuple[str, ...]) -> None:
    for n in t.names:
        if n in t.replicas:
            t.replicas[n].set_target(voters)


def _configs_in_log(t: Trio, n: str) -> list[tuple[str, ...]]:
    return [e.config for e in t.replicas[n].entries(0, 10_000, 1 << 30) if e.config is not None]


def test_config_entry_encoding_and_bad_config_from_a_peer() -> None:
    e = Entry(5, 1, 2, NO_PRODUCER, NO_PRODUCER, encode_config(["c", "a", "b", "a"]))
    assert e.config == ("a", "b", "c") and not e.is_marker
    assert Entry(5, 1, 2, NO_PRODUCER, NO_PRODUCER, MARKER_PAYLOAD).config is None
    assert Entry(5, 1, 2, 7, 0, encode_config(["a"])).config is None  # a producer's batch never is one
    with pytest.raises(ProtocolError):
        Entry.from_wire([5, 1, 2, -1, -1, CONFIG_PREFIX + b"\xff"])
    with pytest.raises(ProtocolError):
        Entry.from_wire([5, 1, 2, -1, -1, CONFIG_PREFIX + cbor2.dumps(["b", "a"])])  # not sorted


def test_learner_catches_up_then_is_promoted() -> None:
    t = Trio(names=QUAD, initial=NAMES)  # d holds a replica but is in no configuration yet
    d = t.replicas["d"]
    assert d.voters == NAMES and "d" not in d.voters
    t.elect("a")
    for i in range(6):
        t.propose("a", f"m{i}".encode())
    t.deliver()
    _settle(t, "a")
    # d never stands, however long it waits: it is a learner.
    t.tick("d", 10 * CFG.election_timeout_ms)
    assert d.role == FOLLOWER and not any(isinstance(m, RequestVote) for _s, _d, m in t.queue)
    t.queue.clear()
    _target(t, QUAD)
    a = t.replicas["a"]
    # While d cannot hear us, it stays a learner: no configuration entry is written.
    _settle(t, "a", drop=lambda s, dst, m: dst == "d")
    assert a.learners == ("d",) and a.voters == NAMES and "d" in a.peers
    assert _configs_in_log(t, "a") == [NAMES]  # restated in a's epoch: d must hold it first
    _settle(t, "a")
    assert a.voters == QUAD and a.learners == ()
    for n in QUAD:
        assert t.replicas[n].voters == QUAD
        assert t.log(n) == t.log("a")
        assert t.replicas[n].high_watermark == a.log_end
    assert _configs_in_log(t, "a") == [NAMES, QUAD]
    # Four voters: a commit now needs three of them.
    pid = t.propose("a", b"x")
    t.deliver(drop=lambda s, dst, m: dst in ("c", "d"))
    _settle(t, "a", rounds=2, drop=lambda s, dst, m: dst in ("c", "d"))
    assert pid not in t.outcomes and a.high_watermark == a.log_end - 1
    _settle(t, "a")
    assert t.outcomes[pid].status == COMMITTED


def test_promotion_waits_until_the_learner_is_within_catch_up_records_max() -> None:
    t = Trio(names=QUAD, initial=NAMES)
    t.elect("a")
    _target(t, QUAD)
    a = t.replicas["a"]
    a._match["d"] = 0  # noqa: SLF001 -- d has acknowledged nothing
    t.drain("a")
    cfg = a.config
    for _ in range(cfg.catch_up_records_max // CFG.pending_proposals_max + 2):
        for _ in range(CFG.pending_proposals_max):
            a.propose(1, NO_PRODUCER, NO_PRODUCER, b"y")
        t.drain("a")
        t.deliver(drop=lambda s, dst, m: dst == "d")
    assert a.log_end > cfg.catch_up_records_max and a.voters == NAMES


def test_removing_a_follower() -> None:
    t = Trio(names=QUAD)
    t.elect("a")
    t.propose("a", b"x")
    t.deliver()
    _settle(t, "a")
    _target(t, ("a", "b", "d"))
    _settle(t, "a")
    a, c = t.replicas["a"], t.replicas["c"]
    assert a.voters == ("a", "b", "d") and _configs_in_log(t, "a") == [("a", "b", "d")]
    assert c.voters == ("a", "b", "d") and c.high_watermark == a.log_end
    assert c.removed and not any(t.replicas[n].removed for n in ("a", "b", "d"))
    del t.replicas["c"]  # the shell deletes it
    pid = t.propose("a", b"after")
    t.deliver()
    _settle(t, "a")
    assert t.outcomes[pid].status == COMMITTED


def test_removing_the_leader_itself_hands_over_and_steps_down() -> None:
    t = Trio(names=QUAD)
    t.elect("a")
    _settle(t, "a")
    _target(t, ("b", "c", "d"))
    a = t.replicas["a"]
    # The leader's removal: it keeps leading until that configuration commits, counting a
    # majority of the new configuration, which does not include it.
    a.maybe_change_config()
    assert a.voters == ("b", "c", "d") and a.role == LEADER and not a.removed
    t.drain("a")
    t.deliver(drop=lambda s, dst, m: dst == "b")  # only c and d hold it: two of the new three
    assert a.role == FOLLOWER and a.removed
    # It told the most caught-up voter to stand: no election timeout needed.
    leaders = [n for n in ("b", "c", "d") if t.replicas[n].role == LEADER]
    assert leaders == ["c"]
    del t.replicas["a"]
    pid = t.propose("c", b"new")
    _settle(t, "c")
    assert t.outcomes[pid].status == COMMITTED and t.replicas["b"].voters == ("b", "c", "d")


def test_uncommitted_config_is_reverted_by_truncation() -> None:
    t = Trio(names=QUAD, initial=NAMES)
    t.elect("a")
    _target(t, QUAD)
    _settle(t, "a", rounds=2, drop=lambda s, dst, m: s == "a" and dst in ("b", "c") and isinstance(m, Append)
            and any("d" in (Entry.from_wire(x).config or ()) for x in m.entries))
    a, d = t.replicas["a"], t.replicas["d"]
    assert a.voters == QUAD and d.voters == QUAD and "d" in d.voters
    assert t.replicas["b"].voters == NAMES  # b and c never got it: it is not committed
    # The move is cancelled, and b takes over (votes of b and c: a majority of the old
    # configuration, which is b's).
    _target(t, NAMES)
    t.queue.clear()
    t.tick("b", 2 * CFG.election_timeout_ms)
    t.deliver(drop=lambda s, dst, m: "a" in (s, dst) or "d" in (s, dst))
    assert t.replicas["b"].role == LEADER
    _settle(t, "b")
    # b does not know d. d, still a voter of the cut configuration, stands: b hears of it and
    # sends to it from then on (in a later epoch than d's), so d learns what happened.
    t.tick("d", 2 * CFG.election_timeout_ms)
    t.deliver()
    _settle(t, "b")
    assert t.replicas["b"].role == LEADER
    for n in QUAD:
        assert t.replicas[n].voters == NAMES, n
        assert _configs_in_log(t, n) == [NAMES]  # the restatement (committed) stays
    assert d.role == FOLLOWER and d.node_id not in d.voters and d.removed
    assert t.replicas["a"].hard_state().configs == ((-1, NAMES), (1, NAMES))
    truncations = [rd.truncate_from for rd in t.readies["a"] if rd.truncate_from is not None]
    assert truncations == [2]  # a cut its own uncommitted configuration entry


def test_restart_restores_the_configuration_from_hard_state() -> None:
    t = Trio(names=QUAD, initial=NAMES)
    t.elect("a")
    _target(t, QUAD)
    _settle(t, "a")
    assert t.replicas["d"].voters == QUAD
    for n in QUAD:
        t.restart(n)  # constructed with NAMES again, as the shell does: the log knows better
        assert t.replicas[n].voters == QUAD
    t.elect("d")  # d may stand now that it is a voter
    assert t.replicas["d"].epoch == 2


def test_a_replica_created_without_a_configuration_is_a_learner_across_restarts() -> None:
    """A node added by a reassignment (perhaps re-added, its old data deleted) starts knowing no
    configuration: it must never stand nor vote on the strength of one it once belonged to."""
    t = Trio(names=QUAD, initial=NAMES)
    t.initial["d"] = ()
    t.replicas["d"] = t._boot("d")  # noqa: SLF001
    t.elect("a")
    _settle(t, "a", rounds=2)  # the leader does not send to d (not in its target yet)
    d = t.replicas["d"]
    assert d.voters == () and d.log_end == 0
    d.step(RequestVote(9, "c", 0, 0))
    rd = d.ready()
    d.advance()
    assert rd.messages == () and d.epoch == 0  # no vote, not even the epoch
    t.restart("d")
    assert t.replicas["d"].voters == ()
    t.tick("d", 10 * CFG.election_timeout_ms)
    assert t.replicas["d"].role == FOLLOWER
    _target(t, QUAD)
    _settle(t, "a")
    assert t.replicas["d"].voters == QUAD and t.replicas["d"].hard_state().configs[0] == (-1, ())


def test_a_node_added_again_starts_past_its_old_epoch_and_trusts_only_a_log_that_reaches_it() -> None:
    t = Trio(names=QUAD)
    t.elect("a")
    _settle(t, "a")
    _target(t, NAMES)
    _settle(t, "a")
    old_d = t.replicas.pop("d")
    assert old_d.removed
    # The shell deletes d's data, remembering the epoch it had reached, and later adds it again.
    t.disks["d"] = SimDisk([0])
    t.initial["d"] = ()
    join = old_d.epoch + 1
    t.disks["d"].volatile[0].hard = HardState(epoch=join, join_epoch=join)
    t.replicas["d"] = t._boot("d")  # noqa: SLF001
    d = t.replicas["d"]
    # A leader d had left behind cannot use it: its epoch is refused.
    d.step(Append(old_d.epoch, "a", 0, 0, 0, 3, [[0, 1, 1, -1, -1, b""]]))
    rd = d.ready()
    d.advance()
    assert [o.message for o in rd.messages] == [AppendAck(join, "d", 0)] and d.log_end == 0
    # The current leader hears of it, stands again past d's epoch, and brings it in.
    t.queue.append(("d", "a", rd.messages[0].message))
    t.deliver()
    _target(t, QUAD)
    _settle(t, "a")
    a = t.replicas["a"]
    assert a.role == LEADER and a.epoch > join and d.voters == QUAD
    # d's log holds the entry of its old removal (epoch 1), then the restatement of a's epoch,
    # then its addition.
    entries = [e for e in d.entries(0, 100, 1 << 20) if e.config is not None]
    assert [(e.epoch < join, e.config) for e in entries] == [(True, NAMES), (False, NAMES), (False, QUAD)]
    assert [v for _o, v in d.config_history] == [(), NAMES, NAMES, QUAD]


def test_a_log_prefix_from_before_the_join_epoch_names_no_voters() -> None:
    """A node added again must not take itself for a voter of its old membership because its
    log, copied so far, stops inside it."""
    old_membership = [Entry(0, 1, 1, NO_PRODUCER, NO_PRODUCER, MARKER_PAYLOAD),
                      Entry(1, 1, 1, NO_PRODUCER, NO_PRODUCER, encode_config(QUAD))]
    disk = _disk_with(old_membership, epoch=3)
    disk.volatile[0].hard = disk.durable[0].hard = HardState(3, None, ((1, 0),), 0, ((-1, ()), (1, QUAD)), 3)
    r = Replica("d", (), disk.volatile[0], rng=random.Random(1), config=CFG,
                hard_state=disk.volatile[0].hard, log_end=2)
    assert r.config_history[-1] == (1, QUAD) and r.voters == () and not r.may_stand()
    r.step(RequestVote(4, "c", 1, 2))
    rd = r.ready()
    r.advance()
    assert rd.messages == () and r.epoch == 3


def test_timeout_now_hands_leadership_over_without_waiting_for_a_timeout() -> None:
    t = Trio()
    t.elect("a")
    t.propose("a", b"x")
    t.deliver()
    _settle(t, "a")
    a = t.replicas["a"]
    a.transfer_leadership("c")
    t.drain("a")
    assert a.transferring == "c"
    sent = [m for _s, dst, m in t.queue if isinstance(m, TimeoutNow)]
    assert sent == [TimeoutNow(1, "a")]
    t.deliver()
    assert t.replicas["c"].role == LEADER and t.replicas["c"].epoch == 2
    assert a.role == FOLLOWER and a.leader in (None, "c")
    assert a.transferring is None


def test_hand_off_waits_for_the_chosen_voter_and_refuses_proposals_meanwhile() -> None:
    t = Trio()
    t.elect("a")
    _settle(t, "a")
    lag = lambda s, dst, m: dst == "c"  # noqa: E731
    t.propose("a", b"x")
    t.deliver(lag)
    a = t.replicas["a"]
    a.transfer_leadership("c")
    pid = t.propose("a", b"refused")
    assert (t.outcomes[pid].status, t.outcomes[pid].leader_hint) == (NOT_LEADER, None)
    assert not any(isinstance(m, TimeoutNow) for _s, _d, m in t.queue)  # c lacks x: not yet
    t.deliver(lag)
    # Bounded: after an election timeout the leader serves again.
    t.tick("a", CFG.election_timeout_ms // 2)
    t.deliver(lag)
    t.tick("a", CFG.election_timeout_ms // 2 + 1)
    t.deliver(lag)
    assert a.role == LEADER and a.transferring is None
    pid = t.propose("a", b"served")
    t.deliver()
    _settle(t, "a")
    assert t.outcomes[pid].status == COMMITTED


def test_a_draining_replica_never_stands_and_a_draining_leader_hands_over() -> None:
    t = Trio()
    t.elect("a")
    _settle(t, "a")
    c = t.replicas["c"]
    c.set_draining(True)
    t.queue.clear()
    t.tick("c", 10 * CFG.election_timeout_ms)
    assert c.role == FOLLOWER and c.epoch == 1
    assert not any(isinstance(m, RequestVote) for _s, _d, m in t.queue)
    t.queue.clear()
    a = t.replicas["a"]
    a.set_draining(True)
    t.drain("a")
    assert a.transferring == "b"  # the most caught-up voter that is not draining? both are: by name
    t.deliver()
    assert t.replicas["b"].role == LEADER and a.role == FOLLOWER
    t.tick("a", 10 * CFG.election_timeout_ms)
    assert a.role == FOLLOWER


def test_a_removed_node_that_missed_its_removal_cannot_depose_the_leader() -> None:
    t = Trio(names=QUAD)
    t.elect("a")
    _settle(t, "a")
    _target(t, ("a", "b", "c"))
    _settle(t, "a", drop=lambda s, dst, m: "d" in (s, dst))  # d misses its removal
    a = t.replicas["a"]
    assert a.voters == NAMES and t.replicas["d"].voters == QUAD and "d" in a.peers
    t.tick("d", 2 * CFG.election_timeout_ms)  # d stands in epoch 2, in its old configuration
    t.deliver(drop=lambda s, dst, m: dst == "d")
    # b and c ignore it (they hear their leader); a stands again at once, in a later epoch
    # than d's, so that d can hear it.
    assert a.role == LEADER and a.epoch == 3 and t.replicas["d"].epoch == 2
    assert "d" in a.peers and not t.replicas["d"].removed
    t.tick("d", 2 * CFG.election_timeout_ms)
    _settle(t, "a")
    d = t.replicas["d"]
    assert d.voters == NAMES and d.removed and (d.epoch, d.leader) == (a.epoch, "a")
    assert a.role == LEADER


def test_a_drain_that_cannot_finish_alternates_serving_and_trying() -> None:
    t = Trio()
    t.elect("a")
    _settle(t, "a")
    a = t.replicas["a"]
    t.propose("a", b"x")
    t.deliver(drop=lambda s, dst, m: dst == "b")  # b lags behind; c is caught up
    t.replicas["c"].set_draining(True)            # and c will not take it
    a.set_draining(True)
    t.drain("a")
    assert a.transferring == "c"
    t.deliver(drop=lambda s, dst, m: dst == "b")
    assert a.role == LEADER  # c ignored the TimeoutNow: it is draining
    refused = t.propose("a", b"refused")
    assert t.outcomes[refused].status == NOT_LEADER
    lag = lambda s, dst, m: dst == "b"  # noqa: E731
    _settle(t, "a", rounds=CFG.election_timeout_ms // CFG.heartbeat_interval_ms, drop=lag)
    assert a.transferring is None and a.role == LEADER
    served = t.propose("a", b"served")  # between attempts it serves
    t.deliver(lag)
    assert t.outcomes[served].status == COMMITTED
    _settle(t, "a", rounds=CFG.election_timeout_ms // CFG.heartbeat_interval_ms, drop=lag)
    assert a.transferring == "b"  # the next attempt picks another voter
    _settle(t, "a", rounds=2)
    assert t.replicas["b"].role == LEADER and a.role == FOLLOWER


def test_acknowledgements_from_a_nodes_earlier_membership_do_not_promote_it() -> None:
    """Simulator seed 20819: a leader still held d's acknowledged end from before d was removed
    and deleted, and made the new, empty d a voter at once on the strength of it."""
    t = Trio(names=QUAD)
    t.elect("a")
    t.propose("a", b"x")
    t.deliver()
    _settle(t, "a")
    _target(t, NAMES)
    _settle(t, "a")
    a = t.replicas.pop("d") and t.replicas["a"]
    assert a.voters == NAMES and a._match["d"] == a.log_end  # noqa: SLF001 -- d's old acknowledgement
    # d is added again, empty (here even without a join epoch: same epoch as the leader).
    t.disks["d"] = SimDisk([0])
    t.initial["d"] = ()
    t.replicas["d"] = t._boot("d")  # noqa: SLF001
    _target(t, QUAD)
    for _ in range(3):
        a.maybe_change_config()
        t.drain("a")
        t.deliver(drop=lambda s, dst, m: "d" in (s, dst))
        _settle(t, "a", rounds=1, drop=lambda s, dst, m: "d" in (s, dst))
    assert a.voters == NAMES and a.learners == ("d",)
    assert _configs_in_log(t, "a")[-1] == NAMES  # the restatement d must hold first
    _settle(t, "a")
    assert a.voters == QUAD and t.replicas["d"].voters == QUAD and t.log("d") == t.log("a")


# ------------------------------------------------------------------ clocks, log start, disk (issue 12)

DAY_MS = 86_400_000
WALL0 = 1_700_000_000_000


def _clock_round(t: Trio, leader: str, skew: dict[str, int], rounds: int = 3) -> None:
    """Heartbeat rounds in which every replica is told its (skewed) wall clock with the time
    (monotonic clocks have origins of their own; the true wall time is the leader's `now`)."""
    for _ in range(rounds):
        true_ms = t.now[leader] + CFG.heartbeat_interval_ms
        for n in t.names:
            t.now[n] += CFG.heartbeat_interval_ms
            t.replicas[n].tick(t.now[n], WALL0 + true_ms + skew.get(n, 0))
            t.drain(n)
        t.deliver()
        assert t.replicas[leader].role == LEADER


@pytest.mark.parametrize("skewed", ["a", "b"])
@pytest.mark.parametrize("skew_ms", [DAY_MS, -DAY_MS])
def test_one_node_a_day_off_decides_neither_the_replica_sets_clock_nor_append_times(skewed, skew_ms) -> None:
    t = Trio()
    t.elect("a")
    a = t.replicas["a"]
    a.tick(t.now["a"], WALL0 + t.now["a"] + (skew_ms if skewed == "a" else 0))
    assert a.cluster_wall_ms() is None   # no follower's clock heard yet: no time to stamp with
    assert a.append_time_ms() is None
    _clock_round(t, "a", {skewed: skew_ms})
    true_now = WALL0 + t.now["a"]
    for late in (False, True):
        assert abs(a.cluster_wall_ms(late=late) - true_now) <= 2 * CFG.heartbeat_interval_ms
    stamp = a.append_time_ms()
    assert abs(stamp - true_now) <= 2 * CFG.heartbeat_interval_ms


def test_with_two_clocks_known_that_disagree_there_is_no_time_and_with_two_that_agree_there_is() -> None:
    t = Trio()
    t.elect("a")
    _clock_round(t, "a", {"b": DAY_MS}, rounds=1)
    a = t.replicas["a"]
    a._wall_offsets.pop("c", None)   # c told no clock (say, an older node): only a's and b's are known
    assert a.cluster_wall_ms() is None and a.append_time_ms() is None   # which of the two is right?
    _clock_round(t, "a", {"b": CFG.clock_agreement_ms // 2}, rounds=WALL_OFFSET_KEPT_TIMEOUTS * 6)
    a._wall_offsets.pop("c", None)
    early, late = a.cluster_wall_ms(), a.cluster_wall_ms(late=True)
    assert early is not None and early < late <= early + CFG.clock_agreement_ms


def test_append_times_never_go_back_and_run_ahead_by_at_most_the_bound() -> None:
    t = Trio()
    t.elect("a")
    _clock_round(t, "a", {})
    a = t.replicas["a"]
    first = a.append_time_ms()
    # Every clock jumps an hour ahead at once (a majority agrees): stamps catch up by at most the bound.
    _clock_round(t, "a", {n: 3_600_000 for n in t.names}, rounds=2)
    second = a.append_time_ms()
    elapsed = 2 * CFG.heartbeat_interval_ms
    assert first < second <= first + elapsed + CFG.append_time_ahead_ms_max
    # ... and back: a stamp never goes back.
    _clock_round(t, "a", {n: -3_600_000 for n in t.names}, rounds=1)
    assert a.append_time_ms() >= second


def test_a_follower_learns_the_leaders_log_start_and_a_log_start_past_the_high_watermark_is_refused() -> None:
    t = Trio()
    t.elect("a")
    for i in range(3):
        t.propose("a", b"x%d" % i)
        t.deliver()
    t.heartbeat("a")
    a = t.replicas["a"]
    start = a.entries(0, 10, 1 << 20)[2].base_offset
    a.on_log_start(start)
    t.heartbeat("a")
    assert t.replicas["b"].leader_log_start == start == t.replicas["c"].leader_log_start
    bad = Append(a.epoch, "a", a.log_end, a.last_epoch, a.high_watermark, a.log_end, [], a.high_watermark + 1)
    with pytest.raises(ProtocolError, match="past its high watermark"):
        t.replicas["b"].step(bad)


def test_a_leader_short_of_disk_hands_off_to_a_voter_with_room() -> None:
    t = Trio()
    t.elect("a")
    t.propose("a", b"x")
    t.deliver()
    t.replicas["b"].set_disk_low(True)   # b is short too: it says so in its acks
    t.drain("b")
    t.heartbeat("a")
    t.replicas["a"].set_disk_low(True)
    t.drain("a")
    t.deliver()
    for _ in range(5):
        t.heartbeat("c") if t.replicas["c"].role == LEADER else t.heartbeat("a")
    assert t.replicas["c"].role == LEADER, {n: r.role for n, r in t.replicas.items()}


def test_a_leader_short_of_disk_with_no_voter_with_room_keeps_leading() -> None:
    t = Trio()
    t.elect("a")
    for n in ("b", "c"):
        t.replicas[n].set_disk_low(True)
        t.drain(n)
    t.heartbeat("a")
    t.replicas["a"].set_disk_low(True)
    t.drain("a")
    for _ in range(5):
        t.heartbeat("a")
    assert t.replicas["a"].role == LEADER and t.replicas["a"].transferring is None


def test_a_strangers_vote_counts_for_nothing_and_its_request_is_ignored_while_a_leader_is_heard() -> None:
    """A candidate outside the configuration (a forged or removed sender) gets no vote and moves no
    epoch while the voter hears a leader; a stranger's Vote counts for nothing and deposes no one.
    (Without a leader its request is plain Raft: a lagging voter may not know the configuration
    that added it; see test_a_lagging_voter_votes_for_a_candidate_of_a_configuration_it_has_not_seen.)"""
    t = Trio()
    b, c = t.replicas["b"], t.replicas["c"]
    t.tick("c", 2 * CFG.election_timeout_ms)    # c stands in epoch 1 ...
    assert c.role == "candidate" and c.epoch == 1
    c.step(Vote(1, "evil", True))               # ... a stranger's grant is no vote
    c.step(Vote(1, "mallory", True))
    t.drain("c")
    assert c.role == "candidate"
    c.step(Vote(9, "evil", False))              # nor does a stranger's newer epoch depose it
    t.drain("c")
    assert c.role == "candidate" and c.epoch == 1
    t.deliver()                                 # the real voters elect c
    assert c.role == LEADER and {t.replicas[n].epoch for n in NAMES} == {1}
    t.heartbeat("c")
    b.step(RequestVote(7, "evil", 7, 10**9))    # b hears its leader: the stranger is ignored
    rd = b.ready()
    b.advance()
    assert rd.messages == () and rd.hard_state is None and b.epoch == 1 and b.voted_for == "c"


def test_a_lagging_voter_votes_for_a_candidate_of_a_configuration_it_has_not_seen() -> None:
    """Seed 170's shape: b's log lags and its configuration does not name the candidate; with no
    leader heard it answers as Raft does, or the partition could never elect again."""
    t = Trio()
    b = t.replicas["b"]
    assert b.leader is None and b.epoch == 0
    b.step(RequestVote(3, "d", 2, 10))
    rd = b.ready()
    b.advance()
    assert b.epoch == 3 and b.voted_for == "d"
    assert [m.message for m in rd.messages] == [Vote(3, "b", True)]

# --- recovering replicas (issue 12, finding 5): a replica that lost its disk must not vote as if it had not


def _wipe(t: Trio, n: str, recovering: bool = True) -> Replica:
    """n's disk is lost: it restarts empty, recovering unless the rule is switched off."""
    t.disks[n] = SimDisk([0])
    t.disks[n].volatile[0].hard = HardState(recovering=recovering)
    t.queue = [m for m in t.queue if m[1] != n]
    t.replicas[n] = t._boot(n)  # noqa: SLF001
    t.drain(n)
    return t.replicas[n]


@pytest.mark.parametrize("rule", [True, False])
def test_a_wiped_voter_neither_votes_nor_acknowledges_before_it_has_polled_and_caught_up(rule: bool) -> None:
    """The issue's scenario: a commits m with b's acknowledgement while c lags; b loses its disk;
    with a paused, c stands. A b that voted at once would elect c and lose m."""
    t = Trio()
    t.elect("a")
    t.deliver()
    t.propose("a", b"m")
    t.deliver(drop=lambda s, d, m: d == "c")
    assert t.replicas["a"].high_watermark == 2 and t.replicas["c"].log_end < 2
    b = _wipe(t, "b", recovering=rule)
    assert b.recovering is rule and b.hard_state().recovering is rule
    t.tick("c", 4 * CFG.election_timeout_ms)     # a is paused: c hears nobody and stands
    t.deliver(drop=lambda s, d, m: "a" in (s, d))
    if not rule:
        assert t.replicas["c"].role == LEADER, "teeth: without the rule the wiped b elects c, which lacks m"
        return
    assert t.replicas["c"].role == CANDIDATE and t.replicas["b"].epoch == 0
    # b's polls went to a and c; c's answer alone is not enough (RF3: two others).
    assert b.recovering and b._polled is None  # noqa: SLF001
    # a (paused) cannot use b either: b takes no Append before its poll.
    b.step(Append(1, "a", 0, 0, 2, 2, []))
    rd = b.ready()
    b.advance()
    assert rd.messages == () and b.log_end == 0
    # a resumes: b polls again, learns the largest epoch and catches up from a leader of it.
    for _ in range(60):
        for n in NAMES:
            t.tick(n, CFG.heartbeat_interval_ms)
        t.deliver()
    leader = next(n for n in NAMES if t.replicas[n].role == LEADER)
    assert leader != "b" and [x[3] for x in t.log(leader)].count(b"m") == 1
    assert not b.recovering and b.epoch == t.replicas[leader].epoch and b.voted_for is not None
    assert t.log("b")[:2] == t.log(leader)[:2]
    assert t.disks["b"].durable[0].hard.recovering is False


def test_a_recovering_replica_stays_recovering_across_a_restart_and_answers_polls() -> None:
    t = Trio()
    t.elect("a")
    t.deliver()
    b = _wipe(t, "b")
    assert t.disks["b"].durable[0].hard.recovering, "recovering is durable before the polls go out"
    t.queue = [m for m in t.queue if m[0] != "b"]  # its polls are lost
    t.restart("b")
    b = t.replicas["b"]
    assert b.recovering
    t.drain("b")
    assert sorted((d, type(m).__name__) for _s, d, m in t.queue if _s == "b") == [
        ("a", "RecoveryPoll"), ("c", "RecoveryPoll")]
    # A poll is answered by anyone, recovering or not, with its epoch and high watermark.
    from zq.core.repl_types import RecoveryPoll, RecoveryState
    b.step(RecoveryPoll(0, "c"))
    rd = b.ready()
    b.advance()
    assert [o.message for o in rd.messages] == [RecoveryState(0, "b", 0, 0, 0)]
    t.replicas["a"].step(RecoveryPoll(0, "b"))
    rd = t.replicas["a"].ready()
    t.replicas["a"].advance()
    a = t.replicas["a"]
    assert [o.message for o in rd.messages] == [RecoveryState(1, "a", a.high_watermark, a.log_end, a.last_epoch)]


def test_a_new_cluster_of_recovering_replicas_finds_nobody_ever_elected_and_elects() -> None:
    t = Trio(disks={n: SimDisk([0]) for n in NAMES})
    for n in NAMES:
        _wipe(t, n)
    t.deliver()
    for n in NAMES:  # polls sent before a peer was up are lost: they go again after a timeout
        t.tick(n, 2 * CFG.election_timeout_ms)
    t.deliver()
    assert not any(t.replicas[n].recovering for n in NAMES)
    t.elect("b")
    t.propose("b", b"x")
    t.deliver()
    t.heartbeat("b")
    assert t.replicas["c"].high_watermark == t.replicas["b"].log_end and t.log("c")[-1][3] == b"x"


def test_a_recovering_replica_does_not_stand_even_when_told_to() -> None:
    t = Trio()
    t.elect("a")
    t.deliver()
    b = _wipe(t, "b")
    b.step(TimeoutNow(1, "a"))
    t.tick("b", 10 * CFG.election_timeout_ms)
    assert b.role == FOLLOWER and b.recovering


def test_a_new_leader_knows_its_voters_clocks_from_their_votes_and_stamps_at_once() -> None:
    """Votes carry the voter's wall clock: a leader just elected stamps batches at once, instead
    of refusing writes (LeaderNotAvailable) until a round of acks has told it the clocks."""
    t = Trio()
    for n in t.names:
        t.replicas[n].tick(t.now[n], WALL0 + t.now[n])
    t.tick("a", 2 * CFG.election_timeout_ms)
    a = t.replicas["a"]
    a.tick(t.now["a"], WALL0 + t.now["a"])
    t.deliver(drop=lambda s, d, m: not isinstance(m, (RequestVote, Vote)))   # votes only, no acks yet
    assert a.role == LEADER
    stamp = a.append_time_ms()
    assert stamp is not None and abs(stamp - (WALL0 + t.now["a"])) <= CFG.heartbeat_interval_ms


def _recovering(n: str, voters: tuple[str, ...]) -> Replica:
    """n, its disk wiped, opens recovering with `voters` (the set the partition was created with)."""
    disk = SimDisk([0])
    disk.volatile[0].hard = HardState(recovering=True)
    r = Replica(n, voters, disk.volatile[0], rng=random.Random(1), config=CFG, hard_state=disk.volatile[0].hard)
    r.ready()
    r.advance()
    return r


def _feed(r: Replica, msg: object) -> list[object]:
    """Step r with msg; the messages it sends in return, with the Ready's must_sync first."""
    r.step(msg)
    rd = r.ready()
    r.advance()
    return [rd.must_sync, *(o.message for o in rd.messages)]


def test_a_recovering_replica_votes_after_its_poll_for_a_candidate_as_up_to_date_as_a_later_answer() -> None:
    """Seed 3371's shape: c (voters a, b, c; target b, d, e: c is leaving) lost its disk and polled
    in epoch 2; d and e know no configuration; the voters a, b moved on to epoch 50 with log
    (7, 5). b needs c's vote: a recovering replica that never votes left the partition leaderless."""
    from zq.core.repl_types import RecoveryPoll, RecoveryState
    c = _recovering("c", ("a", "b", "c"))
    c.set_target(["b", "d", "e"])
    c.ready()
    c.advance()
    for sender, state in (("a", (2, 1, 3, 2)), ("b", (2, 1, 3, 2)), ("d", (2, 0, 0, 0))):
        _feed(c, RecoveryState(state[0], sender, *state[1:]))
    assert c._polled == (2, 1) and c.recovering and c.epoch == 2  # noqa: SLF001
    # No vote in the epoch it took, and none on answers older than the poll: it asks again.
    assert _feed(c, RequestVote(2, "b", 7, 5)) == [False]
    c.step(RequestVote(50, "b", 7, 5))
    rd = c.ready()
    c.advance()
    assert c.epoch == 2 and [(o.to, o.message) for o in rd.messages] == [
        (n, RecoveryPoll(2, "c")) for n in ("a", "b", "d", "e")]
    _feed(c, RecoveryState(2, "a", 4, 5, 2))   # an answer from the poll's epoch does not count
    assert not any(isinstance(m, Vote) for m in _feed(c, RequestVote(50, "b", 7, 5)))
    for sender in ("a", "b"):
        _feed(c, RecoveryState(50, sender, 4, 5, 7))
    # A candidate less up to date than the best answer is refused (its epoch is taken, as Raft does).
    assert _feed(c, RequestVote(51, "a", 7, 4))[1:] == [Vote(51, "c", False)]
    assert _feed(c, RequestVote(51, "a", 6, 9))[1:] == [Vote(51, "c", False)]
    # One at least as up to date gets the vote, durable before the reply; one vote per epoch.
    assert _feed(c, RequestVote(51, "b", 7, 5)) == [True, Vote(51, "c", True)]
    assert c.voted_for == "b" and c.hard_state().voted_for == "b" and c.recovering and not c.may_stand()
    assert _feed(c, RequestVote(51, "a", 8, 9))[1:] == [Vote(51, "c", False)]
    assert _feed(c, RequestVote(51, "b", 7, 5))[1:] == [Vote(51, "c", True)]  # a duplicate request


def test_a_recovering_replica_does_not_vote_on_answers_given_before_a_peer_acknowledged() -> None:
    """RF5: a (epoch 5) appends m at offset 9 and e acknowledges it; e loses its disk and polls b, c,
    d before m reaches them (they say (5, 9)); then b acknowledges m and a commits it with a, b, e.
    A vote for d (log (5, 9)) in epoch 6 on those answers would elect it without m, with c and d."""
    from zq.core.repl_types import RecoveryState
    e = _recovering("e", ("a", "b", "c", "d", "e"))
    for sender in ("b", "c", "d"):
        _feed(e, RecoveryState(5, sender, 8, 9, 5))
    assert e._polled == (5, 8)  # noqa: SLF001
    assert not any(isinstance(m, Vote) for m in _feed(e, RequestVote(6, "d", 5, 9)))
    # Answers from epoch 6 come from after their acknowledgements of epoch 5: b's log holds m.
    for sender, end in (("b", 10), ("c", 9), ("d", 9)):
        _feed(e, RecoveryState(6, sender, 8, end, 5))
    assert _feed(e, RequestVote(6, "d", 5, 9))[1:] == [Vote(6, "e", False)]
    assert _feed(e, RequestVote(6, "b", 5, 10))[1:] == [Vote(6, "e", True)]


def test_a_recovery_state_whose_last_entry_is_past_its_epoch_is_refused() -> None:
    from zq.core.repl_types import RecoveryState
    c = _recovering("c", NAMES)
    with pytest.raises(ProtocolError, match="last entry"):
        c.step(RecoveryState(2, "a", 0, 3, 3))


def test_a_replica_made_again_knowing_no_configuration_leaves_a_recovery_poll_unanswered() -> None:
    """A replica made again after a move deleted its earlier one (join epoch past 0) that no
    leader has told a configuration yet: its empty log hides that it was a member once, so it
    must not tell a recovering replica that nothing was ever committed (simulator seed 1233: a
    wiped replica ended its poll on such an answer and a stale voter's, and that voter was then
    elected without the committed entries). A new replica never a member still answers."""
    from zq.core.repl_types import RecoveryPoll

    def answers(join_epoch: int) -> list[str]:
        hs = HardState(epoch=join_epoch, join_epoch=join_epoch) if join_epoch else None
        r = Replica("d", (), SimDisk([0]).volatile[0], rng=random.Random(1), config=CFG, hard_state=hs)
        r.step(RecoveryPoll(3, "b"))
        rd = r.ready()
        r.advance()
        return [type(o.message).__name__ for o in rd.messages]

    assert answers(join_epoch=2) == []
    assert answers(join_epoch=0) == ["RecoveryState"]


def test_a_start_at_from_before_a_replicas_join_epoch_leaves_it_knowing_no_configuration() -> None:
    """A replica made again after a move (join epoch 5) that its leader starts at the leader's log
    start: the configuration StartAt gives is the one in effect there, which may be that of the
    node's earlier membership (naming it). Trusted, it let the replica stand and win in that old
    configuration with the vote of a voter whose log was empty (simulator seed 392, --nodes 5
    --steps 1000). It knows no configuration (neither stands nor votes) until its leader sends an
    entry of its join epoch or later; a StartAt whose prefix reaches the join epoch is trusted."""
    from zq.core.repl_types import RequestVote, StartAt

    def after_start_at(prev_epoch: int) -> Replica:
        hs = HardState(epoch=5, join_epoch=5)
        r = Replica("d", (), SimDisk([0]).volatile[0], rng=random.Random(1), config=CFG, hard_state=hs)
        r.step(StartAt(6, "a", 2, prev_epoch, ["b", "c", "d"]))
        r.ready()
        r.advance()
        r.on_persisted(r.log_end)
        return r

    old = after_start_at(prev_epoch=1)
    assert old.voters == ()
    old.step(RequestVote(7, "c", 1, 2))
    rd = old.ready()
    old.advance()
    assert not [o for o in rd.messages if type(o.message).__name__ == "Vote"]
    assert old.epoch == 6   # nor does it take the candidate's epoch (it would fence its leader)
    for _ in range(50):     # and it never stands
        old.tick(old.now_ms + CFG.election_timeout_ms)
    assert old.role != "candidate" and old.role != "leader"

    assert after_start_at(prev_epoch=5).voters == ("b", "c", "d")
