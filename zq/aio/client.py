"""asyncio twin of the sync client, kept thin on purpose.

The sync client already does its I/O on its own thread; this module only makes waiting
awaitable. Calls that wait for a node (admin, metadata, list_offsets, flush, a poll with
nothing ready) run the sync call in the event loop's default executor; `send` is called
directly, since it only appends to a batch, unless the producer's buffer is nearly full and
send would block, in which case it too runs in the executor. Futures from the sync producer
are wrapped with `asyncio.wrap_future`, whose callback hops back to the loop thread-safely.

Names, parameters and defaults match the sync API, as listed once in `zq.client.api` (checked by
tests/test_aio_surface.py); each method that waits is a coroutine.
"""
from __future__ import annotations

import asyncio
import functools
from datetime import datetime
from typing import Any

from zq.client import client as sync_client
from zq.client import consumer as sync_consumer
from zq.client import groups as sync_groups
from zq.client import producer as sync_producer
from zq.client.consumer import Message
from zq.client.metadata import Metadata
from zq.client.producer import RecordMetadata
from zq.limits import DEFAULT, Limits


async def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))


class Client:
    """`async with zq.aio.Client(bootstrap) as client:` — see zq.Client for the arguments.

    Construction resolves bootstrap addresses (and may browse zeroconf for up to
    `discovery_timeout_s` when none is given); use `await Client.connect(...)` to do that in
    the executor instead."""

    def __init__(self, bootstrap: str | list[str] | None = None, cluster: str = "zq", limits: Limits = DEFAULT,
                 discovery_timeout_s: float = 3.0, interface: str | None = None, security: Any = None,
                 api_timeout_ms: int | None = None) -> None:
        self.sync = sync_client.Client(bootstrap, cluster, limits, discovery_timeout_s, interface, security,
                                       api_timeout_ms)

    @classmethod
    async def connect(cls, *args: Any, **kwargs: Any) -> Client:
        self = cls.__new__(cls)
        self.sync = await _run(sync_client.Client, *args, **kwargs)
        return self

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self, timeout: float | None = 5.0) -> None:
        await _run(self.sync.close, timeout)

    @property
    def metadata(self) -> Metadata:
        return self.sync.metadata

    async def create_topic(self, name: str, partitions: int = 1, replication: int = sync_client.default_replication,
                           **config: Any) -> dict:
        return await _run(self.sync.create_topic, name, partitions, replication, **config)

    async def delete_topic(self, name: str) -> dict:
        return await _run(self.sync.delete_topic, name)

    async def reassign_partition(self, topic: str, partition: int, replicas: list[str]) -> dict:
        return await _run(self.sync.reassign_partition, topic, partition, replicas)

    async def drain_node(self, name: str, wait_s: float = 10.0, leave: bool = False) -> dict:
        return await _run(self.sync.drain_node, name, wait_s, leave)

    async def topics(self) -> list[dict]:
        return await _run(self.sync.topics)

    async def describe_topic(self, name: str) -> dict:
        return await _run(self.sync.describe_topic, name)

    async def status(self) -> dict:
        return await _run(self.sync.status)

    async def list_offsets(self, topic: str, partition: int, spec: str | int | datetime = "latest") -> sync_client.Offsets:
        return await _run(self.sync.list_offsets, topic, partition, spec)

    async def refresh_metadata(self) -> Metadata:
        return await _run(self.sync.refresh_metadata)

    def producer(self, acks: Any = "quorum", idempotent: bool = False, linger_ms: float = 5, **options: Any) -> Producer:
        return Producer(self.sync.producer(acks=acks, idempotent=idempotent, linger_ms=linger_ms, **options))

    async def consumer(self, topic: str, group: str | None = None, start: Any = None,
                       partitions: list[int] | None = None, **options: Any) -> Consumer | GroupConsumer:
        """As zq.Client.consumer: a Consumer (start default latest), or with `group` a
        GroupConsumer (start default earliest, for a group with nothing committed)."""
        c = await _run(self.sync.consumer, topic, group=group, start=start, partitions=partitions, **options)
        return GroupConsumer(c) if group is not None else Consumer(c)


class Producer:
    def __init__(self, sync: sync_producer.Producer) -> None:
        self.sync = sync

    @property
    def buffered_bytes(self) -> int:
        return self.sync.buffered_bytes

    async def send(self, topic: str, value: bytes, key: bytes | None = None, headers: dict[str, bytes] | None = None,
                   partition: int | None = None, timestamp_ms: int | None = None) -> asyncio.Future:
        """Queue one record; returns an asyncio Future of its RecordMetadata (await it for the ack)."""
        args = (topic, value, key, headers, partition, timestamp_ms)
        s = self.sync
        if s.buffered_bytes + len(value) + (len(key) if key else 0) + 1024 > s.buffer_bytes or topic not in s._partitions:
            fut = await _run(s.send, *args)  # may block: for buffer space, or to learn the topic
        else:
            fut = s.send(*args)
        return asyncio.wrap_future(fut)

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None,
                            headers: dict[str, bytes] | None = None, partition: int | None = None,
                            timestamp_ms: int | None = None) -> RecordMetadata:
        return await (await self.send(topic, value, key, headers, partition, timestamp_ms))

    async def flush(self, timeout: float | None = None) -> None:
        await _run(self.sync.flush, timeout)

    async def close(self, timeout: float | None = None) -> None:
        await _run(self.sync.close, timeout)


class _Reader:
    """What both consumers share: polling without blocking the loop, iteration, the attributes."""

    sync: Any

    async def poll(self, timeout: float = 1.0, max_messages: int = 500) -> list[Message]:
        ready = self.sync.poll(timeout=0, max_messages=max_messages)
        if ready or timeout <= 0:
            return ready
        return await _run(self.sync.poll, timeout, max_messages)

    def __aiter__(self) -> _Reader:
        return self

    async def __anext__(self) -> Message:
        while True:
            msgs = await self.poll(timeout=1.0, max_messages=1)
            if msgs:
                return msgs[0]
            if self.sync._closed:
                raise StopAsyncIteration

    async def __aenter__(self) -> _Reader:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await _run(self.sync.close)

    def assignment(self) -> list[int]:
        return self.sync.assignment()

    def position(self, partition: int) -> int:
        return self.sync.position(partition)

    @property
    def resets(self) -> Any:
        return self.sync.resets

    @property
    def topic(self) -> str:
        return self.sync.topic

    @property
    def group(self) -> str | None:
        return self.sync.group

    @property
    def generation(self) -> int:
        return self.sync.generation

    @property
    def undecodable_batches_skipped(self) -> int:
        return self.sync.undecodable_batches_skipped

    async def seek_to_time(self, when: datetime | int) -> None:
        await _run(self.sync.seek_to_time, when)

    async def seek_to_beginning(self) -> None:
        await _run(self.sync.seek_to_beginning)

    async def seek_to_end(self) -> None:
        await _run(self.sync.seek_to_end)


class Consumer(_Reader):
    def __init__(self, sync: sync_consumer.Consumer) -> None:
        self.sync = sync

    def seek(self, partition: int, offset: int) -> None:
        self.sync.seek(partition, offset)   # no network: it only moves the consumer's cursor

    async def commit(self) -> None:
        self.sync.commit()


class GroupConsumer(_Reader):
    def __init__(self, sync: sync_groups.GroupConsumer) -> None:
        self.sync = sync

    @property
    def member_id(self) -> str:
        return self.sync.member_id

    def caught_up(self) -> bool:
        return self.sync.caught_up()

    async def seek(self, partition: int, offset: int) -> None:
        await _run(self.sync.seek, partition, offset)   # a ResetGroup at the cluster

    async def commit(self, timeout: float = sync_groups.commit_wait_s) -> None:
        await _run(self.sync.commit, timeout)
