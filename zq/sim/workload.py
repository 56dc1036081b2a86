"""Simulated producers: each sends one batch at a time to the leader it believes in, retries on
timeouts, NOT_LEADER and BACKPRESSURE, and reports every COMMITTED answer as an acknowledgement.

An idempotent producer retries with the same (producer_id, base_sequence), so a retry after a
leader change must not be written twice; a plain producer may duplicate on retry (at least once).
With one batch in flight an idempotent producer never skips a sequence number, so an
OUT_OF_ORDER or DUPLICATE_SEQUENCE answer to it is a bug the simulator reports.
"""
from __future__ import annotations

from dataclasses import dataclass

from zq.core.repl_types import NO_PRODUCER


@dataclass(frozen=True, slots=True)
class ProduceRequest:
    producer: str
    batch_no: int
    attempt: int
    partition: int
    count: int
    producer_id: int
    base_sequence: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ProduceResponse:
    producer: str
    batch_no: int
    attempt: int
    status: str
    base_offset: int
    epoch: int
    leader_hint: str | None


REQUEST_TIMEOUT_MS = 250
RETRY_BACKOFF_MS = 20
THINK_MS_MAX = 20
BATCH_RECORDS_MAX = 3


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

    @property
    def idempotent(self) -> bool:
        return self.producer_id != NO_PRODUCER

    def new_batch(self, count: int) -> None:
        self.batch_no += 1
        self.attempt = 0
        self.count = count
        self.payload = f"{self.name}/{self.batch_no}".encode()

    def request(self) -> ProduceRequest:
        self.attempt += 1
        self.waiting = True
        seq = self.next_sequence if self.idempotent else NO_PRODUCER
        return ProduceRequest(self.name, self.batch_no, self.attempt, self.partition, self.count,
                              self.producer_id, seq, self.payload)

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
