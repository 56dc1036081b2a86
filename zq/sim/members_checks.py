"""The invariants of membership, checked after every step of zq/sim/members.py.

Safety, for every running observer O and every row (N, incarnation, state) of its table:

- own incarnation: the incarnation O holds for N never exceeds N's own (its current process's,
  or its last one's when N is down): only a node raises its incarnation;
- monotonic: within one life of O, the (incarnation, state rank) it holds for N never goes down,
  ALIVE < SUSPECT < DEAD < LEFT, and a row once held is never dropped (tombstones outlive a run);
- left stays left: once O held N LEFT at incarnation i, N is ALIVE or SUSPECT in O's table again
  only at an incarnation above i, and only if N started a new process after it left;
- self: O's own row is ALIVE (or LEFT after it left) at O's own incarnation, and O holds no other
  row for itself;
- stale hint: a discovery record of a node that is down, fed to an O that held it SUSPECT, DEAD or
  LEFT, leaves it so (a record O never heard of may add it: discovery is advisory, and the
  detector then finds it dead);
- routing follows the detector: O's service hands its node an address for N (`learn_address`)
  only while O's core holds N ALIVE or SUSPECT at that address, never from a raw discovery record.

Liveness (checked by the driver after healing, see `MembersSim.converged`): every running node is
ALIVE in every running node's table, every node that is down is DEAD or LEFT in every table
(or in none, when no running node ever heard of it), and with discovery on, every running node's
zeroconf record carries its current incarnation (its refutations were re-announced).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zq.core.membership import MemberView, State
from zq.sim.checks import Violation  # noqa: F401 (one kind of broken invariant for every simulator)

if TYPE_CHECKING:
    from zq.sim.members_layer import MembershipLayer

_RANK = {State.ALIVE: 0, State.SUSPECT: 1, State.DEAD: 2, State.LEFT: 3}


@dataclass(slots=True)
class _Seen:
    incarnation: int
    state: State


@dataclass
class MembersChecker:
    layer: MembershipLayer
    seen: dict[str, dict[str, _Seen]] = field(default_factory=dict)      # observer -> node -> last row
    left_seen: dict[str, dict[str, int]] = field(default_factory=dict)   # observer -> node -> LEFT incarnation
    seen_life: dict[str, int] = field(default_factory=dict)              # observer -> the life `seen` is of
    stale_hints_refused: int = 0
    stale_hints_added: int = 0          # records of down nodes that an unknowing observer took in
    learned: int = 0                    # addresses handed to a node, each checked

    def __post_init__(self) -> None:
        self.layer.on_hint.append(self.on_hint)
        self.layer.on_learn.append(self.on_learn)

    def check_observer(self, observer: str) -> None:
        m = self.layer.nodes[observer]
        core = m.core
        if core is None:
            return
        rows = core.members(self.layer.now)
        mine = [v for v in rows if v.node == observer]
        if len(mine) != 1:
            raise Violation("self", f"{observer} holds {len(mine)} rows for itself")
        me = mine[0]
        expected = State.LEFT if core.left else State.ALIVE
        if me.state is not expected or me.incarnation != core.incarnation:
            raise Violation("self", f"{observer} holds itself {me.state.value}@{me.incarnation}, "
                                    f"expected {expected.value}@{core.incarnation}")
        if core.state_of(observer) is not expected:
            raise Violation("self", f"{observer}.state_of(itself) is {core.state_of(observer)}")
        if self.seen_life.get(observer) != m.life:
            # A new process of the observer starts from an empty table.
            self.seen_life[observer] = m.life
            self.seen[observer] = {}
            self.left_seen[observer] = {}
        seen, left_seen = self.seen[observer], self.left_seen[observer]
        held = 0
        for v in rows:
            if v.node != observer:
                held += 1
                self._check_row(observer, v, seen, left_seen)
        if held != len(seen):
            dropped = sorted(set(seen) - {v.node for v in rows})
            raise Violation("monotonic", f"{observer} dropped its rows for {dropped}")

    def _check_row(self, observer: str, v: MemberView, seen: dict[str, _Seen], left_seen: dict[str, int]) -> None:
        node = self.layer.nodes.get(v.node)
        if node is None:
            raise Violation("own incarnation", f"{observer} holds {v.node}, which never existed")
        own = node.core.incarnation if node.core is not None else node.incarnation_last
        if v.incarnation > own:
            raise Violation("own incarnation", f"{observer} holds {v.node} at incarnation {v.incarnation}, "
                                               f"above its own {own}")
        prev = seen.get(v.node)
        if prev is not None and (v.incarnation, _RANK[v.state]) < (prev.incarnation, _RANK[prev.state]):
            raise Violation("monotonic", f"{observer} went from {v.node} {prev.state.value}@{prev.incarnation} "
                                         f"to {v.state.value}@{v.incarnation}")
        seen[v.node] = _Seen(v.incarnation, v.state)
        if v.state is State.LEFT:
            left_seen[v.node] = max(left_seen.get(v.node, -1), v.incarnation)
            return
        left_inc = left_seen.get(v.node)
        if left_inc is not None and v.state in (State.ALIVE, State.SUSPECT):
            rejoined = any(start > left_inc for start in node.starts)
            if v.incarnation <= left_inc or not rejoined:
                raise Violation("left stays left", f"{observer} holds {v.node} {v.state.value}@{v.incarnation} after "
                                                   f"holding it left@{left_inc} (rejoined: {rejoined})")

    def on_hint(self, observer: str, node: str, incarnation: int, before: MemberView | None,
                after: MemberView | None) -> None:
        n = self.layer.nodes[node]
        down = n.core is None
        if not down or incarnation > n.incarnation_last:
            return
        if before is None:
            if after is not None and after.state is State.ALIVE:
                self.stale_hints_added += 1
            return
        if before.state is not State.ALIVE:
            if after is None or after.state is State.ALIVE:
                raise Violation("stale hint", f"a record of down {node}@{incarnation} took {observer}'s "
                                              f"{before.state.value}@{before.incarnation} to {after}")
            self.stale_hints_refused += 1

    def on_learn(self, observer: str, node: str, address: str) -> None:
        core = self.layer.nodes[observer].core
        row = None if core is None else next((v for v in core.members(self.layer.now) if v.node == node), None)
        if row is None or row.state not in (State.ALIVE, State.SUSPECT) or row.address != address:
            held = "nothing" if row is None else f"{row.state.value} at {row.address}"
            raise Violation("routing follows the detector", f"{observer} routes to {node} at {address} while its "
                                                            f"detector holds {held}")
        self.learned += 1
