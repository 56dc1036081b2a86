"""Bounded per-client memory (issue 12, finding 4): a client that sends fetches and never reads the
replies is slowed down (Backpressure), not buffered without limit, and other clients keep reading.

A real node process, so its resident memory (/proc/PID/status VmRSS) is what the test measures."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import zmq

from tests.nodeutil import Raw
from zq import protocol as P
from zq.limits import DEFAULT, MiB
from zq.testing import LocalCluster

VALUE_BYTES = 512 * 1024
BATCHES = 8                 # 8 batches of 6 x 512 KiB: 24 MiB, more than one 16 MiB fetch reply
RECORDS_PER_BATCH = 6
HOSTILE_FETCHES = 40        # before the bound: 40 x 16 MiB held for the client (~640 MiB)
HOSTILE_PERIOD_S = 0.05

# What the node may hold for the non-reading client: its pending bound, plus the one reply that
# took it over (checked before a reply, not after), plus the reply being read and copied into
# ZeroMQ (twice its size, transiently), plus allocator slack. Far below 40 replies' 640 MiB.
RSS_GROWTH_BOUND_BYTES = (DEFAULT.fetch_client_pending_bytes_max + DEFAULT.fetch_bytes_max
                          + 2 * DEFAULT.fetch_bytes_max + 32 * MiB)


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
def test_a_client_that_never_reads_fetch_replies_is_slowed_and_the_leader_stays_bounded(tmp_path):
    with LocalCluster(nodes=1, data_dir=tmp_path / "c") as cluster:
        address = cluster.address("n1")
        raw = Raw(address)
        assert isinstance(raw.create("big", partitions=2, replication=1), P.OkReply)
        for _ in range(BATCHES):
            reply = raw.produce("big", 0, [os.urandom(VALUE_BYTES) for _ in range(RECORDS_PER_BATCH)])
            assert isinstance(reply, P.ProduceReply), reply
        # A reader that reads: warms the node's read path before the baseline is taken.
        reply, records = raw.fetch("big", 0, 0, max_bytes=DEFAULT.fetch_bytes_max)
        assert records
        pid = cluster.pid("n1")
        baseline = _rss_bytes(pid)

        hostile = zmq.Context.instance().socket(zmq.DEALER)
        hostile.setsockopt(zmq.LINGER, 0)
        hostile.setsockopt(zmq.RCVHWM, 1)        # it queues almost nothing itself...
        hostile.setsockopt(zmq.RCVBUF, 4096)     # ...and its kernel buffer fills at once
        hostile.connect(f"tcp://{address}")
        peak = baseline
        other_reads = 0
        try:
            for i in range(HOSTILE_FETCHES):
                hostile.send_multipart(P.encode(P.Fetch(10_000 + i, "big", 0, 0, DEFAULT.fetch_bytes_max, 0, None)))
                # Meanwhile a normal client on the other partition writes and reads on.
                assert isinstance(raw.produce("big", 1, [b"x%d" % i]), P.ProduceReply)
                reply, records = raw.fetch("big", 1, 0)
                assert isinstance(reply, P.FetchReply) and records[-1].value == b"x%d" % i
                other_reads += 1
                peak = max(peak, _rss_bytes(pid))
                time.sleep(HOSTILE_PERIOD_S)
            time.sleep(0.5)
            peak = max(peak, _rss_bytes(pid))
            # Now it reads: a few replies carry data, the rest say Backpressure (retriable).
            kinds = []
            for _ in range(HOSTILE_FETCHES):
                assert hostile.poll(5_000), f"the node answered {len(kinds)} of {HOSTILE_FETCHES} fetches"
                msg, _frames = P.decode(hostile.recv_multipart())
                kinds.append(type(msg).__name__ if isinstance(msg, P.FetchReply) else msg.code)
        finally:
            hostile.close(0)
        raw.close()
        assert other_reads == HOSTILE_FETCHES
        growth = peak - baseline
        assert growth < RSS_GROWTH_BOUND_BYTES, (
            f"leader RSS grew by {growth / MiB:.0f} MiB (bound {RSS_GROWTH_BOUND_BYTES / MiB:.0f} MiB)")
        assert kinds.count("FetchReply") <= 4 and kinds.count("backpressure") >= HOSTILE_FETCHES - 4, kinds
        assert "Traceback" not in cluster.log_path("n1").read_text()
