"""Every bound in one place. A queue, buffer, retry loop or wait that grows checks one of these.

Names carry their unit last. The node and the client read these defaults; tests may pass smaller
ones to reach the edges quickly.
"""
from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, slots=True)
class Limits:
    # Wire.
    frame_bytes_max: int = 8 * MiB          # largest single ZeroMQ frame a node accepts
    header_bytes_max: int = 64 * KiB        # the CBOR header frame of a request
    message_bytes_max: int = 1 * MiB        # one record: key + value + headers
    batch_bytes_max: int = 4 * MiB          # one produce batch, as encoded by the producer
    batch_records_max: int = 100_000        # records in one batch
    batch_decoded_bytes_max: int = 8 * MiB   # one compressed batch once inflated (a producer fills <= batch_bytes_max, uncompressed)
    frames_per_message_max: int = 1024      # frames in one multipart message
    topic_name_chars_max: int = 200
    group_name_chars_max: int = 200         # consumer group names and member ids
    partitions_per_topic_max: int = 10_000
    replication_max: int = 7                # replicas of one partition (each is a voter: 7 tolerates 3 failures)
    # Node event loop.
    inbox_drain_max: int = 2_048            # requests handled per loop pass before writing and replying
    pending_fetches_max: int = 10_000       # long-poll fetches parked at once
    fetch_wait_ms_max: int = 30_000         # longest long-poll a client may ask for
    fetch_bytes_max: int = 16 * MiB         # most bytes one fetch reply carries
    # Fetch replies handed to ZeroMQ and not yet written to the client's socket (a client that does
    # not read keeps them queued in the node): over either bound, its fetches get Backpressure.
    fetch_client_pending_bytes_max: int = 32 * MiB    # per client identity
    fetch_client_pending_replies_max: int = 1_000     # per client identity (replies carrying batches)
    fetch_pending_bytes_max: int = 256 * MiB          # all clients together
    router_sndhwm: int = 100_000            # replies queued per peer before ROUTER drops (see transport)
    router_rcvhwm: int = 100_000
    create_wait_ms_max: int = 5_000         # how long create_topic waits for every node to learn it
    drain_wait_ms_max: int = 30_000         # longest `zq node drain` waits for leadership to move away
    # Producer.
    producer_buffer_bytes_max: int = 64 * MiB  # bytes buffered in a producer before send blocks
    producer_inflight_batches_max: int = 64    # batches sent and not yet acknowledged, per producer
    producer_max_block_ms: int = 30_000        # how long send waits for buffer space before BufferFull
    producer_request_timeout_ms: int = 30_000  # how long a batch waits for its acknowledgement
    producer_retries_max: int = 20             # retries of one batch on retriable errors
    retry_backoff_ms: int = 50
    retry_backoff_ms_max: int = 2_000
    # Consumer.
    consumer_prefetch_bytes_max: int = 32 * MiB  # fetched and not yet handed to the application
    # Client requests in general.
    request_timeout_ms: int = 10_000
    api_timeout_ms: int = 60_000            # a client call retries passing refusals (an election, NotLeader,
                                            # backpressure, a lost connection) this long before it raises,
                                            # as Kafka's default.api.timeout.ms; Client(api_timeout_ms=...)


DEFAULT = Limits()
