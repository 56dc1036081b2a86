"""The simulator's faults and changes, and the hostile peer's messages (see zq.sim.cluster's docstring)."""
from __future__ import annotations

import random

from zq.core.repl_types import LEADER, NO_PRODUCER, Append, AppendAck, Fetch, HardState, RequestVote, StartAt, Vote
from zq.sim.simnode import SimNode


# The early wipe (Settings.early_wipe): when, after the start (the partitions' creation), and how
# soon the node restarts: within the simulated election timeout, so a wiped founder is back before
# its followers stand. It picks a partition's founder this often, else any replica of it.
EARLY_WIPE_MS = (20, 200)
EARLY_WIPE_RESTART_MS = (10, 120)
EARLY_WIPE_FOUNDER_SHARE = 0.7


class FaultsMixin:
    """Part of zq.sim.cluster.Sim (a mixin): faults drawn in the safety phase (crashes, pauses,
    network cuts, disk faults) and changes (reassignments, drains, hand-offs, disks short of room)."""

    def ev_fault(self) -> None:
        if self.phase != "safety":
            return
        s = self.settings
        kinds = [k for k, on in (("crash", s.crash), ("pause", s.pause), ("partition", s.partition)) if on]
        kind = self.rng.choice(kinds)
        name = self.rng.choice(sorted(self.nodes))
        node = self.nodes[name]
        duration = self.rng.randint(20, s.fault_duration_ms_max)
        if kind == "crash" and node.alive:
            kept = node.disk.crash(self.rng, power_loss=self.settings.durability == "fsync")
            node.alive = False
            node.replicas.clear()
            node.pass_ = None
            if self.members is not None:
                self.members.crash(name, self.now)
            self.result.crashes += 1
            self.log(f"crash {name} (kept {kept} unsynced batches)")
            # A killed process's connections close at once (its peers' sockets see it); a host
            # that lost power says nothing: the peers wait out their election timers.
            self.connections_close(name, list(self.nodes), 0.8)
            self.at(self.now + duration, "restart", name)
        elif kind == "pause" and node.alive and not node.paused:
            node.paused = True
            if self.members is not None:
                self.members.pause(name, self.now)
            self.result.pauses += 1
            self.log(f"pause {name} for {duration} ms")
            self.at(self.now + duration, "resume", name, node.incarnation)
        elif kind == "partition":
            names = sorted(self.nodes)
            self.rng.shuffle(names)
            cut = self.rng.randint(1, len(names) // 2)
            self.net.cut(sorted(names[:cut]), sorted(names[cut:]))
            self.result.cuts += 1
            self.log(f"partition {sorted(names[:cut])} | {sorted(names[cut:])} for {duration} ms")
            # Now and then a connection across the cut is seen to break (a false hint: the node runs).
            for a in sorted(names[:cut]):
                self.connections_close(a, names[cut:], 0.3)
                for b in names[cut:]:
                    self.connections_close(b, [a], 0.3)
            self.at(self.now + duration, "heal")
        self.at(self.now + self.rng.randint(10, s.fault_interval_ms_max), "fault")

    def ev_disk(self) -> None:
        """A disk fault on a node, which crashes for it (at most one damaged replica per partition)."""
        if self.phase != "safety":
            return
        rng = self.disk_rng
        s = self.settings
        kind = rng.choice(["flip", "tail", "wipe_replica", "wipe_node"])
        name = rng.choice(sorted(self.nodes))
        node = self.nodes[name]
        held = sorted(node.replica_sets)
        # A wiped node also forgets the replicas a move deleted here (their tombstones answer a
        # recovering replica's poll): a second fault in those replica sets too.
        touched = sorted({*held, *node.tombstones}) if kind == "wipe_node" else held
        if held and all(self._may_damage(name, p) for p in touched):
            if node.alive:
                self._crash_for_disk(node, rng)
                self.at(self.now + rng.randint(20, s.fault_duration_ms_max), "restart", name)
            p = rng.choice(held)
            entries = node.disk.durable[p].entries
            if kind == "flip" and entries:
                node.disk.flip(p, rng.choice(entries).base_offset)
                self.log(f"disk {name}: flipped a block of p{p}")
            elif kind == "tail":
                k = node.disk.drop_synced_tail(rng)
                self.result.tails_dropped += k > 0
                self.log(f"disk {name}: dropped its last {k} synced write batches")
            elif kind == "wipe_replica":
                node.disk.wipe([p])
                self.result.wipes += 1
                self.log(f"disk {name}: p{p} wiped")
            elif kind == "wipe_node":
                node.disk.wipe(held)
                node.tombstones.clear()  # kept beside the metadata: gone with the disk
                self.result.wipes += 1
                self.log(f"disk {name}: wiped")
        self.at(self.now + rng.randint(10, s.disk_interval_ms_max), "disk")

    def ev_early_wipe(self) -> None:
        """Soon after the partitions were created (each led by its founder in epoch 1), one node's
        disk is wiped, whole or one replica: mostly a partition's founder, restarted before the
        others elect, so that it comes back, empty, to followers still in epoch 1."""
        if self.phase != "safety":
            return
        rng = self.disk_rng
        p = rng.randrange(self.settings.partitions)
        created = self.replica_sets[p]
        name = created[0] if rng.random() < EARLY_WIPE_FOUNDER_SHARE else rng.choice(created)
        node = self.nodes[name]
        held = sorted(node.replica_sets)
        whole = rng.random() < 0.5
        touched = sorted({*held, *node.tombstones}) if whole else [p]
        if not node.alive or p not in held or not all(self._may_damage(name, q) for q in touched):
            return
        self._crash_for_disk(node, rng)
        node.disk.wipe(held if whole else [p])
        if whole:
            node.tombstones.clear()
        self.result.wipes += 1
        self.result.early_wipes += 1
        self.log(f"disk {name}: {'wiped' if whole else f'p{p} wiped'} soon after creation")
        self.at(self.now + rng.randint(*EARLY_WIPE_RESTART_MS), "restart", name)

    def _crash_for_disk(self, node: SimNode, rng: random.Random) -> None:
        """A running node goes down for a disk fault (its unsynced writes as a crash leaves them)."""
        node.disk.crash(rng, power_loss=self.settings.durability == "fsync")
        node.alive = False
        node.replicas.clear()
        node.pass_ = None
        if self.members is not None:
            self.members.crash(node.name, self.now)

    def _may_damage(self, name: str, p: int) -> bool:
        """No other replica of p is damaged, lost or recovering, or knows no configuration yet (it
        cannot vote either: a second one would be two faults in one replica set)."""
        for other in sorted(self.nodes):
            node = self.nodes[other]
            if other == name or p not in node.disk.durable:
                continue
            r = node.replicas.get(p)
            if (p in node.disk.lost or node.disk.durable[p].corrupt or (r is not None and (r.recovering or not r.voters))
                    or (not node.alive and (node.disk.durable[p].hard or HardState()).recovering)):
                return False
        return True

    def ev_change(self) -> None:
        if self.phase != "safety":
            return
        s = self.settings
        kinds = [k for k, on in (("reassign", s.reassign), ("drain", s.drain), ("transfer", s.transfer)) if on]
        kind = self.rng.choice(kinds)
        if kind == "reassign":
            p = self.rng.randrange(s.partitions)
            current = list(self.targets[p])
            others = sorted(set(self.nodes) - set(current))
            k = self.rng.randint(1, min(2, len(others)))
            keep = self.rng.sample(current, len(current) - k)
            new = tuple(sorted(keep + self.rng.sample(others, k)))
            self.result.reassignments += 1
            self.log(f"reassign p{p}: {list(current)} -> {list(new)}")
            self.targets[p] = new
            self.moving.add(p)
            self.reassigned.add(p)
            for name in sorted(self.nodes):
                self.apply_targets(self.nodes[name])
        elif kind == "drain":
            name = self.rng.choice(sorted(self.nodes))
            node = self.nodes[name]
            if not node.draining:
                self.result.drains += 1
                self.log(f"drain {name}")
                self.set_draining(node, True)
                self.at(self.now + self.rng.randint(50, s.change_interval_ms_max), "undrain", name)
        else:
            p = self.rng.randrange(s.partitions)
            for name in sorted(self.nodes):
                node = self.nodes[name]
                r = node.replicas.get(p)
                if node.alive and not node.paused and r is not None and r.role == LEADER:
                    others = [v for v in r.voters if v != name]
                    to = self.rng.choice([None, *others]) if others else None
                    self.result.transfers += 1
                    self.log(f"transfer p{p} from {name} to {to or 'the best voter'}")
                    r.tick(self.now, self.wall_ms(node))
                    r.transfer_leadership(to)
                    self.drain(node, p)
        self.at(self.now + self.rng.randint(10, s.change_interval_ms_max), "change")

    def set_draining(self, node: SimNode, on: bool) -> None:
        node.draining = on
        self._tell_replicas(node, lambda r: r.set_draining(on))

    def _tell_replicas(self, node: SimNode, tell) -> None:
        """What a running node's shell tells every replica it hosts (a stopped one, when it runs again)."""
        if not node.alive or node.paused:
            return
        for p in sorted(node.replicas):
            node.replicas[p].tick(self.now, self.wall_ms(node))
            tell(node.replicas[p])
            node.pass_.dirty.add(p)
        self.run_pass(node)

    def ev_disk_low(self) -> None:
        """A node runs short of disk for a while (then has room again)."""
        if self.phase != "safety":
            return
        name = self.disk_low_rng.choice(sorted(self.nodes))
        node = self.nodes[name]
        if not node.disk_low:
            self.log(f"disk low on {name}")
            self.result.disk_lows += 1
            self.set_disk_low(node, True)
            self.at(self.now + self.disk_low_rng.randint(50, 1000), "disk_ok", name)
        self.at(self.now + self.disk_low_rng.randint(50, 1000), "disk_low")

    def ev_disk_ok(self, name: str) -> None:
        node = self.nodes[name]
        if node.disk_low:
            self.log(f"disk has room again on {name}")
            self.set_disk_low(node, False)

    def set_disk_low(self, node: SimNode, on: bool) -> None:
        node.disk_low = on
        self._tell_replicas(node, lambda r: r.set_disk_low(on))

    def ev_undrain(self, name: str) -> None:
        node = self.nodes[name]
        if node.draining:
            self.log(f"undrain {name}")
            self.set_draining(node, False)

    def ev_restart(self, name: str) -> None:
        node = self.nodes[name]
        if not node.alive:
            self.log(f"restart {name}")
            self.start_node(node)

    def ev_resume(self, name: str, incarnation: int) -> None:
        node = self.nodes[name]
        if node.alive and node.paused and node.incarnation == incarnation:
            self.resume(node)

    def resume(self, node: SimNode) -> None:
        self.log(f"resume {node.name}")
        node.paused = False
        if self.members is not None:
            self.members.resume(node.name, self.now)
        node.timer_at = -1
        for p in sorted(node.replicas):
            node.replicas[p].tick(self.now, self.wall_ms(node))  # the clock jumped while it was stopped
            node.replicas[p].set_draining(node.draining)
            node.replicas[p].set_disk_low(node.disk_low)
            node.pass_.dirty.add(p)
        self.run_pass(node)
        self.apply_targets(node)
        queued, node.inbox = node.inbox, []
        for kind, args in queued:
            if node.alive and not node.paused:
                self.handle(node, kind, args)


STRANGER = "evil"   # a name in no configuration


def hostile_message(rng: random.Random, epoch: int, leader: str | None, names: list[str]) -> object:
    """One message a hostile peer might send a replica in `epoch` that follows `leader` (zq.core.bounds
    says what is out of range)."""
    peer = rng.choice(names)
    # Out of range for an epoch (the stored header's width) and for an offset; a value in range
    # from a forged sender in the current epoch is a leader's word, which only [security] rules out.
    huge = rng.choice([2**31, 2**32, 2**40, 2**63, 2**100])
    past_offsets = rng.choice([2**63, 2**64, 2**100])
    kind = rng.randrange(10)
    if kind == 0:
        return RequestVote(huge, STRANGER, huge, 2**62)                      # the one message
    if kind == 1:
        return Vote(huge, peer, True)
    if kind == 2:
        return Append(epoch, peer, 0, 0, 0, 1, [[0, 1, huge, NO_PRODUCER, NO_PRODUCER, b""]])  # entry past the header
    if kind == 3:
        return AppendAck(epoch, peer, past_offsets)
    if kind == 4:
        return StartAt(epoch, peer, past_offsets, 1, [])
    if kind == 5:
        return Fetch(epoch, peer + "\n", 0, 0)                               # a name that is not a name
    if kind == 6:
        return RequestVote(epoch + rng.randint(0, 3), STRANGER, epoch + 3, 2**40)   # in range, from a stranger
    if kind == 7:
        return Vote(epoch + rng.randint(0, 3), STRANGER, True)
    if kind == 8 and epoch > 1:
        return Append(rng.randint(0, epoch - 1), STRANGER, 0, 0, 2**40, 2**40, [])   # a stranger's stale Append
    if kind == 9 and leader is not None:
        return Append(epoch, STRANGER, 0, 0, 0, 0, [])   # claims an epoch another leads: the core refuses it
    return RequestVote(-1, peer, 0, 0)
