#!/usr/bin/env python3
"""The benchmark suite that `make bench` runs: zq's figures beside the anchors measured on this machine.

    python tools/bench.py                 # starts a 1-node LocalCluster (the issue's "one node
                                          # holding the partitions"), runs the suite, stops it
    python tools/bench.py --quick         # smaller runs, for a smoke test (~20 s)
    python tools/bench.py --bootstrap H:P # against a running cluster instead

The suite (every run: 100-byte values, durability=fsync, one client process):

  on a 1-node cluster, replication 1, acks=leader (issue 2):
    produce          N messages as fast as one producer goes, 8 partitions    -> msg/s, MB/s
    produce-latency  2,000 msg/s paced for 10 s, 1 partition, one message per request
                                                                               -> send-to-durable-ack p50/p99/p99.9
    consume          N messages read from earliest by one consumer, 8 partitions -> msg/s, MB/s
    e2e              2,000 msg/s paced for 10 s, consumer in a second process  -> produce-to-consume p50/p99/p99.9
    e2e-p64          as e2e, on a topic of 64 partitions (issue 11: cost per partition)
  on a 3-node cluster, replication 3, acks=quorum (issues 3 and 4):
    produce-r3       N messages as fast as one producer goes, 6 partitions    -> msg/s, MB/s
    produce-latency-r3  as produce-latency                                     -> send-to-quorum-durable-ack
    e2e-r3           as e2e                                                    -> produce-to-consume p50/p99/p99.9
    group-1          N messages consumed by one group member acking each      -> msg/s
    group-3          the same with three members (a process each, as deployed) -> msg/s
    first-produce-r3 create a topic (1 partition, RF3), time its first produce -> quorum durable
                     ack; FIRST_PRODUCE_TOPICS times, each a new topic (issue 11: first messages
                     of a new topic)                                          -> p50/p99/max

Every latency row (produce-latency*, e2e*) runs on a warm topic: created and written to, each
partition, before the timed run (run_bench's `warm`), so no election of a new partition's first
leader is measured (issue 11). Durability is fsync throughout.

`--compare` runs the latency rows against Redis Streams and NATS JetStream as well, in the same
run (tools/bench_compare.py; needs `pip install -e '.[bench]'` and redis-server, nats-server);
`--compare --repeat 3` runs three interleaved rounds and shows each figure's median.

Each result is printed, then a table puts them beside the issue's targets and the anchors, and
every result goes as one JSON line (INTERFACE.md's bench shape plus "name", "started_utc" and
"machine") to bench-results/bench-<UTC time>.jsonl.

What `zq bench` measures, exactly, is in the docstring of zq/cli/bench.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zq.cli.bench import print_result, run_bench  # noqa: E402
from zq.cli.render import fmt_ms, fmt_rate  # noqa: E402
from zq.errors import ZqError  # noqa: E402

# Copied from /work/shared/anchors/RESULTS.md ("Performance anchors (this machine)", run
# 2026-11-27 02:05 UTC; medians of 3 reps, 100-byte payloads, one Python client). Read its
# caveats before comparing: durability and ack semantics differ between the anchors.
ANCHORS = {
    "produce": [
        ("zq-path A5: pyzmq+cbor2+rocksdict, batch=100, fsync (ceiling)", "397.6 k msg/s"),
        ("Redis Streams B: XADD pipeline=1000, aof everysec", "86.5 k msg/s"),
        ("NATS JetStream B: file R1, async window=1000", "38.1 k msg/s"),
        ("RabbitMQ B: quorum queue, confirms window=1000", "32.2 k msg/s"),
    ],
    "produce-latency": [
        ("zq-path A5: produce->fsync ack @2000 msg/s, 1 msg/request", "p50 484 µs, p99 812 µs"),
    ],
    "consume": [
        ("Redis Streams C: XREADGROUP 1000 + XACK", "68.5 k msg/s"),
        ("RabbitMQ C: prefetch 1000, ack multiple every 100", "41.3 k msg/s"),
        ("NATS JetStream C: pull fetch=500 + explicit ack", "24.8 k msg/s"),
    ],
    "produce-r3": [
        ("Redis Streams B (1 replica): XADD pipeline=1000", "86.5 k msg/s"),
        ("RabbitMQ B: quorum queue, confirms window=1000", "32.2 k msg/s"),
    ],
    "e2e-r3": [
        ("NATS JetStream D @2000 msg/s (R1)", "p50 616 µs, p99 1547 µs"),
        ("RabbitMQ D @2000 msg/s (quorum queue)", "p50 1433 µs, p99 6927 µs"),
    ],
    "group-1": [
        ("Redis Streams C: XREADGROUP 1000 + XACK", "68.5 k msg/s"),
        ("RabbitMQ C: prefetch 1000, ack multiple every 100", "41.3 k msg/s"),
        ("NATS JetStream C: pull fetch=500 + AckAll", "25.8 k msg/s"),
    ],
    "e2e": [
        ("Redis Streams D @2000 msg/s", "p50 225 µs, p99 375 µs"),
        ("NATS JetStream D @2000 msg/s", "p50 616 µs, p99 1547 µs"),
        ("RabbitMQ D @2000 msg/s", "p50 1433 µs, p99 6927 µs"),
    ],
}
# The issues' targets ("Performance to reach" of issues 2, 3 and 4).
TARGETS = {
    "produce": ("msgs_per_s", ">=", 250_000, "≥ 250 k msg/s"),
    "consume": ("msgs_per_s", ">=", 250_000, "≥ 250 k msg/s"),
    "produce-latency": ("p99", "<=", 1.0, "p99 ≤ 1 ms @2000 msg/s"),
    "e2e": None,
    "produce-r3": ("msgs_per_s", ">=", 100_000, "≥ 100 k msg/s"),
    "e2e-r3": ("p99", "<=", 2.0, "p50 ≤ 1 ms, p99 ≤ 2 ms @2000 msg/s"),
    "produce-latency-r3": ("p99", "<=", 5.0, "p99 ≤ 5 ms @2000 msg/s (issue 11)"),
    "e2e-p64": None,
    "group-1": ("msgs_per_s", ">=", 150_000, "≥ 150 k msg/s"),
    "group-3": None,
    "first-produce-r3": None,
    "e2e-unsynced": None,
    "e2e-r3-unsynced": None,
}
PACED_RATE = 2_000        # msg/s, as the anchors' latency runs
PACED_SECONDS = 10        # as the anchors' latency runs
WARM_PER_PARTITION = 20   # messages written to each partition of a latency row's topic before it is timed
LATENCY_ROWS = ("produce-latency", "e2e", "e2e-p64", "produce-latency-r3", "e2e-r3", "e2e-unsynced", "e2e-r3-unsynced")
FIRST_PRODUCE_TOPICS = 30  # new topics first-produce-r3 creates, one first produce timed on each (5 with --quick)
FIRST_PRODUCE_WAIT_S = 30.0  # one first produce must be acknowledged within this


def suite(messages: int, paced_messages: int, first_topics: int = FIRST_PRODUCE_TOPICS) -> list[tuple[str, int, dict]]:
    """(name, nodes of the cluster it runs on, run_bench arguments)."""
    one = {"size": 100, "replication": 1, "acks": "leader", "durability": "fsync"}
    three = {"size": 100, "replication": 3, "acks": "quorum", "durability": "fsync"}
    # As many as the produce rows: at ~150-200 k msg/s half of them took ~1.5 s, so one rebalance
    # or election while members join weighed as much as the steady rate being measured.
    group_messages = max(10_000, messages)
    return [
        # Issue 2: one node holding the partitions.
        ("produce", 1, {"test": "produce", "messages": messages, "partitions": 8, **one}),
        ("produce-latency", 1, {"test": "produce", "messages": paced_messages, "partitions": 1,
                                "rate": PACED_RATE, "warm": WARM_PER_PARTITION, **one}),
        ("consume", 1, {"test": "consume", "messages": messages, "partitions": 8, **one}),
        ("e2e", 1, {"test": "e2e", "messages": paced_messages, "partitions": 1, "rate": PACED_RATE,
                    "warm": WARM_PER_PARTITION, **one}),
        ("e2e-p64", 1, {"test": "e2e", "messages": paced_messages, "partitions": 64, "rate": PACED_RATE,
                        "warm": WARM_PER_PARTITION, **one}),
        # Issue 3: three nodes, replication 3, acks=quorum.
        ("produce-r3", 3, {"test": "produce", "messages": messages, "partitions": 6, **three}),
        ("produce-latency-r3", 3, {"test": "produce", "messages": paced_messages, "partitions": 1,
                                   "rate": PACED_RATE, "warm": WARM_PER_PARTITION, **three}),
        ("e2e-r3", 3, {"test": "e2e", "messages": paced_messages, "partitions": 1, "rate": PACED_RATE,
                       "warm": WARM_PER_PARTITION, **three}),
        # Issue 4: consumer groups acking every message, on the same three nodes.
        ("group-1", 3, {"test": "group", "messages": group_messages, "partitions": 6, "members": 1, **three}),
        ("group-3", 3, {"test": "group", "messages": group_messages, "partitions": 6, "members": 3, **three}),
        # Issue 11: the first message of a new topic (no warm-up: that is what is measured).
        ("first-produce-r3", 3, {"test": "first-produce", "messages": first_topics, **three}),
        # Issue 11: the e2e rows without an fsync per write, as Redis Streams (AOF everysec) and
        # JetStream's file store (sync every 2 minutes) run by default: like for like beside them.
        ("e2e-unsynced", 1, {"test": "e2e", "messages": paced_messages, "partitions": 1, "rate": PACED_RATE,
                             "warm": WARM_PER_PARTITION, **one, "durability": "replicated"}),
        ("e2e-r3-unsynced", 3, {"test": "e2e", "messages": paced_messages, "partitions": 1, "rate": PACED_RATE,
                                "warm": WARM_PER_PARTITION, **three, "durability": "replicated"}),
    ]


def verdict(name: str, result: dict) -> str:
    target = TARGETS.get(name)
    if target is None:
        return "-"
    field, op, bound, text = target
    value = result["latency_ms"].get(field) if field.startswith("p") else result.get(field)
    if value is None:
        return f"{text}: no figure"
    met = value >= bound if op == ">=" else value <= bound
    return f"{text}: {'met' if met else 'NOT met'}"


def summary(name: str, result: dict) -> str:
    lat = result["latency_ms"]
    if result.get("test") == "first-produce":
        return (f"p50 {fmt_ms(lat['p50'])}, p99 {fmt_ms(lat['p99'])}, max {fmt_ms(lat['max'])} "
                f"over {result['messages']} new topics")
    if name in LATENCY_ROWS:
        return (f"p50 {fmt_ms(lat['p50'])}, p99 {fmt_ms(lat['p99'])}, p99.9 {fmt_ms(lat['p999'])} "
                f"(achieved {fmt_rate(result['rate_achieved'])} msg/s)")
    return f"{fmt_rate(result['msgs_per_s'])} msg/s, {result['mb_per_s']:.1f} MB/s"


def print_table(rows: list[tuple[str, dict]]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title="zq bench beside the anchors (anchors: /work/shared/anchors/RESULTS.md, same machine)",
                  title_justify="left", show_lines=True)
    for column in ("test", "zq", "issue target", "anchors"):
        table.add_column(column)
    for name, result in rows:
        anchors = "\n".join(f"{label}: {figure}" for label, figure in ANCHORS.get(name, []))
        table.add_row(name, summary(name, result), verdict(name, result), anchors)
    Console(width=max(160, Console().width)).print(table)


ROW_TITLES = {
    "produce-latency": "produce -> durable ack, 1 node, RF1, 1 partition",
    "e2e": "e2e, 1 node, RF1, 1 partition",
    "e2e-p64": "e2e, 1 node, RF1, 64 partitions",
    "produce-latency-r3": "produce -> quorum durable ack, 3 nodes, RF3, 1 partition",
    "e2e-r3": "e2e, 3 nodes, RF3 quorum, 1 partition",
    "e2e-unsynced": "e2e, 1 node, RF1, durability = replicated (no fsync)",
    "e2e-r3-unsynced": "e2e, 3 nodes, RF3 quorum, durability = replicated (no fsync)",
}


def latency_line(system: str, row: str, result: dict) -> dict:
    lat = result["latency_ms"]
    return {"system": system, "row": row, "p50": lat["p50"], "p99": lat["p99"], "p999": lat["p999"],
            "rate": result.get("rate_achieved"), "errors": result.get("errors", 0)}


def print_latency_table(lines: list[dict], paced_messages: int, repeats: int = 1) -> None:
    """One table of the latency rows: zq's and, with --compare, the other systems' side by side."""
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"latency at {PACED_RATE:,} msg/s paced, one message per request, {paced_messages:,} "
                        f"messages per row, warm topic, fsync"
                        + (f", medians of {repeats} interleaved rounds" if repeats > 1 else "")
                        + f" (load average {os.getloadavg()[0]:.2f} on "
                        f"{os.cpu_count()} CPUs)", title_justify="left")
    for column in ("row", "system", "p50", "p99", "p99.9", "achieved msg/s"):
        table.add_column(column, justify="left" if column in ("row", "system") else "right")
    order = {name: i for i, name in enumerate(LATENCY_ROWS)}
    for line in sorted(lines, key=lambda l: order.get(l["row"], len(order))):
        table.add_row(ROW_TITLES.get(line["row"], line["row"]), line["system"],
                      *(fmt_ms(line[k]) for k in ("p50", "p99", "p999")),
                      "-" if line["rate"] is None else f"{line['rate']:,.0f}"
                      + (f" ({line['errors']} failed)" if line["errors"] else ""))
    Console(width=max(120, Console().width)).print(table)


def machine() -> dict:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "platform": platform.platform()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", help="a running cluster (default: start a LocalCluster)")
    parser.add_argument("--cluster", default="zq", help="its cluster name (with --bootstrap)")
    parser.add_argument("--messages", type=int, default=500_000, help="messages of the throughput runs")
    parser.add_argument("--quick", action="store_true", help="50,000-message throughput runs and 2 s paced runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results", help="folder for the JSON lines")
    parser.add_argument("--only", choices=[n for n in TARGETS], action="append", help="run only these tests")
    parser.add_argument("--compare", action="store_true",
                        help="the latency rows only, for zq and for Redis Streams and NATS JetStream side by side")
    parser.add_argument("--repeat", type=int, default=1, choices=range(1, 10), metavar="N",
                        help="with --compare: N interleaved rounds, the table shows each figure's median")
    args = parser.parse_args()
    messages = 50_000 if args.quick else args.messages
    paced = PACED_RATE * (2 if args.quick else PACED_SECONDS)
    started = datetime.now(timezone.utc)
    args.out.mkdir(parents=True, exist_ok=True)
    out_path = args.out / f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}.jsonl"
    print(f"zq bench suite: {messages} messages per throughput run, {paced} paced at {PACED_RATE} msg/s; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)

    only = args.only or (list(LATENCY_ROWS) if args.compare else None)
    first_topics = 5 if args.quick else FIRST_PRODUCE_TOPICS
    wanted = [(n, nodes, spec) for n, nodes, spec in suite(messages, paced, first_topics) if not only or n in only]
    rows: list[tuple[str, dict]] = []
    lines: list[dict] = []
    skipped: list[str] = []
    repeats = args.repeat if args.compare else 1
    for rep in range(repeats):
        if repeats > 1:
            print(f"-- round {rep + 1} of {repeats} (zq, then each other system: interleaved)", flush=True)
        got = run_zq(wanted, args, started, out_path)
        rows += got
        lines += [latency_line("zq", name, result) for name, result in got if name in LATENCY_ROWS]
        if args.compare:
            from bench_compare import run_compare
            other_lines, skipped = run_compare(paced, PACED_RATE, WARM_PER_PARTITION, progress=True)
            lines += other_lines
            with open(out_path, "a") as f:
                for line in other_lines:
                    f.write(json.dumps({"name": line["row"], "started_utc": started.isoformat(),
                                        "machine": machine(), **line}) + "\n")
    print()
    if rows and not args.compare:
        print_table(rows)
    if lines:
        print_latency_table(median_lines(lines), paced, repeats)
    for reason in skipped:
        print(f"skipped: {reason}")
    print(f"results: {out_path}")
    return 0 if len(rows) == len(wanted) * repeats else 1


def run_zq(wanted: list, args: argparse.Namespace, started: datetime, out_path: Path) -> list[tuple[str, dict]]:
    """Run the wanted rows, on LocalClusters of the sizes they name (or on --bootstrap); (name, result)."""
    from contextlib import ExitStack
    rows: list[tuple[str, dict]] = []
    for cluster_nodes in sorted({nodes for _, nodes, _ in wanted}):
        with ExitStack() as stack:
            bootstrap, cluster = args.bootstrap, args.cluster
            if bootstrap is None:
                from zq.testing import LocalCluster
                local = stack.enter_context(LocalCluster(nodes=cluster_nodes))
                bootstrap, cluster = local.bootstrap, local.name
            for name, nodes, spec in wanted:
                if nodes != cluster_nodes:
                    continue
                spec = dict(spec)
                test = spec.pop("test")
                t0 = time.monotonic()
                try:
                    if test == "first-produce":
                        result = first_produce(bootstrap, cluster, **spec)
                    else:
                        result = run_bench(test, bootstrap=bootstrap, cluster=cluster, progress=True, **spec)
                except ZqError as error:
                    print(f"{name}: failed: {error.message}", file=sys.stderr)
                    continue
                result["nodes"] = cluster_nodes if args.bootstrap is None else None
                print(f"[{name}, {time.monotonic() - t0:.1f} s]")
                print_result(result)
                rows.append((name, result))
                with open(out_path, "a") as f:
                    f.write(json.dumps({"name": name, "started_utc": started.isoformat(), "machine": machine(),
                                        **result}) + "\n")
    return rows


def first_produce(bootstrap: str, cluster: str, *, messages: int, size: int, replication: int, acks: str,
                  durability: str) -> dict:
    """`messages` times: create a topic of one partition, then time its first produce (send() to
    the acknowledgement, the client's metadata lookup and any retry included), then delete it.
    One client and one producer throughout, as an application that creates topics as it goes."""
    import random
    from zq.cli.bench import _percentiles_ms
    from zq.cli.commands import _client
    from array import array
    latencies = array("q")
    failed = 0
    value = os.urandom(size)
    began = time.perf_counter()
    with _client(bootstrap, cluster) as client:
        producer = client.producer(acks=acks, linger_ms=0)
        try:
            for i in range(messages):
                topic = f"bench-first-{random.randrange(1 << 32):08x}-{i}"
                client.create_topic(topic, partitions=1, replication=replication, durability=durability)
                sent_ns = time.perf_counter_ns()
                try:
                    producer.send(topic, value, partition=0).result(timeout=FIRST_PRODUCE_WAIT_S)
                    latencies.append(time.perf_counter_ns() - sent_ns)
                except (ZqError, TimeoutError):
                    failed += 1
                try:
                    client.delete_topic(topic)
                except ZqError:
                    pass  # a bench topic left behind is harmless
        finally:
            producer.close()
    seconds = time.perf_counter() - began
    lat = _percentiles_ms(latencies) if len(latencies) else {"p50": None, "p99": None, "p999": None}
    lat["max"] = max(latencies) / 1e6 if len(latencies) else None
    return {"test": "first-produce", "messages": messages, "size": size, "seconds": round(seconds, 6),
            "msgs_per_s": None, "mb_per_s": None, "latency_ms": lat,
            "settings": {"partitions": 1, "replication": replication, "acks": acks, "durability": durability},
            "rate_offered": None, "rate_achieved": None, "errors": failed,
            "latencies_ms": [round(x / 1e6, 3) for x in latencies]}


def median_lines(lines: list[dict]) -> list[dict]:
    """One line per (system, row): the median of each figure over the rounds (as the issue's table)."""
    import statistics
    groups: dict[tuple[str, str], list[dict]] = {}
    for line in lines:
        groups.setdefault((line["system"], line["row"]), []).append(line)
    out = []
    for (system, row), group in groups.items():
        med = {k: (statistics.median(vals) if (vals := [l[k] for l in group if l[k] is not None]) else None)
               for k in ("p50", "p99", "p999", "rate")}
        out.append({"system": system, "row": row, **med, "errors": sum(l["errors"] for l in group)})
    return out


if __name__ == "__main__":
    sys.exit(main())
