"""The SWIM membership core, driven over a fake network of real cores and a fake clock.

Scenarios script one fault each; the seeded loop at the end throws random loss, pauses, crashes
and restarts at small clusters and checks two precise properties (see `test_random_faults`).
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest

from zq.core.membership import (Ack, MemberChanged, Membership, MembershipConfig, Ping, PingReq,
                                Send, State)
from zq.errors import ProtocolError

CONFIG = MembershipConfig(probe_interval_ms=1_000, ack_timeout_ms=400, indirect_probes=2,
                          suspicion_timeout_ms=4_000)
DELAY_MS_MAX = 50  # one-way delay bound of the fake network; well below ack_timeout_ms / 2


def addr(name: str) -> str:
    return f"tcp://{name}:7100"


@dataclass
class FakeNet:
    """A whole cluster in one thread: a heap of timed deliveries, a clock, and one Random."""

    seed: int
    config: MembershipConfig = CONFIG
    loss: float = 0.0
    now: int = 0
    cores: dict = field(default_factory=dict)      # name -> Membership of running (or paused) nodes
    crashed: set = field(default_factory=set)
    paused: dict = field(default_factory=dict)     # name -> resume time
    held: dict = field(default_factory=dict)       # name -> messages that arrived while paused
    trace: list = field(default_factory=list)      # (now, observer, MemberChanged)
    sent: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.queue: list = []
        self.n = 0
        self.lossless: set = set()   # nodes whose messages (to and from) are never dropped
        self.on_change = None        # hook: f(now, observer, MemberChanged)

    # ---- the cluster

    def start(self, name: str, incarnation: int = 0, discover: bool = True) -> Membership:
        core = Membership(name, addr(name), incarnation, random.Random(self.rng.random()), self.now, self.config)
        self.cores[name] = core
        self.crashed.discard(name)
        self.held[name] = []
        if discover:  # what zeroconf would tell it, and tell the others about it
            for other in sorted(self.cores):
                if other != name:
                    self.handle(name, core.on_discovered(other, addr(other), self.cores[other].incarnation, self.now))
                    self.handle(other, self.cores[other].on_discovered(name, addr(name), incarnation, self.now))
        return core

    def crash(self, name: str) -> None:
        del self.cores[name]
        self.paused.pop(name, None)
        self.crashed.add(name)

    def pause(self, name: str, duration_ms: int) -> None:
        self.paused[name] = self.now + duration_ms

    # ---- the network

    def handle(self, src: str, effects: list) -> None:
        for e in effects:
            if isinstance(e, MemberChanged):
                self.trace.append((self.now, src, e))
                if self.on_change:
                    self.on_change(self.now, src, e)
            else:
                assert isinstance(e, Send)
                self.send(src, e)

    def send(self, src: str, e: Send) -> None:
        dst = e.address.split("//")[1].split(":")[0]
        self.sent += 1
        if self.loss and src not in self.lossless and dst not in self.lossless and self.rng.random() < self.loss:
            return
        self.n += 1
        heapq.heappush(self.queue, (self.now + self.rng.randint(1, DELAY_MS_MAX), self.n, dst, e.message))

    def deliver(self, dst: str, msg) -> None:
        core = self.cores.get(dst)
        if core is None:
            return
        if dst in self.paused:
            self.held[dst].append(msg)
            return
        self.handle(dst, core.on_message(msg, self.now))

    def run_until(self, end_ms: int) -> None:
        while True:
            times = [end_ms + 1]
            if self.queue:
                times.append(self.queue[0][0])
            times += list(self.paused.values())
            times += [c.next_deadline_ms() for n, c in self.cores.items() if n not in self.paused]
            t = min(times)
            if t > end_ms:
                self.now = end_ms
                return
            self.now = max(self.now, t)
            for name in sorted(n for n, at in self.paused.items() if at <= self.now):
                del self.paused[name]
                held, self.held[name] = self.held[name], []
                for msg in held:   # a stopped process finds its inbox full when it runs again
                    self.deliver(name, msg)
            while self.queue and self.queue[0][0] <= self.now:
                _, _, dst, msg = heapq.heappop(self.queue)
                self.deliver(dst, msg)
            for name in sorted(self.cores):
                core = self.cores[name]
                if name not in self.paused and core.next_deadline_ms() <= self.now:
                    self.handle(name, core.tick(self.now))

    # ---- views

    def view(self, observer: str) -> dict:
        return {v.node: v.state for v in self.cores[observer].members() if v.node != observer}

    def everyone_sees(self, node: str, states: tuple) -> bool:
        return all(self.view(o).get(node) in states for o in self.cores if o != node)

    def first(self, node: str, state: State, after_ms: int = 0) -> dict:
        """observer -> first time it recorded `node` in `state` after `after_ms`."""
        out: dict = {}
        for t, observer, e in self.trace:
            if e.node == node and e.state is state and t >= after_ms and observer != node:
                out.setdefault(observer, t)
        return out


def cluster(seed: int, names: list[str], **kw) -> FakeNet:
    net = FakeNet(seed, **kw)
    for name in names:
        net.start(name)
    return net


NAMES = ["n1", "n2", "n3", "n4", "n5"]


def detection_bound_ms(n: int, c: MembershipConfig = CONFIG) -> int:
    """Worst case from a crash to every survivor holding it DEAD, with no message loss.

    Round-robin probing visits every member once a round and rounds are reshuffled, so one
    survivor probes the dead node within 2(n-1) periods; the suspicion reaches the others on the
    next message, and each declares death suspicion_timeout_ms after hearing it."""
    return 2 * (n - 1) * c.probe_interval_ms + c.probe_interval_ms + c.suspicion_timeout_ms + 2 * c.probe_interval_ms


# --------------------------------------------------------------------------------------------
# Scenarios


def test_cluster_forms_and_stays_alive_without_faults():
    net = cluster(1, NAMES)
    net.run_until(30_000)
    for o in NAMES:
        assert net.view(o) == {n: State.ALIVE for n in NAMES if n != o}
    assert not [e for _, _, e in net.trace if e.state is not State.ALIVE]
    for view in net.cores["n1"].members(net.now):
        assert view.last_seen_ms is not None and net.now - view.last_seen_ms <= 2 * detection_bound_ms(5)


def test_crashed_node_is_suspected_then_dead_within_bound():
    net = cluster(2, NAMES)
    net.run_until(5_000)
    crash_ms = net.now
    net.crash("n3")
    net.run_until(crash_ms + detection_bound_ms(5))
    survivors = [n for n in NAMES if n != "n3"]
    suspected, dead = net.first("n3", State.SUSPECT, crash_ms), net.first("n3", State.DEAD, crash_ms)
    assert sorted(dead) == survivors, f"dead at {dead}"
    for o in survivors:
        assert o in suspected and suspected[o] < dead[o]   # suspicion before death, at every survivor
        assert net.view(o)["n3"] is State.DEAD
    # the others never flapped
    assert all(e.node == "n3" for _, _, e in net.trace if e.state is not State.ALIVE)


@pytest.mark.parametrize("seed", range(5))
def test_node_paused_shorter_than_suspicion_timeout_is_never_declared_dead(seed):
    net = cluster(10 + seed, NAMES)
    net.run_until(5_000)
    net.pause("n3", CONFIG.suspicion_timeout_ms - 1)
    net.run_until(40_000)
    assert not net.first("n3", State.DEAD), "a briefly paused node was declared dead"
    assert net.first("n3", State.SUSPECT), "the pause was long enough to be suspected (else the test proves nothing)"
    assert net.cores["n3"].incarnation >= 1          # it refuted
    assert net.everyone_sees("n3", (State.ALIVE,))
    # and the node that was stopped blamed nobody for its own silence
    assert not [e for t, o, e in net.trace if o == "n3" and e.node != "n3" and e.state is not State.ALIVE]


def test_node_paused_longer_than_detection_is_declared_dead_then_comes_back():
    net = cluster(20, NAMES)
    net.run_until(5_000)
    net.pause("n3", detection_bound_ms(5) + 2_000)
    net.run_until(5_000 + detection_bound_ms(5))
    assert net.everyone_sees("n3", (State.DEAD,))
    net.run_until(net.now + 2_000 + 3 * CONFIG.probe_interval_ms)
    assert net.everyone_sees("n3", (State.ALIVE,))  # it heard of its death and refuted
    assert net.cores["n3"].incarnation >= 1


def test_falsely_suspected_node_refutes():
    net = cluster(3, NAMES)
    net.run_until(5_000)
    # n4 spreads a false rumour: n2 is suspect at its current incarnation.
    rumour = Ping(999, "n4", addr("n4"), net.cores["n4"].incarnation, "n1", [["n2", addr("n2"), 0, "suspect"]])
    net.handle("n1", net.cores["n1"].on_ping(rumour, net.now))
    assert net.view("n1")["n2"] is State.SUSPECT
    net.run_until(net.now + 2 * CONFIG.probe_interval_ms)
    assert net.cores["n2"].incarnation == 1
    assert net.everyone_sees("n2", (State.ALIVE,))
    assert all(v.incarnation == 1 for o in NAMES if o != "n2" for v in net.cores[o].members() if v.node == "n2")
    net.run_until(net.now + 20_000)
    assert not net.first("n2", State.DEAD)


def test_false_death_rumour_is_refuted():
    net = cluster(4, NAMES)
    net.run_until(5_000)
    rumour = Ping(999, "n4", addr("n4"), 0, "n1", [["n2", addr("n2"), 0, "dead"]])
    net.handle("n1", net.cores["n1"].on_ping(rumour, net.now))
    assert net.view("n1")["n2"] is State.DEAD
    net.run_until(net.now + 3 * CONFIG.probe_interval_ms)
    assert net.everyone_sees("n2", (State.ALIVE,))
    assert net.cores["n2"].incarnation == 1


@pytest.mark.parametrize("restart_incarnation", [0, 7])
def test_restarted_node_is_recognised_and_stale_record_does_not_revive_it(restart_incarnation):
    net = cluster(5, NAMES)
    net.run_until(5_000)
    net.crash("n3")
    net.run_until(net.now + detection_bound_ms(5))
    assert net.everyone_sees("n3", (State.DEAD,))
    # A stale mDNS record of the dead node (same incarnation) must not bring it back.
    net.handle("n1", net.cores["n1"].on_discovered("n3", addr("n3"), 0, net.now))
    net.run_until(net.now + 3_000)
    assert net.view("n1")["n3"] is State.DEAD
    restart_ms = net.now
    net.start("n3", incarnation=restart_incarnation)
    net.run_until(restart_ms + 3 * CONFIG.probe_interval_ms)
    assert net.everyone_sees("n3", (State.ALIVE,))
    assert net.cores["n3"].incarnation >= max(1, restart_incarnation)
    assert all(net.view("n3")[n] is State.ALIVE for n in NAMES if n != "n3")


def test_no_discovery_record_brings_a_dead_node_back_but_a_newer_one_is_asked():
    """A record of a node held DEAD never revives it, even one newer than the death: a node that
    refuted a suspicion (and announced that) and then crashed leaves exactly such a record in the
    zeroconf caches. Found by `python -m zq.sim.members --seed 46`. The record's address is pinged
    instead; the node's own Ack brings it back."""
    c = Membership("a", addr("a"), 0, random.Random(1), 0, CONFIG)
    c.on_discovered("b", addr("b"), 3, 0)
    dead = Ack(1, "z", addr("z"), 0, "z", [["b", addr("b"), 3, "dead"]])
    c.on_ack(dead, 10)
    assert c.state_of("b") is State.DEAD
    effects = c.on_discovered("b", addr("b"), 3, 20)
    assert c.state_of("b") is State.DEAD
    [ask] = effects
    assert isinstance(ask, Send) and isinstance(ask.message, Ping) and ask.address == addr("b")
    assert ask.message.target == "b" and ask.message.updates[0] == ["b", addr("b"), 3, "dead"]
    # Newer, and at a new address: still only asked (and not twice within a probe period).
    assert c.on_discovered("b", "tcp://b-new:7100", 4, 30) == []
    assert c.state_of("b") is State.DEAD
    [ask] = c.on_discovered("b", "tcp://b-new:7100", 4, 30 + CONFIG.probe_interval_ms)
    assert ask.address == "tcp://b-new:7100" and ask.to is None and ask.message.target == "b"
    changes = c.on_ack(Ack(ask.message.seq, "b", "tcp://b-new:7100", 4, "b", []), 1_100)
    assert c.state_of("b") is State.ALIVE
    assert MemberChanged("b", "tcp://b-new:7100", State.ALIVE, 4, 1_100) in changes


def test_a_discovery_record_never_lifts_a_suspicion_or_a_departure():
    c = Membership("a", addr("a"), 0, random.Random(1), 0, CONFIG)
    c.on_discovered("b", addr("b"), 1, 0)
    c.on_discovered("d", addr("d"), 1, 0)
    c.on_ack(Ack(1, "z", addr("z"), 0, "z", [["b", addr("b"), 1, "suspect"], ["d", addr("d"), 1, "left"]]), 10)
    c.on_discovered("b", addr("b"), 2, 20)
    c.on_discovered("d", addr("d"), 2, 20)
    assert c.state_of("b") is State.SUSPECT and c.state_of("d") is State.LEFT


def test_a_known_alive_member_takes_a_newer_record():
    c = Membership("a", addr("a"), 0, random.Random(1), 0, CONFIG)
    c.on_discovered("b", addr("b"), 1, 0)
    assert c.on_discovered("b", "tcp://b-new:7100", 2, 10) == [
        MemberChanged("b", "tcp://b-new:7100", State.ALIVE, 2, 10)]
    assert c.on_discovered("b", addr("b"), 1, 20) == []


def test_two_sides_that_hold_each_other_dead_reconnect_without_seeds_or_discovery():
    """A partition that outlives the suspicion leaves each side holding the other DEAD, and SWIM
    never probes the dead: without a seed to re-ping or a fresh zeroconf record, the cluster stayed
    split for good. Found by `python -m zq.sim.members --seed 11` (discovery only, no seeds)."""
    net = cluster(11, NAMES[:4])
    net.run_until(5_000)
    left, right = {"n1", "n2"}, {"n3", "n4"}
    original_send = net.send

    def cut_send(src, e):
        dst = e.address.split("//")[1].split(":")[0]
        if (src in left) != (dst in left):
            return
        original_send(src, e)
    net.send = cut_send
    net.run_until(net.now + detection_bound_ms(4))
    assert all(net.view(o)[n] is State.DEAD for o in left for n in right)
    assert all(net.view(o)[n] is State.DEAD for o in right for n in left)
    net.send = original_send
    healed_ms = net.now
    net.run_until(healed_ms + CONFIG.reconnect_interval_ms + 4 * CONFIG.probe_interval_ms)
    assert all(net.everyone_sees(n, (State.ALIVE,)) for n in NAMES[:4])


def test_reconnect_pings_dead_members_round_robin_and_never_left_ones():
    cfg = MembershipConfig(reconnect_interval_ms=5_000, reconnect_probes_max=2, suspicion_timeout_ms=60_000)
    c = Membership("a", addr("a"), 0, random.Random(1), 0, cfg)
    for name in ("b", "c", "d", "e"):
        c.on_discovered(name, addr(name), 0, 0)
    gossip = [[n, addr(n), 0, "dead"] for n in ("b", "c", "d")] + [["e", addr("e"), 0, "left"]]
    c.on_ack(Ack(1, "z", addr("z"), 0, "z", gossip), 1)

    def reconnects(since, until):  # ticked every 500 ms, as a running node is (no stall)
        return [e.message.target for now in range(since, until + 1, 500) for e in c.tick(now)
                if isinstance(e, Send) and e.message.target != "z"]
    assert reconnects(500, 4_500) == []
    assert reconnects(5_000, 5_000) == ["b", "c"]
    assert reconnects(5_500, 9_500) == []
    assert reconnects(10_000, 10_000) == ["d", "b"]


def test_gossip_loss_converges():
    net = cluster(6, NAMES, loss=0.3)
    net.run_until(20_000)
    net.loss = 0.0
    heal_ms = net.now
    net.run_until(heal_ms + detection_bound_ms(5))
    for o in NAMES:
        assert net.view(o) == {n: State.ALIVE for n in NAMES if n != o}, f"view of {o}"
    # the loss was heavy enough to cause trouble that had to be repaired
    assert any(e.state is not State.ALIVE for _, _, e in net.trace)


def test_leave_is_seen_as_left_not_dead():
    net = cluster(7, NAMES)
    net.run_until(5_000)
    net.handle("n2", net.cores["n2"].leave(net.now))
    net.run_until(net.now + 500)
    net.crash("n2")  # the process exits after its goodbye
    net.run_until(net.now + detection_bound_ms(5))
    assert net.everyone_sees("n2", (State.LEFT,))
    assert not net.first("n2", State.DEAD) and not net.first("n2", State.SUSPECT)


def test_seed_join_without_discovery():
    net = FakeNet(8)
    net.start("n1", discover=False)
    net.start("n2", discover=False)
    net.start("n3", discover=False)
    net.handle("n2", net.cores["n2"].join([addr("n1")], net.now))
    net.handle("n3", net.cores["n3"].join([addr("n1")], net.now))
    net.run_until(10_000)
    for o in ["n1", "n2", "n3"]:
        assert net.view(o) == {n: State.ALIVE for n in ["n1", "n2", "n3"] if n != o}


def test_indirect_probe_saves_a_node_behind_one_broken_link():
    net = cluster(9, NAMES)
    net.run_until(3_000)
    real_send = net.send

    def send(src, e):  # the n1 <-> n2 link drops everything; all other paths work
        dst = e.address.split("//")[1].split(":")[0]
        if {src, dst} != {"n1", "n2"}:
            real_send(src, e)
    net.send = send
    net.run_until(40_000)
    assert not net.first("n2", State.SUSPECT) and not net.first("n1", State.SUSPECT)
    assert net.cores["n1"].counters["ping_reqs_sent"] > 0


def test_same_seed_same_trace():
    def run(seed):
        net = cluster(seed, NAMES, loss=0.2)
        net.run_until(15_000)
        net.crash("n4")
        net.run_until(30_000)
        return [(t, o, e) for t, o, e in net.trace], net.sent
    assert run(42) == run(42)
    assert run(42) != run(43)


# --------------------------------------------------------------------------------------------
# Peer input and bounds


@pytest.mark.parametrize("bad", [
    Ping(-1, "p", "x", 0, "a", []),
    Ping(1, "", "x", 0, "a", []),
    Ping(1, "a", "x", 0, "a", []),                       # our own id
    Ping(1, "p", "x", -3, "a", []),
    Ping(1, "p", "x", True, "a", []),
    Ping(1, "p", "x", 0, "a", "not a list"),
    Ping(1, "p", "x", 0, "a", [["q", "x", 0]]),
    Ping(1, "p", "x", 0, "a", [["q", "x", 0, "zombie"]]),
    Ping(1, "p", "x", 0, "a", [["q", 5, 0, "alive"]]),
    Ping(1, "p", "x", 0, "a", [["q", "x", 0, "alive"]] * 65),
    PingReq(1, "p", "x", 0, "q", 7, []),
    Ack(1, "p" * 200, "x", 0, "p", []),
])
def test_malformed_peer_messages_raise_protocol_error_and_change_nothing(bad):
    c = Membership("a", addr("a"), 0, random.Random(1), 0, CONFIG)
    c.on_discovered("b", addr("b"), 0, 0)
    before = c.members(0)
    with pytest.raises(ProtocolError):
        c.on_message(bad, 5)
    assert c.members(0) == before


def test_member_table_is_bounded_and_tombstones_go_first():
    cfg = MembershipConfig(members_max=3)
    c = Membership("a", addr("a"), 0, random.Random(1), 0, cfg)
    for i, name in enumerate(["b", "c", "d"]):
        c.on_discovered(name, addr(name), 0, i)
    c.on_discovered("e", addr("e"), 0, 10)
    assert c.state_of("e") is None and c.counters["members_refused"] == 1
    c.on_ack(Ack(1, "b", addr("b"), 0, "b", [["c", addr("c"), 0, "dead"]]), 20)
    c.on_discovered("e", addr("e"), 0, 30)
    assert c.state_of("e") is State.ALIVE and c.state_of("c") is None
    assert len(c.members()) == 4  # three others and itself


def test_piggyback_is_bounded_and_leads_with_news_for_the_recipient():
    cfg = MembershipConfig(piggyback_updates_max=4, anti_entropy_updates_max=1)
    c = Membership("a", addr("a"), 0, random.Random(1), 0, cfg)
    c.on_discovered("b", addr("b"), 2, 0)
    rumours = [[f"m{i}", addr(f"m{i}"), 0, "alive"] for i in range(10)] + [["b", addr("b"), 2, "suspect"]]
    c.on_ack(Ack(1, "z", addr("z"), 0, "z", rumours), 0)
    effects = c.on_ping(Ping(5, "b", addr("b"), 1, "a", []), 10)
    [reply] = [e for e in effects if isinstance(e, Send) and isinstance(e.message, Ack)]
    assert len(reply.message.updates) == 4
    assert reply.message.updates[0] == ["b", addr("b"), 2, "suspect"]


def test_relay_forwards_the_ack_of_an_indirect_probe():
    c = Membership("c", addr("c"), 0, random.Random(1), 0, CONFIG)
    out = c.on_ping_req(PingReq(77, "a", addr("a"), 0, "b", addr("b"), []), 0)
    [ping] = [e for e in out if isinstance(e, Send) and e.to == "b"]
    out = c.on_ack(Ack(ping.message.seq, "b", addr("b"), 0, "b", []), 30)
    [fwd] = [e for e in out if isinstance(e, Send) and e.to == "a"]
    assert isinstance(fwd.message, Ack) and fwd.message.seq == 77 and fwd.message.target == "b"


def test_stalled_node_does_not_blame_its_target():
    c = Membership("a", addr("a"), 0, random.Random(1), 0, CONFIG)
    c.on_discovered("b", addr("b"), 0, 0)
    [ping] = [e for e in c.tick(0) if isinstance(e, Send)]
    # The process is stopped for 10 s; on waking, the Ack is in its inbox and is read first.
    c.on_ack(Ack(ping.message.seq, "b", addr("b"), 0, "b", []), 10_000)
    assert c.counters["stalls"] == 1
    c.tick(10_000)
    assert c.state_of("b") is State.ALIVE


# --------------------------------------------------------------------------------------------
# Seeded random faults


SEEDS = 200


def fault_run(seed: int) -> dict:
    """One random run. Phase 1 (faults, 25 s): loss up to 30% on every link not touching the
    'clean' node, pauses of up to 2x the suspicion timeout, crashes and restarts (incarnation 0,
    as after losing all state, or a persisted one), all of other nodes. Phase 2: no faults.

    Checked:
    - safety, at every state change: no node ever holds the clean node (never paused, links
      lossless) as SUSPECT or DEAD: a live, connected node is not even suspected, whatever
      happens around it;
    - liveness: within detection_bound_ms(n) + 2 probe periods of the last fault, every running
      node holds every running node ALIVE and every crashed node DEAD (or never heard of it).
    """
    rng = random.Random(seed)
    names = [f"n{i}" for i in range(rng.randint(3, 6))]
    net = cluster(seed, names, loss=rng.choice([0.0, 0.1, 0.3]))
    clean = rng.choice(names)
    net.lossless.add(clean)
    violations = []

    def check(now, observer, e):
        if e.node == clean and e.state in (State.SUSPECT, State.DEAD):
            violations.append(f"at {now} ms {observer} holds the clean node {clean} {e.state.value}")
    net.on_change = check
    fault_end_ms = 25_000
    while net.now < fault_end_ms:
        net.run_until(min(fault_end_ms, net.now + rng.randint(200, 3_000)))
        others = [n for n in names if n != clean]
        victim = rng.choice(others)
        roll = rng.random()
        if roll < 0.15 and victim in net.cores and len(net.cores) > 2:
            net.crash(victim)
        elif roll < 0.3 and victim in net.crashed:
            net.start(victim, incarnation=rng.choice([0, 50]))
        elif roll < 0.45 and victim in net.cores and victim not in net.paused:
            net.pause(victim, rng.randint(100, 2 * CONFIG.suspicion_timeout_ms))
    net.loss = 0.0
    heal_ms = max([fault_end_ms, *net.paused.values()])
    net.run_until(heal_ms)
    settle_ms = detection_bound_ms(len(names)) + 2 * CONFIG.probe_interval_ms
    converged_ms = None
    step_ms = 250
    for t in range(heal_ms + step_ms, heal_ms + settle_ms + 1, step_ms):
        net.run_until(t)
        if converged_ms is None and _exact(net):
            converged_ms = t - heal_ms
    assert not violations, f"seed={seed}: {violations[0]}"
    assert _exact(net), f"seed={seed}: views not exact {settle_ms} ms after the faults stopped: " + \
        str({o: net.view(o) for o in sorted(net.cores)})
    return {"converged_ms": converged_ms, "crashed": len(net.crashed)}


def _exact(net: FakeNet) -> bool:
    for o in net.cores:
        view = net.view(o)
        for n in net.cores:
            if n != o and view.get(n) is not State.ALIVE:
                return False
        for n in net.crashed:
            if view.get(n) not in (State.DEAD, None):
                return False
    return True


def test_random_faults():
    results = [fault_run(seed) for seed in range(SEEDS)]
    assert any(r["crashed"] for r in results)
    assert max(r["converged_ms"] for r in results) <= detection_bound_ms(6) + 2 * CONFIG.probe_interval_ms
