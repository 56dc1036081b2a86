"""SWIM membership in the deterministic simulator: N real membership services
(zq/node/membership.py, the code a node runs, each around its real `Membership` core), over a
simulated network, with faults chosen by a seed.

Theory of operation
-------------------
Two layers. `MembershipLayer` is the embeddable part: the services' world (the discovery
(zeroconf) model, the message deliveries, each process's clock), driven by a heap of timed events
of its own. It injects no faults; a host (this module's `MembersSim`, the cluster simulator)
calls its fault methods and reads its views. `MembersSim` draws settings from one
`random.Random(seed)`, injects faults during the safety phase, checks the invariants of
zq/sim/members_checks.py after every step, then heals everything and checks liveness within a
bound derived from the core's timing (`liveness_bound_ms`).

The layer (the services' hosts, discovery model, faults and embedding API) is in
zq/sim/members_layer.py; its names are importable from here too.

Checks and figures (`MembersSim`): after every step, the observers the step touched are checked
(zq/sim/members_checks.py); after healing, views must become exact within `liveness_bound_ms` and
stay exact for `STABLE_MS`. Per run it counts false suspicions and false deaths (a running node
held SUSPECT or DEAD) during the faults, and follows each crash: time to SUSPECT and to DEAD in the
first view and in the last running view. A failing run prints its invariant, the step, and the
command that replays it; the same seed always gives the same trace hash.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, fields

from zq.core.membership import LEAVE_FLUSH_MS, MemberChanged, MembershipConfig, State
from zq.sim.members_checks import MembersChecker, Violation
from zq.sim.members_layer import (EPOCH_MS, EVENTS_PER_RUN_UNTIL_MAX, LOOP_LATENCY_MS_MAX, PAUSED_INBOX_MAX, PORT,
                                  SIM_MEMBERSHIP, MemberNode, MembershipLayer, _trace_args, address_of)
from zq.sim.network import NetworkFaults, SimNetwork
from zq.sim.world import EventHeap, main_guard, report_failure, run_seeds, seed_parser

__all__ = ["EPOCH_MS", "EVENTS_PER_RUN_UNTIL_MAX", "LOOP_LATENCY_MS_MAX", "PAUSED_INBOX_MAX", "PORT", "SIM_MEMBERSHIP",
           "MemberNode", "MembershipLayer", "address_of", "liveness_bound_ms", "STABLE_MS", "MembersSettings",
           "MembersResult", "MembersSim", "replay_command", "run_seed", "run_one", "run_many", "main"]

# ------------------------------------------------------------------------------------------------
# The standalone simulator: faults by seed, checks after every step, liveness after healing.


def liveness_bound_ms(n: int, c: MembershipConfig = SIM_MEMBERSHIP) -> int:
    """Simulated time after healing (no loss, one-way delay < ack_timeout_ms / 2) by which every
    view is exact. Derived from the core's timing, worst case for n nodes:

    - a live node held SUSPECT is told so by the suspecter's next probe of it: round-robin probing
      reaches every member within 2 (n - 1) periods (the rest of a round, then a reshuffled one);
      if the suspicion expires first it is a false death, handled below;
    - a live node held DEAD (a partition outlived the suspicion) is pinged again by the holder's
      reconnect probe within `reconnect_interval_ms`; the Ack proves it alive at its refuted
      incarnation and, in the same exchange, it learns and refutes what it was held as;
    - a refutation is sent straight to its members (`_fan_out`) and gossiped; anti-entropy brings it
      to every view within n - 1 messages of each holder, under 2 (n - 1) more periods;
    - a node that is down is probed by some survivor within 2 (n - 1) periods, is SUSPECT there one
      period later, the suspicion reaches the others on their next message, each declares it DEAD
      `suspicion_timeout_ms` after hearing it.

    The longer chain (false death -> reconnect -> refutation spread, or crash -> suspicion ->
    death), with one period of slack per hand-off, plus one more suspicion timeout: a probe sent
    just before the heal may raise a suspicion just after it, which must run its course first.
    For the node timing (1 s periods, 5 s suspicion, 5 s reconnect) that is 25 s for 3 nodes and
    41 s for 7; the soak's slowest convergence is printed beside it.
    """
    periods = 2 * (n - 1)
    crash_to_dead = (periods + 2) * c.probe_interval_ms + c.suspicion_timeout_ms
    false_death_healed = c.suspicion_timeout_ms + c.reconnect_interval_ms + (2 * periods + 2) * c.probe_interval_ms
    return max(crash_to_dead, false_death_healed) + c.suspicion_timeout_ms


STABLE_MS = 10_000        # after converging, views must stay exact this long (no flapping back)


@dataclass(frozen=True, slots=True)
class MembersSettings:
    """Everything a run draws from its seed, printed first so a run explains itself."""
    nodes: int = 3
    late_joiners: int = 0            # nodes that first start during the safety phase
    seeds: str = "all"               # "all": every node lists every address; "first": only n1's; "none"
    discovery: bool = True
    safety_ms: int = 20_000
    crash: bool = True
    restart_share: float = 0.7       # crashed (or left) nodes that come back during the safety phase
    pause: bool = True
    partition: bool = True
    one_way: bool = True
    leave: bool = True
    stale_hints: bool = True
    fault_interval_ms_max: int = 3_000
    fault_duration_ms_max: int = 3_000
    net: NetworkFaults = field(default_factory=NetworkFaults)

    @staticmethod
    def draw(rng: random.Random, nodes: int | None = None) -> MembersSettings:
        n = nodes or rng.randint(3, 7)
        seeds = rng.choice(["all", "first", "none"])
        net = NetworkFaults(loss=rng.choice([0.0, 0.0, 0.02, 0.1, 0.3]), duplicate=rng.choice([0.0, 0.05, 0.2]),
                            delay_ms_max=rng.choice([1, 5, 40, 150]))
        return MembersSettings(
            nodes=n, late_joiners=rng.randint(0, min(2, n - 2)), seeds=seeds,
            discovery=seeds == "none" or rng.random() < 0.6, safety_ms=rng.choice([10_000, 20_000, 30_000]),
            crash=rng.random() < 0.7, restart_share=rng.choice([0.0, 0.5, 0.9]), pause=rng.random() < 0.5,
            partition=rng.random() < 0.5, one_way=rng.random() < 0.4, leave=rng.random() < 0.4,
            stale_hints=rng.random() < 0.6, fault_interval_ms_max=rng.choice([1_000, 3_000, 8_000]),
            fault_duration_ms_max=rng.choice([800, 3_000, 12_000]), net=net)

    def describe(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name != "net"]
        parts += [f"{f.name}={getattr(self.net, f.name)}" for f in fields(self.net)
                  if f.name in ("loss", "duplicate", "delay_ms_max")]
        return " ".join(parts)


@dataclass(slots=True)
class _Crash:
    node: str
    at_ms: int
    incarnation: int
    suspect_first_ms: int | None = None
    suspect_last_ms: int | None = None
    dead_first_ms: int | None = None
    dead_last_ms: int | None = None


@dataclass(slots=True)
class MembersResult:
    seed: int
    ok: bool
    settings: MembersSettings
    steps: int = 0
    trace_hash: str = ""
    invariant: str = ""
    detail: str = ""
    failed_step: int = -1
    phase: str = "safety"
    crashes: int = 0
    restarts: int = 0
    pauses: int = 0
    cuts: int = 0
    leaves: int = 0
    stale_hints: int = 0
    false_suspicions: int = 0        # during faults: a running node held SUSPECT by someone
    false_deaths: int = 0            # during faults: a running node held DEAD by someone
    liveness_false_suspicions: int = 0   # after healing: suspicions left over from the faults, refuted
    stale_hints_refused: int = 0     # records of down nodes that a view holding them gone ignored
    stale_hints_taken: int = 0       # records of down nodes that a view never heard of took in (advisory)
    converged_ms: int = -1           # simulated time from healing to exact views
    bound_ms: int = 0
    detections: list = field(default_factory=list)   # per crash: (to first suspect, to last suspect, first dead, last dead)


class MembersSim:
    def __init__(self, seed: int, nodes: int | None = None, settings: MembersSettings | None = None,
                 config: MembershipConfig = SIM_MEMBERSHIP, verbose: bool = False) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.settings = s = settings or MembersSettings.draw(self.rng, nodes)
        self.verbose = verbose
        self.config = config
        self.phase = "safety"
        self.step_no = 0
        self.net = SimNetwork(self.rng, s.net)
        names = [f"n{i + 1}" for i in range(s.nodes)]
        self.names = names
        seeds = {"all": {n: [address_of(x) for x in names] for n in names},
                 "first": {n: [address_of(names[0])] if n != names[0] else [address_of(names[1])] for n in names},
                 "none": {}}[s.seeds]
        self.layer = MembershipLayer(names, self.rng, self.net, 0, config, seeds, s.discovery)
        self.checker = MembersChecker(self.layer)
        self.layer.on_change.append(self._on_change)
        self.result = MembersResult(seed, True, s, bound_ms=liveness_bound_ms(s.nodes, config))
        self.faults = EventHeap()    # the host's own timed events, traced into the layer's trace
        self.cuts: dict[int, frozenset] = {}
        self.crashes: dict[str, _Crash] = {}
        self.late = names[len(names) - s.late_joiners:]
        self.down_for_good: set[str] = set()
        # Without discovery, nodes that only know n1's address find the cluster through n1 alone:
        # n1 always comes back (an operator restarts the seed node), or the cluster could not form.
        self.anchors = {names[0]} if s.seeds == "first" and not s.discovery else set()
        self._all_crashes: list[_Crash] = []
        self.liveness_started_ms = -1
        self._views_changed = True
        self._running_last: list[str] = []
        self._converged_last = False

    # ---------------------------------------------------------------- scheduling

    def at(self, time_ms: int, kind: str, *args) -> None:
        self.faults.push(time_ms, kind, args)

    def log(self, text: str) -> None:
        if self.verbose:
            print(f"  [{self.step_no:6d} t={self.layer.now:7d}] {text}")

    def one_step(self) -> None:
        """The earlier of the layer's next event and our next fault; then the checks."""
        due = self.layer.next_due_ms()
        if due is None and not self.faults:
            raise Violation("no events", "nothing is scheduled: every node is down or stopped")
        if self.faults and (due is None or self.faults.next_ms() < due):
            time_ms, kind, args = self.faults.pop()
            self.layer.now = max(self.layer.now, time_ms)
            self.layer.events.record(time_ms, f"fault {kind}", _trace_args(args))
            self.layer._touched = set()
            getattr(self, "ev_" + kind)(*args)
            touched = self.layer._touched | set(self.layer.running())
        else:
            touched = self.layer.step()
        self.step_no += 1
        for name in sorted(touched):
            self.checker.check_observer(name)

    # ---------------------------------------------------------------- run

    def run(self) -> MembersResult:
        s = self.settings
        r = self.result
        try:
            for name in self.names:
                if name not in self.late:
                    self.layer.start(name, 0)
            for name in self.late:
                self.at(self.rng.randrange(1, s.safety_ms), "join", name)
            if s.crash or s.pause or s.partition or s.one_way or s.leave or s.stale_hints:
                self.at(self.rng.randrange(1, s.fault_interval_ms_max), "fault")
            while self.layer.now < s.safety_ms and (self.faults or self.layer.events):
                self.one_step()
            self.begin_liveness()
            self.run_liveness()
        except (Violation, AssertionError) as v:
            if isinstance(v, AssertionError):
                import traceback
                where = traceback.extract_tb(v.__traceback__)[-1]
                v = Violation("assertion failed", f"{v} at {where.filename}:{where.lineno} ({where.line})")
            r.ok = False
            r.invariant, r.detail = v.invariant, v.detail
            r.failed_step = self.step_no
            r.phase = self.phase
        r.steps = self.step_no
        r.stale_hints_refused = self.checker.stale_hints_refused
        r.stale_hints_taken = self.checker.stale_hints_added
        r.trace_hash = self.layer.events.trace_hash()
        r.detections = [(c.suspect_first_ms - c.at_ms, c.suspect_last_ms - c.at_ms,
                         c.dead_first_ms - c.at_ms, c.dead_last_ms - c.at_ms)
                        for c in self._all_crashes if c.dead_last_ms is not None and c.suspect_last_ms is not None]
        return r

    # ---------------------------------------------------------------- metrics

    def _on_change(self, now_ms: int, observer: str, change: MemberChanged) -> None:
        self._views_changed = True
        if self.verbose:
            self.log(f"{observer}: {change.node} {change.state.value}@{change.incarnation - EPOCH_MS}")
        if change.node == observer:
            return
        node = self.layer.nodes[change.node]
        if node.core is not None and not node.leaving:
            if change.state is State.SUSPECT:
                if self.phase == "safety":
                    self.result.false_suspicions += 1
                else:
                    self.result.liveness_false_suspicions += 1
            elif change.state is State.DEAD and self.phase == "safety":
                self.result.false_deaths += 1
            return
        crash = self.crashes.get(change.node)
        if crash is None or change.incarnation != crash.incarnation:
            return
        if change.state is State.SUSPECT and crash.suspect_first_ms is None:
            crash.suspect_first_ms = now_ms
        if change.state is State.DEAD and crash.dead_first_ms is None:
            crash.dead_first_ms = now_ms
            crash.suspect_first_ms = crash.suspect_first_ms or now_ms
        others = [o for o in self.layer.running() if o != change.node]
        states = [self.layer.state_in(o, change.node) for o in others]
        if crash.suspect_last_ms is None and all(st in (State.SUSPECT, State.DEAD, None) for st in states):
            crash.suspect_last_ms = now_ms
        if crash.dead_last_ms is None and all(st in (State.DEAD, None) for st in states):
            crash.dead_last_ms = now_ms
            crash.suspect_last_ms = crash.suspect_last_ms or now_ms

    # ---------------------------------------------------------------- faults

    def ev_fault(self) -> None:
        if self.phase != "safety":
            return
        s = self.settings
        kinds = [k for k, on in (("crash", s.crash), ("pause", s.pause), ("partition", s.partition),
                                 ("one_way", s.one_way), ("leave", s.leave), ("stale_hint", s.stale_hints)) if on]
        kind = self.rng.choice(kinds)
        duration = self.rng.randint(50, s.fault_duration_ms_max)
        getattr(self, "fault_" + kind)(duration)
        self.at(self.layer.now + self.rng.randint(50, s.fault_interval_ms_max), "fault")

    def _pick_running(self, unpaused: bool = True) -> str | None:
        names = [n for n in self.layer.running()
                 if not self.layer.nodes[n].leaving and not (unpaused and self.layer.nodes[n].paused)]
        return self.rng.choice(names) if names else None

    def _staying(self) -> int:
        return sum(1 for n in self.layer.running() if not self.layer.nodes[n].leaving)

    def fault_crash(self, duration: int) -> None:
        name = self._pick_running(unpaused=False)
        if name is None or self._staying() <= 1:
            return
        node = self.layer.nodes[name]
        crash = _Crash(name, self.layer.now, node.core.incarnation)
        self.crashes[name] = crash
        self._all_crashes.append(crash)
        self.layer.crash(name, self.layer.now)
        self.result.crashes += 1
        self.log(f"crash {name}@{crash.incarnation}")
        self._maybe_come_back(name, duration)

    def _maybe_come_back(self, name: str, duration: int) -> None:
        if name in self.anchors or self.rng.random() < self.settings.restart_share:
            self.at(self.layer.now + duration, "restart", name)
        else:
            self.down_for_good.add(name)

    def fault_pause(self, duration: int) -> None:
        name = self._pick_running()
        if name is None:
            return
        self.layer.pause(name, self.layer.now)
        self.result.pauses += 1
        self.log(f"pause {name} for {duration} ms")
        self.at(self.layer.now + duration, "resume", name, self.layer.nodes[name].life)

    def fault_partition(self, duration: int) -> None:
        names = list(self.names)
        self.rng.shuffle(names)
        cut = self.rng.randint(1, len(names) // 2)
        a, b = sorted(names[:cut]), sorted(names[cut:])
        pairs = frozenset([(x, y) for x in a for y in b] + [(y, x) for x in a for y in b])
        self._cut(pairs, duration, f"partition {a} | {b}")

    def fault_one_way(self, duration: int) -> None:
        names = list(self.names)
        self.rng.shuffle(names)
        cut = self.rng.randint(1, len(names) - 1)
        a, b = sorted(names[:cut]), sorted(names[cut:])
        self._cut(frozenset((x, y) for x in a for y in b), duration, f"one-way {a} -> {b} cut")

    def _cut(self, pairs: frozenset, duration: int, text: str) -> None:
        cut_id = self.faults.next_seq()
        self.cuts[cut_id] = pairs
        self.net.blocked = frozenset().union(*self.cuts.values())
        self.result.cuts += 1
        self.log(f"{text} for {duration} ms")
        self.at(self.layer.now + duration, "heal", cut_id)

    def fault_leave(self, duration: int) -> None:
        name = self._pick_running()
        if name is None or self._staying() <= 1:
            return
        self.crashes.pop(name, None)
        self.layer.leave(name, self.layer.now)
        if self.rng.random() < 0.5:
            self.layer.forget_record(name)   # its goodbye reached the caches
        self.result.leaves += 1
        self.log(f"leave {name}")
        self._maybe_come_back(name, duration + LEAVE_FLUSH_MS)

    def fault_stale_hint(self, duration: int) -> None:
        down = [n for n in self.names if self.layer.nodes[n].core is None and n in self.layer.records]
        observer = self._pick_running(unpaused=False)
        if not down or observer is None:
            return
        node = self.rng.choice(down)
        if self.layer.stale_hint(observer, node, self.layer.now):
            self.result.stale_hints += 1
            self.log(f"stale record of {node}@{self.layer.records[node][1]} to {observer}")

    def ev_join(self, name: str) -> None:
        if self.phase == "safety" and self.layer.nodes[name].life == 0:
            self.log(f"late join {name}")
            self.layer.start(name, self.layer.now)

    def ev_restart(self, name: str) -> None:
        if self.phase == "safety" and self.layer.nodes[name].core is None:
            self.crashes.pop(name, None)
            self.layer.restart(name, self.layer.now)
            self.result.restarts += 1
            self.log(f"restart {name}@{self.layer.nodes[name].core.incarnation}")

    def ev_resume(self, name: str, life: int) -> None:
        node = self.layer.nodes[name]
        if node.life == life and node.paused:
            self.log(f"resume {name}")
            self.layer.resume(name, self.layer.now)

    def ev_heal(self, cut_id: int) -> None:
        if self.cuts.pop(cut_id, None) is not None:
            self.net.blocked = frozenset().union(*self.cuts.values())

    # ---------------------------------------------------------------- liveness

    def begin_liveness(self) -> None:
        """Heal everything: no loss, no cuts, no pauses; late joiners start; the down stay down."""
        self.phase = "liveness"
        self.liveness_started_ms = self.layer.now
        self.log("liveness phase: heal everything")
        self.net.faults = NetworkFaults(delay_ms_max=self.settings.net.delay_ms_max)
        self.cuts.clear()
        self.net.blocked = frozenset()
        self.faults.keep(("stale",))
        for name in self.names:
            node = self.layer.nodes[name]
            if node.life == 0:
                self.layer.start(name, self.layer.now)
            elif node.paused:
                self.layer.resume(name, self.layer.now)
        for name in sorted(self.anchors):
            if self.layer.nodes[name].core is None:
                self.layer.restart(name, self.layer.now)
        if self.settings.stale_hints:
            self.at(self.layer.now + self.rng.randint(1, 2_000), "stale")

    def ev_stale(self) -> None:
        """Stale records keep coming while the views converge: they must not undo it."""
        self.fault_stale_hint(0)
        self.at(self.layer.now + self.rng.randint(500, 3_000), "stale")

    def run_liveness(self) -> None:
        """Views must become exact within the bound and then stay exact for STABLE_MS.

        Views may be exact for a moment and then not, right after healing (a probe sent before the
        heal times out after it): what counts is the last time they became exact."""
        r = self.result
        healed_ms = self.layer.now
        exact_since: int | None = None
        end_ms = healed_ms + r.bound_ms + STABLE_MS
        while self.layer.now <= end_ms:
            self.one_step()
            if self.converged():
                if exact_since is None:
                    exact_since = self.layer.now
                if self.layer.now - exact_since >= STABLE_MS:
                    break
            else:
                exact_since = None
        if exact_since is None or self.layer.now - exact_since < STABLE_MS or exact_since - healed_ms > r.bound_ms:
            at = "never" if exact_since is None else f"only from {exact_since - healed_ms} ms"
            raise Violation("no convergence", f"views exact {at} after healing (bound {r.bound_ms} ms, then "
                                              f"{STABLE_MS} ms stable): " + self.views_report())
        r.converged_ms = exact_since - healed_ms

    def converged(self) -> bool:
        """Exact views (cached: they change only with a MemberChanged or a process starting or ending)."""
        if self._views_changed or self._running_last != self.layer.running():
            self._views_changed = False
            self._running_last = self.layer.running()
            self._converged_last = self._converged()
        return self._converged_last

    def _converged(self) -> bool:
        running = [n for n in self.layer.running() if not self.layer.nodes[n].leaving]
        down = [n for n in self.names if n not in running]
        views = [self.layer.view(o) for o in running]
        for o, view in zip(running, views):
            for n in running:
                if n != o and (n not in view or view[n].state is not State.ALIVE):
                    return False
            for n in down:
                if n in view and view[n].state not in (State.DEAD, State.LEFT):
                    return False
        if self.settings.discovery:
            # What zeroconf says of a running node is what the node says of itself (a refutation is
            # re-announced), so a browser learns it as it is.
            for n in running:
                if self.layer.records.get(n) != (self.layer.nodes[n].address, self.layer.nodes[n].core.incarnation):
                    return False
        for n in down:
            # Anti-entropy spreads tombstones: if one view knows a node is gone, every view learns it
            # (even a late joiner); a node no running view ever heard of may stay unknown.
            known = sum(1 for view in views if n in view)
            if 0 < known < len(views):
                return False
        return True

    def views_report(self) -> str:
        parts = []
        for o in self.layer.running():
            rows = " ".join(f"{n}={v.state.value}@{v.incarnation - EPOCH_MS}" for n, v in sorted(self.layer.view(o).items()))
            parts.append(f"{o}(@{self.layer.nodes[o].core.incarnation - EPOCH_MS}): {rows}")
        records = " ".join(f"{n}@{inc - EPOCH_MS}" for n, (_, inc) in sorted(self.layer.records.items()))
        return ("; ".join(parts) + f"; down: {[n for n in self.names if self.layer.nodes[n].core is None]}"
                + (f"; zeroconf records: {records}" if self.settings.discovery else ""))


def replay_command(seed: int, nodes: int | None = None) -> str:
    return f"python -m zq.sim.members --seed {seed}" + (f" --nodes {nodes}" if nodes else "")


def run_seed(seed: int, nodes: int | None = None, verbose: bool = False,
             config: MembershipConfig = SIM_MEMBERSHIP) -> MembersResult:
    return MembersSim(seed, nodes=nodes, config=config, verbose=verbose).run()


# ------------------------------------------------------------------------------------------------
# Command line

PROGRESS_EVERY = 500


def _detections_text(rows: list) -> str:
    if not rows:
        return "dead: none followed to DEAD in every view"
    cols = list(zip(*rows))
    names = ("suspect first", "suspect last", "dead first", "dead last")
    return ", ".join(f"{name} median {sorted(c)[len(c) // 2]} max {max(c)} ms" for name, c in zip(names, cols))


def run_one(seed: int, nodes: int | None, verbose: bool) -> int:
    sim = MembersSim(seed, nodes=nodes, verbose=verbose)
    print(f"seed {seed}: {sim.settings.describe()}")
    r = sim.run()
    if not r.ok:
        report_failure(r, replay_command(seed, nodes))
        return 1
    print(f"ok seed {seed}: {r.steps} steps, {r.crashes} crashes, {r.restarts} restarts, {r.pauses} pauses, "
          f"{r.cuts} cuts, {r.leaves} leaves, {r.stale_hints} stale records ({r.stale_hints_refused} refused by a "
          f"view holding the node gone); during faults {r.false_suspicions} false suspicions, {r.false_deaths} "
          f"false deaths; {r.liveness_false_suspicions} suspicions after healing; converged {r.converged_ms} ms after healing "
          f"(bound {r.bound_ms}); crash to {_detections_text(r.detections)}; trace {r.trace_hash}")
    return 0


def run_many(count: int, start: int, nodes: int | None, verbose: bool) -> int:
    print(f"membership seeds {start}..{start + count - 1}" + (f", nodes={nodes}" if nodes else ", nodes 3..7"))
    detections: list = []
    detections_calm: list = []   # seeds whose network neither loses, cuts nor pauses
    converged: list[int] = []
    margin_min = None

    def observe(r: MembersResult) -> None:
        nonlocal detections, detections_calm, margin_min
        detections += r.detections
        st = r.settings
        if not (st.net.loss or st.partition or st.one_way or st.pause):
            detections_calm += r.detections
        if r.ok:
            converged.append(r.converged_ms)
            margin = r.bound_ms - r.converged_ms
            margin_min = margin if margin_min is None else min(margin_min, margin)

    run = run_seeds(lambda seed: MembersSim(seed, nodes=nodes, verbose=verbose).run(), range(start, start + count),
                    ("steps", "crashes", "restarts", "pauses", "cuts", "leaves", "stale_hints", "stale_hints_refused",
                     "false_suspicions", "false_deaths", "liveness_false_suspicions"),
                    lambda r: replay_command(r.seed, nodes), PROGRESS_EVERY, observe)
    converged.sort()
    print(run.summary())
    if converged:
        print(f"  convergence after healing (simulated): median {converged[len(converged) // 2]} ms, "
              f"max {converged[-1]} ms, smallest margin to the bound {margin_min} ms")
    print(f"  {len(detections)} crashes followed to DEAD in every view; crash to {_detections_text(detections)}")
    print(f"  of those, {len(detections_calm)} in seeds without loss, cuts or pauses; crash to "
          f"{_detections_text(detections_calm)}")
    run.print_replays(lambda r: replay_command(r.seed, nodes))
    return run.exit_code()


def main(argv: list[str] | None = None) -> int:
    ap = seed_parser("python -m zq.sim.members", "membership simulator")
    ap.add_argument("--nodes", type=int, choices=range(3, 8), help="cluster size (default: drawn, 3..7)")
    args = ap.parse_args(argv)
    if args.seed is not None:
        return run_one(args.seed, args.nodes, args.verbose)
    return run_many(args.seeds, args.start, args.nodes, args.verbose)


if __name__ == "__main__":
    main_guard(main)
