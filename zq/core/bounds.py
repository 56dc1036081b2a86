"""Field bounds of wire messages: the values a peer may send, declared next to each message.

Theory of operation
-------------------
Decoding (zq.protocol.from_array) checks a field's *type*; these bounds check its *value*, before
the message reaches a core, the store or a reply. Each message class declares `BOUNDS`, a map of
field name to a check made from the few constructors below (an integer range, a name pattern,
a list length, an optional value). `check_message(msg)` runs them all and raises InvalidRequest
naming the first field out of range. The node (from_array, and the replication core's `step`)
and the simulator call this one function, so no rule exists twice.

The ranges are the widths things are stored in, not what a healthy cluster reaches: an epoch is
4 bytes in a stored batch header (zq.batch), so a peer's epoch must leave room for the elections
after it; an offset is 8 bytes (and Python's int must never exceed what RocksDB keys hold); a
sequence is 4 bytes and wraps at 2**31 like Kafka's; a time is milliseconds since 1970 below
2**53 (the integers a double holds exactly, about 285,000 years). Names are matched whole
(`re.fullmatch`), so a trailing newline or a control character never passes.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from zq.errors import InvalidRequest
from zq.limits import DEFAULT

# ---------------------------------------------------------------------------- widths

U32_MAX = 2**32 - 1
EPOCH_MAX = 2**31 - 1            # stored in 4 bytes (batch header); half of it, so elections after a
                                 # peer's largest epoch still fit
OFFSET_MAX = 2**63 - 1           # stored in 8 bytes (batch header, store keys)
SEQUENCE_MAX = 2**31 - 1         # producer's base_sequence: 4 bytes, wraps at 2**31
PRODUCER_ID_MAX = 2**63 - 1      # 8 bytes; 0 on the wire (-1 in the core) means not idempotent
TIME_MS_MAX = 2**53              # ms since 1970; also incarnations (a node's start time)
DURATION_MS_MAX = 2**31 - 1      # a wait, a lease, a timeout asked for (the node clamps to its own bounds)
SIZE_BYTES_MAX = 2**31 - 1       # a byte budget asked for (the node clamps to fetch_bytes_max)
REQ_ID_MAX = 2**63 - 1
SEQ_MAX = 2**63 - 1              # membership probe sequence numbers
COUNT_MAX = DEFAULT.batch_records_max     # records in one batch
LIST_ITEMS_MAX = 100_000         # items in any list field not bounded tighter
NAME_CHARS_MAX = 128             # node names (zq.topology allows 63)
GROUP_CHARS_MAX = DEFAULT.group_name_chars_max   # group names and member ids
ADDRESS_CHARS_MAX = 256          # "host:port"
TEXT_CHARS_MAX = 4_096           # free text (an error message, a nack reason)

# Topic names: 1-200 of A-Z a-z 0-9 . _ -, but never "." or ".." (they read as paths).
TOPIC_NAME = re.compile(rf"(?!\.\.?\Z)[A-Za-z0-9._-]{{1,{DEFAULT.topic_name_chars_max}}}")
# Node names, as zq.topology allows them: a letter or digit first.
NODE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_CHARS_MAX - 1}}}")
# Group names and member ids: printable, no control characters.
GROUP_NAME = re.compile(rf"[^\x00-\x1f\x7f]{{1,{GROUP_CHARS_MAX}}}")
MEMBER_ID = re.compile(rf"[^\x00-\x1f\x7f]{{0,{GROUP_CHARS_MAX}}}")
HOST = re.compile(r"\[[0-9A-Fa-f:.%]{2,64}\]|[A-Za-z0-9._-]{1,253}")   # a name, an IPv4 or a bracketed IPv6
ADDRESS = re.compile(r"(?:\[[0-9A-Fa-f:.%]{2,64}\]|[A-Za-z0-9._-]{1,253}):(?P<port>[0-9]{1,5})")   # host:port

Check = Callable[[Any], "str | None"]   # a problem, said as the end of a sentence; None: fine


# ---------------------------------------------------------------------------- checks


def int_range(lo: int, hi: int) -> Check:
    def check(v: Any) -> str | None:
        if type(v) is int and lo <= v <= hi:   # type(), not isinstance: a bool is no integer here
            return None
        return f"must be an integer from {lo} to {hi}, got {v!r:.40}"
    return check


def name(pattern: re.Pattern, what: str) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, str) or pattern.fullmatch(v) is None:
            return f"is not a valid {what}: {v!r:.60}"
        return None
    return check


def optional(inner: Check) -> Check:
    return lambda v: None if v is None else inner(v)


def either(*checks: Check) -> Check:
    def check(v: Any) -> str | None:
        problems = [c(v) for c in checks]
        return None if any(p is None for p in problems) else " or ".join(p for p in problems if p)
    return check


def one_of(*values: Any) -> Check:
    return lambda v: None if any(type(v) is type(x) and v == x for x in values) else f"must be one of {values}, got {v!r:.40}"


def list_of(items_max: int, item: Check | None = None) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, (list, tuple)) or len(v) > items_max:
            return f"must be a list of at most {items_max} items"
        if item is not None:
            for i, x in enumerate(v):
                problem = item(x)
                if problem is not None:
                    return f"item {i} {problem}"
        return None
    return check


def tuple_of(*fields: Check) -> Check:
    """A fixed-length list whose items each pass their own check."""
    def check(v: Any) -> str | None:
        if not isinstance(v, (list, tuple)) or len(v) != len(fields):
            return f"must be a list of {len(fields)} fields"
        for i, (c, x) in enumerate(zip(fields, v)):
            problem = c(x)
            if problem is not None:
                return f"field {i} {problem}"
        return None
    return check


def map_of(items_max: int) -> Check:
    return lambda v: None if isinstance(v, dict) and len(v) <= items_max else f"must be a map of at most {items_max} keys"


def text(chars_max: int = TEXT_CHARS_MAX) -> Check:
    """Free text (a reason, a message): any string up to `chars_max` characters."""
    return lambda v: None if isinstance(v, str) and len(v) <= chars_max else f"must be text of at most {chars_max} characters"


def blob(v: Any) -> str | None:
    return None if isinstance(v, (bytes, bytearray, memoryview)) else f"must be bytes, got {type(v).__name__}"


def boolean(v: Any) -> str | None:
    return None if type(v) is bool else f"must be true or false, got {v!r:.40}"


# Shorthands for the fields most messages have.
REQ_ID = int_range(0, REQ_ID_MAX)
EPOCH = int_range(0, EPOCH_MAX)
OFFSET = int_range(0, OFFSET_MAX)
COUNT = int_range(1, COUNT_MAX)
TIME_MS = int_range(0, TIME_MS_MAX)
DURATION_MS = int_range(0, DURATION_MS_MAX)
PARTITION = int_range(0, DEFAULT.partitions_per_topic_max - 1)
TOPIC_ID = int_range(0, U32_MAX)        # 4 bytes in the PUB topic frame
TOPIC: Check = lambda v: check_topic_name(v)  # noqa: E731 (the one rule, below)
NODE = name(NODE_NAME, f"node name (1-{NAME_CHARS_MAX} of A-Z a-z 0-9 . _ -, a letter or digit first)")
NODES = list_of(DEFAULT.replication_max * 4, NODE)
GROUP = name(GROUP_NAME, f"group name (1-{GROUP_CHARS_MAX} characters, no control characters)")
MEMBER = name(MEMBER_ID, f"member id (at most {GROUP_CHARS_MAX} characters, no control characters)")


def _address(v: Any) -> str | None:
    m = ADDRESS.fullmatch(v) if isinstance(v, str) and len(v) <= ADDRESS_CHARS_MAX else None
    if m is None or not 1 <= int(m["port"]) <= 65_535:
        return f"is not an address host:port (port 1-65535): {v!r:.60}"
    return None


ADDRESS_F: Check = _address


def check_fields(cls_name: str, bounds: dict[str, Check], values: Any) -> None:
    """Raise InvalidRequest naming the first field of `values` (an object) out of its bounds."""
    for field, check in bounds.items():
        problem = check(getattr(values, field))
        if problem is not None:
            raise InvalidRequest(f"{cls_name}.{field}: {problem}; see docs/protocol.md for the bounds")


def check_message(msg: Any) -> None:
    """Every declared bound of a message; a class without BOUNDS has none to check."""
    bounds = getattr(type(msg), "BOUNDS", None)
    if bounds:
        check_fields(type(msg).__name__, bounds, msg)


def check_topic_name(value: Any, *, chars_max: int = DEFAULT.topic_name_chars_max) -> str | None:
    """The one topic-name rule (zq.core.metadata and the wire use it): a problem, or None."""
    if not isinstance(value, str) or TOPIC_NAME.fullmatch(value) is None or len(value) > chars_max:
        return (f"topic name {value!r:.80} is not valid: use 1 to {chars_max} of the characters "
                "A-Z a-z 0-9 . _ - (not '.' or '..')")
    return None
