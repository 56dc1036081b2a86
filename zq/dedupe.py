"""The consumer half of effectively-once delivery: drop a message whose id was seen recently.

zq delivers at least once: a message is redelivered when its lease expires, when a consumer
crashes before its ack reached the node, or when a rebalance moves its partition. Effectively
once is built from two halves:

1. the producer is idempotent (`client.producer(idempotent=True)`), so a retried send is not
   appended twice: the partition leader drops a batch it has already appended;
2. the producer sets a `zq-message-id` header (`zq produce --id ID`, or
   `headers={"zq-message-id": ...}`), and the consumer skips ids it has already handled:

       dedupe = Deduper(capacity=100_000)
       for msg in consumer:
           if not dedupe.seen(msg.headers["zq-message-id"]):
               handle(msg)
           msg.ack()

`Deduper` remembers the last `capacity` ids (least recently seen forgotten first), so memory is
bounded; a duplicate that arrives after more than `capacity` other ids is not caught. Size it for
the number of messages that can be redelivered: the consumer's in-flight window plus what a
rebalance can hand back. It lives in one process; for dedupe that survives a restart, record the
ids in the same transaction as the effect of handling the message.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class Deduper:
    capacity_default = 100_000   # ids remembered when no capacity is given

    def __init__(self, capacity: int = capacity_default) -> None:
        if capacity < 1:
            raise ValueError(f"Deduper capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._ids: OrderedDict[Hashable, None] = OrderedDict()

    def seen(self, message_id: Hashable) -> bool:
        """True if `message_id` was seen among the last `capacity` ids; remembers it either way."""
        if message_id in self._ids:
            self._ids.move_to_end(message_id)   # a repeat keeps the id fresh: it is still in play
            return True
        self._ids[message_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return False

    def forget(self, message_id: Hashable) -> None:
        """Forget an id, e.g. when handling it failed and a redelivery must be processed."""
        self._ids.pop(message_id, None)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids
