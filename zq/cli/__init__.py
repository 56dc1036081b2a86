"""The `zq` command line. `zq.cli:main` is the console script's entry point.

    app.py     the typer app: sub-apps and every command registered, and `main` (errors, exit codes)
    options.py what every command shares: --bootstrap, --cluster, --json, the client, UsageProblem
    commands.py one function per command, each a thin shell over zq.Client
    groups.py  `zq groups`, `zq replay`, `zq dlq`
    keys.py    `zq keys generate`
    render.py  pure helpers: argument parsing (durations, sizes, --from, headers) and output
               shaping (JSON lines of consumed messages, rich tables)
    up.py      `zq up`: the node supervisor's live view (processes in zq.supervisor)
    bench.py   `zq bench`: throughput and latency runs
"""
from zq.cli.app import app, main

__all__ = ["app", "main"]
