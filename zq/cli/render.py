"""Pure helpers of the command line: parse what users type, shape what they read.

Nothing here touches the network, the clock or the terminal, so each piece is unit-tested alone.

Consumed messages as JSON (`zq consume`, one object per line):

    {"topic": "orders", "partition": 3, "offset": 41, "timestamp": 1795672800123,
     "key": "order:1", "value": "{\\"status\\": \\"created\\"}", "headers": {"source": "web"},
     "attempt": 1}

`timestamp` is milliseconds since the Unix epoch (UTC). `key` is null for a message without
one. The binary fields, `key`, `value` and every header value, are text when all of them are
valid UTF-8. When any one of them is not, the object carries `"encoding": "base64"` and then
every binary field of that message is standard base64 (RFC 4648, with padding), so a script
checks one field and decodes uniformly. Header names are always text.
"""
from __future__ import annotations

import base64
import dataclasses
import math
import re
from datetime import datetime
from typing import Any, Iterable, Sequence

from zq.errors import InvalidRequest

ACKS_CHOICES = ("none", "leader", "quorum")


def parse_header(text: str) -> tuple[str, bytes]:
    """"source=web" -> ("source", b"web"). The name may not be empty; the value may."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise InvalidRequest(f"header {text!r} is not NAME=VALUE")
    return name, value.encode()


def parse_start(text: str) -> str | int | datetime:
    """--from: "earliest", "latest", an offset, or an ISO-8601 time (without a zone: local time)."""
    word = text.strip().lower()
    if word in ("earliest", "latest"):
        return word
    if re.fullmatch(r"\d+", word):
        return int(word)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"--from {text!r} is not earliest, latest, an offset or an ISO-8601 time "
                             "such as 2026-11-27T10:00:00Z") from None
    return when if when.tzinfo else when.astimezone()


def split_key(line: bytes, separator: bytes | None, line_number: int) -> tuple[bytes | None, bytes]:
    """A stdin line -> (key, value); with a separator the line must hold it."""
    if separator is None:
        return None, line
    key, sep, value = line.partition(separator)
    if not sep:
        raise InvalidRequest(f"line {line_number} of stdin has no key separator {separator.decode(errors='replace')!r}")
    return key, value


# --------------------------------------------------------------------------------------------
# Output


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8")


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _as_bytes(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"expected bytes, got {type(value).__name__}")


def timestamp_ms(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    return int(value)


def message_json(msg: Any, topic: str | None = None) -> dict[str, Any]:
    """A consumed message as the JSON object of `zq consume` (see the module docstring)."""
    key = _as_bytes(getattr(msg, "key", None))
    value = _as_bytes(getattr(msg, "value", None))
    headers = {str(k): _as_bytes(v) for k, v in (getattr(msg, "headers", None) or {}).items()}
    try:
        fields = (_text(key), _text(value), {k: _text(v) for k, v in headers.items()})
        encoding = None
    except UnicodeDecodeError:
        fields = (_b64(key), _b64(value), {k: _b64(v) for k, v in headers.items()})
        encoding = "base64"
    out: dict[str, Any] = {
        "topic": getattr(msg, "topic", None) or topic,
        "partition": msg.partition,
        "offset": msg.offset,
        "timestamp": timestamp_ms(getattr(msg, "timestamp", None)),
        "key": fields[0],
        "value": fields[1],
        "headers": fields[2],
        "attempt": getattr(msg, "attempt", 1),
    }
    if encoding:
        out["encoding"] = encoding
    return out


def as_dict(obj: Any) -> Any:
    """A client result (dict, dataclass, NamedTuple, list of those) as plain JSON-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return {k: as_dict(v) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {str(k): as_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence; None when it is empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def ago(last_seen_ms: Any) -> str:
    """"3 s ago" from a status document's last_seen_ms (milliseconds since the node was last heard)."""
    if last_seen_ms is None:
        return "-"
    seconds = max(0.0, int(last_seen_ms) / 1000)
    return "now" if seconds < 1 else f"{seconds:.0f} s ago"


def fmt_rate(per_s: float | None) -> str:
    if per_s is None:
        return "-"
    for factor, unit in ((1e6, "M"), (1e3, "k")):
        if per_s >= factor:
            return f"{per_s / factor:.1f} {unit}"
    return f"{per_s:.0f}"


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} µs" if value < 1 else f"{value:.2f} ms"


def join(values: Iterable[Any]) -> str:
    return ",".join(str(v) for v in values) if values is not None else "-"


# --------------------------------------------------------------------------------------------
# Tables (rich renderables; built from the JSON shapes, so the table and --json never disagree)

NODE_COLUMNS = ("name", "address", "state", "last seen")
PARTITION_COLUMNS = ("topic", "partition", "leader", "epoch", "replicas", "in-sync", "log start", "log end",
                     "high watermark", "lag")
TABLE_ROWS_MAX = 200  # rows a table shows before "... and N more": a terminal, not a report


def nodes_table(nodes: list[dict], extra: dict[str, dict[str, str]] | None = None):
    from rich.table import Table

    extra = extra or {}
    extra_columns = sorted({c for row in extra.values() for c in row})
    table = Table(title="nodes", title_justify="left")
    for column in (*NODE_COLUMNS, *extra_columns):
        table.add_column(column)
    style = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}
    for node in sorted(nodes, key=lambda n: str(n.get("name"))):
        state = str(node.get("state", "?"))
        row = [str(node.get("name")), str(node.get("address", "-")), f"[{style.get(state, '')}]{state}[/]"
               if state in style else state, ago(node.get("last_seen_ms"))]
        row += [extra.get(str(node.get("name")), {}).get(c, "") for c in extra_columns]
        table.add_row(*row)
    return table


def partitions_table(partitions: list[dict], rows_max: int = TABLE_ROWS_MAX, title: str = "partitions"):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, column in enumerate(PARTITION_COLUMNS):
        table.add_column(column, justify="right" if i in (1, 3, 6, 7, 8, 9) else "left")
    ordered = sorted(partitions, key=lambda p: (str(p.get("topic")), int(p.get("partition", 0))))
    for p in ordered[:rows_max]:
        in_sync = join(p.get("in_sync") or [])
        if not p.get("leader"):
            in_sync = f"[red]{in_sync or 'no leader'}[/]"
        elif under_replicated(p):
            in_sync = f"[yellow]{in_sync}[/]"
        replicas = join(p.get("replicas") or [])
        if moving(p):
            learners = p.get("learners") or []
            replicas += f" [cyan]-> {join(p.get('target') or [])}[/]" + (
                f" [cyan](catching up: {join(learners)})[/]" if learners else "")
        table.add_row(str(p.get("topic")), str(p.get("partition")), cell(p.get("leader")),
                      cell(p.get("epoch")), replicas, in_sync,
                      cell(p.get("log_start")), cell(p.get("log_end")),
                      cell(p.get("high_watermark")), cell(p.get("replication_lag")))
    notes = []
    short = sum(under_replicated(p) for p in ordered)
    if short:
        notes.append(f"{short} partition(s) under-replicated (in-sync set smaller than the replica set)")
    moves = sum(moving(p) for p in ordered)
    if moves:
        notes.append(f"{moves} partition(s) moving to a new replica set (zq topic reassign)")
    if len(ordered) > rows_max:
        notes.append(f"... and {len(ordered) - rows_max} more partitions (zq status --json shows all)")
    if notes:
        table.caption = "; ".join(notes)
    return table


def cell(value: Any) -> str:
    """A table cell: '-' where nothing is known (a leader that did not answer), not 'None'."""
    return "-" if value is None or value == "" else str(value)


def moving(p: dict) -> bool:
    """A reassignment is under way: the replica set is not yet the target."""
    target = p.get("target")
    return bool(target) and sorted(target) != sorted(p.get("replicas") or [])


def under_replicated(p: dict) -> bool:
    return len(p.get("in_sync") or []) < len(p.get("replicas") or [])


def topics_table(topics: list[dict]):
    from rich.table import Table

    table = Table(title="topics", title_justify="left")
    for column in ("name", "partitions", "replication", "config"):
        table.add_column(column)
    for t in sorted(topics, key=lambda t: str(t.get("name"))):
        config = ", ".join(f"{k}={v}" for k, v in sorted((t.get("config") or {}).items()) if v not in (None, False))
        table.add_row(str(t.get("name")), str(t.get("partitions")), str(t.get("replication")), config)
    return table


def topic_summary(described: dict) -> dict:
    """{name, partitions: count, replication, config} from a describe_topic document."""
    parts = described.get("partitions") or []
    replication = max((len(p.get("replicas") or []) for p in parts), default=0)
    return {"name": described.get("name"), "partitions": len(parts), "replication": replication,
            "config": described.get("config") or {}}

