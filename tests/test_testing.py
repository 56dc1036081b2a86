"""zq.testing: LocalCluster's life cycle, kill/restart/pause, cleanup, and the pytest plugin."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from zq.supervisor import ping, process_gone
from zq.testing import ClusterNotReady, LocalCluster, free_port_base, port_in_use, render_topology


def test_start_stop_leaves_no_process_and_no_temporary_folder():
    with LocalCluster(nodes=2) as cluster:
        pids = [cluster.pid(n) for n in cluster.names]
        data_dir = cluster.data_dir
        assert cluster.names == ["n1", "n2"]
        assert cluster.bootstrap == ",".join(cluster.addresses[n] for n in cluster.names)
        assert all(ping(a) is not None for a in cluster.addresses.values())
        assert all(cluster.log_path(n).exists() for n in cluster.names)
    assert all(process_gone(pid) for pid in pids)
    assert not data_dir.exists()


def test_an_exception_in_the_block_still_stops_every_node():
    with pytest.raises(RuntimeError, match="test body failed"):
        with LocalCluster(nodes=1) as cluster:
            pid = cluster.pid("n1")
            raise RuntimeError("test body failed")
    assert process_gone(pid)


def test_kill_restart_keeps_the_data_and_pause_resume(tmp_path):
    with LocalCluster(nodes=2, data_dir=tmp_path) as cluster:
        with cluster.client() as client:
            client.create_topic("kept", partitions=2)
            producer = client.producer(acks="leader")
            sent = [producer.send("kept", f"m{i}".encode(), partition=i % 2).result(10) for i in range(10)]
            producer.flush()
        assert {m.partition for m in sent} == {0, 1}

        old_pid = cluster.pid("n2")
        assert cluster.kill("n2") == -signal.SIGKILL
        assert process_gone(old_pid) and not cluster.is_running("n2")
        assert cluster.died() == []                 # a kill on purpose is not a death
        cluster.restart("n2")
        assert cluster.pid("n2") != old_pid and cluster.is_running("n2")
        assert ping(cluster.address("n2")) is not None

        with cluster.client() as client:
            consumer = client.consumer("kept", start="earliest")
            got = []
            deadline = time.monotonic() + 20
            while len(got) < 10 and time.monotonic() < deadline:
                got += consumer.poll(timeout=1.0)
            consumer.close()
        assert sorted(m.value for m in got) == sorted(f"m{i}".encode() for i in range(10))

        cluster.pause("n1")
        assert Path(f"/proc/{cluster.pid('n1')}/stat").read_text().split(")")[-1].split()[0] == "T"
        assert ping(cluster.address("n1"), timeout_ms=300) is None     # stopped processes answer nothing
        cluster.resume("n1")
        assert ping(cluster.address("n1"), timeout_ms=3_000) is not None
        pids = [cluster.pid(n) for n in cluster.names]
    assert all(process_gone(pid) for pid in pids)
    assert (tmp_path / "n1" / "node.log").exists()   # a given data_dir is kept


def test_a_node_that_cannot_start_fails_fast_with_its_log(tmp_path):
    # With PYTHONHOME pointing nowhere the node's interpreter dies at once: start() must say so,
    # quoting the node's log, rather than wait out the ready timeout, and leave nothing running.
    cluster = LocalCluster(nodes=1, data_dir=tmp_path, env={**os.environ, "PYTHONHOME": "/nonexistent"},
                           ready_timeout_s=30)
    started = time.monotonic()
    with pytest.raises(ClusterNotReady, match="exited with code 1") as failure:
        cluster.start()
    assert time.monotonic() - started < 15
    assert "node.log" in str(failure.value) and "PYTHONHOME" in str(failure.value)
    assert cluster.died() == ["n1"]


def test_topology_topics_are_created_and_ports_are_free(tmp_path):
    source = tmp_path / "source.toml"
    source.write_text(render_topology({"name": "ignored", "data_dir": "/ignored"},
                                      [{"name": "alpha", "host": "10.9.9.9", "port": 7100}],
                                      [{"name": "events", "partitions": 3, "replication": 1}]))
    with LocalCluster(topology=source) as cluster:
        assert cluster.names == ["alpha"]
        assert cluster.address("alpha").startswith("127.0.0.1:")
        with cluster.client() as client:
            assert {t["name"] for t in client.topics()} >= {"events"}
            assert len(client.describe_topic("events")["partitions"]) == 3


def test_free_port_base_gives_ten_free_ports():
    base = free_port_base(10)
    assert not any(port_in_use("127.0.0.1", p) for p in range(base, base + 10))


def test_the_pytest_plugin_fixture_marker_and_log_tails(tmp_path):
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.zq_cluster(nodes=1)
        def test_uses_the_fixture(zq_cluster):
            assert zq_cluster.names == ["n1"]
            with zq_cluster.client() as client:
                client.create_topic("user-topic")
                assert "user-topic" in {t["name"] for t in client.topics()}
            open("pids.txt", "a").write(f"{zq_cluster.pid('n1')}\\n")

        @pytest.mark.zq_cluster(nodes=1)
        def test_fails_and_shows_node_logs(zq_cluster):
            open("pids.txt", "a").write(f"{zq_cluster.pid('n1')}\\n")
            assert False, "deliberate"
    """))
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_user.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "1 failed, 1 passed" in result.stdout, result.stdout + result.stderr
    assert "zq node n1 log" in result.stdout          # the failing test's report carries the node log
    pids = [int(line) for line in (tmp_path / "pids.txt").read_text().split()]
    assert len(pids) == 2 and all(process_gone(pid) for pid in pids)
