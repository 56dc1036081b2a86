"""A real network partition (issue 3): the leader cut off by taking its link down, then healed.

Three nodes run in network namespaces h0..h2 of a `Lan` (tests/netns.py: made and removed by the
test, as root; nothing reaches the host's network), started with `python -m zq node start --name
nX --topology F` where F lists the namespace addresses, discovery off and seeds. The client side
runs in a fourth namespace, h3, whose link stays up: the `driver()` below, a small process the
test talks to in JSON lines on its stdin/stdout, runs the same load and checks as
tests/test_faults.py. Probes that must reach the cut-off node run inside its own namespace. The
cut and the heal are made with the operator's tool, `tools/faults.py partition|heal`.

The test asserts: the majority elects a new leader and goes on acknowledging; the cut-off leader
commits nothing (its high watermark does not move, a quorum produce sent to it is refused, never
acknowledged, and it stops leading within a bounded time, by check-quorum); after healing, every
replica is back in sync, every acknowledged message reads back exactly once at its offset, the
minority's write is nowhere, and the committed logs of the three nodes are identical.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from tests.netns import ROOT_REASON, Lan, is_root
from tests.test_faults import (FAILOVER_WAIT_S, PARTITIONS, TOPIC, check_logs_agree, record)

pytestmark = [pytest.mark.netns, pytest.mark.slow]

NODES = 3
CLIENT_HOST = NODES           # h3: the load and the checks run here; its link is never cut
PORT = 7100
REPO = Path(__file__).resolve().parent.parent
DRIVER_REPLY_WAIT_S = 90.0    # the longest driver step (finish and read back) stays well below this
PROBE_WAIT_S = 30.0
PARTITION_HOLD_S = 4.0        # the cut lasts at least this: past check-quorum (one election timeout)
MINORITY_WRITE = b"minority-write"


def topology_text(cluster: str, data_dir: Path, addresses: list[str]) -> str:
    seeds = ", ".join(f'"{a}:{PORT}"' for a in addresses)
    lines = ["[cluster]", f'name = "{cluster}"', f'data_dir = "{data_dir}"', 'discovery = "off"', f"seeds = [{seeds}]"]
    for i, address in enumerate(addresses):
        lines += ["", "[[node]]", f'name = "n{i + 1}"', f'host = "{address}"', f"port = {PORT}"]
    return "\n".join(lines) + "\n"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *(p for p in sys.path if p)])
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---------------------------------------------------------------------------- the driver (runs in h3)

def driver() -> None:
    """JSON lines in, JSON lines out: one reply per command; {"error": ...} when a step fails."""
    import zq
    from tests import test_faults as F

    bootstrap, cluster = sys.argv[1], sys.argv[2]
    admin = zq.Client(bootstrap=bootstrap, cluster=cluster)
    load: F.Load | None = None

    def status(addresses: list[str]) -> list[dict]:
        with zq.Client(bootstrap=",".join(addresses), cluster=cluster, limits=F.FAST_LIMITS) as c:
            return list(F.status_rows(c).values())

    def in_sync(names: list[str]) -> list[dict]:
        with zq.Client(bootstrap=bootstrap, cluster=cluster, limits=F.FAST_LIMITS) as c:
            rows = F.wait_until(lambda: F.all_in_sync(c, names), F.CATCHUP_WAIT_S, "every replica in sync")
        return list(rows.values())

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "setup":
                F.wait_until(lambda: _create(admin, F), F.SETUP_WAIT_S, f"creating {F.TOPIC}")
                out: Any = {"rows": in_sync(cmd["names"]), "topic_id": admin.refresh_metadata().topics[F.TOPIC]["id"]}
            elif op == "status":
                out = {"rows": status(cmd["addresses"])}
            elif op == "in_sync":
                out = {"rows": in_sync(cmd["names"])}
            elif op == "load_start":
                load = F.Load(admin).start()
                out = {}
            elif op == "load_more":
                load.wait_more_acks(cmd["count"])
                out = {"acked": len(load.acked)}
            elif op == "first_ack":
                ack = load.wait(lambda l: l.first_ack(cmd["partition"], cmd["epoch_above"], cmd["after_s"]),
                                F.FAILOVER_WAIT_S, "an acknowledgement from a newer epoch")
                out = {"ack": list(ack)}
            elif op == "finish":
                load.finish()
                rows = in_sync(cmd["names"])
                counts = F.check_read_back(admin, load)
                values = {m.value for m in F.read_all(admin, F.TOPIC, F.PARTITIONS)}
                out = {"rows": rows, "counts": counts,
                       "present": [v.decode() for v in map(str.encode, cmd["absent"]) if v in values]}
            elif op == "quit":
                print(json.dumps({"ok": True}), flush=True)
                break
            else:
                raise ValueError(f"unknown op {op!r}")
            print(json.dumps({"ok": True, **out}), flush=True)
        except BaseException:
            print(json.dumps({"ok": False, "error": traceback.format_exc()}), flush=True)
    if load is not None:
        load.finish(2)
    admin.close()


def _create(admin: Any, F: Any) -> bool:
    from zq.errors import NotEnoughReplicas
    try:
        admin.create_topic(F.TOPIC, partitions=F.PARTITIONS, replication=F.REPLICATION)
        return True
    except NotEnoughReplicas:
        return False


class Driver:
    """The test's end of the driver: call(op, **args) -> reply dict, bounded in time."""

    def __init__(self, lan: Lan, bootstrap: str, cluster: str, log: Path) -> None:
        self._log = open(log, "w")
        self.proc = lan.popen(CLIENT_HOST, [sys.executable, "-c", "from tests.test_netpartition import driver; driver()",
                                            bootstrap, cluster],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, cwd=REPO, env=_env())
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)

    def call(self, op: str, **args: Any) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            reply = json.loads(self._lines.get(timeout=DRIVER_REPLY_WAIT_S))
        except queue.Empty:
            raise AssertionError(f"the driver did not answer {op!r} in {DRIVER_REPLY_WAIT_S:g} s") from None
        assert reply["ok"], f"driver step {op!r} failed:\n{reply['error']}"
        return reply

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("quit")
                self.proc.wait(10)
        finally:
            self._log.close()


def fault_tool(*args: Any) -> str:
    """tools/faults.py, as an operator runs it."""
    result = subprocess.run([sys.executable, str(REPO / "tools" / "faults.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=30, env=_env())
    assert result.returncode == 0, f"tools/faults.py {' '.join(map(str, args))}: {result.stderr}"
    return result.stdout


# ---------------------------------------------------------------------------- probes (run in the cut-off node's namespace)

PROBE = r"""
import json, sys, time
import zmq
import zq.batch
from zq import protocol as P
from tests.test_faults import local_status
address, topic, hold_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
start = time.monotonic()
views = []      # (seconds since start, epoch, high watermark) while it says it leads topic/0
stepped_down_s = None
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(f"tcp://{address}")
blob = zq.batch.encode_records([[int(time.time() * 1000), None, b"minority-write", None]])
sock.send_multipart(P.encode(P.Produce(7, topic, 0, P.ACKS["quorum"], 1, zq.batch.crc(blob), 0, 0, 0), blob))
while time.monotonic() - start < hold_s:
    view = local_status(address, 1.0) or []
    mine = [r for r in view if r["topic"] == topic and r["partition"] == 0]
    if mine:
        views.append((time.monotonic() - start, mine[0]["epoch"], mine[0]["high_watermark"]))
    elif stepped_down_s is None:
        stepped_down_s = time.monotonic() - start
    time.sleep(0.1)
reply = None
if sock.poll(1000):
    reply = repr(P.decode(sock.recv_multipart())[0])
print(json.dumps({"views": views, "stepped_down_s": stepped_down_s, "reply": reply}))
"""


def test_leader_cut_off_then_healed(tmp_path):
    if not is_root():
        pytest.skip(ROOT_REASON)
    with Lan(hosts=NODES + 1) as lan:
        addresses = lan.addresses[:NODES]
        names = [f"n{i + 1}" for i in range(NODES)]
        cluster = f"zqt-part-{os.getpid()}"
        topology = tmp_path / "topology.toml"
        topology.write_text(topology_text(cluster, tmp_path / "data", addresses))
        logs = []
        for i, name in enumerate(names):
            log = open(tmp_path / f"{name}.log", "w")
            logs.append(log)
            lan.popen(i, [sys.executable, "-m", "zq", "node", "start", "--name", name, "--topology", str(topology)],
                      stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=_env())
        drv = Driver(lan, ",".join(f"{a}:{PORT}" for a in addresses), cluster, tmp_path / "driver.log")
        try:
            _scenario(lan, drv, names, addresses, topology, tmp_path)
        except BaseException:
            for name in names:  # the nodes' last words, for the failure report
                print(f"---- {name} log tail ----\n" + (tmp_path / f"{name}.log").read_text()[-3000:])
            print("---- driver log tail ----\n" + (tmp_path / "driver.log").read_text()[-3000:])
            raise
        finally:
            drv.close()
            for log in logs:
                log.close()


def _scenario(lan: Lan, drv: Driver, names: list[str], addresses: list[str], topology: Path, tmp_path: Path) -> None:
    setup = drv.call("setup", names=names)
    topic_id = setup["topic_id"]
    drv.call("load_start")
    drv.call("load_more", count=100)
    row = next(r for r in drv.call("status", addresses=[f"{a}:{PORT}" for a in addresses])["rows"]
               if (r["topic"], r["partition"]) == (TOPIC, 0))
    victim, old_epoch = row["leader"], row["epoch"]
    cut = names.index(victim)
    majority = [f"{addresses[i]}:{PORT}" for i in range(len(names)) if i != cut]

    cut_s = time.monotonic()
    fault_tool("partition", topology, victim)   # the operator's tool finds the node's namespace and link
    try:
        probe = lan.popen(cut, [sys.executable, "-c", PROBE, f"{addresses[cut]}:{PORT}", TOPIC, str(PARTITION_HOLD_S)],
                          cwd=REPO, env=_env())
        # The majority elects a new leader and goes on acknowledging.
        deadline = time.monotonic() + FAILOVER_WAIT_S
        while True:
            rows = {(r["topic"], r["partition"]): r for r in drv.call("status", addresses=majority)["rows"]}
            new = rows[(TOPIC, 0)]
            if new["leader"] not in (None, victim):
                break
            assert time.monotonic() < deadline, f"no new leader of {TOPIC}/0 in the majority: {new}"
            time.sleep(0.1)
        record("election_s (leader link down -> new leader in the majority's status)", time.monotonic() - cut_s)
        assert new["epoch"] > old_epoch
        ack = drv.call("first_ack", partition=0, epoch_above=old_epoch, after_s=cut_s)["ack"]
        record("failover_s (leader link down -> first ack of the new epoch)", ack[3] - cut_s)
        drv.call("load_more", count=200)
        out, err = probe.communicate(timeout=PROBE_WAIT_S)
        assert probe.returncode == 0, f"the minority probe failed: {err}"
        minority = json.loads(out)
    except BaseException:
        lan.set_link(cut, up=True)
        raise
    fault_tool("heal", topology, victim)
    heal_s = time.monotonic()

    # The cut-off leader committed nothing, acknowledged nothing, and stopped leading.
    hws = {hw for _, _, hw in minority["views"]}
    assert len(hws) <= 1, f"the cut-off leader's high watermark moved: {minority['views']}"
    assert {e for _, e, _ in minority["views"]} <= {old_epoch}
    assert minority["stepped_down_s"] is not None, f"the cut-off leader still led after {PARTITION_HOLD_S} s"
    print(f"\n[minority] stepped down after {minority['stepped_down_s']:.2f} s; produce answered {minority['reply']}")
    assert minority["reply"] is None or "ProduceReply" not in minority["reply"], \
        f"the cut-off leader acknowledged a quorum produce: {minority['reply']}"

    # Healed: the old leader catches up, everything reads back, the logs agree.
    drv.call("in_sync", names=names)
    record("catchup_s (heal -> every replica in sync)", time.monotonic() - heal_s)
    drv.call("load_more", count=100)
    final = drv.call("finish", names=names, absent=[MINORITY_WRITE.decode()])
    print(f"\n[read back] {final['counts']}")
    assert final["present"] == [], "the minority's write was committed"
    assert final["counts"]["acked"] >= 400
    rows = {(r["topic"], r["partition"]): r for r in final["rows"]}
    data_dirs = {n: tmp_path / "data" / n for n in names}
    print(f"\n[logs agree] {check_logs_agree(data_dirs, topic_id, PARTITIONS, rows)}")
