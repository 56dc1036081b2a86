"""`zq up` and the supervisor: the pure stop/escalation core, the process shell, and `zq up` as a
real process on a temporary topology."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from zq.supervisor import DIED, LEFT, RUNNING, STOPPED, STOPPING, ProcessGroup, SendSignal, SupervisorCore, \
    SupervisorLimits, ping, process_gone
from zq.testing import free_port_bases, render_topology


# --------------------------------------------------------------------------------------------
# The pure core


def test_stop_sends_sigterm_then_sigkill_after_the_grace_period():
    core = SupervisorCore(SupervisorLimits(stop_grace_ms=1_000))
    core.on_spawned("a", 11, now_ms=0)
    core.on_spawned("b", 12, now_ms=0)
    assert core.tick(500) == []
    assert core.on_stop_requested(1_000) == [SendSignal("a", 11, signal.SIGTERM), SendSignal("b", 12, signal.SIGTERM)]
    assert core.on_stop_requested(1_100) == []          # asked twice: nothing new
    core.on_exited("a", 0, 1_200)
    assert core.tick(1_999) == []
    assert core.tick(2_000) == [SendSignal("b", 12, signal.SIGKILL)]
    assert core.tick(3_000) == []                       # SIGKILL at most once
    assert not core.done and core.live() == ["b"]
    core.on_exited("b", -9, 2_010)
    assert core.done
    assert core.exit_code() == 0                        # both stopped because they were asked


def test_a_child_that_exits_on_its_own_is_a_death_and_makes_exit_code_1():
    core = SupervisorCore()
    core.on_spawned("a", 11, 0)
    core.on_spawned("b", 12, 0)
    core.on_exited("a", -9, 100)
    assert core.children["a"].state == DIED and core.died() == ["a"]
    assert core.on_stop_requested(200) == [SendSignal("b", 12, signal.SIGTERM)]   # never the dead pid
    core.on_exited("b", 0, 300)
    assert core.children["b"].state == STOPPED
    assert core.exit_code() == 1


def test_a_child_that_exits_with_code_0_on_its_own_left_and_is_not_a_death():
    core = SupervisorCore()
    core.on_spawned("a", 11, 0)
    core.on_exited("a", 0, 100)                        # a drained node that left the cluster
    assert core.children["a"].state == LEFT and core.left() == ["a"] and core.died() == []
    assert core.done and core.exit_code() == 0
    core.on_spawned("a", 12, 200)                      # and it may be started again
    assert core.children["a"].state == RUNNING


def test_a_deliberate_kill_is_not_a_death_and_a_restart_reuses_the_name():
    core = SupervisorCore()
    core.on_spawned("a", 11, 0)
    core.on_killed("a", 10)
    assert core.children["a"].state == STOPPING
    core.on_exited("a", -9, 20)
    assert core.died() == [] and core.done
    core.on_spawned("a", 21, 30)
    assert core.children["a"].state == RUNNING and core.children["a"].pid == 21


# --------------------------------------------------------------------------------------------
# The process shell


STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
POLITE = "import time; print('up', flush=True); time.sleep(60)"


def test_process_group_escalates_to_sigkill_and_leaves_nothing(tmp_path):
    group = ProcessGroup(SupervisorLimits(stop_grace_ms=300, poll_interval_ms=20))
    group.spawn("stubborn", [sys.executable, "-c", STUBBORN], tmp_path / "stubborn.log")
    group.spawn("polite", [sys.executable, "-c", POLITE], tmp_path / "polite.log")
    pids = [group.pid("stubborn"), group.pid("polite")]
    deadline = time.monotonic() + 10
    while not (tmp_path / "stubborn.log").read_bytes().endswith(b"\nup\n") and time.monotonic() < deadline:
        time.sleep(0.02)    # SIG_IGN must be in place before we test that SIGTERM is ignored
    started = time.monotonic()
    group.close()
    assert time.monotonic() - started >= 0.3             # waited out the grace period ...
    assert group.returncode("stubborn") == -signal.SIGKILL   # ... then killed
    assert group.returncode("polite") == -signal.SIGTERM
    assert group.exit_code() == 0
    assert all(process_gone(pid) for pid in pids)
    assert "starting stubborn" in (tmp_path / "stubborn.log").read_text()


def test_process_group_stops_a_paused_child(tmp_path):
    group = ProcessGroup(SupervisorLimits(stop_grace_ms=5_000))
    group.spawn("p", [sys.executable, "-c", POLITE], tmp_path / "p.log")
    group.send_signal("p", signal.SIGSTOP)
    started = time.monotonic()
    group.close()
    assert time.monotonic() - started < 4                # SIGCONT went with SIGTERM: no wait for SIGKILL
    assert group.returncode("p") == -signal.SIGTERM


# --------------------------------------------------------------------------------------------
# zq up as a real process


def write_topology(tmp_path: Path, names: list[str]) -> tuple[Path, dict[str, str]]:
    nodes, addresses = [], {}
    for name, base in zip(names, free_port_bases(len(names))):
        nodes.append({"name": name, "host": "127.0.0.1", "port": base})
        addresses[name] = f"127.0.0.1:{base}"
    text = render_topology({"name": f"up-{os.getpid()}", "data_dir": "data", "discovery": "off"}, nodes,
                           [{"name": "orders", "partitions": 4, "replication": 1}])
    path = tmp_path / "topology.toml"
    path.write_text(text)
    return path, addresses


class Up:
    """`zq up` in a subprocess; a thread collects its stdout lines as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen([sys.executable, "-m", "zq", "up", str(path)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=path.parent, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout_s: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; saw:\n{''.join(self.lines)}")

    def node_pids(self) -> dict[str, int]:
        return {m.group(1): int(m.group(2)) for line in self.lines
                if (m := re.search(r"started (\S+) \(pid (\d+)\)", line))}

    def finish(self, timeout_s: float = 30) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        err = self.proc.stderr.read()
        self.proc.stderr.close()
        self.proc.stdout.close()
        return code, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if not stream.closed:
                stream.close()


@pytest.fixture
def up_process(tmp_path):
    started: list[Up] = []

    def start(names: list[str]) -> tuple[Up, dict[str, str]]:
        path, addresses = write_topology(tmp_path, names)
        up = Up(path)
        started.append(up)
        return up, addresses

    yield start
    for up in started:
        up.kill()


def test_up_serves_creates_topics_and_stops_every_node_on_sigterm(up_process, tmp_path):
    up, addresses = up_process(["a", "b"])
    up.wait_for(r"serving")
    up.wait_for(r"topics: created orders")
    pids = up.node_pids()
    assert set(pids) == {"a", "b"}
    assert all(ping(address) is not None for address in addresses.values())
    assert (tmp_path / "data" / "a" / "node.log").exists()
    up.proc.send_signal(signal.SIGTERM)
    code, err = up.finish()
    assert code == 0, err
    assert err == ""
    assert all(process_gone(pid) for pid in pids.values())
    assert any("stopped" in line for line in up.lines)


def test_up_again_skips_existing_topics(up_process):
    up, _ = up_process(["a"])
    up.wait_for(r"topics: created orders")
    up.proc.send_signal(signal.SIGINT)          # Ctrl-C stops as cleanly as SIGTERM
    assert up.finish()[0] == 0
    again = Up(up.path)
    try:
        again.wait_for(r"topics: already there: orders")
        again.proc.send_signal(signal.SIGTERM)
        assert again.finish()[0] == 0
    finally:
        again.kill()


def test_a_node_that_dies_is_reported_and_up_exits_1(up_process):
    up, _ = up_process(["a", "b"])
    up.wait_for(r"serving")
    pids = up.node_pids()
    os.kill(pids["b"], signal.SIGKILL)
    up.wait_for(r"node b exited on its own with code -9")
    up.proc.send_signal(signal.SIGTERM)
    code, _ = up.finish()
    assert code == 1
    assert all(process_gone(pid) for pid in pids.values())


def test_up_refuses_a_port_in_use(up_process, tmp_path):
    up, addresses = up_process(["a"])
    up.wait_for(r"serving")
    second = subprocess.run([sys.executable, "-m", "zq", "up", str(tmp_path / "topology.toml")],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 2
    assert "in use" in second.stderr and "Traceback" not in second.stderr
    up.proc.send_signal(signal.SIGTERM)
    assert up.finish()[0] == 0


def test_up_json_prints_events_as_json_lines(tmp_path):
    import json
    path, _ = write_topology(tmp_path, ["a"])
    proc = subprocess.Popen([sys.executable, "-m", "zq", "up", str(path), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        events = []
        for line in proc.stdout:
            events.append(json.loads(line))
            if "serving" in events[-1]["event"]:
                proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert all(set(e) == {"time_ms", "event"} for e in events)
    assert events[-1]["event"] == "stopped"
