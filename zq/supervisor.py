"""Node processes on this host: start them, watch them, stop them all, leave none behind.

Theory of operation
-------------------
`zq up` and `zq.testing.LocalCluster` both run nodes as child processes. The decisions about
those children live in `SupervisorCore`, a pure state machine that takes events (a child
started, a child exited, a stop was asked for, the clock ticked) with the time passed in, and
returns the signals to send as data. `ProcessGroup` is its shell: it spawns the processes, polls
them, delivers the signals and sleeps between ticks.

A child is in one of the states

    running ──stop asked──▶ stopping ──exited──▶ stopped
    running ──exited, no stop asked──▶ died          (reported; never restarted here)
    running ──exited with code 0, no stop asked──▶ left   (`zq node drain`: it left the cluster)

Stopping escalates: SIGTERM to every running child at once (so nodes flush and leave in
parallel), then SIGKILL to whichever is still alive `stop_grace_ms` later. The core is `done`
when no child is running or stopping. `exit_code()` is 0 when every child stopped because it was
asked to, and 1 when any child died on its own, so that `zq up` can say a node failed even
after a clean Ctrl-C.

Invariants: a child is signalled only while it is running or stopping (never a pid that has been
reaped, which the kernel may have reused); SIGKILL is sent at most once per child; the order of
effects follows the order the children were added, so a run is reproducible.

Children are also tied to our lifetime by the kernel (PR_SET_PDEATHSIG): if this process is
killed with SIGKILL and has no chance to stop them, each node still gets SIGTERM.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Sequence

RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"
DIED = "died"
LEFT = "left"


@dataclass(frozen=True, slots=True)
class SupervisorLimits:
    stop_grace_ms: int = 10_000      # SIGTERM to SIGKILL; a node flushes and leaves well within this
    kill_wait_ms: int = 5_000        # after SIGKILL, how long we wait for the kernel to reap a child
    poll_interval_ms: int = 50       # how often the shell looks at its children while stopping
    ready_wait_ms: int = 60_000      # how long `zq up` / LocalCluster wait for every node to answer
    ping_timeout_ms: int = 1_000     # one readiness probe of one node
    status_refresh_ms: int = 1_000   # the live view of `zq up`
    log_tail_lines_max: int = 40     # lines of a node log quoted when it dies or a test fails


DEFAULT_LIMITS = SupervisorLimits()


# --------------------------------------------------------------------------------------------
# Effects


@dataclass(frozen=True, slots=True)
class SendSignal:
    name: str
    pid: int
    signum: int


@dataclass(slots=True)
class Child:
    name: str
    pid: int
    state: str = RUNNING
    started_ms: int = 0
    returncode: int | None = None
    term_sent_ms: int | None = None
    kill_sent: bool = False


@dataclass(slots=True)
class SupervisorCore:
    """Pure: which signal goes to which child, and when. See the module docstring."""

    limits: SupervisorLimits = field(default_factory=SupervisorLimits)
    children: dict[str, Child] = field(default_factory=dict)   # insertion order = start order
    stop_asked_ms: int | None = None

    def on_spawned(self, name: str, pid: int, now_ms: int) -> None:
        # A restart of a stopped child reuses its name; a running one must be stopped first.
        old = self.children.get(name)
        assert old is None or old.state in (STOPPED, DIED, LEFT), f"{name} is still {old.state}"
        self.children.pop(name, None)
        self.children[name] = Child(name, pid, RUNNING, now_ms)

    def on_exited(self, name: str, returncode: int, now_ms: int) -> None:
        child = self.children[name]
        if child.state in (STOPPED, DIED, LEFT):
            return
        child.returncode = returncode
        if child.state == STOPPING:
            child.state = STOPPED
        else:
            # A node ends by itself with code 0 only when it was drained and left; anything else is a death.
            child.state = LEFT if returncode == 0 else DIED

    def on_stop_requested(self, now_ms: int, names: Sequence[str] | None = None) -> list[SendSignal]:
        """Ask every child (or the named ones) to stop; returns the SIGTERMs to send now."""
        if names is None:
            self.stop_asked_ms = now_ms if self.stop_asked_ms is None else self.stop_asked_ms
        effects = []
        for child in self.children.values():
            if names is not None and child.name not in names:
                continue
            if child.state == RUNNING:
                child.state = STOPPING
                child.term_sent_ms = now_ms
                effects.append(SendSignal(child.name, child.pid, signal.SIGTERM))
        return effects

    def on_killed(self, name: str, now_ms: int) -> None:
        """The shell killed the child on purpose (LocalCluster.kill): its exit is not a death."""
        child = self.children[name]
        if child.state == RUNNING:
            child.state = STOPPING
            child.term_sent_ms = now_ms
        child.kill_sent = True

    def tick(self, now_ms: int) -> list[SendSignal]:
        """SIGKILL for every child that outlived its grace period."""
        effects = []
        for child in self.children.values():
            if child.state != STOPPING or child.kill_sent:
                continue
            assert child.term_sent_ms is not None
            if now_ms - child.term_sent_ms >= self.limits.stop_grace_ms:
                child.kill_sent = True
                effects.append(SendSignal(child.name, child.pid, signal.SIGKILL))
        return effects

    def live(self) -> list[str]:
        return [c.name for c in self.children.values() if c.state in (RUNNING, STOPPING)]

    @property
    def done(self) -> bool:
        return not self.live()

    def died(self) -> list[str]:
        return [c.name for c in self.children.values() if c.state == DIED]

    def left(self) -> list[str]:
        return [c.name for c in self.children.values() if c.state == LEFT]

    def exit_code(self) -> int:
        return 1 if self.died() else 0


# --------------------------------------------------------------------------------------------
# The shell


def _set_parent_death_signal() -> None:
    """Runs in the child between fork and exec: SIGTERM it when its parent dies.

    Linux only; elsewhere the child simply outlives a parent killed with SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def node_argv(name: str, topology: Path | str, extra: Sequence[str] = ()) -> list[str]:
    """The command that runs one node of a topology, with this very interpreter."""
    return [sys.executable, "-m", "zq", "node", "start", "--name", name, "--topology", str(topology), *extra]


def now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class ProcessGroup:
    """Child processes with log files, driven by a SupervisorCore. Thread-safe."""

    def __init__(self, limits: SupervisorLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.core = SupervisorCore(limits)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._log_files: dict[str, IO[bytes]] = {}
        self._lock = threading.RLock()

    # -- starting

    def spawn(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> int:
        with self._lock:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "ab", buffering=0)
            log.write(f"---- zq: starting {name}: {' '.join(argv)}\n".encode())
            try:
                proc = subprocess.Popen(
                    list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env,
                    # Own session: a Ctrl-C in the terminal reaches only the supervisor, which then
                    # stops the nodes in order, instead of every process getting SIGINT at once.
                    start_new_session=True,
                    preexec_fn=_set_parent_death_signal,
                )
            except BaseException:
                log.close()
                raise
            self._close_log(name)
            self.procs[name] = proc
            self.logs[name] = log_path
            self._log_files[name] = log
            self.core.on_spawned(name, proc.pid, now_ms())
            return proc.pid

    # -- watching

    def poll(self) -> list[str]:
        """Reap exited children; returns the names that exited since the last poll."""
        exited = []
        with self._lock:
            for name in list(self.core.live()):
                code = self.procs[name].poll()
                if code is not None:
                    self.core.on_exited(name, code, now_ms())
                    self._close_log(name)
                    exited.append(name)
        return exited

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def state(self, name: str) -> str:
        return self.core.children[name].state

    def returncode(self, name: str) -> int | None:
        return self.core.children[name].returncode

    def died(self) -> list[str]:
        self.poll()
        return self.core.died()

    # -- signals

    def send_signal(self, name: str, signum: int) -> None:
        """Deliver a signal to a live child (SIGSTOP, SIGCONT, ...). No-op for a reaped one."""
        with self._lock:
            self.poll()
            if self.core.children[name].state in (RUNNING, STOPPING):
                self._deliver(SendSignal(name, self.procs[name].pid, signum))

    def kill(self, name: str, signum: int = signal.SIGKILL, wait_s: float | None = None) -> int | None:
        """Send `signum` on purpose and wait for the child to exit (its exit is not a death)."""
        with self._lock:
            self.poll()
            if self.core.children[name].state in (RUNNING, STOPPING):
                self.core.on_killed(name, now_ms())
                self._deliver(SendSignal(name, self.procs[name].pid, signum))
        wait = wait_s if wait_s is not None else (self.limits.stop_grace_ms + self.limits.kill_wait_ms) / 1000
        try:
            self.procs[name].wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self._deliver(SendSignal(name, self.procs[name].pid, signal.SIGKILL))
            self.procs[name].wait(timeout=self.limits.kill_wait_ms / 1000)
        self.poll()
        return self.returncode(name)

    def _deliver(self, effect: SendSignal) -> None:
        proc = self.procs[effect.name]
        if proc.returncode is not None:
            return
        # A SIGSTOPped child would never act on SIGTERM: let it run so it can stop.
        if effect.signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                return
        try:
            os.kill(proc.pid, effect.signum)
        except ProcessLookupError:
            pass

    # -- stopping

    def request_stop(self, names: Sequence[str] | None = None) -> None:
        with self._lock:
            self.poll()
            for effect in self.core.on_stop_requested(now_ms(), names):
                self._deliver(effect)

    def stop(self, names: Sequence[str] | None = None) -> None:
        """SIGTERM, a bounded wait, SIGKILL, then reap. Returns when every named child is gone."""
        self.request_stop(names)
        deadline = time.monotonic() + (self.limits.stop_grace_ms + self.limits.kill_wait_ms) / 1000
        while time.monotonic() < deadline:
            with self._lock:
                self.poll()
                for effect in self.core.tick(now_ms()):
                    self._deliver(effect)
                pending = [n for n in (names or list(self.core.children)) if
                           self.core.children[n].state in (RUNNING, STOPPING)]
            if not pending:
                return
            time.sleep(self.limits.poll_interval_ms / 1000)
        # Past the kill wait: the kernel has not reaped a SIGKILLed child (uninterruptible I/O).
        # Block on it rather than leave a zombie or a stray process behind.
        for name in pending:
            self._deliver(SendSignal(name, self.procs[name].pid, signal.SIGKILL))
            self.procs[name].wait()
        self.poll()

    def close(self) -> None:
        self.stop()
        for name in list(self._log_files):
            self._close_log(name)

    def _close_log(self, name: str) -> None:
        log = self._log_files.pop(name, None)
        if log is not None:
            log.close()

    def exit_code(self) -> int:
        return self.core.exit_code()


def log_tail(path: Path, lines_max: int = DEFAULT_LIMITS.log_tail_lines_max) -> str:
    """The last lines of a log file, for an error message; '' when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines_max:])


# --------------------------------------------------------------------------------------------
# Ports and readiness


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As libzmq binds: connections lingering in TIME_WAIT from a node just stopped do not
        # make the port busy, only a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def ping(address: str, timeout_ms: int = DEFAULT_LIMITS.ping_timeout_ms) -> dict | None:
    """Ask one node for its status over the wire protocol; the status document, or None.

    Speaks the protocol directly (not through zq.Client) so that it probes exactly one node and
    never follows redirects or discovery."""
    import zmq

    from zq import protocol

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)  # an unanswered probe must not hold the process open at exit
    try:
        sock.connect(f"tcp://{address}")
        sock.send_multipart(protocol.encode(protocol.StatusRequest(1)))
        if not sock.poll(timeout_ms):
            return None
        frames = sock.recv_multipart()
        msg, _ = protocol.decode(frames)
    except Exception:  # a node mid-start may answer garbage, or a decode may fail: not ready yet
        return None
    finally:
        sock.close(0)
    return msg.status if isinstance(msg, protocol.StatusReply) else None


def cluster_ready(addresses: dict[str, str], timeout_ms: int = DEFAULT_LIMITS.ping_timeout_ms) -> tuple[bool, str]:
    """Whether every node answers and every node's status shows every expected node alive.

    Returns (ready, why-not sentence)."""
    for name, address in addresses.items():
        status = ping(address, timeout_ms)
        if status is None:
            return False, f"node {name} at {address} does not answer yet"
        seen = {n.get("name"): n.get("state") for n in status.get("nodes", []) if isinstance(n, dict)}
        missing = [n for n in addresses if seen.get(n) != "alive"]
        if missing:
            return False, f"node {name} does not see {', '.join(missing)} alive yet"
    return True, ""


def process_gone(pid: int) -> bool:
    """True when no live process has this pid: none at all, or a zombie nobody has reaped yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process took the pid over: ours is gone
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def ensure_topics(client: Any, specs: Sequence[Any]) -> tuple[list[str], list[str]]:
    """Create a topology's topics that do not exist yet; (created, already there).

    Errors other than TopicExists (a race with another creator) reach the caller, who knows whether
    a retriable one (too few nodes registered yet) is worth another round."""
    from zq.errors import TopicExists
    existing = {t["name"] for t in client.topics()}
    created, skipped = [], []
    for spec in specs:
        if spec.name in existing:
            skipped.append(spec.name)
            continue
        try:
            client.create_topic(spec.name, partitions=spec.partitions, replication=spec.replication, **spec.config())
            created.append(spec.name)
        except TopicExists:
            skipped.append(spec.name)
    return created, skipped
