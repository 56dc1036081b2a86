"""`zq bench`: what one client process gets from a cluster.

    produce  one producer sends N messages as fast as it can (or paced with --rate, one message
             per request), waits for every acknowledgement. Throughput = N / (first send to last
             ack). Latency = send() call to the acknowledgement's callback, per message.
    consume  fills a fresh topic with N messages (not timed), then one consumer reads them all
             from earliest. Throughput = N / (first poll to the N-th message). Latency: null.
    e2e      a consumer in a second process reads a fresh topic from earliest while this process
             sends N messages paced at --rate (default 2,000 msg/s). Each value starts with the
             CLOCK_MONOTONIC time taken just before send(); the consumer subtracts it from the
             time it receives the message. Latency = produce to consumer delivery.

With `warm` (messages per partition, run_bench's keyword; tools/bench.py's latency rows use it)
the topic is written to, every partition, and every write acknowledged, before anything is timed:
the partitions' first leaders are elected and the producer knows them, so a latency row measures
the steady state, not an election. Warm-up values carry the stamp 0, which the e2e consumer skips.
    group    fills a fresh topic with N messages (not timed), then --members consumers of one new
             group, each a process of its own (as consumers are deployed: threads of one process
             would share one interpreter lock), join from earliest and ack every message.
             Throughput = N / (the moment they may join to the N-th ack); their acks are flushed
             (commit) after, outside the time. Latency: null.

Latencies are nearest-rank percentiles over every message of a paced run, and over every 100th
message of an unpaced produce run (a callback per message would halve the throughput measured). MB/s is N * size / 10^6 per second
(values only; keys are not sent, headers none). Without --bootstrap a LocalCluster of --nodes
nodes (default 1) is started in a temporary folder and stopped after. Each run uses a fresh
topic `bench-<test>-<random>` so runs do not see each other's data.

The result is INTERFACE.md's JSON shape, plus `rate_offered`, `rate_achieved`, `errors` and
`nodes`.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import struct
import sys
import time
from array import array
from contextlib import ExitStack
from typing import Any, Callable

from zq import errors
from zq.cli import render

PROGRESS_EVERY = 1_000            # messages between progress bar updates
QUIET_TIMEOUT_S = 30.0            # a consumer that sees nothing for this long has stalled: fail the run
E2E_READY_TIMEOUT_S = 30.0        # the consumer process must be polling within this
PRODUCE_LINGER_MS = 5             # throughput runs batch; paced runs send each message alone (linger 0)
LATENCY_SAMPLE_EVERY = 100        # throughput runs time one message in this many (see _produce)
PACED_IN_FLIGHT = 64              # requests a paced producer may have outstanding per partition
WARM_WAIT_S = 30.0                # the warm-up's writes must all be acknowledged within this
WARM_ROUNDS_MAX = 20              # ... tried this many times (a new partition may refuse until it has a leader)
TS = struct.Struct(">Q")


def _percentiles_ms(latencies_ns: array) -> dict[str, float | None]:
    values = sorted(latencies_ns)
    return {name: (None if (p := render.percentile(values, q)) is None else p / 1e6)
            for name, q in (("p50", 0.50), ("p99", 0.99), ("p999", 0.999))}


class _Progress:
    """A rich progress bar on stderr (stdout stays clean for --json); silent when not a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._progress.__enter__()
        return self

    def phase(self, description: str, total: int) -> None:
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(description, total=total)

    def update(self, completed: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=completed)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def run_bench(test: str, *, messages: int, size: int, partitions: int, replication: int, acks: str,
              durability: str, rate: float | None = None, nodes: int = 1, bootstrap: str | None = None,
              cluster: str = "zq", progress: bool = False, members: int = 1, warm: int = 0) -> dict[str, Any]:
    if test not in ("produce", "consume", "e2e", "group"):
        raise errors.InvalidRequest(f"unknown bench test {test!r}: produce, consume, e2e or group")
    if test == "e2e" and rate is None:
        rate = 2_000.0
    own_cluster = bootstrap is None
    with ExitStack() as stack:
        if bootstrap is None:
            from zq.testing import LocalCluster
            local = stack.enter_context(LocalCluster(nodes=nodes))
            bootstrap, cluster = local.bootstrap, local.name
        from zq.cli.commands import _client
        client = stack.enter_context(_client(bootstrap, cluster))
        topic = f"bench-{test}-{random.randrange(1 << 32):08x}"
        client.create_topic(topic, partitions=partitions, replication=replication, durability=durability)
        bar = stack.enter_context(_Progress(progress))
        if warm:
            _warm(client, topic, partitions, warm, acks, bar)
        if test == "produce":
            seconds, latencies, failed = _produce(client, topic, messages, size, acks, rate, bar)
        elif test == "consume":
            _produce(client, topic, messages, size, acks, None, bar, label="filling")
            seconds, failed = _consume(client, topic, messages, bar)
            latencies = array("q")
        elif test == "group":
            _produce(client, topic, messages, size, acks, None, bar, label="filling")
            seconds, failed = _group(bootstrap, cluster, topic, messages, members, bar)
            latencies = array("q")
        else:
            seconds, latencies, failed = _e2e(bootstrap, cluster, client, topic, messages, size, acks, rate, bar)
        try:
            client.delete_topic(topic)
        except errors.ZqError:
            pass  # an existing cluster keeps a bench topic it could not delete; harmless
    per_s = messages / seconds if seconds > 0 else None
    return {
        "test": test, "messages": messages, "size": size, "seconds": round(seconds, 6),
        "msgs_per_s": round(per_s, 1) if per_s else None,
        "mb_per_s": round(per_s * size / 1e6, 3) if per_s else None,
        "latency_ms": _percentiles_ms(latencies) if len(latencies) else {"p50": None, "p99": None, "p999": None},
        "settings": {"partitions": partitions, "replication": replication, "acks": acks, "durability": durability,
                     **({"members": members} if test == "group" else {})},
        "rate_offered": rate, "rate_achieved": round(per_s, 1) if per_s else None,
        "errors": failed, "nodes": nodes if own_cluster else None, "warm_per_partition": warm,
    }


def _warm(client: Any, topic: str, partitions: int, per_partition: int, acks: str, bar: _Progress) -> None:
    """Write `per_partition` messages (stamped 0) to every partition and wait until each is
    acknowledged, retrying the refused ones (a partition still electing its first leader refuses)."""
    producer = client.producer(acks=acks, linger_ms=0, max_in_flight=PACED_IN_FLIGHT)
    value = TS.pack(0) + bytes(92)
    todo = [p for p in range(partitions) for _ in range(per_partition)]
    bar.phase("warming the topic (not timed)", len(todo))
    deadline = time.monotonic() + WARM_WAIT_S
    try:
        for _ in range(WARM_ROUNDS_MAX):
            futures = [(p, producer.send(topic, value, partition=p)) for p in todo]
            todo = []
            for p, future in futures:
                try:
                    future.result(timeout=max(0.1, deadline - time.monotonic()))
                except (errors.ZqError, TimeoutError):
                    todo.append(p)
            bar.update(partitions * per_partition - len(todo))
            if not todo or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    finally:
        producer.close()
    if todo:
        raise errors.Timeout(f"warming {topic}: {len(todo)} of {partitions * per_partition} writes were not "
                             f"acknowledged within {WARM_WAIT_S:g} s; is every node of the cluster up?")


def _pace(rate: float | None, start: float, i: int) -> None:
    """Sleep until message i's turn at `rate` msg/s (no spinning: the cores are shared)."""
    if rate is None:
        return
    delay = start + i / rate - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _produce(client: Any, topic: str, messages: int, size: int, acks: str, rate: float | None, bar: _Progress,
             label: str = "producing", stamp: bool = False) -> tuple[float, array, int]:
    if rate:
        # One message per request, several requests in flight, as the anchor's paced run (A5) does:
        # a paced producer measures the node's produce-to-durable-ack time, not a queue behind
        # one outstanding request.
        producer = client.producer(acks=acks, linger_ms=0, max_in_flight=PACED_IN_FLIGHT)
    else:
        producer = client.producer(acks=acks, linger_ms=PRODUCE_LINGER_MS)
    # A done-callback per message costs more than the send itself (measured: 494 k msg/s without,
    # 172 k with), so a throughput run times every LATENCY_SAMPLE_EVERY-th message; a paced run
    # times every one. Failed sends are counted on the timed futures only (a failed batch of 100
    # or more records always holds one).
    sample_every = 1 if rate else LATENCY_SAMPLE_EVERY
    payload = os.urandom(size)
    latencies = array("q")
    failed = [0]
    clock = time.perf_counter_ns

    def done(future: Any, sent_ns: int) -> None:
        if future.exception() is not None:
            failed[0] += 1
        else:
            latencies.append(clock() - sent_ns)

    bar.phase(label, messages)
    try:
        start = time.perf_counter()
        for i in range(messages):
            _pace(rate, start, i)
            value = TS.pack(time.monotonic_ns()) + payload[TS.size:] if stamp else payload
            sent_ns = clock()
            future = producer.send(topic, value)
            if sample_every == 1 or i % sample_every == 0:
                future.add_done_callback(lambda f, t=sent_ns: done(f, t))
            if i % PROGRESS_EVERY == 0:
                bar.update(i)
        producer.flush()
        seconds = time.perf_counter() - start
        bar.update(messages)
    finally:
        producer.close()
    return seconds, latencies, failed[0]


def _consume(client: Any, topic: str, messages: int, bar: _Progress) -> tuple[float, int]:
    consumer = client.consumer(topic, start="earliest")
    bar.phase("consuming", messages)
    got = 0
    try:
        start = last = time.perf_counter()
        while got < messages:
            batch = consumer.poll(timeout=1.0, max_messages=10_000)
            now = time.perf_counter()
            if batch:
                got += len(batch)
                last = now
                bar.update(got)
            elif now - last > QUIET_TIMEOUT_S:
                raise errors.Timeout(f"the consumer received {got} of {messages} messages and then nothing "
                                     f"for {QUIET_TIMEOUT_S:g} s")
        seconds = time.perf_counter() - start
    finally:
        consumer.close()
    return seconds, 0


def _group_member(bootstrap: str, cluster: str, topic: str, group: str, i: int, acked: Any, ready: Any, start: Any,
                  stop: Any, conn: Any) -> None:
    """One member of `group` (a process of its own): joins once `start` is set, acks every message
    it gets, counting them in `acked[i]`; commits and leaves once `stop` is set."""
    from zq.cli.commands import _client
    try:
        with _client(bootstrap, cluster) as client:
            ready.release()
            start.wait()
            consumer = client.consumer(topic, group=group, start="earliest")
            n = 0
            try:
                while not stop.is_set():
                    for msg in consumer.poll(timeout=0.2, max_messages=10_000):
                        msg.ack()
                        n += 1
                    acked[i] = n   # once per poll: a shared value costs a lock per write
                consumer.commit()
            finally:
                consumer.close()
        conn.send(None)
    except BaseException as error:  # reported by the parent
        conn.send(f"{type(error).__name__}: {error}")
    finally:
        conn.close()


def _group(bootstrap: str, cluster: str, topic: str, messages: int, members: int, bar: _Progress) -> tuple[float, int]:
    """`members` consumers of one group, each a process of its own with its own client (how
    consumers are deployed; threads of one process would share one GIL), ack every message they
    get. The time runs from the moment they may join until `messages` acks were made; the acks
    are then flushed (commit) before the run ends, outside the time."""
    ctx = multiprocessing.get_context("spawn")
    group = f"bench-{random.randrange(1 << 32):08x}"
    acked = ctx.Array("q", members)
    ready, start, stop = ctx.Semaphore(0), ctx.Event(), ctx.Event()
    pipes, procs = [], []
    for i in range(members):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_group_member, args=(bootstrap, cluster, topic, group, i, acked, ready, start,
                                                       stop, child), daemon=True)
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    try:
        for _ in range(members):
            if not ready.acquire(timeout=E2E_READY_TIMEOUT_S):
                raise errors.Timeout("the group member processes did not start in time")
        bar.phase(f"consuming in a group of {members} processes", messages)
        start.set()
        t0 = last_change = time.perf_counter()
        last_total = 0
        while True:
            time.sleep(0.01)
            total = sum(acked[:])
            now = time.perf_counter()
            bar.update(min(total, messages))
            failed = [p for p in pipes if p.poll()]
            if total >= messages or failed:
                break
            if total != last_total:
                last_total, last_change = total, now
            elif now - last_change > QUIET_TIMEOUT_S:
                raise errors.Timeout(f"the group acked {total} of {messages} messages, then nothing for "
                                     f"{QUIET_TIMEOUT_S:g} s")
        seconds = now - t0
        stop.set()
        problems = []
        for p in pipes:
            if p.poll(QUIET_TIMEOUT_S):
                outcome = p.recv()
                if outcome is not None:
                    problems.append(outcome)
            else:
                problems.append("a member did not finish in time")
        if problems:
            raise errors.ZqError(f"a group member failed: {problems[0]}")
        return seconds, 0
    finally:
        stop.set()
        start.set()
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for p in pipes:
            p.close()


def _e2e_consumer(bootstrap: str, cluster: str, topic: str, messages: int, conn: Any) -> None:
    """The second process of `e2e`: read `messages` messages, send back their latencies in ns."""
    from zq.cli.commands import _client
    latencies = array("q")
    try:
        with _client(bootstrap, cluster) as client:
            consumer = client.consumer(topic, start="earliest")
            consumer.poll(timeout=0.1, max_messages=1)  # joined and fetching before the producer starts
            conn.send(("ready", None))
            last = time.monotonic()
            while len(latencies) < messages:
                batch = consumer.poll(timeout=1.0, max_messages=10_000)
                now_ns = time.monotonic_ns()
                for msg in batch:
                    stamp = TS.unpack_from(msg.value)[0]
                    if stamp:    # 0: a warm-up message, not timed
                        latencies.append(now_ns - stamp)
                if batch:
                    last = time.monotonic()
                elif time.monotonic() - last > QUIET_TIMEOUT_S:
                    break
            consumer.close()
        conn.send(("done", latencies.tobytes()))
    except BaseException as error:  # report, do not hang the parent
        conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        conn.close()


def _e2e(bootstrap: str, cluster: str, client: Any, topic: str, messages: int, size: int, acks: str,
         rate: float | None, bar: _Progress) -> tuple[float, array, int]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_e2e_consumer, args=(bootstrap, cluster, topic, messages, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(E2E_READY_TIMEOUT_S):
            raise errors.Timeout("the e2e consumer process did not start in time")
        kind, data = parent.recv()
        if kind != "ready":
            raise errors.ZqError(f"the e2e consumer failed: {data}")
        seconds, _, failed = _produce(client, topic, messages, max(size, TS.size), acks, rate, bar, stamp=True)
        bar.phase("waiting for the consumer", 1)
        if not parent.poll(QUIET_TIMEOUT_S + 5):
            raise errors.Timeout("the e2e consumer did not finish in time")
        kind, data = parent.recv()
        if kind != "done":
            raise errors.ZqError(f"the e2e consumer failed: {data}")
        latencies = array("q")
        latencies.frombytes(data)
        if len(latencies) < messages:
            raise errors.Timeout(f"the e2e consumer received {len(latencies)} of {messages} messages")
        return seconds, latencies, failed
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent.close()


def print_result(result: dict[str, Any], out: Callable[[str], None] = print) -> None:
    lat = result["latency_ms"]
    s = result["settings"]
    out(f"{result['test']}: {result['messages']} messages of {result['size']} B in {result['seconds']:.2f} s: "
        f"{render.fmt_rate(result['msgs_per_s'])} msg/s, {result['mb_per_s'] or 0:.1f} MB/s")
    if lat["p50"] is not None:
        out(f"  latency p50 {render.fmt_ms(lat['p50'])}, p99 {render.fmt_ms(lat['p99'])}, "
            f"p99.9 {render.fmt_ms(lat['p999'])}")
    out(f"  partitions {s['partitions']}, replication {s['replication']}, acks {s['acks']}, "
        f"durability {s['durability']}" + (f", paced at {result['rate_offered']:g} msg/s" if result.get('rate_offered')
                                           else "") + (f", {result['errors']} failed sends" if result['errors'] else ""))
