"""The membership service (zq/node/membership.py) on a fake host: what it does around its core,
one rule at a time. The simulators run it at scale (tests/test_sim_membership.py) and break it on
purpose (tests/test_membership_teeth.py); the real node runs it in tests/test_lan.py."""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from zq.core.membership import (DISCOVERY_DRAIN_MS, LEAVE_FLUSH_MS, SEED_RETRY_MS, Ack, MemberChanged, Ping, State)
from zq.node.membership import MembershipService


class FakeHost:
    def __init__(self) -> None:
        self.name = "n1"
        self.counters: defaultdict[str, int] = defaultdict(int)
        self.now = 1_000
        self.sent: list = []
        self.learned: list = []
        self.changes: list = []
        self.refused: list = []

    def now_ms(self) -> int:
        return self.now

    def send_to_address(self, name, address, msg, *frames) -> None:
        self.sent.append((name, address, msg))

    def learn_address(self, name, address) -> None:
        self.learned.append((name, address))

    def member_changed(self, change, own) -> None:
        self.changes.append((change, own))

    def input_refused(self, what, source, error) -> None:
        self.refused.append((what, source))


@dataclass
class Found:
    node: str
    host: str
    port: int
    incarnation: int


class FakeDiscovery:
    def __init__(self) -> None:
        self.found: list = []
        self.announced: list = []

    def drain(self, max_peers):
        out, self.found = self.found[:max_peers], self.found[max_peers:]
        return out

    def pending(self) -> bool:
        return bool(self.found)

    def update_incarnation(self, incarnation) -> None:
        self.announced.append(incarnation)


def service(seeds=(), discovery=None) -> tuple[MembershipService, FakeHost]:
    host = FakeHost()
    return MembershipService(host, "h1:7100", 5, seeds, random.Random(1), discovery=discovery, events=host), host


def test_seeds_are_pinged_at_start_and_again_while_no_live_member_holds_them() -> None:
    svc, host = service(seeds=["h1:7100", "h2:7100", "h3:7100"])
    assert svc.seeds == ["h2:7100", "h3:7100"]            # our own address is no seed
    svc.tick(host.now)
    assert sorted(a for to, a, m in host.sent if isinstance(m, Ping) and to is None) == ["h2:7100", "h3:7100"]
    # h2 answers: it is a member now, so only h3 is pinged again, SEED_RETRY_MS later
    svc.on_message(Ack(host.sent[0][2].seq, "n2", "h2:7100", 7, "n2", []))
    host.sent.clear()
    host.now += SEED_RETRY_MS - 1
    svc.tick(host.now)
    assert not [s for s in host.sent if s[0] is None]
    host.now += 1
    svc.tick(host.now)
    assert [a for to, a, m in host.sent if to is None] == ["h3:7100"]
    assert ("n2", "h2:7100") in host.learned
    assert svc.view("n2", host.now)[0] == "alive"


def test_refused_peer_input_is_counted_reported_and_dropped() -> None:
    svc, host = service()
    svc.on_message(Ping(1, "n1", "h1:7100", 0, "", []))   # claims to come from us
    assert host.counters["membership_protocol_errors"] == 1 and host.refused == [("Ping", "n1")]


def test_discovery_is_drained_when_due_and_a_refutation_is_reannounced() -> None:
    d = FakeDiscovery()
    svc, host = service(discovery=d)
    svc.tick(host.now)
    assert svc.next_due_ms() != host.now + DISCOVERY_DRAIN_MS      # nothing waits: no drain to wake for
    d.found.append(Found("n2", "h2", 7100, 3))
    assert svc.next_due_ms() == host.now + DISCOVERY_DRAIN_MS
    host.now += DISCOVERY_DRAIN_MS
    svc.tick(host.now)
    assert svc.view("n2", host.now)[0] == "alive"
    # n2 tells us we are suspected at our incarnation: we refute, and zeroconf announces it
    svc.on_message(Ping(9, "n2", "h2:7100", 3, "n1", [["n1", "h1:7100", 5, "suspect"]]))
    assert d.announced and d.announced[-1] == svc.core.incarnation > 5


def test_the_node_routes_by_the_verdict_an_event_ends_with() -> None:
    svc, host = service()
    alive = MemberChanged("n2", "h2:7100", State.ALIVE, 3, host.now)
    left = MemberChanged("n2", "h2:7100", State.LEFT, 3, host.now)
    svc._apply([alive, left], host.now)
    assert host.learned == []
    svc._apply([alive], host.now)
    assert host.learned == [("n2", "h2:7100")]
    assert host.counters["membership_became_left"] == 1 and host.counters["membership_became_alive"] == 2


def test_leave_tells_members_then_the_service_stops() -> None:
    svc, host = service(seeds=["h2:7100"])
    svc.tick(host.now)
    svc.on_message(Ack(host.sent[0][2].seq, "n2", "h2:7100", 7, "n2", []))
    host.sent.clear()
    assert svc.leave(host.now) == host.now + LEAVE_FLUSH_MS
    assert [a for _, a, _ in host.sent] == ["h2:7100"] and svc.core.left
    assert svc.next_due_ms() is None
    host.sent.clear()
    host.now += SEED_RETRY_MS
    svc.tick(host.now)
    svc.on_message(Ping(3, "n2", "h2:7100", 7, "n1", []))
    assert host.sent == []
