"""Typed ids, so that a signature says what an int means."""
from __future__ import annotations

from typing import NamedTuple, NewType

NodeId = NewType("NodeId", str)
TopicId = NewType("TopicId", int)
PartitionId = NewType("PartitionId", int)
Offset = NewType("Offset", int)
Epoch = NewType("Epoch", int)
Generation = NewType("Generation", int)
ProducerId = NewType("ProducerId", int)


class TopicPartition(NamedTuple):
    """A partition as the store and the node address it: numeric topic id and partition index.

    Topic ids are assigned by the metadata log and never reused, so a topic deleted and created
    again under the same name does not see the old data."""

    topic_id: int
    partition: int


META_TOPIC = "__meta"
META_TOPIC_ID = 0
META_TP = TopicPartition(META_TOPIC_ID, 0)
