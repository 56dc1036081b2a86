"""Real zq nodes for tests: `LocalCluster` and the pytest fixture `zq_cluster`.

    from zq.testing import LocalCluster

    with LocalCluster(nodes=3) as cluster:
        with cluster.client() as client:          # or zq.Client(bootstrap=cluster.bootstrap)
            client.create_topic("orders", partitions=4, replication=1)
        cluster.kill("n2")                        # SIGKILL, waits until it is gone
        cluster.restart("n2")                     # same name, ports and data; waits until it answers

Each node is a real process (`python -m zq node start --topology ...`) on 127.0.0.1, with ten
consecutive free ports and its data and log under a temporary folder (or `data_dir`). The cluster
writes its own topology file there, with a cluster name of its own and zeroconf off (nodes find
each other through seeds), so clusters of parallel tests never see each other. Leaving the
`with` block, a failing test, an exception in start-up, or the interpreter exiting stop every
node: SIGTERM, a bounded wait, then SIGKILL. The kernel also sends SIGTERM to each node if the
test process itself is killed.

The pytest plugin (registered as the `pytest11` entry point `zq`) gives the fixture `zq_cluster`,
function-scoped: every test gets fresh nodes and fresh data, so a test may kill, pause or restart
nodes without hurting the next one. Mark a test `@pytest.mark.zq_cluster(nodes=1)` to pass other
arguments to LocalCluster. When a test that uses it fails, the report shows the tail of each
node's log.
"""
from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import tempfile
import time
import tomllib
import weakref
from pathlib import Path
from typing import Any, Iterator

from zq.errors import ZqError
from zq.supervisor import DEFAULT_LIMITS, ProcessGroup, SupervisorLimits, cluster_ready, ensure_topics, log_tail, \
    node_argv, port_in_use

PORTS_PER_NODE = 10              # INTERFACE.md: a node uses at most ten consecutive ports
PORT_BASE_MIN = 20_000           # below Linux's ephemeral range (32768-60999), so no client socket
PORT_BASE_MAX = 32_000           # takes a port between our probe and the node's bind
PORT_PICK_TRIES_MAX = 200
SIGNAL_SETTLE_S_MAX = 5.0        # how long pause()/resume() wait for the kernel to show the new state

_LIVE: "weakref.WeakSet[LocalCluster]" = weakref.WeakSet()


class ClusterNotReady(ZqError):
    """The local cluster did not come up in time: the message names the node and its log."""

    code = "cluster_not_ready"


def free_port_base(count: int, host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A port p such that p .. p+count-1 are all free on host right now."""
    rng = rng or random.Random()
    for _ in range(PORT_PICK_TRIES_MAX):
        base = rng.randrange(PORT_BASE_MIN, PORT_BASE_MAX - count)
        if not any(port_in_use(host, p) for p in range(base, base + count)):
            return base
    raise ClusterNotReady(f"found no {count} consecutive free ports on {host} in {PORT_PICK_TRIES_MAX} tries")


def free_port_bases(nodes: int, host: str = "127.0.0.1") -> list[int]:
    """One base per node, each with PORTS_PER_NODE free ports, no two ranges overlapping."""
    rng = random.Random()
    bases: list[int] = []
    while len(bases) < nodes:
        base = free_port_base(PORTS_PER_NODE, host, rng)
        if all(abs(base - b) >= PORTS_PER_NODE for b in bases):
            bases.append(base)
    return bases


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def render_topology(cluster: dict[str, Any], nodes: list[dict[str, Any]], topics: list[dict[str, Any]] = (),
                    groups: list[dict[str, Any]] = ()) -> str:
    """A topology file (INTERFACE.md's format) from plain dicts."""
    out = ["# written by zq.testing.LocalCluster", "[cluster]"]
    out += [f"{k} = {_toml_value(v)}" for k, v in cluster.items()]
    for section, items in (("node", nodes), ("topic", topics), ("group", groups)):
        for item in items:
            out += ["", f"[[{section}]]"] + [f"{k} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(out) + "\n"


class LocalCluster:
    """Real nodes on 127.0.0.1 for a test; a context manager. See the module docstring."""

    def __init__(self, nodes: int = 3, topology: str | Path | None = None, data_dir: str | Path | None = None,
                 *, name: str | None = None, ready_timeout_s: float | None = None, create_topics: bool = True,
                 limits: SupervisorLimits = DEFAULT_LIMITS, env: dict[str, str] | None = None) -> None:
        """`topology`: a topology file whose node names, topics and groups to use; hosts, ports and
        data_dir are replaced with local ones. `data_dir`: where node data, logs and the topology
        go (kept after stop); by default a temporary folder, removed by stop()."""
        self._source = self._read_source(topology)
        names = [n["name"] for n in self._source.get("node", [])] or [f"n{i + 1}" for i in range(nodes)]
        if not names:
            raise ValueError("a LocalCluster needs at least one node")
        self.names: list[str] = names
        self.name = name or f"zq-test-{os.getpid()}-{random.randrange(1 << 30):x}"
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.limits = limits
        self.ready_timeout_s = ready_timeout_s if ready_timeout_s is not None else limits.ready_wait_ms / 1000
        self.create_topics = create_topics
        self.env = env
        self.addresses: dict[str, str] = {}
        self.topology_path: Path | None = None
        self.group = ProcessGroup(limits)
        self._started = False

    @staticmethod
    def _read_source(topology: str | Path | None) -> dict[str, Any]:
        if topology is None:
            return {}
        with open(topology, "rb") as f:
            return tomllib.load(f)

    # -- life cycle

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "LocalCluster":
        if self._started:
            return self
        self._started = True
        _LIVE.add(self)
        try:
            self._write_topology()
            for name in self.names:
                self._spawn(name)
            self.wait_ready()
            if self.create_topics:
                self._create_topics()
        except BaseException:
            self.stop()
            raise
        return self

    def _write_topology(self) -> None:
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="zq-cluster-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        nodes = []
        for name, base in zip(self.names, free_port_bases(len(self.names))):
            self.addresses[name] = f"127.0.0.1:{base}"
            nodes.append({"name": name, "host": "127.0.0.1", "port": base})
        cluster = {k: v for k, v in self._source.get("cluster", {}).items() if k not in ("seeds", "data_dir", "name")}
        cluster.update({"name": self.name, "data_dir": str(self.data_dir), "discovery": "off",
                        "seeds": list(self.addresses.values())})
        text = render_topology(cluster, nodes, self._source.get("topic", []), self._source.get("group", []))
        self.topology_path = self.data_dir / "topology.toml"
        self.topology_path.write_text(text)

    def _spawn(self, name: str) -> None:
        assert self.topology_path is not None and self.data_dir is not None
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # a node's last words reach its log before a kill
        self.group.spawn(name, node_argv(name, self.topology_path), self.log_path(name), env=env)

    def wait_ready(self, names: list[str] | None = None, timeout_s: float | None = None) -> None:
        """Block until every node (or the named ones) answers and sees the others alive."""
        want = {n: self.addresses[n] for n in (names or self.names)}
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.ready_timeout_s)
        why = "no node was asked yet"
        while time.monotonic() < deadline:
            dead = [n for n in self.group.died() if n in want]
            if dead:
                raise ClusterNotReady(f"node {dead[0]} exited with code {self.group.returncode(dead[0])} while "
                                      f"starting; its log {self.log_path(dead[0])} ends:\n"
                                      f"{log_tail(self.log_path(dead[0]))}")
            ready, why = cluster_ready(want, self.limits.ping_timeout_ms)
            if ready:
                return
            time.sleep(0.1)
        raise ClusterNotReady(f"the local cluster was not ready after {self.ready_timeout_s:g} s: {why}; "
                              f"logs are in {self.data_dir}")

    def _create_topics(self) -> None:
        if not self._source.get("topic"):
            return
        from zq.topology import load_topology
        assert self.topology_path is not None
        with self.client() as client:
            ensure_topics(client, load_topology(self.topology_path).topics)

    def stop(self) -> None:
        """Stop every node (SIGTERM, bounded wait, SIGKILL); remove the temporary folder."""
        self.group.close()
        _LIVE.discard(self)
        if self._own_dir and self.data_dir is not None and self.data_dir.exists():
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- what tests use

    @property
    def bootstrap(self) -> str:
        """The address list to pass to zq.Client / --bootstrap: "127.0.0.1:p1,127.0.0.1:p2,..."."""
        return ",".join(self.addresses[n] for n in self.names)

    def client(self, **kwargs: Any):
        from zq.client import Client
        kwargs.setdefault("cluster", self.name)
        return Client(bootstrap=self.bootstrap, **kwargs)

    def address(self, name: str) -> str:
        return self.addresses[name]

    def pid(self, name: str) -> int:
        return self.group.pid(name)

    def log_path(self, name: str) -> Path:
        assert self.data_dir is not None, "the cluster has not been started"
        return self.data_dir / name / "node.log"

    @property
    def logs(self) -> dict[str, Path]:
        return {n: self.log_path(n) for n in self.names}

    def is_running(self, name: str) -> bool:
        self.group.poll()
        return self.group.state(name) == "running"

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int | None:
        """Send `sig` (default SIGKILL) to the node and wait until it exits; its return code."""
        return self.group.kill(name, sig)

    def stop_node(self, name: str) -> None:
        """A clean stop of one node: SIGTERM, bounded wait, SIGKILL."""
        self.group.stop([name])

    def restart(self, name: str, wait: bool = True) -> None:
        """Start a node again with the same name, ports and data (stopping it first if it runs)."""
        if self.group.state(name) in ("running", "stopping"):
            self.stop_node(name)
        self._spawn(name)
        if wait:
            self.wait_ready([name])

    def pause(self, name: str) -> None:
        """SIGSTOP: the process stays, but neither it nor libzmq's threads answer anything.

        Returns once the kernel shows the process stopped, so the test's next step sees it paused."""
        self.group.send_signal(name, signal.SIGSTOP)
        self._wait_state(name, stopped=True)

    def resume(self, name: str) -> None:
        self.group.send_signal(name, signal.SIGCONT)
        self._wait_state(name, stopped=False)

    def _wait_state(self, name: str, stopped: bool) -> None:
        """Wait (bounded) until /proc shows the process stopped or not; Linux only, else no wait."""
        stat = Path(f"/proc/{self.pid(name)}/stat")
        deadline = time.monotonic() + SIGNAL_SETTLE_S_MAX
        while time.monotonic() < deadline:
            try:
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return
            if (state in ("T", "t")) == stopped:
                return
            time.sleep(0.005)

    def died(self) -> list[str]:
        """Nodes that exited without being asked to."""
        return self.group.died()


@atexit.register
def _stop_all_at_exit() -> None:
    for cluster in list(_LIVE):
        cluster.stop()


# --------------------------------------------------------------------------------------------
# pytest plugin: entry point `pytest11: zq = "zq.testing"`. Importing pytest lazily keeps
# `import zq.testing` cheap outside of pytest.

try:
    import pytest
except ImportError:  # pragma: no cover - zq.testing works without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    _LOG_TAILS_KEY = pytest.StashKey[dict]()

    def pytest_configure(config: "pytest.Config") -> None:
        config.addinivalue_line("markers", "zq_cluster(**kwargs): arguments for the zq_cluster fixture's LocalCluster")

    @pytest.fixture
    def zq_cluster(request: "pytest.FixtureRequest", tmp_path_factory: "pytest.TempPathFactory") -> Iterator[LocalCluster]:
        """A started LocalCluster (3 nodes unless marked), fresh for each test, stopped after it.

        Its data and logs stay in pytest's temporary folder (the last few runs are kept), so a
        failing test's node logs can be read afterwards."""
        marker = request.node.get_closest_marker("zq_cluster")
        kwargs = dict(marker.kwargs) if marker else {}
        kwargs.setdefault("data_dir", tmp_path_factory.mktemp("zq-cluster"))
        cluster = LocalCluster(**kwargs)
        with cluster:
            request.node.stash[_LOG_TAILS_KEY] = cluster.logs
            yield cluster

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(item: "pytest.Item", call: "pytest.CallInfo[None]"):
        report = yield
        logs = item.stash.get(_LOG_TAILS_KEY, None)
        if report.failed and logs:
            for name, path in logs.items():
                report.sections.append((f"zq node {name} log ({path})", log_tail(path)))
        return report
