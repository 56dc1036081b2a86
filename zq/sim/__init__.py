"""The deterministic simulator: real replication cores over a simulated network and disk.

`python -m zq.sim --seed S` replays one seed; `python -m zq.sim --seeds N` runs many. See
zq/sim/cluster.py for the theory of operation and zq/sim/checks.py for the invariants. The world
every simulator (cluster, groups, members, meta, drain) shares is zq/sim/world.py: the event heap
and its trace hash, and the seed runner and command line.
"""
from zq.sim.cluster import Result, Settings, Sim, run_seed

__all__ = ["Result", "Settings", "Sim", "run_seed", "replay_command"]


def replay_command(seed: int, nodes: int = 3, steps: int = 400) -> str:
    """The one command that replays a seed, with the flags that differ from the defaults."""
    flags = [f"--seed {seed}"]
    if nodes != 3:
        flags.append(f"--nodes {nodes}")
    if steps != 400:
        flags.append(f"--steps {steps}")
    return "python -m zq.sim " + " ".join(flags)
