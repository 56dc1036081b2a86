"""The command line every simulator shares: `--seed S` replays one seed, `--seeds N [--start K]` runs
many; each simulator adds its own options (cluster size, steps) to the parser this returns."""
from __future__ import annotations

import argparse


def seed_parser(prog: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--seed", type=int, help="replay one seed")
    group.add_argument("--seeds", type=int, help="run this many seeds")
    ap.add_argument("--start", type=int, default=0, help="first seed with --seeds")
    ap.add_argument("-v", "--verbose", action="store_true", help="print faults and phases")
    return ap
