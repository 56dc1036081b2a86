"""Simulated clients. Producers: each sends one batch at a time (a real `Produce` with a real
record batch) to the leader it believes in, retries on timeouts and on retriable errors
(NotLeader, going where it names, Backpressure, ...), and reports every `ProduceReply` as an
acknowledgement. Consumers (`Reader`): each fetches one partition from its position with a
real `Fetch`, at most one in flight, long-polling at the end of the log. In half the seeds the
first consumer is a `ManyReader` instead: it reads every partition, with one real `FetchMany` per
node it believes leads some of them (as zq's Consumer does), each partition answered or refused
within the reply.

An idempotent producer retries with the same (producer_id, base_sequence), so a retry after a
leader change must not be written twice; a plain producer may duplicate on retry (at least once).
With one batch in flight an idempotent producer never skips a sequence number, so an
OUT_OF_ORDER or DUPLICATE_SEQUENCE answer to it is a bug the simulator reports.
"""
from __future__ import annotations

from zq import batch as zbatch
from zq import protocol as P
from zq.core.repl_types import NO_PRODUCER


REQUEST_TIMEOUT_MS = 250
RETRY_BACKOFF_MS = 20
THINK_MS_MAX = 20
BATCH_RECORDS_MAX = 3
LEADER_ACKS_SHARE = 0.2        # of the plain producers, those asking for acks=leader
SIM_TOPIC = "sim"              # the one topic of the cluster simulator; its partitions are numbers
FETCH_BYTES = 512              # a consumer's fetch size: a few batches
FETCH_WAITS_MS = (0, 0, 30, 200)   # the long-polls consumers ask for (0: answer at once)


class Producer:
    def __init__(self, name: str, partition: int, replica_set: list[str], producer_id: int) -> None:
        self.name = name
        self.partition = partition
        self.replica_set = replica_set
        self.producer_id = producer_id  # NO_PRODUCER: not idempotent
        self.next_sequence = 0
        self.batch_no = 0
        self.attempt = 0
        self.count = 0
        self.payload = b""
        self.waiting = False
        self.target = replica_set[0]
        self.acked = 0
        self.blob = b""
        self.identity = name.encode()
        self.requests: dict[int, tuple[int, int, bytes]] = {}   # req_id -> (batch_no, attempt, blob)
        self.acks = 2   # 2: answered once a majority holds the batch; 1: once the leader does (never idempotent)

    @property
    def idempotent(self) -> bool:
        return self.producer_id != NO_PRODUCER

    def new_batch(self, count: int) -> None:
        self.batch_no += 1
        self.attempt = 0
        self.count = count
        self.payload = f"{self.name}/{self.batch_no}".encode()
        self.blob = zbatch.encode_records([[0, None, self.payload, None] for _ in range(count)])

    def request(self) -> tuple[P.Produce, bytes]:
        """The Produce of the batch in flight (a new attempt) and its blob (the payload frame)."""
        self.attempt += 1
        self.waiting = True
        req_id = len(self.requests) + 1
        self.requests[req_id] = (self.batch_no, self.attempt, self.blob)
        pid, seq = (self.producer_id, self.next_sequence) if self.idempotent else (0, 0)   # 0: not idempotent
        return P.Produce(req_id, SIM_TOPIC, self.partition, self.acks, self.count, zbatch.crc(self.blob), pid, seq, 0), self.blob

    def is_current(self, batch_no: int, attempt: int) -> bool:
        return self.waiting and batch_no == self.batch_no and attempt == self.attempt

    def on_committed(self, batch_no: int) -> bool:
        """True if this answer completes the batch in flight (an older attempt's answer counts)."""
        if not self.waiting or batch_no != self.batch_no:
            return False
        self.waiting = False
        self.acked += 1
        if self.idempotent:
            self.next_sequence += self.count
        return True


class Reader:
    """A consumer of one partition: its position, the node it asks, the fetch it waits for."""

    def __init__(self, index: int, partition: int, target: str) -> None:
        self.index = index
        self.partition = partition
        self.identity = f"r{index}".encode()
        self.position = 0
        self.target = target
        self.req_id = 0            # of the fetch in flight; 0: none
        self.sent = 0

    def fetch(self, max_wait_ms: int) -> P.Fetch:
        self.sent += 1
        self.req_id = self.sent
        return P.Fetch(self.req_id, SIM_TOPIC, self.partition, self.position, FETCH_BYTES, max_wait_ms, None)


class ManyReader:
    """A consumer of every partition that asks each node it believes leads some of them with one
    FetchMany: its positions, its belief of each partition's leader, the requests in flight."""

    def __init__(self, index: int, targets: dict[int, str]) -> None:
        self.index = index
        self.identity = f"r{index}".encode()
        self.positions = {p: 0 for p in targets}
        self.targets = dict(targets)
        self.in_flight: dict[int, list[int]] = {}   # req_id -> the partitions it asks for
        self.sent = 0

    def fetches(self, max_wait_ms: int) -> list[tuple[str, P.FetchMany]]:
        """One FetchMany per node named as a leader, each with the partitions named for it."""
        by_node: dict[str, list[list[int]]] = {}
        for p in sorted(self.positions):
            by_node.setdefault(self.targets[p], []).append([p, self.positions[p]])
        out = []
        for node, spans in sorted(by_node.items()):
            self.sent += 1
            self.in_flight[self.sent] = [p for p, _ in spans]
            out.append((node, P.FetchMany(self.sent, SIM_TOPIC, spans, FETCH_BYTES, max_wait_ms)))
        return out
