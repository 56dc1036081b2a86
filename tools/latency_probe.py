#!/usr/bin/env python3
"""The node's own share of latency, beside the client library's: one node, one message per request.

    python tools/latency_probe.py [--durability fsync|replicated] [--messages 2000] [--acks leader|quorum]
                                  [--e2e] [--client] [--paced RATE] [--rounds 1]

It starts `zq node start` on a free port in a temporary folder, creates a one-partition topic and
sends one 100-byte message at a time, pausing 0.5 ms after each (about 2,000 msg/s at most), and
prints the percentiles of:

  produce (default)  send to acknowledgement;
  --e2e              send to the moment a fetch, parked at the node beforehand, brings it back.

The *node* figure speaks the raw protocol (one DEALER, zq.protocol, one thread, no client
library); with `--client` the same loop also runs through `zq.Client` (a producer with
`linger_ms=0` calling `send(...).result()`; with --e2e a consumer of the same client, `poll`ed
until the message is there), against the same node, the two interleaved for `--rounds` rounds.
The difference is the client library's share. Each line also gives the probe process's thread
wake-ups per message (voluntary context switches): each hand-off between threads costs one, and
on a loaded machine each can cost a scheduling delay.

With `--paced RATE` both send in an open loop instead, a message every 1/RATE s whatever the
replies (as `make bench`'s produce-latency and e2e rows, whose e2e consumer is a second process
though): the node figure from one thread polling its sockets between sends, the client figure
from a producer and (--e2e) a consumer polled between sends, the send time in the value.
"""
from __future__ import annotations

import argparse
import math
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from tests.nodeutil import Raw, free_port_base, wait_until  # noqa: E402
from zq import batch as B  # noqa: E402
from zq import protocol as P  # noqa: E402

PAUSE_S = 0.0005
VALUE = b"x" * 100
FETCH_WAIT_MS = 500
STAMP = struct.Struct(">d")


def node_produce(raw: Raw, topic: str, acks: int, messages: int) -> list[float]:
    latencies = []
    for _ in range(messages):
        blob = B.encode_records([[int(time.time() * 1000), None, VALUE, None]])
        msg = P.Produce(raw.rid(), topic, 0, acks, 1, B.crc(blob), 0, 0, 0)
        started = time.perf_counter()
        reply = raw.rpc(msg, blob)[0]
        latencies.append(time.perf_counter() - started)
        if not isinstance(reply, P.ProduceReply):
            raise SystemExit(f"the node refused a message: {reply.message}")
        time.sleep(PAUSE_S)
    return latencies


def node_e2e(raw: Raw, fetcher: Raw, topic: str, acks: int, messages: int) -> list[float]:
    """One thread: a fetch is parked at the node, a produce is sent, and the time until the fetch
    reply holding the record is taken; the next fetch is sent at once, as a consumer does."""
    offset = raw.fetch(topic, 0, 0)[0].high_watermark
    poller = zmq.Poller()
    poller.register(raw.sock, zmq.POLLIN)
    poller.register(fetcher.sock, zmq.POLLIN)

    def park() -> None:
        fetcher.send(P.Fetch(fetcher.rid(), topic, 0, offset, 1 << 20, FETCH_WAIT_MS, None))

    park()
    time.sleep(0.05)   # parked at the node before the first produce
    latencies = []
    for _ in range(messages):
        blob = B.encode_records([[int(time.time() * 1000), None, VALUE, None]])
        raw.send(P.Produce(raw.rid(), topic, 0, acks, 1, B.crc(blob), 0, 0, 0), blob)
        started = time.perf_counter()
        got = acked = False
        while not (got and acked):
            ready = dict(poller.poll(5_000))
            if not ready:
                raise SystemExit("no reply from the node within 5 s")
            if raw.sock in ready:
                raw.sock.recv_multipart()
                acked = True
            if fetcher.sock in ready:
                reply, frames = P.decode(fetcher.sock.recv_multipart())
                if not isinstance(reply, P.FetchReply):
                    raise SystemExit(f"the node refused a fetch: {reply.message}")
                if reply.high_watermark > offset and frames:
                    latencies.append(time.perf_counter() - started)
                    offset = reply.high_watermark
                    got = True
                park()
        time.sleep(PAUSE_S)
    # The last fetch stays parked; its reply, whenever it comes, is never read.
    return latencies


def node_paced(raw: Raw, fetcher: Raw, topic: str, acks: int, messages: int, rate: float, e2e: bool) -> list[float]:
    """Open loop: a message every 1/rate s whatever the replies, one thread; the time of each is
    taken when its ack (or, with e2e, the fetch reply holding it) comes back."""
    poller = zmq.Poller()
    poller.register(raw.sock, zmq.POLLIN)
    offset = base = raw.fetch(topic, 0, 0)[0].high_watermark
    if e2e:
        poller.register(fetcher.sock, zmq.POLLIN)
        fetcher.send(P.Fetch(fetcher.rid(), topic, 0, offset, 1 << 20, FETCH_WAIT_MS, None))
        time.sleep(0.05)
    sent_at: dict[int, float] = {}   # req_id (produce) or offset (e2e) -> send time
    latencies: list[float] = []
    refused = 0
    start = time.perf_counter()
    i = 0
    while len(latencies) + refused < messages:
        now = time.perf_counter()
        if i < messages and now >= start + i / rate:
            blob = B.encode_records([[int(time.time() * 1000), None, VALUE, None]])
            rid = raw.rid()
            raw.send(P.Produce(rid, topic, 0, acks, 1, B.crc(blob), 0, 0, 0), blob)
            sent_at[base + i if e2e else rid] = time.perf_counter()
            i += 1
            continue
        # Whole milliseconds (zmq's poll rounds down, and 0 would spin): a send may leave up to 1 ms
        # late, which the schedule catches up; replies still wake the poll at once.
        wait_ms = math.ceil(max(0.0, (start + i / rate - now) * 1000)) if i < messages else 5_000
        ready = dict(poller.poll(wait_ms))
        if raw.sock in ready:
            for _ in range(1_000):
                try:
                    reply, _ = P.decode(raw.sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if not isinstance(reply, P.ProduceReply):
                    if e2e or getattr(reply, "code", None) != "backpressure":
                        raise SystemExit(f"the node refused a message: {reply.message}")
                    sent_at.pop(reply.req_id)   # an overloaded node said "later": not timed
                    refused += 1
                    continue
                if not e2e:
                    latencies.append(time.perf_counter() - sent_at.pop(reply.req_id))
        if e2e and fetcher.sock in ready:
            reply, frames = P.decode(fetcher.sock.recv_multipart())
            t = time.perf_counter()
            if not isinstance(reply, P.FetchReply):
                raise SystemExit(f"the node refused a fetch: {reply.message}")
            for o in range(offset, reply.high_watermark):
                latencies.append(t - sent_at.pop(o))
            offset = max(offset, reply.high_watermark)
            fetcher.send(P.Fetch(fetcher.rid(), topic, 0, offset, 1 << 20, FETCH_WAIT_MS, None))
        if not ready and i >= messages:
            raise SystemExit("no reply from the node within 5 s")
    if refused:
        print(f"  ({refused} messages refused by the node with backpressure, not timed)", file=sys.stderr)
    return latencies


def client_paced(producer, consumer, topic: str, messages: int, rate: float) -> list[float]:
    """As node_paced, through zq.Client: the send time is the value, read back by the consumer
    (e2e) or by a done-callback (produce)."""
    latencies: list[float] = []
    done = lambda f, t: latencies.append(time.perf_counter() - t)  # noqa: E731
    start = time.perf_counter()
    i = 0
    while len(latencies) < messages:
        now = time.perf_counter()
        if i < messages and now >= start + i / rate:
            t = time.perf_counter()
            future = producer.send(topic, STAMP.pack(t) + VALUE[STAMP.size:])
            if consumer is None:
                future.add_done_callback(lambda f, t=t: done(f, t))
            i += 1
            continue
        wait_s = max(0.0, start + i / rate - now) if i < messages else 5.0
        if consumer is None:
            time.sleep(wait_s) if i < messages else producer.flush(5.0)
            continue
        got = consumer.poll(timeout=wait_s, max_messages=10_000)
        t = time.perf_counter()
        latencies += [t - STAMP.unpack_from(m.value)[0] for m in got]
        if not got and i >= messages:
            raise SystemExit("the consumer got nothing within 5 s")
    return latencies


def client_produce(producer, topic: str, messages: int) -> list[float]:
    latencies = []
    for _ in range(messages):
        started = time.perf_counter()
        producer.send(topic, VALUE).result()
        latencies.append(time.perf_counter() - started)
        time.sleep(PAUSE_S)
    return latencies


def client_e2e(producer, consumer, topic: str, messages: int) -> list[float]:
    latencies = []
    for _ in range(messages):
        started = time.perf_counter()
        future = producer.send(topic, VALUE)
        got: list = []
        while not got:
            got = consumer.poll(timeout=5.0, max_messages=10)
            if not got:
                raise SystemExit("the consumer got nothing within 5 s")
        latencies.append(time.perf_counter() - started)
        future.result()
        time.sleep(PAUSE_S)
    return latencies


def measured(run, messages: int) -> tuple[float, float, float, float]:
    """p50, p99, p99.9 (ms) of `run()`'s latencies, and this process's thread wake-ups (voluntary
    context switches, all threads) per message: a figure the machine's load hardly moves."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    s = sorted(run())
    wakeups = (resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before) / messages
    pick = lambda q: s[min(len(s) - 1, int(len(s) * q))] * 1000  # noqa: E731
    return pick(0.5), pick(0.99), pick(0.999), wakeups


def line(label: str, figures: tuple[float, ...]) -> str:
    return (f"  {label:<7} p50 {figures[0]:.3f} ms, p99 {figures[1]:.3f} ms, p99.9 {figures[2]:.3f} ms, "
            f"{figures[3]:.2f} wake-ups/msg")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--durability", choices=["fsync", "replicated"], default="fsync")
    parser.add_argument("--acks", choices=["leader", "quorum"], default="leader")
    parser.add_argument("--messages", type=int, default=2_000)
    parser.add_argument("--e2e", action="store_true", help="send to fetched, instead of send to acknowledged")
    parser.add_argument("--client", action="store_true", help="the same loop through zq.Client too")
    parser.add_argument("--paced", type=float, metavar="RATE",
                        help="an open loop at RATE msg/s (as make bench's rows) instead of one message at a time")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the medians are printed too")
    args = parser.parse_args()
    what = "send -> fetched" if args.e2e else "send -> ack"
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port_base()
        node = subprocess.Popen([sys.executable, "-m", "zq", "node", "start", "--name", "n1", "--data-dir",
                                 str(Path(tmp) / "n1"), "--port", str(port), "--no-discovery"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        address = f"127.0.0.1:{port}"
        raw, fetcher = Raw(address), Raw(address)
        client = None
        try:
            wait_until(lambda: isinstance(raw.create("probe", 1, 1, durability=args.durability), P.OkReply), 20,
                       "the node to take the topic")
            acks = P.ACKS[args.acks]
            wait_until(lambda: isinstance(raw.produce("probe", 0, [b"warm-up"], acks=acks), P.ProduceReply), 20,
                       "the partition's leader")
            if args.client:
                import zq
                client = zq.Client(address)
                # Several requests in flight when paced, as make bench's paced producer.
                producer = client.producer(acks=args.acks, linger_ms=0, max_in_flight=64 if args.paced else 1)
                consumer = client.consumer("probe", start="latest") if args.e2e else None
                producer.send("probe", b"warm-up").result()
                if consumer is not None:
                    consumer.poll(timeout=5.0)
            n = args.messages
            results: dict[str, list[tuple[float, ...]]] = {"node": [], "client": []}
            for rnd in range(args.rounds):
                if args.paced:
                    run = lambda: node_paced(raw, fetcher, "probe", acks, n, args.paced, args.e2e)  # noqa: E731
                elif args.e2e:
                    run = lambda: node_e2e(raw, fetcher, "probe", acks, n)  # noqa: E731
                else:
                    run = lambda: node_produce(raw, "probe", acks, n)  # noqa: E731
                results["node"].append(measured(run, n))
                if client is not None:
                    if consumer is not None:
                        consumer.seek_to_end()   # past what the node's round wrote
                    if args.paced:
                        run = lambda: client_paced(producer, consumer, "probe", n, args.paced)  # noqa: E731
                    elif args.e2e:
                        run = lambda: client_e2e(producer, consumer, "probe", n)  # noqa: E731
                    else:
                        run = lambda: client_produce(producer, "probe", n)  # noqa: E731
                    results["client"].append(measured(run, n))
                print(f"round {rnd + 1}: {args.messages} messages, {what}, durability {args.durability}, "
                      f"acks {args.acks}" + (f", paced at {args.paced:g} msg/s" if args.paced else ""), flush=True)
                for label, figures in results.items():
                    if figures:
                        print(line(label, figures[-1]))
            if args.rounds > 1:
                print(f"medians of {args.rounds} rounds:")
                for label, figures in results.items():
                    if figures:
                        print(line(label, tuple(statistics.median(f[i] for f in figures) for i in range(4))))
        finally:
            if client is not None:
                client.close()
            raw.close()
            fetcher.close()
            node.terminate()
            node.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
