"""The Python client: `Client` (admin and metadata), its `Producer` and `Consumer`.

All sockets of one Client live on one I/O thread (zq.client.connection); producers and
consumers hand it work. See each module's theory of operation.
"""
from zq.client.client import Client, Offsets
from zq.client.consumer import Consumer, Message, OffsetReset
from zq.client.producer import Producer, RecordMetadata

__all__ = ["Client", "Consumer", "Message", "OffsetReset", "Offsets", "Producer", "RecordMetadata"]
