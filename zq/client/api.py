"""The public client API, listed once: what `zq.Client` and `zq.aio.Client` (and what they make)
offer, by class. `tests/test_aio_surface.py` checks both surfaces against this list: the same
names, the same parameters and defaults. In `zq.aio` a member that waits for the network is a
coroutine; that is the one difference.

`methods` are callables; `attributes` are read as plain values (properties or fields).
"""
from __future__ import annotations

PUBLIC_API: dict[str, dict[str, tuple[str, ...]]] = {
    "Client": {
        "methods": ("close", "consumer", "create_topic", "delete_topic", "describe_topic", "drain_node",
                    "list_offsets", "producer", "reassign_partition", "refresh_metadata", "status", "topics"),
        "attributes": ("metadata",),
    },
    "Producer": {
        "methods": ("close", "flush", "send", "send_and_wait"),
        "attributes": ("buffered_bytes",),
    },
    "Consumer": {
        "methods": ("assignment", "close", "commit", "poll", "position", "seek", "seek_to_beginning", "seek_to_end",
                    "seek_to_time"),
        "attributes": ("resets", "topic", "group", "generation", "undecodable_batches_skipped"),
    },
    "GroupConsumer": {
        "methods": ("assignment", "caught_up", "close", "commit", "poll", "position", "seek", "seek_to_beginning",
                    "seek_to_end", "seek_to_time"),
        "attributes": ("resets", "topic", "group", "generation", "member_id", "undecodable_batches_skipped"),
    },
}

# Members only the asyncio client has: its constructor that resolves bootstrap addresses off the
# event loop's thread.
AIO_ONLY: dict[str, tuple[str, ...]] = {"Client": ("connect",)}
