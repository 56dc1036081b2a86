"""Command line of the simulator.

    python -m zq.sim --seed S [--nodes 4|5] [--steps N] [-v]     replay one seed, print its trace hash
    python -m zq.sim --seeds N [--start K] [--nodes 4|5] [-v]    run N seeds from K, with progress and a summary

By default a seed draws its cluster size (3, 4 or 5 nodes); --nodes 4 or 5 fixes it.
"""
from __future__ import annotations

from zq.sim import replay_command
from zq.sim.cluster import Sim
from zq.sim.world import main_guard, report_failure, run_seeds, seed_parser

PROGRESS_EVERY = 100


def run_one(seed: int, nodes: int, steps: int, verbose: bool) -> int:
    sim = Sim(seed, nodes=nodes, steps=steps, verbose=verbose)
    print(f"seed {seed}: {sim.settings.describe()}")
    r = sim.run()
    if not r.ok:
        report_failure(r, replay_command(seed, nodes, steps))
        return 1
    print(f"ok seed {seed}: {r.steps} steps, {r.acks} acks, {r.leader_acks} acks=leader, {r.reads} reads, {r.fetches} fetches "
          f"({r.parked} parked, {r.parked_woken} woken with data), {r.elections} elections, {r.crashes} crashes, "
          f"{r.pauses} pauses, {r.cuts} partitions, {r.peers_lost} closed connections seen by followers, {r.reassignments} reassignments ({r.reassigned} reached, "
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
    converged: list[int] = []
    totals = ("steps", "acks", "leader_acks", "reads", "fetches", "fetches_many", "parked", "parked_woken", "elections", "crashes", "pauses", "cuts", "peers_lost",
              "reassignments", "reassigned", "config_changes", "removals", "drains",
              "transfers", "handoffs", "retained", "start_ats", "start_ats_moved",
              "retention_duplicates", "false_deaths", "operator_moves", "operator_false_moves",
              "disk_lows",
              "hostile_sent", "hostile_refused", "hostile_rejected",
              "flips", "tails_dropped", "wipes", "early_wipes", "recoveries", "crashes_in_sync")
    run = run_seeds(lambda seed: Sim(seed, nodes=nodes, steps=steps, verbose=verbose).run(),
                    range(start, start + count), totals, lambda r: replay_command(r.seed, nodes, steps),
                    PROGRESS_EVERY, lambda r: converged.append(r.converged_ms))
    print(f"{run.summary()}; slowest convergence after healing {max([0, *converged])} ms (simulated)")
    run.print_replays(lambda r: replay_command(r.seed, nodes, steps))
    return run.exit_code()


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
    main_guard(main)
