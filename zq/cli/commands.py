"""The `zq` commands: each reads its options, calls zq.Client (or the node, or the
supervisor) and formats the answer. Decisions about data live in the client and the node; this
module only translates between a terminal and them.

Exit codes (the same for every command):

    0    done
    1    the cluster or the machine failed us: connection, timeout, I/O, a node that died
    2    the request was wrong: a usage mistake, a bad topology file, or a request the cluster
         refused (zq.errors.Rejected: unknown topic, topic exists, message too large, ...)
    130  interrupted (Ctrl-C)

Every error is one sentence on stderr, `zq: error: ...`, never a traceback (set ZQ_DEBUG=1 to see
the traceback of an unexpected one).

The commands are plain functions: zq.cli.app makes the typer app and registers them (and those of
zq.cli.groups and zq.cli.keys); zq.cli.options holds what every command shares.
"""
from __future__ import annotations

import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from zq import errors
from zq.cli import render
# _client is looked up here when a command runs: tests patch zq.cli.commands._client, and zq.cli.bench imports it.
from zq.cli.options import (Bootstrap, Cluster, Json, UsageProblem, _client, _console, _print_json,
                            _quiet_stdout)

DEFAULT_TOPOLOGY = Path("topologies/local.toml")
PRODUCE_INFLIGHT_MAX = 10_000     # stdin messages sent and not yet printed; bounds memory on a large pipe
CONSUME_POLL_MS_MAX = 1_000       # one poll of `zq consume`; bounds how late --timeout and Ctrl-C act
CONSUME_BATCH_MAX = 500           # messages one poll hands over

# --------------------------------------------------------------------------------------------
# zq up, zq node start


def up(topology: Annotated[Path, typer.Argument(help="Topology file.")] = DEFAULT_TOPOLOGY,
       json_out: Annotated[bool, typer.Option("--json", help="Print events as JSON lines "
                                                                "{time_ms, event} instead of the view.")] = False) -> None:
    """Start every node that TOPOLOGY places on this host, in the foreground, with a live status view.

    Creates the topology's topics once the cluster answers. Ctrl-C or SIGTERM stops every node
    (SIGTERM, a bounded wait, then SIGKILL). Node logs go to DATA_DIR/NODE/node.log. Exits 1 if
    a node died on its own. Without a terminal, events are printed as lines instead of the view."""
    from zq.cli.up import run_up
    raise typer.Exit(run_up(topology, json_lines=json_out))


def node_start(
    name: Annotated[str, typer.Option("--name", help="This node's name (unique in the cluster).")],
    topology: Annotated[Optional[Path], typer.Option("--topology", help="Take address, ports, seeds and data "
                                                     "folder from this node's entry in the topology file.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="This node's own data folder "
                                                     "(default: the topology's data_dir/NAME, else ./data/NAME).")] = None,
    bind: Annotated[Optional[str], typer.Option("--bind", help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="First of the node's ten ports (default 7100).")] = None,
    seed: Annotated[Optional[list[str]], typer.Option("--seed", metavar="HOST:PORT",
                                                      help="Another node to contact; repeat for more.")] = None,
    cluster: Annotated[Optional[str], typer.Option("--cluster", envvar="ZQ_CLUSTER",
                                                   help="Cluster name (default: the topology's, else zq).")] = None,
    no_discovery: Annotated[bool, typer.Option("--no-discovery", help="Do not use zeroconf; seeds only.")] = False,
    service: Annotated[Optional[list[str]], typer.Option("--service", metavar="MODULE", hidden=True,
                                                         help="Also install this service module.")] = None,
) -> None:
    """Run one node in the foreground until SIGTERM or Ctrl-C."""
    from zq.io.node import run_node
    config = build_node_config(name, topology, data_dir, bind, port, seed or [], cluster, no_discovery,
                               services=service or [])
    run_node(config)


def node_drain(
    name: Annotated[str, typer.Argument(help="The node to drain.")],
    leave: Annotated[bool, typer.Option("--leave/--stay", help="Then leave the cluster and stop the node.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", min=0.0, help="Longest wait for leadership to move, "
                                           "in seconds.")] = 10.0,
    bootstrap: Bootstrap = None, cluster: Cluster = "zq", json_out: Json = False,
) -> None:
    """Hand every partition NAME leads to another in-sync replica, stop it standing for election,
    then (by default) let it leave the cluster and stop. Its replicas stay where they are: move
    them with `zq topic reassign` if the node is not coming back."""
    with _client(bootstrap, cluster) as client:
        result = client.drain_node(name, wait_s=timeout, leave=leave)
    if json_out:
        _print_json(result)
        return
    print(f"{name}: led {result['led_before']} partition(s) with another voter, now leads {result['led_after']}"
          + (" and is leaving the cluster" if result.get("leaving") else ""))
    if result["led_after"]:
        print(f"  still leading {', '.join(result.get('still_leading') or [])}: no other in-sync replica took "
              "over in time (see `zq status`)")
        raise typer.Exit(1)


def build_node_config(name: str, topology_path: Path | None, data_dir: Path | None, bind: str | None,
                      port: int | None, seeds: list[str], cluster: str | None, no_discovery: bool = False,
                      services: list[str] = ()):
    """The NodeConfig of `zq node start`: the topology's entry, then the command line over it.

    `services` (hidden `--service MODULE`) are installed on top of the node's default services."""
    from zq.io.node import NodeConfig
    for s in seeds:
        _check_address(s, "--seed")
    extra: dict[str, Any] = {}
    if services:
        extra["services"] = tuple(dict.fromkeys([*NodeConfig.__dataclass_fields__["services"].default, *services]))
    if topology_path is None:
        return NodeConfig(name=name, host=bind or "127.0.0.1", port=port or 7100,
                          data_dir=data_dir or Path("data") / name, cluster=cluster or "zq",
                          seeds=tuple(seeds), discovery=not no_discovery, **extra)
    from zq.topology import load_topology
    topo = load_topology(topology_path)
    spec = topo.node(name)   # TopologyError naming the file and the nodes it has
    all_seeds = list(dict.fromkeys([*seeds, *topo.seeds_for(name)]))
    return NodeConfig(name=name, host=bind or spec.host, port=port or spec.port,
                      data_dir=data_dir or topo.node_data_dir(name), cluster=cluster or topo.cluster.name,
                      seeds=tuple(all_seeds), voters=tuple(topo.cluster.voters), topology=topo,
                      discovery=topo.cluster.discovery != "off" and not no_discovery, **extra)


def _check_address(text: str, option: str) -> None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageProblem(f"{option} {text!r} is not HOST:PORT")


# --------------------------------------------------------------------------------------------
# zq topic


def topic_create(
    name: Annotated[str, typer.Argument(help="Topic name: letters, digits, '.', '_' and '-'.")],
    partitions: Annotated[int, typer.Option("--partitions", min=1, help="Number of partitions.")] = 1,
    replication: Annotated[int, typer.Option("--replication", min=1, help="Replicas of each partition.")] = 1,
    retention: Annotated[Optional[str], typer.Option("--retention", help="Keep messages this long: 7d, 12h, 30m.")] = None,
    retention_bytes: Annotated[Optional[str], typer.Option("--retention-bytes",
                                                           help="Keep at most this much per partition: 100GB.")] = None,
    max_deliveries: Annotated[Optional[int], typer.Option("--max-deliveries", min=1,
                                                          help="Deliveries before a message is dead-lettered.")] = None,
    compact: Annotated[bool, typer.Option("--compact", hidden=True,
                                          help="Not built yet: refused (key compaction is planned).")] = False,
    durability: Annotated[Optional[str], typer.Option("--durability", help="fsync (default) or replicated.")] = None,
    bootstrap: Bootstrap = None, cluster: Cluster = "zq", json_out: Json = False,
) -> None:
    """Create a topic (its dead-letter topic is NAME.dlq)."""
    from zq.topology import InvalidValue, parse_bytes, parse_duration_ms
    config: dict[str, Any] = {}
    try:
        if retention is not None:
            config["retention_ms"] = parse_duration_ms(retention)
        if retention_bytes is not None:
            config["retention_bytes"] = parse_bytes(retention_bytes)
    except InvalidValue as error:
        raise UsageProblem(f"--retention{'-bytes' if 'size' in error.message else ''}: {error.message}") from None
    if max_deliveries is not None:
        config["max_deliveries"] = max_deliveries
    if compact:
        from zq.client.client import COMPACT_NOT_BUILT
        raise UsageProblem(f"--compact: {COMPACT_NOT_BUILT}")
    if durability is not None:
        if durability not in ("fsync", "replicated"):
            raise UsageProblem(f"--durability {durability!r} is not fsync or replicated")
        config["durability"] = durability
    with _client(bootstrap, cluster) as client:
        client.create_topic(name, partitions=partitions, replication=replication, **config)
        described = render.as_dict(client.describe_topic(name))
    if json_out:
        _print_json(described)
    else:
        print(f"created topic {name} with {partitions} partition{'s' * (partitions != 1)}, "
              f"replication {replication}")


def topic_list(internal: Annotated[bool, typer.Option("--internal", help="Also list the cluster's own "
                                                      "topics (__meta).")] = False,
               bootstrap: Bootstrap = None, cluster: Cluster = "zq", json_out: Json = False) -> None:
    """List topics: name, partitions, replication, settings."""
    with _client(bootstrap, cluster) as client:
        summaries = [{k: t.get(k) for k in ("name", "partitions", "replication", "config")}
                     for t in render.as_dict(client.topics())
                     if internal or not str(t.get("name")).startswith("__")]
    if json_out:
        _print_json({"topics": summaries})
    else:
        _console().print(render.topics_table(summaries))


def topic_describe(name: Annotated[str, typer.Argument(help="Topic name.")],
                   bootstrap: Bootstrap = None, cluster: Cluster = "zq", json_out: Json = False) -> None:
    """A topic's settings and partitions: leader, replicas, in-sync replicas, log start, log end, high watermark."""
    with _client(bootstrap, cluster) as client:
        described = render.as_dict(client.describe_topic(name))
    if json_out:
        _print_json(described)
        return
    console = _console()
    summary = render.topic_summary(described)
    console.print(f"topic {name}: {summary['partitions']} partitions, replication {summary['replication']}")
    for key, value in sorted(summary["config"].items()):
        console.print(f"  {key} = {value}")
    parts = [{"topic": name, **p} for p in described.get("partitions") or []]
    console.print(render.partitions_table(parts))


def topic_delete(name: Annotated[str, typer.Argument(help="Topic name.")],
                 bootstrap: Bootstrap = None, cluster: Cluster = "zq", json_out: Json = False) -> None:
    """Delete a topic and its data."""
    with _client(bootstrap, cluster) as client:
        client.delete_topic(name)
    if json_out:
        _print_json({"deleted": name})
    else:
        print(f"deleted topic {name}")


def topic_reassign(
    name: Annotated[str, typer.Argument(help="Topic name.")],
    replicas: Annotated[str, typer.Option("--replicas", metavar="NODE,NODE,...",
                                          help="The new replica set, preferred leader first.")],
    partition: Annotated[Optional[list[int]], typer.Option("--partition", min=0, help="Partition to move; "
                                                           "repeat for more (default: every partition).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the move is complete.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Longest wait, in seconds.")] = 120.0,
    bootstrap: Bootstrap = None, cluster: Cluster = "zq", json_out: Json = False,
) -> None:
    """Move partitions to another set of nodes: each new replica catches up first, then joins; the
    set changes one node at a time and never drops below a quorum. Logged in the cluster metadata."""
    nodes = [n.strip() for n in replicas.split(",") if n.strip()]
    if not nodes:
        raise UsageProblem("--replicas names no node; give them as n1,n2,n3")
    with _client(bootstrap, cluster) as client:
        count = next((t["partitions"] for t in client.topics() if t["name"] == name), None)
        if count is None:
            raise errors.UnknownTopic(f"topic {name!r} does not exist; `zq topic list` shows the topics")
        chosen = sorted(set(partition)) if partition else list(range(count))
        bad = [p for p in chosen if p >= count]
        if bad:
            raise UsageProblem(f"topic {name!r} has partitions 0 to {count - 1}, not {bad[0]}")
        for p in chosen:
            client.reassign_partition(name, p, nodes)
        if not json_out:
            print(f"reassigning {name} partition{'s' * (len(chosen) != 1)} {', '.join(map(str, chosen))} "
                  f"to {', '.join(nodes)}")
        rows = _wait_reassigned(client, name, chosen, timeout, json_out) if wait else []
    if json_out:
        _print_json({"topic": name, "partitions": chosen, "replicas": nodes, "done": bool(wait), "status": rows})
    elif wait:
        print(f"done: {name} partition{'s' * (len(chosen) != 1)} {', '.join(map(str, chosen))} "
              f"now on {', '.join(nodes)}")


REASSIGN_POLL_S = 0.25   # how often `zq topic reassign --wait` looks at the cluster's status


def _wait_reassigned(client: Any, name: str, chosen: list[int], timeout_s: float, quiet: bool) -> list[dict]:
    """Poll the status until every chosen partition's replica set is its target (bounded)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        doc = render.as_dict(client.status())
        rows = [r for r in doc.get("partitions") or [] if r.get("topic") == name and r.get("partition") in chosen]
        pending = [r for r in rows if not r.get("leader") or render.moving(r) or r.get("learners")]
        if rows and not pending:
            return rows
        line = "; ".join(f"{name}/{r['partition']}: {render.join(r.get('replicas') or []) or '?'}"
                         + (f" (catching up: {render.join(r.get('learners'))})" if r.get("learners") else "")
                         for r in pending)
        if not quiet and line != last:
            print(f"  moving: {line}", flush=True)
            last = line
        if time.monotonic() >= deadline:
            raise errors.Timeout(f"the move is not complete after {timeout_s:g} s ({line}); it goes on in the "
                                 "cluster: follow it with `zq status`, and check that the new nodes are alive")
        time.sleep(REASSIGN_POLL_S)


# --------------------------------------------------------------------------------------------
# zq status


def status(bootstrap: Bootstrap = None, cluster: Cluster = "zq", json_out: Json = False) -> None:
    """Nodes (name, address, state, last seen) and partitions (leader, epoch, replicas, in-sync,
    high watermark, replication lag)."""
    with _client(bootstrap, cluster) as client:
        doc = render.as_dict(client.status())
    if json_out:
        _print_json(doc)
        return
    console = _console()
    console.print(render.nodes_table(doc.get("nodes") or []))
    console.print(render.partitions_table(doc.get("partitions") or []))


# --------------------------------------------------------------------------------------------
# zq produce


def produce(
    topic: Annotated[str, typer.Argument(help="Topic to publish to.")],
    value: Annotated[Optional[str], typer.Argument(help="The message; without it, one message per line of stdin.")] = None,
    key: Annotated[Optional[str], typer.Option("--key", help="Message key (chooses the partition).")] = None,
    key_separator: Annotated[Optional[str], typer.Option("--key-separator", metavar="SEP",
                                                         help="Each stdin line is KEY SEP VALUE.")] = None,
    header: Annotated[Optional[list[str]], typer.Option("--header", metavar="NAME=VALUE",
                                                        help="A header; repeat for more.")] = None,
    acks: Annotated[str, typer.Option("--acks", help="none, leader or quorum.")] = "quorum",
    message_id: Annotated[Optional[str], typer.Option("--id", metavar="MESSAGE_ID",
                                                      help="Sets header zq-message-id (with VALUE only).")] = None,
    partition: Annotated[Optional[int], typer.Option("--partition", min=0, help="Publish to this partition.")] = None,
    bootstrap: Bootstrap = None, cluster: Cluster = "zq", json_out: Json = False,
) -> None:
    """Publish VALUE, or one message per line of stdin (the line ending is removed).

    Prints "partition offset" per message, in input order, or with --json one object per line:
    {"topic", "partition", "offset"} (offset null with --acks none)."""
    if acks not in render.ACKS_CHOICES:
        raise UsageProblem(f"--acks {acks!r} is not none, leader or quorum")
    if key is not None and key_separator is not None:
        raise UsageProblem("give --key or --key-separator, not both")
    if message_id is not None and value is None:
        raise UsageProblem("--id names one message, so it needs VALUE rather than stdin")
    if value is not None and key_separator is not None:
        raise UsageProblem("--key-separator splits stdin lines; with VALUE use --key")
    headers = dict(render.parse_header(h) for h in header or [])
    if message_id is not None:
        headers["zq-message-id"] = message_id.encode()
    if value is not None:
        messages: Any = iter([(key.encode() if key is not None else None, value.encode())])
    else:
        sep = key_separator.encode() if key_separator is not None else None
        fixed_key = key.encode() if key is not None else None
        messages = _stdin_messages(sep, fixed_key)
    with _client(bootstrap, cluster) as client:
        # A producer waits up to max_block_ms for a topic that may be being created; at a prompt a
        # misspelt name should fail at once.
        if topic not in {t["name"] for t in client.topics()}:
            raise errors.UnknownTopic(f"topic {topic!r} does not exist; create it with `zq topic create {topic}`, "
                                      "or check the name with `zq topic list`")
        producer = client.producer(acks=acks)
        try:
            _produce_all(producer, topic, messages, headers, partition, json_out)
        except BrokenPipeError:
            _quiet_stdout()   # whoever read our output left; what was sent stays sent
        finally:
            producer.close()


def _stdin_messages(sep: bytes | None, fixed_key: bytes | None):
    for n, line in enumerate(sys.stdin.buffer, start=1):
        line = line[:-1] if line.endswith(b"\n") else line
        line = line[:-1] if line.endswith(b"\r") else line
        k, v = render.split_key(line, sep, n)
        yield (k if sep is not None else fixed_key), v


def _produce_all(producer: Any, topic: str, messages: Any, headers: dict, partition: int | None,
                 json_out: bool) -> None:
    pending: deque = deque()
    send_kwargs: dict[str, Any] = {"headers": headers or None}
    if partition is not None:
        send_kwargs["partition"] = partition
    for k, v in messages:
        pending.append(producer.send(topic, v, key=k, **send_kwargs))
        # Print in input order as results arrive; bound what waits to be printed.
        while pending and (pending[0].done() or len(pending) >= PRODUCE_INFLIGHT_MAX):
            _print_produced(pending.popleft(), topic, json_out)
    producer.flush()
    while pending:
        _print_produced(pending.popleft(), topic, json_out)


def _print_produced(future: Any, topic: str, json_out: bool) -> None:
    meta = future.result()
    part = getattr(meta, "partition", None)
    offset = getattr(meta, "offset", None)
    offset = None if offset is None or offset < 0 else offset
    if json_out:
        line = json.dumps({"topic": getattr(meta, "topic", topic), "partition": part, "offset": offset})
    else:
        line = f"{part} {offset if offset is not None else '-'}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# zq consume


def consume(
    topic: Annotated[str, typer.Argument(help="Topic to read.")],
    start: Annotated[Optional[str], typer.Option("--from", metavar="earliest|latest|OFFSET|TIME",
                                                 help="Where to start: earliest, latest, an offset (in every partition "
                                                      "read), or an ISO-8601 time (no zone: local time). Default: "
                                                      "latest; with --group, where a group with nothing committed "
                                                      "starts (default earliest).")] = None,
    partition: Annotated[Optional[int], typer.Option("--partition", min=0, help="Read only this partition.")] = None,
    max_messages: Annotated[Optional[int], typer.Option("--max", min=1, help="Stop after N messages.")] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", min=0,
                                                     help="Stop after S seconds with no new message.")] = None,
    group: Annotated[Optional[str], typer.Option("--group", help="Consume as a member of this group.")] = None,
    no_ack: Annotated[bool, typer.Option("--no-ack", help="With --group: at-most-once, each message is acked "
                                                          "as it arrives, before it is printed.")] = False,
    bootstrap: Bootstrap = None, cluster: Cluster = "zq", json_out: Json = False,
) -> None:
    """Print messages as JSON lines: {"topic", "partition", "offset", "timestamp", "key", "value",
    "headers", "attempt"}.

    timestamp is milliseconds since the epoch. key, value and header values are UTF-8 text; if any
    of them in a message is not valid UTF-8, that message's object has "encoding": "base64" and
    all of its key, value and header values are base64. Always JSON lines (--json is accepted
    for symmetry). Exits 0 after --max messages or --timeout seconds of quiet."""
    start_at = render.parse_start(start) if start is not None else (None if group is not None else "latest")
    with _client(bootstrap, cluster) as client:
        consumer = _make_consumer(client, topic, group, start_at, partition)
        try:
            _consume_loop(consumer, topic, partition, max_messages, timeout, ack=group is not None and not no_ack,
                          ack_first=group is not None and no_ack)
        except BrokenPipeError:
            # The reader left (`zq consume T | head -1`): a normal end of a stream, not an error.
            _quiet_stdout()
        finally:
            consumer.close()


def _make_consumer(client: Any, topic: str, group: str | None, start: Any, partition: int | None):
    return client.consumer(topic, group=group, start=start, partitions=None if partition is None else [partition])


def _consume_loop(consumer: Any, topic: str, partition: int | None, max_messages: int | None,
                  timeout_s: float | None, ack: bool, ack_first: bool = False) -> None:
    printed = 0
    last_ms = time.monotonic() * 1000
    while max_messages is None or printed < max_messages:
        wait_ms = CONSUME_POLL_MS_MAX
        if timeout_s is not None:
            left_ms = timeout_s * 1000 - (time.monotonic() * 1000 - last_ms)
            if left_ms <= 0:
                return
            wait_ms = min(wait_ms, left_ms)
        batch_max = CONSUME_BATCH_MAX if max_messages is None else min(CONSUME_BATCH_MAX, max_messages - printed)
        batch = consumer.poll(timeout=wait_ms / 1000, max_messages=batch_max)
        if batch:
            last_ms = time.monotonic() * 1000
        for msg in batch:
            if ack_first:
                msg.ack()   # at-most-once: settled before it is handled, so never delivered again
            sys.stdout.write(json.dumps(render.message_json(msg, topic), ensure_ascii=False) + "\n")
            sys.stdout.flush()
            if ack:
                msg.ack()
            printed += 1
            if max_messages is not None and printed >= max_messages:
                return


# --------------------------------------------------------------------------------------------
# zq bench


def _bench(test: str, messages: int, size: int, partitions: int, replication: int, acks: str, durability: str,
           rate: Optional[float], nodes: int, bootstrap: str | None, cluster: str, json_out: bool,
           members: int = 1) -> None:
    from zq.cli.bench import print_result, run_bench
    if acks not in render.ACKS_CHOICES:
        raise UsageProblem(f"--acks {acks!r} is not none, leader or quorum")
    if durability not in ("fsync", "replicated"):
        raise UsageProblem(f"--durability {durability!r} is not fsync or replicated")
    result = run_bench(test, messages=messages, size=size, partitions=partitions, replication=replication,
                       acks=acks, durability=durability, rate=rate, nodes=nodes, bootstrap=bootstrap,
                       cluster=cluster, progress=True, members=members)
    if json_out:
        _print_json(result)
    else:
        print_result(result)


Messages = Annotated[int, typer.Option("--messages", min=1, help="Messages to send.")]
Size = Annotated[int, typer.Option("--size", min=8, help="Value size in bytes.")]
Partitions = Annotated[int, typer.Option("--partitions", min=1, help="Partitions of the bench topic.")]
Replication = Annotated[int, typer.Option("--replication", min=1, help="Replication of the bench topic.")]
Acks = Annotated[str, typer.Option("--acks", help="none, leader or quorum.")]
Durability = Annotated[str, typer.Option("--durability", help="fsync or replicated.")]
Rate = Annotated[Optional[float], typer.Option("--rate", min=1, help="Pace sends at this many msg/s "
                                               "(one message per request) to measure latency.")]
Nodes = Annotated[int, typer.Option("--nodes", min=1, help="Nodes of the LocalCluster started when "
                                    "--bootstrap is not given.")]


def bench_produce(messages: Messages = 200_000, size: Size = 100, partitions: Partitions = 8,
                  replication: Replication = 1, acks: Acks = "leader", durability: Durability = "fsync",
                  rate: Rate = None, nodes: Nodes = 1, bootstrap: Bootstrap = None, cluster: Cluster = "zq",
                  json_out: Json = False) -> None:
    """Producer throughput, and send-to-acknowledgement latency of every message."""
    _bench("produce", messages, size, partitions, replication, acks, durability, rate, nodes, bootstrap, cluster,
           json_out)


def bench_consume(messages: Messages = 200_000, size: Size = 100, partitions: Partitions = 8,
                  replication: Replication = 1, acks: Acks = "leader", durability: Durability = "fsync",
                  nodes: Nodes = 1, bootstrap: Bootstrap = None, cluster: Cluster = "zq",
                  json_out: Json = False) -> None:
    """Consumer throughput reading a topic filled beforehand (latency is not measured: null)."""
    _bench("consume", messages, size, partitions, replication, acks, durability, None, nodes, bootstrap, cluster,
           json_out)


def bench_e2e(messages: Messages = 20_000, size: Size = 100, partitions: Partitions = 1,
              replication: Replication = 1, acks: Acks = "leader", durability: Durability = "fsync",
              rate: Annotated[float, typer.Option("--rate", min=1, help="Paced send rate, msg/s.")] = 2_000,
              nodes: Nodes = 1, bootstrap: Bootstrap = None, cluster: Cluster = "zq",
              json_out: Json = False) -> None:
    """Produce-to-consume latency: a paced producer here, a consumer in a second process."""
    _bench("e2e", messages, size, partitions, replication, acks, durability, rate, nodes, bootstrap, cluster,
           json_out)


def bench_group(messages: Messages = 200_000, size: Size = 100, partitions: Partitions = 6,
                replication: Replication = 1, acks: Acks = "leader", durability: Durability = "fsync",
                members: Annotated[int, typer.Option("--members", min=1, help="Consumers in the group.")] = 1,
                nodes: Nodes = 1, bootstrap: Bootstrap = None, cluster: Cluster = "zq",
                json_out: Json = False) -> None:
    """Consumer-group throughput: fill a topic, then MEMBERS consumers of one group ack every message."""
    _bench("group", messages, size, partitions, replication, acks, durability, None, nodes, bootstrap, cluster,
           json_out, members=members)
