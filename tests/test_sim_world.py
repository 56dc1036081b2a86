"""zq/sim/world.py, the world every simulator shares: the event heap's order and trace hash, the seed runner."""
from types import SimpleNamespace

from zq.sim.world import EventHeap, run_seeds


def test_events_pop_by_time_then_push_order():
    h = EventHeap()
    h.push(5, "b", (1,))
    h.push(3, "a", ())
    h.push(5, "c", (2,))
    h.push(3, "d", ())
    assert h.next_ms() == 3
    assert [h.pop() for _ in range(len(h))] == [(3, "a", ()), (3, "d", ()), (5, "b", (1,)), (5, "c", (2,))]
    assert not h and h.next_ms() is None


def test_next_seq_is_shared_with_the_tie_breaker():
    h = EventHeap()
    h.push(1, "a", ())
    assert h.next_seq() == 2
    h.push(1, "b", ())
    assert h.events[-1][1] == 3


def test_trace_hash_follows_the_recorded_events():
    a, b = EventHeap(), EventHeap()
    for h in (a, b):
        h.record(1, "x", "1,2")
    assert a.trace_hash() == b.trace_hash()
    b.record(2, "y", "")
    assert a.trace_hash() != b.trace_hash()


def test_keep_drops_other_kinds():
    h = EventHeap()
    for t, kind in ((1, "stale"), (3, "heal"), (2, "stale")):
        h.push(t, kind, ())
    h.keep(("stale",))
    assert [h.pop()[:2] for _ in range(len(h))] == [(1, "stale"), (2, "stale")]


def test_run_seeds_totals_failures_and_replays(capsys):
    def run_seed(seed):
        return SimpleNamespace(seed=seed, ok=seed != 2, invariant="broken", detail="why", steps=seed)
    run = run_seeds(run_seed, range(4), ("steps",), lambda r: f"python -m zq.sim.x --seed {r.seed}", 2)
    assert run.totals == {"steps": 6} and [r.seed for r in run.failures] == [2] and run.exit_code() == 1
    out = capsys.readouterr().out
    assert "FAIL seed 2: broken: why\n  replay: python -m zq.sim.x --seed 2" in out
    assert "  2/4 seeds, 0 failed" in out and "  4/4 seeds, 1 failed" in out
    assert run.summary().startswith("4 seeds in ") and run.summary().endswith("1 failed; 6 steps")
