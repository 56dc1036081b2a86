"""Command line of the simulator.

    python -m zq.sim --seed S [--nodes 4|5] [--steps N] [-v]     replay one seed, print its trace hash
    python -m zq.sim --seeds N [--start K] [--nodes 4|5] [-v]    run N seeds from K, with progress and a summary

By default a seed draws its cluster size (3, 4 or 5 nodes); --nodes 4 or 5 fixes it.
"""
from __future__ import annotations

import sys
import time

from zq.sim import replay_command
from zq.sim.cli import seed_parser
from zq.sim.cluster import Result, Sim

PROGRESS_EVERY = 100


def _report_failure(r: Result, nodes: int, steps: int) -> None:
    print(f"FAIL seed {r.seed}: invariant '{r.invariant}' broken at step {r.failed_step} ({r.phase} phase)")
    print(f"  {r.detail}")
    print(f"  replay: {replay_command(r.seed, nodes, steps)}")


def run_one(seed: int, nodes: int, steps: int, verbose: bool) -> int:
    sim = Sim(seed, nodes=nodes, steps=steps, verbose=verbose)
    print(f"seed {seed}: {sim.settings.describe()}")
    r = sim.run()
    if not r.ok:
        _report_failure(r, nodes, steps)
        return 1
    print(f"ok seed {seed}: {r.steps} steps, {r.acks} acks, {r.leader_acks} acks=leader, {r.reads} reads, {r.fetches} fetches "
          f"({r.parked} parked, {r.parked_woken} woken with data), {r.elections} elections, {r.crashes} crashes, "
          f"{r.pauses} pauses, {r.cuts} partitions, {r.reassignments} reassignments ({r.reassigned} reached, "
          f"{r.config_changes} configuration changes, {r.removals} replicas deleted), {r.drains} drains, "
          f"{r.transfers} transfers, {r.handoffs} hand-offs, {r.disk_lows} disks short, {r.retained} retention runs, "
          f"{r.start_ats} logs restarted by StartAt ({r.start_ats_moved} on moved replicas), {r.false_deaths} false deaths, {r.operator_moves} operator "
          f"moves ({r.operator_false_moves} away from running nodes), {r.hostile_sent} hostile messages "
          f"({r.hostile_refused} refused by bounds, {r.hostile_rejected} by the core), {r.flips} flipped blocks, "
          f"{r.tails_dropped} dropped WAL tails, {r.wipes} wipes ({r.early_wipes} soon after creation), "
          f"{r.recoveries} recoveries, converged {r.converged_ms} ms after healing, "
          f"trace {r.trace_hash}")
    return 0


def run_many(count: int, start: int, nodes: int, steps: int, verbose: bool) -> int:
    print(f"seeds {start}..{start + count - 1}, nodes={nodes}, steps={steps}")
    began = time.monotonic()
    failures: list[Result] = []
    converge_ms_max = 0
    totals = {"steps": 0, "acks": 0, "leader_acks": 0, "reads": 0, "fetches": 0, "parked": 0, "parked_woken": 0, "elections": 0, "crashes": 0, "pauses": 0, "cuts": 0,
              "reassignments": 0, "reassigned": 0, "config_changes": 0, "removals": 0, "drains": 0,
              "transfers": 0, "handoffs": 0, "retained": 0, "start_ats": 0, "start_ats_moved": 0,
              "retention_duplicates": 0, "false_deaths": 0, "operator_moves": 0, "operator_false_moves": 0,
              "disk_lows": 0,
              "hostile_sent": 0, "hostile_refused": 0, "hostile_rejected": 0,
              "flips": 0, "tails_dropped": 0, "wipes": 0, "early_wipes": 0, "recoveries": 0, "crashes_in_sync": 0}
    for i, seed in enumerate(range(start, start + count), 1):
        r = Sim(seed, nodes=nodes, steps=steps, verbose=verbose).run()
        for k in totals:
            totals[k] += getattr(r, k)
        converge_ms_max = max(converge_ms_max, r.converged_ms)
        if not r.ok:
            failures.append(r)
            _report_failure(r, nodes, steps)
        if i % PROGRESS_EVERY == 0 or i == count:
            print(f"  {i}/{count} seeds, {len(failures)} failed, {time.monotonic() - began:.1f} s", flush=True)
    summary = ", ".join(f"{v} {k}" for k, v in totals.items())
    print(f"{count} seeds in {time.monotonic() - began:.1f} s: {len(failures)} failed; {summary}; "
          f"slowest convergence after healing {converge_ms_max} ms (simulated)")
    for r in failures:
        print(f"  {replay_command(r.seed, nodes, steps)}   # {r.invariant}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = seed_parser("python -m zq.sim", "deterministic cluster simulator")
    ap.add_argument("--nodes", type=int, default=3, choices=[3, 4, 5],
                    help="3 (default): each seed draws 3, 4 or 5 nodes; 4 or 5: that many")
    ap.add_argument("--steps", type=int, default=400, help="events in the safety phase")
    args = ap.parse_args(argv)
    if args.seed is not None:
        return run_one(args.seed, args.nodes, args.steps, args.verbose)
    return run_many(args.seeds, args.start, args.nodes, args.steps, args.verbose)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `python -m zq.sim ... | head` is a normal way to look
        sys.stderr.close()
        sys.exit(0)
