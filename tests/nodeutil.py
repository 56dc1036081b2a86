"""In-process nodes and a raw protocol client, for tests of the node itself (no client library)."""
from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from pathlib import Path

import zmq

from zq import batch as B
from zq import protocol as P
from zq.io.node import Node, NodeConfig


def free_port_base(span: int = 10) -> int:
    """A port p such that p..p+span-1 are free on 127.0.0.1 right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + span > 65000:
            continue
        socks = []
        try:
            for p in range(base, base + span):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free port range")


class NodeThread:
    def __init__(self, config: NodeConfig):
        self.config = config
        self.stop_event = threading.Event()
        self.errors: list[BaseException] = []
        self.node: Node | None = None
        self.thread = threading.Thread(target=self._run, name=config.name, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.node = Node(self.config)
            self.node.run(self.stop_event)
        except BaseException as e:  # surfaced by stop()
            self.errors.append(e)

    def stop(self):
        self.stop_event.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), f"node {self.config.name} did not stop"
        if self.errors:
            raise self.errors[0]

    @property
    def address(self):
        return self.config.address


def start_nodes(tmp_path: Path, n: int = 1, **overrides) -> list[NodeThread]:
    bases = [free_port_base() for _ in range(n)]
    names = [f"n{i + 1}" for i in range(n)]
    seeds = tuple(f"127.0.0.1:{b}" for b in bases)
    out = []
    for name, base in zip(names, bases):
        settings = {"discovery": False, "metrics": False, **overrides}   # seeds only: tests never multicast
        cfg = NodeConfig(name=name, port=base, data_dir=tmp_path / name, seeds=seeds, voters=tuple(names), **settings)
        out.append(NodeThread(cfg))
    return out


class Raw:
    """A DEALER speaking the protocol, one request at a time."""
    _ids = itertools.count(1)

    def __init__(self, address: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{address}")

    def send(self, msg, *payload):
        self.sock.send_multipart(P.encode(msg, *payload))

    def recv(self, timeout_s: float = 5.0):
        assert self.sock.poll(int(timeout_s * 1000)), "no reply in time"
        return P.decode(self.sock.recv_multipart())

    def rpc(self, msg, *payload, timeout_s: float = 5.0):
        self.send(msg, *payload)
        while True:
            reply, frames = self.recv(timeout_s)
            if reply.req_id == msg.req_id:
                return reply, frames

    def rid(self) -> int:
        return next(self._ids)

    def create(self, name, partitions=1, replication=1, **config):
        return self.rpc(P.CreateTopic(self.rid(), name, partitions, replication, config))[0]

    def produce(self, topic, partition, values, acks=1, producer_id=0, seq=0, ts=None):
        blob = B.encode_records([[ts or int(time.time() * 1000), None, v, None] for v in values])
        return self.rpc(P.Produce(self.rid(), topic, partition, acks, len(values), B.crc(blob), producer_id, seq, 0),
                        blob)[0]

    def fetch(self, topic, partition, offset, max_bytes=1 << 20, wait_ms=0):
        reply, frames = self.rpc(P.Fetch(self.rid(), topic, partition, offset, max_bytes, wait_ms, None),
                                 timeout_s=wait_ms / 1000 + 5)
        records = [r for f in frames for r in B.iter_records(f, offset)]
        return reply, records

    def close(self):
        self.sock.close(0)


def wait_until(fn, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if fn():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
