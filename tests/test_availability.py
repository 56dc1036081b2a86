"""Availability under faults (issue 11): how long writes stop, and whether any node's loop stalls.

Three real nodes on 127.0.0.1 (`zq_cluster`), a topic with replication 3 and a steady produce load
(tests/test_faults.py's `Load`: one idempotent acks=quorum producer, 250 msg/s over two partitions,
bounded in count). Two faults, one after the other:

1. a follower is SIGSTOPped for `PAUSE_S`: a majority is still up, so every partition must go on
   acknowledging while it is paused (asserted), and
2. the leader of partition 0 is SIGKILLed, and restarted once a new leader acknowledges;
3. the leader of partition 0 is SIGSTOPped for `PAUSE_S`, under a producer of default settings
   (the load above times a request out after 2 s; the default waits 30 s). Its gap shows what a
   user's producer sees: measured, it is the whole pause, not an election (issue 11's 4.7-6.0 s
   gaps under 5 s pauses): a batch in flight to the paused leader waits for its answer, which
   comes only when the old leader wakes and refuses it, although a new leader was elected after
   1-2 s.

For each fault the longest gap between acknowledged writes of each partition is measured and
printed (a figure, never asserted: performance is not asserted by a timed test; the issue's aim
is one election timeout plus a little). What is asserted is liveness: no node's log reports a loop
pass over `LOOP_PASS_MS_MAX`, a pass during which a node served nothing of what it leads.

A pass during which the node itself was stopped (SIGSTOP) is not a stall: the monotonic clock runs
on while the process is stopped. The node notes SIGCONT and logs such a pass as "the process was
stopped during this ... loop pass", not as a slow pass. The check still allows one slow-pass line
per pause in the paused node's own log (written between the pause and `RESUME_LOG_S` after the
resume, no longer than the pause), in case a signal lands between the pass and its check; the
node logs carry no timestamps, so that line is recognised by where it is and by its length.
"""
from __future__ import annotations

import re
import time

import pytest

from tests.test_faults import (CATCHUP_WAIT_S, FAILOVER_WAIT_S, Load, set_up, status_rows, wait_until,
                               watched)

pytestmark = pytest.mark.slow

PAUSE_S = 3.0                # each pause: past the longest election timeout (2 s), so a new leader is elected
LOOP_PASS_MS_MAX = 2_000     # a longer pass on a running node is a stall (an election timeout is 1-2 s)
RESUME_LOG_S = 2.0           # the paused node logs its frozen pass within this long after SIGCONT
ACKS_BETWEEN_FAULTS = 100    # acknowledgements awaited before each fault and after recovery
SLOW_PASS = re.compile(r"a loop pass took (\d+) ms[^\n]*")


def longest_gaps(load: Load, start_s: float, end_s: float) -> dict[int, float]:
    """Per partition, the longest time between two consecutive acknowledgements, over the gaps
    that overlap [start_s, end_s] (the gap across the fault's start included)."""
    with load._changed:
        acks = list(load.acked.values())
    gaps: dict[int, float] = {}
    for p in range(load.partitions):
        times = sorted(a.at_s for a in acks if a.partition == p)
        spans = [b - a for a, b in zip(times, times[1:]) if b >= start_s and a <= end_s]
        gaps[p] = max(spans, default=float("nan"))
    return gaps


def acks_between(load: Load, partition: int, start_s: float, end_s: float) -> int:
    with load._changed:
        return sum(1 for a in load.acked.values() if a.partition == partition and start_s <= a.at_s <= end_s)


def slow_passes(text: str) -> list[tuple[int, str]]:
    return [(int(m.group(1)), m.group(0)) for m in SLOW_PASS.finditer(text)]


def pause(cluster, name: str, load: Load, frozen: list) -> tuple[float, float]:
    """SIGSTOP `name` for PAUSE_S while `load` runs; (pause, resume) times. Appends to `frozen`
    what the node logged from the pause to RESUME_LOG_S after it, with the pause's length."""
    log = cluster.log_path(name)
    log_at_pause = log.stat().st_size
    pause_s = time.monotonic()
    cluster.pause(name)
    try:
        load.wait(lambda l: time.monotonic() - pause_s >= PAUSE_S, PAUSE_S + FAILOVER_WAIT_S, f"{PAUSE_S:g} s of pause")
    finally:
        cluster.resume(name)
    resume_s = time.monotonic()
    load.wait_more_acks(ACKS_BETWEEN_FAULTS)
    time.sleep(max(0.0, resume_s + RESUME_LOG_S - time.monotonic()))
    frozen.append((name, log.read_bytes()[log_at_pause:].decode(errors="replace"), (resume_s - pause_s) * 1000))
    return pause_s, resume_s


def test_writes_go_on_and_no_loop_stalls_while_a_follower_is_paused_and_a_leader_killed_or_paused(zq_cluster):
    cluster = zq_cluster
    admin, status, _ = set_up(cluster)
    rows = status_rows(status)
    leaders = {r["leader"] for r in watched(rows)}
    # A follower of every watched partition (and of __meta if possible): writes must not stop for it.
    victim = next((n for n in cluster.names if n not in leaders), None)
    if victim is None:
        victim = next(n for n in cluster.names if n != rows[("faults", 0)]["leader"])
    figures: dict[str, dict[int, float]] = {}
    frozen: list[tuple[str, str, float]] = []
    load = Load(admin).start()
    try:
        load.wait_more_acks(ACKS_BETWEEN_FAULTS)

        # 1. A follower paused.
        pause_s, resume_s = pause(cluster, victim, load, frozen)
        for p in range(load.partitions):
            assert acks_between(load, p, pause_s + 1.0, resume_s) > 0, \
                f"partition {p} acknowledged nothing while only a follower ({victim}) was paused"
        figures["follower SIGSTOP"] = longest_gaps(load, pause_s, resume_s)
        # Back from a pause past its election timeout, it asks before it stands (PreVote): no
        # leader is deposed (without it, writes stopped for 1.5-3 s here).
        figures["follower SIGCONT, the next 2 s"] = longest_gaps(load, resume_s, resume_s + RESUME_LOG_S)

        # 2. The leader of partition 0 killed, then restarted.
        leader = wait_until(lambda: status_rows(status)[("faults", 0)]["leader"], FAILOVER_WAIT_S,
                            "a leader of partition 0")
        old_epoch = status_rows(status)[("faults", 0)]["epoch"]
        kill_s = time.monotonic()
        cluster.kill(leader)
        load.wait(lambda l: l.first_ack(0, old_epoch, kill_s), FAILOVER_WAIT_S,
                  f"an acknowledgement on partition 0 from an epoch after {old_epoch}")
        load.wait_more_acks(ACKS_BETWEEN_FAULTS)
        figures["leader SIGKILL"] = longest_gaps(load, kill_s, time.monotonic())
        cluster.restart(leader)
        wait_until(lambda: all(leader in (r["in_sync"] or []) for r in watched(status_rows(status))),
                   CATCHUP_WAIT_S, f"{leader} back in the in-sync set of every partition")
        load.wait_more_acks(ACKS_BETWEEN_FAULTS)
    finally:
        load.finish(5)

    # 3. The leader of partition 0 paused, under a producer of default settings.
    load = Load(admin, tag="d")
    load.producer.close(0)
    load.producer = admin.producer(acks="quorum", idempotent=True, linger_ms=5)
    load.start()
    try:
        load.wait_more_acks(ACKS_BETWEEN_FAULTS)
        leader = wait_until(lambda: status_rows(status)[("faults", 0)]["leader"], FAILOVER_WAIT_S,
                            "a leader of partition 0")
        pause_s, resume_s = pause(cluster, leader, load, frozen)
        figures["leader SIGSTOP, default producer"] = longest_gaps(load, pause_s, resume_s)
    finally:
        load.finish(5)

    for fault, gaps in figures.items():
        print(f"\n[figure] longest gap between acknowledged writes, {fault}: "
              + ", ".join(f"partition {p} {g:.3f} s" for p, g in sorted(gaps.items())))

    # Each paused node's frozen pass: at most one per pause, no longer than the pause, right after it.
    texts = {name: path.read_text(errors="replace") for name, path in cluster.logs.items()}
    for name, text, pause_ms in frozen:
        long = [(ms, line) for ms, line in slow_passes(text) if ms > LOOP_PASS_MS_MAX]
        assert len(long) <= 1 and all(ms <= pause_ms + 500 for ms, _ in long), \
            f"{name} stalled around its pause of {pause_ms:.0f} ms: {long}"
        texts[name] = texts[name].replace(text, "")
    stalls = [f"{name}: {line}" for name, text in sorted(texts.items())
              for ms, line in slow_passes(text) if ms > LOOP_PASS_MS_MAX]
    assert not stalls, "a node's loop stalled under the faults:\n" + "\n".join(stalls)
