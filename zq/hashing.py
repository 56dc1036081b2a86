"""Stable hashes: which partition a key goes to, and which nodes hold a partition.

Key to partition: `crc32(key) mod P`, zlib's CRC-32 (the IEEE polynomial, as in Ethernet and
gzip). It is part of the contract: it never changes between versions, so the same key always
reaches the same partition of a topic whose partition count is unchanged.

Placement: rendezvous (highest random weight) hashing. Each node gets the score
`blake2b(topic/partition/node)`; the replica set is the R nodes with the highest scores, and the
first of them is the preferred leader. Adding a node moves only the partitions it now wins.
"""
from __future__ import annotations

import hashlib
import zlib


def partition_for_key(key: bytes, partitions: int) -> int:
    return (zlib.crc32(key) & 0xFFFFFFFF) % partitions


def _score(topic: str, partition: int, node: str) -> bytes:
    return hashlib.blake2b(f"{topic}/{partition}/{node}".encode(), digest_size=8).digest()


def rendezvous(topic: str, partition: int, nodes: list[str], replicas: int) -> list[str]:
    """The `replicas` nodes that hold `topic/partition`, preferred leader first."""
    if replicas > len(nodes):
        raise ValueError(f"{replicas} replicas asked of {len(nodes)} nodes")
    ranked = sorted(nodes, key=lambda n: (_score(topic, partition, n), n), reverse=True)
    return ranked[:replicas]


def place_topic(topic: str, partitions: int, nodes: list[str], replicas: int) -> list[list[str]]:
    """Replica sets for every partition of a new topic, preferred leader first.

    Rendezvous hashing with load as the first key: each partition takes the `replicas` nodes
    that hold the fewest replicas of this topic so far, ties broken by the partition's
    rendezvous ranking. Plain rendezvous hashing stacks partitions on one node in small
    clusters (8 partitions on 3 nodes can come out 4-3-1); this keeps every node within one
    replica of the others while the hash still decides among equals. Leaders are balanced the
    same way: each partition's leader is the member of its set that leads the fewest so far."""
    if replicas > len(nodes):
        raise ValueError(f"{replicas} replicas asked of {len(nodes)} nodes")
    held = {n: 0 for n in nodes}
    led = {n: 0 for n in nodes}
    out = []
    for p in range(partitions):
        ranked = rendezvous(topic, p, nodes, len(nodes))
        chosen = sorted(ranked, key=lambda n: (held[n], ranked.index(n)))[:replicas]
        chosen.sort(key=ranked.index)
        for n in chosen:
            held[n] += 1
        leader = min(chosen, key=lambda n: (led[n], chosen.index(n)))
        led[leader] += 1
        chosen.remove(leader)
        out.append([leader, *chosen])
    return out
