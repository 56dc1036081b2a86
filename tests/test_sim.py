"""The deterministic simulator: thousands of seeds, replay of kept seeds, determinism, and proof
that the checks catch a broken core.

Sizing (measured on this 2-core machine while other work ran): a seed of 1,000 safety steps
plus its liveness phase takes about 20 ms of CPU (a default seed draws 3, 4 or 5 nodes; with
retention and the failure detector, each drawn by about 60% of seeds), so 1,400 of them take
about 28 s and the whole file about 43 s. `make sim SEEDS=N` runs longer soaks.
"""
from __future__ import annotations

import heapq
import os
import time
from pathlib import Path

import pytest

from zq.core import quorum
from zq.core.repl_types import COMMITTED, LEADER, Outcome, PreVoteReply, StartAt, Vote
from zq.core.replication import Replica
from zq.sim import Settings, Sim, replay_command
from zq.sim.__main__ import main as sim_main

SEEDS_3_NODES = 1_400   # default seeds: each draws 3, 4 or 5 nodes
SEEDS_5_NODES = 250
STEPS = 1_000
START = int(os.environ.get("ZQ_SIM_START", "0"))  # shift the window to explore new seeds
KEPT = Path(__file__).with_name("sim_seeds.txt")


def _failures(seeds: range, nodes: int, steps: int = STEPS) -> list[str]:
    out = []
    for seed in seeds:
        r = Sim(seed, nodes=nodes, steps=steps).run()
        if not r.ok:
            out.append(f"{r.invariant} at step {r.failed_step}: {r.detail}\n  {replay_command(seed, nodes, steps)}")
    return out


@pytest.mark.slow
def test_many_seeds_three_nodes() -> None:
    began = time.monotonic()
    failures = _failures(range(START, START + SEEDS_3_NODES), nodes=3)
    print(f"{SEEDS_3_NODES} seeds x {STEPS} steps, 3 to 5 nodes: {time.monotonic() - began:.1f} s")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_seeds_five_nodes() -> None:
    failures = _failures(range(START, START + SEEDS_5_NODES), nodes=5)
    assert not failures, "\n".join(failures)


def _kept_seeds() -> list[tuple[int, int, int]]:
    out = []
    for line in KEPT.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        seed, nodes, steps = int(words[0]), 3, 400
        for flag, value in zip(words[1::2], words[2::2]):
            if flag == "--nodes":
                nodes = int(value)
            elif flag == "--steps":
                steps = int(value)
            else:
                raise ValueError(f"{KEPT.name}: unknown flag {flag}")
        out.append((seed, nodes, steps))
    return out


def test_kept_seeds_still_pass() -> None:
    kept = _kept_seeds()
    assert kept, "sim_seeds.txt lists the seeds that ever failed"
    failures = []
    for seed, nodes, steps in kept:
        r = Sim(seed, nodes=nodes, steps=steps).run()
        if not r.ok:
            failures.append(f"{r.invariant}: {r.detail}\n  {replay_command(seed, nodes, steps)}")
    assert not failures, "\n".join(failures)


def test_one_seed_twice_gives_one_trace() -> None:
    first = Sim(7, steps=STEPS).run()
    again = Sim(7, steps=STEPS).run()
    other = Sim(8, steps=STEPS).run()
    assert first.ok and first.trace_hash == again.trace_hash and first.steps == again.steps
    assert first.trace_hash != other.trace_hash


def test_runs_draw_faults_and_do_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seeds are not vacuous: they crash, pause and partition nodes, elect and acknowledge,
    move partitions (to the end: replicas deleted), drain nodes and hand leadership over. (Disk
    faults are left out here, so these seeds keep their histories: their own test is below.)"""
    monkeypatch.setattr(Settings, "draw_disk", lambda self, rng: self)
    results = [Sim(seed, steps=STEPS).run() for seed in range(100)]
    assert all(r.ok for r in results)
    assert sum(r.crashes for r in results) > 50
    assert sum(r.pauses for r in results) > 20
    assert sum(r.cuts for r in results) > 50
    assert sum(r.acks for r in results) > 500
    assert sum(r.reads for r in results) > 500
    assert {r.settings.durability for r in results} == {"fsync", "replicated"}
    assert {r.settings.nodes for r in results} == {3, 4, 5}
    assert all(r.elections >= r.settings.partitions for r in results)
    assert sum(r.reassignments for r in results) > 50
    assert sum(r.reassigned for r in results) > 20
    assert sum(r.config_changes for r in results) > 50
    assert sum(r.removals for r in results) > 30
    assert sum(r.drains for r in results) > 30
    assert sum(r.transfers for r in results) > 20
    assert sum(r.handoffs for r in results) > 30
    assert sum(r.retained for r in results) > 200
    assert sum(r.start_ats for r in results) > 30
    assert sum(r.start_ats_moved for r in results) > 5   # `zq topic reassign` onto a node, with retention
    assert sum(r.settings.members for r in results) > 30
    # (28 here since the layer runs the shipped membership service, 32 before: other histories,
    # the same rate; seeds 100..299 hold 85 and 83.)
    assert sum(r.false_deaths for r in results) > 20
    assert sum(r.operator_moves for r in results) > 5
    assert sum(r.operator_false_moves for r in results) > 2


def test_a_membership_view_drives_moves_that_lose_nothing() -> None:
    """Issue 5: false deaths, rejoins with new incarnations and gossip loss never break the
    replication invariants. Seeds with the failure detector and the operator, 5 nodes."""
    results = [Sim(seed, nodes=5, steps=STEPS).run() for seed in range(START + 50_000, START + 50_060)]
    assert all(r.ok for r in results), [(r.seed, r.invariant, r.detail) for r in results if not r.ok]
    hosted = [r for r in results if r.settings.members]
    assert len(hosted) > 20
    # (3 operator false moves here since replicas ask before standing (PreVote), 5 before: other
    # histories, the same rate; seeds 50060..50199 hold 24 in 89 seeds with the detector.)
    assert sum(r.false_deaths for r in hosted) > 20 and sum(r.operator_false_moves for r in hosted) >= 3
    # (456 acks here since the layer runs the shipped membership service, 564 before: other
    # histories; seeds 50060..50199 hold 2144, 1905 before.)
    assert sum(r.acks for r in hosted) > 400 and sum(r.crashes for r in hosted) > 20


def test_checks_catch_a_leader_that_answers_below_its_log_start_from_its_reader(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before StartAt: a follower below the leader's log start got entries from the first one
    kept, which it could not append (so a reassignment never finished)."""
    original = Replica.on_fetch

    def on_fetch_without_start_at(self: Replica, m) -> None:
        kept, self.log_start = self.log_start, 0
        try:
            original(self, m)
        finally:
            self.log_start = kept

    monkeypatch.setattr(Replica, "on_fetch", on_fetch_without_start_at)
    r = _first_failure(range(100))
    assert r is not None and r.invariant in {"protocol error between honest replicas", "no convergence"}, r


def test_checks_catch_a_start_at_past_the_log_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """A leader that tells a follower to start at its log end skips entries nobody deleted."""
    original = Replica.on_fetch

    def on_fetch_starting_at_the_end(self: Replica, m) -> None:
        if self.role == LEADER and m.epoch == self.epoch and m.from_end < self.log_start:
            self._send(m.sender, StartAt(self.epoch, self.node_id, self.log_end, self.last_epoch,
                                         list(self.voters)))
            return
        original(self, m)

    monkeypatch.setattr(Replica, "on_fetch", on_fetch_starting_at_the_end)
    r = _first_failure(range(100))
    assert r is not None and r.invariant in {"log restarted above what retention deleted",
                                             "acknowledged write lost", "replica lacks committed entries"}, r


def _granting_any_log(self: Replica, m) -> None:
    """A broken vote rule: one vote per epoch, but ignoring whose log is more up to date."""
    if m.epoch > self.epoch:
        self.become_follower(m.epoch, None)
    granted = m.epoch == self.epoch and self.voted_for in (None, m.sender)
    if granted and self.voted_for != m.sender:
        self.voted_for = m.sender
        self._hard_dirty = self._must_sync = True
    self._send(m.sender, Vote(self.epoch, self.node_id, granted))


def _pre_granting_any_log(self: Replica, m) -> None:
    """The same broken rule in the PreVote round: a yes to any later epoch, whatever the log."""
    granted = m.epoch > self.epoch and self.role != LEADER and not self._hears_leader()
    self._send(m.sender, PreVoteReply(m.epoch if granted else self.epoch, self.node_id, granted))


def _break_the_vote_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Replica, "on_request_vote", _granting_any_log)
    monkeypatch.setattr(Replica, "on_pre_vote", _pre_granting_any_log)


def _first_failure(seeds, nodes: int = 3):
    for seed in seeds:
        r = Sim(seed, nodes=nodes, steps=STEPS).run()
        if not r.ok:
            return r
    return None


def _change_config_without_rules(one_voter: bool, wait_for_commit: bool):
    """A broken maybe_change_config: moves straight to the target (one_voter False), or takes
    the next one-voter step without waiting for the last one to commit (wait_for_commit False)."""

    def maybe_change_config(self: Replica) -> None:
        target = self._target
        if self.role != LEADER or target is None or self._transfer is not None or self.node_id not in self.voters:
            return
        hw = self.high_watermark
        own_start = self.history[-1][1] if self.history and self.history[-1][0] == self.epoch else hw
        if own_start >= hw or (wait_for_commit and self.config_history[-1][0] >= hw):
            return
        voters = set(self.voters)
        if not one_voter:
            if set(target) != voters and self.node_id in target:
                self._append_config(set(target))
            return
        add, remove = sorted(set(target) - voters), sorted(voters - set(target) - {self.node_id})
        if add:
            self._append_config(voters | {add[0]})
        elif remove:
            self._append_config(voters - {remove[0]})

    return maybe_change_config


@pytest.mark.parametrize("one_voter, wait_for_commit, invariant", [
    (False, True, "configuration changed by more than one voter"),
    (True, False, "configuration changed before the previous one committed"),
])
def test_checks_catch_configuration_changes_that_break_the_rules(
        monkeypatch: pytest.MonkeyPatch, one_voter: bool, wait_for_commit: bool, invariant: str) -> None:
    monkeypatch.setattr(Replica, "maybe_change_config", _change_config_without_rules(one_voter, wait_for_commit))
    r = _first_failure(range(100), nodes=5)
    assert r is not None and r.invariant == invariant, r


# Seeds (5 nodes) on which the weakening below was found by searching 2,500 seeds (2 minutes);
# replaying only those keeps this test cheap. If the simulator's event order changes, these seeds
# replay other histories: search again and replace them. (Searched again when the simulator came
# to run the shipped persist-then-send pass, zq.node.replicas; again, 2,800 seeds, when producers
# and consumers came to go through the shipped client room, zq.node.clients; and again when
# partitions came to start founded, with no election, zq.core.replication's "Founding"; and again,
# 2,121 seeds, when replicas came to ask before standing, "Pre-vote", the weakening applied to both
# rounds; and again, 3,000 seeds, when followers came to elect at once on a closed connection to
# their leader, Replica.peer_lost; and again, 6,000 seeds, when a leader came to answer what had
# committed between its pass's write and its fsync, zq.node.replicas.commit_effects_early: the only
# one. Each of these fails with the weakening and passes without it.)
FRESH_VOTE_SEEDS = (4030,)


def test_checks_catch_a_replica_knowing_no_configuration_that_votes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node removed and added again starts empty; if it voted (as Raft's servers do) before
    it knows a configuration, a node that missed its removal could be elected in an old one."""
    original = Replica.on_request_vote

    def fresh_replicas_vote_too(self: Replica, m) -> None:
        if self.config_history == ((-1, ()),):
            _raft_vote(self, m)
        else:
            original(self, m)

    original_pre = Replica.on_pre_vote

    def fresh_replicas_say_yes_too(self: Replica, m) -> None:
        if self.config_history == ((-1, ()),):
            granted = (m.epoch > self.epoch and not self._hears_leader()
                       and (m.last_epoch, m.last_end) >= (self.last_epoch, self.log_end))
            self._send(m.sender, PreVoteReply(m.epoch if granted else self.epoch, self.node_id, granted))
        else:
            original_pre(self, m)

    monkeypatch.setattr(Replica, "on_request_vote", fresh_replicas_vote_too)
    monkeypatch.setattr(Replica, "on_pre_vote", fresh_replicas_say_yes_too)
    # These seeds' histories as they were found: without retention and the failure detector
    # (drawn from streams of their own, so turning them off replays the rest unchanged).
    monkeypatch.setattr(Settings, "draw_retention", lambda self, rng: self)
    monkeypatch.setattr(Settings, "draw_members", lambda self, rng: self)
    r = _first_failure(FRESH_VOTE_SEEDS, nodes=5)
    assert r is not None, "a core whose empty replicas vote went unnoticed"
    assert r.invariant in SAFETY_INVARIANTS, r


SAFETY_INVARIANTS = {"new leader lacks committed entries", "committed entry deleted", "two different batches at one offset",
                     "acknowledged write lost", "two leaders in one epoch"}


def _raft_vote(self: Replica, m) -> None:
    """Raft's vote rule, with no regard to configurations."""
    if m.epoch > self.epoch:
        self.become_follower(m.epoch, None)
    granted = (m.epoch == self.epoch and self.voted_for in (None, m.sender)
               and (m.last_epoch, m.last_end) >= (self.last_epoch, self.log_end))
    if granted and self.voted_for != m.sender:
        self.voted_for = m.sender
        self._hard_dirty = self._must_sync = True
    self._send(m.sender, Vote(self.epoch, self.node_id, granted))


def test_checks_catch_removed_replicas_that_are_never_deleted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Replica, "removed", property(lambda self: False))
    r = _first_failure(range(50), nodes=5)
    assert r is not None and r.invariant == "no convergence" and r.phase == "liveness", r


def test_checks_catch_a_broken_vote_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    _break_the_vote_rule(monkeypatch)
    r = _first_failure(range(200))
    assert r is not None, "a core that elects stale logs went unnoticed"
    assert r.invariant in {"new leader lacks committed entries", "committed entry deleted",
                           "acknowledged write lost", "two different batches at one offset"}


# (A core that counts its writes durable the moment it makes them was caught here while the
# simulator had a node shell of its own that sent before a delayed group-commit sync. The simulator
# now runs the shipped pass (zq.node.replicas), which commits, fsynced where needed, before anything
# of the pass leaves, so that core bug cannot show; the durability rule lives in the pass, and
# tests/test_node_teeth.py breaks it there: a follower acking, or a leader counting, before the fsync.)


def test_checks_catch_commits_of_older_epoch_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Raft's figure 8: counting replicas of an older epoch's entry commits what a later
    leader may overwrite. The simulator must find it."""

    def advance_without_the_epoch_rule(self: Replica) -> None:
        if self.role != "leader":
            return
        ends = [self.durable_end if v == self.node_id else self._match.get(v, 0) for v in self.voters]
        end = quorum.committed_end(ends, len(self.voters))
        if end <= self.high_watermark:
            return
        self._set_high_watermark(end)
        while self._waiters and self._waiters[0][0] <= end:
            _end, proposal_id, base, epoch, dup = heapq.heappop(self._waiters)
            self._outcomes.append(Outcome(proposal_id, COMMITTED, base, epoch, self.node_id, dup))

    monkeypatch.setattr(Replica, "maybe_advance_high_watermark", advance_without_the_epoch_rule)
    r = _first_failure(range(1_000))
    assert r is not None, "a core that commits older epochs' entries by counting went unnoticed"


def test_cli_prints_seed_and_settings_first_and_replay_command_on_failure(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert sim_main(["--seed", "3", "--steps", "200"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("seed 3: nodes=3 ") and "loss=" in out[0]
    assert out[-1].startswith("ok seed 3:") and "trace" in out[-1]

    _break_the_vote_rule(monkeypatch)
    failing = _first_failure(range(200))
    assert failing is not None
    assert sim_main(["--seed", str(failing.seed), "--steps", str(STEPS)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL seed {failing.seed}: invariant '{failing.invariant}'" in out
    assert f"replay: python -m zq.sim --seed {failing.seed} --steps {STEPS}" in out


def test_cli_many_seeds_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim_main(["--seeds", "5", "--start", "40", "--nodes", "5", "--steps", "200"]) == 0
    out = capsys.readouterr().out
    assert "5/5 seeds, 0 failed" in out and "5 seeds in" in out


def test_hostile_peers_are_refused_or_ignored_and_nothing_breaks() -> None:
    """Issue 12: a hostile peer's out-of-range fields are refused by the bounds check the node's
    decoding runs; strangers' votes and stale Appends reach the cores, which ignore them; every
    check still holds."""
    results = [Sim(seed, steps=STEPS).run() for seed in range(START + 70_000, START + 70_040)]
    assert all(r.ok for r in results), [(r.seed, r.invariant, r.detail) for r in results if not r.ok]
    hostile = [r for r in results if r.settings.hostile]
    assert len(hostile) > 10
    assert sum(r.hostile_refused for r in hostile) > 100
    assert sum(r.hostile_sent - r.hostile_refused for r in hostile) > 50   # in range: the cores saw them
    assert sum(r.hostile_rejected for r in hostile) > 5                    # ... and refused some (ProtocolError)
    assert sum(r.acks for r in hostile) > 100


def test_checks_catch_a_node_that_skips_the_bounds_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import zq.sim.cluster as cluster
    monkeypatch.setattr(cluster.bounds, "check_message", lambda msg: None)
    r = _first_failure(range(START + 70_000, START + 70_040))
    assert r is not None, "out-of-range fields reached the cores and no check noticed"
    assert r.invariant in {"epoch past the stored width", "log restarted above what retention deleted",
                           "protocol error between honest replicas"}, r

def test_disk_faults_are_drawn_and_damaged_replicas_recover() -> None:
    """Flipped blocks, dropped WAL tails and wiped replicas and nodes happen, and every damaged
    replica opens recovering, and has recovered by the end (convergence requires it)."""
    results = [Sim(seed, steps=STEPS).run() for seed in range(100)]
    assert all(r.ok for r in results), [(r.seed, r.invariant) for r in results if not r.ok]
    assert sum(r.settings.disk for r in results) > 20
    assert sum(r.flips for r in results) > 2
    assert sum(r.tails_dropped for r in results) > 5
    assert sum(r.wipes for r in results) > 20
    assert sum(r.recoveries for r in results) >= sum(r.flips + r.wipes for r in results)


def _no_recovery(self: Replica) -> None:
    """Teeth: a replica that lost its disk is an ordinary voter at once (as before issue 12)."""
    self.recovering = False
    self._hard_dirty = True


def test_checks_catch_a_replica_that_votes_although_it_lost_its_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Replica, "_begin_recovery", _no_recovery)
    r = _first_failure(range(300))
    assert r is not None, "no seed in 300 caught a wiped replica voting at once"
    assert r.invariant in ("new leader lacks committed entries", "acknowledged write lost",
                           "two different batches at one offset", "two leaders in one epoch",
                           "acknowledged write not committed"), r.invariant
