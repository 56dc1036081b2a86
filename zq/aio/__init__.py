"""The asyncio twin of zq.client: `zq.aio.Client`, with the same names as the sync API."""
from zq.aio.client import Client, Consumer, GroupConsumer, Producer
from zq.client import Message, RecordMetadata

__all__ = ["Client", "Consumer", "GroupConsumer", "Message", "Producer", "RecordMetadata"]
