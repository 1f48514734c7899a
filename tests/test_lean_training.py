"""The modules' lean training path (:mod:`fastrnn.training`, numba's
:mod:`fastrnn.kernels.numba_cpu.training`): taken where a gradient is recorded on a dense CPU
input; its outputs and every gradient (input, initial states, each parameter) bitwise the full
path's (the same module with the lean path switched off) and close to torch.nn's; double
backward, retained graphs, frozen weights, checkpointing, carried states, in-place changes and
optimizer steps as on the full path; never taken where the full path must run."""
from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.checkpoint import checkpoint

import fastrnn
from fastrnn import training
from fastrnn.kernels import numba_cpu

from _support import (LEAN_CASES, TOL, flatten, nan_filled_buffers, pair, seed_of, spy_calls,
                      without)


@pytest.fixture(autouse=True)
def nan_filled(monkeypatch):
    nan_filled_buffers(monkeypatch)


@pytest.fixture
def lean_calls(monkeypatch):
    """Counts the lean training path's whole-stack forward calls."""
    return spy_calls(monkeypatch, numba_cpu.lean_training(), "forward")


def full_path(fn, *args):
    """``fn(*args)`` with the lean training path switched off."""
    return without(training, "forward", fn, *args)


def inputs(variant, mod, shape, batch_first, with_hx, dtype, seed):
    """Fresh leaves (x, *hx states), all requiring a gradient, and ``build(leaves) -> args``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=dtype, generator=generator)
    leaves = [x]
    if with_hx:
        layers = mod.num_layers * (2 if mod.bidirectional else 1)
        batch = () if x.dim() == 2 else (x.shape[0 if batch_first else 1],)
        leaves.append(torch.randn(layers, *batch, mod.proj_size or mod.hidden_size,
                                  dtype=dtype, generator=generator))
        if mod.mode == "LSTM":
            leaves.append(torch.randn(layers, *batch, mod.hidden_size, dtype=dtype,
                                      generator=generator))
    leaves = [t.requires_grad_() for t in leaves]

    def build(leaves):
        x, *state = leaves
        return (x,) if not state else (x, tuple(state) if len(state) == 2 else state[0])
    return leaves, build


def outputs_and_grads(mod, leaves, build, seed, create_graph=False):
    """The module's outputs on ``build(leaves)`` and the gradients of a random weighting of all
    of them with respect to the leaves and the module's parameters."""
    outs = flatten(mod(*build(leaves)))
    generator = torch.Generator().manual_seed(seed + 1)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=generator)).sum()
               for o in outs)
    wrt = leaves + list(mod.parameters())
    return outs, torch.autograd.grad(loss, wrt, create_graph=create_graph)


def assert_bitwise(got, expected):
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert torch.equal(g, e), (g - e).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", LEAN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_lean_equals_full_path_and_torch(case, dtype, lean_calls):
    variant, layers, bidirectional, batch_first, shape, with_hx = case
    seed = seed_of(case, dtype)
    torch.manual_seed(seed)
    ref, mod = pair(variant, "numba", dtype, input_size=5, hidden_size=4, num_layers=layers,
                    bidirectional=bidirectional, batch_first=batch_first)
    leaves, build = inputs(variant, mod, shape, batch_first, with_hx, dtype, seed)
    got = outputs_and_grads(mod, leaves, build, seed)
    assert len(lean_calls) == 1
    expected = full_path(outputs_and_grads, mod, leaves, build, seed)
    assert len(lean_calls) == 1
    assert_bitwise(got[0] + list(got[1]), expected[0] + list(expected[1]))
    reference = outputs_and_grads(ref, leaves, build, seed)
    for g, e in zip(got[0] + list(got[1]), reference[0] + list(reference[1]), strict=True):
        torch.testing.assert_close(g, e, **TOL[dtype])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_peephole_lstm(bidirectional, lean_calls):
    torch.manual_seed(0)
    mod = fastrnn.PeepholeLSTM(5, 4, num_layers=2, bidirectional=bidirectional, backend="numba")
    leaves, build = inputs("lstm", mod, (6, 3, 5), False, True, torch.float32, 0)
    got = outputs_and_grads(mod, leaves, build, 0)
    expected = full_path(outputs_and_grads, mod, leaves, build, 0)
    assert len(lean_calls) == 1
    assert_bitwise(got[0] + list(got[1]), expected[0] + list(expected[1]))


@pytest.mark.parametrize("variant, shape, batch_first", [
    ("lstm", (3, 2, 3), False), ("gru", (2, 3, 3), True), ("lstm", (3, 3), True)])
def test_double_backward_and_gradcheck(variant, shape, batch_first, lean_calls):
    """create_graph differentiates the full path's graph, recorded again: the same gradients and
    gradients of gradients; float64 gradcheck and gradgradcheck through the module (batched,
    batch_first, unbatched)."""
    torch.manual_seed(1)
    _, mod = pair(variant, "numba", torch.float64, input_size=3, hidden_size=2, num_layers=2,
                  bidirectional=True, batch_first=batch_first)
    leaves, build = inputs(variant, mod, shape, batch_first, True, torch.float64, 1)

    def second(fn):
        outs, grads = fn(mod, leaves, build, 1, True)
        total = sum((g * g).sum() for g in grads)
        return list(grads) + list(torch.autograd.grad(total, leaves + list(mod.parameters())))
    got = second(outputs_and_grads)
    assert_bitwise(got, full_path(second, outputs_and_grads))
    assert lean_calls
    names = [n for n, _ in mod.named_parameters()]

    def fn(*tensors):
        params = dict(zip(names, tensors[len(leaves):]))
        return tuple(flatten(torch.func.functional_call(mod, params,
                                                        build(list(tensors[:len(leaves)])))))
    params = [p.detach().clone().requires_grad_() for p in mod.parameters()]
    assert torch.autograd.gradcheck(fn, tuple(leaves + params))
    assert torch.autograd.gradgradcheck(fn, tuple(leaves + params))


def test_in_place_changes_fail_backward_as_on_the_full_path(lean_calls):
    torch.manual_seed(2)
    _, mod = pair("lstm", "numba", torch.float32, input_size=5, hidden_size=4)
    x, h0, c0 = (torch.randn(*s, requires_grad=True) for s in ((3, 2, 5), (1, 2, 4), (1, 2, 4)))

    def changed(what):
        xx, hh = x * 1, h0 * 1
        out, _ = mod(xx, (hh, c0))
        with torch.no_grad():
            {"output": out, "input": xx, "state": hh, "weight": mod.weight_hh_l0}[what].add_(1)
        try:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()
        finally:
            with torch.no_grad():
                mod.weight_hh_l0.sub_(1) if what == "weight" else None
    for what in ("output", "input", "state", "weight"):
        changed(what)
        full_path(changed, what)
    assert len(lean_calls) == 4


def test_retained_graph_frozen_weights_and_carried_state(lean_calls):
    torch.manual_seed(3)
    _, mod = pair("gru", "numba", torch.float32, input_size=5, hidden_size=4, num_layers=2)
    mod.weight_ih_l0.requires_grad_(False)
    xs = torch.randn(3, 2, 2, 5)

    def run():
        for p in mod.parameters():
            p.grad = None
        h, outs = None, []
        for x in xs:  # the state carried without detaching: one graph through three calls
            out, h = mod(x, h)
            outs.append(out)
        loss = torch.stack(outs).square().sum() + h.sum()
        loss.backward(retain_graph=True)
        loss.backward()
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            loss.backward()
        return [p.grad for p in mod.parameters()]
    got = run()
    assert got[0] is None and len(lean_calls) == 3
    expected = full_path(run)
    assert expected[0] is None
    assert_bitwise(got[1:], expected[1:])


def test_checkpoint_and_optimizer_steps(lean_calls):
    """Non-reentrant checkpointing (forward again in backward) and a few SGD steps (weights
    prepared again every step) give the full path's weights, bit for bit."""
    torch.manual_seed(4)
    _, lean = pair("lstm_proj", "numba", torch.float32, input_size=5, hidden_size=4,
                   num_layers=2)
    full = fastrnn.LSTM(5, 4, num_layers=2, proj_size=3, backend="numba")
    full.load_state_dict(lean.state_dict())
    xs = torch.randn(4, 6, 3, 5)

    def train(mod):
        optimizer = torch.optim.SGD(mod.parameters(), lr=0.5)
        for x in xs:
            optimizer.zero_grad()
            out, _ = checkpoint(mod, x, use_reentrant=False)
            out.square().sum().backward()
            optimizer.step()
        return list(mod.parameters())
    got = train(lean)
    assert len(lean_calls) == 8  # each step's forward, then again in backward
    assert_bitwise(got, full_path(train, full))


def test_streamed_training_reads_the_weights_as_they_are(lean_calls):
    """Calls of a few rows (``launch.live``: every weight read in place, the biases summed each
    call) between SGD steps and a write to a bias through ``.data``: the full path's weights and
    outputs, bit for bit."""
    torch.manual_seed(5)
    _, lean = pair("gru", "numba", torch.float32, input_size=5, hidden_size=4, num_layers=2)
    full = fastrnn.GRU(5, 4, num_layers=2, backend="numba")
    full.load_state_dict(lean.state_dict())
    xs = torch.randn(5, 1, 2, 5)
    assert numba_cpu.launch.live(2)

    def train(mod):
        optimizer = torch.optim.SGD(mod.parameters(), lr=0.5)
        outs, state = [], None
        for step, x in enumerate(xs):
            optimizer.zero_grad()
            out, state = mod(x, state)
            state = state.detach()
            out.square().sum().backward()
            optimizer.step()
            if step == 2:
                mod.bias_hh_l1.data[9] += 1  # the n part: b_hn
                mod.bias_ih_l0.data[0] -= 1
            outs.append(out.detach())
        return outs + list(mod.parameters())
    got = train(lean)
    assert len(lean_calls) == 5
    assert_bitwise(got, full_path(train, full))


def test_not_taken_where_the_full_path_runs(lean_calls, monkeypatch):
    torch.manual_seed(5)
    _, mod = pair("lstm", "numba", torch.float32, input_size=5, hidden_size=4, num_layers=2,
                  dropout=0.5)
    x = torch.randn(4, 3, 5, requires_grad=True)
    mod(pack_padded_sequence(x, [4, 3, 1]))
    mod(x)  # training mode with inter-layer dropout
    mod.eval()
    torch.func.grad(lambda x: mod(x)[0].sum())(x)  # torch.func transforms
    auto = fastrnn.LSTM(5, 4)  # auto: a one-step call with a gradient runs torch's op
    out = auto(x[:1])[0]
    assert "Stack" not in type(out.grad_fn).__name__
    assert lean_calls == []
    mod(x)
    auto(x[:2])
    assert len(lean_calls) == 2
    inference_calls = spy_calls(monkeypatch, numba_cpu.lean_path(), "forward_stack")
    for p in mod.parameters():
        p.requires_grad_(False)
    out = mod(x.detach())[0]  # nothing requires a gradient: the lean inference path
    assert out.grad_fn is None and len(inference_calls) == 1 and len(lean_calls) == 2
