"""The decode points of ``mamba-rt bench`` (and so of the suite) where the host, not the GPU, set the pace:
measured once more, both measurements kept, a second host-paced one marked."""
from __future__ import annotations

import pytest

from mamba_rt import bench


def point(median, wall, timer="cuda_event", p99=None):
    return {"timer": timer, "median_ms": median, "p99_ms": p99 or median * 1.01, "wall_per_call_ms": wall, "steps": 200}


@pytest.mark.parametrize("r, expected", [
    (point(0.52, 0.53), None),                       # steps queued ahead: wall time = GPU time
    (point(0.52, 0.52 * 1.149), None),               # just under the threshold
    (point(0.523, 0.697, p99=1.403), 0.697 / 0.523),  # the 130m bf16 batch-8 row of session 30
    (point(0.815, 2.88), 2.88 / 0.815),              # the 130m bf16 batch-64 row of session 29
    (point(0.52, 0.90, timer="wall"), None),         # perf_counter timing: nothing to compare with
])
def test_host_paced_compares_wall_with_gpu_time(r, expected):
    got = bench.host_paced(r)
    assert got == (None if expected is None else pytest.approx(expected))


def scripted(monkeypatch, *results):
    calls = []

    def decode_run(s, batch, steps, warmup, timer, probe=None):
        calls.append((batch, steps, warmup))
        return dict(results[len(calls) - 1])

    monkeypatch.setattr(bench, "decode_run", decode_run)
    return calls


def test_a_clean_point_is_measured_once(monkeypatch):
    calls = scripted(monkeypatch, point(0.52, 0.53))
    r = bench.decode_point(None, 8, 200, 20, None)
    assert calls == [(8, 200, 20)]
    assert "first_attempt" not in r and "host_paced" not in r and r["wall_per_call_ms"] == 0.53


def test_a_host_paced_point_is_measured_again_and_both_kept(monkeypatch):
    logged = []
    calls = scripted(monkeypatch, point(0.523, 0.697, p99=1.403), point(0.526, 0.527))
    r = bench.decode_point(None, 8, 200, 20, None, log=logged.append)
    assert len(calls) == 2
    assert (r["median_ms"], r["wall_per_call_ms"]) == (0.526, 0.527) and "host_paced" not in r
    assert r["first_attempt"] == {"median_ms": 0.523, "p99_ms": 1.403, "wall_per_call_ms": 0.697}
    assert len(logged) == 1 and "batch 8" in logged[0] and "1.33x" in logged[0] and "once more" in logged[0]


def test_the_second_measurement_is_kept_even_when_host_paced_again(monkeypatch):
    calls = scripted(monkeypatch, point(0.5, 0.9), point(0.5, 0.8))
    r = bench.decode_point(None, 1, 200, 20, None)
    assert len(calls) == 2  # never a third: a slow host stays visible instead of being retried away
    assert r["wall_per_call_ms"] == 0.8 and r["host_paced"] == pytest.approx(1.6)
    assert r["first_attempt"]["wall_per_call_ms"] == 0.9


def test_the_table_marks_a_host_paced_point(bench_run):
    r, _ = bench_run
    marked = {**r, "decode": [dict(d) for d in r["decode"]]}
    assert " *" not in bench.format_table(marked)
    marked["decode"][-1]["host_paced"] = 1.6
    table = bench.format_table(marked).splitlines()
    rows = [line for line in table if line.lstrip().startswith(str(marked["decode"][-1]["batch"]) + " ")]
    assert len(rows) == 1 and rows[0].endswith(" *")
    assert any(line.strip().startswith("* the host set the pace") for line in table)


def test_timer_runs_the_collector_before_the_loop_and_not_in_it():
    """A collection inside the timed loop would pause a call and, for the memory probe, free what the caller
    left behind (a decode point's device memory then reads as changing); after the loop the collector is as
    it was."""
    import gc

    class Cycle:
        freed = 0

        def __del__(self):
            Cycle.freed += 1

    a, b = Cycle(), Cycle()
    a.other, b.other = b, a
    del a, b  # garbage only a collection frees
    during = []
    r = bench.Timer(cuda=False).run(lambda: during.append((gc.isenabled(), Cycle.freed)), 3, probe=lambda: 0,
                                    probe_every=1)
    assert during == [(False, 2)] * 3 and gc.isenabled()
    assert r["steps"] == 3 and [m for _, m in r["memory_trace"]] == [0, 0, 0]
    gc.disable()
    try:
        bench.Timer(cuda=False).run(lambda: None, 2)
        assert not gc.isenabled()
    finally:
        gc.enable()
