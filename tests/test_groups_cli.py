"""`zq groups`, `zq replay`, `zq dlq list|redrive` and `zq consume --group`, run in this process
against in-process nodes with the groups service."""
from __future__ import annotations

import json
import time

import pytest

import zq
from zq.cli import main
from tests.nodeutil import start_nodes, wait_until


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def one_sentence(err: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zq: error: "), err


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    nodes = start_nodes(tmp_path_factory.mktemp("groups-cli"), 1, services=("zq.io.groups",))
    address = nodes[0].address
    with zq.Client(bootstrap=address) as client:
        wait_until(lambda: client.create_topic("jobs", partitions=2, replication=1, max_deliveries=2,
                                               backoff_initial_ms=1, backoff_max_ms=1), 20, "topic")
    yield address
    for n in nodes:
        n.stop()


def produce(boot: str, values: list[bytes], partition: int = 0) -> list[int]:
    with zq.Client(bootstrap=boot) as client:
        p = client.producer()
        futures = [p.send("jobs", v, partition=partition) for v in values]
        p.flush()
        return [f.result().offset for f in futures]


def test_consume_group_then_groups_shows_commit_and_replay_moves_it(boot, capsys):
    offsets = produce(boot, [b"one", b"two", b"three"])
    code, out, err = run(capsys, "consume", "jobs", "--group", "cli", "--max", "3", "--timeout", "5",
                         "--bootstrap", boot)
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["value"] for x in lines] == ["one", "two", "three"] and all(x["attempt"] == 1 for x in lines)

    def committed() -> int | None:
        code, out, _ = run(capsys, "groups", "cli", "--json", "--bootstrap", boot)
        assert code == 0
        doc = json.loads(out)
        rows = {r["partition"]: r for r in doc["groups"][0]["partitions"]}
        return rows[0]["committed"]
    wait_until(lambda: committed() == offsets[-1] + 1, 5, "the acks of zq consume --group")
    code, out, err = run(capsys, "groups", "--bootstrap", boot)
    assert code == 0 and "group cli" in out and "committed" in out

    code, out, err = run(capsys, "replay", "jobs", "--group", "cli", "--to-offset", str(offsets[1]),
                         "--partition", "0", "--bootstrap", boot)
    assert code == 0, err
    assert f"jobs/0 now starts at offset {offsets[1]}" in out
    code, out, err = run(capsys, "consume", "jobs", "--group", "cli", "--max", "2", "--timeout", "5",
                         "--bootstrap", boot)
    assert [json.loads(x)["value"] for x in out.splitlines()] == ["two", "three"]


def test_usage_mistakes_are_one_sentence(boot, capsys):
    code, out, err = run(capsys, "replay", "jobs", "--group", "g", "--bootstrap", boot)
    assert code == 2
    one_sentence(err)
    code, out, err = run(capsys, "replay", "jobs", "--group", "g", "--to-offset", "1", "--bootstrap", boot)
    assert code == 2 and "--partition" in err
    code, out, err = run(capsys, "groups", "no-such-group", "--bootstrap", boot)
    assert code == 2
    one_sentence(err)
    code, out, err = run(capsys, "replay", "nope", "--group", "g", "--to-earliest", "--bootstrap", boot)
    assert code == 2
    one_sentence(err)


def test_dead_letters_listed_and_redriven_once(boot, capsys):
    [offset] = produce(boot, [b"poison"], partition=1)
    with zq.Client(bootstrap=boot) as client:
        consumer = client.consumer("jobs", group="poison-handlers")
        deadline = time.monotonic() + 10
        attempts = []
        while time.monotonic() < deadline and len(attempts) < 2:
            for msg in consumer.poll(0.5):
                if msg.value == b"poison":
                    attempts.append(msg.attempt)
                    msg.nack(delay=0, reason="cannot handle poison")
                else:
                    msg.ack()
        consumer.close()
    assert attempts == [1, 2]

    def listed() -> list:
        code, out, err = run(capsys, "dlq", "list", "jobs", "--json", "--bootstrap", boot)
        assert code == 0, err
        return json.loads(out)["dead_letters"]
    wait_until(lambda: len(listed()) == 1, 10, "the dead letter")
    [row] = listed()
    assert row["value"] == "poison" and row["attempts"] == 2 and row["source_offset"] == offset
    assert row["last_error"] == "cannot handle poison" and row["source_partition"] == 1
    code, out, err = run(capsys, "dlq", "list", "jobs", "--bootstrap", boot)
    assert code == 0 and "cannot handle poison" in out

    code, out, err = run(capsys, "dlq", "redrive", "jobs", "--json", "--bootstrap", boot)
    assert code == 0, err
    [back] = json.loads(out)["redriven"]
    assert back["partition"] == 1 and back["offset"] > offset
    code, out, err = run(capsys, "dlq", "redrive", "jobs", "--json", "--bootstrap", boot)
    assert code == 0 and json.loads(out)["redriven"] == [], "a dead letter is redriven once"
    with zq.Client(bootstrap=boot) as client:
        c = client.consumer("jobs", partitions=[1], start=back["offset"])
        [msg] = c.poll(5.0, max_messages=1)
        assert msg.value == b"poison" and msg.headers["zq-redriven-from"].startswith(b"jobs.dlq/1/")
        assert "zq-attempts" not in msg.headers
        c.close()


def test_no_ack_is_at_most_once(boot, capsys, monkeypatch):
    produce(boot, [b"once"], partition=0)
    code, out, err = run(capsys, "consume", "jobs", "--group", "amo", "--no-ack", "--from", "latest",
                         "--max", "1", "--timeout", "1", "--bootstrap", boot)
    assert code == 0
    produce(boot, [b"later"], partition=0)
    code, out, err = run(capsys, "consume", "jobs", "--group", "amo2", "--no-ack", "--max", "100", "--timeout", "2",
                         "--bootstrap", boot)
    first = [json.loads(x)["value"] for x in out.splitlines()]
    assert "once" in first and "later" in first
    code, out, err = run(capsys, "consume", "jobs", "--group", "amo2", "--max", "100", "--timeout", "2",
                         "--bootstrap", boot)
    assert out == "", "what --no-ack delivered is never delivered again"
