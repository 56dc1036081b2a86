"""Options and helpers every `zq` command shares: the cluster options (--bootstrap, --cluster,
--json), the commands' client, the one usage error, and output helpers. Imported by the command
modules (zq.cli.commands, zq.cli.groups) and by nothing that imports them back.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any, Optional

import typer

from zq import errors
from zq.cli import render

PIPE_WIDTH_CHARS = 200            # table width when stdout is a pipe or a file, not a terminal

Bootstrap = Annotated[Optional[str], typer.Option(
    "--bootstrap", envvar="ZQ_BOOTSTRAP", metavar="HOST:PORT[,HOST:PORT...]",
    help="Nodes to contact first; without it, nodes are found by zeroconf.")]
Cluster = Annotated[str, typer.Option("--cluster", envvar="ZQ_CLUSTER", help="Cluster name to find by zeroconf.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]


class UsageProblem(errors.ZqError):
    """A command-line mistake found after parsing (exit code 2)."""

    code = "usage"


def _client(bootstrap: str | None, cluster: str):
    """The commands' client; $ZQ_API_TIMEOUT_MS sets its api_timeout_ms (how long a command waits
    out an election or an unreachable cluster before it fails; default 60 s)."""
    from zq.client import Client
    text = os.environ.get("ZQ_API_TIMEOUT_MS")
    if text is not None and not text.strip().isdigit():
        raise UsageProblem(f"ZQ_API_TIMEOUT_MS={text!r} is not a whole number of milliseconds; unset it or fix it")
    api_timeout_ms = int(text) if text is not None else None
    client = Client(bootstrap=bootstrap, cluster=cluster, api_timeout_ms=api_timeout_ms)
    client.on_waiting = _say_waiting
    return client


def _say_waiting(what: str, refusal: str, left_ms: float) -> None:
    """One line on stderr when a command has been waiting a while, so a silent wait is never a mystery."""
    typer.echo(f"zq: still trying {what}: {refusal.rstrip('.')}; waiting up to {left_ms / 1000:.0f} s more "
               "(Ctrl-C to stop; ZQ_API_TIMEOUT_MS sets the wait)", err=True)


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(render.as_dict(doc), ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _console():
    """Rich console; when stdout is not a terminal, wide enough that tables never truncate names."""
    from rich.console import Console
    if sys.stdout.isatty():
        return Console()
    return Console(width=PIPE_WIDTH_CHARS)


def _quiet_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
