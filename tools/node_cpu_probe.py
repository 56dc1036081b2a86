#!/usr/bin/env python3
"""How busy one node's process is at a paced e2e load, and where a message's latency goes
(issue 11), beside `make bench`'s e2e rows.

    python tools/node_cpu_probe.py [--partitions 64] [--messages 20000] [--rounds 2]
    python tools/node_cpu_probe.py --tracked-send

One node (LocalCluster), a topic of --partitions; a producer process sends one record per
request (linger 0) at 2,000 msg/s, and this process consumes. Printed per round: produce ->
acknowledgement and produce -> consumed percentiles, and the node process's CPU (user + system,
from /proc) over the middle half of the run, as a share of one core: a node
near 100 % of a core queues, and its latency grows with whatever else the machine runs.

--tracked-send: the CPU cost of one ROUTER send of a small fetch reply, copied vs tracked
(zero-copy with a MessageTracker, which is what the node did for every fetch reply before).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TS = struct.Struct(">Q")
RATE = 2000
WINDOW_SHARE = 0.5   # of the paced run, in its middle, over which the node's CPU is sampled


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def _produce(bootstrap: str, cluster: str, topic: str, n: int, out) -> None:
    import zq
    acks: list[float] = []
    with zq.Client(bootstrap=[bootstrap], cluster=cluster) as client:
        producer = client.producer(acks="leader", linger_ms=0, max_in_flight=64)
        t0 = time.monotonic()
        for i in range(n):
            wait = t0 + i / RATE - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            sent = time.monotonic_ns()
            fut = producer.send(topic, TS.pack(sent) + b"x" * 92)
            fut.add_done_callback(lambda f, sent=sent: acks.append((time.monotonic_ns() - sent) / 1e6))
        producer.flush(30)
    out.send(acks)
    out.close()


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])   # utime + stime


def e2e_round(partitions: int, messages: int) -> None:
    import zq
    from zq.testing import LocalCluster
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(nodes=1, data_dir=Path(tmp)) as cluster:
        pid = cluster.pid("n1")
        bootstrap = cluster.bootstrap
        topic = f"probe{partitions}"
        with zq.Client(bootstrap=[bootstrap], cluster=cluster.name) as client:
            client.create_topic(topic, partitions=partitions)
            consumer = client.consumer(topic, start="latest")
            consumer.poll(timeout=0.5, max_messages=1)
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_produce, args=(bootstrap, cluster.name, topic, messages, child), daemon=True)
            proc.start()
            window: list[int] = []
            hz = os.sysconf("SC_CLK_TCK")
            window_s = messages / RATE * WINDOW_SHARE

            def sample() -> None:
                time.sleep(messages / RATE / 2 - window_s / 2 + 1.0)   # the middle of the run
                a = _cpu_ticks(pid)
                time.sleep(window_s)
                window.append(_cpu_ticks(pid) - a)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            e2e: list[float] = []
            quiet = time.monotonic()
            while len(e2e) < messages and time.monotonic() - quiet < 5:
                batch = consumer.poll(timeout=1.0, max_messages=10_000)
                now = time.monotonic_ns()
                e2e.extend((now - TS.unpack_from(m.value)[0]) / 1e6 for m in batch)
                if batch:
                    quiet = time.monotonic()
            acks = parent.recv() if parent.poll(30) else []
            proc.join(10)
            sampler.join(10)
            consumer.close()
    cpu = (f"{100.0 * window[0] / hz / window_s:.0f} % of a core, {1e6 * window[0] / hz / (window_s * RATE):.0f} us "
           "per message" if window else "not sampled (run too short)")
    print(f"partitions {partitions}: produce->ack p50 {_pct(acks, .5):.2f} p99 {_pct(acks, .99):.2f} ms; "
          f"e2e p50 {_pct(e2e, .5):.2f} p99 {_pct(e2e, .99):.2f} ms ({len(e2e)} of {messages}); node CPU {cpu}")


def tracked_send(n: int = 20_000) -> None:
    import zmq
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hello")
    identity, _ = router.recv_multipart()
    header, body = b"h" * 40, b"x" * 150
    for mode in ("copied", "tracked", "copied", "tracked"):
        t0 = time.process_time()
        for i in range(n):
            if mode == "copied":
                router.send_multipart([identity, header, body], zmq.NOBLOCK)
            else:
                tail = zmq.Frame(body, track=True, copy=False)
                router.send_multipart([identity, header], zmq.NOBLOCK | zmq.SNDMORE)
                router.send(tail, zmq.NOBLOCK, copy=False, track=True)
            if i % 100 == 99:
                while dealer.poll(0):
                    dealer.recv_multipart()
        spent = time.process_time() - t0
        while dealer.poll(50):
            dealer.recv_multipart()
        print(f"{mode}: {spent / n * 1e6:.1f} us of process CPU per send")
    dealer.close(0)
    router.close(0)
    ctx.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tracked-send", action="store_true")
    args = parser.parse_args()
    if args.tracked_send:
        tracked_send()
        return
    for _ in range(args.rounds):
        e2e_round(args.partitions, args.messages)


if __name__ == "__main__":
    main()
