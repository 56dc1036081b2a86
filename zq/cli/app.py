"""The `zq` command line assembled: the typer app, its sub-apps, every command registered in the
order `zq --help` lists them, and `main`, the console script, which turns every failure into one
sentence and an exit code.

The commands themselves are plain functions in zq.cli.commands (nodes, topics, produce, consume,
benchmarks), zq.cli.groups (groups, replay, dead letters) and zq.cli.keys (CurveZMQ keys); what
they share (--bootstrap, --cluster, --json, the client, UsageProblem) is in zq.cli.options. None of
those imports this module, so there is no import circle.
"""
from __future__ import annotations

import errno
import os
import sys

import typer

from zq import errors
from zq.cli import commands, groups, keys
from zq.cli.options import UsageProblem, _quiet_stdout

app = typer.Typer(name="zq", help="zq: a brokerless distributed message queue.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
topic_app = typer.Typer(help="Create, list, describe and delete topics.", no_args_is_help=True)
node_app = typer.Typer(help="Run one node in the foreground, or drain one.", no_args_is_help=True)
bench_app = typer.Typer(help="Throughput and latency benchmarks (msg/s, MB/s, p50/p99/p99.9).", no_args_is_help=True)
keys_app = typer.Typer(help="Make CurveZMQ key pairs: one for the cluster, one per client.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead letters: messages that failed max_deliveries times.", no_args_is_help=True)
app.add_typer(topic_app, name="topic")
app.add_typer(node_app, name="node")
app.add_typer(bench_app, name="bench")
app.add_typer(keys_app, name="keys")

app.command("up")(commands.up)
node_app.command("start")(commands.node_start)
node_app.command("drain")(commands.node_drain)
topic_app.command("create")(commands.topic_create)
topic_app.command("list")(commands.topic_list)
topic_app.command("describe")(commands.topic_describe)
topic_app.command("delete")(commands.topic_delete)
topic_app.command("reassign")(commands.topic_reassign)
app.command("status")(commands.status)
app.command("produce")(commands.produce)
app.command("consume")(commands.consume)
bench_app.command("produce")(commands.bench_produce)
bench_app.command("consume")(commands.bench_consume)
bench_app.command("e2e")(commands.bench_e2e)
bench_app.command("group")(commands.bench_group)
keys_app.command("generate")(keys.generate)
app.command("groups")(groups.groups)
app.command("replay")(groups.replay)
dlq_app.command("list")(groups.dlq_list)
dlq_app.command("redrive")(groups.dlq_redrive)
app.add_typer(dlq_app, name="dlq")


# --------------------------------------------------------------------------------------------
# Entry point: every failure is one sentence and an exit code.


def _one_sentence(text: str) -> str:
    text = " ".join(str(text).split())
    return text if text.endswith((".", "?", "!")) else text + "."


def exit_code_for(error: BaseException) -> int:
    if isinstance(error, (errors.Rejected, errors.TopologyError, UsageProblem)):
        return 2
    return 1


def _describe(error: BaseException) -> str:
    if isinstance(error, errors.ZqError):
        return error.message
    if isinstance(error, FileNotFoundError):
        return f"{error.filename}: no such file"
    if isinstance(error, OSError):
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or error}{where}"
    return str(error) or type(error).__name__


def main(argv: list[str] | None = None) -> None:
    """The console script: run the app and turn every failure into one sentence and an exit code."""
    from typer._click import exceptions as click_exc
    code = 0
    try:
        result = app(args=argv, prog_name="zq", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        if code == 130:
            sys.stderr.write("zq: interrupted.\n")
    except click_exc.NoArgsIsHelpError as error:
        sys.stdout.write(error.ctx.get_help() + "\n" if error.ctx else "")
        code = 2
    except click_exc.UsageError as error:
        hint = f" (see: {error.ctx.command_path} --help)" if error.ctx else ""
        sys.stderr.write(f"zq: error: {_one_sentence(error.format_message())[:-1]}{hint}.\n")
        code = 2
    except typer.Abort:
        sys.stderr.write("zq: interrupted.\n")
        code = 130
    except KeyboardInterrupt:
        sys.stderr.write("zq: interrupted.\n")
        code = 130
    except BrokenPipeError:
        _quiet_stdout()
        code = 0
    except (errors.ZqError, OSError) as error:
        if isinstance(error, OSError) and error.errno == errno.EPIPE:
            _quiet_stdout()
            code = 0
        else:
            sys.stderr.write(f"zq: error: {_one_sentence(_describe(error))}\n")
            code = exit_code_for(error)
    except Exception as error:  # a bug of ours: still one sentence, the traceback on request
        if os.environ.get("ZQ_DEBUG"):
            raise
        if _is_zmq_error(error):
            sys.stderr.write(f"zq: error: network: {_one_sentence(str(error))}\n")
        else:
            sys.stderr.write(f"zq: error: unexpected {type(error).__name__}: {_one_sentence(str(error))} "
                             "Set ZQ_DEBUG=1 to see the traceback, and please report it.\n")
        code = 1
    sys.exit(code)


def _is_zmq_error(error: BaseException) -> bool:
    try:
        import zmq
    except ImportError:  # pragma: no cover
        return False
    return isinstance(error, zmq.ZMQError)


