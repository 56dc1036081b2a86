"""`zq groups`, `zq replay`, `zq dlq list` and `zq dlq redrive`: consumer groups at the terminal.

Each command calls zq.client.groups and formats the answer: a table, or one JSON document with
--json. Errors are handled by zq.cli.app.main (one sentence, an exit code)."""
from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from zq.cli import render
from zq.cli.options import Bootstrap, Cluster, Json, UsageProblem, _client, _console, _print_json

LIST_MAX_DEFAULT = 1_000   # dead letters `zq dlq list` shows unless --max says otherwise
ERROR_CHARS_MAX = 80       # last error text in a table cell


def groups(group: Annotated[Optional[str], typer.Argument(help="Only this group.")] = None,
           bootstrap: Bootstrap = None, cluster: Cluster = "zq", json_out: Json = False) -> None:
    """Consumer groups: members, assignment, generation; per partition the committed offset, lag
    (messages and seconds), in flight, retrying and dead-lettered."""
    from zq.client.groups import describe_groups
    with _client(bootstrap, cluster) as client:
        doc = describe_groups(client, group)
    if group is not None and not doc["groups"]:
        raise UsageProblem(f"no group {group!r} is known to the cluster (it has no members and no state)")
    if json_out:
        _print_json(doc)
        return
    console = _console()
    if not doc["groups"]:
        console.print("no consumer groups")
    for g in doc["groups"]:
        console.print(groups_summary(g))
        console.print(group_table(g))


def groups_summary(g: dict) -> str:
    members = g.get("members") or []
    lines = [f"group {g['group']}: generation {g['generation']}, {len(members)} member{'s' * (len(members) != 1)}"]
    for m in members:
        parts = ", ".join(f"{p['topic']}/{p['partition']}" for p in m.get("partitions") or []) or "nothing"
        lines.append(f"  {m['id']}: {parts}")
    return "\n".join(lines)


def group_table(g: dict):
    from rich.table import Table
    table = Table(title=f"{g['group']} partitions")
    for column in ("topic", "partition", "committed", "lag", "lag s", "in flight", "retrying", "dead-lettered"):
        table.add_column(column, justify="left" if column == "topic" else "right")
    for p in g.get("partitions") or []:
        table.add_row(*[_cell(p.get(k)) for k in ("topic", "partition", "committed", "lag", "lag_seconds",
                                                   "in_flight", "retrying", "dead_lettered")])
    return table


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def replay(topic: Annotated[str, typer.Argument(help="Topic the group reads.")],
           group: Annotated[str, typer.Option("--group", help="The group to move.")],
           to_offset: Annotated[Optional[int], typer.Option("--to-offset", min=0, help="Move to this offset.")] = None,
           partition: Annotated[Optional[int], typer.Option("--partition", min=0,
                                                            help="With --to-offset: only this partition.")] = None,
           to_time: Annotated[Optional[str], typer.Option("--to-time", metavar="TIME",
                                                          help="Move to the first message at or after an "
                                                               "ISO-8601 time (no zone: local time).")] = None,
           to_earliest: Annotated[bool, typer.Option("--to-earliest", help="Move to the oldest retained message.")] = False,
           bootstrap: Bootstrap = None, cluster: Cluster = "zq", json_out: Json = False) -> None:
    """Move a group back (or forward) on TOPIC: its members receive again from there."""
    from datetime import datetime

    from zq.client.groups import reset_group
    if (to_offset is not None) + (to_time is not None) + to_earliest != 1:
        raise UsageProblem("give exactly one of --to-offset, --to-time and --to-earliest")
    if partition is not None and to_offset is None:
        raise UsageProblem("--partition goes with --to-offset")
    when = None
    if to_time is not None:
        when = render.parse_start(to_time)
        if not isinstance(when, datetime):
            raise UsageProblem(f"--to-time {to_time!r} is not an ISO-8601 time such as 2026-11-27T10:00:00Z")
    with _client(bootstrap, cluster) as client:
        if to_offset is not None and partition is None and len(client.cluster_view.partitions_of(topic)) > 1:
            raise UsageProblem(f"{topic} has several partitions: give --partition with --to-offset")
        result = reset_group(client, topic, group, partition=partition if partition is not None else
                             (0 if to_offset is not None else None), to_offset=to_offset, to_time=when,
                             earliest=to_earliest)
    if json_out:
        _print_json(result)
        return
    for p in result.get("partitions") or []:
        print(f"group {group} on {topic}/{p['partition']} now starts at offset {p['offset']}")


def dlq_list(topic: Annotated[str, typer.Argument(help="The topic whose dead letters to show (or TOPIC.dlq).")],
             max_messages: Annotated[int, typer.Option("--max", min=1, help="Show at most N.")] = LIST_MAX_DEFAULT,
             bootstrap: Bootstrap = None, cluster: Cluster = "zq", json_out: Json = False) -> None:
    """Dead letters of TOPIC with their source, attempts and last error."""
    from zq.client.groups import dead_letters
    with _client(bootstrap, cluster) as client:
        messages = dead_letters(client, topic, max_messages)
    rows = [dead_letter_row(m) for m in messages]
    if json_out:
        _print_json({"topic": topic, "dead_letters": rows})
        return
    from rich.table import Table
    table = Table(title=f"dead letters of {topic.removesuffix('.dlq')}")
    for column in ("dlq partition", "dlq offset", "source", "attempts", "last error", "value"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r["partition"]), str(r["offset"]),
                      f"{r['source_topic']}/{r['source_partition']}@{r['source_offset']}", _cell(r["attempts"]),
                      (r["last_error"] or "")[:ERROR_CHARS_MAX], str(r["value"])[:40])
    _console().print(table)


def dead_letter_row(msg: Any) -> dict:
    h = msg.headers

    def text(name: str) -> str | None:
        v = h.get(name)
        return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else v

    def number(name: str) -> int | None:
        try:
            return int(text(name) or "")
        except ValueError:
            return None
    row = render.message_json(msg, msg.topic)
    row.update({"source_topic": text("zq-source-topic"), "source_partition": number("zq-source-partition"),
                "source_offset": number("zq-source-offset"), "attempts": number("zq-attempts"),
                "last_error": text("zq-last-error"), "first_failure_ms": number("zq-first-failure-ms"),
                "last_failure_ms": number("zq-last-failure-ms")})
    return row


def dlq_redrive(topic: Annotated[str, typer.Argument(help="The topic whose dead letters go back to it.")],
                max_messages: Annotated[Optional[int], typer.Option("--max", min=1, help="Redrive at most N.")] = None,
                rate: Annotated[float, typer.Option("--rate", min=1, help="At most this many msg/s.")] = 1_000,
                bootstrap: Bootstrap = None, cluster: Cluster = "zq", json_out: Json = False) -> None:
    """Publish dead letters back to TOPIC (to the partition they came from); each is redriven once."""
    from zq.client.groups import redrive
    with _client(bootstrap, cluster) as client:
        done = redrive(client, topic, max_messages, rate)
    source = topic.removesuffix(".dlq")
    if json_out:
        _print_json({"topic": source, "redriven": done})
        return
    print(f"redrove {len(done)} dead letter{'s' * (len(done) != 1)} to {source}")

