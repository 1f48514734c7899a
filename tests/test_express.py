"""The numba lean path's one compiled call (``numba_cpu.inference.forward_express``): a call of a
few rows (weights read in place), or of more whose loops and projection run on the calling
thread, runs the whole stack in one compiled call, bitwise the ``forward_stack`` route and the
full path, close to torch.nn, for every cell, stack shape and route; the
calls it must not take (a loop BLAS call needing a thread-local setting, an input or state it
cannot read by address) take ``forward_stack`` or the full path, with the same results and
errors."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import fastrnn
from fastrnn import inference
from fastrnn.kernels import numba_cpu

from _support import (TOL, assert_bitwise, flatten, full_path, nan_filled_buffers, pair,
                      seed_of, spy_calls, streamed)
from _support import run_no_grad as run


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    nan_filled_buffers(monkeypatch)


@pytest.fixture
def routes(monkeypatch):
    """Per route, the calls the numba lean path made (``express``, ``stack``)."""
    lean = numba_cpu.lean_path()
    return {"express": spy_calls(monkeypatch, lean, "forward_express"),
            "stack": spy_calls(monkeypatch, lean, "forward_stack")}


@pytest.fixture
def threads():
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


def by_stack(mod, *args):
    """``mod(*args)`` without gradients on the lean path's forward_stack route."""
    lean = numba_cpu.lean_path()
    original = lean.express
    lean.express = lambda *a: None
    try:
        return run(mod, *args)
    finally:
        lean.express = original


def states(mod, x, dtype, generator):
    """Random initial states for ``mod`` and input ``x`` (as given: unbatched for 2-D x)."""
    layers = mod.num_layers * (2 if mod.bidirectional else 1)
    batch = () if x.dim() == 2 else (x.shape[0 if mod.batch_first else 1],)
    h = torch.randn(layers, *batch, mod.proj_size or mod.hidden_size, dtype=dtype,
                    generator=generator)
    if mod.mode != "LSTM":
        return h
    return h, torch.randn(layers, *batch, mod.hidden_size, dtype=dtype, generator=generator)


CASES = [  # variant, layers, bidirectional, batch_first, bias, shape of x (T*B <= 8), with hx
    ("rnn_tanh", 1, False, False, True, (1, 1, 5), True),
    ("rnn_relu", 2, True, False, True, (3, 2, 5), False),
    ("lstm", 1, False, False, True, (1, 1, 5), True),
    ("lstm", 3, True, True, True, (1, 4, 5), True),  # batch_first, T=1
    ("lstm", 2, False, True, False, (4, 1, 5), True),  # batch_first, B=1; no biases
    ("lstm_proj", 2, True, False, True, (2, 3, 5), True),
    ("gru", 3, True, False, True, (1, 1, 5), True),
    ("gru", 2, False, False, True, (8, 5), True),  # unbatched
    ("gru", 1, True, True, False, (3, 5), False),  # unbatched, batch_first; no biases
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_one_call_equals_the_stack_route_full_path_and_torch(case, dtype, routes, threads):
    threads(1)
    variant, layers, bidirectional, batch_first, bias, shape, with_hx = case
    generator = torch.Generator().manual_seed(seed_of(case, dtype))
    torch.manual_seed(seed_of(case, dtype))
    # hidden 12: the LSTM's 48 and the GRU's 36 gate columns make a float32 panel and a rest
    ref, mod = pair(variant, "numba", dtype, input_size=5, hidden_size=12, num_layers=layers,
                    bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    x = torch.randn(shape, dtype=dtype, generator=generator)
    args = (x, states(mod, x, dtype, generator)) if with_hx else (x,)
    got, again = run(mod, *args), run(mod, *args)
    assert len(routes["express"]) == 2 and not routes["stack"]
    assert_bitwise(again, got)
    assert_bitwise(got, by_stack(mod, *args))
    assert len(routes["stack"]) == 1
    assert_bitwise(got, full_path(mod, *args))
    for g, e in zip(flatten(got), flatten(run(ref, *args)), strict=True):
        torch.testing.assert_close(g, e, **TOL[dtype])


ROUTES = {  # the calls of more rows it takes, on 1 thread: name -> settings to patch
    # the panel kernels project (forced on any CPU), the step in the micro-kernels (T < 16)
    "panels-projection": {"projection.MAX_ROWS": 1 << 62, "matmul.USE_PANELS": True},
    # the gemm projects (MKL on an Intel CPU from 17 rows; forced on any CPU)
    "gemm-projection": {"projection.MAX_ROWS": 0},
    # the step matmul in the panel kernels (T >= 16), and through the gemm
    "panels-step": {"launch.PANELS_MIN_STEPS": 1, "matmul.USE_PANELS": True},
    "gemm-step": {"launch.MICROKERNEL_MAX_ROWS": 0, "launch.PANELS_MAX_ROWS": 0},
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", [("lstm_proj", 2, True, False, True, (4, 3, 5), True),
                                  ("gru", 2, False, True, True, (3, 4, 5), False),
                                  ("rnn_relu", 1, True, False, False, (10, 2, 5), True)],
                         ids=lambda c: "-".join(map(str, c)))
def test_more_rows(route, case, routes, threads, monkeypatch):
    """Calls of more rows (the weights prepared: W_hh transposed, maybe packed) whose loops and
    projection run on the calling thread are one compiled call too, on each route: bitwise the
    forward_stack route and the full path under the same settings."""
    from fastrnn.kernels.numba_cpu import launch, matmul, projection
    if not matmul.USE_BLAS and "gemm" in route:
        pytest.skip("torch exports no BLAS gemm here")
    threads(1)
    modules = {"launch": launch, "matmul": matmul, "projection": projection}
    for name, value in ROUTES[route].items():
        module, attr = name.split(".")
        monkeypatch.setattr(modules[module], attr, value)
    variant, layers, bidirectional, batch_first, bias, shape, with_hx = case
    generator = torch.Generator().manual_seed(seed_of(case, route))
    torch.manual_seed(seed_of(case, route))
    ref, mod = pair(variant, "numba", torch.float32, input_size=5, hidden_size=12,
                    num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                    bias=bias)
    x = torch.randn(shape, generator=generator)
    args = (x, states(mod, x, torch.float32, generator)) if with_hx else (x,)
    got = run(mod, *args)
    flat = not batch_first or 1 in shape[:2]
    assert len(routes["express"]) == flat
    plans = next(iter(inference._PREPARED[id(mod)].layers.calls.values())).layout.plans
    assert not plans[0].live
    assert plans[0].panels == (route == "panels-step")
    assert (plans[0].gemm != 0) == (route == "gemm-step")
    assert_bitwise(got, by_stack(mod, *args))
    assert_bitwise(got, full_path(mod, *args))
    for g, e in zip(flatten(got), flatten(run(ref, *args)), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "lstm_proj", "gru"])
def test_streamed_calls(cell, routes, threads):
    """One step per call, the state carried (given back as returned, changed in place between
    calls, or given new memory): bitwise the forward_stack route's calls, close to one call over
    all the steps."""
    threads(1)
    torch.manual_seed(seed_of(cell))
    ref, mod = pair(cell, "numba", torch.float32, input_size=5, hidden_size=12, num_layers=2)
    x = torch.randn(7, 1, 5)
    runs = []
    for route in (run, by_stack):
        state, ys = None, []
        for t in range(7):
            y, state = route(mod, x[t:t + 1], state)
            ys.append(y)
            last = state[-1] if isinstance(state, tuple) else state
            if t == 3:  # a returned state changed in place is read as it is now
                (state[0] if isinstance(state, tuple) else state).mul_(0.5)
            if t == 5:  # ... and one given new memory through .data, given back as returned
                last.data = last.data * 2
        runs.append((torch.cat(ys), state))
    assert len(routes["express"]) == 7 and len(routes["stack"]) == 7
    assert_bitwise(*runs)
    for g, e in zip(flatten(streamed(mod, x)), flatten(run(ref, x)), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


def test_peephole_lstm(routes, threads):
    threads(1)
    torch.manual_seed(0)
    mod = fastrnn.PeepholeLSTM(5, 4, num_layers=2, bidirectional=True, backend="numba")
    x, c0 = torch.randn(2, 3, 5), torch.randn(4, 3, 4)
    hx = (torch.randn_like(c0), c0)
    got = run(mod, x, hx)
    assert len(routes["express"]) == 1
    assert_bitwise(got, by_stack(mod, x, hx))
    assert_bitwise(got, full_path(mod, x, hx))


def test_two_threads(routes, threads):
    """On 2 threads a single row takes the one call (it calls no BLAS); more rows with a loop
    whose BLAS calls need a thread-local count take forward_stack."""
    threads(2)
    torch.manual_seed(0)
    ref, mod = pair("lstm", "numba", torch.float32, input_size=5, hidden_size=12)
    one, two = torch.randn(1, 1, 5), torch.randn(2, 1, 5)
    assert_bitwise(run(mod, one), full_path(mod, one))
    assert len(routes["express"]) == 1
    plan = numba_cpu.lean_path()._call(inference._PREPARED[id(mod)].layers, 2, 1, 1, 1,
                                       np.dtype(np.float32)).layout.plans[0]
    assert_bitwise(run(mod, two), full_path(mod, two))
    assert len(routes["express"]) == 1 + (plan.blas_threads == 0)


def test_inputs_it_does_not_read_by_address(routes, threads):
    """A non-contiguous input, batch-first rows not in (T*B) order, a non-contiguous state, a
    state with its negative bit set: the same results by the other routes; a state of another
    dtype: torch.nn's error type."""
    threads(1)
    torch.manual_seed(0)
    ref, mod = pair("lstm", "numba", torch.float32, input_size=5, hidden_size=4)
    x = torch.randn(2, 3, 5)
    h, c = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    cases = [(x.transpose(0, 1).contiguous().transpose(0, 1), (h, c)),  # strided input
             (x, (torch.randn(3, 1, 4).transpose(0, 1), c)),  # strided h0
             (x, (h, torch._neg_view(-c)))]  # c0 read through its negative bit
    for args in cases:
        got = run(mod, *args)
        ref_args = (args[0], tuple(s.clone() for s in args[1]))
        assert_bitwise(got, run(mod, *ref_args))
        for g, e in zip(flatten(got), flatten(run(ref, *ref_args)), strict=True):
            torch.testing.assert_close(g, e, **TOL[torch.float32])
    assert len(routes["express"]) == 3  # the clones' calls only
    mod.batch_first = ref.batch_first = True
    assert_bitwise(run(mod, x), full_path(mod, x))
    assert len(routes["express"]) == 3
    mod.batch_first = ref.batch_first = False
    bad = (h.double(), c)
    for module in (ref, mod):  # torch.nn's message is its backend's (oneDNN's here)
        with pytest.raises(RuntimeError):
            run(module, x, bad)
    assert len(routes["express"]) == 3


def test_calls_from_two_threads_at_once(threads):
    """Concurrent calls of one module each take their own scratch: the results of each thread
    are those of a call alone."""
    threads(1)
    torch.manual_seed(0)
    mod = fastrnn.GRU(5, 16, num_layers=2, backend="numba")
    xs = [torch.randn(4, 2, 5) for _ in range(2)]
    expected = [run(mod, x) for x in xs]
    failures = []

    def work(i):
        for _ in range(200):
            got = run(mod, xs[i])
            if not all(torch.equal(g, e) for g, e in zip(flatten(got), flatten(expected[i]))):
                failures.append(i)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures


def test_a_weight_with_its_negative_bit_set_is_not_read_in_place(threads):
    """Such a weight is read through a copy (numpy shows no negative bit): an in-place update of
    it is then seen by its contents, not missed as one read in place would be."""
    threads(1)
    torch.manual_seed(0)
    ref, mod = pair("lstm", "numba", torch.float32, input_size=5, hidden_size=4)
    mod.weight_hh_l0 = torch.nn.Parameter(torch._neg_view(-mod.weight_hh_l0.detach().clone()))
    x, hx = torch.randn(1, 1, 5), (torch.randn(1, 1, 4), torch.randn(1, 1, 4))
    for _ in range(2):
        for g, e in zip(flatten(run(mod, x, hx)), flatten(run(ref, x, hx)), strict=True):
            torch.testing.assert_close(g, e, **TOL[torch.float32])
        with torch.no_grad():
            mod.weight_hh_l0.add_(1)
            ref.weight_hh_l0.add_(1)
