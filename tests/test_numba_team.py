"""The numba backend's multi-threaded plans in torch's OpenMP team (fastrnn/kernels/numba_cpu/
team.py): the column split (each step's weight panels over the threads, barriers between) and
the row split, against one thread (bitwise) and torch.nn; the fallback when the runtime gives
fewer threads; the disk cache of the team loops."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _support import assert_all_close, flatten, make_case, nan_filled_buffers, pair, run_and_grad

from fastrnn.kernels.numba_cpu import launch, loops, matmul, projection, team

TWO_THREADS = min(torch.get_num_threads(), launch._CPUS) >= 2
pytestmark = [
    pytest.mark.skipif(not team.AVAILABLE, reason="no OpenMP runtime found in this process"),
    pytest.mark.skipif(not TWO_THREADS, reason="needs torch.get_num_threads() >= 2 and 2 CPUs")]


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    nan_filled_buffers(monkeypatch)


@pytest.fixture
def team_calls(monkeypatch):
    """The calls of the team loops (forward, backward, input projection), counted."""
    calls = []
    for loop in (loops._forward_thread, loops._backward_thread, projection._project_thread):
        def counted(*args, _run=team.LOOPS[loop], _name=loop.__name__):
            calls.append((_name, args[0]))
            _run(*args)
        monkeypatch.setitem(team.LOOPS, loop, counted)
    return calls


def split_everywhere(monkeypatch, split=True):
    """Panel kernels on every step count (forced on any CPU; so the input projection without
    gradients too, in blocks of 4 rows over the threads); the column split at every step size
    (``split``) or the row split at every batch size."""
    monkeypatch.setattr(matmul, "USE_PANELS", True)
    monkeypatch.setattr(projection, "BLOCK_ROWS", 4)
    monkeypatch.setattr(projection, "MAX_ROWS", 1 << 62)
    monkeypatch.setattr(launch, "PANELS_MIN_STEPS", 1)
    monkeypatch.setattr(launch, "SPLIT_MIN_STEP_WORK", 0)
    monkeypatch.setattr(launch, "SPLIT_MIN_STEP_WORK_TRAINING", 0)
    monkeypatch.setattr(launch, "PARALLEL_MIN_BATCH", float("inf") if split else 0)
    monkeypatch.setattr(launch, "PARALLEL_MIN_WORK", float("inf") if split else 0)


def results(mod, leaves, build, weights, threads):
    """(outputs and gradients of a forward+backward, outputs without gradients) on ``threads``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs, grads = run_and_grad(mod, leaves, build, weights)
        with torch.no_grad():
            lean = flatten(mod(*build(leaves)))
    finally:
        torch.set_num_threads(previous)
    return outs + grads, lean


CASES = [  # (variant, format, dtype, hidden): hidden past whole panels (72 float32, 40 float64)
    ("lstm", "seq_first", torch.float32, 72), ("lstm", "packed_sorted", torch.float64, 40),
    ("gru", "packed_unsorted", torch.float32, 64), ("gru", "seq_first", torch.float64, 40),
    ("rnn_tanh", "batch_first", torch.float32, 72),
    ("rnn_relu", "packed_sorted", torch.float32, 64),
]


@pytest.mark.parametrize("split", [True, False], ids=["columns", "rows"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_team_plans_equal_one_thread_and_torch(case, split, monkeypatch, team_calls):
    """2 layers, both directions, given states: the team's plans give bitwise the one-thread
    results (forward+backward and no-gradient outputs), close to torch.nn's (float32 1e-5 / 1e-4,
    float64 1e-9), and ran in the team: forward, backward and the input projection."""
    variant, fmt, dtype, hidden = case
    split_everywhere(monkeypatch, split)
    ref, mod, leaves, build, weights = make_case(variant, fmt, 2, True, True, True, dtype, "numba",
                                                 T=20, B=3, I=8, H=hidden)
    one, one_lean = results(mod, leaves, build, weights, 1)
    assert team_calls == []
    two, two_lean = results(mod, leaves, build, weights, 2)
    names = {name for name, _ in team_calls}
    assert names == {"_forward_thread", "_backward_thread", "_project_thread"}
    assert {n for _, n in team_calls} == {2}
    for got, want in zip(two + two_lean, one + one_lean):
        assert (got is None) == (want is None) and (got is None or torch.equal(got, want))
    expected_outs, expected_grads = run_and_grad(ref, leaves, build, weights)
    assert_all_close(two, expected_outs + expected_grads, dtype, "team vs torch.nn")
    assert_all_close(two_lean, expected_outs, dtype, "team, no gradients, vs torch.nn")


def test_column_split_with_projection(monkeypatch, team_calls):
    """LSTM with proj_size: the projection's matmul on each thread's own rows, the recurrent one
    by columns; bitwise one thread, close to torch.nn."""
    split_everywhere(monkeypatch)
    torch.manual_seed(0)
    ref, mod = pair("lstm", "numba", torch.float32, input_size=8, hidden_size=96, proj_size=64)
    x = torch.randn(20, 5, 8)
    weights = [torch.randn(20, 5, 64), torch.randn(1, 5, 64), torch.randn(1, 5, 96)]
    one = results(mod, [x], lambda t: (t[0], None), weights, 1)
    two = results(mod, [x], lambda t: (t[0], None), weights, 2)
    assert team_calls and all(torch.equal(a, b) for a, b in zip(two[0] + two[1], one[0] + one[1]))
    outs, grads = run_and_grad(ref, [x], lambda t: (t[0], None), weights)
    assert_all_close(two[0], outs + grads, torch.float32, "projection, team vs torch.nn")


def test_split_rules(monkeypatch):
    """Columns are split from SPLIT_MIN_STEP_WORK multiply-adds a step without a backward,
    SPLIT_MIN_STEP_WORK_TRAINING with one; never with under a panel per thread, without an OpenMP
    runtime, or where the rows are split."""
    monkeypatch.setattr(matmul, "USE_PANELS", True)

    def plan(batch, hidden, inference):
        sizes = torch.full((50,), batch, dtype=torch.int64)
        return launch._schedule(sizes, False, batch, 4 * hidden, hidden, 4, inference)

    work, training = launch.SPLIT_MIN_STEP_WORK, launch.SPLIT_MIN_STEP_WORK_TRAINING
    assert plan(4, 64, False).split and plan(4, 64, False).nthreads == 2
    assert 4 * 4 * 64 * 64 >= training > 4 * 32 * 32
    assert not plan(1, 64, False).split and not plan(4, 32, False).split
    assert plan(4, 256, True).split and 4 * 4 * 256 * 256 >= work
    assert not plan(1, 64, True).split and 4 * 64 * 64 < work
    assert not plan(4, 16, False).split  # 16 columns of W_hh: under one panel each
    assert not plan(64, 256, True).split and plan(64, 256, True).nthreads == 2  # rows
    monkeypatch.setattr(team, "AVAILABLE", False)
    assert not plan(4, 256, False).split and plan(4, 256, False).nthreads == 1


TEAM_SCRIPT = """if True:
    import torch
    from fastrnn.kernels.numba_cpu import launch, loops, matmul
    matmul.USE_PANELS, launch.PANELS_MIN_STEPS, launch.SPLIT_MIN_STEP_WORK = True, 1, 0
    torch.manual_seed(0)
    xg, h0, c0 = torch.randn(12, 256), torch.randn(3, 64), torch.randn(3, 64)
    w = torch.randn(256, 64) / 8
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out.append(launch.recurrence_forward("lstm", xg, h0, c0, w, None, None,
                                             torch.tensor([3] * 4), False, save=False)[:3])
    print(all(torch.equal(a, b) for a, b in zip(*out)),
          sum(loops._forward_team.stats.cache_hits.values()),
          sum(loops._forward_team.stats.cache_misses.values()))
"""


def run_script(env=None):
    run = subprocess.run([sys.executable, "-c", TEAM_SCRIPT], capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})))
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.split()


def test_team_loop_loads_from_the_disk_cache():
    """A second process loads the team loop from Numba's disk cache (one hit, no compile)."""
    run_script()
    assert run_script() == ["True", "1", "0"]


def test_fewer_threads_than_planned_fall_back_to_one():
    """Where the OpenMP runtime gives fewer threads than the plan (OMP_THREAD_LIMIT=1 here), the
    calling thread runs the loop alone, every barrier passing at once: the same bits, no hang."""
    assert run_script({"OMP_THREAD_LIMIT": "1"})[0] == "True"
