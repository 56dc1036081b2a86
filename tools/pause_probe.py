#!/usr/bin/env python3
"""How long writes stop when a follower is paused and comes back, or a leader is killed (issue 11,
availability).

    python tools/pause_probe.py [--rounds 6] [--pause 3] [--fault follower-pause|leader-kill]

Three nodes (LocalCluster) on 127.0.0.1, a topic of 2 partitions with replication 3, and one
idempotent acks=quorum producer at 250 msg/s. Each round SIGSTOPs a node that leads neither
partition for --pause seconds (past the election timeout), SIGCONTs it, and waits 2.5 s. Printed
per round and partition: the longest gap between acknowledged writes from the pause to 2.5 s
after the resume, and the partitions' leaders before and after (a changed leader means the
returning node deposed it). With --fault leader-kill each round SIGKILLs partition 0's leader
instead, waits 2.5 s, restarts it and waits 2.5 s more: the gap is then the election plus the
client's wait before it tries the new leader.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zq  # noqa: E402
from zq.errors import NotEnoughReplicas  # noqa: E402
from zq.testing import LocalCluster  # noqa: E402

RATE = 250
AFTER_S = 2.5
TOPIC = "pause-probe"


def leaders(client: zq.Client) -> list[str]:
    return [p["leader"] for p in sorted(client.describe_topic(TOPIC)["partitions"], key=lambda p: p["partition"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pause", type=float, default=3.0)
    parser.add_argument("--fault", choices=("follower-pause", "leader-kill"), default="follower-pause")
    parser.add_argument("--data-dir", help="keep the nodes' data and logs here (default: a temporary folder)")
    args = parser.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(nodes=3, data_dir=Path(args.data_dir or tmp)) as cluster:
        admin = cluster.client()
        deadline = time.monotonic() + 30
        while True:
            try:
                admin.create_topic(TOPIC, partitions=2, replication=3)
                break
            except NotEnoughReplicas:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)   # the nodes are still registering
        time.sleep(3)
        producer = admin.producer(acks="quorum", idempotent=True, linger_ms=5, request_timeout_ms=2_000)
        acks: list[tuple[int, float]] = []
        stop = threading.Event()

        def load() -> None:
            i, due = 0, time.monotonic()
            while not stop.is_set():
                fut = producer.send(TOPIC, b"v%d" % i, partition=i % 2)
                fut.add_done_callback(
                    lambda f: acks.append((f.result().partition, time.monotonic() - t0)) if not f.exception() else None)
                i += 1
                due += 1 / RATE
                time.sleep(max(0.0, due - time.monotonic()))

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        time.sleep(2)
        worst = 0.0
        for rnd in range(args.rounds):
            before = leaders(admin)
            if args.fault == "leader-kill":
                victim = before[0]
                paused = time.monotonic() - t0
                cluster.kill(victim)
                time.sleep(AFTER_S)
                resumed = paused
                after = leaders(admin)
                cluster.restart(victim)
                time.sleep(AFTER_S)
            else:
                victim = next((n for n in cluster.names if n not in before), None)
                if victim is None:
                    victim = next(n for n in cluster.names if n != before[0])
                paused = time.monotonic() - t0
                cluster.pause(victim)
                time.sleep(args.pause)
                cluster.resume(victim)
                resumed = time.monotonic() - t0
                time.sleep(AFTER_S)
                after = leaders(admin)
            gaps = []
            for part in (0, 1):
                times = sorted(at for p, at in acks if p == part)
                spans = [b - a for a, b in zip(times, times[1:]) if b >= paused and a <= resumed + AFTER_S]
                gaps.append(max(spans, default=float("nan")))
            worst = max([worst, *gaps])
            what = f"killed {victim}" if args.fault == "leader-kill" else f"paused {victim} {args.pause:g} s"
            print(f"round {rnd}: {what}; longest gap between acknowledged writes "
                  f"p0 {gaps[0]:.3f} s, p1 {gaps[1]:.3f} s; leaders {before} -> {after}", flush=True)
        stop.set()
        thread.join(5)
        producer.close(5)
        print(f"worst gap over {args.rounds} rounds: {worst:.3f} s")


if __name__ == "__main__":
    main()
