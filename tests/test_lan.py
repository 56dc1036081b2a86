"""LAN clusters on a real (virtual) LAN: nodes as `python -m zq node start` processes in Linux network
namespaces joined by a bridge (tests/netns.py, root only). Every packet stays inside the test's
namespaces. Clients run inside a namespace too (the host has no route to the test LAN).

What is measured (printed; run with `-s` to see it): how long discovery alone takes to form a
cluster, and how long the failure detector takes to suspect and to declare a SIGKILLed node dead.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.netns import ROOT_REASON, Lan, is_root
from zq.io.membership import NODE_MEMBERSHIP

PY = sys.executable
SERVICE = "zq.io.membership"
PORT = 7100
FORM_TIMEOUT_S = 25.0        # bound on a cluster forming (processes start, zeroconf probes, pings)
DEAD_TIMEOUT_S = 20.0        # bound on a killed node being declared dead
# A killed node is probed within two rounds of probe periods, suspected one period later, and
# declared dead a suspicion timeout after that; the slack covers a loaded 2-core machine.
DEAD_BOUND_S = (3 * NODE_MEMBERSHIP.probe_interval_ms + NODE_MEMBERSHIP.suspicion_timeout_ms) / 1000 + 4.0
PAUSE_S = 3.0                # less than the suspicion timeout (5 s), long enough to be suspected
STATUS_POLL_S = 0.2

# Runs inside a namespace: polls client.status() on one node and prints a JSON line each time the
# node states change, until every state in WANT holds or the timeout passes.
WATCH = textwrap.dedent("""
    import json, sys, time
    from zq.client import Client
    boot, timeout_s, want = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
    deadline, last = time.time() + timeout_s, None
    with Client(bootstrap=boot) as client:
        while time.time() < deadline:
            try:
                states = {n["name"]: n["state"] for n in client.status()["nodes"]}
            except Exception as e:
                states = {"error": type(e).__name__}
            if states != last:
                print(json.dumps({"t": time.time(), "states": states}), flush=True)
                last = states
            if all(states.get(k) in (v if isinstance(v, list) else [v]) for k, v in want.items()):
                break
            time.sleep(%s)
""" % STATUS_POLL_S)

# Runs inside a namespace: creates a topic (or not), produces N messages with acks=quorum to
# every partition, then reads every partition from earliest and prints what it read.
PRODUCE_AND_READ = textwrap.dedent("""
    import json, sys, time
    from zq.client import Client
    from zq.errors import NotEnoughReplicas
    boot, topic, tag, n, create = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
    with Client(bootstrap=boot) as client:
        for attempt in range(100 if create else 0):   # nodes register in __meta shortly after they start
            try:
                client.create_topic(topic, partitions=3, replication=3)
                break
            except NotEnoughReplicas:
                time.sleep(0.2)
        producer = client.producer(acks="quorum")
        futures = [producer.send(topic, f"{tag}-{i}".encode(), partition=i % 3) for i in range(n)]
        metas = [f.result(60) for f in futures]
        producer.flush(30)
        consumer = client.consumer(topic, start="earliest")
        values, deadline = [], time.time() + 30
        while time.time() < deadline:
            values += [m.value.decode() for m in consumer.poll(timeout=0.5)]
            if sum(v.startswith(tag) for v in values) >= n:
                break
        consumer.close()
    print(json.dumps({"partitions": sorted({m.partition for m in metas}), "values": values}))
""")


@pytest.fixture
def root():
    if not is_root():
        pytest.skip(ROOT_REASON)


def write_topology(path: Path, cluster: str, hosts: list[tuple[str, str]], discovery: str, data_dir: Path) -> Path:
    lines = ["[cluster]", f'name = "{cluster}"', f'data_dir = "{data_dir}"', f'discovery = "{discovery}"', ""]
    for name, host in hosts:
        lines += ["[[node]]", f'name = "{name}"', f'host = "{host}"', f"port = {PORT}", ""]
    path.write_text("\n".join(lines))
    return path


def start_node(lan: Lan, i: int, topology: Path, log_dir: Path) -> subprocess.Popen:
    with open(log_dir / f"n{i + 1}.log", "w") as log:   # the child holds its own copy of the descriptor
        return lan.popen(i, [PY, "-m", "zq", "node", "start", "--name", f"n{i + 1}", "--topology", str(topology),
                             "--service", SERVICE], stdout=log, stderr=subprocess.STDOUT)


def form_cluster(lan: Lan, tmp_path: Path, cluster: str, discovery: str) -> list[subprocess.Popen]:
    """n1..n3 on the LAN's first three hosts from one topology file, once all three are alive to n1."""
    ip = lan.addresses
    topology = write_topology(tmp_path / "lan.toml", cluster, [(f"n{i + 1}", ip[i]) for i in range(3)],
                              discovery, tmp_path / "data")
    procs = [start_node(lan, i, topology, tmp_path) for i in range(3)]
    want = {"n1": "alive", "n2": "alive", "n3": "alive"}
    assert reached(watch(lan, 0, f"{ip[0]}:{PORT}", want, FORM_TIMEOUT_S), want), logs(tmp_path)
    return procs


def watch(lan: Lan, host: int, boot: str, want: dict, timeout_s: float) -> list[dict]:
    """State changes seen by client.status() on `boot`, up to the first sample where `want` holds."""
    result = lan.run(host, [PY, "-c", WATCH, boot, str(timeout_s), json.dumps(want)], timeout_s=timeout_s + 30)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def reached(samples: list[dict], want: dict) -> float | None:
    """When `want` (node -> state, or list of acceptable states) first held, or None."""
    for s in samples:
        if all(s["states"].get(k) in (v if isinstance(v, list) else [v]) for k, v in want.items()):
            return s["t"]
    return None


def first_time(samples: list[dict], node: str, state: str) -> float | None:
    return next((s["t"] for s in samples if s["states"].get(node) == state), None)


def produce_and_read(lan: Lan, host: int, boot: str, topic: str, tag: str, n: int, create: bool) -> dict:
    result = lan.run(host, [PY, "-c", PRODUCE_AND_READ, boot, topic, tag, str(n), "1" if create else "0"],
                     timeout_s=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def metric(lan: Lan, host: int, address: str, kind: str) -> int:
    """A counter from a node's /metrics (zq_events{kind=...}), read from inside the LAN."""
    code = ("import sys, urllib.request; print(urllib.request.urlopen(f'http://{sys.argv[1]}/metrics', timeout=5)"
            ".read().decode())")
    h, p = address.rsplit(":", 1)
    text = lan.run(host, [PY, "-c", code, f"{h}:{int(p) + 2}"], timeout_s=30).stdout
    for line in text.splitlines():
        if line.startswith("zq_events_total{") and f'kind="{kind}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(log_dir.glob("*.log")))


@pytest.mark.netns
def test_three_nodes_find_each_other_by_zeroconf_alone(root, tmp_path):
    """No seeds: each node's topology names only itself, so zeroconf is the only way to the others."""
    with Lan(hosts=3) as lan:
        ip = lan.addresses
        topologies = [write_topology(tmp_path / f"n{i + 1}.toml", "lan-disc", [(f"n{i + 1}", ip[i])], "zeroconf",
                                     tmp_path / "data") for i in range(3)]
        started = time.time()
        for i in range(3):
            start_node(lan, i, topologies[i], tmp_path)
        # "joining": alive to the failure detector, not (yet) in this node's metadata. Each node here
        # keeps its own metadata (nothing tells it the others' voters), so the others may stay joining.
        views, formed = [], []
        for i in range(3):
            want = {f"n{j + 1}": "alive" if j == i else ["alive", "joining"] for j in range(3)}
            views.append(watch(lan, i, f"{ip[i]}:{PORT}", want, FORM_TIMEOUT_S))
            formed.append(reached(views[-1], want))
        assert all(formed), f"{views}\n{logs(tmp_path)}"
        print(f"\nzeroconf alone: every node lists the other 2 as alive (or joining) in its status {max(formed) - started:.1f} s "
              f"after the 3 processes were started")
        assert metric(lan, 0, f"{ip[0]}:{PORT}", "membership_became_alive") >= 2


@pytest.mark.netns
def test_seeds_alone_form_the_cluster_and_a_short_pause_is_not_a_death(root, tmp_path):
    with Lan(hosts=3) as lan:
        ip = lan.addresses
        topology = write_topology(tmp_path / "lan.toml", "lan-seeds", [(f"n{i + 1}", ip[i]) for i in range(3)],
                                  "off", tmp_path / "data")
        procs = [start_node(lan, i, topology, tmp_path) for i in range(3)]
        want = {"n1": "alive", "n2": "alive", "n3": "alive"}
        formed = watch(lan, 0, f"{ip[0]}:{PORT}", want, FORM_TIMEOUT_S)
        assert reached(formed, want), f"{formed}\n{logs(tmp_path)}"
        # Let the detector run for a couple of probe periods before the pause.
        time.sleep(2 * NODE_MEMBERSHIP.probe_interval_ms / 1000)

        # Watch from before the pause to well past a suspicion timeout after it: n2 must never be dead.
        watch_s = PAUSE_S + NODE_MEMBERSHIP.suspicion_timeout_ms / 1000 + 3
        watcher = lan.popen(0, [PY, "-c", WATCH, f"{ip[0]}:{PORT}", str(watch_s), json.dumps({"n2": "dead"})])
        time.sleep(1.0)   # the watcher's first sample
        os.kill(procs[1].pid, signal.SIGSTOP)
        paused = time.time()
        time.sleep(PAUSE_S)
        os.kill(procs[1].pid, signal.SIGCONT)
        out, err = watcher.communicate(timeout=watch_s + 30)
        assert watcher.returncode == 0, err
        after = [json.loads(line) for line in out.splitlines()]
        assert first_time(after, "n2", "dead") is None, f"{after}\n{logs(tmp_path)}"
        assert after[-1]["states"] == want, after
        for i in (0, 2):
            assert metric(lan, i, f"{ip[i]}:{PORT}", "membership_deaths_declared") == 0
        assert metric(lan, 0, f"{ip[0]}:{PORT}", "membership_pings_sent") > 0
        suspected = first_time(after, "n2", "suspect")
        print(f"\nSIGSTOP for {PAUSE_S} s: n2 {'suspected but ' if suspected else ''}never declared dead "
              f"({time.time() - paused:.1f} s watched)")


@pytest.mark.netns
def test_a_killed_node_is_declared_dead_and_its_partitions_keep_serving(root, tmp_path):
    with Lan(hosts=3) as lan:
        ip = lan.addresses
        procs = form_cluster(lan, tmp_path, "lan-kill", "off")
        boot = ",".join(f"{a}:{PORT}" for a in ip[:2])
        before = produce_and_read(lan, 0, boot, "orders", "before", 30, create=True)
        assert before["partitions"] == [0, 1, 2]

        os.kill(procs[2].pid, signal.SIGKILL)
        killed = time.time()
        seen = watch(lan, 0, f"{ip[0]}:{PORT}", {"n3": "dead"}, DEAD_TIMEOUT_S)
        suspected, dead = first_time(seen, "n3", "suspect"), first_time(seen, "n3", "dead")
        assert dead is not None, f"{seen}\n{logs(tmp_path)}"
        print(f"\nSIGKILL: n3 suspected after {suspected - killed:.1f} s, declared dead after {dead - killed:.1f} s"
              if suspected else f"\nSIGKILL: n3 declared dead after {dead - killed:.1f} s")
        assert dead - killed <= DEAD_BOUND_S
        # One of the survivors declared it (the other may have learnt it by gossip, which is not a declaration).
        assert sum(metric(lan, i, f"{ip[i]}:{PORT}", "membership_deaths_declared") for i in range(2)) >= 1

        # Every partition (replication 3) still takes quorum writes and serves reads from n1 and n2.
        after = produce_and_read(lan, 1, boot, "orders", "after", 30, create=False)
        assert after["partitions"] == [0, 1, 2]
        assert sorted(v for v in after["values"] if v.startswith("after")) == sorted(f"after-{i}" for i in range(30))
        assert sorted(v for v in after["values"] if v.startswith("before")) == sorted(f"before-{i}" for i in range(30))


# --------------------------------------------------------------------------------------------
# In-process, on loopback (no root needed): the service inside real nodes


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_the_service_in_real_nodes_on_loopback(tmp_path):
    import zmq

    from tests.nodeutil import start_nodes
    from zq import protocol as P
    from zq.core.membership import Ping
    nodes = start_nodes(tmp_path, 3, services=(SERVICE,), discovery=False)
    try:
        assert wait_for(lambda: all(n.node is not None for n in nodes), 10)
        names = ["n1", "n2", "n3"]

        def states(n) -> dict:
            return {m: (n.node.member_view(m, n.node.now_ms()) or ("unknown",))[0] for m in names if m != n.config.name}
        assert wait_for(lambda: all(set(states(n).values()) == {"alive"} for n in nodes), 10), [states(n) for n in nodes]

        # Peer input the core refuses (a Ping claiming to come from n1 itself) is counted and dropped.
        ctx = zmq.Context.instance()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(f"tcp://{nodes[0].address}")
        raw.send_multipart(P.encode(Ping(1, "n1", "127.0.0.1:1", 0, "", [])))
        assert wait_for(lambda: nodes[0].node.counters["membership_protocol_errors"] == 1, 5)
        raw.close(0)

        nodes[2].stop()   # a clean stop: the others hear that n3 left, at once
        assert wait_for(lambda: states(nodes[0])["n3"] == "left" and states(nodes[1])["n3"] == "left", 3)
        assert states(nodes[0])["n2"] == "alive"
        assert nodes[0].node.counters["membership_became_left"] >= 1
    finally:
        for n in nodes:
            if n.thread.is_alive():
                n.stop()


@pytest.mark.netns
def test_nodes_with_no_topology_and_no_seeds_form_one_cluster_by_zeroconf(root, tmp_path):
    """`zq node start --name nX --bind IP --cluster C` on three hosts, nothing else: they find each
    other by zeroconf, one founds the cluster, the others learn it from that node, and a topic
    replicated on all three serves."""
    with Lan(hosts=3) as lan:
        ip = lan.addresses
        started = time.time()
        for i in range(3):
            with open(tmp_path / f"n{i + 1}.log", "w") as log:
                lan.popen(i, [PY, "-m", "zq", "node", "start", "--name", f"n{i + 1}", "--bind", ip[i],
                              "--port", str(PORT), "--cluster", "lan-join", "--data-dir", str(tmp_path / f"n{i + 1}")],
                          stdout=log, stderr=subprocess.STDOUT)
        want = {f"n{j + 1}": "alive" for j in range(3)}       # alive: registered in the one cluster's metadata
        views = watch(lan, 2, f"{ip[2]}:{PORT}", want, FORM_TIMEOUT_S)
        formed = reached(views, want)
        assert formed, f"{views}\n{logs(tmp_path)}"
        print(f"\nno topology, no seeds: one cluster of 3 formed {formed - started:.1f} s after the processes started")
        out = produce_and_read(lan, 1, f"{ip[1]}:{PORT}", "joined", "j", 30, create=True)
        assert sorted(v for v in out["values"] if v.startswith("j-")) == sorted(f"j-{i}" for i in range(30))


# Runs inside a namespace: an idempotent quorum producer to partition 0 in a thread while the
# partition is reassigned onto n4 with `zq topic reassign` (the CLI, as a user would); prints the
# acknowledged (value, offset) pairs and the CLI's output.
REASSIGN_UNDER_LOAD = textwrap.dedent("""
    import json, subprocess, sys, threading, time
    from zq.client import Client
    boot, topic, target = sys.argv[1], sys.argv[2], sys.argv[3]
    acked, failed, stop = [], [], threading.Event()
    def produce():
        with Client(bootstrap=boot) as client:
            producer = client.producer(acks="quorum", idempotent=True)
            deadline, i = time.time() + 60, 0
            while not stop.is_set() and i < 5000 and time.time() < deadline:
                try:
                    acked.append((f"m-{i}", producer.send(topic, f"m-{i}".encode(), partition=0).result(30).offset))
                except Exception as e:
                    failed.append(repr(e))
                i += 1
                time.sleep(0.003)
            producer.close()
    t = threading.Thread(target=produce)
    t.start()
    time.sleep(1.0)
    started = time.time()
    cli = subprocess.run([sys.executable, "-m", "zq", "topic", "reassign", topic, "--partition", "0",
                          "--replicas", target, "--timeout", "60", "--bootstrap", boot],
                         capture_output=True, text=True, timeout=120)
    moved_s = time.time() - started
    time.sleep(0.5)
    stop.set()
    t.join(90)
    print(json.dumps({"acked": acked, "failed": failed[:5], "cli_rc": cli.returncode, "cli_out": cli.stdout,
                      "cli_err": cli.stderr, "moved_s": moved_s}))
""")

# Runs inside a namespace: reads partition 0 from earliest and prints (value, offset) pairs.
READ_PARTITION = textwrap.dedent("""
    import json, sys, time
    from zq.client import Client
    boot, topic, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with Client(bootstrap=boot) as client:
        consumer = client.consumer(topic, start="earliest", partitions=[0])
        got, deadline = [], time.time() + 60
        while len(got) < want and time.time() < deadline:
            got += [(m.value.decode(), m.offset) for m in consumer.poll(timeout=0.5)]
        consumer.close()
    print(json.dumps(got))
""")


@pytest.mark.netns
def test_a_fourth_node_started_later_joins_by_zeroconf_and_takes_a_reassigned_partition(root, tmp_path):
    """Three nodes from a topology; a fourth on another host with nothing but `--cluster` finds them by
    zeroconf, `zq topic reassign` moves partition 0 from n1 onto it under load, and with n2 then killed
    the partition still takes quorum writes from n3 and n4 and serves every acknowledged message once."""
    with Lan(hosts=4) as lan:
        ip = lan.addresses
        procs = form_cluster(lan, tmp_path, "lan-grow", "zeroconf")
        boot = ",".join(f"{a}:{PORT}" for a in ip[:3])
        before = produce_and_read(lan, 0, boot, "orders", "before", 30, create=True)
        assert before["partitions"] == [0, 1, 2]

        started = time.time()
        with open(tmp_path / "n4.log", "w") as log:
            procs.append(lan.popen(3, [PY, "-m", "zq", "node", "start", "--name", "n4", "--bind", ip[3], "--port",
                                       str(PORT), "--cluster", "lan-grow", "--data-dir", str(tmp_path / "n4")],
                                   stdout=log, stderr=subprocess.STDOUT))
        joined = reached(watch(lan, 0, f"{ip[0]}:{PORT}", {"n4": "alive"}, FORM_TIMEOUT_S), {"n4": "alive"})
        assert joined, logs(tmp_path)
        print(f"\nn4 (no topology, no seeds) joined by zeroconf {joined - started:.1f} s after its start")

        result = lan.run(0, [PY, "-c", REASSIGN_UNDER_LOAD, boot, "orders", "n4,n2,n3"], timeout_s=200)
        assert result.returncode == 0, result.stderr[-3000:]
        out = json.loads(result.stdout.splitlines()[-1])
        assert out["cli_rc"] == 0, f"{out['cli_out']}\n{out['cli_err']}\n{logs(tmp_path)}"
        assert "done" in out["cli_out"], out["cli_out"]
        assert not out["failed"] and len(out["acked"]) > 100, out["failed"]
        print(f"reassigned orders/0 from n1,n2,n3 to n4,n2,n3 under load in {out['moved_s']:.1f} s "
              f"({len(out['acked'])} messages acknowledged meanwhile)")

        os.kill(procs[1].pid, signal.SIGKILL)    # n2: the new set's only survivors are n3 and n4
        survivors = f"{ip[2]}:{PORT},{ip[3]}:{PORT}"
        after = produce_and_read(lan, 3, survivors, "orders", "after", 9, create=False)
        assert sorted(v for v in after["values"] if v.startswith("after")) == sorted(f"after-{i}" for i in range(9))
        read = lan.run(3, [PY, "-c", READ_PARTITION, survivors, "orders", str(len(out["acked"]) + 13)], timeout_s=120)
        got = [tuple(x) for x in json.loads(read.stdout.splitlines()[-1])]
        values = [v for v, _ in got]
        assert len(values) == len(set(values)), "every message once"
        missing = {tuple(x) for x in out["acked"]} - set(got)
        assert not missing, f"{len(missing)} acknowledged messages missing, e.g. {sorted(missing)[:3]}"


@pytest.mark.netns
def test_a_secured_lan_cluster_serves_a_client_with_a_key_and_refuses_one_without(root, tmp_path):
    """[security] on three hosts: the nodes replicate over CurveZMQ, a client on a fourth host with an
    allowed key produces and reads with quorum acks, one with a stranger's key or none gets nothing."""
    keys = tmp_path / "keys"
    for out, name in ((keys, "cluster"), (keys / "clients", "app1"), (tmp_path / "strangers", "eve")):
        made = subprocess.run([PY, "-m", "zq", "keys", "generate", "--out", str(out), "--name", name],
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
    with Lan(hosts=4) as lan:
        ip = lan.addresses
        topology = write_topology(tmp_path / "lan.toml", "lan-secure", [(f"n{i + 1}", ip[i]) for i in range(3)],
                                  "off", tmp_path / "data")
        with open(topology, "a") as f:
            f.write('[security]\ncluster_secret_key_file = "keys/cluster.key_secret"\n'
                    'cluster_public_key_file = "keys/cluster.key"\nallowed_clients_dir = "keys/clients"\n')
        for i in range(3):
            start_node(lan, i, topology, tmp_path)
        boot = ",".join(f"{a}:{PORT}" for a in ip[:3])
        allowed = {**os.environ, "ZQ_CLUSTER_KEY": str(keys / "cluster.key"),
                   "ZQ_CLIENT_KEY": str(keys / "clients" / "app1.key_secret")}
        deadline = time.time() + FORM_TIMEOUT_S
        out = None
        while time.time() < deadline:   # the nodes register with each other first
            run = lan.popen(3, [PY, "-c", PRODUCE_AND_READ, boot, "secret", "s", "30", "1"], env=allowed)
            stdout, stderr = run.communicate(timeout=150)
            if run.returncode == 0:
                out = json.loads(stdout.splitlines()[-1])
                break
            time.sleep(0.5)
        assert out is not None, f"{stderr[-2000:]}\n{logs(tmp_path)}"
        assert sorted(v for v in out["values"] if v.startswith("s-")) == sorted(f"s-{i}" for i in range(30))

        for name, env in (("a stranger's key", {**allowed, "ZQ_CLIENT_KEY": str(tmp_path / "strangers" / "eve.key_secret")}),
                          ("no key", {k: v for k, v in os.environ.items() if not k.startswith("ZQ_")})):
            # A refused handshake looks like an unreachable node: the client retries it until its
            # api_timeout_ms, shortened here so the refusal comes in seconds.
            refused = lan.popen(3, [PY, "-m", "zq", "status", "--bootstrap", boot],
                                env={**env, "ZQ_API_TIMEOUT_MS": "2000"})
            stdout, stderr = refused.communicate(timeout=120)
            assert refused.returncode == 1 and "Traceback" not in stderr, (name, stdout, stderr)
            assert stderr.startswith("zq: error:") and stdout == "", (name, stderr)
        # The stranger's handshakes were refused and counted (the metrics port is plain HTTP).
        time.sleep(1.5)   # the counters reach /metrics within a refresh
        assert sum(metric(lan, 3, f"{a}:{PORT}", "curve_refused") for a in ip[:3]) >= 1
        assert sum(metric(lan, 3, f"{a}:{PORT}", "curve_allowed") for a in ip[:3]) >= 1
