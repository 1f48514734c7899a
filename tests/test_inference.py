"""The modules' lean inference path (:mod:`fastrnn.inference`, numba's
:mod:`fastrnn.kernels.numba_cpu.inference`): taken under no_grad / inference_mode for dense CPU
input, bitwise equal to the full path (the same module with the lean path switched off), equal
to torch.nn within tolerance, its prepared weights remade whenever a weight changes, and never
taken where the full path must run."""
from __future__ import annotations

import gc
import tracemalloc
import weakref

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import autograd, inference, weight_cache
from fastrnn.backends import BackendUnavailable
from fastrnn.kernels import numba_cpu

from _support import (LEAN_CASES, TOL, VARIANTS, assert_bitwise, flatten, full_path,
                      nan_filled_buffers, pair, seed_of, spy_calls, streamed)
from _support import run_no_grad as run


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    nan_filled_buffers(monkeypatch)


@pytest.fixture
def lean_calls(monkeypatch):
    """Counts the lean path's whole-stack calls (forward_stack's, and forward_express's: one
    compiled call)."""
    lean = numba_cpu.lean_path()
    return spy_calls(monkeypatch, lean, "forward_stack", spy_calls(monkeypatch, lean,
                                                                   "forward_express"))


def make_hx(variant, mod, x, batch_first, dtype, generator):
    layers = mod.num_layers * (2 if mod.bidirectional else 1)
    batch = () if x.dim() == 2 else (x.shape[0 if batch_first else 1],)
    proj = mod.proj_size or mod.hidden_size
    h = torch.randn(layers, *batch, proj, dtype=dtype, generator=generator)
    if mod.mode != "LSTM":
        return h
    return h, torch.randn(layers, *batch, mod.hidden_size, dtype=dtype, generator=generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", LEAN_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_lean_equals_full_path_and_torch(case, dtype, mode, lean_calls):
    variant, layers, bidirectional, batch_first, shape, with_hx = case
    generator = torch.Generator().manual_seed(seed_of(case, dtype, mode))
    torch.manual_seed(seed_of(case, dtype, mode))
    ref, mod = pair(variant, "numba", dtype, input_size=5, hidden_size=4, num_layers=layers,
                    bidirectional=bidirectional, batch_first=batch_first)
    x = torch.randn(shape, dtype=dtype, generator=generator)
    args = (x, make_hx(variant, mod, x, batch_first, dtype, generator)) if with_hx else (x,)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        got = mod(*args)
        again = mod(*args)  # the prepared weights reused
        expected = ref(*args)
    assert len(lean_calls) == 2
    assert_bitwise(got, full_path(mod, *args))
    assert_bitwise(again, got)
    for g, e in zip(flatten(got), flatten(expected), strict=True):
        torch.testing.assert_close(g, e, **TOL[dtype])


def assert_served(mod, ref, x, entry, same):
    """``mod(x)`` without gradients on the prepared weights ``entry`` (``same``) or new ones,
    close to torch.nn's on the module's weights."""
    got = run(mod, x)
    assert (inference._PREPARED[id(mod)] is entry) == same
    ref.load_state_dict(mod.state_dict())
    for g, e in zip(flatten(got), flatten(run(ref, x)), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


@pytest.mark.parametrize("live", [True, False], ids=["few_rows", "more_rows"])
@pytest.mark.parametrize("change", ["in_place", "data", "optimizer", "load_state_dict",
                                    "double", "functional_call", "through_data", "numpy",
                                    "sgd_by_hand", "soft_update"])
def test_prepared_weights_follow_the_module(change, live, lean_calls):
    """Remade after any change: those a version counter or data pointer shows, and writes through
    ``.data`` or a numpy view, which only the contents show (one element is enough); or, for a
    call of a few rows (``launch.live``), read in place (then no copy is taken)."""
    torch.manual_seed(0)
    ref, mod = pair("lstm", "numba", torch.float32, input_size=5, hidden_size=4, num_layers=2)
    x = torch.randn(3 if live else 5, 2, 5)
    assert numba_cpu.launch.live(x.shape[0] * x.shape[1]) == live
    before = run(mod, x)
    assert_bitwise(run(mod, x), before)  # seen unchanged: the contents copied, then compared
    assert (inference._PREPARED[id(mod)].fingerprint.copies is None) == live
    if change == "in_place":
        with torch.no_grad():
            mod.weight_hh_l1.mul_(0.5)
    elif change == "through_data":
        mod.weight_hh_l0.data[5, 2] += 1
    elif change == "numpy":
        mod.bias_hh_l1.detach().numpy()[3] -= 1
    elif change == "sgd_by_hand":  # the word-language-model example's training step
        mod(x)[0].square().sum().backward()
        for p in mod.parameters():
            p.data.add_(p.grad, alpha=-0.1)
    elif change == "soft_update":  # a reinforcement-learning target network's update
        online = pair("lstm", "numba", torch.float32, input_size=5, hidden_size=4,
                      num_layers=2)[1]
        for target, source in zip(mod.parameters(), online.parameters()):
            target.data.copy_(0.5 * source.data + 0.5 * target.data)
    elif change == "data":
        mod.bias_ih_l0.data = torch.randn(16)
    elif change == "optimizer":
        for p in mod.parameters():
            p.grad = torch.ones_like(p)
        torch.optim.SGD(mod.parameters(), lr=0.1).step()
    elif change == "load_state_dict":
        mod.load_state_dict(pair("lstm", "numba", torch.float32, input_size=5, hidden_size=4,
                                 num_layers=2)[0].state_dict())
    elif change == "double":
        mod.double()
        x = x.double()
    if change == "functional_call":
        params = {n: torch.randn_like(p) for n, p in mod.named_parameters()}
        with torch.no_grad():
            after = torch.func.functional_call(mod, params, (x,))
        ref.load_state_dict(params)
        assert_bitwise(run(mod, x), before)  # the module's own weights again
    else:
        after = run(mod, x)
        ref.to(x.dtype).load_state_dict(mod.state_dict())
    assert not torch.equal(after[0], before[0].to(after[0].dtype))
    with torch.no_grad():
        expected = ref(x)
    for g, e in zip(flatten(after), flatten(expected), strict=True):
        torch.testing.assert_close(g, e, **TOL[x.dtype])
    assert lean_calls


@pytest.mark.parametrize("rows", [12, 40], ids=["12-rows", "40-rows"])
@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru"])
def test_weights_changed_in_place_keep_the_prepared_stack(cell, rows, lean_calls):
    """Weights changed where they are (an optimizer's step; a write through ``.data``, which only
    the contents show) keep the prepared stack, what it made from them (W_hh^T, W_hr^T, their
    panels, W_ih packed: 12 rows project in the panel kernels on every CPU) made again in place:
    bitwise a fresh module's results. A weight given new memory remakes the stack."""
    torch.manual_seed(0)
    config = dict(input_size=5, hidden_size=6, num_layers=2)
    mod = pair(cell, "numba", torch.float32, **config)[1]
    x = torch.randn(rows // 2, 2, 5)
    run(mod, x)
    stack = mod_stack(mod)

    def check():
        fresh = pair(cell, "numba", torch.float32, **config)[1]
        fresh.load_state_dict(mod.state_dict())
        assert_bitwise(run(mod, x), run(fresh, x))

    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn_like(p), alpha=0.1)
    check()
    run(mod, x)  # seen unchanged: the contents copied, then compared
    mod.weight_hh_l1.data.mul_(0.5)
    check()
    assert mod_stack(mod) is stack
    mod.weight_hh_l0.data = mod.weight_hh_l0.data.clone()
    check()
    assert mod_stack(mod) is not stack and len(lean_calls) == 8


def test_contents_check_off(monkeypatch, lean_calls):
    """``weight_cache.CHECK_CONTENTS = False``: no copies, versions and pointers still followed,
    a write through ``.data`` not (the documented cost of turning the check off)."""
    monkeypatch.setattr(weight_cache, "CHECK_CONTENTS", False)
    torch.manual_seed(0)
    ref, mod = pair("gru", "numba", torch.float32, input_size=5, hidden_size=4)
    x = torch.randn(5, 2, 5)
    assert not numba_cpu.launch.live(10)  # a call of a few rows would read W_hh in place
    before = run(mod, x)
    assert_bitwise(run(mod, x), before)
    entry = inference._PREPARED[id(mod)]
    assert entry.fingerprint.copies is None
    mod.weight_hh_l0.data.mul_(2)
    assert_bitwise(run(mod, x), before)  # stale: nothing looked at the contents
    assert inference._PREPARED[id(mod)] is entry
    with torch.no_grad():
        mod.weight_hh_l0.mul_(0.5)  # back to the first weights, by a versioned update
    ref.load_state_dict(mod.state_dict())
    with torch.no_grad():
        mod.weight_ih_l0.mul_(2)
        ref.weight_ih_l0.mul_(2)
    for g, e in zip(flatten(run(mod, x)), flatten(run(ref, x)), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])
    assert inference._PREPARED[id(mod)] is not entry and len(lean_calls) == 4


def test_calls_of_a_few_rows_read_the_weight_matrices_in_place(lean_calls):
    """A call of at most ``launch.LIVE_MAX_ROWS`` rows reads every weight in place: a write to a
    matrix through ``.data``, an optimizer's step, is seen without remaking the prepared weights
    (no version counter, no copy looked at); a longer call after a write to a matrix remakes them
    (it reads W_hh transposed: the matrices' contents compared), not after a write to a bias
    (every call sums the biases again) nor, for a few rows, after ``w.data = w.data.t()``
    (the same pointer: its views would be stale)."""
    torch.manual_seed(0)
    ref, mod = pair("lstm", "numba", torch.float32, input_size=5, hidden_size=4, num_layers=2)
    rows = numba_cpu.launch.LIVE_MAX_ROWS
    few, more = torch.randn(rows, 1, 5), torch.randn(rows + 1, 1, 5)

    run(mod, few)
    run(mod, more)  # the weights seen unchanged: their contents copied
    entry = inference._PREPARED[id(mod)]
    assert entry.fingerprint.copies is not None
    mod.weight_hh_l0.data[5, 2] += 1
    mod.weight_ih_l1.data[0, 0] -= 1
    assert_served(mod, ref, few, entry, True)
    assert_served(mod, ref, more, entry, False)
    run(mod, more)
    entry = inference._PREPARED[id(mod)]
    mod.bias_hh_l1.data[3] += 1
    assert_served(mod, ref, few, entry, True)
    assert_served(mod, ref, more, entry, True)
    for p in mod.parameters():
        p.grad = torch.ones_like(p)
    torch.optim.SGD(mod.parameters(), lr=0.1).step()
    assert_served(mod, ref, few, entry, True)
    square = fastrnn.RNN(4, 4, backend="numba")  # W_hh (4, 4): transposed in place
    ref = torch.nn.RNN(4, 4)
    mod, x = square, torch.randn(2, 1, 4)
    run(mod, x)
    entry = inference._PREPARED[id(mod)]
    mod.weight_hh_l0.data = mod.weight_hh_l0.data.t()
    assert_served(mod, ref, x, entry, False)
    assert len(lean_calls) == 10


def test_calls_projecting_on_w_ih_as_given_do_not_compare_it(monkeypatch, lean_calls):
    """A call whose input projection reads W_ih in place (the BLAS gemm, as with MKL on an Intel
    CPU from 17 rows; forced here) sees a write to W_ih through ``.data`` without comparing its
    contents (the prepared weights kept); a call that projects on W_ih packed compares it (and
    remakes them); a write to W_hh is seen by both (its transposed copy remade)."""
    from fastrnn.kernels.numba_cpu import projection
    if not numba_cpu.matmul.USE_BLAS:
        pytest.skip("torch exports no BLAS gemm here: W_ih is always projected by torch.mm")
    torch.manual_seed(0)
    ref, mod = pair("lstm", "numba", torch.float32, input_size=5, hidden_size=4, num_layers=2)
    x = torch.randn(5, 2, 5)

    def check(packed, same):
        monkeypatch.setattr(projection, "MAX_ROWS", 1 << 62 if packed else 0)
        monkeypatch.setattr(numba_cpu.matmul, "USE_PANELS", packed)
        assert_served(mod, ref, x, entry, same)

    run(mod, x)
    run(mod, x)  # seen unchanged: the contents copied
    entry = inference._PREPARED[id(mod)]
    mod.weight_ih_l1.data[0, 0] += 1
    check(packed=False, same=True)
    check(packed=True, same=False)
    entry = inference._PREPARED[id(mod)]
    mod.weight_hh_l0.data[1, 1] -= 1
    check(packed=False, same=False)
    assert len(lean_calls) == 5


def test_streamed_calls_read_the_state_given_back(lean_calls):
    """Calls of one step, each given the state the previous call returned (read through the arrays
    kept with it, no new view), equal one call over all the steps; a returned state changed in
    place or replaced through ``.data`` is read as it is then, as a new tensor would (also where
    the states are unbatched: (L, H))."""
    torch.manual_seed(0)
    ref, mod = pair("lstm", "numba", torch.float32, input_size=5, hidden_size=4, num_layers=2)
    x = torch.randn(6, 2, 5)
    _, state = got = streamed(mod, x)
    for g, e in zip(flatten(got), flatten(run(ref, x)), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])

    def fresh(s):
        return tuple(t.clone() for t in s)

    step = x[:1]
    h, c = state
    with torch.no_grad():
        h[1].zero_()
    assert_bitwise(run(mod, step, (h, c)), run(mod, step, fresh((h, c))))
    _, state = run(mod, step, (h, c))
    state[1].data = torch.ones_like(state[1])
    assert_bitwise(run(mod, step, state), run(mod, step, fresh(state)))
    _, (h, c) = run(mod, x[0, 0][None], (h[:, 0], c[:, 0]))  # unbatched: (L, H) states
    assert_bitwise(run(mod, x[0, 1][None], (h, c)), run(mod, x[0, 1][None], fresh((h, c))))
    assert len(lean_calls) == 14


def test_the_in_place_rule_is_followed_after_a_cached_call(monkeypatch, lean_calls):
    """A call's layout is kept per shape and settings, LIVE_MAX_ROWS among them: made for a call
    that read W_hh transposed, it is not reused once such a call reads the weights in place (and
    its matrices' contents are no longer compared)."""
    torch.manual_seed(0)
    ref, mod = pair("gru", "numba", torch.float32, input_size=5, hidden_size=4)
    x = torch.randn(2, 1, 5)
    monkeypatch.setattr(numba_cpu.launch, "LIVE_MAX_ROWS", 0)
    run(mod, x)
    run(mod, x)
    monkeypatch.setattr(numba_cpu.launch, "LIVE_MAX_ROWS", 2)
    mod.weight_hh_l0.data[1, 1] += 1
    got = run(mod, x)
    ref.load_state_dict(mod.state_dict())
    for g, e in zip(flatten(got), flatten(run(ref, x)), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])
    assert len(lean_calls) == 3


def test_backend_switch_and_inference_tensor_weights(lean_calls):
    torch.manual_seed(0)
    ref, mod = pair("gru", "numba", torch.float32, input_size=5, hidden_size=4)
    x = torch.randn(3, 2, 5)
    run(mod, x)
    mod.backend = "native"
    assert_bitwise(run(mod, x), run(ref, x))  # torch.nn's own op now
    assert len(lean_calls) == 1
    with torch.inference_mode():  # weights that carry no version counter: prepared every call
        made = fastrnn.GRU(5, 4, backend="numba")
        made.load_state_dict(ref.state_dict())
        first = made(x)
        made.weight_hh_l0.mul_(2)
        second = made(x)
    ref.weight_hh_l0.data.mul_(2)
    assert_bitwise(second, full_path(made, x))
    assert not torch.equal(first[0], second[0])
    assert len(lean_calls) == 3


def test_not_taken_where_the_full_path_runs(lean_calls):
    torch.manual_seed(0)
    ref, mod = pair("lstm", "numba", torch.float32, input_size=5, hidden_size=4, num_layers=2,
                    dropout=0.5)
    x = torch.randn(4, 3, 5)
    mod(x)  # gradients on
    with torch.no_grad():
        mod(pack_padded_sequence(x, [4, 3, 1]))
        mod(x)  # training mode with inter-layer dropout
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(BackendUnavailable):
            mod.eval()(x)  # numba runs no bfloat16: the full path says so
    assert lean_calls == []
    with torch.no_grad():
        mod(x)  # eval: no dropout
    assert len(lean_calls) == 1


@pytest.mark.parametrize("bad", ["dtype", "features", "hx_shape", "hx_dtype", "hx_tuple", "dim"])
def test_bad_input_raises_as_the_full_path(bad, lean_calls):
    torch.manual_seed(0)
    ref, mod = pair("lstm", "numba", torch.float32, input_size=5, hidden_size=4)
    x, hx = torch.randn(3, 2, 5), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    args = {"dtype": (x.double(), hx), "features": (torch.randn(3, 2, 6), hx),
            "hx_shape": (x, (torch.zeros(1, 3, 4), hx[1])),
            "hx_dtype": (x, (hx[0].double(), hx[1])), "hx_tuple": (x, hx[0]),
            "dim": (torch.randn(2, 3, 2, 5), hx)}[bad]
    with torch.no_grad():
        with pytest.raises(Exception) as expected:  # test_errors: the full path's are torch's
            full_path(mod, *args)
        with pytest.raises(type(expected.value)) as got:
            mod(*args)
    assert str(got.value) == str(expected.value)
    assert lean_calls == []


ROUTES = {  # how the numba lean path runs a layer: name -> (torch threads, settings to patch)
    "one-thread": (1, {}),  # small batches: the step matmul in the micro-kernel
    "one-thread-blas": (1, {"launch.MICROKERNEL_MAX_ROWS": 0, "launch.PANELS_MAX_ROWS": 0}),
    # 2 threads, small steps: the loop's gemm calls on 1
    "blas-threads-local": (2, {"launch.MICROKERNEL_MAX_ROWS": 0, "launch.PANELS_MAX_ROWS": 0}),
    "outputs-apart": (1, {"inference.GROUP_MAX_BYTES": 0}),
    "scratch-not-kept": (1, {"inference.SCRATCH_KEEP_MAX_BYTES": 0}),
    "loop-threads": (2, {"launch.PARALLEL_MIN_BATCH": 1, "launch.PARALLEL_MIN_WORK": 0}),
    "no-blas": (1, {"matmul.USE_BLAS": False}),
    "no-panels": (1, {"matmul.USE_PANELS": False}),  # the micro-kernel on unpacked weights
    "panels": (1, {"launch.PANELS_MIN_STEPS": 1}),  # panel kernels (where the CPU uses them)
    # the input projection in the panel kernels (forced on any CPU), on 1 and 2 threads
    "projection": (1, {"matmul.USE_PANELS": True, "projection.MAX_ROWS": 1 << 62}),
    "projection-threads": (2, {"projection.BLOCK_ROWS": 4, "matmul.USE_PANELS": True,
                               "projection.MAX_ROWS": 1 << 62}),
    # many rows where MKL runs on an Intel CPU: the gemm projects (forced on any CPU)
    "projection-gemm": (1, {"projection.MAX_ROWS": 0}),
    # a long input (forced): projected in chunks of 1 step, of 3 steps (a shorter last one)
    "chunked": (1, {"autograd.PROJECTION_CHUNK_MIN_CHUNKS": 0, "autograd.PROJECTION_CHUNK_BYTES": 1,
                    "autograd.PROJECTION_CHUNK_WEIGHTS": 0,
                    "autograd.PROJECTION_CHUNK_MIN_STEPS": 1}),
    "chunked-3": (1, {"autograd.PROJECTION_CHUNK_MIN_CHUNKS": 0,
                      "autograd.PROJECTION_CHUNK_BYTES": 1, "autograd.PROJECTION_CHUNK_WEIGHTS": 0,
                      "autograd.PROJECTION_CHUNK_MIN_STEPS": 3}),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", [("lstm_proj", 2, True, False, (4, 3, 5), True),
                                  ("gru", 3, False, True, (3, 4, 5), False),
                                  ("rnn_relu", 2, True, False, (6, 2, 5), True)],
                         ids=lambda c: "-".join(map(str, c)))
def test_lean_routes_equal_full_path(route, case, monkeypatch, lean_calls):
    """Each way the numba lean path can run (one thread; its loop's BLAS calls on a thread-local
    count; states and output in two allocations; scratch not kept; the loop on several threads;
    no BLAS) is bitwise the full path under the same settings, twice (the second call on the
    first's scratch where it is kept), and close to torch.nn. The ways of forward_stack: a call
    it would run as one compiled call runs here too (that one: tests/test_express.py)."""
    from fastrnn.kernels.numba_cpu import inference as lean, launch, matmul, projection
    monkeypatch.setattr(lean, "express", lambda *args: None)
    threads, settings = ROUTES[route]
    if launch._CPUS < threads:
        pytest.skip(f"needs {threads} CPUs, this process may run on {launch._CPUS}")
    modules = {"inference": lean, "launch": launch, "matmul": matmul, "projection": projection,
               "autograd": autograd}
    projected = []  # layers the projection kernel ran (lean and full path alike)
    project = projection.run
    monkeypatch.setattr(projection, "run", lambda *a: projected.append(1) or project(*a))
    for name, value in settings.items():
        module, attr = name.split(".")
        monkeypatch.setattr(modules[module], attr, value)
    variant, layers, bidirectional, batch_first, shape, with_hx = case
    generator = torch.Generator().manual_seed(seed_of(case, route))
    torch.manual_seed(seed_of(case, route))
    # hidden 12: the LSTM's 48 and the GRU's 36 gate columns make a float32 panel and a rest
    ref, mod = pair(variant, "numba", torch.float32, input_size=5, hidden_size=12,
                    num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    x = torch.randn(shape, generator=generator)
    args = (x, make_hx(variant, mod, x, batch_first, torch.float32, generator)) if with_hx \
        else (x,)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, again = run(mod, *args), run(mod, *args)
        call = next(iter(mod_stack(mod).calls.values()))
        plans = call.layout.plans
        assert (call.layout.chunks is not None) == route.startswith("chunked")
        assert call.layout.one_buffer == (route != "outputs-apart")
        assert len(call.free) == (route != "scratch-not-kept")
        assert all(p.nthreads == (2 if route == "loop-threads" else 1) for p in plans)
        assert all(p.blas_threads == (threads == 2) for p in plans)  # never 2 x 2 threads
        blas = matmul.USE_BLAS and settings.get("launch.PANELS_MAX_ROWS") == 0
        assert all((p.gemm != 0) == (blas or p.live) for p in plans)  # live: a chunk of 1 step
        panels = route == "panels" and matmul.USE_PANELS
        stacks = layers * (1 + bidirectional)
        # layers the panel kernels project a call (a long input: chunks of more than a few rows,
        # as the full path's)
        per_call = stacks if matmul.USE_PANELS and route != "projection-gemm" else 0
        if call.layout.chunks:
            per_call = layers * sum(c.project == lean.PANELS for parts in call.layout.chunks
                                    for c in parts)
        assert len(projected) == 2 * per_call
        assert (mod_stack(mod).projections is not None) == (per_call > 0)
        assert all(p.panels == panels for p in plans)
        assert (mod_stack(mod).panels is not None) == panels  # packed only once a call needs it
        expected = full_path(mod, *args)
        assert len(projected) == 3 * per_call
    finally:
        torch.set_num_threads(previous)
    assert len(lean_calls) == 2
    assert_bitwise(got, expected)
    assert_bitwise(again, expected)
    for g, e in zip(flatten(got), flatten(ref(*args)), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


@pytest.mark.parametrize("most, module_most", [(None, None), (2 << 10, None),
                                               (2 << 10, 6 << 10)],
                         ids=["default", "2KiB", "2KiB-module-6KiB"])
def test_kept_calls_and_scratch_are_bounded(most, module_most, monkeypatch):
    """A module called on many shapes keeps at most CALLS_KEPT of them, each with at most
    SCRATCH_KEEP_MAX_BYTES of scratch, the one compiled call's included (with 2 KiB, some shapes
    whose layout's scratch is kept would need more for it: they take forward_stack), and at most
    MODULE_SCRATCH_MAX_BYTES in all (a shape beyond it drops those kept before)."""
    from fastrnn.kernels.numba_cpu import inference as lean
    if most is not None:
        monkeypatch.setattr(lean, "SCRATCH_KEEP_MAX_BYTES", most)
    if module_most is not None:
        monkeypatch.setattr(lean, "MODULE_SCRATCH_MAX_BYTES", module_most)
    mod = fastrnn.GRU(5, 8, backend="numba")
    for steps in [*range(1, lean.CALLS_KEPT + 5), *range(1, 7)]:  # the last ones keep scratch
        run(mod, torch.randn(steps, 2, 5))
    calls, total = mod_stack(mod).calls.values(), 0
    assert 0 < len(calls) <= lean.CALLS_KEPT
    for call in calls:
        kept = sum(a.nbytes for group in call.free for a in group)
        if call.express is not None:
            kept += sum(a.nbytes for a in call.express.free)
        assert kept <= lean.SCRATCH_KEEP_MAX_BYTES + 64 * len(call.layout.scratch)
        total += kept
    assert 0 < total <= lean.MODULE_SCRATCH_MAX_BYTES + 64 * sum(
        len(call.layout.scratch) for call in calls)
    if module_most is not None:  # the budget, not the count, dropped shapes
        assert len(calls) < lean.CALLS_KEPT
    if most is not None and module_most is None:
        assert {call.express is None for call in calls if call.layout.keep_scratch} == {
            True, False}


def mod_stack(mod):
    """The numba lean path's prepared stack of ``mod``."""
    return inference._PREPARED[id(mod)].layers


def test_plans_per_thread_count(lean_calls):
    torch.manual_seed(0)
    ref, mod = pair("gru", "numba", torch.float32, input_size=8, hidden_size=16)
    x = torch.randn(5, 64, 8)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert_bitwise(run(mod, x), full_path(mod, x))
    finally:
        torch.set_num_threads(threads)
    assert len(lean_calls) == 2


def test_prepared_weights_do_not_outlive_the_module():
    mod = fastrnn.LSTM(5, 4, backend="numba")
    run(mod, torch.randn(2, 1, 5))
    key = id(mod)
    assert inference._PREPARED[key].module() is mod
    gone = weakref.ref(mod)
    del mod
    gc.collect()
    assert gone() is None and key not in inference._PREPARED


@pytest.mark.parametrize("packed", [False, True], ids=["lean", "full"])
def test_final_state_does_not_keep_the_output_alive(packed):
    """Without gradients, keeping only the final state (an encoder's) frees the output, as with
    torch.nn, on the lean path and on the full one (packed input): the numpy buffers left
    (tracemalloc traces numpy's; under 1 MiB the kernels' buffers are numpy's) are far below the
    output's 512 KiB."""
    module = fastrnn.LSTM(8, 64, backend="numba")
    x = torch.randn(512, 4, 8)
    if packed:
        x = pack_padded_sequence(x, [512] * 4)
    with torch.no_grad():
        module(x)  # compiled and prepared before tracing (prepared again on the second call,
        module(x)  # which copies the weights: fastrnn.weight_cache)
        gc.collect()
        tracemalloc.start()
        try:
            out, (h, c) = module(x)
            del out
            gc.collect()
            left = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    assert h.shape == c.shape == (1, 4, 64)
    assert left < 64 << 10, left


def test_variants_cover_the_numba_cells():
    assert {v for v, *_ in LEAN_CASES} == set(VARIANTS)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_peephole_lstm(bidirectional, lean_calls):
    torch.manual_seed(0)
    mod = fastrnn.PeepholeLSTM(5, 4, num_layers=2, bidirectional=bidirectional, backend="numba")
    x, c0 = torch.randn(6, 3, 5), torch.randn(2 * (1 + bidirectional), 3, 4)
    hx = (torch.zeros_like(c0), c0)
    with torch.no_grad():
        got = mod(x, hx)
    assert_bitwise(got, full_path(mod, x, hx))
    assert len(lean_calls) == 1


def test_shape_decisions_follow_batch_first_and_are_bounded(lean_calls):
    """The lean path's per-shape decisions (``_Prepared.shapes``) are keyed on batch_first too (a
    module's attribute may change between calls) and at most ``_SHAPES_KEPT`` are kept."""
    torch.manual_seed(0)
    ref, mod = pair("lstm", "numba", torch.float32, input_size=5, hidden_size=4)
    x = torch.randn(3, 2, 5)
    first = run(mod, x)
    mod.batch_first = ref.batch_first = True
    got = run(mod, x)  # the same tensor read as (B=3, T=2, I)
    assert got[0].shape == (3, 2, 4)
    assert_bitwise(got, full_path(mod, x))
    for g, e in zip(flatten(got), flatten(run(ref, x)), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])
    assert not torch.equal(got[1][0], first[1][0])
    for steps in range(1, inference._SHAPES_KEPT + 5):
        run(mod, torch.randn(2, steps, 5))
    assert 0 < len(inference._PREPARED[id(mod)].shapes) <= inference._SHAPES_KEPT
    assert len(lean_calls) == 2 + inference._SHAPES_KEPT + 4
