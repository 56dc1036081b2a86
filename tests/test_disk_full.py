"""A nearly full disk hands off leadership (issue 12, finding 7): a leader below the free-disk
floor gives each partition it leads to an in-sync replica with room, writes go on through the new
leader, and the repeated log lines of a failing disk are rate-limited.

In-process nodes; the low-disk condition is the node store's free-disk reading replaced on the
leader only (and, for the log lines, its writes failing as a full disk's do)."""
from __future__ import annotations

import logging
import time

from tests.nodeutil import Raw, start_nodes, wait_until
from zq import protocol as P
from zq.errors import StorageFull
from zq.io.node import DISK_CHECK_INTERVAL_MS, LOG_REPEAT_MS
from zq.types import TopicPartition

HANDOFF_BOUND_S = 5.0   # a disk check (1 s), catching the voter up and its election (~1 s), with slack
FAILING_WRITES_S = 2.0  # how long the old leader's writes fail (many loop passes, each a failed write)


def _leader_name(raw: Raw, topic: str) -> str | None:
    md = raw.rpc(P.MetadataRequest(raw.rid(), [topic]))[0]
    parts = [t for t in md.topics if t["name"] == topic][0]["partitions"]
    return parts[0]["leader"] if parts[0]["epoch"] > 0 else None


def test_a_leader_short_of_disk_hands_its_partitions_to_a_replica_with_room(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="zq.node")
    nodes = start_nodes(tmp_path, 3)
    by_name = {n.config.name: n for n in nodes}
    raws = {n.config.name: Raw(n.address) for n in nodes}
    try:
        any_raw = raws["n1"]
        wait_until(lambda: sum(n["state"] == "alive" for n in any_raw.rpc(P.MetadataRequest(any_raw.rid(), None))[0].nodes) == 3,
                   10, "three nodes registered")
        wait_until(lambda: any(isinstance(r.create("t", 1, replication=3), P.OkReply) for r in raws.values()), 10,
                   "the topic created")
        wait_until(lambda: _leader_name(any_raw, "t") is not None, 10, "the partition led")
        old = _leader_name(any_raw, "t")
        wait_until(lambda: isinstance(raws[old].produce("t", 0, [b"before"]), P.ProduceReply), 10, "a first write")
        tp = next(tp for tp in by_name[old].node.parts if tp.topic_id != 0)
        assert isinstance(tp, TopicPartition)

        low = by_name[old].node
        low.store.disk_free_bytes = lambda: 0          # below the floor from now on (the leader only)
        began = time.monotonic()

        def moved() -> bool:
            leaders = [name for name, n in by_name.items()
                       if n.node.parts[tp].replica is not None and n.node.parts[tp].replica.role == "leader"]
            return leaders not in ([], [old])
        wait_until(moved, HANDOFF_BOUND_S, "leadership to move off the node short of disk")
        took_s = time.monotonic() - began
        assert took_s < HANDOFF_BOUND_S
        new = next(name for name, n in by_name.items() if n.node.parts[tp].replica.role == "leader")
        assert new != old
        # Writes go on through the new leader; the old one refuses them.
        reply = None
        for i in range(20):
            reply = raws[new].produce("t", 0, [b"after %d" % i])
            if isinstance(reply, P.ProduceReply):
                break
            time.sleep(0.1)
        assert isinstance(reply, P.ProduceReply), reply
        refused = raws[old].produce("t", 0, [b"to the old leader"])
        assert refused.code in ("not_leader", "storage_full"), refused

        # Then the old leader's disk fills for real: every pass's write fails. Its log says so a
        # few times, not once per pass.
        real_commit = low.store.commit

        def failing_commit(txn, sync=False):
            raise StorageFull("the disk is full (simulated); free space or add nodes; nothing was written")
        low.store.commit = failing_commit
        deadline = time.monotonic() + FAILING_WRITES_S
        produced = 0
        while time.monotonic() < deadline:          # replication keeps reaching it: a write per pass
            if isinstance(raws[new].produce("t", 0, [b"while full %d" % produced]), P.ProduceReply):
                produced += 1
        low.store.commit = real_commit
        assert produced > 0 and low.counters["storage_errors"] > 3
        failed_lines = [r for r in caplog.records if "write failed" in r.getMessage()]
        nearly_full = [r for r in caplog.records if "disk nearly full" in r.getMessage()]
        assert 1 <= len(failed_lines) <= 1 + FAILING_WRITES_S * 1000 // LOG_REPEAT_MS, len(failed_lines)
        assert len(nearly_full) == 1
        assert DISK_CHECK_INTERVAL_MS <= 1_000   # the hand-off bound above assumes a check a second
    finally:
        for r in raws.values():
            r.close()
        for n in nodes:
            n.stop()


def test_a_repeated_warning_is_logged_once_per_period_and_the_next_line_counts_the_rest(caplog, monkeypatch):
    from zq.io import node_common as N   # where the node's rate-limited log and its clock live
    clock = [1_000_000]
    monkeypatch.setattr(N, "mono_ms", lambda: clock[0])
    limited = N._LimitedLog()
    caplog.set_level(logging.WARNING, logger="zq.node")
    for i in range(500):                       # 500 failures within one period: one line
        limited.log(logging.ERROR, "write_failed", "write failed: %s", i)
        limited.log(logging.WARNING, "other", "another kind %s", i)   # kinds are counted apart
        clock[0] += 10
    clock[0] += LOG_REPEAT_MS
    limited.log(logging.ERROR, "write_failed", "write failed: %s", "again")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("write failed")]
    assert lines == ["write failed: 0", "write failed: again (and 499 more like it in 15 s)"]
    assert sum(r.getMessage().startswith("another kind") for r in caplog.records) == 1
