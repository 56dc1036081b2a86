"""Real processes, real faults: replication under SIGKILL and SIGSTOP (issue 3).

Each test starts 3 real nodes (`zq_cluster`, a LocalCluster on 127.0.0.1), creates a topic with
replication 3, and runs a steady produce load: a thread sends a bounded number of numbered
messages through one idempotent `acks=quorum` producer and records every outcome (acknowledged
at (partition, offset, epoch), failed, or unknown). While the load runs, a fault hits one node;
when the cluster has recovered, the load stops and `check_read_back` reads every partition from
earliest and asserts the contract:

- every acknowledged message is there exactly once, at its acknowledged offset;
- every other message is there at most once, and nothing is there that was never sent;
- within a partition, messages appear in the order they were sent (max_in_flight=1);
- no two messages share a (partition, offset);

and `check_logs_agree` opens each node's RocksDB read-only and asserts that the stored batches
below the high watermark are the same on all three nodes, data batches byte for byte (no log
diverged).

Waits are polls with named bounds, never blind sleeps. The figures each test measures (time from
the fault to the first acknowledgement of a new leader's epoch, catch-up time of the returning
node) are printed with `-s` and collected in FIGURES.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import statistics
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest
import zmq

import zq
import zq.batch
from zq import protocol as P
from zq.errors import NotEnoughReplicas, ZqError
from zq.io.store import Store, _prefix
from zq.limits import DEFAULT
from zq.types import TopicPartition

pytestmark = pytest.mark.slow

TOPIC = "faults"
PARTITIONS = 2
REPLICATION = 3
META_TOPIC = "__meta"

LOAD_MESSAGES_MAX = 4_000     # the load never sends more than this, whatever happens
LOAD_RATE_PER_S = 250         # steady, well below what 3 nodes on 2 shared cores sustain
# A batch sent to a leader that was killed or paused is retried at the new leader after this long;
# the default (30 s) would make every test wait half a minute for its in-flight batch.
PRODUCER_REQUEST_TIMEOUT_MS = 2_000
SETUP_WAIT_S = 30.0           # topic created and every replica in sync
FAILOVER_WAIT_S = 20.0        # a new leader elected and acknowledging (elections take 1-2 s)
CATCHUP_WAIT_S = 30.0         # a returning node back in the in-sync set
ACKS_WAIT_S = 20.0            # the load makes progress
READ_BACK_WAIT_S = 30.0       # reading every partition back to its high watermark
READ_QUIET_S = 2.0            # ... or until nothing new arrived for this long
POLL_INTERVAL_S = 0.1
PAUSE_S = 3.0                 # a follower's pause: past the longest election timeout (2 s) and the
                              # node's alive window (3 s), so its own timers have all fired on waking

# Status and probe requests: a paused node must cost a test 2 s, not the default 10 s.
FAST_LIMITS = dataclasses.replace(DEFAULT, request_timeout_ms=2_000)

FIGURES: dict[str, list[float]] = collections.defaultdict(list)


# ---------------------------------------------------------------------------- waiting

def wait_until(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """fn()'s first truthy value, polling; a ZqError from fn (a node down, an election) counts as
    not yet. AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except ZqError as e:
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}"
                                 + (f" (last error: {last})" if last else ""))
        time.sleep(POLL_INTERVAL_S)


# ---------------------------------------------------------------------------- the load

class Ack(NamedTuple):
    partition: int
    offset: int
    epoch: int
    at_s: float      # time.monotonic() when the acknowledgement arrived


class Load:
    """A producer thread: up to `messages_max` numbered messages at `rate_per_s`, partition i % P.

    Every message's outcome is recorded: `acked[value] = Ack(...)`, `failed[value] = error`; a
    value in neither (after `finish`) has an unknown outcome. Values are b"<tag>-<i:06d>"."""

    def __init__(self, client: zq.Client, topic: str = TOPIC, partitions: int = PARTITIONS, *, tag: str = "m",
                 messages_max: int = LOAD_MESSAGES_MAX, rate_per_s: float = LOAD_RATE_PER_S) -> None:
        self.topic, self.partitions, self.tag = topic, partitions, tag.encode()
        self.messages_max, self.rate_per_s = messages_max, rate_per_s
        self.producer = client.producer(acks="quorum", idempotent=True, linger_ms=5,
                                        request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS)
        self.sent: list[bytes] = []
        self.acked: dict[bytes, Ack] = {}
        self.failed: dict[bytes, str] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def value(self, i: int) -> bytes:
        return b"%s-%06d" % (self.tag, i)

    @staticmethod
    def index(value: bytes) -> int:
        return int(value.rsplit(b"-", 1)[1])

    def start(self) -> Load:
        self._thread.start()
        return self

    def _run(self) -> None:
        interval_s = 1.0 / self.rate_per_s
        next_s = time.monotonic()
        for i in range(self.messages_max):
            if self._stop.is_set():
                return
            value = self.value(i)
            try:
                future = self.producer.send(self.topic, value, partition=i % self.partitions)
            except ZqError as e:
                with self._changed:
                    self.sent.append(value)
                    self.failed[value] = repr(e)
                continue
            with self._changed:
                self.sent.append(value)
            future.add_done_callback(lambda f, v=value: self._done(v, f))
            next_s += interval_s
            self._stop.wait(max(0.0, next_s - time.monotonic()))

    def _done(self, value: bytes, future: Any) -> None:
        error = future.exception()
        with self._changed:
            if error is None:
                meta = future.result()
                self.acked[value] = Ack(meta.partition, meta.offset, meta.epoch, time.monotonic())
            else:
                self.failed[value] = repr(error)
            self._changed.notify_all()

    def wait(self, pred: Callable[[Load], Any], timeout_s: float, what: str) -> Any:
        """pred(self)'s first truthy value, evaluated under the lock each time an outcome arrives."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                value = pred(self)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"load: timed out after {timeout_s:g} s waiting for {what}; "
                                         f"{len(self.sent)} sent, {len(self.acked)} acked, {len(self.failed)} failed"
                                         + (f", e.g. {next(iter(self.failed.values()))}" if self.failed else ""))
                self._changed.wait(min(left, 0.5))

    def wait_more_acks(self, count: int, timeout_s: float = ACKS_WAIT_S) -> None:
        target = len(self.acked) + count
        self.wait(lambda l: len(l.acked) >= target, timeout_s, f"{count} more acknowledgements")

    def first_ack(self, partition: int, epoch_above: int, after_s: float) -> Ack | None:
        """The earliest acknowledgement on `partition` from an epoch above `epoch_above`, after `after_s`."""
        hits = [a for a in self.acked.values() if a.partition == partition and a.epoch > epoch_above and a.at_s >= after_s]
        return min(hits, key=lambda a: a.at_s) if hits else None

    def finish(self, timeout_s: float = 20.0) -> None:
        """Stop sending; wait (bounded) for the outcomes of what was sent; close the producer."""
        self._stop.set()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the load thread did not stop"
        try:
            self.producer.flush(timeout_s)
        except ZqError:
            pass  # the outcomes left open stay unknown: the checks allow for them
        self.producer.close(0)

    def summary(self) -> str:
        return f"{len(self.sent)} sent, {len(self.acked)} acked, {len(self.failed)} failed"


# ---------------------------------------------------------------------------- reading back

def read_all(client: zq.Client, topic: str, partitions: int) -> list:
    """Every committed message of `topic`, from earliest up to each partition's high watermark."""
    hw = {p: client.list_offsets(topic, p, "latest").high_watermark for p in range(partitions)}
    consumer = client.consumer(topic, start="earliest")
    got: list = []
    deadline = time.monotonic() + READ_BACK_WAIT_S
    last_new_s = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if all(consumer.position(p) >= hw[p] for p in range(partitions)):
                break
            batch = consumer.poll(timeout=0.5, max_messages=5_000)
            if batch:
                got += batch
                last_new_s = time.monotonic()
            elif time.monotonic() - last_new_s > READ_QUIET_S:
                break   # a trailing epoch marker may keep the position below the high watermark
    finally:
        consumer.close()
    return got


def check_read_back(client: zq.Client, load: Load, topic: str = TOPIC, partitions: int = PARTITIONS) -> dict:
    """The contract on what clients saw (see the module docstring); returns counts for the report."""
    messages = read_all(client, topic, partitions)
    at: dict[tuple[int, int], bytes] = {}
    where: dict[bytes, list[tuple[int, int]]] = collections.defaultdict(list)
    for m in messages:
        assert (m.partition, m.offset) not in at, f"two messages at {m.partition}/{m.offset}"
        at[(m.partition, m.offset)] = m.value
        where[m.value].append((m.partition, m.offset))
    sent = set(load.sent)
    strangers = sorted(v for v in where if v not in sent)
    assert not strangers, f"read back messages that were never sent: {strangers[:5]}"
    lost = sorted(v for v in load.acked if v not in where)
    assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {lost[:5]} ({load.summary()})"
    twice = sorted(v for v, w in where.items() if len(w) > 1)
    assert not twice, f"{len(twice)} messages written more than once, e.g. {[(v, where[v]) for v in twice[:3]]}"
    moved = sorted(v for v, a in load.acked.items() if where[v] != [(a.partition, a.offset)])
    assert not moved, f"acknowledged messages not at their acknowledged offset: " \
                      f"{[(v, load.acked[v][:2], where[v]) for v in moved[:3]]}"
    for p in range(partitions):
        indexes = [Load.index(v) for (q, _), v in sorted(at.items()) if q == p]
        assert indexes == sorted(indexes), f"partition {p}: messages out of send order"
        assert all(i % partitions == p for i in indexes), f"partition {p} holds another partition's message"
    unacked = [v for v in load.sent if v not in load.acked]
    return {"read": len(messages), "acked": len(load.acked), "unacked_sent": len(unacked),
            "unacked_present": sum(1 for v in unacked if v in where), "failed": len(load.failed)}


# ---------------------------------------------------------------------------- status and logs

def status_rows(client: zq.Client) -> dict[tuple[str, int], dict]:
    return {(r["topic"], r["partition"]): r for r in client.status()["partitions"]}


def watched(rows: dict[tuple[str, int], dict], topic: str = TOPIC) -> list[dict]:
    """The rows of `topic` and of `__meta`: the partitions a test cares about."""
    return [r for (t, _), r in sorted(rows.items()) if t in (topic, META_TOPIC)]


def all_in_sync(client: zq.Client, names: list[str], topic: str = TOPIC) -> dict | None:
    """The status rows, if every watched partition has a leader, every node in sync and no lag."""
    rows = status_rows(client)
    mine = watched(rows, topic)
    ok = len(mine) == PARTITIONS + 1 and all(
        r["leader"] is not None and sorted(r["in_sync"] or []) == sorted(names) and r["replication_lag"] == 0
        and r["log_end"] == r["high_watermark"] for r in mine)
    return rows if ok else None


def local_status(address: str, timeout_s: float = 2.0) -> list[dict] | None:
    """One node's own view (LocalStatusRequest): the partitions it leads now, or None if it does
    not answer within timeout_s. Asked directly, so the cluster view cannot hide a stale leader."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)  # a probe of a paused node must not hold the test at exit
    try:
        sock.connect(f"tcp://{address}")
        req_id = next(_req_ids)
        sock.send_multipart(P.encode(P.LocalStatusRequest(req_id)))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                return None
            reply, _ = P.decode(sock.recv_multipart())
            if reply.req_id == req_id:
                assert isinstance(reply, P.LocalStatusReply), reply
                return reply.partitions
        return None
    finally:
        sock.close(0)


_req_ids = itertools.count(1 << 20)


def stored_batches(data_dir: Path, tp: TopicPartition) -> list[tuple]:
    """What each batch a node holds says, read-only beside the running node: (base offset, count,
    epoch, flags, crc32 of the stored bytes). An epoch marker (control batch) is made by each
    replica with its own append time, so for those the bytes' checksum is left out."""
    store = Store(data_dir, read_only=True)
    try:
        out = []
        for _, value in store.scan(_prefix(b"L", tp)):
            h = zq.batch.verify_stored(value)
            control = bool(h.flags & zq.batch.FLAG_CONTROL)
            out.append((h.base_offset, h.count, h.epoch, h.flags, None if control else zlib.crc32(value)))
        return out
    finally:
        store.close()


def check_logs_agree(data_dirs: dict[str, Path], topic_id: int, partitions: int, rows: dict) -> dict[str, int]:
    """Every node holds the same batches below the high watermark: no log diverged. Returns each
    partition's high watermark."""
    hws = {}
    for p in range(partitions):
        hw = rows[(TOPIC, p)]["high_watermark"]
        hws[f"p{p}"] = hw
        logs = {name: [b for b in stored_batches(d, TopicPartition(topic_id, p)) if b[0] < hw]
                for name, d in sorted(data_dirs.items())}
        reference = next(iter(logs.values()))
        assert reference, f"partition {p}: no batches below the high watermark {hw}"
        for name, log in logs.items():
            assert log == reference, f"partition {p}: node {name}'s committed log differs " \
                                     f"({len(log)} vs {len(reference)} batches below {hw})"
    return hws


# ---------------------------------------------------------------------------- set-up

def set_up(cluster: Any) -> tuple[zq.Client, zq.Client, int]:
    """The admin client, a status client, and the topic's id, once every replica is in sync."""
    admin = cluster.client()

    def create() -> bool:
        try:
            admin.create_topic(TOPIC, partitions=PARTITIONS, replication=REPLICATION)
            return True
        except NotEnoughReplicas:
            return False  # refused, nothing written: the nodes are still registering in __meta

    wait_until(create, SETUP_WAIT_S, f"creating {TOPIC} with replication {REPLICATION}")
    status = cluster.client(limits=FAST_LIMITS)
    wait_until(lambda: all_in_sync(status, cluster.names), SETUP_WAIT_S, "every replica in sync after creation")
    topic_id = admin.refresh_metadata().topics[TOPIC]["id"]
    return admin, status, topic_id


@pytest.fixture(scope="module", autouse=True)
def print_figures():
    """After the module: the median of each figure the tests measured (shown with -s)."""
    yield
    for name, values in sorted(FIGURES.items()):
        print(f"\n[figures] {name}: median {statistics.median(values):.3f} s over {len(values)} run(s): "
              + ", ".join(f"{v:.3f}" for v in values))


def data_dirs(cluster: Any) -> dict[str, Path]:
    return {n: cluster.data_dir / n for n in cluster.names}


def record(name: str, value: float) -> None:
    FIGURES[name].append(value)
    print(f"\n[figure] {name} = {value:.3f} s (median so far {statistics.median(FIGURES[name]):.3f} s)")


def settle_and_check(cluster: Any, admin: zq.Client, status: zq.Client, load: Load, topic_id: int) -> dict:
    """Stop the load, let every replica catch up, and check what clients saw and what nodes hold."""
    load.finish()
    rows = wait_until(lambda: all_in_sync(status, cluster.names), CATCHUP_WAIT_S, "every replica in sync at the end")
    counts = check_read_back(admin, load)
    counts.update(check_logs_agree(data_dirs(cluster), topic_id, PARTITIONS, rows))
    print(f"\n[read back] {counts}")
    return counts


# ---------------------------------------------------------------------------- the tests

@pytest.mark.zq_cluster(nodes=1)
def test_fault_tool_pauses_resumes_and_kills_a_node(zq_cluster):
    """tools/faults.py finds a LocalCluster node by its command line and signals only it."""
    cluster = zq_cluster
    topology, pid = str(cluster.topology_path), cluster.pid("n1")

    def tool(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "tools" / "faults.py"),
                               *args], capture_output=True, text=True, timeout=30)

    def state() -> str:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    assert tool("pause", topology, "n1").returncode == 0 and state() == "T"
    assert json.loads(tool("list", "--json", topology).stdout)["nodes"][0] == {
        "name": "n1", "address": cluster.address("n1"), "pid": pid, "state": "paused"}
    assert tool("resume", topology, "n1").returncode == 0 and state() != "T"
    wrong = tool("pause", topology, "n7")
    assert wrong.returncode == 1 and "n7" in wrong.stderr
    cut = tool("partition", topology, "n1")   # on loopback: refused, nothing touched
    assert cut.returncode == 1 and "namespace" in cut.stderr
    assert tool("kill", topology, "n1").returncode == 0
    wait_until(lambda: not cluster.is_running("n1"), 10, "n1 to exit")
    assert tool("kill", topology, "n1").returncode == 1


def test_leader_killed_then_restarted(zq_cluster):
    cluster = zq_cluster
    admin, status, topic_id = set_up(cluster)
    load = Load(admin).start()
    try:
        load.wait_more_acks(100)
        row = status_rows(status)[(TOPIC, 0)]
        victim, old_epoch = row["leader"], row["epoch"]

        kill_s = time.monotonic()
        cluster.kill(victim)
        row = wait_until(lambda: (r := status_rows(status)[(TOPIC, 0)])["leader"] not in (None, victim) and r,
                         FAILOVER_WAIT_S, "a new leader in status")
        record("election_s (SIGKILL leader -> new leader in status)", time.monotonic() - kill_s)
        assert row["epoch"] > old_epoch
        # The dead replica leaves the in-sync set once it lacks batches older than IN_SYNC_LAG_MS
        # (1 s); since a closed connection elects at once, the new leader may name it for a moment.
        wait_until(lambda: victim not in status_rows(status)[(TOPIC, 0)]["in_sync"], FAILOVER_WAIT_S,
                   f"{victim} out of the in-sync set")
        first = load.wait(lambda l: l.first_ack(0, old_epoch, kill_s), FAILOVER_WAIT_S,
                          f"an acknowledgement on partition 0 from an epoch after {old_epoch}")
        record("failover_s (SIGKILL leader -> first ack of the new epoch)", first.at_s - kill_s)
        load.wait_more_acks(100)

        restart_s = time.monotonic()
        cluster.restart(victim)
        wait_until(lambda: all(victim in (r["in_sync"] or []) for r in watched(status_rows(status))),
                   CATCHUP_WAIT_S, f"{victim} back in the in-sync set of every partition")
        record("catchup_s (restart of a killed leader -> in sync everywhere)", time.monotonic() - restart_s)
        load.wait_more_acks(100)
    except BaseException:
        load.finish(2)
        raise
    counts = settle_and_check(cluster, admin, status, load, topic_id)
    assert counts["acked"] >= 300


def test_follower_paused_then_resumed(zq_cluster):
    cluster = zq_cluster
    admin, status, topic_id = set_up(cluster)
    rows = status_rows(status)
    leader = rows[(TOPIC, 0)]["leader"]
    # Prefer a follower of partition 0 that leads nothing we watch, so the pause hits a follower only.
    followers = [n for n in cluster.names if n != leader]
    leading = {r["leader"] for r in watched(rows)}
    victim = next((n for n in followers if n not in leading), followers[0])
    others = [n for n in cluster.names if n != victim]
    status = zq.Client(bootstrap=",".join(cluster.address(n) for n in others), cluster=cluster.name,
                       limits=FAST_LIMITS)
    load = Load(admin).start()
    try:
        load.wait_more_acks(100)
        acked_before = len(load.acked)
        pause_s = time.monotonic()
        cluster.pause(victim)
        try:
            # Past the election timeout (1-2 s) and past the in-sync window: the others go on.
            wait_until(lambda: all(victim not in (r["in_sync"] or []) for r in watched(status_rows(status))),
                       FAILOVER_WAIT_S, f"{victim} out of the in-sync set")
            assert all(r["under_replicated"] for r in watched(status_rows(status))), "zq status says so"
            # Hold the pause past the longest election timeout, while the majority goes on committing.
            load.wait_more_acks(200)
            load.wait(lambda l: time.monotonic() - pause_s >= PAUSE_S, FAILOVER_WAIT_S, f"{PAUSE_S:g} s of pause")
            assert len(load.acked) > acked_before + 200
        finally:
            cluster.resume(victim)
        resume_s = time.monotonic()
        wait_until(lambda: all(victim in (r["in_sync"] or []) for r in watched(status_rows(status))),
                   CATCHUP_WAIT_S, f"{victim} back in the in-sync set of every partition")
        record("catchup_s (SIGCONT of a paused follower -> in sync everywhere)", time.monotonic() - resume_s)
        assert not any(r["under_replicated"] for r in watched(status_rows(status)))
        load.wait_more_acks(100)
    except BaseException:
        load.finish(2)
        raise
    counts = settle_and_check(cluster, admin, status, load, topic_id)
    assert counts["acked"] >= 400


def test_leader_paused_cannot_commit_and_steps_down(zq_cluster):
    cluster = zq_cluster
    admin, status, topic_id = set_up(cluster)
    row = status_rows(status)[(TOPIC, 0)]
    victim, old_epoch = row["leader"], row["epoch"]
    others = [n for n in cluster.names if n != victim]
    status = zq.Client(bootstrap=",".join(cluster.address(n) for n in others), cluster=cluster.name,
                       limits=FAST_LIMITS)
    load = Load(admin).start()
    stale = zmq.Context.instance().socket(zmq.DEALER)   # a produce that waits in the paused leader's inbox
    stale.setsockopt(zmq.LINGER, 0)
    stale.connect(f"tcp://{cluster.address(victim)}")
    stale_value = b"stale-while-paused"
    try:
        load.wait_more_acks(100)
        pause_s = time.monotonic()
        cluster.pause(victim)
        try:
            blob = zq.batch.encode_records([[int(time.time() * 1000), None, stale_value, None]])
            stale_req = P.Produce(next(_req_ids), TOPIC, 0, P.ACKS["quorum"], 1, zq.batch.crc(blob), 0, 0, 0)
            stale.send_multipart(P.encode(stale_req, blob))
            first = load.wait(lambda l: l.first_ack(0, old_epoch, pause_s), FAILOVER_WAIT_S,
                              f"an acknowledgement on partition 0 from an epoch after {old_epoch}")
            record("failover_s (SIGSTOP leader -> first ack of the new epoch)", first.at_s - pause_s)
            row = wait_until(lambda: (r := status_rows(status)[(TOPIC, 0)])["leader"] not in (None, victim) and r,
                             FAILOVER_WAIT_S, "a new leader in the majority's status")
            new_epoch = row["epoch"]
            assert new_epoch > old_epoch
            load.wait_more_acks(100)
        finally:
            cluster.resume(victim)
        resume_s = time.monotonic()

        # The old leader's own view: within a bounded time it leads partition 0 no more.
        def stepped_down() -> bool:
            view = local_status(cluster.address(victim))
            return view is not None and all(not (r["topic"] == TOPIC and r["partition"] == 0) for r in view)
        wait_until(stepped_down, FAILOVER_WAIT_S, f"{victim} to stop leading {TOPIC}/0 after it resumed")
        record("stepdown_s (SIGCONT of a stale leader -> it no longer leads)", time.monotonic() - resume_s)
        # The produce it found in its inbox on waking is refused, never acknowledged.
        assert stale.poll(int(FAILOVER_WAIT_S * 1000)), "the stale leader never answered the produce sent while paused"
        reply, _ = P.decode(stale.recv_multipart())
        assert reply.req_id == stale_req.req_id
        assert isinstance(reply, P.ErrorReply), f"a stale leader acknowledged a produce: {reply}"
        print(f"\n[stale produce] answered {reply}")
        # Asked itself, the old leader now names a successor of a newer epoch.
        with zq.Client(bootstrap=cluster.address(victim), cluster=cluster.name, limits=FAST_LIMITS) as own:
            mine = wait_until(lambda: (r := status_rows(own)[(TOPIC, 0)])["leader"] not in (None, victim) and r,
                              FAILOVER_WAIT_S, f"{victim}'s status to name a new leader")
        assert mine["epoch"] >= new_epoch
        wait_until(lambda: all(victim in (r["in_sync"] or []) for r in watched(status_rows(status))),
                   CATCHUP_WAIT_S, f"{victim} back in the in-sync set of every partition")
        record("catchup_s (SIGCONT of a stale leader -> in sync everywhere)", time.monotonic() - resume_s)
        load.wait_more_acks(100)
    except BaseException:
        load.finish(2)
        raise
    finally:
        stale.close(0)
    counts = settle_and_check(cluster, admin, status, load, topic_id)
    messages = read_all(admin, TOPIC, PARTITIONS)
    assert stale_value not in {m.value for m in messages}, "what the stale leader took while paused was committed"
    assert counts["acked"] >= 300




# ---------------------------------------------------------------------------- kept reproducer: producer failover

DEFAULT_FAILOVER_S_MAX = 10.0   # five times the longest election timeout


def test_default_producer_fails_over_soon_after_a_leader_kill(zq_cluster):
    """With the producer's default settings, a SIGKILLed leader should cost about an election, not
    the whole request timeout (30 s) or two of them: the batch in flight to the dead leader waits
    for its timeout, and its retry may go to the dead address again."""
    cluster = zq_cluster
    admin, status, _ = set_up(cluster)
    load = Load(admin)
    load.producer.close(0)
    load.producer = admin.producer(acks="quorum", idempotent=True, linger_ms=5)   # default request timeout
    load.start()
    try:
        load.wait_more_acks(100)
        row = status_rows(status)[(TOPIC, 0)]
        kill_s = time.monotonic()
        cluster.kill(row["leader"])
        load.wait(lambda l: l.first_ack(0, row["epoch"], kill_s), DEFAULT_FAILOVER_S_MAX,
                  f"an acknowledgement on partition 0 from an epoch after {row['epoch']}")
    finally:
        load.finish(2)
