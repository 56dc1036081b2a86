#!/usr/bin/env python3
"""The node's own share of produce latency: one node process, one message per request, no client library.

    python tools/latency_probe.py [--durability fsync|replicated] [--messages 2000] [--acks leader|quorum]

It starts `zq node start` on a free port in a temporary folder, creates a one-partition topic and
sends one 100-byte message at a time in the raw protocol (a DEALER, zq.protocol), pausing 0.5 ms
between them (about 2,000 msg/s at most), and prints the send-to-acknowledgement percentiles.
Beside `make bench`'s produce-latency row (which goes through zq.Client), the difference is the
client library's share.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.nodeutil import Raw, free_port_base, wait_until  # noqa: E402
from zq import batch as B  # noqa: E402
from zq import protocol as P  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--durability", choices=["fsync", "replicated"], default="fsync")
    parser.add_argument("--acks", choices=["leader", "quorum"], default="leader")
    parser.add_argument("--messages", type=int, default=2_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port_base()
        node = subprocess.Popen([sys.executable, "-m", "zq", "node", "start", "--name", "n1", "--data-dir",
                                 str(Path(tmp) / "n1"), "--port", str(port), "--no-discovery"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        raw = Raw(f"127.0.0.1:{port}")
        try:
            wait_until(lambda: isinstance(raw.create("probe", 1, 1, durability=args.durability), P.OkReply), 20,
                       "the node to take the topic")
            acks = P.ACKS[args.acks]
            wait_until(lambda: isinstance(raw.produce("probe", 0, [b"warm-up"], acks=acks), P.ProduceReply), 20,
                       "the partition's leader")
            latencies = []
            for _ in range(args.messages):
                blob = B.encode_records([[int(time.time() * 1000), None, b"x" * 100, None]])
                msg = P.Produce(raw.rid(), "probe", 0, acks, 1, B.crc(blob), 0, 0, 0)
                started = time.perf_counter()
                reply = raw.rpc(msg, blob)[0]
                latencies.append(time.perf_counter() - started)
                if not isinstance(reply, P.ProduceReply):
                    print(f"the node refused a message: {reply.message}", file=sys.stderr)
                    return 1
                time.sleep(0.0005)
            latencies.sort()
            pick = lambda q: latencies[min(len(latencies) - 1, int(len(latencies) * q))] * 1000  # noqa: E731
            print(f"{args.messages} messages, durability {args.durability}, acks {args.acks}: "
                  f"p50 {pick(0.5):.3f} ms, p99 {pick(0.99):.3f} ms, p99.9 {pick(0.999):.3f} ms")
        finally:
            raw.close()
            node.terminate()
            node.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
