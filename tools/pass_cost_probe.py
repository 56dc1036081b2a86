#!/usr/bin/env python3
"""What a loop pass costs per partition the node hosts (issue 11), in CPU time, with real cores.

    python tools/pass_cost_probe.py

The shipped pass (zq.node.replicas.ReplicaSet) on a simulated disk, 1, 64 and 1,000 partitions
(three-node followers, and one-node leaders): each pass's timer work done the way the node did
it before issue 11 ("old": every replica's next_timer_ms read each pass, as the node's
_tick_replicas did) and the way it does now ("new": ReplicaSet.tick_due, a heap of deadlines).
First idle passes, then one produce per pass. CPU time (time.process_time), so a shared machine
disturbs it less than a latency run; no fsync (the simulated disk).
"""
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.test_pass_cost import CONFIG, _Events, _Storage  # noqa: E402
from zq.core.replication import Replica  # noqa: E402
from zq.node.replicas import Part, ReplicaSet  # noqa: E402
from zq.sim.disk import SimDisk  # noqa: E402

def build(n, voters):
    disk = SimDisk(list(range(n)))
    rs = ReplicaSet(_Storage(disk), _Events(), defaultdict(int))
    rng = random.Random(1)
    for p in range(n):
        r = Replica("n1", voters, disk.volatile[p], rng=rng, now_ms=0, config=CONFIG)
        if voters == ["n1"]:
            r.tick(r.next_timer_ms())
        rs.parts[p] = Part(p, f"p{p}", r, sync=True); rs.dirty.add(p)
    rs.finish_pass()
    return rs

def old_tick(rs, now):
    for tp, part in rs.parts.items():
        if part.replica is not None and tp not in rs.fenced and part.replica.next_timer_ms() <= now:
            part.replica.tick(now, None); rs.dirty.add(tp)

for voters in (["n1", "n2", "n3"], ["n1"]):
    for n in (1, 64, 1000):
        for name in ("old", "new"):
            rs = build(n, voters)
            now = 50   # idle: no replica timer is due (RF1 leaders' heartbeats at 100, RF3 elections >= 1000)
            passes = 20000 if n < 1000 else 2000
            t = time.process_time()
            for _ in range(passes):
                if name == "old": old_tick(rs, now)
                else: rs.tick_due(now, None)
                rs.finish_pass()
            us = (time.process_time() - t) / passes * 1e6
            print(f"RF{len(voters)} {n:5d} idle partitions, {name}: {us:8.2f} µs CPU per pass", flush=True)

print("one produce per pass on partition i % n (RF1 leaders), old tick loop vs tick_due")
for n in (1, 64, 1000):
    for name in ("old", "new"):
        rs = build(n, ["n1"])
        passes = 5000
        t = time.process_time()
        for i in range(passes):
            now = 50
            part = rs.parts[i % n]
            part.replica.propose(1, 0, 0, b"x" * 100)
            rs.dirty.add(i % n)
            if name == "old": old_tick(rs, now)
            else: rs.tick_due(now, None)
            rs.finish_pass()
        us = (time.process_time() - t) / passes * 1e6
        print(f"RF1 {n:5d} partitions, {name}: {us:8.2f} µs CPU per message", flush=True)
