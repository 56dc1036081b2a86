"""The `zq` command line. `zq.cli:main` is the console script's entry point.

    commands.py the typer app: one function per command, each a thin shell over zq.Client
    render.py  pure helpers: argument parsing (durations, sizes, --from, headers) and output
               shaping (JSON lines of consumed messages, rich tables)
    up.py      `zq up`: the node supervisor's live view (processes in zq.supervisor)
    bench.py   `zq bench`: throughput and latency runs
"""
from zq.cli.commands import app, main

__all__ = ["app", "main"]
