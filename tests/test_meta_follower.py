"""The shipped `__meta` follower (zq.node.meta) and drain decisions (zq.node.drain) under the
simulators that run them: zq/sim/meta.py (seeded loss, duplication, reordering, leader changes,
failed writes, restarts from the stored offset, new ports) and zq/sim/drain.py (real replication
cores). A few scenarios pin single rules; the seeds check the properties (see those modules)."""
from __future__ import annotations

import pytest

from zq.core.metadata import MetadataState
from zq.node import meta as M
from zq.node import status as S
from zq.sim import drain as drain_sim
from zq.sim import meta as meta_sim

META_SEEDS = 300
DRAIN_SEEDS = 50


class _Log:
    def __init__(self, end: int = 0) -> None:
        self.learner_end = end


def _batch(base: int, *commands: dict) -> M.FetchedBatch:
    records = [(base + i, c) for i, c in enumerate(commands)]
    return M.FetchedBatch(base, base + max(1, len(commands)), f"b{base}", lambda: records)


def _create(name: str, tid: int, replicas: list[str]) -> dict:
    return {"op": "create_topic", "name": name, "id": tid, "partitions": [replicas], "config": {}}


def _follower(end: int = 0, port: int = 7200) -> M.MetaFollower:
    return M.MetaFollower("f", ("127.0.0.1", port), 1, MetadataState(), _Log(end))


def test_a_duplicate_reply_is_written_and_applied_once() -> None:
    f = _follower()
    f.registered = True
    reply = [_batch(0, _create("a", 1, ["f", "x", "y"])), _batch(1)]
    assert [b.value for b in f.on_fetched(reply)] == ["b0", "b1"]
    effects = list(f.apply_learned(lambda tp: False))
    assert [type(e) for e in effects] == [M.Noted, M.OpenTopic, M.Applied] and effects[-1].applied == 2
    assert f.on_fetched(reply) == [] and list(f.apply_learned(lambda tp: False)) == []
    assert f.follow_step(False, ("v",), "v", True) == M.Fetch("v", 2)


def test_a_gap_or_a_bad_batch_ends_what_is_taken() -> None:
    f = _follower()
    assert f.on_fetched([_batch(1)]) == [] and f.log.learner_end == 0
    assert [b.value for b in f.on_fetched([_batch(0), M.BAD_BATCH, _batch(1)])] == ["b0"]
    f.write_failed(0)
    assert f.log.learner_end == 0 and f.learned == []


def test_a_restart_fetches_from_the_stored_log_end_not_the_applied_offset() -> None:
    meta = MetadataState()
    meta.apply(0, _create("a", 1, ["x", "y", "z"]))      # stored: command at 0, a control batch at 1
    f = M.MetaFollower("f", ("127.0.0.1", 7200), 2, meta, _Log(2))
    f.registered = True
    assert meta.applied == 1 and f.follow_step(False, ("v",), "v", True) == M.Fetch("v", 2)


def test_registration_follows_the_address_and_the_leader() -> None:
    f = _follower(port=7201)
    f.meta.apply(0, {"op": "register_node", "name": "f", "host": "127.0.0.1", "port": 7200})
    assert f.follow_step(False, ("v",), "v", True) == M.RegisterFirst(M.META_RETRY_MS)
    assert f.register_step(False, False, "v", True) == M.SendRegistration("v")   # restarted on another port
    assert f.register_step(False, False, None, False) == M.Wait(M.META_RETRY_MS)
    assert isinstance(f.register_step(False, True, "f", True), M.AppendRegistration)
    assert f.on_register_reply(False) == M.Wait(M.META_RETRY_MS) and not f.registered
    assert f.on_register_reply(True) == M.Registered() and f.registered
    assert f.follow_step(False, ("f",), "v", True) == M.Stop()        # it votes: no following


def test_a_voter_applies_nothing_above_its_high_watermark() -> None:
    f = _follower()
    log = [(0, _create("a", 1, ["f"])), (1, _create("b", 2, ["f"])), (2, _create("c", 3, ["f"]))]
    noted = [e.offset for e in f.apply_committed(2, lambda start, upto: log, lambda tp: False) if type(e) is M.Noted]
    assert noted == [0, 1] and f.meta.applied == 2
    assert list(f.apply_committed(2, lambda start, upto: log, lambda tp: False)) == []


def test_a_reassignment_retargets_a_held_replica_or_opens_a_moved_one() -> None:
    f = _follower()
    list(f.apply(0, _create("a", 1, ["x", "y", "z"]), lambda tp: False))
    move = {"op": "reassign_partition", "id": 1, "partition": 0, "replicas": ["f", "y", "z"]}
    assert [type(e) for e in f.apply(1, move, lambda tp: False)] == [M.Noted, M.OpenMoved]
    move = {"op": "reassign_partition", "id": 1, "partition": 0, "replicas": ["f", "x", "z"]}
    effects = list(f.apply(2, move, lambda tp: True))
    assert effects[-1] == M.Retarget(f.meta.topics["a"], 0, ("f", "x", "z"), ("x", "z"))


def test_pending_changes_answer_when_every_live_node_has_them_or_the_wait_ran_out() -> None:
    p = M.PendingChanges(limit=2)
    assert p.add(5, 100, "one") and p.add(9, 1_000, "two") and not p.add(1, 1, "three")
    assert p.due(10, [5, 6]) == (["one"], 10 + M.PENDING_CHECK_MS)
    assert p.due(1_000, [5]) == (["two"], None) and not p


def test_a_seed_of_another_cluster_is_ignored_and_voters_are_learnt_once() -> None:
    nodes = [{"name": "s", "host": "h", "port": 1}, {"name": "me", "host": "h", "port": 2},
             {"name": "u", "host": "?", "port": 0}]
    topics = [{"name": "__meta", "partitions": [{"replicas": ["s"]}]}]
    assert M.read_seed_reply("me", "zq", "other", nodes, topics, {}, False).foreign
    news = M.read_seed_reply("me", "zq", "zq", nodes, topics, {}, False)
    assert news.addresses == (("s", "h:1"),) and news.voters == ("s",)
    assert M.read_seed_reply("me", "zq", "zq", nodes, topics, {"s": "h:1"}, True) == M.SeedNews(False)


def test_status_marks_unknown_moving_and_under_replicated_partitions() -> None:
    meta = MetadataState()
    meta.apply(0, _create("a", 1, ["x", "y", "z"]))
    meta.apply(1, {"op": "reassign_partition", "id": 1, "partition": 0, "replicas": ["x", "y", "w"]})
    nodes = S.nodes_view("x", "h", 1, ["x", "y"], {"y": "h:2", "q": "h:3"}, lambda n: "alive", lambda n: 0)
    assert [(n["name"], n["state"]) for n in nodes] == [("q", "joining"), ("x", "alive"), ("y", "alive")]
    led = {"topic": "a", "partition": 0, "leader": "x", "epoch": 3, "replicas": ["x", "y", "z"], "in_sync": ["x"]}
    doc = S.status_doc("zq", "x", None, {"x": [led]}, meta, ["x"], nodes)
    rows = {r["topic"]: r for r in doc["partitions"]}
    assert rows["__meta"]["leader"] is None and rows["__meta"]["replicas"] == ["x"]
    assert rows["a"]["moving"] and rows["a"]["target"] == ["x", "y", "w"] and rows["a"]["under_replicated"]


@pytest.mark.parametrize("first", range(0, META_SEEDS, 100))
def test_the_follower_simulator_passes_its_seeds(first: int) -> None:
    bad = [(r.seed, r.invariant, r.detail) for r in map(meta_sim.run_seed, range(first, first + 100)) if not r.ok]
    assert not bad


def test_the_drain_simulator_passes_its_seeds() -> None:
    results = [drain_sim.run_seed(seed) for seed in range(DRAIN_SEEDS)]
    assert not [(r.seed, r.invariant, r.detail) for r in results if not r.ok]
    assert sum(r.drained for r in results) == DRAIN_SEEDS and sum(r.led_before for r in results) > DRAIN_SEEDS // 2
