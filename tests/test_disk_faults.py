"""Real processes, damaged disks (issue 12, findings 3 and 5).

Each test starts 3 real nodes, creates a topic with replication 3, produces with `acks=quorum`,
damages one node's data dir while it is down, and restarts it: a block of an .sst flipped, the
newest WAL flipped, the data dir wiped, and a wiped node coming back while another is paused and
the leader is dead. The node must start, say in its node.log what it found, rejoin as a learner
(never voting as if it remembered), and end holding the same data as the others; nothing
acknowledged may be lost (the contract and helpers of tests/test_faults.py).

Before this issue was fixed: the .sst flip made the node spin at 100 % CPU without ever opening
its port (the start-up wait times out); the WAL flip and the wipe went unreported (the node.log
checks fail); the pause+kill+wipe lost acknowledged messages.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.test_faults import (
    CATCHUP_WAIT_S, PARTITIONS, POLL_INTERVAL_S, TOPIC, Load, all_in_sync, check_logs_agree, check_read_back,
    local_status, set_up, status_rows, wait_until,
)
from zq.io.store import set_aside

pytestmark = pytest.mark.slow

MESSAGES = 600                 # per test: a few seconds of load at the default rate
FLIP_BYTES = 16
LOG_WAIT_S = 20.0              # the restarted node reports what it found
NO_LEADER_WATCH_S = 4.0        # how long the partition must stay leaderless while the wiped node cannot poll
META = "__meta"


def flip_middle(path: Path, fraction: float = 0.5) -> None:
    size = path.stat().st_size
    at = int(size * fraction)
    with open(path, "r+b") as f:
        f.seek(at)
        data = f.read(FLIP_BYTES)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


def node_dir(cluster, name: str) -> Path:
    return cluster.data_dir / name


def log_text(cluster, name: str) -> str:
    return cluster.log_path(name).read_text(errors="replace")


def wait_log(cluster, name: str, needle: str) -> None:
    wait_until(lambda: needle in log_text(cluster, name), LOG_WAIT_S, f"{name}'s node.log saying {needle!r}")


def recovering_left(cluster, name: str) -> list[str]:
    """The replicas `name`'s node.log says are recovering and not (yet) that they recovered."""
    lines = log_text(cluster, name).splitlines()
    started = {line.split(":", 1)[0] for line in lines if "asks the others before it votes" in line}
    done = {line.split(":", 1)[0] for line in lines if ": recovered (" in line}
    return sorted(started - done)


def wait_recovered(cluster, name: str) -> None:
    """Every replica of `name` that rejoined recovering says it recovered (the leader's view of it
    is not enough: it may still count what the node acknowledged before it lost it)."""
    wait_until(lambda: recovering_left(cluster, name) == [], CATCHUP_WAIT_S,
               f"{name}'s recovering replicas to recover ({recovering_left(cluster, name)} left)")


def produce_some(admin, count: int = MESSAGES, tag: str = "m") -> Load:
    load = Load(admin, tag=tag, messages_max=count).start()
    load.wait(lambda l: len(l.sent) >= count, 30.0, "the load sent everything")
    load.wait(lambda l: len(l.acked) + len(l.failed) >= count, 30.0, "every outcome")
    return load


def follower_of_everything(cluster, status) -> str:
    """A node that leads no partition of the topic (and not __meta, if there is one), so that
    writes go on while it is down."""
    rows = status_rows(status)
    topic_leaders = {r["leader"] for (t, _), r in rows.items() if t == TOPIC}
    free = sorted((n == rows[(META, 0)]["leader"], n) for n in cluster.names if n not in topic_leaders)
    assert free, f"every node leads a partition of the topic: {topic_leaders}"
    return free[0][1]


def finish(cluster, admin, status, load: Load, topic_id: int, victim: str) -> None:
    """Everyone in sync, everything acknowledged read back, and, once the nodes are stopped (so
    that no write-ahead log is read while it is written), their logs agree byte for byte."""
    load.finish()
    rows = wait_until(lambda: all_in_sync(status, cluster.names), CATCHUP_WAIT_S, "every replica in sync at the end")
    wait_recovered(cluster, victim)
    counts = check_read_back(admin, load)
    assert counts["acked"] >= MESSAGES // 2, counts
    assert "recovered" in log_text(cluster, victim), "the damaged replicas did not say they recovered"
    for name in cluster.names:
        cluster.stop_node(name)
    check_logs_agree({n: node_dir(cluster, n) for n in cluster.names}, topic_id, PARTITIONS, rows)


@pytest.mark.zq_cluster(nodes=3)
def test_a_flipped_sst_block_on_a_follower_is_reported_and_the_follower_rejoins(zq_cluster):
    cluster = zq_cluster
    admin, status, topic_id = set_up(cluster)
    first = produce_some(admin)
    victim = follower_of_everything(cluster, status)
    cluster.stop_node(victim)          # a clean stop flushes the memtable: the data is in an .sst
    ssts = sorted(node_dir(cluster, victim).glob("*.sst"), key=lambda f: f.stat().st_size)
    assert ssts, "no .sst after a clean stop"
    flip_middle(ssts[-1], 0.4)
    cluster.restart(victim)            # before the fix: spins at 100 % CPU, never ready
    wait_log(cluster, victim, "is damaged")
    assert "rejoins as a learner" in log_text(cluster, victim)
    assert list(node_dir(cluster, victim).glob("damaged-*/*.sst")), "the damaged files were not kept aside"
    wait_until(lambda: all_in_sync(status, cluster.names), CATCHUP_WAIT_S, f"{victim} back in sync")
    finish(cluster, admin, status, first, topic_id, victim)


@pytest.mark.zq_cluster(nodes=3)
def test_a_flipped_wal_on_a_follower_drops_its_tail_which_is_reported_and_recovered(zq_cluster):
    cluster = zq_cluster
    admin, status, topic_id = set_up(cluster)
    first = produce_some(admin)
    victim = follower_of_everything(cluster, status)
    cluster.kill(victim)               # SIGKILL: no flush, the writes are in the WAL only
    wals = sorted(node_dir(cluster, victim).glob("[0-9]*.log"), key=lambda f: f.stat().st_mtime)
    assert wals and wals[-1].stat().st_size > 4096, "no WAL with data after a kill"
    flip_middle(wals[-1])
    cluster.restart(victim)
    wait_log(cluster, victim, "dropped the tail of its write-ahead log")
    assert "RocksDB recovery" in log_text(cluster, victim), "RocksDB's own lines did not reach node.log"
    assert "rejoins as a learner" in log_text(cluster, victim)
    wait_until(lambda: all_in_sync(status, cluster.names), CATCHUP_WAIT_S, f"{victim} back in sync")
    assert not (node_dir(cluster, victim) / "ZQ-WAL-TAIL-DROPPED").exists(), "the loss was never recorded"
    finish(cluster, admin, status, first, topic_id, victim)


@pytest.mark.zq_cluster(nodes=3)
def test_a_wiped_follower_rejoins_as_a_learner(zq_cluster):
    cluster = zq_cluster
    admin, status, topic_id = set_up(cluster)
    first = produce_some(admin)
    victim = follower_of_everything(cluster, status)
    cluster.stop_node(victim)
    set_aside(node_dir(cluster, victim), "by-the-test")   # as good as rm -rf of the RocksDB files
    cluster.restart(victim)
    wait_log(cluster, victim, "rejoins as a learner")
    wait_until(lambda: all_in_sync(status, cluster.names), CATCHUP_WAIT_S, f"{victim} back in sync")
    finish(cluster, admin, status, first, topic_id, victim)


@pytest.mark.zq_cluster(nodes=3)
def test_a_wiped_node_does_not_vote_while_another_is_paused_and_the_leader_dead(zq_cluster):
    """The issue's finding 5: pause one node, write on, kill the leader, wipe and restart the
    third. The wiped node must not help the paused one (which lacks the latest writes) win."""
    cluster = zq_cluster
    admin, status, topic_id = set_up(cluster)
    paused = follower_of_everything(cluster, status)  # so that writes go on while it is paused
    leader = status_rows(status)[(TOPIC, 0)]["leader"]
    wiped = next(n for n in cluster.names if n not in (paused, leader))
    load = Load(admin, messages_max=MESSAGES * 2).start()
    try:
        load.wait_more_acks(MESSAGES // 4)
        cluster.pause(paused)
        load.wait_more_acks(MESSAGES // 4)           # acknowledged by `leader` and `wiped` only
        cluster.kill(leader)
        cluster.stop_node(wiped)
        set_aside(node_dir(cluster, wiped), "by-the-test")
        cluster.restart(wiped, wait=False)
        cluster.resume(paused)
        # The wiped node cannot poll the dead leader (its __meta replica, recovering, needs both
        # others' answers, and so do the topic's), so it neither votes nor stands: no leader of
        # the topic (before the fix the paused node won with the wiped node's vote).
        deadline = time.monotonic() + NO_LEADER_WATCH_S
        while time.monotonic() < deadline:
            for name in (paused, wiped):
                led = local_status(cluster.address(name)) or []
                assert not any(r["topic"] == TOPIC for r in led), f"{name} leads without the dead leader's writes"
            time.sleep(POLL_INTERVAL_S)
        cluster.restart(leader)
        wait_until(lambda: all_in_sync(status, cluster.names), CATCHUP_WAIT_S, "every replica in sync")
        assert "rejoins as a learner" in log_text(cluster, wiped)
    except BaseException:
        load.finish(2)
        raise
    finish(cluster, admin, status, load, topic_id, wiped)
