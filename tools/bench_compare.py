"""`tools/bench.py --compare`: the latency rows against Redis Streams and NATS JetStream, in the same run.

For each system the rows are the ones zq's latency rows measure, the same way:

  produce-latency      paced at 2,000 msg/s, one message per request, up to 64 requests in flight
                       (as zq's paced producer), 100-byte values: send to durable acknowledgement
  e2e                  the same paced producer, a consumer in a second process; each value starts
                       with CLOCK_MONOTONIC just before the send, the consumer subtracts it on receipt

  Redis Streams        redis-server, AOF appendfsync everysec (Redis's usual durable setting: an ack
                       is in the OS, fsynced within a second), XADD / XREAD BLOCK   -> rows "1 node"
  JetStream R1         nats-server -js, file storage, one server                    -> rows "1 node"
  JetStream R3         three nats-servers clustered on 127.0.0.1, file storage, stream replicas 3
                                                                                    -> rows "3 nodes"

Each stream is warm: created and written to before the timed run. The servers are started here,
each in a temporary folder on free loopback ports, and stopped after. A system whose server
binary or Python client is missing is skipped with one sentence saying how to install it.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zq.cli import render  # noqa: E402

TS = struct.Struct(">Q")
SIZE = 100                       # bytes per value, as zq's rows
IN_FLIGHT_MAX = 64               # paced requests outstanding at once (zq.cli.bench.PACED_IN_FLIGHT)
SERVER_READY_S = 20.0            # a started server must accept connections within this
STREAM_READY_S = 30.0            # a new stream must take writes (R3: its leader elected) within this
CONSUMER_READY_S = 30.0          # the consumer process must be subscribed within this
CONSUMER_QUIET_S = 30.0          # a consumer that receives nothing for this long has stalled
SERVER_STOP_S = 10.0             # SIGTERM, then SIGKILL after this long
INSTALL = {
    "redis-server": "apt-get install -y redis-server",
    "nats-server": "apt-get install -y nats-server",
    "redis": "pip install -e '.[bench]'",
    "nats": "pip install -e '.[bench]'",
}


class Skip(Exception):
    """This system cannot run here; the message says why and how to install what is missing."""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _need(binary: str, module: str, system: str) -> str:
    path = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}")
                                         if os.path.exists(p)), None)
    if path is None:
        raise Skip(f"{system}: {binary} is not installed here; install it with `{INSTALL[binary]}` (as root)")
    try:
        __import__(module)
    except ImportError:
        raise Skip(f"{system}: the Python client `{module}` is missing; install it with `{INSTALL[module]}`") from None
    return path


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Skip(f"{what} exited with code {proc.returncode} at start; its log {log} ends: "
                       + log.read_text()[-300:].replace("\n", " "))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise Skip(f"{what} did not accept connections on 127.0.0.1:{port} within {SERVER_READY_S:g} s; see {log}")


class Servers:
    """Processes started in a temporary folder; stop() ends them (SIGTERM, then SIGKILL) and removes it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="zq-bench-compare-"))
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], name: str, port: int) -> None:
        log = self.dir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.dir)
        self.procs.append(proc)
        _wait_port(port, proc, name, log)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(SERVER_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- the paced producer (asyncio, both systems)

async def _paced(send: Callable[[bytes], Any], messages: int, rate: float, stamp: bool) -> tuple[array, int, float]:
    """Send `messages` values at `rate` msg/s, each its own request, at most IN_FLIGHT_MAX at once;
    (send-to-ack latencies in ns, failures, seconds)."""
    latencies, failed = array("q"), [0]
    slots = asyncio.Semaphore(IN_FLIGHT_MAX)
    payload = os.urandom(SIZE - TS.size)
    loop = asyncio.get_running_loop()

    async def one(value: bytes, sent_ns: int) -> None:
        try:
            await send(value)
            latencies.append(time.perf_counter_ns() - sent_ns)
        except Exception:
            failed[0] += 1
        finally:
            slots.release()

    tasks = []
    start = loop.time()
    for i in range(messages):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        value = TS.pack(time.monotonic_ns() if stamp else 0) + payload
        tasks.append(asyncio.ensure_future(one(value, time.perf_counter_ns())))
    await asyncio.gather(*tasks)
    return latencies, failed[0], loop.time() - start


def _percentiles(latencies_ns: array) -> dict[str, float | None]:
    values = sorted(latencies_ns)
    return {name: (None if (p := render.percentile(values, q)) is None else p / 1e6)
            for name, q in (("p50", 0.50), ("p99", 0.99), ("p999", 0.999))}


def _line(system: str, row: str, latencies: array, failed: int, seconds: float, messages: int) -> dict:
    return {"system": system, "row": row, **_percentiles(latencies),
            "rate": round(messages / seconds, 1) if seconds > 0 else None, "errors": failed}


def _e2e(consumer: Callable[..., None], args: tuple, produce: Callable[[int, bool], tuple[array, int, float]],
         messages: int) -> tuple[array, int, float]:
    """Start `consumer(*args, messages, conn)` in a second process, then produce; its latencies."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=consumer, args=(*args, messages, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(CONSUMER_READY_S):
            raise RuntimeError("the consumer process did not start in time")
        kind, data = parent.recv()
        if kind != "ready":
            raise RuntimeError(f"the consumer failed: {data}")
        _, failed, seconds = produce(messages, True)
        if not parent.poll(CONSUMER_QUIET_S + 5):
            raise RuntimeError("the consumer did not finish in time")
        kind, data = parent.recv()
        if kind != "done":
            raise RuntimeError(f"the consumer failed: {data}")
        latencies = array("q")
        latencies.frombytes(data)
        if len(latencies) < messages:
            raise RuntimeError(f"the consumer received {len(latencies)} of {messages} messages")
        return latencies, failed, seconds
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent.close()


# ---------------------------------------------------------------- Redis Streams

STREAM = "bench"


def _redis_consumer(port: int, messages: int, conn: Any) -> None:
    import redis
    latencies = array("q")
    try:
        r = redis.Redis(host="127.0.0.1", port=port)
        last_id = r.xinfo_stream(STREAM)["last-generated-id"]    # after the warm-up
        quiet_since = time.monotonic()
        conn.send(("ready", None))
        while len(latencies) < messages:
            got = r.xread({STREAM: last_id}, count=10_000, block=1_000)
            now_ns = time.monotonic_ns()
            for _, entries in got:
                for entry_id, fields in entries:
                    last_id = entry_id
                    stamp = TS.unpack_from(fields[b"v"])[0]
                    if stamp:
                        latencies.append(now_ns - stamp)
            if got:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > CONSUMER_QUIET_S:
                break
        conn.send(("done", latencies.tobytes()))
    except BaseException as error:
        conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        conn.close()


def _redis_produce(port: int, messages: int, rate: float, stamp: bool) -> tuple[array, int, float]:
    import redis.asyncio as aredis

    async def run() -> tuple[array, int, float]:
        r = aredis.Redis(host="127.0.0.1", port=port, max_connections=IN_FLIGHT_MAX)
        try:
            return await _paced(lambda v: r.xadd(STREAM, {"v": v}), messages, rate, stamp)
        finally:
            await r.aclose()
    return asyncio.run(run())


def redis_rows(messages: int, rate: float, warm: int) -> list[dict]:
    binary = _need("redis-server", "redis", "Redis Streams")
    with Servers() as servers:
        port = _free_ports(1)[0]
        servers.start([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(servers.dir),
                       "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "no"],
                      "redis-server", port)
        _redis_produce(port, warm, rate, False)
        system = "Redis Streams 1 node (AOF everysec)"
        latencies, failed, seconds = _redis_produce(port, messages, rate, False)
        rows = [_line(system, "produce-latency", latencies, failed, seconds, messages)]
        latencies, failed, seconds = _e2e(_redis_consumer, (port,),
                                          lambda n, s: _redis_produce(port, n, rate, s), messages)
        rows.append(_line(system, "e2e", latencies, failed, seconds, messages))
        return rows


# ---------------------------------------------------------------- NATS JetStream

SUBJECT = "bench.x"


async def _js_connect(port: int) -> tuple[Any, Any]:
    import nats
    nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5, max_reconnect_attempts=3)
    return nc, nc.jetstream(timeout=10)


def _js_create_stream(port: int, replicas: int) -> None:
    from nats.js.api import StorageType

    async def run() -> None:
        nc, js = await _js_connect(port)
        deadline = time.monotonic() + STREAM_READY_S
        try:
            while True:   # a cluster takes writes once its meta leader is elected
                try:
                    await js.add_stream(name="BENCH", subjects=[SUBJECT], storage=StorageType.FILE,
                                        num_replicas=replicas)
                    return
                except Exception as error:
                    if time.monotonic() > deadline:
                        raise Skip(f"JetStream R{replicas}: the stream was not created within "
                                   f"{STREAM_READY_S:g} s: {error}") from None
                    await asyncio.sleep(0.25)
        finally:
            await nc.close()
    asyncio.run(run())


def _js_produce(port: int, messages: int, rate: float, stamp: bool) -> tuple[array, int, float]:
    async def run() -> tuple[array, int, float]:
        nc, js = await _js_connect(port)
        try:
            return await _paced(lambda v: js.publish(SUBJECT, v), messages, rate, stamp)
        finally:
            await nc.close()
    return asyncio.run(run())


def _js_consumer(port: int, messages: int, conn: Any) -> None:
    from nats.js.api import DeliverPolicy
    latencies = array("q")

    async def run() -> None:
        nc, js = await _js_connect(port)
        got = asyncio.Event()
        last = [time.monotonic()]

        async def on_msg(msg: Any) -> None:
            stamp = TS.unpack_from(msg.data)[0]
            if stamp:
                latencies.append(time.monotonic_ns() - stamp)
            last[0] = time.monotonic()
            if len(latencies) >= messages:
                got.set()
        # An ordered consumer: ephemeral, push, no acks, flow controlled; from new messages on.
        await js.subscribe(SUBJECT, cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
        conn.send(("ready", None))
        while not got.is_set() and time.monotonic() - last[0] < CONSUMER_QUIET_S:
            try:
                await asyncio.wait_for(got.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        await nc.close()

    try:
        asyncio.run(run())
        conn.send(("done", latencies.tobytes()))
    except BaseException as error:
        conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        conn.close()


def _js_rows(port: int, replicas: int, system: str, messages: int, rate: float, warm: int) -> list[dict]:
    _js_create_stream(port, replicas)
    _js_produce(port, warm, rate, False)
    latencies, failed, seconds = _js_produce(port, messages, rate, False)
    rows = [_line(system, "produce-latency" if replicas == 1 else "produce-latency-r3", latencies, failed,
                  seconds, messages)]
    latencies, failed, seconds = _e2e(_js_consumer, (port,), lambda n, s: _js_produce(port, n, rate, s), messages)
    rows.append(_line(system, "e2e" if replicas == 1 else "e2e-r3", latencies, failed, seconds, messages))
    return rows


def jetstream_r1_rows(messages: int, rate: float, warm: int) -> list[dict]:
    binary = _need("nats-server", "nats", "JetStream R1")
    with Servers() as servers:
        port = _free_ports(1)[0]
        servers.start([binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(servers.dir / "js"),
                       "-n", "r1"], "nats-server", port)
        return _js_rows(port, 1, "JetStream R1 (file)", messages, rate, warm)


def jetstream_r3_rows(messages: int, rate: float, warm: int) -> list[dict]:
    binary = _need("nats-server", "nats", "JetStream R3")
    with Servers() as servers:
        ports = _free_ports(6)
        client_ports, cluster_ports = ports[:3], ports[3:]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in cluster_ports)
        for i in range(3):
            servers.start([binary, "-a", "127.0.0.1", "-p", str(client_ports[i]), "-js",
                           "-sd", str(servers.dir / f"js{i}"), "-n", f"s{i}", "--cluster_name", "bench",
                           "--cluster", f"nats://127.0.0.1:{cluster_ports[i]}", "--routes", routes],
                          f"nats-server-{i}", client_ports[i])
        return _js_rows(client_ports[0], 3, "JetStream R3 (3 servers, file)", messages, rate, warm)


def run_compare(messages: int, rate: float, warm: int, progress: bool = True) -> tuple[list[dict], list[str]]:
    """(latency lines of every system that ran, one sentence per system skipped)."""
    lines: list[dict] = []
    skipped: list[str] = []
    for name, rows in (("Redis Streams", redis_rows), ("JetStream R1", jetstream_r1_rows),
                       ("JetStream R3", jetstream_r3_rows)):
        if progress:
            print(f"[compare] {name}: {messages} messages paced at {rate:g} msg/s ...", flush=True)
        try:
            got = rows(messages, rate, warm)
        except Skip as why:
            skipped.append(str(why))
            print(f"[compare] skipped: {why}", flush=True)
            continue
        except Exception as error:   # a system that fails is reported, and the others still run
            skipped.append(f"{name}: failed: {type(error).__name__}: {error}")
            print(f"[compare] {name} failed: {type(error).__name__}: {error}", flush=True)
            continue
        for line in got:
            print(f"[compare] {line['system']} {line['row']}: p50 {render.fmt_ms(line['p50'])}, "
                  f"p99 {render.fmt_ms(line['p99'])}, p99.9 {render.fmt_ms(line['p999'])}", flush=True)
        lines += got
    return lines, skipped
