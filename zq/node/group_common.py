"""The consumer groups service's shared vocabulary (zq/node/groups.py tells how the service works):
its timings and bounds, the key of a (group, partition) delivery state and its stored form, the
records of a parked lease and of a new leader's majority read, and the state the service's rooms
share (`GroupServiceState`, which `zq.node.groups.GroupService` fills in).

This module loads only the standard library (the CBOR codec stays in zq.protocol, loaded at first use).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Callable

from zq import protocol as P
from zq import group_protocol as G
from zq.core.grouplead import PartitionLead
from zq.core.groups import GroupMembership
from zq.core.retry import RetryPolicy
from zq.errors import InvalidRequest, ProtocolError
from zq.limits import DEFAULT
from zq.node.services import ServiceHost

log = logging.getLogger("zq.groups")   # one logger for the whole service, whichever room logs

# Timing.
membership_gossip_ms = 500        # every node sends its copies of every group this often
membership_gossip_ms_min = 20     # ... and after a change, but not more often than this
state_gossip_ms = 200             # a leader sends the delivery states it changed to their replicas
sweep_ms = 100                    # lease expiry, departed members' leases, dead letters
persist_ms = 100                  # changed states are written this often (at once when a redelivery waits on it)
unknown_member_ms = 3 * membership_gossip_ms   # a member no copy here knows for this long is fenced
unknown_members_max = 10_000      # (group, member) pairs this node tracks as unknown
describe_wait_ms = 400            # how long `zq groups` waits for other nodes' rows
gather_wait_ms = 300              # a new leader asks a replica that has not answered its pull again after this
reset_wait_ms = 3_000             # how long a forwarded reset waits for a partition leader
dead_letter_wait_ms = 5_000       # a dead-letter copy sent to another node, unanswered by then, is tried again
# Bounds.
groups_max = 10_000               # groups one node keeps
states_max = 100_000              # delivery states one node keeps in memory
parked_leases_max = 10_000        # long-poll leases waiting at once
batch_cache_max = 64              # partitions whose last stored batch read for a lease is kept (~0.5 MiB each)
lease_read_bytes = 256 * 1024     # stored batches read from the store at a time for a lease
undecodable_logged_max = 1_000    # undecodable stored batches remembered as logged (one line each)
lease_messages_max = 5_000        # messages one lease may hand out
lease_bytes_max = 4 * 1024 * 1024  # stored batches one lease reply carries (one batch always fits)
lease_wait_ms_max = 30_000
session_timeout_ms_min, session_timeout_ms_max = 200, 30 * 60_000
ack_items_max = 100_000           # acked + nacks + extends in one Ack
gossip_items_per_message_max = 256

STATE_KEY_PREFIX = b"group/"      # store meta keys: STATE_KEY_PREFIX + CBOR [group, topic_id, partition]


def state_key(group: str, topic_id: int, partition: int) -> bytes:
    return STATE_KEY_PREFIX + _dumps([group, topic_id, partition])


Key = tuple[str, int, int]   # (group, topic id, partition)


_Held = PartitionLead   # the leader-side rules of one (group, partition): zq.core.grouplead


@dataclass(slots=True)
class _Gather:
    """A new leader's majority read of one partition's group states."""
    epoch: int                    # the leader epoch it is for
    replicas: list[str]
    replied: set[str]
    asked_ms: int


@dataclass(slots=True)
class _Parked:
    deadline_ms: int
    identity: bytes
    msg: G.Lease
    key: Key
    done: bool = False


class GroupServiceState:
    """What the service's rooms (zq/node/group_*.py) share: one GroupService object holds it all, so
    each room reads and changes it as `self.<name>` (set in `GroupService.__init__`) and calls the
    other rooms' methods through `self` too (a lease checks the member, then the majority read)."""
    host: ServiceHost
    memberships: dict[str, GroupMembership]          # group -> this node's copy of its membership
    held: dict[Key, _Held]                           # delivery states this node keeps
    parked: list[_Parked]                            # long-poll leases waiting
    rng: random.Random                               # retry jitter: the host's randomness
    boot: int                                        # names this start of the node in state acks
    _policies: dict[int, tuple[tuple, RetryPolicy]]
    _next_sweep_ms: int
    _next_gossip_ms: int
    _next_state_gossip_ms: int
    _next_persist_ms: int
    _batches: dict[tuple[int, int], tuple[int, int, bytes]]
    _undecodable_logged: set[tuple[int, int, int]]
    _last_gossip_ms: int
    _gossip_soon: bool
    _failed: set[Key]
    _unknown_since: dict[tuple[str, str], int]
    _gathered: dict[tuple[int, int], int]
    _gathering: dict[tuple[int, int], _Gather]
    _own_pending: list[tuple[Key, int]]
    _acks_pending: dict[tuple[str, int], list[list]]
    handlers: dict[type, Callable[[bytes, Any, list], None]]


def _check_name(value: Any, what: str) -> None:
    chars_max = DEFAULT.group_name_chars_max   # the bound the wire check (zq.core.bounds) also reads
    if not isinstance(value, str) or not value or len(value) > chars_max:
        raise InvalidRequest(f"a {what} is a non-empty string of at most {chars_max} characters")


def _dumps(value: Any) -> bytes:
    return P.cbor_dumps(value)   # the codec stays in zq.protocol (cbor2, loaded at first use)


def _loads(frame: bytes) -> Any:
    try:
        return P.cbor_loads(bytes(frame))
    except Exception as e:   # cbor2 raises several types for garbage
        raise ProtocolError(f"a group frame is not valid CBOR ({e.__class__.__name__})") from None


def _encode_held(held: _Held) -> bytes:
    return _dumps(held.to_dict())


def _decode_held(raw: bytes) -> _Held:
    return _Held.from_dict(_loads(raw))
