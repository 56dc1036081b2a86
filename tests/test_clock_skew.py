"""Time that cannot run away (issue 12, finding 6): a node whose wall clock runs a day ahead leads
a partition of a topic with time retention; nothing acknowledged vanishes, and the times it
stamps stay plausible. Real processes, because the clock offset (`ZQ_TEST_CLOCK_OFFSET_MS`, for
tests only) is read once per process."""
from __future__ import annotations

import os
import time

from tests.nodeutil import Raw, wait_until
from zq import batch as B
from zq import protocol as P
from zq.io.node import RETENTION_INTERVAL_MS, TEST_CLOCK_OFFSET_ENV
from zq.testing import LocalCluster

DAY_MS = 86_400_000
RETENTION_MS = 3_600_000     # an hour: a clock a day ahead would find every batch expired
MESSAGES = 100
PLAUSIBLE_MS = 60_000        # a stamped append time this close to the test's own clock is plausible


def _leaders(raw: Raw, topic: str) -> dict[int, tuple[str, int]]:
    md = raw.rpc(P.MetadataRequest(raw.rid(), [topic]))[0]
    parts = [t for t in md.topics if t["name"] == topic][0]["partitions"]
    return {p["partition"]: (p["leader"], p["epoch"]) for p in parts}


def _ask_leader(raws: dict, topic: str, p: int) -> Raw:
    """The Raw of the node that answers ListOffsets for p now (bounded: 100 tries, ~10 s)."""
    for _ in range(100):
        for raw in raws.values():
            if isinstance(raw.rpc(P.ListOffsets(raw.rid(), topic, p, "earliest"))[0], P.OffsetsReply):
                return raw
        time.sleep(0.1)
    raise AssertionError(f"no node led {topic}/{p} for 10 s")


def test_a_leader_a_day_ahead_deletes_nothing_young_and_stamps_plausible_times(tmp_path):
    with LocalCluster(nodes=3, data_dir=tmp_path / "c") as cluster:
        # n1 runs again with its clock a day ahead.
        cluster.env = {**os.environ, TEST_CLOCK_OFFSET_ENV: str(DAY_MS)}
        cluster.restart("n1")
        cluster.env = None
        raws = {name: Raw(cluster.address(name)) for name in cluster.names}
        try:
            created = False
            for _ in range(50):   # bounded: the metadata leader may be any node
                for raw in raws.values():
                    reply = raw.create("timed", 3, replication=3, retention_ms=RETENTION_MS)
                    created = created or isinstance(reply, P.OkReply) or getattr(reply, "code", "") == "topic_exists"
                if created:
                    break
                time.sleep(0.1)
            assert created
            # Preferred leaders are balanced: n1 leads one partition once it stands.
            wait_until(lambda: any(leader == "n1" and epoch > 0 for leader, epoch in _leaders(raws["n2"], "timed").values()),
                       15, "n1 leading a partition")
            p = next(p for p, (leader, _) in _leaders(raws["n2"], "timed").items() if leader == "n1")
            n1 = raws["n1"]
            stamps = []
            for i in range(MESSAGES):
                reply = None
                blob = B.encode_records([[int(time.time() * 1000), None, b"m%d" % i, None]])
                for _ in range(50):   # bounded retries: a new leader waits to hear its replicas' clocks
                    reply = n1.rpc(P.Produce(n1.rid(), "timed", p, 2, 1, B.crc(blob), 0, 0, 0), blob)[0]
                    if isinstance(reply, P.ProduceReply):
                        break
                    time.sleep(0.05)
                assert isinstance(reply, P.ProduceReply), reply
                stamps.append(reply.append_time_ms)
            now = int(time.time() * 1000)
            assert all(abs(s - now) < PLAUSIBLE_MS for s in stamps), (min(stamps) - now, max(stamps) - now)
            assert stamps == sorted(stamps)
            # Retention runs on n1 (it says its clock is off the median when it does), and deletes nothing.
            log = cluster.log_path("n1")
            wait_until(lambda: "off the median" in log.read_text(), 3 * RETENTION_INTERVAL_MS / 1000,
                       "retention to run on the leader a day ahead")
            # From earliest (the first leader's marker, stamped time 0, may be gone: it holds no message),
            # read from whichever node leads now: under load the leadership may have moved off n1, and
            # what n1 deleted while it led (nothing, if it is right) is gone everywhere.
            leader = _ask_leader(raws, "timed", p)
            earliest = leader.rpc(P.ListOffsets(leader.rid(), "timed", p, "earliest"))[0].offset
            reply, records = leader.fetch("timed", p, earliest, max_bytes=1 << 20)
            assert isinstance(reply, P.FetchReply), reply
            assert [r.value for r in records] == [b"m%d" % i for i in range(MESSAGES)]
            # A lookup by time finds the first batch written at or after a time just before them.
            offsets = leader.rpc(P.ListOffsets(leader.rid(), "timed", p, stamps[0] - 1))[0]
            assert offsets.offset <= records[0].offset
        finally:
            for raw in raws.values():
                raw.close()



# ------------------------------------------------------------------ the simulator's clock checks

SIM_SEEDS = 20


def _skewed_settings():
    from zq.sim import Settings
    return Settings(nodes=3, partitions=1, producers=3, steps=400, crash=False, pause=False, partition=False,
                    retention=True, retention_interval_ms_max=50, retention_ms=500, clock_skew_ms=DAY_MS,
                    skewed_node=0)


def test_the_simulator_keeps_young_entries_with_one_clock_a_day_ahead():
    from zq.sim import Sim
    results = [Sim(seed, settings=_skewed_settings()).run() for seed in range(SIM_SEEDS)]
    assert [(r.seed, r.invariant, r.detail) for r in results if not r.ok] == []
    assert sum(r.retained for r in results) > 0


def test_the_simulators_clock_checks_catch_a_leader_that_trusts_its_own_clock(monkeypatch):
    """Teeth: retention by the leader's own clock (as before issue 12) deletes young entries."""
    from zq.core.replication import Replica
    from zq.sim import Sim
    median = Replica.cluster_wall_ms

    def own_clock_for_retention(self, late=False):
        if late:
            return median(self, late)   # stamps stay right: only retention is broken
        return self.wall_ms if self.role == "leader" and self.wall_ms > 0 else None
    monkeypatch.setattr(Replica, "cluster_wall_ms", own_clock_for_retention)
    results = [Sim(seed, settings=_skewed_settings()).run() for seed in range(SIM_SEEDS)]
    assert any(r.invariant == "retention deleted an entry younger than retention_ms" for r in results)


def test_the_simulators_clock_checks_catch_a_leader_that_stamps_by_its_own_clock(monkeypatch):
    """Teeth: a leader a day behind stamping its own clock makes its batches look a day old."""
    import dataclasses

    from zq.core.replication import Replica
    from zq.sim import Sim
    monkeypatch.setattr(Replica, "cluster_wall_ms",
                        lambda self, late=False: self.wall_ms if self.role == "leader" and self.wall_ms > 0 else None)
    settings = dataclasses.replace(_skewed_settings(), clock_skew_ms=-DAY_MS)
    results = [Sim(seed, settings=settings).run() for seed in range(SIM_SEEDS)]
    assert any(r.invariant == "an append time behind the true time" for r in results)
