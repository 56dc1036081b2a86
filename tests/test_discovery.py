"""Zeroconf discovery: record parsing and filtering in-process; real multicast only inside network
namespaces (tests/netns.py), so no mDNS packet ever leaves this machine's test namespaces."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys

import pytest

from tests.netns import ROOT_REASON, Lan, is_root
from zq.io.discovery import (INSTANCE_CHARS_MAX, Discovery, Peer, instance_name, parse_peer,
                             same_scope, txt_records)
from zq.protocol import PROTOCOL_VERSION

PY = sys.executable
ANNOUNCE_S = 4.5


def peer(cluster="A", node="n2", version=PROTOCOL_VERSION) -> Peer:
    return Peer(f"zq-{cluster}-{node}._zq._tcp.local.", cluster, node, 0, version, "10.0.0.2", 7100, 7101, 7102)


# --------------------------------------------------------------------------------------------
# In-process: records and filtering


def test_txt_records_round_trip_and_carry_no_secrets():
    txt = txt_records("demo", "n1", 5, 7100, 7101, 7102)
    assert set(txt) == {"cluster", "node", "inc", "ver", "ports"}
    wire = {k.encode(): v.encode() for k, v in txt.items()}
    p = parse_peer("zq-demo-n1._zq._tcp.local.", wire, ["fe80::1", "10.1.2.3"], 7100)
    assert (p.cluster, p.node, p.incarnation, p.version) == ("demo", "n1", 5, PROTOCOL_VERSION)
    assert (p.host, p.port, p.pub_port, p.metrics_port) == ("10.1.2.3", 7100, 7101, 7102)
    assert parse_peer("x", txt_records("demo", "n1", 0, 7100), ["10.1.2.3"], 7100).metrics_port is None


@pytest.mark.parametrize("props, addresses, reason", [
    ({"node": "n1", "inc": "0", "ver": "1", "ports": "7100"}, ["10.0.0.1"], "lack cluster"),
    ({**txt_records("c", "n", 0, 7100), "inc": "x"}, ["10.0.0.1"], "not numbers"),
    ({**txt_records("c", "n", 0, 7100), "ports": "99999"}, ["10.0.0.1"], "no valid ROUTER port"),
    (txt_records("c", "n", 0, 7100), ["fe80::1"], "no IPv4"),
])
def test_bad_records_are_refused_with_a_reason(props, addresses, reason):
    with pytest.raises(ValueError, match=reason):
        parse_peer("x", props, addresses, None)


def test_only_peers_of_the_same_cluster_and_version_reach_the_queue(caplog):
    d = Discovery("A", "n1", "10.0.0.1", 7100, queue_max=2)
    with caplog.at_level(logging.INFO, logger="zq.discovery"):
        for p in [peer("B"), peer("B"), peer(version=PROTOCOL_VERSION + 1), peer(node="n1"), peer(node="n2")]:
            d._offer(p)
    assert [p.node for p in d.drain()] == ["n2"]
    assert d.counters["peers_ignored"] == 3
    ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(ignored) == 2  # once per name, with the reason
    assert "cluster 'B'" in ignored[0] and "protocol version" in ignored[1]


def test_loopback_and_lan_peers_do_not_mix():
    assert same_scope("127.0.0.1", "127.0.0.1") and same_scope("10.0.0.1", "10.0.0.2")
    assert not same_scope("10.0.0.1", "127.0.0.1") and not same_scope("127.0.0.1", "10.0.0.2")
    assert same_scope("0.0.0.0", "10.0.0.2") and not same_scope("0.0.0.0", "127.0.0.1")
    d = Discovery("A", "n1", "10.0.0.1", 7100)
    d._offer(dataclasses.replace(peer(), host="127.0.0.1"))   # a loopback node's record that leaked
    assert d.drain() == [] and d.counters["peers_ignored"] == 1


def test_the_peer_queue_is_bounded():
    d = Discovery("A", "n1", "10.0.0.1", 7100, queue_max=2)
    for i in range(5):
        d._offer(peer(node=f"m{i}"))
    assert len(d.drain()) == 2 and d.counters["peers_dropped"] == 3
    assert d.drain() == []


def test_zeroconf_failure_is_one_log_line_not_a_crash(caplog):
    def no_multicast(**kw):
        raise OSError(19, "No such device")
    d = Discovery("A", "n1", "127.0.0.1", 7100, zeroconf_factory=no_multicast)
    with caplog.at_level(logging.INFO, logger="zq.discovery"):
        assert d.start() is False
    assert not d.running and d.drain() == []
    [line] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "discovery is off" in line.getMessage() and "seeds" in line.getMessage()
    d.close()


def test_instance_names_fit_a_dns_label():
    name = instance_name("c" * 50, "n" * 50)
    assert name.endswith("._zq._tcp.local.")
    assert len(name.split(".")[0].encode()) <= INSTANCE_CHARS_MAX
    assert name != instance_name("c" * 50, "n" * 49 + "m")


# --------------------------------------------------------------------------------------------
# Real multicast, inside network namespaces


def announce(lan: Lan, host: int, cluster: str, node: str, address: str, port: int = 7100, *extra: str):
    return lan.popen(host, [PY, "-m", "zq.io.discovery", "announce", "--cluster", cluster, "--node", node,
                            "--host", address, "--port", str(port), "--seconds", str(ANNOUNCE_S), *extra])


def find(lan: Lan, host: int, cluster: str, interface: str) -> list:
    result = lan.run(host, [PY, "-m", "zq.io.discovery", "find", "--cluster", cluster,
                            "--interface", interface, "--timeout", "3.5"], timeout_s=20)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["nodes"]


def outcome(proc) -> dict:
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0] == {"started": True}, err
    assert lines[-1]["closed"] is True   # it unregistered and closed cleanly
    return {"peers": {l["peer"]["node"]: l for l in lines if "peer" in l}, "counters": lines[-1]["counters"], "log": err}


@pytest.fixture
def root():
    if not is_root():
        pytest.skip(ROOT_REASON)


@pytest.mark.netns
def test_loopback_announcers_see_each_other_and_ignore_another_cluster(root):
    with Lan(hosts=1) as lan:   # one namespace: its loopback, with multicast on, is the whole network
        a1 = announce(lan, 0, "A", "a1", "127.0.0.1", 7100)
        a2 = announce(lan, 0, "A", "a2", "127.0.0.1", 7200)
        b1 = announce(lan, 0, "B", "b1", "127.0.0.1", 7300)
        nodes = find(lan, 0, "A", "127.0.0.1")
        r1, r2, rb = outcome(a1), outcome(a2), outcome(b1)
    assert nodes == [{"name": "a1", "host": "127.0.0.1", "port": 7100}, {"name": "a2", "host": "127.0.0.1", "port": 7200}]
    assert set(r1["peers"]) == {"a2"} and set(r2["peers"]) == {"a1"} and rb["peers"] == {}
    assert r1["peers"]["a2"]["peer"]["pub_port"] == 7201
    assert "ignoring zq-B-b1._zq._tcp.local.: cluster 'B'" in r1["log"]
    assert rb["counters"]["peers_ignored"] == 2


@pytest.mark.netns
def test_lan_discovery_across_a_bridge(root):
    with Lan(hosts=4) as lan:
        ip = lan.addresses
        a1 = announce(lan, 0, "A", "a1", ip[0])
        a2 = announce(lan, 1, "A", "a2", ip[1])
        b1 = announce(lan, 2, "B", "b1", ip[2])
        v9 = announce(lan, 3, "A", "a9", ip[3], 7100, "--version", str(PROTOCOL_VERSION + 1))
        lo = announce(lan, 0, "A", "local-only", "127.0.0.1", 7200)   # must stay on host 0's loopback
        nodes = find(lan, 2, "A", ip[2])
        r1, r2, rb, r9, rlo = (outcome(p) for p in (a1, a2, b1, v9, lo))
    assert nodes == [{"name": "a1", "host": ip[0], "port": 7100}, {"name": "a2", "host": ip[1], "port": 7100}]
    assert set(r1["peers"]) == {"a2"} and set(r2["peers"]) == {"a1"}
    assert rb["peers"] == {} and r9["peers"] == {} and rlo["peers"] == {}
    assert "protocol version" in r1["log"] and "cluster 'B'" in r1["log"]
    assert "local-only" not in json.dumps([r1["peers"], r2["peers"], rb["peers"], r9["peers"]])
    found_ms = max(r["peers"][n]["elapsed_ms"] for r, n in ((r1, "a2"), (r2, "a1")))
    assert found_ms < ANNOUNCE_S * 1000
    print(f"LAN discovery: both peers found within {found_ms} ms of start")


@pytest.mark.netns
def test_no_usable_interface_is_one_log_line(root):
    with Lan(hosts=1) as lan:
        result = lan.run(0, [PY, "-m", "zq.io.discovery", "announce", "--node", "n1", "--host", "10.99.0.1",
                             "--seconds", "0.2"], timeout_s=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == json.dumps({"started": False})
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "discovery is off" in warnings[0]
    assert "Traceback" not in result.stderr


@pytest.mark.netns
def test_lan_namespaces_are_removed_even_when_the_test_fails(root):
    import subprocess
    with pytest.raises(RuntimeError, match="boom"):
        with Lan(hosts=2) as lan:
            names = [lan.bridge_ns, *lan.names]
            assert lan.run(1, ["ip", "-br", "addr", "show", "eth0"], timeout_s=10).stdout.count(lan.addresses[1]) == 1
            lan.popen(0, [PY, "-c", "import time; time.sleep(60)"])
            raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in names if n in listed]
